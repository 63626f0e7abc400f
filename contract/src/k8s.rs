//! The Kubernetes flavour's shared facts, written once: where the generated PKI
//! lives in the guest, the apiserver's port and the endpoints that say it is ready,
//! and the pod and service ranges of both IP families.
//!
//! | what                  | IPv4            | IPv6                   |
//! |-----------------------|-----------------|------------------------|
//! | service range         | 10.96.0.0/16    | fd00:10:96::/112       |
//! | pods of node N        | 10.244.N.0/24   | fd00:10:244:N::/64     |

use crate::net::{self, ClusterSize, Mac, Net};
use crate::{Role, VmId};
use std::net::{Ipv4Addr, Ipv6Addr};

/// Where the per-cluster certificates and keys are unpacked in the guest.
pub const PKI_DIR: &str = "/etc/kubernetes/pki";
/// Where the components' kubeconfigs are unpacked in the guest.
pub const KUBECONFIG_DIR: &str = "/etc/kubernetes";
/// Where nodes find container image tarballs to import at boot (pre-pulled in the
/// image by `kimg build --k8s`, or from any overlay).
pub const IMAGES_DIR: &str = "/var/lib/kimg/images";
/// The control plane's VM (etcd, apiserver, controller-manager, scheduler).
pub const CONTROL_PLANE: VmId = VmId::FIRST;
/// The apiserver's secure port on vm-001.
pub const APISERVER_PORT: u16 = 6443;

/// The cluster CA's certificate, a file in [`PKI_DIR`] (every node has it).
pub const CA_CERT: &str = "ca.crt";
/// The admin client certificate (O=system:masters) and its key, files in
/// [`PKI_DIR`] on vm-001 only: the admin kubeconfig embeds the same pair, and curl
/// (the `--wait` check) takes files.
pub const ADMIN_CERT: &str = "admin.crt";
/// The key of [`ADMIN_CERT`].
pub const ADMIN_KEY: &str = "admin.key";

/// The apiserver's readiness endpoint: HTTP 200 once all its checks pass (etcd,
/// RBAC bootstrap...), open to any client. The image's services wait for it before
/// they start; `kimg run --wait` waits for it too.
pub const READYZ_PATH: &str = "/readyz";
/// The `default` service account of namespace `default`. The controller-manager
/// makes it some seconds after the apiserver is ready; until then the apiserver
/// refuses pods in that namespace, so `kimg run --wait` waits for it too.
pub const DEFAULT_SA_PATH: &str = "/api/v1/namespaces/default/serviceaccounts/default";

/// MAC of vm-001's extra NIC that only carries the host's forward to the apiserver
/// (QEMU user-mode, `restrict=on`). Its fourth byte, 0, is no kimg network, so it is
/// never taken for a plan NIC.
pub const API_FORWARD_MAC: Mac = Mac([0x02, 0x6b, 0x69, 0x00, 0x00, 0x01]);
/// The guest address of that NIC (QEMU user-mode's usual guest address), no route.
pub const API_FORWARD_ADDR4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// Prefix length of [`API_FORWARD_ADDR4`].
pub const API_FORWARD_PREFIX4: u8 = 24;

/// IPv4 service range: network and prefix length.
pub const SERVICE_RANGE4: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 96, 0, 0), 16);
/// IPv6 service range: network and prefix length.
pub const SERVICE_RANGE6: (Ipv6Addr, u8) = (Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0), 112);
/// Every node's IPv4 pod range together (kube-proxy's `clusterCIDR`).
pub const POD_SUPERNET4: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 244, 0, 0), 16);
/// Every node's IPv6 pod range together.
pub const POD_SUPERNET6: (Ipv6Addr, u8) = (Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 0), 48);
/// Prefix length of a node's IPv4 pod range.
pub const POD_PREFIX4: u8 = 24;
/// Prefix length of a node's IPv6 pod range.
pub const POD_PREFIX6: u8 = 64;

/// The first IPv4 service address: the `kubernetes` service's ClusterIP, which the
/// apiserver certificate must name.
pub fn first_service_ip4() -> Ipv4Addr {
    let [a, b, c, d] = SERVICE_RANGE4.0.octets();
    Ipv4Addr::new(a, b, c, d + 1)
}

/// The first IPv6 service address.
pub fn first_service_ip6() -> Ipv6Addr {
    let mut s = SERVICE_RANGE6.0.segments();
    s[7] += 1;
    Ipv6Addr::from(s)
}

/// The cluster DNS service's IPv4 address (the tenth of the range, as kubeadm does).
pub fn cluster_dns4() -> Ipv4Addr {
    let [a, b, c, d] = SERVICE_RANGE4.0.octets();
    Ipv4Addr::new(a, b, c, d + 10)
}

/// The cluster DNS service's IPv6 address.
pub fn cluster_dns6() -> Ipv6Addr {
    let mut s = SERVICE_RANGE6.0.segments();
    s[7] += 10;
    Ipv6Addr::from(s)
}

/// A node's IPv4 pod range network (`10.244.N.0`; `None` above 255, which no node
/// number reaches).
pub fn pod_net4(vm: VmId) -> Option<Ipv4Addr> {
    let n = u8::try_from(vm.number()).ok()?;
    Some(Ipv4Addr::new(10, 244, n, 0))
}

