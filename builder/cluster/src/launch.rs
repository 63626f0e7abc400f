//! `kimg run`: a cluster's directory, cdrom and networks, then one QEMU per VM, all
//! started in parallel; optionally waits until the cluster is ready (`--wait`).

use crate::accel::{self, Accel, AccelChoice};
use crate::addon::{self, Addon};
use crate::bootfiles::boot_files;
use crate::capacity;
use crate::cpu_share;
use crate::error::ClusterError;
use crate::health::{poll_ready, wait_for, Wait};
use crate::ksm;
use crate::network::{self, NetBackend};
use crate::ops::stop_locked;
use crate::process;
use crate::qemu::{self, Machine, VmPaths, VmSpec};
use crate::state::{cluster_dir, lock, read_manifest, save, vm_ids, ClusterState, VmRecord};
use kimg_contract::agent::BootState;
use kimg_contract::cmdline::{with_cdrom, with_hostname, with_size};
use kimg_contract::manifest::Manifest;
use kimg_contract::net::ClusterSize;
use kimg_contract::VmId;
use kimg_util::cmd;
use kimg_util::fs::{IoError, PathContext};
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long a slot of the boot window waits for its VM's boot when no `--wait`
/// says (then the start goes on with the next VM).
pub const BOOT_LIMIT: Duration = Duration::from_secs(300);

/// How long a slot of the boot window waits for its VM's boot: `--wait`'s seconds
/// when given, else [`BOOT_LIMIT`] (a flavour's longer default wait, such as
/// Kubernetes' control plane, is for after the boots, not for each VM's).
pub(crate) fn boot_limit(wait: Option<Wait>) -> Duration {
    wait.and_then(|w| w.limit).unwrap_or(BOOT_LIMIT)
}

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
    /// Memory per VM in MiB; `None`: the flavour's default for each VM
    /// ([`Addon::default_size`](crate::addon::Addon::default_size)).
    pub mem_mb: Option<u32>,
    /// Memory of particular VMs in MiB (`--mem vm-001=1024`).
    pub mem_overrides: Vec<(VmId, u32)>,
    /// vCPUs of particular VMs (`--cpus vm-201=2`).
    pub cpus_overrides: Vec<(VmId, u32)>,
    /// Network backend.
    pub net: NetBackend,
    /// vCPUs per VM; `None`: the flavour's default for each VM.
    pub cpus: Option<u32>,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// Wait until the cluster is ready (or its VMs alone are).
    pub wait: Option<Wait>,
    /// Boot through UEFI (OVMF) from the image's ESP instead of direct kernel boot.
    pub uefi: bool,
    /// The QEMU machine; `None`: q35 (see [`choose_machine`]).
    pub machine: Option<Machine>,
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

impl RunOptions {
    /// The cluster's size by role.
    pub fn size(&self) -> ClusterSize {
        ClusterSize {
            nodes: self.nodes,
            routers: self.routers,
            testers: self.testers,
        }
    }
}

/// Progress events of `run`, for the CLI to print.
#[derive(Debug, Clone)]
pub enum RunEvent {
    /// An old cluster of the same name was stopped first.
    Replaced,
    /// The accelerator and machine were chosen.
    Accel(Accel, Machine),
    /// A big cluster had kernel same-page merging checked (and turned on if it was
    /// off) before its VMs started ([`ksm::share_pages_of`]).
    Ksm(ksm::KsmOutcome),
    /// A VM's QEMU was started.
    Started(VmId),
    /// A VM answered ready (or degraded) after this long.
    Ready(VmId, BootState, Duration),
    /// The wait goes on for what the flavour means by ready, checked on a VM: what
    /// (e.g. the Kubernetes control plane's checks).
    Waiting(VmId, String),
    /// One of those checks passed on a VM after this long (since the wait began).
    Passed(VmId, String, Duration),
    /// How far the start is: VMs started, VMs whose boot is over (when the cluster
    /// boots in a window of VMs at a time; else 0), of all.
    Progress {
        /// QEMUs started.
        started: usize,
        /// Of them, booted (ready, degraded or gone).
        booted: usize,
        /// VMs to start.
        total: usize,
    },
}

