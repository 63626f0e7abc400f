//! Operations on a running cluster: stop, scale out and in (exec and copies are
//! sessions: [`crate::session`]).

use crate::addon;
use crate::agent;
use crate::bootfiles::boot_files;
use crate::capacity::{self, par_map, CALL_THREADS};
use crate::error::ClusterError;
use crate::health::{wait_for, Wait};
use crate::ksm;
use crate::launch::{boot_limit, make_cdroms, start_vms, RunEvent};
use crate::network;
use crate::process::{self, qemu_pid, KILL_WAIT};
use crate::qemu::VmPaths;
use crate::state::{cluster_dir, load, lock, read_manifest, save, ClusterState, VmRecord};
use kimg_contract::agent::Op;
use kimg_contract::{Role, VmId};
use kimg_util::fs::PathContext;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What `stop` did per VM.
#[derive(Debug, Clone, Serialize)]
pub struct StopReport {
    /// VMs that powered off through their agent.
    pub graceful: Vec<VmId>,
    /// VMs whose QEMU had to be killed.
    pub killed: Vec<VmId>,
    /// Processes still there [`KILL_WAIT`] after SIGKILL (stuck in the kernel):
    /// given up on rather than waited for forever.
    #[serde(default)]
    pub stuck: Vec<String>,
}

/// Stops a cluster: agent poweroff, then SIGKILL after `grace`; removes its directory.
/// Returns within about `grace` + 2 s (the agents) + [`KILL_WAIT`] per stuck process
/// group, whatever the processes do.
pub fn stop(name: &str, grace: Duration) -> Result<StopReport, ClusterError> {
    let dir = existing_dir(name)?;
    let _lock = lock(name)?;
    stop_locked(name, &dir, grace)
}

/// [`stop`] without taking the cluster's lock, for the one process that may already
/// hold it: an interrupted `kimg bench`, whose own launch holds it while its clusters
/// live in a runtime root no other kimg uses. Anyone else uses [`stop`].
pub fn stop_holding_lock(name: &str, grace: Duration) -> Result<StopReport, ClusterError> {
    stop_locked(name, &existing_dir(name)?, grace)
}

/// The directory of cluster `name`, which must exist (checked before its lock is
/// taken, so that stopping a cluster that is not there leaves no lock file).
fn existing_dir(name: &str) -> Result<PathBuf, ClusterError> {
    let dir = cluster_dir(name)?;
    if !dir.exists() {
        return Err(ClusterError::NotFound(name.to_string()));
    }
    Ok(dir)
}

pub(crate) fn stop_locked(
    name: &str,
    dir: &Path,
    grace: Duration,
) -> Result<StopReport, ClusterError> {
    let vms: Vec<VmId> = match load(name) {
        Ok((_, state)) => state.vms.iter().map(|r| r.vm).collect(),
        // A directory without a state file (a failed start): look at what is there.
        Err(_) => fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default(),
    };
    let mut report = stop_vms(dir, &vms, grace);
    report.stuck.extend(network::destroy(name, dir)?);
    fs::remove_dir_all(dir).with_path(dir)?;
    ksm::off_when_unused();
    Ok(report)
}

/// Powers `vms` off through their agents, kills what still runs after `grace`.
fn stop_vms(dir: &Path, vms: &[VmId], grace: Duration) -> StopReport {
    let mut report = StopReport {
        graceful: Vec::new(),
        killed: Vec::new(),
        stuck: Vec::new(),
    };
    let running: Vec<(VmId, Pid)> = vms
        .iter()
        .filter_map(|&vm| Some((vm, qemu_pid(&VmPaths::new(dir, vm))?)))
        .collect();
    par_map(&running, CALL_THREADS, |(vm, _)| {
        agent::request(
            &VmPaths::new(dir, *vm).agent(),
            Op::Poweroff,
            Duration::from_secs(2),
        )
    });
    let deadline = process::deadline(grace);
    let mut to_kill = Vec::new();
    for (vm, pid) in running {
        let paths = VmPaths::new(dir, vm);
        if process::wait_gone(|| qemu_pid(&paths).is_some(), deadline) {
            report.graceful.push(vm);
        } else {
            let _ = kill(pid, Signal::SIGKILL);
            to_kill.push((vm, pid));
        }
    }
    // One shared wait after the kills: stuck QEMUs cost KILL_WAIT once, not each.
    let after_kill = process::deadline(KILL_WAIT);
    for (vm, pid) in to_kill {
        let paths = VmPaths::new(dir, vm);
        if process::wait_gone(|| qemu_pid(&paths).is_some(), after_kill) {
            report.killed.push(vm);
        } else {
            report.stuck.push(format!("{vm} QEMU (pid {pid})"));
        }
    }
    report
}

