//! kimg's address plan, written down once: networks, MACs, IPv4/IPv6 addresses,
//! default routes and /etc/hosts of a cluster.
//!
//! Two closed networks, numbered like xcluster's interfaces:
//!
//! | net | name    | members           | IPv4            | IPv6                 |
//! |-----|---------|-------------------|-----------------|----------------------|
//! | 1   | cluster | nodes, routers    | 192.168.1.N/24  | fd00:6b69:0:1::N/64  |
//! | 2   | tester  | routers, testers  | 192.168.2.N/24  | fd00:6b69:0:2::N/64  |
//!
//! N is the VM number (vm-201 -> N = 201; in IPv6 the decimal digits are written as
//! they are, `::201`). The MAC of VM N on net K is `02:6b:69:KK:HH:LL` (locally
//! administered, `6b:69` = "ki", HHLL = N), so a VM finds its number from its MAC
//! when the command line names none ([`vm_from_mac`]). Nodes route everything through
//! the first router (vm-201) on the cluster net, testers through it on the tester
//! net; routers forward between the two nets and have no default route.

use crate::{Role, VmId};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// One of the cluster's networks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Net {
    /// Nodes and routers (net 1).
    Cluster,
    /// Routers and testers (net 2).
    Tester,
}

/// Every network, in interface order.
pub const NETS: [Net; 2] = [Net::Cluster, Net::Tester];

/// IPv4 prefix length of every network.
pub const PREFIX4: u8 = 24;
/// IPv6 prefix length of every network.
pub const PREFIX6: u8 = 64;

impl Net {
    /// The network's number K (1 or 2): in its MACs, addresses and names.
    pub fn number(self) -> u8 {
        match self {
            Net::Cluster => 1,
            Net::Tester => 2,
        }
    }

    /// The network with number K.
    pub fn from_number(k: u8) -> Option<Net> {
        NETS.into_iter().find(|n| n.number() == k)
    }

    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Net::Cluster => "cluster",
            Net::Tester => "tester",
        }
    }

    /// The roles with an interface on this network.
    pub fn roles(self) -> &'static [Role] {
        match self {
            Net::Cluster => &[Role::Node, Role::Router],
            Net::Tester => &[Role::Router, Role::Tester],
        }
    }

    /// IPv4 network address (host part zero).
    pub fn subnet4(self) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, self.number(), 0)
    }

    /// IPv6 network prefix (host part zero).
    pub fn subnet6(self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x6b69, 0, u16::from(self.number()), 0, 0, 0, 0)
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// How many VMs of each role a cluster has; the launcher puts it on the kernel
/// command line so that every VM can write the same /etc/hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSize {
    /// Nodes, vm-001..
    pub nodes: u16,
    /// Routers, vm-201..
    pub routers: u16,
    /// Testers, vm-221..
    pub testers: u16,
}

impl Default for ClusterSize {
    /// kimg's default cluster: 4 nodes, 2 routers, no testers.
    fn default() -> Self {
        ClusterSize {
            nodes: 4,
            routers: 2,
            testers: 0,
        }
    }
}

impl ClusterSize {
    /// The count of a role.
    pub fn count(&self, role: Role) -> u16 {
        match role {
            Role::Node => self.nodes,
            Role::Router => self.routers,
            Role::Tester => self.testers,
            Role::Reserved => 0,
        }
    }

    /// The VMs of the cluster in order (nodes, routers, testers); an error names a
    /// role asked for beyond the role table's capacity.
    pub fn members(&self) -> Result<Vec<VmId>, String> {
        let mut ids = Vec::new();
        for role in [Role::Node, Role::Router, Role::Tester] {
            let count = self.count(role);
            if count > role.capacity() {
                return Err(format!("at most {} {role}s, not {count}", role.capacity()));
            }
            let first = role.first().unwrap_or(1);
            ids.extend((0..count).filter_map(|i| VmId::new(first + i)));
        }
        Ok(ids)
    }

    /// The smallest size that still has `vm` in it (a VM booted without a size on
    /// its command line at least knows itself and the default routers).
    pub fn including(mut self, vm: VmId) -> ClusterSize {
        let role = vm.role();
        if let Some(first) = role.first() {
            let needed = vm.number() - first + 1;
            match role {
                Role::Node => self.nodes = self.nodes.max(needed),
                Role::Router => self.routers = self.routers.max(needed),
                Role::Tester => self.testers = self.testers.max(needed),
                Role::Reserved => {}
            }
        }
        self
    }
}

