//! A small rtnetlink client: links up, addresses and routes over a raw AF_NETLINK
//! socket, each request acknowledged by the kernel (no `ip` program in the VM).

use nix::sys::socket::{
    bind, recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
    SockType,
};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};

const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const IFF_UP: u32 = 0x1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_FLAGS: u16 = 8;
const IFA_F_NODAD: u32 = 0x02;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RTN_UNICAST: u8 = 1;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_MULTIPATH: u16 = 9;
const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Netlink failures, with the request they belong to.
#[derive(Debug)]
pub enum NetlinkError {
    /// Socket creation, send or receive failed.
    Socket(&'static str, nix::Error),
    /// The kernel refused a request.
    Refused(String, nix::Error),
    /// The kernel's answer was not an acknowledgement.
    BadAnswer(String),
}

impl std::fmt::Display for NetlinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NetlinkError::Socket(what, e) => write!(f, "netlink {what}: {e}"),
            NetlinkError::Refused(what, e) => write!(f, "{what}: {e}"),
            NetlinkError::BadAnswer(what) => write!(f, "{what}: unexpected netlink answer"),
        }
    }
}

/// An open rtnetlink socket.
pub struct Rtnl {
    fd: OwnedFd,
    seq: u32,
}

/// One netlink message under construction: header, fixed part, attributes.
struct Msg(Vec<u8>);

impl Msg {
    fn new(kind: u16, flags: u16, seq: u32) -> Msg {
        let mut b = Vec::with_capacity(64);
        b.extend_from_slice(&0u32.to_ne_bytes()); // length, patched in finish()
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
        Msg(b)
    }

    fn bytes(&mut self, b: &[u8]) -> &mut Msg {
        self.0.extend_from_slice(b);
        self
    }

    fn attr(&mut self, kind: u16, data: &[u8]) -> &mut Msg {
        let len = 4 + data.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(data);
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
        self
    }

    fn finish(&mut self) -> &[u8] {
        let len = self.0.len() as u32;
        self.0[..4].copy_from_slice(&len.to_ne_bytes());
        &self.0
    }
}

fn family(a: &IpAddr) -> u8 {
    match a {
        IpAddr::V4(_) => AF_INET,
        IpAddr::V6(_) => AF_INET6,
    }
}

fn octets(a: &IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

impl Rtnl {
    /// Opens and binds a NETLINK_ROUTE socket.
    pub fn open() -> Result<Rtnl, NetlinkError> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )
        .map_err(|e| NetlinkError::Socket("socket", e))?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))
            .map_err(|e| NetlinkError::Socket("bind", e))?;
        Ok(Rtnl { fd, seq: 0 })
    }

    /// Sends a request and waits for its acknowledgement.
    fn call(&mut self, what: String, msg: &mut Msg) -> Result<(), NetlinkError> {
        let seq = self.seq;
        msg.0[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.seq += 1;
        sendto(
            self.fd.as_raw_fd(),
            msg.finish(),
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )
        .map_err(|e| NetlinkError::Socket("send", e))?;
        let mut buf = [0u8; 8192];
        loop {
            let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())
                .map_err(|e| NetlinkError::Socket("recv", e))?;
            let mut off = 0;
            while off + 16 <= n {
                let word = |at: usize| {
                    let mut w = [0u8; 4];
                    w.copy_from_slice(&buf[at..at + 4]);
                    w
                };
                let len = u32::from_ne_bytes(word(off)) as usize;
                let kind = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
                let got_seq = u32::from_ne_bytes(word(off + 8));
                if len < 16 || off + len > n {
                    return Err(NetlinkError::BadAnswer(what));
                }
                if kind == NLMSG_ERROR && got_seq == seq && len >= 20 {
                    let code = i32::from_ne_bytes(word(off + 16));
                    return match code {
                        0 => Ok(()),
                        c => Err(NetlinkError::Refused(what, nix::Error::from_raw(-c))),
                    };
                }
                off += (len + 3) & !3;
            }
        }
    }

    /// Sets interface `index` up.
    pub fn link_up(&mut self, index: u32, name: &str) -> Result<(), NetlinkError> {
        let mut m = Msg::new(RTM_NEWLINK, 0, 0);
        // struct ifinfomsg: family, pad, type, index, flags, change.
        m.bytes(&[AF_UNSPEC, 0])
            .bytes(&0u16.to_ne_bytes())
            .bytes(&(index as i32).to_ne_bytes())
            .bytes(&IFF_UP.to_ne_bytes())
            .bytes(&IFF_UP.to_ne_bytes());
        self.call(format!("set {name} up"), &mut m)
    }

    /// Adds `addr/prefix` to interface `index` (IPv6 without duplicate detection, so
    /// that it is usable at once: the plan's addresses are unique by construction).
    pub fn add_address(
        &mut self,
        index: u32,
        name: &str,
        addr: IpAddr,
        prefix: u8,
    ) -> Result<(), NetlinkError> {
        let mut m = Msg::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, 0);
        let nodad = if addr.is_ipv6() { IFA_F_NODAD } else { 0 };
        // struct ifaddrmsg: family, prefixlen, flags, scope, index.
        m.bytes(&[family(&addr), prefix, nodad as u8, RT_SCOPE_UNIVERSE])
            .bytes(&index.to_ne_bytes())
            .attr(IFA_LOCAL, &octets(&addr))
            .attr(IFA_ADDRESS, &octets(&addr))
            .attr(IFA_FLAGS, &nodad.to_ne_bytes());
        self.call(format!("add {addr}/{prefix} to {name}"), &mut m)
    }

    /// Adds a default route via `gateway` out of interface `index`.
    pub fn add_default_route(
        &mut self,
        index: u32,
        name: &str,
        gateway: IpAddr,
    ) -> Result<(), NetlinkError> {
        let mut m = Msg::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, 0);
        // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
        m.bytes(&[
            family(&gateway),
            0,
            0,
            0,
            RT_TABLE_MAIN,
            RTPROT_BOOT,
            RT_SCOPE_UNIVERSE,
            RTN_UNICAST,
        ])
        .bytes(&0u32.to_ne_bytes())
        .attr(RTA_GATEWAY, &octets(&gateway))
        .attr(RTA_OIF, &index.to_ne_bytes());
        self.call(format!("default route via {gateway} dev {name}"), &mut m)
    }

    /// Adds a route to `dst/prefix` via `gateway` out of interface `index`.
    pub fn add_route(
        &mut self,
        index: u32,
        name: &str,
        dst: IpAddr,
        prefix: u8,
        gateway: IpAddr,
    ) -> Result<(), NetlinkError> {
        let mut m = route_msg(dst, prefix);
        m.attr(RTA_GATEWAY, &octets(&gateway))
            .attr(RTA_OIF, &index.to_ne_bytes());
        self.call(
            format!("route {dst}/{prefix} via {gateway} dev {name}"),
            &mut m,
        )
    }

    /// Adds (or replaces) one route to `dst`/`prefix` through every one of
    /// `gateways` on link `index`, at equal cost: the kernel spreads flows over them.
    pub fn add_multipath_route(
        &mut self,
        index: u32,
        name: &str,
        dst: IpAddr,
        prefix: u8,
        gateways: &[IpAddr],
    ) -> Result<(), NetlinkError> {
        let mut m = route_msg(dst, prefix);
        m.attr(RTA_MULTIPATH, &nexthops(index, gateways));
        self.call(
            format!(
                "route {dst}/{prefix} via {} gateways dev {name}",
                gateways.len()
            ),
            &mut m,
        )
    }
}

