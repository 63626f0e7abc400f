//! Snapshots of running clusters (`kimg snapshot save/ls/rm`): every VM paused
//! together, its RAM and device state saved by QEMU migration to a zstd file, its
//! qcow2 layer frozen by a copy, and a manifest that says what the snapshot needs to
//! be restored (base image, kimg-init, QEMU, the plan) and the checksum of every file.
//!
//! A snapshot is a directory in the image cache (`snapshots/SNAP/`), written under a
//! temp name and renamed when whole: a killed save leaves no snapshot.

use crate::error::ClusterError;
use crate::ops::stop_locked;
use crate::process::qemu_pid;
use crate::qemu::{VmPaths, QEMU};
use crate::qmp::{self, Qmp};
use crate::state::{load, lock, read_manifest, runtime_root, ClusterState};
use kimg_contract::VmId;
use kimg_util::cmd;
use kimg_util::fs::{IoError, PathContext};
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Format of [`SnapshotManifest`]. 2: VMs have a virtio-balloon and a small TCG code
/// buffer, and the plan names the machine; a format-1 VM's state cannot be loaded
/// into those devices.
pub const SNAPSHOT_FORMAT: u32 = 2;
/// The manifest's file name inside a snapshot.
pub const MANIFEST: &str = "manifest.json";
/// A VM's frozen qcow2 layer inside a snapshot (`vm-NNN/disk.qcow2`).
pub const LAYER: &str = "disk.qcow2";
/// A VM's saved RAM and device state inside a snapshot (`vm-NNN/state.zst`).
pub const STATE: &str = "state.zst";
/// Longest a VM's migration to a file may take.
const MIGRATE_LIMIT: Duration = Duration::from_secs(600);
/// Per QMP call (stop, cont, queries).
pub(crate) const QMP_CALL: Duration = Duration::from_secs(30);

/// What a snapshot holds and needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotManifest {
    /// [`SNAPSHOT_FORMAT`].
    pub format: u32,
    /// The snapshot's name.
    pub name: String,
    /// The cluster it was saved from.
    pub cluster: String,
    /// Unix time of the save.
    pub created: u64,
    /// Seconds the save took (pause to snapshot written).
    pub save_secs: f64,
    /// Seconds the VMs were paused.
    pub paused_secs: f64,
    /// The kimg that saved it.
    pub kimg_version: String,
    /// kimg-init's version and sha256 in the base image.
    pub init: Option<String>,
    /// The QEMU that saved the state (a restore needs the same).
    pub qemu: qmp::Version,
    /// The base image the frozen layers sit on.
    pub image: PathBuf,
    /// Its sha256.
    pub image_sha256: String,
    /// The cluster as it ran (networks, size, memory, net backend, append, overlays).
    pub plan: ClusterState,
    /// Each VM as QEMU ran it.
    pub vms: Vec<SnapVm>,
    /// The cluster's admin kubeconfig, relative to the snapshot (Kubernetes).
    #[serde(default)]
    pub kubeconfig: Option<String>,
    /// The cluster's PKI overlay directory, relative to the snapshot (Kubernetes).
    #[serde(default)]
    pub pki: Option<String>,
    /// Every file of the snapshot but the manifest.
    pub files: Vec<SnapFile>,
}

/// One VM of a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapVm {
    /// The VM.
    pub vm: VmId,
    /// Memory in MiB.
    pub mem_mb: u32,
    /// vCPUs.
    pub cpus: u32,
    /// The kernel command line it booted with.
    pub cmdline: String,
    /// Its cdrom, relative to the snapshot (the device is always there; the medium
    /// must be the same on restore).
    pub cdrom: Option<String>,
}

/// One file of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapFile {
    /// Path relative to the snapshot.
    pub path: String,
    /// Bytes.
    pub size: u64,
    /// sha256.
    pub sha256: String,
}

/// Where named snapshots live.
pub fn snapshots_root() -> PathBuf {
    kimg_util::cache::cache_dir().join("snapshots")
}

/// Where suspended clusters live (in the cache, not the runtime dir: it may be tmpfs).
pub fn suspended_root() -> PathBuf {
    kimg_util::cache::cache_dir().join("suspended")
}