/// Starts a cluster (stopping a running one of the same name first).
pub fn run(
    opts: &RunOptions,
    on_event: &(dyn Fn(RunEvent) + Sync),
) -> Result<ClusterState, ClusterError> {
    let dir = cluster_dir(&opts.name)?;
    let ids = vm_ids(&opts.size()).map_err(|why| ClusterError::Image {
        path: opts.image.clone(),
        why,
    })?;
    let image = fs::canonicalize(&opts.image).map_err(|e| ClusterError::Image {
        path: opts.image.clone(),
        why: format!("{e} (build one with `kimg build`)"),
    })?;
    let manifest = read_manifest(&image)?;
    // Refused before anything runs (or an old cluster of the name is stopped).
    let machine = choose_machine(opts.machine, opts.uefi, &image, &manifest)?;
    let _lock = lock(&opts.name)?;
    if dir.exists() {
        stop_locked(&opts.name, &dir, Duration::from_secs(10))?;
        on_event(RunEvent::Replaced);
    }
    // Sockets and files of the cluster are the user's alone (agent socket 0600).
    let old_umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let result = start(opts, &dir, &image, &manifest, machine, &ids, on_event);
    nix::sys::stat::umask(old_umask);
    let state = match result {
        Ok(state) => state,
        Err(e) => {
            // Leave nothing half-started behind.
            let _ = stop_locked(&opts.name, &dir, Duration::from_secs(2));
            return Err(e);
        }
    };
    if let Some(wait) = opts.wait {
        wait_for(&dir, &state, wait, on_event)?;
    }
    Ok(state)
}

fn start(
    opts: &RunOptions,
    dir: &Path,
    image: &Path,
    manifest: &Manifest,
    machine: Machine,
    ids: &[VmId],
    on_event: &(dyn Fn(RunEvent) + Sync),
) -> Result<ClusterState, ClusterError> {
    fs::create_dir_all(dir).with_path(dir)?;
    let files = boot_files(image, manifest, dir)?;
    let addon = addon::of(manifest.flavour);
    let accel = accel::choose(opts.accel, qemu::QEMU, dir).map_err(ClusterError::Accel)?;
    on_event(RunEvent::Accel(accel, machine));
    let mut state = ClusterState {
        name: opts.name.clone(),
        image: image.to_path_buf(),
        accel,
        uefi: opts.uefi,
        machine,
        cdrom: None,
        append: opts.append.clone(),
        overlays: opts.overlays.clone(),
        ovlpath: opts.ovlpath.clone(),
        started: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        vms: ids.iter().map(|&vm| vm_record(opts, addon, vm)).collect(),
        size: opts.size(),
        net: opts.net,
        api_port: None,
        restored_from: None,
        applied: Vec::new(),
    };
    addon.prepare(&mut state)?;
    addon.generate(dir, &state)?;
    if let Some(c) = &opts.cdrom {
        if !addon.takes_ready_cdrom() {
            return Err(ClusterError::Usage(
                "a k8s image gets its per-cluster PKI on the cdroms kimg makes: name the overlays instead of --cdrom".into(),
            ));
        }
        state.cdrom = Some(fs::canonicalize(c).with_path(c)?);
    }
    capacity::check_memory(&state.vms)?;
    if let Some(ksm) = ksm::share_pages_of(state.vms.len()) {
        on_event(RunEvent::Ksm(ksm));
    }
    make_cdroms(dir, &mut state, addon, ids, true)?;
    save(dir, &state)?;
    network::create(state.net, &state.name, dir)?;
    let limit = boot_limit(opts.wait);
    start_vms(dir, &state, &state.vms, &files, manifest, limit, on_event)?;
    Ok(state)
}

