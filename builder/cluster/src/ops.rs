//! Operations on a running cluster: exec, stop, scale out and in.

use crate::addon;
use crate::agent;
use crate::bootfiles::boot_files;
use crate::error::ClusterError;
use crate::health::wait_ready;
use crate::launch::{make_cdrom, start_vms, RunEvent};
use crate::network;
use crate::process::qemu_pid;
use crate::qemu::VmPaths;
use crate::state::{cluster_dir, load, lock, read_manifest, save, ClusterState, VmRecord};
use kimg_contract::agent::{ExecResult, Op, Reply};
use kimg_contract::{Role, VmId};
use kimg_util::fs::PathContext;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

/// Runs `argv` in a VM through its agent.
pub fn exec(
    name: &str,
    vm: VmId,
    argv: Vec<String>,
    timeout: Option<Duration>,
) -> Result<ExecResult, ClusterError> {
    let (dir, state) = load(name)?;
    if !state.vms.iter().any(|r| r.vm == vm) {
        return Err(ClusterError::NoSuchVm {
            name: name.to_string(),
            vm,
        });
    }
    let paths = VmPaths::new(&dir, vm);
    if qemu_pid(&paths).is_none() {
        return Err(ClusterError::Dead(vm));
    }
    let op = Op::Exec {
        argv,
        timeout_secs: timeout.map(|t| t.as_secs()),
    };
    // The agent enforces the command's own timeout; allow it a margin to answer.
    let wait = timeout.map_or(Duration::from_secs(24 * 3600), |t| {
        t + Duration::from_secs(10)
    });
    match agent::request(&paths.agent(), op, wait) {
        Ok(Reply::Exec(r)) => Ok(r),
        Ok(Reply::Error { message }) => Err(ClusterError::Refused { vm, message }),
        Ok(other) => Err(ClusterError::Refused {
            vm,
            message: format!("unexpected answer {other:?}"),
        }),
        Err(source) => Err(ClusterError::Agent { vm, source }),
    }
}

/// What `stop` did per VM.
#[derive(Debug, Clone, Serialize)]
pub struct StopReport {
    /// VMs that powered off through their agent.
    pub graceful: Vec<VmId>,
    /// VMs whose QEMU had to be killed.
    pub killed: Vec<VmId>,
}

/// Stops a cluster: agent poweroff, then SIGKILL after `grace`; removes its directory.
pub fn stop(name: &str, grace: Duration) -> Result<StopReport, ClusterError> {
    let dir = cluster_dir(name)?;
    if !dir.exists() {
        return Err(ClusterError::NotFound(name.to_string()));
    }
    let _lock = lock(name)?;
    stop_locked(name, &dir, grace)
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
    let report = stop_vms(dir, &vms, grace);
    network::destroy(name, dir)?;
    fs::remove_dir_all(dir).with_path(dir)?;
    Ok(report)
}

/// Powers `vms` off through their agents, kills what still runs after `grace`.
fn stop_vms(dir: &Path, vms: &[VmId], grace: Duration) -> StopReport {
    let mut report = StopReport {
        graceful: Vec::new(),
        killed: Vec::new(),
    };
    let running: Vec<(VmId, Pid)> = vms
        .iter()
        .filter_map(|&vm| Some((vm, qemu_pid(&VmPaths::new(dir, vm))?)))
        .collect();
    std::thread::scope(|s| {
        for (vm, _) in &running {
            let sock = VmPaths::new(dir, *vm).agent();
            s.spawn(move || agent::request(&sock, Op::Poweroff, Duration::from_secs(2)));
        }
    });
    let deadline = Instant::now() + grace;
    for (vm, pid) in running {
        let paths = VmPaths::new(dir, vm);
        while qemu_pid(&paths).is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if qemu_pid(&paths).is_some() {
            let _ = kill(pid, Signal::SIGKILL);
            while qemu_pid(&paths).is_some() {
                std::thread::sleep(Duration::from_millis(20));
            }
            report.killed.push(vm);
        } else {
            report.graceful.push(vm);
        }
    }
    report
}

/// Adds VMs to a running cluster, like the others (memory and cpus of the first
/// VM); with `wait`, until they report ready. The size the new VMs are told grows to
/// include them; VMs already running keep their /etc/hosts.
pub fn scaleout(
    name: &str,
    vms: &[VmId],
    wait: Option<Duration>,
    on_event: &(dyn Fn(RunEvent) + Sync),
) -> Result<ClusterState, ClusterError> {
    let _lock = lock(name)?;
    let (dir, mut state) = load(name)?;
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
        let like = state.vms.first();
        added.push(VmRecord {
            vm,
            mem_mb: like.map_or(384, |r| r.mem_mb),
            cpus: like.map_or(1, |r| r.cpus),
        });
        state.size = state.size.including(vm);
    }
    let manifest = read_manifest(&state.image)?;
    let files = boot_files(&state.image, &manifest, &dir)?;
    let ids: Vec<VmId> = added.iter().map(|r| r.vm).collect();
    if let (Some(vm), Some(first)) = (
        ids.first(),
        addon::of(manifest.flavour).scaleout_overlay(&dir, &ids)?,
    ) {
        // The added VMs get a cdrom of their own: the add-on's overlay, then the
        // cluster's overlays resolved again.
        let out = dir.join(format!("cdrom-{:03}.iso", vm.number()));
        make_cdrom(&out, Some(first), &state.overlays, &state.ovlpath)?;
        state.cdrom = Some(out);
    }
    let old_umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let result = start_vms(&dir, &state, &added, &files, &manifest, on_event);
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
    if let Some(limit) = wait {
        let only = ClusterState {
            vms: started,
            ..state.clone()
        };
        wait_ready(&dir, &only, limit, on_event)?;
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
