//! `kimg apply`: overlays put onto running VMs. The cdrom is made as `kimg run`
//! makes one (same resolution, order and `requires`), put into each VM's
//! always-present drive through QMP (`blockdev-change-medium`), applied by
//! kimg-init in a session (`Session::Apply`: checked, unpacked, hooks, sysctls,
//! services), and ejected again. The cluster's state records what each VM got.
//!
//! Why a cdrom and not the bytes through the agent: the guest reads a cdrom at
//! disk speed (the boot's path, 156 MB/s here), while virtio-serial under TCG
//! carries about 15 MB/s (`kimg bench exec`).

use crate::error::ClusterError;
use crate::process::qemu_pid;
use crate::qemu::{VmPaths, CDROM_DEVICE};
use crate::qmp::{self, Qmp};
use crate::session::{SessionError, OPEN_WAIT};
use crate::snapshot::{resume_paused_locked, QMP_CALL};
use crate::state::{load, lock, save, AppliedOverlays};
use kimg_contract::agent::{ApplyReport, Kind, Session as Op};
use kimg_contract::VmId;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Longest the guest may take over one apply (start hooks may take 2 minutes each).
const APPLY_LIMIT: Duration = Duration::from_secs(900);

/// Options of [`apply`].
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// The running cluster.
    pub cluster: String,
    /// The VMs to apply to; every VM of the cluster when empty.
    pub vms: Vec<VmId>,
    /// Overlay names, archive paths or `deb:` overlays, as for `kimg run`.
    pub overlays: Vec<String>,
    /// Extra overlay search directories (searched before the cluster's own).
    pub ovlpath: Vec<PathBuf>,
}

/// How an apply went on one VM.
#[derive(Debug)]
pub struct VmApplied {
    /// The VM.
    pub vm: VmId,
    /// kimg-init's report, or why the apply failed there.
    pub result: Result<ApplyReport, ClusterError>,
}

/// Puts `opts.overlays` onto the running VMs of `opts.cluster`, all VMs at once.
/// `Err` when nothing could be tried (no such cluster or VM, a dead VM, an overlay
/// not found); otherwise each VM's outcome.
pub fn apply(opts: &ApplyOptions) -> Result<Vec<VmApplied>, ClusterError> {
    let (dir, _) = load(&opts.cluster)?;
    let _lock = lock(&opts.cluster)?;
    let (_, mut state) = load(&opts.cluster)?;
    let vms: Vec<VmId> = if opts.vms.is_empty() {
        state.vms.iter().map(|r| r.vm).collect()
    } else {
        opts.vms.clone()
    };
    for &vm in &vms {
        if !state.vms.iter().any(|r| r.vm == vm) {
            return Err(ClusterError::NoSuchVm {
                name: opts.cluster.clone(),
                vm,
            });
        }
        if qemu_pid(&VmPaths::new(&dir, vm)).is_none() {
            return Err(ClusterError::Dead(vm));
        }
    }
    // A paused VM would never answer: one a killed save left so runs again first.
    resume_paused_locked(&dir, &state)?;
    let mut ovlpath = opts.ovlpath.clone();
    ovlpath.extend(state.ovlpath.iter().cloned());
    let path = kimg_image::overlay::search_path(&ovlpath)?;
    let ovs = kimg_image::overlay::resolve(&opts.overlays, &path)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let iso = dir.join(format!("apply-{}.iso", now.as_nanos()));
    let img = kimg_image::overlay::mkcdrom(&iso, &ovs)?;
    let (dir_ref, iso_ref, sha) = (&dir, &iso, img.sha256.as_str());
    let outcomes: Vec<(VmApplied, bool)> = std::thread::scope(|s| {
        let handles: Vec<_> = vms
            .iter()
            .map(|&vm| s.spawn(move || apply_vm(dir_ref, vm, iso_ref, sha)))
            .collect();
        handles
            .into_iter()
            .zip(&vms)
            .map(|(h, &vm)| {
                h.join().unwrap_or_else(|_| {
                    let result = Err(ClusterError::Panicked("an apply thread"));
                    (VmApplied { vm, result }, false)
                })
            })
            .collect()
    });
    for (o, _) in &outcomes {
        if let Ok(report) = &o.result {
            state.applied.push(AppliedOverlays {
                vm: o.vm,
                at: now.as_secs(),
                overlays: report.overlays.iter().map(|r| r.name.clone()).collect(),
            });
        }
    }
    save(&dir, &state)?;
    // A medium still in a drive is still QEMU's (and a snapshot would copy it).
    if outcomes.iter().all(|(_, ejected)| *ejected) {
        let _ = std::fs::remove_file(&iso);
    }
    Ok(outcomes.into_iter().map(|(o, _)| o).collect())
}