/// The machine of a cluster: the one asked for if it can boot the image, else q35.
/// microvm is asked for, not the default: the whole end-to-end suite has not run on
/// it yet (snapshots, apply, Kubernetes), and UEFI needs q35 (OVMF is a PC firmware).
pub fn choose_machine(
    asked: Option<Machine>,
    uefi: bool,
    image: &Path,
    manifest: &Manifest,
) -> Result<Machine, ClusterError> {
    match (asked, uefi) {
        (Some(Machine::Microvm), true) => Err(ClusterError::Usage(
            "--uefi boots through OVMF, a PC firmware that needs --machine q35".into(),
        )),
        (Some(Machine::Microvm), false) if !manifest.kernel.mmio => Err(ClusterError::Image {
            path: image.to_path_buf(),
            why: "its initramfs does not load virtio_mmio (built by an older kimg), so it cannot boot on microvm: rebuild it with `kimg build`, or use --machine q35".into(),
        }),
        (Some(m), _) => Ok(m),
        (None, _) => Ok(Machine::Q35),
    }
}

/// A VM's memory and vCPUs: the last `--mem`/`--cpus` naming it, else the one for
/// every VM, else the flavour's default for it.
fn vm_record(opts: &RunOptions, addon: &dyn Addon, vm: VmId) -> VmRecord {
    let pick = |overrides: &[(VmId, u32)], all: Option<u32>, default: u32| {
        overrides
            .iter()
            .rev()
            .find(|(v, _)| *v == vm)
            .map(|(_, x)| *x)
            .or(all)
            .unwrap_or(default)
    };
    let default = addon.default_size(vm);
    VmRecord {
        vm,
        mem_mb: pick(&opts.mem_overrides, opts.mem_mb, default.mem_mb),
        cpus: pick(&opts.cpus_overrides, opts.cpus, default.cpus),
    }
}

/// Starts `vms` of the cluster: all at once when they fit in the boot window
/// ([`capacity::boot_window`]), else that many at a time, each slot taking the next
/// VM once its VM has booted (ready, degraded or gone, at most `limit`). The first
/// failure to start stops the starting and is reported.
pub(crate) fn start_vms(
    dir: &Path,
    state: &ClusterState,
    vms: &[VmRecord],
    files: &[PathBuf],
    manifest: &Manifest,
    limit: Duration,
    on_event: &(dyn Fn(RunEvent) + Sync),
) -> Result<(), ClusterError> {
    let image = state.image.as_path();
    let accel = state.accel;
    let addon = addon::of(manifest.flavour);
    let base_cmdline = manifest.kernel.cmdline.as_str();
    let window = capacity::boot_window(vms);
    let paced = vms.len() > window;
    let next = AtomicUsize::new(0);
    let (started, booted) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let failure: Mutex<Option<ClusterError>> = Mutex::new(None);
    let failed = || failure.lock().map_or(true, |f| f.is_some());
    let progress = || {
        on_event(RunEvent::Progress {
            started: started.load(Ordering::SeqCst),
            booted: booted.load(Ordering::SeqCst),
            total: vms.len(),
        })
    };
    let slot = || {
        while !failed() {
            let Some(rec) = vms.get(next.fetch_add(1, Ordering::SeqCst)) else {
                return;
            };
            let cdrom = vm_cdrom(dir, state, rec.vm);
            let spec = VmSpec {
                vm: rec.vm,
                mem_mb: rec.mem_mb,
                cpus: rec.cpus,
                accel,
                machine: state.machine,
                code: addon.guest_code(),
                kernel: files[0].clone(),
                initrd: files[1].clone(),
                cmdline: vm_cmdline(base_cmdline, rec.vm, state, cdrom.is_some()),
                cdrom,
                uefi: state.uefi,
            };
            if let Err(e) = start_vm(dir, image, &spec, state, addon) {
                if let Ok(mut f) = failure.lock() {
                    f.get_or_insert(e);
                }
                return;
            }
            started.fetch_add(1, Ordering::SeqCst);
            on_event(RunEvent::Started(spec.vm));
            if paced {
                // Whether it made it is for the wait for ready to tell: the slot
                // only needs the boot over.
                let _ = poll_ready(&VmPaths::new(dir, rec.vm), process::deadline(limit));
                booted.fetch_add(1, Ordering::SeqCst);
            }
            progress();
        }
    };
    std::thread::scope(|s| {
        for _ in 0..window.min(vms.len()) {
            s.spawn(slot);
        }
    });
    match failure.into_inner() {
        Ok(None) => Ok(()),
        Ok(Some(e)) => Err(e),
        Err(_) => Err(ClusterError::Panicked("a VM's start thread")),
    }
}

