//! Pod networking of the Kubernetes flavour, from kimg-contract's k8s ranges: a
//! node's CNI config (bridge + host-local, both families, its own pod ranges) and
//! routes to the other nodes' pods through their cluster addresses; a router gets
//! routes to every node's pods, and to the service ranges through all nodes at
//! equal cost. Images without the CNI plugins get nothing. Also vm-001's extra NIC
//! for the host's forward to the apiserver: its address, no route.

use crate::net::Link;
use crate::netlink::Rtnl;
use kimg_contract::k8s::{self, POD_PREFIX4, POD_PREFIX6};
use kimg_contract::net::{self, ClusterSize, Net};
use kimg_contract::{Role, VmId};
use std::net::IpAddr;
use std::path::Path;

/// The bridge plugin: its presence makes an image a Kubernetes one.
const BRIDGE_PLUGIN: &str = "/usr/lib/cni/bridge";
/// The CNI config kimg-init writes on nodes.
pub const CONFLIST: &str = "/etc/cni/net.d/10-kimg.conflist";

/// The CNI config of node `vm` (`None` for a number without an IPv4 pod range).
pub fn conflist(vm: VmId) -> Option<String> {
    let net4 = k8s::pod_net4(vm)?;
    let net6 = k8s::pod_net6(vm);
    Some(format!(
        r#"{{
  "cniVersion": "1.0.0",
  "name": "kimg",
  "plugins": [
    {{
      "type": "bridge",
      "bridge": "cbr0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {{
        "type": "host-local",
        "ranges": [
          [{{ "subnet": "{net4}/{POD_PREFIX4}" }}],
          [{{ "subnet": "{net6}/{POD_PREFIX6}" }}]
        ],
        "routes": [{{ "dst": "0.0.0.0/0" }}, {{ "dst": "::/0" }}]
      }}
    }},
    {{ "type": "portmap", "capabilities": {{ "portMappings": true }} }}
  ]
}}
"#
    ))
}

/// Writes the node's CNI config and adds the pod routes; returns one line per
/// failed step.
pub fn configure(vm: VmId, size: &ClusterSize, links: &[Link]) -> Vec<String> {
    let mut problems = Vec::new();
    if !Path::new(BRIDGE_PLUGIN).exists() {
        return problems;
    }
    if let Some(link) = links.iter().find(|l| l.mac == Some(k8s::API_FORWARD_MAC)) {
        problems.extend(api_forward(link).err());
    }
    if vm.role() == Role::Node {
        if let Some(text) = conflist(vm) {
            if let Err(e) = write_whole(Path::new(CONFLIST), &text) {
                problems.push(e);
            }
        }
    }
    let routes = k8s::pod_routes(vm, size);
    if routes.is_empty() {
        return problems; // and no service routes: a router's go where its pod routes go
    }
    let (services4, services6) = k8s::service_gateways(vm, size);
    let mac = net::mac(Net::Cluster, vm);
    let Some(link) = links.iter().find(|l| l.mac == Some(mac)) else {
        problems.push(format!("pod routes: no cluster interface with MAC {mac}"));
        return problems;
    };
    let mut rtnl = match Rtnl::open() {
        Ok(r) => r,
        Err(e) => {
            problems.push(e.to_string());
            return problems;
        }
    };
    for r in routes {
        for (dst, prefix, via) in [
            (IpAddr::V4(r.net4), POD_PREFIX4, IpAddr::V4(r.via4)),
            (IpAddr::V6(r.net6), POD_PREFIX6, IpAddr::V6(r.via6)),
        ] {
            if let Err(e) = rtnl.add_route(link.index, &link.name, dst, prefix, via) {
                problems.push(e.to_string());
            }
        }
    }
    let (range4, prefix4) = k8s::SERVICE_RANGE4;
    let (range6, prefix6) = k8s::SERVICE_RANGE6;
    for (dst, prefix, via) in [
        (
            IpAddr::V4(range4),
            prefix4,
            services4.into_iter().map(IpAddr::V4).collect::<Vec<_>>(),
        ),
        (
            IpAddr::V6(range6),
            prefix6,
            services6.into_iter().map(IpAddr::V6).collect(),
        ),
    ] {
        if via.is_empty() {
            continue;
        }
        if let Err(e) = rtnl.add_multipath_route(link.index, &link.name, dst, prefix, &via) {
            problems.push(e.to_string());
        }
    }
    problems
}

/// Up and addressed, without a default route: the NIC only answers the host's
/// forwarded connections (QEMU's `restrict=on` lets nothing out anyway).
fn api_forward(link: &Link) -> Result<(), String> {
    let mut rtnl = Rtnl::open().map_err(|e| e.to_string())?;
    rtnl.link_up(link.index, &link.name)
        .map_err(|e| e.to_string())?;
    rtnl.add_address(
        link.index,
        &link.name,
        IpAddr::V4(k8s::API_FORWARD_ADDR4),
        k8s::API_FORWARD_PREFIX4,
    )
    .map_err(|e| e.to_string())
}

/// Writes `path` whole (temporary file, then rename), creating its directory.
fn write_whole(path: &Path, text: &str) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    }
    let tmp = path.with_extension("kimg-tmp");
    std::fs::write(&tmp, text).map_err(|e| format!("write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("rename {}: {e}", tmp.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_conflist_is_json_with_the_nodes_ranges() {
        let text = conflist(VmId::new(2).unwrap()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let ranges = &v["plugins"][0]["ipam"]["ranges"];
        assert_eq!(ranges[0][0]["subnet"], "10.244.2.0/24");
        assert_eq!(ranges[1][0]["subnet"], "fd00:10:244:2::/64");
        assert_eq!(v["plugins"][0]["type"], "bridge");
    }
}