/// One network interface of a VM in the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    /// The network it sits on.
    pub net: Net,
    /// Its MAC.
    pub mac: Mac,
    /// IPv4 address (prefix [`PREFIX4`]).
    pub ipv4: Ipv4Addr,
    /// IPv6 address (prefix [`PREFIX6`]).
    pub ipv6: Ipv6Addr,
}

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl std::str::FromStr for Mac {
    type Err = String;
    /// `aa:bb:cc:dd:ee:ff` (any case, as /sys/class/net/*/address has it).
    fn from_str(s: &str) -> Result<Mac, String> {
        let mut b = [0u8; 6];
        let parts: Vec<&str> = s.trim().split(':').collect();
        if parts.len() != 6 {
            return Err(format!("{s:?} is not a MAC address"));
        }
        for (i, p) in parts.iter().enumerate() {
            if p.len() != 2 {
                return Err(format!("{s:?} is not a MAC address"));
            }
            b[i] = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not a MAC address"))?;
        }
        Ok(Mac(b))
    }
}

impl Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Mac, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// First three bytes of every kimg MAC: locally administered, "ki".
pub const MAC_PREFIX: [u8; 3] = [0x02, 0x6b, 0x69];

/// The MAC of `vm` on `net`.
pub fn mac(net: Net, vm: VmId) -> Mac {
    let [hi, lo] = vm.number().to_be_bytes();
    Mac([
        MAC_PREFIX[0],
        MAC_PREFIX[1],
        MAC_PREFIX[2],
        net.number(),
        hi,
        lo,
    ])
}

/// The VM and network a kimg MAC belongs to; `None` for any other MAC.
pub fn vm_from_mac(m: Mac) -> Option<(VmId, Net)> {
    if m.0[..3] != MAC_PREFIX {
        return None;
    }
    let net = Net::from_number(m.0[3])?;
    let vm = VmId::new(u16::from_be_bytes([m.0[4], m.0[5]]))?;
    Some((vm, net))
}

/// `vm`'s IPv4 address on `net` (`None` for numbers above 255, which no role has).
pub fn ipv4(net: Net, vm: VmId) -> Option<Ipv4Addr> {
    let n = u8::try_from(vm.number()).ok()?;
    let [a, b, c, _] = net.subnet4().octets();
    Some(Ipv4Addr::new(a, b, c, n))
}

/// `vm`'s IPv6 address on `net`: the VM number's decimal digits as the last group.
pub fn ipv6(net: Net, vm: VmId) -> Ipv6Addr {
    // 1..=999 in decimal digits read as hex fits a u16 (0x999).
    let host = u16::from_str_radix(&vm.number().to_string(), 16).unwrap_or(0);
    let mut s = net.subnet6().segments();
    s[7] = host;
    Ipv6Addr::from(s)
}

/// The interfaces `vm` has, in the order QEMU gets them (net 1 first).
pub fn nics(vm: VmId) -> Vec<Nic> {
    NETS.into_iter()
        .filter(|n| n.roles().contains(&vm.role()))
        .filter_map(|net| {
            Some(Nic {
                net,
                mac: mac(net, vm),
                ipv4: ipv4(net, vm)?,
                ipv6: ipv6(net, vm),
            })
        })
        .collect()
}

/// The router nodes and testers send everything through: the first router.
pub fn gateway_vm(size: &ClusterSize) -> Option<VmId> {
    (size.routers > 0)
        .then(|| Role::Router.first().and_then(VmId::new))
        .flatten()
}

/// A default route: via this gateway, on this network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefaultRoute {
    /// The network the gateway is on.
    pub net: Net,
    /// IPv4 gateway.
    pub via4: Ipv4Addr,
    /// IPv6 gateway.
    pub via6: Ipv6Addr,
}

/// `vm`'s default route: nodes via the gateway router on the cluster net, testers on
/// the tester net; routers (and clusters without routers) have none.
pub fn default_route(vm: VmId, size: &ClusterSize) -> Option<DefaultRoute> {
    let net = match vm.role() {
        Role::Node => Net::Cluster,
        Role::Tester => Net::Tester,
        Role::Router | Role::Reserved => return None,
    };
    let gw = gateway_vm(size)?;
    Some(DefaultRoute {
        net,
        via4: ipv4(net, gw)?,
        via6: ipv6(net, gw),
    })
}

/// /etc/hosts of every VM of a cluster of `size`: localhost, then each VM's
/// addresses (a router's cluster-net addresses first, so its name resolves there).
pub fn hosts(size: &ClusterSize) -> String {
    let mut s = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    for vm in size.members().unwrap_or_default() {
        for nic in nics(vm) {
            s.push_str(&format!("{}\t{vm}\n{}\t{vm}\n", nic.ipv4, nic.ipv6));
        }
    }
    s
}

