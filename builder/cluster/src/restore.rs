//! Clusters from snapshots: `kimg run --from SNAP` (fresh layers over the snapshot's
//! frozen ones, RAM and devices restored by QEMU's incoming migration, new networks,
//! the host's time told to every guest), and `kimg suspend` / `kimg resume` (the same
//! in place, through a snapshot of the cluster's own kept in the cache).

use crate::addon;
use crate::agent;
use crate::bootfiles::boot_files;
use crate::error::ClusterError;
use crate::health::{console_tail, wait_for, Wait};
use crate::launch::RunEvent;
use crate::network;
use crate::ops::stop_locked;
use crate::process::qemu_pid;
use crate::qemu::{VmPaths, VmSpec};
use crate::qmp::{self, Qmp};
use crate::snapshot::{self, shell_quote, SnapVm, SnapshotManifest, LAYER, QMP_CALL, STATE};
use crate::state::{cluster_dir, lock, read_manifest, save, ClusterState, VmRecord};
use kimg_contract::agent::{Op, Reply};
use kimg_contract::VmId;
use kimg_util::cmd;
use kimg_util::fs::PathContext;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Longest an incoming migration (reading a VM's state file) may take.
const INCOMING_LIMIT: Duration = Duration::from_secs(600);

/// Options of [`run_from`].
#[derive(Debug, Clone)]
pub struct FromOptions {
    /// The snapshot's name.
    pub snap: String,
    /// The new cluster's name (a running one of that name is stopped first).
    pub name: String,
    /// Wait until the cluster is ready (or its VMs alone are).
    pub wait: Option<Wait>,
}

/// Starts a new cluster from snapshot `opts.snap`.
pub fn run_from(
    opts: &FromOptions,
    on_event: &(dyn Fn(RunEvent) + Sync),
) -> Result<ClusterState, ClusterError> {
    snapshot::check_name(&opts.snap)?;
    let dir = snapshot::snapshots_root().join(&opts.snap);
    restore(&dir, &opts.name, false, opts.wait, on_event)
}

/// Suspends a cluster: saves it into the cache and quits its VMs; `kimg resume`
/// brings it back (after a host reboot too).
pub fn suspend(name: &str) -> Result<SnapshotManifest, ClusterError> {
    cluster_dir(name)?;
    snapshot::save_into(&snapshot::suspended_root(), name, name, true)
}

/// Resumes a suspended cluster; its suspended state is consumed. A running cluster
/// whose VMs a killed save left paused gets them running again.
pub fn resume(
    name: &str,
    wait: Option<Wait>,
    on_event: &(dyn Fn(RunEvent) + Sync),
) -> Result<ClusterState, ClusterError> {
    cluster_dir(name)?;
    let dir = snapshot::suspended_root().join(name);
    if !dir.is_dir() {
        // Running, with VMs a killed save or suspend left paused: let them run.
        if let Ok((_, state)) = crate::state::load(name) {
            let resumed = snapshot::resume_abandoned(name)?;
            if !resumed.is_empty() {
                for vm in resumed {
                    on_event(RunEvent::Started(vm));
                }
                return Ok(state);
            }
        }
        return Err(ClusterError::Snapshot {
            path: dir,
            why: format!("cluster {name:?} is not suspended (`kimg suspend --name {name}`)"),
        });
    }
    restore(&dir, name, true, wait, on_event)
}

/// Starts cluster `name` from the snapshot in `snap_dir`. With `consume` the
/// snapshot is the cluster's own (resume): its layers move into the cluster and the
/// snapshot is gone once the cluster runs.
fn restore(
    snap_dir: &Path,
    name: &str,
    consume: bool,
    wait: Option<Wait>,
    on_event: &(dyn Fn(RunEvent) + Sync),
) -> Result<ClusterState, ClusterError> {
    let dir = cluster_dir(name)?;
    let manifest = snapshot::verify(snap_dir)?;
    let _lock = lock(name)?;
    if dir.exists() {
        stop_locked(name, &dir, Duration::from_secs(10))?;
        on_event(RunEvent::Replaced);
    }
    let old_umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let result = start(snap_dir, &dir, name, &manifest, consume, on_event);
    nix::sys::stat::umask(old_umask);
    let state = match result {
        Ok(state) => state,
        Err(e) => {
            let _ = stop_locked(name, &dir, Duration::from_secs(2));
            return Err(e);
        }
    };
    if consume {
        // The cluster holds everything it needs now (layers and cdroms moved).
        fs::remove_dir_all(snap_dir).with_path(snap_dir)?;
    }
    if let Some(wait) = wait {
        wait_for(&dir, &state, wait, on_event)?;
    }
    Ok(state)
}

fn start(
    snap_dir: &Path,
    dir: &Path,
    name: &str,
    manifest: &SnapshotManifest,
    consume: bool,
    on_event: &(dyn Fn(RunEvent) + Sync),
) -> Result<ClusterState, ClusterError> {
    fs::create_dir_all(dir).with_path(dir)?;
    let image_manifest = read_manifest(&manifest.image)?;
    let files = boot_files(&manifest.image, &image_manifest, dir)?;
    on_event(RunEvent::Accel(manifest.plan.accel, manifest.plan.machine));
    let mut state = ClusterState {
        name: name.to_string(),
        started: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        restored_from: (!consume).then(|| manifest.name.clone()),
        vms: manifest
            .vms
            .iter()
            .map(|v| VmRecord {
                vm: v.vm,
                mem_mb: v.mem_mb,
                cpus: v.cpus,
            })
            .collect(),
        ..manifest.plan.clone()
    };
    // The cluster's own files: the PKI (for scaleout) and the admin kubeconfig with
    // a new forward port, since the old one may be taken.
    if let Some(pki) = &manifest.pki {
        // Snapshots made before the per-VM PKI hold the whole overlay (`kimg-pki`,
        // its tree under root/): the store is that tree.
        let from = match snap_dir.join(pki) {
            p if pki == crate::pki::OVERLAY_NAME => p.join("root"),
            p => p,
        };
        cmd::run(
            Command::new("cp")
                .arg("-a")
                .arg(from)
                .arg(dir.join(crate::pki::STORE)),
        )?;
    }
    if let Some(old) = manifest.plan.api_port {
        let port = crate::k8s::free_port().with_path("127.0.0.1:0")?;
        state.api_port = Some(port);
        if let Some(kc) = &manifest.kubeconfig {
            let from = snap_dir.join(kc);
            let text = fs::read_to_string(&from).with_path(&from)?;
            let text = text.replace(
                &format!("https://127.0.0.1:{old}"),
                &format!("https://127.0.0.1:{port}"),
            );
            let to = dir.join(crate::pki::ADMIN_KUBECONFIG);
            kimg_util::fs::write_atomic(&to, text)?;
        }
    }
    // Cdroms: shared read-only from a kept snapshot, moved into a resumed cluster.
    let cdrom_of = |v: &SnapVm| -> Result<Option<PathBuf>, ClusterError> {
        let Some(rel) = &v.cdrom else { return Ok(None) };
        if !consume {
            return Ok(Some(snap_dir.join(rel)));
        }
        let to = dir.join(rel);
        if !to.exists() {
            move_file(&snap_dir.join(rel), &to)?;
        }
        Ok(Some(to))
    };
    let cdroms: Vec<Option<PathBuf>> = manifest
        .vms
        .iter()
        .map(cdrom_of)
        .collect::<Result<_, _>>()?;
    let addon = addon::of(image_manifest.flavour);
    // The shared cdrom (for VMs added later) is one without secrets: never a
    // VM's own (a node's carries its credentials, vm-001's the CA key).
    state.cdrom = manifest
        .vms
        .iter()
        .zip(&cdroms)
        .filter(|(v, _)| !addon.own_cdrom(v.vm))
        .find_map(|(_, c)| c.clone());
    save(dir, &state)?;
    network::create(state.net, &state.name, dir)?;
    let state_ref = &state;
    std::thread::scope(|s| {
        let handles: Vec<_> = manifest
            .vms
            .iter()
            .zip(&cdroms)
            .map(|(v, cdrom)| {
                let spec = VmSpec {
                    vm: v.vm,
                    mem_mb: v.mem_mb,
                    cpus: v.cpus,
                    accel: state_ref.accel,
                    machine: state_ref.machine,
                    code: addon.guest_code(),
                    kernel: files[0].clone(),
                    initrd: files[1].clone(),
                    cmdline: v.cmdline.clone(),
                    uefi: state_ref.uefi,
                    cdrom: cdrom.clone(),
                };
                s.spawn(move || {
                    start_vm(snap_dir, dir, &spec, state_ref, addon, consume)?;
                    on_event(RunEvent::Started(spec.vm));
                    resume_vm(dir, spec.vm)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or(Err(ClusterError::Panicked("a VM's restore thread")))
            })
            .collect::<Result<Vec<()>, _>>()
    })?;
    let vms: Vec<VmId> = state.vms.iter().map(|r| r.vm).collect();
    set_clocks(dir, &vms)?;
    Ok(state)
}

/// Renames, or copies then removes across file systems (the runtime dir may be tmpfs).
fn move_file(from: &Path, to: &Path) -> Result<(), ClusterError> {
    if fs::rename(from, to).is_ok() {
        return Ok(());
    }
    snapshot::copy_sparse(from, to)?;
    fs::remove_file(from).with_path(from)?;
    Ok(())
}

/// Starts one VM's QEMU waiting for its state: a layer over the frozen one (or the
/// frozen one itself, moved, on resume), the same devices, `-incoming`.
fn start_vm(
    snap_dir: &Path,
    dir: &Path,
    spec: &VmSpec,
    state: &ClusterState,
    addon: &dyn addon::Addon,
    consume: bool,
) -> Result<(), ClusterError> {
    let paths = VmPaths::new(dir, spec.vm);
    let from = snap_dir.join(spec.vm.hostname());
    fs::create_dir_all(&paths.dir).with_path(&paths.dir)?;
    let frozen = from.join(LAYER);
    if consume {
        move_file(&frozen, &paths.disk())?;
    } else {
        cmd::run(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                .arg(&frozen)
                .arg(paths.disk()),
        )?;
    }
    if spec.uefi {
        let vars = paths.efi_vars();
        fs::copy(from.join("OVMF_VARS.fd"), &vars).with_path(&vars)?;
    }
    let incoming = [
        "-incoming".to_string(),
        format!("exec:zstd -q -dc {}", shell_quote(&from.join(STATE))),
    ];
    crate::launch::spawn_qemu(dir, &paths, spec, state, addon, &incoming)
}

/// Waits for a VM's incoming migration to finish, then lets it run (a VM saved
/// while paused stays paused after the migration until `cont`).
fn resume_vm(dir: &Path, vm: VmId) -> Result<(), ClusterError> {
    let paths = VmPaths::new(dir, vm);
    let qerr = |source| ClusterError::Qmp { vm, source };
    let mut q = Qmp::connect(&paths.qmp(), QMP_CALL).map_err(qerr)?;
    let deadline = Instant::now() + INCOMING_LIMIT;
    loop {
        if qemu_pid(&paths).is_none() {
            return Err(ClusterError::NotReady(vec![(
                vm,
                "QEMU exited while reading its saved state".into(),
                console_tail(&paths, 10),
            )]));
        }
        let st = q.execute(&qmp::QueryStatus, QMP_CALL).map_err(qerr)?;
        match st.status.as_str() {
            "inmigrate" if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            "inmigrate" => {
                return Err(ClusterError::NotReady(vec![(
                    vm,
                    format!("its saved state was not read within {INCOMING_LIMIT:?}"),
                    Vec::new(),
                )]))
            }
            "running" => return Ok(()),
            _ => {
                q.execute(&qmp::Cont, QMP_CALL).map_err(qerr)?;
                return Ok(());
            }
        }
    }
}

/// Tells each VM the host's time (its clock stood still while it was paused):
/// the agent's `set_clock`, all VMs at once.
pub fn set_clocks(dir: &Path, vms: &[VmId]) -> Result<(), ClusterError> {
    let failures: Vec<ClusterError> = std::thread::scope(|s| {
        let handles: Vec<_> = vms
            .iter()
            .map(|&vm| {
                s.spawn(move || {
                    let sock = VmPaths::new(dir, vm).agent();
                    // Read right before sending: kimg-init sets it as the line arrives.
                    let now = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .unwrap_or_default();
                    let op = Op::SetClock {
                        secs: i64::try_from(now.as_secs()).unwrap_or(i64::MAX),
                        nanos: now.subsec_nanos(),
                    };
                    match agent::request(&sock, op, Duration::from_secs(60)) {
                        Ok(Reply::Ok) => None,
                        Ok(Reply::Error { message }) => Some(ClusterError::Refused { vm, message }),
                        Ok(other) => Some(ClusterError::Refused {
                            vm,
                            message: format!("setting the clock: unexpected answer {other:?}"),
                        }),
                        Err(source) => Some(ClusterError::Agent { vm, source }),
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| {
                h.join()
                    .unwrap_or(Some(ClusterError::Panicked("a clock thread")))
            })
            .collect()
    });
    match failures.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
