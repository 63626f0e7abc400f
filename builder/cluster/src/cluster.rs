//! A named cluster of VMs booted from one base image: its directory, lock and state,
//! and the operations `kimg run`, `status`, `exec` and `stop` perform on it.
//!
//! The cluster directory lives under the runtime root (`$KIMG_RUNTIME_DIR`, else
//! `$XDG_RUNTIME_DIR/kimg`, else `/tmp/kimg-<uid>`) so that socket paths stay short.
//! It holds `cluster.json`, `boot/` (kernel and initramfs taken from the image's ESP)
//! and one directory per VM (qcow2 layer, sockets, console log, pid file).

use super::accel::{self, Accel, AccelChoice};
use super::agent::{self, AgentError};
use super::network::{self, NetBackend, NetworkError};
use super::qemu::{self, VmPaths, VmSpec};
use kimg_contract::agent::{BootState, ExecResult, Op, Reply, Status};
use kimg_contract::cmdline::{with_cdrom, with_hostname, with_size};
use kimg_contract::manifest::Manifest;
use kimg_contract::net::ClusterSize;
use kimg_contract::{Role, VmId};
use kimg_util::cmd::{self, CmdError};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Errors of cluster operations.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The cluster name has characters that do not belong in a path.
    #[error("cluster name {0:?}: use letters, digits, '-' and '_' (at most 32)")]
    BadName(String),
    /// No cluster of that name is running.
    #[error("no cluster named {0:?} (start one with `kimg run --name {0}`)")]
    NotFound(String),
    /// Another kimg holds the cluster's lock.
    #[error("cluster {0:?} is being started or stopped by another kimg (lock {1})")]
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
    /// The overlay cdrom could not be made or found.
    #[error("overlay cdrom: {0}")]
    Cdrom(String),
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
    /// Talking to an agent failed.
    #[error("{vm}: {source}")]
    Agent {
        /// VM.
        vm: VmId,
        /// Why.
        source: AgentError,
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
    /// A file in the cluster directory could not be handled.
    #[error("{path}: {source}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
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

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ClusterError + '_ {
    move |source| ClusterError::Io {
        path: path.to_path_buf(),
        source,
    }
}

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

/// Options of `kimg run` (`Default` is an empty cluster with no name: set what
/// matters and take the rest).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Cluster name.
    pub name: String,
    /// Base image (qcow2 with its manifest beside it).
    pub image: PathBuf,
    /// Number of nodes (vm-001..).
    pub nodes: u16,
    /// Number of routers (vm-201..).
    pub routers: u16,
    /// Number of testers (vm-221..).
    pub testers: u16,
    /// Memory per VM in MiB.
    pub mem_mb: u32,
    /// Memory of particular VMs in MiB (`--mem vm-001=1024`).
    pub mem_overrides: Vec<(VmId, u32)>,
    /// vCPUs of particular VMs (`--cpus vm-201=2`).
    pub cpus_overrides: Vec<(VmId, u32)>,
    /// Network backend.
    pub net: NetBackend,
    /// vCPUs per VM.
    pub cpus: u32,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// Wait for every VM to report ready, at most this long.
    pub wait: Option<Duration>,
    /// Boot through UEFI (OVMF) from the image's ESP instead of direct kernel boot.
    pub uefi: bool,
    /// A ready overlay cdrom for every VM.
    pub cdrom: Option<PathBuf>,
    /// Overlays to put on a cdrom made for this cluster (`kimg mkcdrom`).
    pub overlays: Vec<String>,
    /// Extra overlay search directories.
    pub ovlpath: Vec<PathBuf>,
    /// Extra kernel command line of every VM, after kimg's own words (direct kernel
    /// boot only).
    pub append: String,
}

/// Progress events of `run`, for the CLI to print.
#[derive(Debug, Clone)]
pub enum RunEvent {
    /// An old cluster of the same name was stopped first.
    Replaced,
    /// The accelerator was chosen.
    Accel(Accel),
    /// A VM's QEMU was started.
    Started(VmId),
    /// A VM answered ready (or degraded) after this long.
    Ready(VmId, BootState, Duration),
}

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
fn lock(name: &str) -> Result<Flock<fs::File>, ClusterError> {
    let root = runtime_root();
    fs::create_dir_all(&root).map_err(io_err(&root))?;
    let path = root.join(format!("{name}.lock"));
    let file = fs::File::create(&path).map_err(io_err(&path))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock)
        .map_err(|_| ClusterError::Locked(name.to_string(), path))
}

