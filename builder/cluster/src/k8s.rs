//! The Kubernetes flavour's add-on: the cluster's PKI, each VM's share of it first on
//! its own cdrom (and kubelet credentials for nodes added later), and vm-001's extra
//! NIC that forwards a host port on 127.0.0.1 to the apiserver.

use crate::addon::{Addon, VmSize, BASE_SIZE};
use crate::error::ClusterError;
use crate::pki;
use crate::state::ClusterState;
use kimg_contract::k8s::{self, APISERVER_PORT};
use kimg_contract::{Role, VmId};
use kimg_image::overlay::Overlay;
use kimg_util::fs::PathContext;
use std::io;
use std::path::Path;

/// The Kubernetes add-on.
pub struct K8s;

impl Addon for K8s {
    /// The control plane on vm-001 is the critical path of a cold start and runs
    /// half a dozen Go programs: two vCPUs there took one node from `kimg run` to
    /// Ready in 95 s instead of 134 s under TCG on an idle 2-core host. Nodes run
    /// kubelet, containerd and pods; routers and testers need nothing more.
    fn default_size(&self, vm: VmId) -> VmSize {
        match (vm.role(), vm.number()) {
            (Role::Node, 1) => VmSize {
                mem_mb: 2048,
                cpus: 2,
            },
            (Role::Node, _) => VmSize {
                mem_mb: 1536,
                cpus: 1,
            },
            _ => BASE_SIZE,
        }
    }

    fn takes_ready_cdrom(&self) -> bool {
        false
    }

    fn prepare(&self, state: &mut ClusterState) -> Result<(), ClusterError> {
        let port = free_port().with_path("127.0.0.1:0")?;
        state.api_port = Some(port);
        Ok(())
    }

    fn generate(&self, dir: &Path, state: &ClusterState) -> Result<(), ClusterError> {
        Ok(pki::generate(dir, &state.size, state.api_port)?)
    }

    fn add_vms(&self, dir: &Path, added: &[VmId]) -> Result<(), ClusterError> {
        let nodes: Vec<VmId> = added
            .iter()
            .copied()
            .filter(|vm| vm.role() == Role::Node)
            .collect();
        Ok(pki::add_nodes(dir, &nodes)?)
    }

    fn first_overlay(&self, dir: &Path, vm: VmId) -> Result<Option<Overlay>, ClusterError> {
        Ok(pki::vm_overlay(dir, vm)?)
    }

    fn own_cdrom(&self, vm: VmId) -> bool {
        !pki::files_for(vm).is_empty()
    }

    fn qemu_args(&self, vm: VmId, state: &ClusterState) -> Vec<String> {
        match state.api_port {
            Some(port) if vm.number() == 1 => api_forward_args(port),
            _ => Vec::new(),
        }
    }
}

/// The admin kubeconfig of the cluster in `dir` (its server is the host's forward
/// to vm-001's apiserver), if the cluster is a Kubernetes one.
pub fn admin_kubeconfig(dir: &Path) -> Option<std::path::PathBuf> {
    Some(dir.join(pki::ADMIN_KUBECONFIG)).filter(|p| p.is_file())
}

/// A free TCP port on 127.0.0.1 for the apiserver forward (the kernel picks it).
pub fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// QEMU arguments of vm-001's extra NIC: user-mode networking with no route out
/// (`restrict=on`) whose only use is `127.0.0.1:port` on the host forwarded to the
/// apiserver's port on the NIC's fixed guest address.
pub fn api_forward_args(port: u16) -> Vec<String> {
    vec![
        "-netdev".into(),
        format!(
            "user,id=api,restrict=on,hostfwd=tcp:127.0.0.1:{port}-{}:{APISERVER_PORT}",
            k8s::API_FORWARD_ADDR4
        ),
        "-device".into(),
        format!("virtio-net-pci,netdev=api,mac={}", k8s::API_FORWARD_MAC),
    ]
}