/// Makes the cdroms of `vms`: `vm-NNN/cdrom.iso` for each VM the add-on gives an
/// overlay of its own (that overlay first, so a later one may replace a file of
/// it, then the cluster's overlays), and with `shared` the cluster's cdrom of its
/// overlays alone for the others (unless one was given, or there are none). The
/// cluster's overlays are rendered once when several cdroms carry them. Secrets
/// never go on the shared cdrom: each VM sees only its own.
pub(crate) fn make_cdroms(
    dir: &Path,
    state: &mut ClusterState,
    addon: &dyn Addon,
    vms: &[VmId],
    shared: bool,
) -> Result<(), ClusterError> {
    let mut own = Vec::new();
    for &vm in vms {
        if let Some(first) = addon.first_overlay(dir, vm)? {
            own.push((vm, first));
        }
    }
    let path = kimg_image::overlay::search_path(&state.ovlpath)?;
    let mut ovs = kimg_image::overlay::resolve(&state.overlays, &path)?;
    if !own.is_empty() && !ovs.is_empty() {
        ovs = kimg_image::overlay::render(&ovs, &dir.join("overlays"))?;
    }
    if shared && state.cdrom.is_none() && !ovs.is_empty() {
        let out = dir.join("cdrom.iso");
        kimg_image::overlay::mkcdrom(&out, &ovs)?;
        state.cdrom = Some(out);
    }
    for (vm, first) in own {
        let paths = VmPaths::new(dir, vm);
        fs::create_dir_all(&paths.dir).with_path(&paths.dir)?;
        let all: Vec<_> = std::iter::once(first).chain(ovs.iter().cloned()).collect();
        kimg_image::overlay::mkcdrom(&paths.cdrom(), &all)?;
    }
    Ok(())
}

/// The cdrom `vm` boots with: its own, else the cluster's (if any).
fn vm_cdrom(dir: &Path, state: &ClusterState, vm: VmId) -> Option<PathBuf> {
    let own = VmPaths::new(dir, vm).cdrom();
    if own.is_file() {
        Some(own)
    } else {
        state.cdrom.clone()
    }
}