/// Starts a cluster (stopping a running one of the same name first).
pub fn run(
    opts: &RunOptions,
    on_event: &(dyn Fn(RunEvent) + Sync),
) -> Result<ClusterState, ClusterError> {
    let dir = cluster_dir(&opts.name)?;
    let size = ClusterSize {
        nodes: opts.nodes,
        routers: opts.routers,
        testers: opts.testers,
    };
    let ids = vm_ids(&size).map_err(|why| ClusterError::Image {
        path: opts.image.clone(),
        why,
    })?;
    let image = fs::canonicalize(&opts.image).map_err(|e| ClusterError::Image {
        path: opts.image.clone(),
        why: format!("{e} (build one with `kimg build`)"),
    })?;
    let manifest = read_manifest(&image)?;
    let _lock = lock(&opts.name)?;
    if dir.exists() {
        stop_locked(&opts.name, &dir, Duration::from_secs(10))?;
        on_event(RunEvent::Replaced);
    }
    // Sockets and files of the cluster are the user's alone (agent socket 0600).
    let old_umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let result = start(opts, &dir, &image, &manifest, &ids, size, on_event);
    nix::sys::stat::umask(old_umask);
    let state = match result {
        Ok(state) => state,
        Err(e) => {
            // Leave nothing half-started behind.
            let _ = stop_locked(&opts.name, &dir, Duration::from_secs(2));
            return Err(e);
        }
    };
    if let Some(limit) = opts.wait {
        wait_ready(&dir, &state, limit, on_event)?;
    }
    Ok(state)
}

fn start(
    opts: &RunOptions,
    dir: &Path,
    image: &Path,
    manifest: &Manifest,
    ids: &[VmId],
    size: ClusterSize,
    on_event: &(dyn Fn(RunEvent) + Sync),
) -> Result<ClusterState, ClusterError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let files = boot_files(image, manifest, dir)?;
    let api_port = if manifest.flavour == kimg_contract::k8s::FLAVOUR {
        Some(crate::pki::free_port().map_err(io_err(dir))?)
    } else {
        None
    };
    let cdrom = cluster_cdrom(opts, dir, manifest, &size, api_port)?;
    let accel = accel::choose(opts.accel, qemu::QEMU, dir).map_err(ClusterError::Accel)?;
    on_event(RunEvent::Accel(accel));
    let state = ClusterState {
        name: opts.name.clone(),
        image: image.to_path_buf(),
        accel,
        uefi: opts.uefi,
        cdrom,
        append: opts.append.clone(),
        overlays: opts.overlays.clone(),
        ovlpath: opts.ovlpath.clone(),
        started: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        vms: ids
            .iter()
            .map(|&vm| VmRecord {
                vm,
                mem_mb: opts
                    .mem_overrides
                    .iter()
                    .rev()
                    .find(|(v, _)| *v == vm)
                    .map_or(opts.mem_mb, |(_, m)| *m),
                cpus: opts
                    .cpus_overrides
                    .iter()
                    .rev()
                    .find(|(v, _)| *v == vm)
                    .map_or(opts.cpus, |(_, c)| *c),
            })
            .collect(),
        size,
        net: opts.net,
        api_port,
    };
    save(dir, &state)?;
    network::create(state.net, &state.name, dir)?;
    start_vms(
        dir,
        &state,
        &state.vms,
        &files,
        &manifest.kernel.cmdline,
        on_event,
    )?;
    Ok(state)
}

