//! The VM's network from the contract's plan: which VM this is (command line, else
//! MAC), loopback and the plan's interfaces up with their addresses, default routes,
//! forwarding on routers, and /etc/hosts listing the whole cluster.

use crate::netlink::Rtnl;
use kimg_contract::net::{self, ClusterSize, Mac, PREFIX4, PREFIX6};
use kimg_contract::{Role, VmId};
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

const SYS_NET: &str = "/sys/class/net";
/// How long to wait for the plan's NICs to appear after virtio_net loaded.
const NIC_TIMEOUT: Duration = Duration::from_secs(5);
/// Sysctls a router sets so that it forwards between the networks.
const FORWARDING: &[&str] = &[
    "/proc/sys/net/ipv4/ip_forward",
    "/proc/sys/net/ipv6/conf/all/forwarding",
];
/// Where the cluster's names go.
pub const HOSTS: &str = "/etc/hosts";

/// An interface the kernel has: name, index, MAC.
#[derive(Debug, Clone)]
pub struct Link {
    /// Kernel name (eth0..).
    pub name: String,
    /// Interface index.
    pub index: u32,
    /// MAC, if it reads as one.
    pub mac: Option<Mac>,
}

/// The interfaces in /sys/class/net.
pub fn links() -> Vec<Link> {
    let Ok(rd) = std::fs::read_dir(SYS_NET) else {
        return Vec::new();
    };
    let mut out: Vec<Link> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let dir = Path::new(SYS_NET).join(&name);
            let index = std::fs::read_to_string(dir.join("ifindex"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            let mac = std::fs::read_to_string(dir.join("address"))
                .ok()
                .and_then(|m| m.parse().ok());
            Some(Link { name, index, mac })
        })
        .collect();
    out.sort_by_key(|l| l.index);
    out
}

/// The VM a kimg MAC among `links` names (the fallback when the command line names
/// none, e.g. an image booted by another launcher with kimg's MACs).
pub fn vm_from_links(links: &[Link]) -> Option<VmId> {
    links
        .iter()
        .filter_map(|l| net::vm_from_mac(l.mac?))
        .map(|(vm, _)| vm)
        .next()
}

/// The VM a kimg MAC names, waiting up to [`NIC_TIMEOUT`] for virtio_net to probe
/// the NICs (only when the command line named no VM).
pub fn vm_from_nics() -> Option<VmId> {
    let deadline = Instant::now() + NIC_TIMEOUT;
    loop {
        let found = vm_from_links(&links());
        if found.is_some() || Instant::now() >= deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until every NIC the plan gives `vm` exists (virtio_net probes them after
/// the module loads) and returns the links then present.
pub fn wait_for_nics(vm: VmId) -> Vec<Link> {
    let want: Vec<Mac> = net::nics(vm).iter().map(|n| n.mac).collect();
    let deadline = Instant::now() + NIC_TIMEOUT;
    loop {
        let have = links();
        let all = want
            .iter()
            .all(|m| have.iter().any(|l| l.mac.as_ref() == Some(m)));
        if all || Instant::now() >= deadline {
            return have;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Configures the network of `vm` in a cluster of `size`; returns the addresses set
/// (`ADDR/PREFIX`) and one line per failed step.
pub fn configure(vm: VmId, size: &ClusterSize, links: &[Link]) -> (Vec<String>, Vec<String>) {
    let mut addresses = Vec::new();
    let mut problems = Vec::new();
    let mut rtnl = match Rtnl::open() {
        Ok(r) => r,
        Err(e) => return (addresses, vec![e.to_string()]),
    };
    if let Some(lo) = links.iter().find(|l| l.name == "lo") {
        if let Err(e) = rtnl.link_up(lo.index, "lo") {
            problems.push(e.to_string());
        }
    }
    let route = net::default_route(vm, size);
    for nic in net::nics(vm) {
        let Some(link) = links.iter().find(|l| l.mac == Some(nic.mac)) else {
            problems.push(format!(
                "no interface with MAC {} (net {} {})",
                nic.mac,
                nic.net.number(),
                nic.net
            ));
            continue;
        };
        if let Err(e) = rtnl.link_up(link.index, &link.name) {
            problems.push(e.to_string());
            continue;
        }
        for (addr, prefix) in [
            (IpAddr::V4(nic.ipv4), PREFIX4),
            (IpAddr::V6(nic.ipv6), PREFIX6),
        ] {
            match rtnl.add_address(link.index, &link.name, addr, prefix) {
                Ok(()) => addresses.push(format!("{addr}/{prefix}")),
                Err(e) => problems.push(e.to_string()),
            }
        }
        if let Some(r) = route.as_ref().filter(|r| r.net == nic.net) {
            for gw in [IpAddr::V4(r.via4), IpAddr::V6(r.via6)] {
                if let Err(e) = rtnl.add_default_route(link.index, &link.name, gw) {
                    problems.push(e.to_string());
                }
            }
        }
    }
    if vm.role() == Role::Router {
        for path in FORWARDING {
            if let Err(e) = std::fs::write(path, "1\n") {
                problems.push(format!("write {path}: {e}"));
            }
        }
    }
    if let Err(e) = write_hosts(&net::hosts(size)) {
        problems.push(e);
    }
    (addresses, problems)
}

/// Writes /etc/hosts whole (temporary file, then rename).
fn write_hosts(text: &str) -> Result<(), String> {
    let tmp = format!("{HOSTS}.kimg-tmp");
    std::fs::write(&tmp, text).map_err(|e| format!("write {tmp}: {e}"))?;
    std::fs::rename(&tmp, HOSTS).map_err(|e| format!("rename {tmp} to {HOSTS}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vm_is_found_from_a_kimg_mac_only() {
        let link = |name: &str, mac: &str| Link {
            name: name.into(),
            index: 1,
            mac: mac.parse().ok(),
        };
        let links = [
            link("lo", "00:00:00:00:00:00"),
            link("eth0", "52:54:00:12:34:56"),
            link("eth1", "02:6b:69:02:00:dd"),
        ];
        assert_eq!(vm_from_links(&links), VmId::new(221));
        assert_eq!(vm_from_links(&links[..2]), None);
    }
}