/// A VM's kernel command line: the image's, what the launcher tells the VM, then
/// the user's `--append` (last, so that it wins).
pub(crate) fn vm_cmdline(base: &str, vm: VmId, state: &ClusterState, cdrom: bool) -> String {
    // no_timer_check: under TCG on a busy host the kernel's IO-APIC timer check can
    // miss ticks and panic ("IO-APIC + timer doesn't work!"), seen when many VMs
    // boot at once on 2 cores. An idle VM then wakes only for work: no lockup
    // detector timers, no proactive compaction every 500 ms. Under TCG every wakeup
    // is host CPU: with these and tsc=reliable, 10 idle VMs took 0.12% of a core
    // each, not 0.38%.
    let mut line = with_size(&with_hostname(base, &vm.hostname()), &state.size)
        + " no_timer_check nowatchdog sysctl.vm.compaction_proactiveness=0";
    let clock = crate::qemu::clock_cmdline(state.accel);
    if !clock.is_empty() {
        line = format!("{line} {clock}");
    }
    if cdrom {
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
    addon: &dyn Addon,
) -> Result<(), ClusterError> {
    let paths = VmPaths::new(dir, spec.vm);
    fs::create_dir_all(&paths.dir).with_path(&paths.dir)?;
    cmd::run(
        cmd::command("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(image)
            .arg(paths.disk()),
    )?;
    if spec.uefi {
        // UEFI writes its variables: every VM gets its own store.
        let vars = paths.efi_vars();
        fs::copy(qemu::OVMF_VARS, &vars).map_err(|source| {
            IoError::new(
                PathBuf::from(qemu::OVMF_VARS),
                io::Error::new(
                    source.kind(),
                    format!("{source} (--uefi needs OVMF: apt-get install ovmf)"),
                ),
            )
        })?;
    }
    spawn_qemu(dir, &paths, spec, state, addon, &[])
}

/// Starts `spec`'s QEMU daemonized, `extra` arguments added (a restore's
/// `-incoming`): on the cluster's networks with the add-on's devices, without
/// huge pages if the VM is lean; then records which process it is and makes its
/// sockets the owner's alone. Shared by a fresh start and a restore.
pub(crate) fn spawn_qemu(
    dir: &Path,
    paths: &VmPaths,
    spec: &VmSpec,
    state: &ClusterState,
    addon: &dyn Addon,
    extra: &[String],
) -> Result<(), ClusterError> {
    let mut qemu = qemu::command(spec, paths);
    qemu.args(extra);
    qemu.args(network::attach(
        state.net,
        &state.name,
        dir,
        spec.vm,
        state.machine,
    )?);
    qemu.args(addon.qemu_args(spec.vm, state));
    let mut qemu = network::wrap(state.net, &state.name, qemu);
    if spec.lean() {
        qemu::without_huge_pages(&mut qemu);
    }
    let max_cpus = state.vms.iter().map(|r| r.cpus).fold(spec.cpus, u32::max);
    let nice = cpu_share::nice(spec.cpus, max_cpus);
    cpu_share::lower_threads(&mut qemu, nice);
    cmd::run(&mut qemu)?;
    // QEMU wrote its pid file before daemonizing returned: record who it is.
    let pid = crate::process::record_start(&paths.pidfile())?;
    cpu_share::set_session_nice(pid, nice);
    // QEMU's -daemonize sets umask 027 before creating the sockets: tighten them.
    let sessions = (0..kimg_contract::agent::SESSION_PORTS).map(|k| paths.session_socket(k));
    for sock in [paths.agent(), paths.console(), paths.qmp()]
        .into_iter()
        .chain(sessions)
    {
        fs::set_permissions(&sock, fs::Permissions::from_mode(0o600)).with_path(&sock)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kimg_contract::Flavour;

    #[test]
    fn a_vm_is_sized_by_its_own_flag_then_every_vms_then_the_flavour() {
        let vm = |n| VmId::new(n).unwrap();
        let size = |o: &RunOptions, flavour, n| {
            let r = vm_record(o, addon::of(flavour), vm(n));
            (r.mem_mb, r.cpus)
        };
        let mut o = RunOptions::default();
        assert_eq!(size(&o, Flavour::Base, 1), (384, 1));
        assert_eq!(size(&o, Flavour::K8s, 1), (2048, 2));
        assert_eq!(size(&o, Flavour::K8s, 2), (1536, 1));
        assert_eq!(size(&o, Flavour::K8s, 201), (384, 1));
        o.mem_mb = Some(1024);
        o.cpus_overrides = vec![(vm(2), 3)];
        assert_eq!(size(&o, Flavour::K8s, 1), (1024, 2));
        assert_eq!(size(&o, Flavour::K8s, 2), (1024, 3));
    }

    #[test]
    fn the_memory_levers_are_for_small_base_vms_not_kubernetes() {
        // Each flavour's VMs at their default sizes.
        let lean = |flavour, n| {
            let r = vm_record(
                &RunOptions::default(),
                addon::of(flavour),
                VmId::new(n).unwrap(),
            );
            qemu::lean(r.mem_mb, r.cpus, addon::of(flavour).guest_code())
        };
        assert!(lean(Flavour::Base, 1));
        assert!(lean(Flavour::Base, 201));
        // Every VM of a Kubernetes image, its routers given little memory too.
        assert!(!lean(Flavour::K8s, 1));
        assert!(!lean(Flavour::K8s, 2));
        assert!(!lean(Flavour::K8s, 201));
    }
}