/// Checks a snapshot name (the cluster name rules).
pub fn check_name(name: &str) -> Result<(), ClusterError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(ClusterError::Usage(format!(
            "snapshot name {name:?}: use letters, digits, '-', '_' and '.' (at most 64, not starting with '.')"
        )))
    }
}

/// Options of [`save`].
#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// The running cluster.
    pub cluster: String,
    /// The snapshot's name.
    pub snap: String,
    /// Quit the VMs afterwards (and remove the cluster) instead of resuming them.
    pub stop: bool,
}

/// Saves a running cluster as snapshot `opts.snap` in [`snapshots_root`].
pub fn save(opts: &SaveOptions) -> Result<SnapshotManifest, ClusterError> {
    check_name(&opts.snap)?;
    save_into(&snapshots_root(), &opts.cluster, &opts.snap, opts.stop)
}

/// Saves cluster `cluster` as `root/snap`; with `stop`, quits its VMs and removes it.
pub(crate) fn save_into(
    root: &Path,
    cluster: &str,
    snap: &str,
    stop: bool,
) -> Result<SnapshotManifest, ClusterError> {
    let _lock = lock(cluster)?;
    let (dir, state) = load(cluster)?;
    // A save killed earlier left VMs paused: they run again before this one pauses them.
    resume_paused_locked(&dir, &state)?;
    let target = root.join(snap);
    if target.exists() {
        return Err(ClusterError::Snapshot {
            path: target,
            why: "exists already: pick another name or `kimg snapshot rm` it".into(),
        });
    }
    fs::create_dir_all(root).with_path(root)?;
    remove_stale_temps(root);
    let tmp = root.join(format!(".tmp-{snap}-{}", std::process::id()));
    let result = save_to_temp(&dir, &state, &tmp, snap, stop);
    let manifest = match result {
        Ok(m) => m,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            if stop {
                // The VMs were left paused for the quit that will not come.
                cont_all(&dir, &state);
            }
            return Err(e);
        }
    };
    kimg_util::fs::rename(&tmp, &target)?;
    if stop {
        quit_all(&dir, &state);
        stop_locked(cluster, &dir, Duration::from_secs(5))?;
    }
    Ok(manifest)
}

/// VMs a killed `kimg snapshot save` or `kimg suspend` left paused: with the
/// cluster's lock free no save is under way, so each VM QEMU reports paused (or
/// done migrating out) runs again, its clock set. Returns those VMs; a cluster
/// started by an older kimg (no QMP socket) is left as it is.
pub fn resume_abandoned(name: &str) -> Result<Vec<VmId>, ClusterError> {
    let (dir, state) = load(name)?;
    let Ok(_lock) = lock(name) else {
        return Ok(Vec::new()); // another kimg is at work: its pauses are its own
    };
    remove_stale_temps(&snapshots_root());
    remove_stale_temps(&suspended_root());
    resume_paused_locked(&dir, &state)
}

