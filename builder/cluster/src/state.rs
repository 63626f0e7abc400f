//! A cluster's state on the host: its directory under the runtime root, the lock
//! that keeps two launchers apart, and `cluster.json` (what was started, and how).

use crate::accel::Accel;
use crate::error::ClusterError;
use crate::network::NetBackend;
use crate::qemu::{Machine, VmPaths};
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

/// Checks that `root` is a directory of ours that nobody else may write to (like
/// ssh-agent's and systemd's runtime dirs): owned by our uid, no group/other write
/// bit, not a symlink. With `create`, a missing one is made 0700 first.
pub fn check_root(root: &Path, create: bool) -> Result<(), ClusterError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let unsafe_dir = |why: String| ClusterError::UnsafeRuntimeDir {
        path: root.to_path_buf(),
        why,
    };
    let md = match fs::symlink_metadata(root) {
        Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
            if let Some(parent) = root.parent() {
                fs::create_dir_all(parent).with_path(parent)?;
            }
            match fs::DirBuilder::new().mode(0o700).create(root) {
                // Someone made it in between: judged below like any other.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                r => r.with_path(root)?,
            }
            fs::symlink_metadata(root).with_path(root)?
        }
        // Nothing there yet: nothing to trust or distrust.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        r => r.with_path(root)?,
    };
    if md.file_type().is_symlink() {
        return Err(unsafe_dir("is a symlink".into()));
    }
    if !md.is_dir() {
        return Err(unsafe_dir("is not a directory".into()));
    }
    let me = nix::unistd::geteuid().as_raw();
    if md.uid() != me {
        return Err(unsafe_dir(format!(
            "owned by uid {}, not by us (uid {me})",
            md.uid()
        )));
    }
    if md.mode() & 0o022 != 0 {
        return Err(unsafe_dir(format!(
            "mode {:o} lets others write to it",
            md.mode() & 0o7777
        )));
    }
    Ok(())
}

/// The directory of cluster `name` (the runtime root checked, see [`check_root`]).
pub fn cluster_dir(name: &str) -> Result<PathBuf, ClusterError> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok {
        return Err(ClusterError::BadName(name.to_string()));
    }
    let root = runtime_root();
    check_root(&root, false)?;
    Ok(root.join(name))
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
    /// The QEMU machine of every VM (q35 when unrecorded: clusters and snapshots
    /// from before microvm).
    #[serde(default)]
    pub machine: Machine,
    /// The cluster's shared overlay cdrom (`--cdrom`, or made from the overlays), for
    /// the VMs without one of their own (`vm-NNN/cdrom.iso`, see `launch::make_cdroms`).
    #[serde(default)]
    pub cdrom: Option<PathBuf>,
    /// Host port on 127.0.0.1 forwarded to vm-001's apiserver (k8s images).
    #[serde(default)]
    pub api_port: Option<u16>,
    /// Extra kernel command line of every VM (`--append`).
    #[serde(default)]
    pub append: String,
    /// The overlays the cluster's cdrom was made of, and where they were found
    /// (VMs added later that get a cdrom of their own carry them too).
    #[serde(default)]
    pub overlays: Vec<String>,
    /// Extra overlay search directories of `overlays`.
    #[serde(default)]
    pub ovlpath: Vec<PathBuf>,
    /// The snapshot the cluster was restored from (`kimg run --from`, `kimg resume`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<String>,
    /// What `kimg apply` put onto running VMs, oldest first (kept across snapshots:
    /// the VMs' disks and memory carry the overlays).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applied: Vec<AppliedOverlays>,
}

/// Overlays one `kimg apply` put onto one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedOverlays {
    /// The VM.
    pub vm: VmId,
    /// Unix time of the apply.
    pub at: u64,
    /// The overlays as named on the apply's cdrom (`NN-NAME.tar[.zst]`), in order.
    pub overlays: Vec<String>,
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
    lock_in(&runtime_root(), name)
}

/// [`lock`] under `root`: the root made or checked first ([`check_root`]); the lock
/// file opened without following a symlink and without truncating anything.
fn lock_in(root: &Path, name: &str) -> Result<Flock<fs::File>, ClusterError> {
    use std::os::unix::fs::OpenOptionsExt;
    check_root(root, true)?;
    let path = root.join(format!("{name}.lock"));
    let file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(&path)
        .with_path(&path)?;
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
    let text = kimg_util::fs::read_to_string_nofollow(&path)
        .map_err(|_| ClusterError::NotFound(name.to_string()))?;
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

    /// A lock file planted as a symlink by someone who could write to the runtime
    /// dir is refused, and its target is left as it was (it used to be truncated).
    #[test]
    fn a_planted_symlink_lock_is_refused_and_its_target_untouched() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("rt");
        let target = t.path().join("precious");
        fs::write(&target, "keep me").unwrap();
        check_root(&root, true).unwrap();
        std::os::unix::fs::symlink(&target, root.join("c.lock")).unwrap();
        let e = lock_in(&root, "c").unwrap_err();
        assert!(e.to_string().contains("c.lock"), "{e}");
        assert_eq!(fs::read_to_string(&target).unwrap(), "keep me");
        // A regular lock file is opened without truncation.
        fs::write(root.join("d.lock"), "x").unwrap();
        let _l = lock_in(&root, "d").unwrap();
        assert_eq!(fs::read_to_string(root.join("d.lock")).unwrap(), "x");
    }

    #[test]
    fn a_runtime_dir_made_0700_and_others_refused() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("kimg-0");
        check_root(&root, true).unwrap();
        let mode = fs::metadata(&root).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        // World-writable: refused.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_root(&root, true).unwrap_err().to_string();
        assert!(e.contains("others write"), "{e}");
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).unwrap();
        // A symlink to a good directory: refused.
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&root, &link).unwrap();
        assert!(check_root(&link, true).is_err());
        // Owned by another uid (the tests run as root, who may chown): refused.
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::chown(&root, Some(12345), Some(12345)).unwrap();
            let e = check_root(&root, true).unwrap_err().to_string();
            assert!(e.contains("owned by uid 12345"), "{e}");
            assert!(lock_in(&root, "c").is_err());
            assert!(!root.join("c.lock").exists());
        }
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