/// Inserts the cdrom into `vm`'s drive, has kimg-init apply it, ejects it. The
/// flag says whether the drive is empty again.
fn apply_vm(dir: &Path, vm: VmId, iso: &Path, sha256: &str) -> (VmApplied, bool) {
    let paths = VmPaths::new(dir, vm);
    let qerr = |source| ClusterError::Qmp { vm, source };
    let insert = Qmp::connect(&paths.qmp(), QMP_CALL).and_then(|mut q| {
        q.execute(
            &qmp::BlockdevChangeMedium {
                id: CDROM_DEVICE.into(),
                filename: iso.to_string_lossy().into_owned(),
                format: "raw".into(),
                read_only_mode: "read-only".into(),
            },
            QMP_CALL,
        )
    });
    let result = match insert {
        Err(e) => Err(qerr(e)),
        Ok(_) => run_session(&paths, vm, sha256),
    };
    let eject = Qmp::connect(&paths.qmp(), QMP_CALL).and_then(|mut q| {
        q.execute(
            &qmp::Eject {
                id: CDROM_DEVICE.into(),
                force: true,
            },
            QMP_CALL,
        )
    });
    let ejected = eject.is_ok();
    let result = match (result, eject) {
        // Applied, but the medium stayed: say so rather than hide it.
        (Ok(mut report), Err(e)) => {
            report.problems.push(format!(
                "the apply cdrom was not ejected from {CDROM_DEVICE}: {e}"
            ));
            Ok(report)
        }
        (r, _) => r,
    };
    (VmApplied { vm, result }, ejected)
}

/// The apply session: kimg-init's report, or its error.
fn run_session(paths: &VmPaths, vm: VmId, sha256: &str) -> Result<ApplyReport, ClusterError> {
    let fail = |source| ClusterError::Session { vm, source };
    let op = Op::Apply {
        cdrom_sha256: sha256.to_string(),
    };
    let mut s = crate::session::Session::open(paths, op, OPEN_WAIT).map_err(fail)?;
    // The guest is silent until its report: the read timeout bounds the whole apply.
    s.writer()
        .and_then(|w| w.set_read_timeout(Some(APPLY_LIMIT)))
        .map_err(|e| fail(e.into()))?;
    let mut report = None;
    loop {
        let (kind, p) = s.recv().map_err(|e| match e {
            SessionError::Io(io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                fail(SessionError::Remote(format!(
                    "kimg-init did not finish the apply within {APPLY_LIMIT:?} (see `kimg logs {vm}` and its console)"
                )))
            }
            e => fail(e),
        })?;
        match kind {
            Kind::Report => {
                report = Some(
                    serde_json::from_slice::<ApplyReport>(&p)
                        .map_err(|e| fail(SessionError::Protocol(format!("apply report: {e}"))))?,
                )
            }
            Kind::Exit => {
                return report.ok_or_else(|| {
                    fail(SessionError::Protocol(
                        "the apply ended without a report".into(),
                    ))
                })
            }
            Kind::Error => {
                return Err(fail(SessionError::Remote(
                    String::from_utf8_lossy(&p).into_owned(),
                )))
            }
            _ => {}
        }
    }
}