/// A node's IPv6 pod range network (`fd00:10:244:N::`, N in decimal digits as in
/// the cluster addresses).
pub fn pod_net6(vm: VmId) -> Ipv6Addr {
    let n = u16::from_str_radix(&vm.number().to_string(), 16).unwrap_or(0);
    Ipv6Addr::new(0xfd00, 0x10, 0x244, n, 0, 0, 0, 0)
}

/// A file of the PKI in the guest (`ca.crt` -> `/etc/kubernetes/pki/ca.crt`).
pub fn pki_path(file: &str) -> String {
    format!("{PKI_DIR}/{file}")
}

/// The kubeconfig file of a component (`admin`, `kube-scheduler`, `kubelet-vm-002`...).
pub fn kubeconfig_path(component: &str) -> String {
    format!("{KUBECONFIG_DIR}/{component}.kubeconfig")
}

/// A route to one node's pods, through that node's cluster addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodRoute {
    /// The node whose pods these are.
    pub node: VmId,
    /// Its IPv4 pod network (prefix [`POD_PREFIX4`]).
    pub net4: Ipv4Addr,
    /// Its IPv6 pod network (prefix [`POD_PREFIX6`]).
    pub net6: Ipv6Addr,
    /// Its cluster IPv4 address.
    pub via4: Ipv4Addr,
    /// Its cluster IPv6 address.
    pub via6: Ipv6Addr,
}

/// The pod routes `vm` needs in a cluster of `size`: a node to every other node's
/// pods, a router to every node's pods, nothing for testers.
pub fn pod_routes(vm: VmId, size: &ClusterSize) -> Vec<PodRoute> {
    if !matches!(vm.role(), Role::Node | Role::Router) {
        return Vec::new();
    }
    size.members()
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n.role() == Role::Node && *n != vm)
        .filter_map(|node| {
            Some(PodRoute {
                node,
                net4: pod_net4(node)?,
                net6: pod_net6(node),
                via4: net::ipv4(Net::Cluster, node)?,
                via6: net::ipv6(Net::Cluster, node),
            })
        })
        .collect()
}

/// Where a router sends the service ranges ([`SERVICE_RANGE4`], [`SERVICE_RANGE6`]):
/// every node's cluster addresses, at equal cost (any node's kube-proxy forwards
/// to the Service's pods), so that testers reach ClusterIPs as the nodes do.
/// Empty for nodes and testers.
pub fn service_gateways(vm: VmId, size: &ClusterSize) -> (Vec<Ipv4Addr>, Vec<Ipv6Addr>) {
    if vm.role() != Role::Router {
        return (Vec::new(), Vec::new());
    }
    // A router's pod routes go to every node, through the addresses wanted here.
    pod_routes(vm, size)
        .iter()
        .map(|r| (r.via4, r.via6))
        .unzip()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_route_to_the_others_routers_to_all() {
        let size = ClusterSize {
            nodes: 3,
            routers: 1,
            testers: 1,
        };
        let r = pod_routes(VmId::new(2).unwrap(), &size);
        let nodes: Vec<u16> = r.iter().map(|p| p.node.number()).collect();
        assert_eq!(nodes, [1, 3]);
        assert_eq!(r[1].net4.to_string(), "10.244.3.0");
        assert_eq!(r[1].via4.to_string(), "192.168.1.3");
        assert_eq!(r[1].via6.to_string(), "fd00:6b69:0:1::3");
        assert_eq!(pod_routes(VmId::new(201).unwrap(), &size).len(), 3);
        assert_eq!(net::vm_from_mac(API_FORWARD_MAC), None);
        assert!(pod_routes(VmId::new(221).unwrap(), &size).is_empty());
    }

    #[test]
    fn routers_send_services_to_every_node() {
        let size = ClusterSize {
            nodes: 3,
            routers: 2,
            testers: 1,
        };
        let (v4, v6) = service_gateways(VmId::new(202).unwrap(), &size);
        let v4: Vec<String> = v4.iter().map(|a| a.to_string()).collect();
        assert_eq!(v4, ["192.168.1.1", "192.168.1.2", "192.168.1.3"]);
        assert_eq!(v6.len(), 3);
        assert_eq!(v6[2].to_string(), "fd00:6b69:0:1::3");
        for vm in [1, 221] {
            let (v4, v6) = service_gateways(VmId::new(vm).unwrap(), &size);
            assert!(v4.is_empty() && v6.is_empty(), "vm {vm}");
        }
    }

    #[test]
    fn ranges_match_the_table() {
        let vm2 = VmId::new(2).unwrap();
        assert_eq!(pod_net4(vm2).unwrap().to_string(), "10.244.2.0");
        assert_eq!(
            pod_net6(VmId::new(12).unwrap()).to_string(),
            "fd00:10:244:12::"
        );
        assert_eq!(first_service_ip4().to_string(), "10.96.0.1");
        assert_eq!(first_service_ip6().to_string(), "fd00:10:96::1");
        assert_eq!(SERVICE_RANGE6.0.to_string(), "fd00:10:96::");
        assert_eq!(pki_path(ADMIN_KEY), "/etc/kubernetes/pki/admin.key");
        assert_eq!(
            kubeconfig_path("kubelet-vm-002"),
            "/etc/kubernetes/kubelet-vm-002.kubeconfig"
        );
    }
}