/// The kernel and initramfs for direct boot, read out of the image's ESP once and
/// kept in the cache under their sha256s from the manifest (reading the ESP costs
/// about a quarter of a second, every `kimg run`). An image whose manifest lacks the
/// digests gets them extracted into the cluster dir instead.
fn boot_files(image: &Path, manifest: &Manifest, dir: &Path) -> Result<Vec<PathBuf>, ClusterError> {
    let esp = [
        manifest.kernel.esp_kernel.as_str(),
        manifest.kernel.esp_initrd.as_str(),
    ];
    let digest = |name: &str| manifest.component(name).map(|c| c.sha256.clone());
    let (Some(k), Some(i)) = (digest("kernel"), digest("initramfs")) else {
        let boot = dir.join("boot");
        return Ok(kimg_formats::disk::extract_esp_files(image, &esp, &boot)?);
    };
    let short = |h: &str| h.chars().take(16).collect::<String>();
    let cached =
        kimg_util::cache::cache_dir()
            .join("boot")
            .join(format!("{}-{}", short(&k), short(&i)));
    let names: Vec<PathBuf> = esp
        .iter()
        .map(|p| cached.join(Path::new(p).file_name().unwrap_or_default()))
        .collect();
    if names.iter().all(|n| n.is_file()) {
        return Ok(names);
    }
    let parent = cached.parent().unwrap_or(dir);
    fs::create_dir_all(parent).map_err(io_err(parent))?;
    let tmp = tempfile::Builder::new()
        .prefix(".boot-")
        .tempdir_in(parent)
        .map_err(io_err(parent))?;
    let got = kimg_formats::disk::extract_esp_files(image, &esp, tmp.path())?;
    for (file, want) in got.iter().zip([&k, &i]) {
        let (sha, _) = kimg_util::hash::file_sha256(file).map_err(io_err(file))?;
        if &sha != want {
            return Err(ClusterError::Image {
                path: image.to_path_buf(),
                why: format!(
                    "{} on its ESP does not match the manifest's sha256",
                    file.display()
                ),
            });
        }
    }
    // Another kimg may have won the race: its copy is as good as ours.
    if fs::rename(tmp.path(), &cached).is_err() && !names.iter().all(|n| n.is_file()) {
        return Err(ClusterError::Io {
            path: cached,
            source: io::Error::other("could not place the extracted boot files"),
        });
    }
    Ok(names)
}

/// Writes `cluster.json` whole (temporary file, then rename).
fn save(dir: &Path, state: &ClusterState) -> Result<(), ClusterError> {
    let state_path = dir.join(STATE_FILE);
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let json = serde_json::to_string_pretty(state).unwrap_or_default();
    fs::write(&tmp, json).map_err(io_err(&tmp))?;
    fs::rename(&tmp, &state_path).map_err(io_err(&state_path))
}

