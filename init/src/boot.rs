//! The boot, step by step: stage 1 (initramfs) and stage 2 (root filesystem).
//!
//! One static binary, two stages. As `/init` in the initramfs (the builder puts
//! [`kimg_contract::boot::STAGE1_MARKER`] there) it mounts the kernel filesystems, loads the modules needed
//! to reach the disk, finds the root partition and switches to it. As `/sbin/init` on
//! the root filesystem it finishes the mounts, sets the hostname, prints the ready
//! line, serves the agent, reaps and powers off cleanly. It never exits: a fatal
//! failure in stage 1 ends in an emergency shell, any other failure is logged and
//! reported as a problem in the agent's status.

use crate::error::{Context, Result};
use crate::log;
use crate::{
    agent, cni, console, emergency, hooks, modules, mounts, net, overlays, reaper, rootdev,
    services, shutdown, smbios, switchroot, sysctl,
};
use kimg_contract::cmdline::KimgArgs;
use kimg_contract::VmId;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::SignalFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The kernel command line.
pub const PROC_CMDLINE: &str = "/proc/cmdline";
/// Hostname when the command line gives none.
pub const DEFAULT_HOSTNAME: &str = "kimg";
/// Exit code when started as anything but PID 1 (the only exit there is).
pub const EXIT_NOT_PID1: i32 = 2;

/// PID 1's entry: stage 1 in the initramfs, stage 2 on the root; never returns.
pub fn main() -> ! {
    log::install_panic_hook();
    if std::process::id() != 1 {
        eprintln!(
            "kimg-init: not PID 1; this is the init of a kimg VM (initramfs /init and /sbin/init)"
        );
        std::process::exit(EXIT_NOT_PID1);
    }
    if Path::new(kimg_contract::boot::STAGE1_MARKER).exists() {
        stage1()
    } else {
        stage2()
    }
}

/// Failed steps, reported on the console and in the agent's status.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    /// Logs a failed non-fatal step and remembers it.
    fn add(&mut self, step: &str, e: impl std::fmt::Display) {
        error!("{step}: {e}");
        self.0.push(format!("{step}: {e}"));
    }
}

fn stage1() -> ! {
    let mut problems = Problems::default();
    // First, so that /dev/kmsg exists for the log.
    mount_kernel_filesystems(mounts::STAGE1, &mut problems);
    info!("stage 1 (initramfs), version {}", env!("CARGO_PKG_VERSION"));
    let args = read_args(&mut problems);
    load_modules(&mut problems);
    if args.shell {
        emergency::shell("kimg.shell on the kernel command line: stopping before switch_root");
    }
    let root = match rootdev::find(&args.root, rootdev::TIMEOUT) {
        Ok(dev) => dev,
        Err(seen) => fatal(
            "root partition not found",
            &rootdev::report(&args.root, &seen),
            &problems,
        ),
    };
    info!("root is {}", root.display());
    if let Err(e) = switchroot::mount_root(&root) {
        fatal("cannot mount the root partition", &e.to_string(), &problems);
    }
    switchroot::prefetch_stage2();
    if let Err(e) = save_problems(&problems) {
        error!("{e}");
    }
    match switchroot::switch_root() {
        Ok(never) => match never {},
        Err(e) => fatal("switch_root failed", &e.to_string(), &problems),
    }
}

/// Prints what went wrong and what was tried, then runs the emergency shell forever.
fn fatal(what: &str, detail: &str, problems: &Problems) -> ! {
    error!("FATAL: {what}");
    let mut text = format!("FATAL: {what}\n{}\n", detail.trim_end());
    for p in &problems.0 {
        text.push_str(&format!("earlier problem: {p}\n"));
    }
    emergency::shell(&text)
}