/// An RTM_NEWROUTE request for `dst`/`prefix` in the main table, without its
/// next hops.
fn route_msg(dst: IpAddr, prefix: u8) -> Msg {
    let mut m = Msg::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, 0);
    m.bytes(&[
        family(&dst),
        prefix,
        0,
        0,
        RT_TABLE_MAIN,
        RTPROT_BOOT,
        RT_SCOPE_UNIVERSE,
        RTN_UNICAST,
    ])
    .bytes(&0u32.to_ne_bytes())
    .attr(RTA_DST, &octets(&dst));
    m
}

/// RTA_MULTIPATH's payload: a `struct rtnexthop` (length, flags, weight - 1,
/// ifindex) per gateway, each followed by its RTA_GATEWAY attribute.
fn nexthops(index: u32, gateways: &[IpAddr]) -> Vec<u8> {
    let mut b = Vec::new();
    for gw in gateways {
        let gw = octets(gw); // 4 or 16 bytes: the attribute needs no padding
        let attr_len = 4 + gw.len();
        b.extend_from_slice(&((8 + attr_len) as u16).to_ne_bytes());
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&index.to_ne_bytes());
        b.extend_from_slice(&(attr_len as u16).to_ne_bytes());
        b.extend_from_slice(&RTA_GATEWAY.to_ne_bytes());
        b.extend_from_slice(&gw);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipath_has_one_rtnexthop_with_its_gateway_per_gateway() {
        let gws: Vec<IpAddr> = vec![
            "192.168.1.1".parse().unwrap(),
            "192.168.1.2".parse().unwrap(),
        ];
        let b = nexthops(3, &gws);
        assert_eq!(b.len(), 2 * 16);
        for (i, hop) in b.chunks(16).enumerate() {
            assert_eq!(u16::from_ne_bytes([hop[0], hop[1]]), 16, "rtnh_len");
            assert_eq!(&hop[2..4], &[0, 0], "flags, weight 1");
            assert_eq!(u32::from_ne_bytes(hop[4..8].try_into().unwrap()), 3);
            assert_eq!(u16::from_ne_bytes([hop[8], hop[9]]), 8);
            assert_eq!(u16::from_ne_bytes([hop[10], hop[11]]), RTA_GATEWAY);
            assert_eq!(&hop[12..], &[192, 168, 1, i as u8 + 1]);
        }
        let v6 = nexthops(3, &["fd00::1".parse().unwrap()]);
        assert_eq!(v6.len(), 8 + 4 + 16);
        assert_eq!(u16::from_ne_bytes([v6[0], v6[1]]), 28);
    }

    #[test]
    fn messages_are_padded_and_length_patched() {
        let mut m = Msg::new(RTM_NEWADDR, NLM_F_CREATE, 7);
        m.bytes(&[AF_INET, 24, 0, 0]).bytes(&3u32.to_ne_bytes());
        m.attr(IFA_LOCAL, &[192, 168, 1, 1]).attr(99, &[1]);
        let b = m.finish().to_vec();
        assert_eq!(b.len(), 16 + 8 + 8 + 8);
        assert_eq!(
            u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize,
            b.len()
        );
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), RTM_NEWADDR);
        let flags = u16::from_ne_bytes([b[6], b[7]]);
        assert_eq!(flags, NLM_F_CREATE | NLM_F_REQUEST | NLM_F_ACK);
        // The one-byte attribute: length 5, padded to 8.
        assert_eq!(u16::from_ne_bytes([b[32], b[33]]), 5);
    }
}