/// The plan as text lines, for `kimg status`.
pub fn describe(size: &ClusterSize) -> Vec<String> {
    let mut lines = Vec::new();
    for net in NETS {
        let roles: Vec<&str> = net.roles().iter().map(|r| r.as_str()).collect();
        lines.push(format!(
            "net {} {:<7} {}/{PREFIX4} {}/{PREFIX6} ({}; MAC 02:6b:69:{:02x}:HH:LL)",
            net.number(),
            net.as_str(),
            net.subnet4(),
            net.subnet6(),
            roles.join(", "),
            net.number()
        ));
    }
    match gateway_vm(size) {
        Some(gw) => lines.push(format!(
            "default route of nodes and testers: {gw}; routers forward"
        )),
        None => lines.push("no routers: no default routes".into()),
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(s: &str) -> VmId {
        s.parse().unwrap()
    }

    #[test]
    fn macs_map_back_to_their_vm_and_net() {
        for n in [1, 2, 200, 201, 220, 221, 240, 999] {
            let v = VmId::new(n).unwrap();
            for net in NETS {
                assert_eq!(vm_from_mac(mac(net, v)), Some((v, net)));
            }
        }
        assert_eq!(
            mac(Net::Tester, vm("vm-201")).to_string(),
            "02:6b:69:02:00:c9"
        );
        assert_eq!(
            vm_from_mac("02:6B:69:01:00:03".parse().unwrap()),
            Some((vm("vm-003"), Net::Cluster))
        );
        for other in [
            "52:54:00:12:34:56",
            "02:6b:69:03:00:01",
            "02:6b:69:01:00:00",
        ] {
            assert_eq!(vm_from_mac(other.parse().unwrap()), None, "{other}");
        }
        assert!("02:6b:69:01:00".parse::<Mac>().is_err());
        assert!("02:6b:69:01:00:zz".parse::<Mac>().is_err());
    }

    #[test]
    fn roles_get_their_networks_and_addresses() {
        let node = nics(vm("vm-003"));
        assert_eq!(node.len(), 1);
        assert_eq!(node[0].ipv4.to_string(), "192.168.1.3");
        assert_eq!(node[0].ipv6.to_string(), "fd00:6b69:0:1::3");
        let router = nics(vm("vm-202"));
        let nets: Vec<Net> = router.iter().map(|n| n.net).collect();
        assert_eq!(nets, [Net::Cluster, Net::Tester]);
        assert_eq!(router[1].ipv4.to_string(), "192.168.2.202");
        assert_eq!(router[1].ipv6.to_string(), "fd00:6b69:0:2::202");
        let tester = nics(vm("vm-221"));
        assert_eq!(tester.len(), 1);
        assert_eq!(tester[0].net, Net::Tester);
        assert!(nics(vm("vm-500")).is_empty());
    }

    #[test]
    fn default_routes_go_through_the_first_router() {
        let size = ClusterSize::default();
        let r = default_route(vm("vm-001"), &size).unwrap();
        assert_eq!(
            (r.net, r.via4.to_string()),
            (Net::Cluster, "192.168.1.201".into())
        );
        let r = default_route(vm("vm-221"), &size).unwrap();
        assert_eq!(r.via6.to_string(), "fd00:6b69:0:2::201");
        assert_eq!(default_route(vm("vm-201"), &size), None);
        let no_routers = ClusterSize { routers: 0, ..size };
        assert_eq!(default_route(vm("vm-001"), &no_routers), None);
    }

    #[test]
    fn hosts_lists_every_vm_and_members_respect_the_table() {
        let size = ClusterSize {
            nodes: 2,
            routers: 1,
            testers: 1,
        };
        let h = hosts(&size);
        for line in [
            "192.168.1.1\tvm-001",
            "fd00:6b69:0:1::2\tvm-002",
            "192.168.1.201\tvm-201",
            "192.168.2.201\tvm-201",
            "192.168.2.221\tvm-221",
        ] {
            assert!(h.contains(line), "{line} missing:\n{h}");
        }
        assert!(!h.contains("vm-003"));
        let too_many = ClusterSize {
            routers: 21,
            ..size
        };
        assert!(too_many.members().is_err());
        let grown = ClusterSize::default().including(vm("vm-007"));
        assert_eq!(grown.nodes, 7);
        assert_eq!(describe(&size).len(), 3);
    }
}
