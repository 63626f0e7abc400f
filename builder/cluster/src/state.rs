//! A cluster's state on the host: its directory under the runtime root, the lock
//! that keeps two launchers apart, and `cluster.json` (what was started, and how).

use crate::accel::Accel;
use crate::error::ClusterError;
use crate::network::NetBackend;
use crate::qemu::VmPaths;
use kimg_contract::manifest::Manifest;
use kimg_contract::net::ClusterSize;
use kimg_contract::VmId;
use kimg_util::fs::{IoError, PathContext};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The directory all clusters live in.
pub fn runtime_root() -> PathBuf {
    if let Some(d) = std::env::var_os("KIMG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("kimg");
    }
    PathBuf::from(format!("/tmp/kimg-{}", nix::unistd::getuid()))
}

/// The directory of cluster `name`.
pub fn cluster_dir(name: &str) -> Result<PathBuf, ClusterError> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok {
        return Err(ClusterError::BadName(name.to_string()));
    }
    Ok(runtime_root().join(name))
}

/// What `cluster.json` records about a running cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterState {
    /// Cluster name.
    pub name: String,
    /// Base image (never written).
    pub image: PathBuf,
    /// Accelerator the VMs run with.
    pub accel: Accel,
    /// Unix time the cluster was started.
    pub started: u64,
    /// The VMs.
    pub vms: Vec<VmRecord>,
    /// Size the VMs were told (kimg.nodes/routers/testers) for their /etc/hosts.
    #[serde(default)]
    pub size: ClusterSize,
    /// How the VMs are connected.
    #[serde(default)]
    pub net: NetBackend,
    /// VMs boot through OVMF and the image's ESP instead of direct kernel boot.
    #[serde(default)]
    pub uefi: bool,
    /// The overlay cdrom every VM gets (`--cdrom`, or made from the overlays).
    #[serde(default)]
    pub cdrom: Option<PathBuf>,
    /// Host port on 127.0.0.1 forwarded to vm-001's apiserver (k8s images).
    #[serde(default)]
    pub api_port: Option<u16>,
    /// Extra kernel command line of every VM (`--append`).
    #[serde(default)]
    pub append: String,
    /// The overlays the cluster's cdrom was made of, and where they were found
    /// (a Kubernetes cluster's cdrom is made again for VMs added later).
    #[serde(default)]
    pub overlays: Vec<String>,
    /// Extra overlay search directories of `overlays`.
    #[serde(default)]
    pub ovlpath: Vec<PathBuf>,
    /// The snapshot the cluster was restored from (`kimg run --from`, `kimg resume`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<String>,
}

/// One VM of a cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRecord {
    /// Its id (hostname).
    pub vm: VmId,
    /// Memory in MiB.
    pub mem_mb: u32,
    /// Virtual CPUs.
    pub cpus: u32,
}

const STATE_FILE: &str = "cluster.json";

/// The VM ids a cluster of this size has, in order.
pub fn vm_ids(size: &ClusterSize) -> Result<Vec<VmId>, String> {
    let ids = size.members()?;
    if ids.is_empty() {
        return Err("a cluster needs at least one VM".into());
    }
    Ok(ids)
}

/// The manifest beside an image (`hd.img` -> `hd.json`).
pub fn read_manifest(image: &Path) -> Result<Manifest, ClusterError> {
    let path = image.with_extension("json");
    let text = fs::read_to_string(&path).map_err(|e| ClusterError::Image {
        path: image.to_path_buf(),
        why: format!(
            "cannot read its manifest {}: {e} (images come from `kimg build`)",
            path.display()
        ),
    })?;
    serde_json::from_str(&text).map_err(|e| ClusterError::Image {
        path: image.to_path_buf(),
        why: format!("manifest {} is not a kimg manifest: {e}", path.display()),
    })
}

/// Takes the cluster's lock; held until the returned value drops.
pub(crate) fn lock(name: &str) -> Result<Flock<fs::File>, ClusterError> {
    let root = runtime_root();
    fs::create_dir_all(&root).with_path(&root)?;
    let path = root.join(format!("{name}.lock"));
    let file = fs::File::create(&path).with_path(&path)?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock)
        .map_err(|_| ClusterError::Locked(name.to_string(), path))
}

/// Writes `cluster.json` whole (a reader never sees half of it).
pub(crate) fn save(dir: &Path, state: &ClusterState) -> Result<(), ClusterError> {
    let json = serde_json::to_string_pretty(state).unwrap_or_default();
    Ok(kimg_util::fs::write_atomic(&dir.join(STATE_FILE), json)?)
}

/// Reads a cluster's state file.
pub fn load(name: &str) -> Result<(PathBuf, ClusterState), ClusterError> {
    let dir = cluster_dir(name)?;
    let path = dir.join(STATE_FILE);
    let text = fs::read_to_string(&path).map_err(|_| ClusterError::NotFound(name.to_string()))?;
    let state = serde_json::from_str(&text)
        .map_err(|e| IoError::new(path.clone(), io::Error::new(io::ErrorKind::InvalidData, e)))?;
    Ok((dir, state))
}

/// The files of `vm` in cluster `name`, if it is a member.
pub fn vm_paths(name: &str, vm: VmId) -> Result<VmPaths, ClusterError> {
    let (dir, state) = load(name)?;
    if !state.vms.iter().any(|r| r.vm == vm) {
        return Err(ClusterError::NoSuchVm {
            name: name.to_string(),
            vm,
        });
    }
    Ok(VmPaths::new(&dir, vm))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_role_table() {
        let size = |nodes, routers, testers| ClusterSize {
            nodes,
            routers,
            testers,
        };
        let ids = vm_ids(&size(2, 1, 1)).unwrap();
        let names: Vec<_> = ids.iter().map(|v| v.hostname()).collect();
        assert_eq!(names, ["vm-001", "vm-002", "vm-201", "vm-221"]);
        assert!(vm_ids(&size(0, 0, 0)).is_err());
        assert!(vm_ids(&size(201, 0, 0)).is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(cluster_dir("ok-name_1").is_ok());
        for bad in ["", "a/b", "..", "x y", &"a".repeat(33)] {
            assert!(
                matches!(cluster_dir(bad), Err(ClusterError::BadName(_))),
                "{bad}"
            );
        }
    }
}