/// Starts `vms` of the cluster in parallel; the first failure is reported.
fn start_vms(
    dir: &Path,
    state: &ClusterState,
    vms: &[VmRecord],
    files: &[PathBuf],
    base_cmdline: &str,
    on_event: &(dyn Fn(RunEvent) + Sync),
) -> Result<(), ClusterError> {
    let image = state.image.as_path();
    let accel = state.accel;
    std::thread::scope(|s| {
        let handles: Vec<_> = vms
            .iter()
            .map(|rec| {
                let spec = VmSpec {
                    vm: rec.vm,
                    mem_mb: rec.mem_mb,
                    cpus: rec.cpus,
                    accel,
                    kernel: files[0].clone(),
                    initrd: files[1].clone(),
                    cmdline: vm_cmdline(base_cmdline, rec.vm, state),
                    cdrom: state.cdrom.clone(),
                    uefi: state.uefi,
                };
                s.spawn(move || {
                    start_vm(dir, image, &spec, state)
                        .map(|()| on_event(RunEvent::Started(spec.vm)))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(ClusterError::Accel("VM start thread panicked".into())))
            })
            .collect::<Result<Vec<()>, _>>()
    })?;
    Ok(())
}

/// The cdrom every VM gets: the given one, or one made from the overlays.
fn cluster_cdrom(
    opts: &RunOptions,
    dir: &Path,
    manifest: &Manifest,
    size: &ClusterSize,
    api_port: Option<u16>,
) -> Result<Option<PathBuf>, ClusterError> {
    let k8s = manifest.flavour == kimg_contract::k8s::FLAVOUR;
    if k8s && opts.cdrom.is_some() {
        return Err(ClusterError::Cdrom(
            "a k8s image gets its per-cluster PKI on the cdrom kimg makes: name the overlays instead of --cdrom".into(),
        ));
    }
    if let Some(c) = &opts.cdrom {
        return fs::canonicalize(c)
            .map(Some)
            .map_err(|e| ClusterError::Cdrom(format!("--cdrom {}: {e}", c.display())));
    }
    if opts.overlays.is_empty() && !k8s {
        return Ok(None);
    }
    // The generated PKI goes first, so any later overlay may replace a file of it.
    let pki = if k8s {
        Some(crate::pki::generate(dir, size, api_port)?)
    } else {
        None
    };
    let out = dir.join("cdrom.iso");
    make_cdrom(&out, pki, &opts.overlays, &opts.ovlpath)?;
    Ok(Some(out))
}

/// Writes a cdrom at `out`: `first` (the PKI), then the named overlays.
fn make_cdrom(
    out: &Path,
    first: Option<kimg_image::overlay::Overlay>,
    overlays: &[String],
    ovlpath: &[PathBuf],
) -> Result<(), ClusterError> {
    let path = kimg_image::overlay::search_path(ovlpath);
    kimg_image::overlay::resolve(overlays, &path)
        .map(|ovs| first.into_iter().chain(ovs).collect::<Vec<_>>())
        .and_then(|ovs| kimg_image::overlay::mkcdrom(out, &ovs))
        .map(|_| ())
        .map_err(|e| ClusterError::Cdrom(e.to_string()))
}

/// For nodes added to a Kubernetes cluster: their kubelet credentials from the
/// cluster's CA, and a new cdrom (the PKI, then the cluster's overlays, resolved
/// again) that they get instead of the first one.
fn k8s_scaleout_cdrom(
    dir: &Path,
    state: &ClusterState,
    added: &[VmRecord],
) -> Result<PathBuf, ClusterError> {
    let nodes: Vec<VmId> = added
        .iter()
        .map(|r| r.vm)
        .filter(|vm| vm.role() == Role::Node)
        .collect();
    let pki = crate::pki::add_nodes(dir, &nodes)?;
    let first = added.first().map_or(0, |r| r.vm.number());
    let out = dir.join(format!("cdrom-{first:03}.iso"));
    make_cdrom(&out, Some(pki), &state.overlays, &state.ovlpath)?;
    Ok(out)
}

/// A VM's kernel command line: the image's, what the launcher tells the VM, then
/// the user's `--append` (last, so that it wins).
fn vm_cmdline(base: &str, vm: VmId, state: &ClusterState) -> String {
    // no_timer_check: under TCG on a busy host the kernel's IO-APIC timer check can
    // miss ticks and panic ("IO-APIC + timer doesn't work!"), seen when many VMs
    // boot at once on 2 cores.
    let mut line = with_size(&with_hostname(base, &vm.hostname()), &state.size) + " no_timer_check";
    if state.cdrom.is_some() {
        line = with_cdrom(&line);
    }
    match state.append.trim() {
        "" => line,
        extra => format!("{line} {extra}"),
    }
}

fn start_vm(
    dir: &Path,
    image: &Path,
    spec: &VmSpec,
    state: &ClusterState,
) -> Result<(), ClusterError> {
    let paths = VmPaths::new(dir, spec.vm);
    fs::create_dir_all(&paths.dir).map_err(io_err(&paths.dir))?;
    cmd::run(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(image)
            .arg(paths.disk()),
    )?;
    if spec.uefi {
        // UEFI writes its variables: every VM gets its own store.
        let vars = paths.efi_vars();
        fs::copy(qemu::OVMF_VARS, &vars).map_err(|source| ClusterError::Io {
            path: PathBuf::from(qemu::OVMF_VARS),
            source: io::Error::new(
                source.kind(),
                format!("{source} (--uefi needs OVMF: apt-get install ovmf)"),
            ),
        })?;
    }
    let mut qemu = qemu::command(spec, &paths);
    qemu.args(network::attach(state.net, &state.name, dir, spec.vm)?);
    if let Some(port) = state.api_port.filter(|_| spec.vm.number() == 1) {
        qemu.args(crate::pki::api_forward_args(port));
    }
    cmd::run(&mut network::wrap(state.net, &state.name, qemu))?;
    // QEMU's -daemonize sets umask 027 before creating the sockets: tighten them.
    for sock in [paths.agent(), paths.console()] {
        fs::set_permissions(&sock, fs::Permissions::from_mode(0o600)).map_err(io_err(&sock))?;
    }
    Ok(())
}

/// Reads a cluster's state file.
pub fn load(name: &str) -> Result<(PathBuf, ClusterState), ClusterError> {
    let dir = cluster_dir(name)?;
    let path = dir.join(STATE_FILE);
    let text = fs::read_to_string(&path).map_err(|_| ClusterError::NotFound(name.to_string()))?;
    let state = serde_json::from_str(&text).map_err(|e| ClusterError::Io {
        path: path.clone(),
        source: io::Error::new(io::ErrorKind::InvalidData, e),
    })?;
    Ok((dir, state))
}

/// The pid of a VM's QEMU if it is still running.
pub fn qemu_pid(paths: &VmPaths) -> Option<Pid> {
    let pid: i32 = fs::read_to_string(paths.pidfile())
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // Guard against pid reuse: the process must still be a QEMU.
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (comm.starts_with("qemu") && alive(pid)).then_some(Pid::from_raw(pid))
}

/// Whether process `pid` exists and is not a zombie (a killed daemon whose parent,
/// e.g. a container's PID 1, does not reap keeps its /proc entry).
pub fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest.trim_start());
        !(state.starts_with('Z') || state.starts_with('X'))
    })
}

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