/// Adds VMs to a running cluster, each sized like the last running VM of its role
/// with the same default size (so a Kubernetes node is never sized like the control
/// plane), else the flavour's default; with `wait`, until they report ready (and,
/// unless it waits for the VMs alone, the flavour's readiness as for `kimg run`).
/// The size the new VMs are told grows to include them; VMs already running keep
/// their /etc/hosts.
pub fn scaleout(
    name: &str,
    vms: &[VmId],
    wait: Option<Wait>,
    on_event: &(dyn Fn(RunEvent) + Sync),
) -> Result<ClusterState, ClusterError> {
    let _lock = lock(name)?;
    let (dir, mut state) = load(name)?;
    let manifest = read_manifest(&state.image)?;
    let addon = addon::of(manifest.flavour);
    let mut added = Vec::new();
    for &vm in vms {
        if vm.role() == Role::Reserved || vm.number() > 255 {
            return Err(ClusterError::Image {
                path: state.image.clone(),
                why: format!("{vm} has no role in the role table (nodes vm-001.., routers vm-201.., testers vm-221..)"),
            });
        }
        if state.vms.iter().any(|r| r.vm == vm) || added.iter().any(|r: &VmRecord| r.vm == vm) {
            continue;
        }
        let default = addon.default_size(vm);
        let like = state
            .vms
            .iter()
            .rev()
            .find(|r| r.vm.role() == vm.role() && addon.default_size(r.vm) == default);
        added.push(VmRecord {
            vm,
            mem_mb: like.map_or(default.mem_mb, |r| r.mem_mb),
            cpus: like.map_or(default.cpus, |r| r.cpus),
        });
        state.size = state.size.including(vm);
    }
    capacity::check_memory(&added)?;
    if let Some(ksm) = ksm::share_pages_of(state.vms.len() + added.len()) {
        on_event(RunEvent::Ksm(ksm));
    }
    let files = boot_files(&state.image, &manifest, &dir)?;
    let ids: Vec<VmId> = added.iter().map(|r| r.vm).collect();
    // The add-on's material for the new VMs (a node's kubelet credentials), then
    // their cdroms: their own when they get files of their own, else the cluster's.
    addon.add_vms(&dir, &ids)?;
    make_cdroms(&dir, &mut state, addon, &ids, false)?;
    let old_umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let limit = boot_limit(wait);
    let result = start_vms(&dir, &state, &added, &files, &manifest, limit, on_event);
    nix::sys::stat::umask(old_umask);
    // Whatever started is part of the cluster now (so that stop finds it).
    let started: Vec<VmRecord> = added
        .into_iter()
        .filter(|r| qemu_pid(&VmPaths::new(&dir, r.vm)).is_some())
        .collect();
    state.vms.extend(started.iter().cloned());
    state.vms.sort_by_key(|r| r.vm);
    save(&dir, &state)?;
    result?;
    if let Some(wait) = wait {
        let only = ClusterState {
            vms: started,
            ..state.clone()
        };
        wait_for(&dir, &only, wait, on_event)?;
    }
    Ok(state)
}

/// Removes VMs from a running cluster: agent poweroff, then SIGKILL after `grace`;
/// their files (and taps) go too.
pub fn scalein(name: &str, vms: &[VmId], grace: Duration) -> Result<StopReport, ClusterError> {
    let _lock = lock(name)?;
    let (dir, mut state) = load(name)?;
    for &vm in vms {
        if !state.vms.iter().any(|r| r.vm == vm) {
            return Err(ClusterError::NoSuchVm {
                name: name.to_string(),
                vm,
            });
        }
    }
    let report = stop_vms(&dir, vms, grace);
    for &vm in vms {
        network::detach(state.net, name, vm);
        let paths = VmPaths::new(&dir, vm);
        fs::remove_dir_all(&paths.dir).with_path(&paths.dir)?;
    }
    state.vms.retain(|r| !vms.contains(&r.vm));
    save(&dir, &state)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A pid file in a VM's directory that names some other process of the user (a
    /// recycled pid, here even with a QEMU-like name) is never signalled.
    #[test]
    fn stop_does_not_kill_a_process_that_took_a_recorded_pid() {
        let dir = tempfile::tempdir().unwrap();
        let vm: VmId = "vm-001".parse().unwrap();
        let paths = VmPaths::new(dir.path(), vm);
        fs::create_dir_all(&paths.dir).unwrap();
        let fake = dir.path().join("qemu-system-x86_64");
        fs::copy("/bin/sleep", &fake).unwrap();
        let mut child = Command::new(&fake).arg("30").spawn().unwrap();
        let pid = child.id();
        fs::write(paths.pidfile(), format!("{pid}\n")).unwrap();
        // The QEMU that wrote the pid file started at another tick.
        fs::write(
            process::start_record(&paths.pidfile()),
            format!("{pid} 12345\n"),
        )
        .unwrap();
        let report = stop_vms(dir.path(), &[vm], Duration::from_millis(100));
        assert!(
            report.killed.is_empty() && report.graceful.is_empty(),
            "{report:?}"
        );
        assert!(
            crate::process::alive(pid as i32),
            "the other process was killed"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn a_huge_grace_does_not_overflow() {
        let dir = tempfile::tempdir().unwrap();
        let r = stop_vms(dir.path(), &[], Duration::MAX);
        assert!(r.graceful.is_empty());
    }
}