/// [`resume_abandoned`] for a caller that holds the cluster's lock.
pub(crate) fn resume_paused_locked(
    dir: &Path,
    state: &ClusterState,
) -> Result<Vec<VmId>, ClusterError> {
    let mut resumed = Vec::new();
    for r in &state.vms {
        let paths = VmPaths::new(dir, r.vm);
        if qemu_pid(&paths).is_none() || !paths.qmp().exists() {
            continue;
        }
        let qerr = |source| ClusterError::Qmp { vm: r.vm, source };
        let mut q = Qmp::connect(&paths.qmp(), QMP_CALL).map_err(qerr)?;
        // A migration still under way would pause the VM again when it completes.
        let deadline = Instant::now() + QMP_CALL;
        loop {
            let m = q.execute(&qmp::QueryMigrate, QMP_CALL).map_err(qerr)?;
            let busy = matches!(
                m.status.as_deref(),
                Some("setup" | "active" | "pre-switchover" | "device" | "cancelling")
            );
            if !busy || Instant::now() > deadline {
                break;
            }
            if m.status.as_deref() != Some("cancelling") {
                q.execute(&qmp::MigrateCancel, QMP_CALL).map_err(qerr)?;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let st = q.execute(&qmp::QueryStatus, QMP_CALL).map_err(qerr)?;
        if matches!(st.status.as_str(), "paused" | "postmigrate") {
            q.execute(&qmp::Cont, QMP_CALL).map_err(qerr)?;
            resumed.push(r.vm);
        }
    }
    if !resumed.is_empty() {
        crate::restore::set_clocks(dir, &resumed)?;
    }
    Ok(resumed)
}

/// Temp dirs of saves whose kimg is gone (killed): nothing of them counts.
fn remove_stale_temps(root: &Path) {
    let Ok(rd) = fs::read_dir(root) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(".tmp-") else {
            continue;
        };
        let pid = rest.rsplit('-').next().and_then(|p| p.parse::<i32>().ok());
        if pid.is_some_and(|p| !crate::process::alive(p)) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// QMP connections to every VM of the cluster, in its order.
fn connect_all(dir: &Path, state: &ClusterState) -> Result<Vec<(VmId, Qmp)>, ClusterError> {
    state
        .vms
        .iter()
        .map(|r| {
            let paths = VmPaths::new(dir, r.vm);
            if qemu_pid(&paths).is_none() {
                return Err(ClusterError::Dead(r.vm));
            }
            Qmp::connect(&paths.qmp(), QMP_CALL)
                .map(|q| (r.vm, q))
                .map_err(|source| ClusterError::Qmp { vm: r.vm, source })
        })
        .collect()
}

fn save_to_temp(
    dir: &Path,
    state: &ClusterState,
    tmp: &Path,
    snap: &str,
    stop: bool,
) -> Result<SnapshotManifest, ClusterError> {
    let start = Instant::now();
    let image_manifest = read_manifest(&state.image)?;
    let (image_sha256, _) = kimg_util::hash::file_sha256(&state.image).with_path(&state.image)?;
    fs::create_dir_all(tmp).with_path(tmp)?;
    // A snapshot holds the cluster's keys and memory: the user's alone.
    fs::set_permissions(tmp, std::os::unix::fs::PermissionsExt::from_mode(0o700)).with_path(tmp)?;
    let mut conns = connect_all(dir, state)?;
    let qemu_version = conns
        .first()
        .map(|(_, q)| q.version().clone())
        .unwrap_or_default();
    // Pause every VM before saving any, so the cluster is saved at one moment.
    let paused = Instant::now();
    for (vm, q) in &mut conns {
        q.execute(&qmp::Stop, QMP_CALL)
            .map_err(|source| ClusterError::Qmp { vm: *vm, source })?;
    }
    let saved = save_paused(dir, state, tmp, &mut conns);
    let paused_secs;
    if stop && saved.is_ok() {
        paused_secs = paused.elapsed().as_secs_f64();
    } else {
        // Resume whatever happened; a failed save must not leave the cluster paused.
        let mut first_err = None;
        for (vm, q) in &mut conns {
            if let Err(source) = q.execute(&qmp::Cont, QMP_CALL) {
                first_err.get_or_insert(ClusterError::Qmp { vm: *vm, source });
            }
        }
        paused_secs = paused.elapsed().as_secs_f64();
        drop(conns);
        let vms: Vec<VmId> = state.vms.iter().map(|r| r.vm).collect();
        if saved.is_ok() {
            crate::restore::set_clocks(dir, &vms)?;
        }
        if let Some(e) = first_err {
            saved?;
            return Err(e);
        }
    }
    let cdroms = saved?;
    let (kubeconfig, pki) = copy_cluster_secrets(dir, tmp)?;
    let mut plan = state.clone();
    plan.cdrom = None;
    let base_cmdline = image_manifest.kernel.cmdline.as_str();
    let snap_vms = state
        .vms
        .iter()
        .map(|r| SnapVm {
            vm: r.vm,
            mem_mb: r.mem_mb,
            cpus: r.cpus,
            cmdline: {
                let cdrom = cdroms.iter().any(|(vm, c)| *vm == r.vm && c.is_some());
                crate::launch::vm_cmdline(base_cmdline, r.vm, state, cdrom)
            },
            cdrom: cdroms
                .iter()
                .find(|(vm, _)| *vm == r.vm)
                .and_then(|(_, c)| c.clone()),
        })
        .collect();
    let files = hash_tree(tmp)?;
    let manifest = SnapshotManifest {
        format: SNAPSHOT_FORMAT,
        name: snap.to_string(),
        cluster: state.name.clone(),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        save_secs: start.elapsed().as_secs_f64(),
        paused_secs,
        kimg_version: env!("CARGO_PKG_VERSION").to_string(),
        init: init_identity(&image_manifest),
        qemu: qemu_version,
        image: state.image.clone(),
        image_sha256,
        plan,
        vms: snap_vms,
        kubeconfig,
        pki,
        files,
    };
    let json = serde_json::to_string_pretty(&manifest).unwrap_or_default();
    kimg_util::fs::write_atomic(&tmp.join(MANIFEST), json)?;
    Ok(manifest)
}

/// kimg-init's version and sha256 as the image manifest records them.
pub(crate) fn init_identity(m: &kimg_contract::manifest::Manifest) -> Option<String> {
    m.component("kimg-init").map(|c| {
        format!(
            "{} (sha256 {})",
            c.version.as_deref().unwrap_or("?"),
            c.sha256
        )
    })
}

/// With every VM paused: migrate each to its state file, note its cdrom, freeze its
/// layer. Returns each VM's cdrom (relative to the snapshot).
fn save_paused(
    dir: &Path,
    state: &ClusterState,
    tmp: &Path,
    conns: &mut [(VmId, Qmp)],
) -> Result<Vec<(VmId, Option<String>)>, ClusterError> {
    for (vm, q) in conns.iter_mut() {
        let vmdir = tmp.join(vm.hostname());
        fs::create_dir_all(&vmdir).with_path(&vmdir)?;
        let file = vmdir.join(STATE);
        let qerr = |source| ClusterError::Qmp { vm: *vm, source };
        q.execute(
            &qmp::MigrateSetParameters {
                max_bandwidth: u64::MAX >> 2,
            },
            QMP_CALL,
        )
        .map_err(qerr)?;
        q.execute(
            &qmp::Migrate {
                uri: format!("exec:zstd -q -1 > {}", shell_quote(&file)),
            },
            QMP_CALL,
        )
        .map_err(qerr)?;
    }
    // The migrations run side by side; wait for each.
    let deadline = Instant::now() + MIGRATE_LIMIT;
    for (vm, q) in conns.iter_mut() {
        loop {
            let qerr = |source| ClusterError::Qmp { vm: *vm, source };
            let info = q.execute(&qmp::QueryMigrate, QMP_CALL).map_err(qerr)?;
            match info.status.as_deref() {
                Some("completed") => break,
                Some("failed") | Some("cancelled") => {
                    return Err(ClusterError::Snapshot {
                        path: tmp.join(vm.hostname()).join(STATE),
                        why: format!(
                            "{vm}: saving its state failed: {} (is zstd installed? scripts/setup-host; is the cache's disk full?)",
                            info.error_desc.unwrap_or_default()
                        ),
                    });
                }
                _ if Instant::now() > deadline => {
                    return Err(ClusterError::Snapshot {
                        path: tmp.join(vm.hostname()).join(STATE),
                        why: format!("{vm}: saving its state took over {MIGRATE_LIMIT:?}"),
                    });
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
    let mut cdroms = Vec::new();
    let mut copied: Vec<(String, String)> = Vec::new();
    for (vm, q) in conns.iter_mut() {
        let blocks = q
            .execute(&qmp::QueryBlock, QMP_CALL)
            .map_err(|source| ClusterError::Qmp { vm: *vm, source })?;
        let file = blocks
            .iter()
            .find(|b| b.device == "cd0")
            .and_then(|b| b.inserted.as_ref())
            .map(|i| i.file.clone());
        let rel = match file {
            None => None,
            Some(f) => Some(match copied.iter().find(|(src, _)| *src == f) {
                Some((_, rel)) => rel.clone(),
                None => {
                    let rel = format!("cdrom-{}.iso", copied.len() + 1);
                    copy_sparse(Path::new(&f), &tmp.join(&rel))?;
                    copied.push((f, rel.clone()));
                    rel
                }
            }),
        };
        cdroms.push((*vm, rel));
    }
    // `stop` drained and flushed the disks: the layers are consistent now.
    for r in &state.vms {
        let paths = VmPaths::new(dir, r.vm);
        let out = tmp.join(r.vm.hostname()).join(LAYER);
        copy_sparse(&paths.disk(), &out)?;
        flatten_onto(&out, &state.image)?;
        if state.uefi {
            let vars = tmp.join(r.vm.hostname()).join("OVMF_VARS.fd");
            fs::copy(paths.efi_vars(), &vars).with_path(&vars)?;
        }
    }
    Ok(cdroms)
}

/// The cluster's admin kubeconfig and PKI store, copied into the snapshot.
fn copy_cluster_secrets(
    dir: &Path,
    tmp: &Path,
) -> Result<(Option<String>, Option<String>), ClusterError> {
    let kc = dir.join(crate::pki::ADMIN_KUBECONFIG);
    let kubeconfig = if kc.is_file() {
        let out = tmp.join(crate::pki::ADMIN_KUBECONFIG);
        fs::copy(&kc, &out).with_path(&out)?;
        Some(crate::pki::ADMIN_KUBECONFIG.to_string())
    } else {
        None
    };
    let pki_dir = dir.join(crate::pki::STORE);
    let pki = if pki_dir.is_dir() {
        cmd::run(
            Command::new("cp")
                .arg("-a")
                .arg(&pki_dir)
                .arg(tmp.join(crate::pki::STORE)),
        )?;
        Some(crate::pki::STORE.to_string())
    } else {
        None
    };
    Ok((kubeconfig, pki))
}

/// `cp --sparse=always` (layers are mostly holes).
pub(crate) fn copy_sparse(from: &Path, to: &Path) -> Result<(), ClusterError> {
    cmd::run(Command::new("cp").arg("--sparse=always").arg(from).arg(to))?;
    Ok(())
}

/// Makes `layer` sit directly on `base`: a layer over another snapshot's layer (a
/// restored cluster saved again) gets that layer's data folded in, so no snapshot
/// depends on another.
fn flatten_onto(layer: &Path, base: &Path) -> Result<(), ClusterError> {
    let info = cmd::run_stdout(
        Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(layer),
    )?;
    let v: serde_json::Value = serde_json::from_str(&info).unwrap_or_default();
    let backing = v["full-backing-filename"]
        .as_str()
        .or(v["backing-filename"].as_str())
        .map(PathBuf::from);
    if backing.as_deref() == Some(base) {
        return Ok(());
    }
    cmd::run(
        Command::new("qemu-img")
            .args(["rebase", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(base)
            .arg(layer),
    )?;
    Ok(())
}

/// Single-quotes `p` for the shell QEMU's `exec:` migration runs.
pub(crate) fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.to_string_lossy().replace('\'', r"'\''"))
}

/// Every file under `root` (but the manifest) with its size and sha256, hashed in
/// parallel, sorted by path.
fn hash_tree(root: &Path) -> Result<Vec<SnapFile>, ClusterError> {
    let mut paths = Vec::new();
    walk(root, root, &mut paths)?;
    paths.retain(|p| p != MANIFEST);
    paths.sort();
    let hashed: Vec<Result<SnapFile, IoError>> = std::thread::scope(|s| {
        let handles: Vec<_> = paths
            .iter()
            .map(|rel| {
                s.spawn(move || {
                    let p = root.join(rel);
                    let (sha256, size) = kimg_util::hash::file_sha256(&p).with_path(&p)?;
                    Ok(SnapFile {
                        path: rel.clone(),
                        size,
                        sha256,
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(IoError::new(
                        root,
                        std::io::Error::other("hash thread panicked"),
                    ))
                })
            })
            .collect()
    });
    Ok(hashed.into_iter().collect::<Result<_, _>>()?)
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<(), ClusterError> {
    for e in fs::read_dir(dir).with_path(dir)? {
        let e = e.with_path(dir)?;
        let p = e.path();
        let ft = e.file_type().with_path(&p)?;
        if ft.is_dir() {
            walk(root, &p, out)?;
        } else if ft.is_file() {
            if let Ok(rel) = p.strip_prefix(root) {
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    Ok(())
}

/// Lets every VM run again (errors ignored: a running VM's `cont` is harmless).
fn cont_all(dir: &Path, state: &ClusterState) {
    for r in &state.vms {
        if let Ok(mut q) = Qmp::connect(&VmPaths::new(dir, r.vm).qmp(), QMP_CALL) {
            let _ = q.execute(&qmp::Cont, QMP_CALL);
        }
    }
}

/// Quits every VM's QEMU at once (after a save with `--stop`: the guests are
/// paused and their state is in the snapshot, so no shutdown is owed to them).
fn quit_all(dir: &Path, state: &ClusterState) {
    for r in &state.vms {
        if let Ok(mut q) = Qmp::connect(&VmPaths::new(dir, r.vm).qmp(), QMP_CALL) {
            // QEMU may close the socket before answering: either is fine.
            let _ = q.execute(&qmp::Quit, Duration::from_secs(5));
        }
    }
}

/// Reads and checks a snapshot directory: its manifest, then every file's size and
/// sha256, the base image's sha256, kimg-init and the QEMU here.
pub fn verify(dir: &Path) -> Result<SnapshotManifest, ClusterError> {
    let manifest = read(dir)?;
    let bad = |path: PathBuf, why: String| ClusterError::Snapshot { path, why };
    // Sizes first: a truncated file is found without reading anything.
    for f in &manifest.files {
        let p = dir.join(&f.path);
        let len = fs::metadata(&p).map(|m| m.len()).map_err(|e| {
            bad(
                p.clone(),
                format!(
                    "{e}: the snapshot is damaged; `kimg snapshot rm {}` and save it again",
                    manifest.name
                ),
            )
        })?;
        if len != f.size {
            return Err(bad(
                p,
                format!(
                    "is {len} bytes, the manifest says {}: the snapshot is damaged (truncated?); `kimg snapshot rm {}` and save it again",
                    f.size, manifest.name
                ),
            ));
        }
    }
    let image = manifest.image.clone();
    let (hashes, image_hash) = std::thread::scope(|s| {
        let files: Vec<_> = manifest
            .files
            .iter()
            .map(|f| {
                let p = dir.join(&f.path);
                s.spawn(move || (kimg_util::hash::file_sha256(&p).map(|(h, _)| h), f, p))
            })
            .collect();
        let img = s.spawn(|| kimg_util::hash::file_sha256(&image).map(|(h, _)| h));
        (
            files.into_iter().map(|h| h.join()).collect::<Vec<_>>(),
            img.join(),
        )
    });
    for h in hashes {
        let (got, f, p) = h.map_err(|_| ClusterError::Panicked("a snapshot hash thread"))?;
        let got = got.with_path(&p)?;
        if got != f.sha256 {
            return Err(bad(
                p,
                format!(
                    "has sha256 {got}, the manifest says {}: the file was modified; `kimg snapshot rm {}` and save it again",
                    f.sha256, manifest.name
                ),
            ));
        }
    }
    let image_hash = image_hash
        .map_err(|_| ClusterError::Panicked("the image hash thread"))?
        .map_err(|e| {
            bad(
                image.clone(),
                format!("the snapshot's base image cannot be read: {e}; restore it (same bytes) or save a new snapshot"),
            )
        })?;
    if image_hash != manifest.image_sha256 {
        return Err(bad(
            image.clone(),
            format!(
                "the base image changed since the snapshot (sha256 {image_hash}, the snapshot needs {}): its frozen layers sit on the old image; boot with `kimg run` and save a new snapshot",
                manifest.image_sha256
            ),
        ));
    }
    let image_manifest = read_manifest(&image)?;
    let init = init_identity(&image_manifest);
    if init != manifest.init {
        return Err(bad(
            image.with_extension("json"),
            format!(
                "kimg-init is {} now, the snapshot was saved with {}: save a new snapshot",
                init.as_deref().unwrap_or("unknown"),
                manifest.init.as_deref().unwrap_or("unknown")
            ),
        ));
    }
    let here = qemu_version()?;
    if here != manifest.qemu.qemu {
        return Err(bad(
            dir.to_path_buf(),
            format!(
                "saved by QEMU {} and this host has QEMU {here}: QEMU restores only its own version's state; save a new snapshot",
                manifest.qemu.qemu
            ),
        ));
    }
    Ok(manifest)
}

/// The manifest of the snapshot in `dir`, unchecked.
pub fn read(dir: &Path) -> Result<SnapshotManifest, ClusterError> {
    let path = dir.join(MANIFEST);
    let text = fs::read_to_string(&path).map_err(|e| ClusterError::Snapshot {
        path: path.clone(),
        why: format!("{e} (see `kimg snapshot ls`; a save that was killed leaves no snapshot)"),
    })?;
    let m: SnapshotManifest = serde_json::from_str(&text).map_err(|e| ClusterError::Snapshot {
        path: path.clone(),
        why: format!("not a kimg snapshot manifest: {e}"),
    })?;
    if m.format != SNAPSHOT_FORMAT {
        return Err(ClusterError::Snapshot {
            path,
            why: format!(
                "format {} (this kimg reads {SNAPSHOT_FORMAT}): save a new snapshot",
                m.format
            ),
        });
    }
    Ok(m)
}

/// `major.minor.micro` of the QEMU kimg runs (`qemu-system-x86_64 --version`).
pub fn qemu_version() -> Result<String, ClusterError> {
    let out = cmd::run_stdout(Command::new(QEMU).arg("--version"))?;
    Ok(parse_qemu_version(&out).unwrap_or_default())
}

fn parse_qemu_version(text: &str) -> Option<String> {
    let line = text.lines().next()?;
    let word = line
        .split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)?;
    Some(word.to_string())
}

/// One line of `kimg snapshot ls`.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    /// Name.
    pub name: String,
    /// The cluster it was saved from.
    pub cluster: String,
    /// Unix time of the save.
    pub created: u64,
    /// VMs.
    pub vms: usize,
    /// Bytes of all its files.
    pub bytes: u64,
    /// The base image.
    pub image: PathBuf,
    /// Whether the manifest could be read (else the rest is empty).
    pub ok: bool,
}

/// The snapshots in the cache, by name.
pub fn list() -> Result<Vec<SnapshotInfo>, ClusterError> {
    let root = snapshots_root();
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(&root) else {
        return Ok(out);
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !e.path().is_dir() {
            continue;
        }
        out.push(match read(&e.path()) {
            Ok(m) => SnapshotInfo {
                name,
                cluster: m.cluster,
                created: m.created,
                vms: m.vms.len(),
                bytes: m.files.iter().map(|f| f.size).sum(),
                image: m.image,
                ok: true,
            },
            Err(_) => SnapshotInfo {
                name,
                cluster: String::new(),
                created: 0,
                vms: 0,
                bytes: 0,
                image: PathBuf::new(),
                ok: false,
            },
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Removes snapshot `snap`, unless a running cluster sits on its frozen layers.
pub fn remove(snap: &str) -> Result<(), ClusterError> {
    check_name(snap)?;
    let dir = snapshots_root().join(snap);
    if !dir.is_dir() {
        return Err(ClusterError::Snapshot {
            path: dir,
            why: "no such snapshot (see `kimg snapshot ls`)".into(),
        });
    }
    if let Some(user) = cluster_using(snap) {
        return Err(ClusterError::Snapshot {
            path: dir,
            why: format!(
                "cluster {user:?} runs on its frozen layers: `kimg stop --name {user}` first"
            ),
        });
    }
    fs::remove_dir_all(&dir).with_path(&dir)?;
    Ok(())
}

/// A running cluster restored from `snap`, if any.
fn cluster_using(snap: &str) -> Option<String> {
    let rd = fs::read_dir(runtime_root()).ok()?;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok((dir, state)) = load(&name) else {
            continue;
        };
        if state.restored_from.as_deref() == Some(snap)
            && state
                .vms
                .iter()
                .any(|r| qemu_pid(&VmPaths::new(&dir, r.vm)).is_some())
        {
            return Some(name);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for ok in ["base", "k8s-1.20_warm", "a.b"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".tmp-x", "a/b", "x y", &"a".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn qemu_version_from_its_banner() {
        assert_eq!(
            parse_qemu_version(
                "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright"
            ),
            Some("7.2.22".into())
        );
        assert_eq!(parse_qemu_version("nonsense"), None);
    }

    #[test]
    fn shell_quoting_survives_quotes_and_spaces() {
        assert_eq!(shell_quote(Path::new("/a b/it's")), r"'/a b/it'\''s'");
    }

    #[test]
    fn hash_tree_lists_files_but_the_manifest() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("vm-001")).unwrap();
        fs::write(t.path().join("vm-001/state.zst"), "abc").unwrap();
        fs::write(t.path().join(MANIFEST), "{}").unwrap();
        let files = hash_tree(t.path()).unwrap();
        assert_eq!(
            files,
            [SnapFile {
                path: "vm-001/state.zst".into(),
                size: 3,
                sha256: kimg_util::hash::sha256(b"abc"),
            }]
        );
    }
}
