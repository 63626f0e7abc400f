//! The errors of cluster operations, each naming the cluster, VM, path or command.

use crate::agent::AgentError;
use crate::network::NetworkError;
use kimg_contract::VmId;
use kimg_util::cmd::CmdError;
use kimg_util::fs::IoError;
use std::path::PathBuf;

/// Errors of cluster operations.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The cluster name has characters that do not belong in a path.
    #[error("cluster name {0:?}: use letters, digits, '-' and '_' (at most 32)")]
    BadName(String),
    /// The runtime directory is not safely ours (another user made it, others may
    /// write to it, or it is a symlink).
    #[error("runtime directory {}: {why}; remove it (or set KIMG_RUNTIME_DIR to a directory of yours)", path.display())]
    UnsafeRuntimeDir {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// No cluster of that name is running.
    #[error("no cluster named {0:?} (start one with `kimg run --name {0}`)")]
    NotFound(String),
    /// Another kimg holds the cluster's lock.
    #[error("cluster {0:?} is busy: another kimg is starting, stopping, saving or applying to it (lock {1}); try again when it is done")]
    Locked(String, PathBuf),
    /// The image or its manifest is missing or unreadable.
    #[error("image {path}: {why}")]
    Image {
        /// Image path.
        path: PathBuf,
        /// What is wrong and what to do.
        why: String,
    },
    /// The VM is not part of the cluster.
    #[error("{vm} is not part of cluster {name:?} (see `kimg status --name {name}`)")]
    NoSuchVm {
        /// Cluster.
        name: String,
        /// VM asked for.
        vm: VmId,
    },
    /// The overlay cdrom could not be made.
    #[error("overlay cdrom: {0}")]
    Cdrom(#[from] kimg_image::overlay::OverlayError),
    /// The host's available memory cannot hold the VMs.
    #[error("{vms} VMs need about {need_mib} MiB of host memory (per VM once idle: guest RAM up to {} MiB + {} MiB of QEMU; up to {} MiB of guest RAM for each of the {window} booting at once), but MemAvailable is {available_mib} MiB: start fewer VMs, give them less --mem, or stop other clusters (`kimg ls`)", crate::capacity::GUEST_IDLE_MIB, crate::capacity::QEMU_OWN_MIB, crate::capacity::GUEST_BOOT_MIB)]
    HostMemory {
        /// VMs asked for.
        vms: usize,
        /// VMs booting at once.
        window: usize,
        /// Their estimated need.
        need_mib: u64,
        /// The host's MemAvailable.
        available_mib: u64,
    },
    /// The options ask for something this cluster cannot do.
    #[error("{0}")]
    Usage(String),
    /// A thread of kimg itself panicked (a bug in kimg: please report it).
    #[error("internal error: {0} panicked")]
    Panicked(&'static str),
    /// The per-cluster Kubernetes PKI could not be generated.
    #[error("Kubernetes PKI: {0}")]
    Pki(#[from] crate::pki::PkiError),
    /// A VM's QEMU is not running.
    #[error("{0} is not running (its QEMU is gone); see its console log")]
    Dead(VmId),
    /// KVM was asked for and does not work.
    #[error("{0}")]
    Accel(String),
    /// VMs did not report ready in time.
    #[error("{}", format_not_ready(.0))]
    NotReady(Vec<(VmId, String, Vec<String>)>),
    /// A Kubernetes control plane was not ready in time, or cannot be checked: what,
    /// where, and what to look at.
    #[error("{0}")]
    ControlPlane(String),
    /// Talking to an agent failed.
    #[error("{vm}: {source}")]
    Agent {
        /// VM.
        vm: VmId,
        /// Why.
        source: AgentError,
    },
    /// A session (exec, shell, copy) failed.
    #[error("{vm}: {source}")]
    Session {
        /// VM.
        vm: VmId,
        /// Why.
        source: crate::session::SessionError,
    },
    /// The agent answered with an error.
    #[error("{vm}: the agent refused: {message}")]
    Refused {
        /// VM.
        vm: VmId,
        /// Its message.
        message: String,
    },
    /// An external program failed.
    #[error(transparent)]
    Cmd(#[from] CmdError),
    /// Reading the image's ESP failed.
    #[error(transparent)]
    Disk(#[from] kimg_formats::disk::DiskError),
    /// Creating or removing the cluster's networks failed.
    #[error(transparent)]
    Network(#[from] NetworkError),
    /// Talking to a VM's QEMU monitor failed.
    #[error("{vm}: {source}")]
    Qmp {
        /// VM.
        vm: VmId,
        /// Why.
        source: crate::qmp::QmpError,
    },
    /// A snapshot is missing, damaged, or does not fit this host.
    #[error("snapshot {path}: {why}")]
    Snapshot {
        /// The snapshot's directory or the file at fault.
        path: PathBuf,
        /// What is wrong and what to do.
        why: String,
    },
    /// A file in the cluster directory could not be handled.
    #[error(transparent)]
    Io(#[from] IoError),
}

fn format_not_ready(vms: &[(VmId, String, Vec<String>)]) -> String {
    let mut s = String::from("VMs not ready:");
    for (vm, why, lines) in vms {
        s.push_str(&format!("\n  {vm}: {why}; last console lines:"));
        for l in lines {
            s.push_str(&format!("\n    | {l}"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_ready_error_lists_vms_and_console_lines() {
        let vm: VmId = "vm-002".parse().unwrap();
        let e = ClusterError::NotReady(vec![(
            vm,
            "QEMU exited".into(),
            vec!["Kernel panic".into()],
        )]);
        let msg = e.to_string();
        assert!(
            msg.contains("vm-002: QEMU exited") && msg.contains("| Kernel panic"),
            "{msg}"
        );
    }
}
