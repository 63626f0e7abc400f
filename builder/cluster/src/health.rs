//! Is a VM up: its QEMU process, its console, and its agent's status; `kimg status`
//! and `--wait` (the VMs' agents, then what the flavour means by ready).

use crate::addon;
use crate::agent::{self, AgentError};
use crate::capacity::{par_map, CALL_THREADS};
use crate::error::ClusterError;
use crate::launch::RunEvent;
use crate::process::{pss_kib, qemu_pid, rss_kib};
use crate::qemu::VmPaths;
use crate::state::{load, read_manifest, ClusterState};
use kimg_contract::agent::{BootState, Op, Reply, Status};
use kimg_contract::{Role, VmId};
use serde::Serialize;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

/// The last `n` lines of a VM's console log.
pub fn console_tail(paths: &VmPaths, n: usize) -> Vec<String> {
    let text = fs::read(paths.console_log()).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

/// How long `--wait` without seconds waits for the VMs' agents (a flavour that
/// waits for more sets its own: [`addon::Addon::ready_wait`]).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(120);

/// What `--wait` waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitFor {
    /// Every VM's agent reports ready or degraded (`--wait=vms`).
    Vms,
    /// That, then what the image's flavour means by ready beyond its VMs (`--wait`):
    /// for Kubernetes, a control plane that takes a deployment.
    Ready,
}

/// `--wait`: what for, and at most how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    /// What is waited for.
    pub what: WaitFor,
    /// The bound of the whole wait; `None`: [`DEFAULT_WAIT`] for the VMs alone, the
    /// flavour's [`addon::Addon::ready_wait`] for [`WaitFor::Ready`].
    pub limit: Option<Duration>,
}

impl Wait {
    /// Every VM's agent, at most `limit`.
    pub fn vms(limit: Duration) -> Wait {
        Wait {
            what: WaitFor::Vms,
            limit: Some(limit),
        }
    }
}

/// Waits for what `wait` asks of `state`'s VMs (a cluster's, or those just added
/// to it) in `dir`, and with [`WaitFor::Ready`] for what the image's flavour adds.
pub(crate) fn wait_for(
    dir: &Path,
    state: &ClusterState,
    wait: Wait,
    on_event: &(dyn Fn(RunEvent) + Sync),
) -> Result<(), ClusterError> {
    let start = Instant::now();
    let addon = addon::of(read_manifest(&state.image)?.flavour);
    let limit = match (wait.limit, wait.what) {
        (Some(limit), _) => limit,
        (None, WaitFor::Vms) => DEFAULT_WAIT,
        (None, WaitFor::Ready) => addon.ready_wait(),
    };
    wait_vms(dir, state, start, limit, on_event)?;
    if wait.what == WaitFor::Ready {
        addon.wait_ready(&state.name, start, limit, on_event)?;
    }
    Ok(())
}