fn stage2() -> ! {
    info!(
        "{}, version {}",
        kimg_contract::boot::STAGE2_BANNER,
        env!("CARGO_PKG_VERSION")
    );
    let mut problems = Problems::default();
    problems.0.extend(stage1_problems());
    // Before any thread exists, so that every thread inherits the blocked mask.
    let signals = block_signals()
        .inspect_err(|e| problems.add("signals", e))
        .ok();
    SIGNALS_OK.store(signals.is_some(), Ordering::SeqCst);
    mount_kernel_filesystems(mounts::STAGE2, &mut problems);
    let args = read_args(&mut problems);
    load_modules(&mut problems);
    report_free_pages(&mut problems);
    let hostname = hostname(&args);
    let addresses = network(&hostname, &args, &mut problems);
    if let Err(e) = nix::unistd::sethostname(&hostname) {
        problems.add("hostname", format!("sethostname {hostname}: {e}"));
    }
    if let Err(e) = nix::sys::reboot::set_cad_enabled(false) {
        problems.add("ctrl-alt-del", format!("reboot(RB_DISABLE_CAD): {e}"));
    }
    let overlays = overlays_and_hooks(&args, &hostname, &mut problems);
    for p in sysctl::apply_dir(std::path::Path::new(sysctl::SYSCTL_DIR)) {
        problems.add("sysctl", p);
    }
    start_services(&hostname, &mut problems);
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let ready_secs = agent::uptime();
    // The one line on the console (errors went to kmsg at a level the console shows).
    log::console(&format!("ready in {:.2}s", ready_secs.unwrap_or(0.0)));
    console_shell(&args, &mut problems);
    let state = Arc::new(agent::State {
        hostname,
        kernel,
        ready_secs,
        problems: problems.0,
        addresses,
        overlays,
    });
    if let Err(e) = agent::start(state, request_poweroff) {
        error!("agent: cannot start its thread: {e}");
    }
    supervise(signals)
}

/// Unpacks the overlay cdrom when the launcher attached one, then runs the start hooks.
fn overlays_and_hooks(
    args: &KimgArgs,
    hostname: &str,
    problems: &mut Problems,
) -> Vec<kimg_contract::cdrom::OverlayReport> {
    let mut reports = Vec::new();
    if args.cdrom {
        let (r, failed) = overlays::apply();
        for f in failed {
            problems.add("overlays", f);
        }
        reports = r;
    }
    for f in hooks::run_all(hostname) {
        problems.add("start.d", f);
    }
    reports
}

/// Keeps a root shell on the serial console (after the ready line, which stays the
/// last line kimg-init prints there), unless `kimg.console=off`.
fn console_shell(args: &KimgArgs, problems: &mut Problems) {
    if args.console_off {
        info!("kimg.console=off: no shell on the console");
        return;
    }
    if let Err(e) = console::start() {
        problems.add("console", format!("cannot start the console thread: {e}"));
    }
}

/// Stage 1's problems, handed to stage 2 on /run (a tmpfs that moves into the root).
pub const STAGE1_PROBLEMS: &str = "/run/kimg-init.stage1-problems";

/// Writes stage 1's problems, one per line, for stage 2's status.
fn save_problems(problems: &Problems) -> Result<()> {
    if problems.0.is_empty() {
        return Ok(());
    }
    let text: String = problems
        .0
        .iter()
        .map(|p| format!("stage 1: {p}\n"))
        .collect();
    std::fs::write(STAGE1_PROBLEMS, text).context(|| format!("write {STAGE1_PROBLEMS}"))
}