fn wait_ready(
    dir: &Path,
    state: &ClusterState,
    limit: Duration,
    on_event: &(dyn Fn(RunEvent) + Sync),
) -> Result<(), ClusterError> {
    let start = Instant::now();
    let deadline = start + limit;
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

/// Asks the agent for its status until it reports ready/degraded or time runs out.
fn poll_ready(paths: &VmPaths, deadline: Instant) -> Result<BootState, String> {
    loop {
        if qemu_pid(paths).is_none() {
            return Err("QEMU exited".into());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("no ready report before the timeout".into());
        }
        match agent::request(&paths.agent(), Op::Status, left.min(Duration::from_secs(2))) {
            Ok(Reply::Status(st)) if st.state != BootState::Booting => return Ok(st.state),
            Ok(_) | Err(AgentError::Timeout(_)) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
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
    /// Last console lines of a dead VM.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub last_console: Vec<String>,
}

/// Queries every VM of a cluster.
pub fn status(name: &str) -> Result<(ClusterState, Vec<VmStatus>), ClusterError> {
    let (dir, state) = load(name)?;
    let list = std::thread::scope(|s| {
        let handles: Vec<_> = state
            .vms
            .iter()
            .map(|rec| {
                let dir = &dir;
                s.spawn(move || {
                    let paths = VmPaths::new(dir, rec.vm);
                    let mut st = VmStatus {
                        vm: rec.vm,
                        role: rec.vm.role(),
                        state: "booting".into(),
                        agent: None,
                        last_console: Vec::new(),
                    };
                    if qemu_pid(&paths).is_none() {
                        st.state = "dead".into();
                        st.last_console = console_tail(&paths, 10);
                    } else if let Ok(Reply::Status(a)) =
                        agent::request(&paths.agent(), Op::Status, Duration::from_secs(3))
                    {
                        st.state = serde_json::to_value(a.state)
                            .ok()
                            .and_then(|v| v.as_str().map(String::from))
                            .unwrap_or_default();
                        st.agent = Some(a);
                    }
                    st
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    Ok((state, list))
}

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

fn stop_locked(name: &str, dir: &Path, grace: Duration) -> Result<StopReport, ClusterError> {
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
    fs::remove_dir_all(dir).map_err(io_err(dir))?;
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
    if manifest.flavour == kimg_contract::k8s::FLAVOUR && !added.is_empty() {
        state.cdrom = Some(k8s_scaleout_cdrom(&dir, &state, &added)?);
    }
    let old_umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let result = start_vms(
        &dir,
        &state,
        &added,
        &files,
        &manifest.kernel.cmdline,
        on_event,
    );
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
        fs::remove_dir_all(&paths.dir).map_err(io_err(&paths.dir))?;
    }
    state.vms.retain(|r| !vms.contains(&r.vm));
    save(&dir, &state)?;
    Ok(report)
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