/// Waits until every VM of `state` reports ready (or degraded), until `limit`
/// after `start`.
fn wait_vms(
    dir: &Path,
    state: &ClusterState,
    start: Instant,
    limit: Duration,
    on_event: &(dyn Fn(RunEvent) + Sync),
) -> Result<(), ClusterError> {
    let deadline = crate::process::deadline_from(start, limit);
    let failures: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = state
            .vms
            .iter()
            .map(|rec| {
                s.spawn(move || {
                    let paths = VmPaths::new(dir, rec.vm);
                    match poll_ready(&paths, deadline) {
                        Ok(st) => {
                            on_event(RunEvent::Ready(rec.vm, st, start.elapsed()));
                            None
                        }
                        Err(why) => Some((rec.vm, why, console_tail(&paths, 15))),
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().unwrap_or(None))
            .collect()
    });
    if failures.is_empty() {
        Ok(())
    } else {
        Err(ClusterError::NotReady(failures))
    }
}

/// How long one status request of [`poll_ready`] is held before it is asked again (a
/// request the agent read but could not answer, say while it reopened its port, is
/// not waited for until the deadline). Asking sooner gains nothing: QEMU serves one
/// client at a time and sees a client gone only when it next reads, so a new request
/// queues behind the abandoned ones.
const HOLD: Duration = Duration::from_secs(10);

/// Asks the agent for its status until it reports ready/degraded or time runs out.
pub(crate) fn poll_ready(paths: &VmPaths, deadline: Instant) -> Result<BootState, String> {
    loop {
        if qemu_pid(paths).is_none() {
            return Err("QEMU exited".into());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("no ready report before the timeout".into());
        }
        let alive = || qemu_pid(paths).is_some();
        match agent::request_while(&paths.agent(), Op::Status, left.min(HOLD), &alive) {
            Ok(Reply::Status(st)) if st.state != BootState::Booting => return Ok(st.state),
            Err(AgentError::Timeout(_) | AgentError::Gone) => {}
            Ok(_) | Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// State of one VM as `kimg status` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct VmStatus {
    /// The VM.
    pub vm: VmId,
    /// Its role.
    pub role: Role,
    /// booting, ready, degraded or dead.
    pub state: String,
    /// What the agent reported, when it answered.
    pub agent: Option<Status>,
    /// Resident memory of the VM's QEMU in KiB (host side: guest RAM it touched, the
    /// TCG code buffer, QEMU itself), while it runs.
    pub qemu_rss_kib: Option<u64>,
    /// Its proportional memory in KiB: pages it shares with other processes (QEMU's
    /// libraries, guest pages KSM merged with other VMs') divided among them.
    pub qemu_pss_kib: Option<u64>,
    /// Last console lines of a dead VM.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub last_console: Vec<String>,
    /// Its overlays: the boot's (as its agent reports them), then what `kimg apply`
    /// put onto it (as the cluster's state records it).
    pub overlays: Vec<VmOverlay>,
}

/// One overlay of a VM, and when it came.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmOverlay {
    /// Its name on the cdrom (`NN-NAME.tar[.zst]`).
    pub name: String,
    /// `at boot`, or `applied at YYYY-MM-DD HH:MM UTC`.
    pub when: String,
    /// Unix time of the apply.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub applied_at: Option<u64>,
}

/// The overlays of `vm`: `boot` (its agent's report), then those of `applied`.
fn vm_overlays(
    vm: VmId,
    boot: &[kimg_contract::cdrom::OverlayReport],
    applied: &[crate::state::AppliedOverlays],
) -> Vec<VmOverlay> {
    let at_boot = boot.iter().map(|o| VmOverlay {
        name: o.name.clone(),
        when: "at boot".into(),
        applied_at: None,
    });
    let later = applied.iter().filter(|a| a.vm == vm).flat_map(|a| {
        a.overlays.iter().map(|name| VmOverlay {
            name: name.clone(),
            when: format!("applied at {} UTC", kimg_image::fetch::utc_date(a.at)),
            applied_at: Some(a.at),
        })
    });
    at_boot.chain(later).collect()
}

/// Queries every VM of a cluster ([`CALL_THREADS`] at a time).
pub fn status(name: &str) -> Result<(ClusterState, Vec<VmStatus>), ClusterError> {
    let (dir, state) = load(name)?;
    let list = par_map(&state.vms, CALL_THREADS, |rec| {
        let paths = VmPaths::new(&dir, rec.vm);
        let mut st = VmStatus {
            vm: rec.vm,
            role: rec.vm.role(),
            state: "booting".into(),
            agent: None,
            qemu_rss_kib: None,
            qemu_pss_kib: None,
            last_console: Vec::new(),
            overlays: Vec::new(),
        };
        let Some(pid) = qemu_pid(&paths) else {
            st.state = "dead".into();
            st.last_console = console_tail(&paths, 10);
            return st;
        };
        st.qemu_rss_kib = rss_kib(pid);
        st.qemu_pss_kib = pss_kib(pid);
        if let Ok(Reply::Status(a)) =
            agent::request(&paths.agent(), Op::Status, Duration::from_secs(3))
        {
            st.state = serde_json::to_value(a.state)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default();
            st.agent = Some(a);
        }
        let boot = st.agent.as_ref().map_or(&[][..], |a| &a.overlays[..]);
        st.overlays = vm_overlays(rec.vm, boot, &state.applied);
        st
    });
    Ok((state, list))
}