/// The problems stage 1 left behind, if it ran and had any.
fn stage1_problems() -> Vec<String> {
    std::fs::read_to_string(STAGE1_PROBLEMS)
        .map(|t| t.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Mounts a table; each failure is a problem, none is fatal by itself.
fn mount_kernel_filesystems(table: &[mounts::Mount], problems: &mut Problems) {
    if let Err(errors) = mounts::mount_table(table) {
        for e in errors {
            problems.add("mounts", e);
        }
    }
}

/// The kimg keys of the kernel command line; defaults if it cannot be read.
fn read_args(problems: &mut Problems) -> KimgArgs {
    match std::fs::read_to_string(PROC_CMDLINE).context(|| format!("read {PROC_CMDLINE}")) {
        Ok(line) => KimgArgs::parse(&line),
        Err(e) => {
            problems.add("cmdline", e);
            KimgArgs::default()
        }
    }
}

/// Loads the modules of this stage's modules.load; each failing module is a problem.
fn load_modules(problems: &mut Problems) {
    match modules::load_list(modules::MODULES_LOAD) {
        Ok(loaded) => {
            if loaded.ok > 0 {
                info!(
                    "loaded {} modules from {}",
                    loaded.ok,
                    modules::MODULES_LOAD
                );
            }
            for f in loaded.failed {
                problems.add("module", f);
            }
        }
        Err(e) => problems.add("modules", e),
    }
}

/// Lets the balloon (a stage-2 module) hand small freed blocks back to the host.
fn report_free_pages(problems: &mut Problems) {
    if let Err(e) = modules::report_small_free_blocks() {
        problems.add("page reporting", e);
    }
}

/// The VM's hostname: `kimg.hostname=` from the command line, else from an SMBIOS OEM
/// string (UEFI boots have no launcher command line), else the VM a kimg MAC names
/// (see kimg_contract::net), else [`DEFAULT_HOSTNAME`].
fn hostname(args: &KimgArgs) -> String {
    hostname_or(args, net::vm_from_nics)
}

/// [`hostname`] with the MAC lookup passed in (tests have no kimg NICs).
fn hostname_or(args: &KimgArgs, from_mac: impl FnOnce() -> Option<VmId>) -> String {
    args.hostname
        .clone()
        .or_else(smbios::hostname)
        .or_else(|| from_mac().map(|vm| vm.hostname()))
        .unwrap_or_else(|| DEFAULT_HOSTNAME.to_string())
}

/// Starts the supervisor for the services of this VM (none when the hostname is not
/// a VM name: roles come from the number).
fn start_services(hostname: &str, problems: &mut Problems) {
    let Ok(vm) = hostname.parse::<kimg_contract::VmId>() else {
        return;
    };
    let mut bad = Vec::new();
    let specs = services::load(vm, &mut bad);
    for b in bad {
        problems.add("services", b);
    }
    if let Err(e) = services::start(specs) {
        problems.add(
            "services",
            format!("cannot start the supervisor thread: {e}"),
        );
    }
}

/// Configures the network of the plan for this VM; returns the addresses set. A
/// hostname that is no VM (an image booted without kimg) gets loopback only.
fn network(hostname: &str, args: &KimgArgs, problems: &mut Problems) -> Vec<String> {
    let Ok(vm) = hostname.parse::<VmId>() else {
        info!("hostname {hostname} is no kimg VM: no network plan");
        return Vec::new();
    };
    let size = args.size.unwrap_or_default().including(vm);
    let links = net::wait_for_nics(vm);
    let (addresses, failed) = net::configure(vm, &size, &links);
    for f in failed {
        problems.add("network", f);
    }
    for f in cni::configure(vm, &size, &links) {
        problems.add("pod network", f);
    }
    addresses
}

/// Signals PID 1 handles: children, and the three ways to ask for power off.
const HANDLED: &[Signal] = &[
    Signal::SIGCHLD,
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGPWR,
];

fn block_signals() -> Result<SignalFd> {
    let mut mask = SigSet::empty();
    for s in HANDLED {
        mask.add(*s);
    }
    mask.thread_block().context(|| "block signals")?;
    SignalFd::new(&mask).context(|| "signalfd")
}

/// Whether PID 1's main loop reads signals (else a SIGPWR to itself would be lost).
static SIGNALS_OK: AtomicBool = AtomicBool::new(false);

/// Asks PID 1's main loop to power off (from the agent thread).
fn request_poweroff() {
    if !SIGNALS_OK.load(Ordering::SeqCst) {
        shutdown::power_off("agent request");
    }
    if let Err(e) = nix::sys::signal::kill(nix::unistd::Pid::this(), Signal::SIGPWR) {
        error!("agent: cannot signal poweroff to PID 1: {e}; powering off from here");
        shutdown::power_off("agent request");
    }
}

/// PID 1's main loop: reap on SIGCHLD, power off on SIGTERM/SIGINT/SIGPWR.
fn supervise(signals: Option<SignalFd>) -> ! {
    let Some(sfd) = signals else {
        // Without a signalfd, reap by polling; power off only through the agent.
        loop {
            reaper::REAPER.reap_all();
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    loop {
        match sfd.read_signal() {
            Ok(Some(info)) => match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGCHLD) => {
                    reaper::REAPER.reap_all();
                }
                Ok(Signal::SIGINT) => shutdown::power_off("SIGINT (ctrl-alt-del)"),
                Ok(sig) => shutdown::power_off(&format!("{sig}")),
                Err(_) => {}
            },
            Ok(None) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                error!("signalfd read: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
                reaper::REAPER.reap_all();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostname_from_cmdline_or_default() {
        let args = KimgArgs::parse("console=ttyS0 kimg.hostname=vm-003");
        assert_eq!(hostname(&args), "vm-003");
        let none = KimgArgs::parse("quiet");
        assert_eq!(hostname_or(&none, || None), DEFAULT_HOSTNAME);
        assert_eq!(hostname_or(&none, || VmId::new(202)), "vm-202");
        assert_eq!(hostname_or(&args, || VmId::new(202)), "vm-003");
    }

    #[test]
    fn handled_signals_are_distinct() {
        for (i, s) in HANDLED.iter().enumerate() {
            assert!(!HANDLED[..i].contains(s));
        }
    }
}
