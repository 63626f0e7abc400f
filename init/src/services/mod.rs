//! The service supervisor: starts the services of this VM in dependency order,
//! watches readiness (SIGTERM, then SIGKILL, when it does not come), restarts with
//! back-off, logs to /var/log/NAME.log (rotated at [`LOG_MAX`]) and keeps a status
//! table for the agent. Once power off began nothing is started any more.
//!
//! The decisions are a pure state machine ([`step`]) over an [`Os`] interface, so
//! they are unit-tested; [`RealOs`] does the processes, files and sockets.

use crate::reaper::REAPER;
use kimg_contract::service::{
    start_order, Ready, Restart, ServiceSpec, ServiceState, ServiceStatus, LOG_DIR, SERVICES_DIR,
};
use kimg_contract::VmId;
use nix::sys::signal::Signal;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How often the supervisor looks at its services while one is starting or
/// waiting.
const TICK: Duration = Duration::from_millis(50);
/// How often once every service is ready, done or failed: an exit is seen (and a
/// restart's back-off begins) this late at most; an idle VM under TCG pays for
/// every wake-up.
const SETTLED_TICK: Duration = Duration::from_millis(500);
/// How often the logs' sizes are looked at (a service writes at most this long
/// past [`LOG_MAX`] before its log is rotated).
const ROTATE_EVERY: Duration = Duration::from_secs(1);
/// Longest pause before a restart.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long a service that missed its readiness timeout has between SIGTERM and
/// SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(5);
/// Size past which a service's log is rotated: its last `LOG_MAX` bytes go to
/// `NAME.log.1` (replacing the one before) and `NAME.log` starts again empty, so a
/// chatty service's logs take about twice this at most, not the disk.
pub const LOG_MAX: u64 = 4 << 20;

/// What the agent reports; updated by the supervisor thread.
static TABLE: Mutex<Vec<ServiceStatus>> = Mutex::new(Vec::new());
/// The services the supervisor runs, as last handed to it (by [`start`] or
/// [`reload`]); `None` until the supervisor thread exists.
static SPECS: Mutex<Option<Vec<ServiceSpec>>> = Mutex::new(None);
/// A new list for the supervisor thread, taken at its next tick.
static PENDING: Mutex<Option<Vec<ServiceSpec>>> = Mutex::new(None);
/// How long [`reload`] waits for the supervisor to take a new list.
const TAKE_WAIT: Duration = Duration::from_secs(5);
/// Whether power off began. Held across every start, so once [`stop`] returns no
/// start is under way and none follows: the shutdown's kill rounds come after the
/// last process the supervisor made.
static STOPPING: Mutex<bool> = Mutex::new(false);

/// Locks a mutex; a panic elsewhere while it was held does not stop PID 1 using it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The services' current states, in start order.
pub fn snapshot() -> Vec<ServiceStatus> {
    lock(&TABLE).clone()
}

/// Stops starting and restarting services (power off is under way); waits for a
/// start in progress to finish, so the caller's kill rounds reach it.
pub fn stop() {
    stop_gate(&STOPPING);
}

fn stop_gate(gate: &Mutex<bool>) {
    *lock(gate) = true;
}

/// Runs `start` unless power off began (then it is an error), holding `gate`
/// throughout: [`stop`] cannot slip in between the check and the start.
fn start_unless_stopping(
    gate: &Mutex<bool>,
    start: impl FnOnce() -> Result<u32, String>,
) -> Result<u32, String> {
    let stopping = lock(gate);
    if *stopping {
        return Err("power off under way; not started".into());
    }
    let r = start();
    drop(stopping);
    r
}

/// Reads every `*.toml` of the services directory and returns the services that run
/// on `vm`, in start order; bad files are problems, not fatal.
pub fn load(vm: VmId, problems: &mut Vec<String>) -> Vec<ServiceSpec> {
    load_dir(Path::new(SERVICES_DIR), vm, problems)
}

fn load_dir(dir: &Path, vm: VmId, problems: &mut Vec<String>) -> Vec<ServiceSpec> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new(); // no services directory: nothing to run
    };
    let mut files: Vec<_> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    let mut all = Vec::new();
    let mut from = Vec::new();
    for f in files {
        let stem = f
            .file_stem()
            .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
        match std::fs::read_to_string(&f)
            .map_err(|e| e.to_string())
            .and_then(|t| ServiceSpec::parse(&stem, &t))
        {
            Ok(spec) => {
                all.push(spec);
                from.push(f);
            }
            Err(e) => problems.push(format!("service file {}: {e}", f.display())),
        }
    }
    let here: Vec<usize> = (0..all.len()).filter(|&i| all[i].runs_on(vm)).collect();
    let runnable = runnable(&all, &from, &here, problems);
    match start_order(&all, &runnable) {
        Ok(order) => order.into_iter().map(|i| all[i].clone()).collect(),
        Err(e) => {
            // Cannot happen (runnable has no unknown names, no cycles); if it did,
            // nothing starts rather than something in a wrong order.
            problems.push(format!("services: {e}"));
            Vec::new()
        }
    }
}

/// The services of `here` (indexes into `all`, read from `files`) that can start.
/// Each one left out is a problem naming it: a second file giving a name already
/// taken on this VM, an `after` no service file defines, `after` lists in a cycle,
/// or an `after` naming a service left out. One bad file costs only what depends
/// on it, not every service of the VM.
fn runnable(
    all: &[ServiceSpec],
    files: &[PathBuf],
    here: &[usize],
    problems: &mut Vec<String>,
) -> Vec<usize> {
    let known: BTreeSet<&str> = all.iter().map(|s| s.name.as_str()).collect();
    // Name -> the first file (in name order) that runs here with it.
    let mut local: BTreeMap<&str, usize> = BTreeMap::new();
    for &i in here {
        let name = all[i].name.as_str();
        if let Some(&first) = local.get(name) {
            problems.push(format!(
                "service {name}: defined by both {} and {}; the second is ignored",
                files[first].display(),
                files[i].display()
            ));
        } else {
            local.insert(name, i);
        }
    }
    let deps = |i: usize| {
        all[i]
            .after
            .iter()
            .filter_map(|d| local.get(d.as_str()).copied())
    };
    let mut left_out: BTreeSet<usize> = BTreeSet::new();
    for &i in local.values() {
        let unknown: Vec<&str> = all[i]
            .after
            .iter()
            .map(String::as_str)
            .filter(|d| !known.contains(d))
            .collect();
        if !unknown.is_empty() {
            problems.push(format!(
                "service {}: `after` names unknown service {}; not started",
                all[i].name,
                unknown.join(", ")
            ));
            left_out.insert(i);
        }
    }
    // What each service waits for, directly or not (small: a VM's services).
    let reach: BTreeMap<usize, BTreeSet<usize>> = local
        .values()
        .map(|&i| {
            let mut seen = BTreeSet::new();
            let mut todo: Vec<usize> = deps(i).collect();
            while let Some(d) = todo.pop() {
                if seen.insert(d) {
                    todo.extend(deps(d));
                }
            }
            (i, seen)
        })
        .collect();
    let mut in_cycle: BTreeSet<usize> = BTreeSet::new();
    for (&i, r) in &reach {
        if r.contains(&i) && !in_cycle.contains(&i) {
            // Its cycle: what it waits for that waits for it.
            let members: Vec<usize> = r
                .iter()
                .copied()
                .filter(|j| reach.get(j).is_some_and(|rj| rj.contains(&i)))
                .collect();
            let names: Vec<&str> = members.iter().map(|&j| all[j].name.as_str()).collect();
            problems.push(format!(
                "services {}: their `after` lists form a cycle; not started",
                names.join(", ")
            ));
            in_cycle.extend(members);
        }
    }
    left_out.extend(in_cycle);
    // Then whatever waits for something left out, until nothing changes.
    loop {
        let next = local.values().copied().find_map(|i| {
            if left_out.contains(&i) {
                return None;
            }
            deps(i).find(|d| left_out.contains(d)).map(|d| (i, d))
        });
        let Some((i, d)) = next else { break };
        problems.push(format!(
            "service {}: starts after {}, which is not started; not started",
            all[i].name, all[d].name
        ));
        left_out.insert(i);
    }
    local
        .values()
        .copied()
        .filter(|i| !left_out.contains(i))
        .collect()
}

/// Starts the supervisor thread for `specs` (already in start order).
pub fn start(specs: Vec<ServiceSpec>) -> std::io::Result<()> {
    let mut current = lock(&SPECS);
    if specs.is_empty() {
        publish(&[]);
        return Ok(()); // no thread until a reload brings services
    }
    spawn_supervisor(specs.clone())?;
    *current = Some(specs);
    Ok(())
}

fn spawn_supervisor(specs: Vec<ServiceSpec>) -> std::io::Result<()> {
    let mut services: Vec<Service> = specs.into_iter().map(Service::new).collect();
    publish(&services);
    std::thread::Builder::new()
        .name("services".into())
        .spawn(move || {
            let mut os = RealOs;
            let mut rotated = Instant::now();
            loop {
                if !*lock(&STOPPING) {
                    let pending = lock(&PENDING).take();
                    if let Some(new) = pending {
                        services =
                            replace(std::mem::take(&mut services), new, Instant::now(), &mut os);
                    }
                    step(&mut services, Instant::now(), &mut os);
                    publish(&services);
                    if rotated.elapsed() >= ROTATE_EVERY {
                        rotated = Instant::now();
                        rotate_logs(&services);
                    }
                }
                std::thread::sleep(if settled(&services) {
                    SETTLED_TICK
                } else {
                    TICK
                });
            }
        })?;
    Ok(())
}

/// Whether no service is starting or waiting (to start, or to be restarted).
fn settled(services: &[Service]) -> bool {
    services.iter().all(|s| {
        !matches!(
            s.status.state,
            ServiceState::Waiting | ServiceState::Starting
        )
    })
}

fn rotate_logs(services: &[Service]) {
    for s in services.iter().filter(|s| s.status.pid.is_some()) {
        let log = log_path(&s.spec.name);
        match rotate_log(&log, LOG_MAX) {
            Ok(true) => info!("services: rotated {}", log.display()),
            Ok(false) => {}
            Err(e) => warn!("services: rotate {}: {e}", log.display()),
        }
    }
}

/// What a [`reload`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Services new to this VM, started.
    pub started: Vec<String>,
    /// Services whose file changed, restarted with the new one.
    pub restarted: Vec<String>,
}

/// Reads the services directory again (after `kimg apply`): services new to this VM
/// start, services whose file changed are stopped (SIGTERM, SIGKILL after
/// [`KILL_GRACE`]) and started with the new file, the others are left alone (one
/// whose file went bad keeps running as it was). Waits, bounded, until the
/// supervisor has taken the new list.
pub fn reload(vm: VmId, problems: &mut Vec<String>) -> Changes {
    let specs = load(vm, problems);
    let mut current = lock(&SPECS);
    let old = current.clone().unwrap_or_default();
    let (merged, changes) = merge(&old, specs);
    if changes == Changes::default() {
        return changes;
    }
    if current.is_some() {
        *lock(&PENDING) = Some(merged.clone());
    } else if let Err(e) = spawn_supervisor(merged.clone()) {
        problems.push(format!("services: cannot start the supervisor thread: {e}"));
        return Changes::default();
    }
    *current = Some(merged);
    drop(current);
    let deadline = Instant::now() + TAKE_WAIT;
    while lock(&PENDING).is_some() && Instant::now() < deadline {
        std::thread::sleep(TICK);
    }
    changes
}

/// The supervisor's new list: `new` (in start order), then what `old` had that
/// `new` lacks (left running); and what differs.
fn merge(old: &[ServiceSpec], new: Vec<ServiceSpec>) -> (Vec<ServiceSpec>, Changes) {
    let mut changes = Changes::default();
    for spec in &new {
        match old.iter().find(|o| o.name == spec.name) {
            None => changes.started.push(spec.name.clone()),
            Some(o) if o != spec => changes.restarted.push(spec.name.clone()),
            Some(_) => {}
        }
    }
    let kept: Vec<ServiceSpec> = old
        .iter()
        .filter(|o| !new.iter().any(|n| n.name == o.name))
        .cloned()
        .collect();
    let mut merged = new;
    merged.extend(kept);
    (merged, changes)
}

/// Swaps the supervisor's services for `specs`: an unchanged service keeps its
/// process and state; a changed one is asked to stop and its new version waits
/// for that exit before it starts; a new one starts.
fn replace(
    old: Vec<Service>,
    specs: Vec<ServiceSpec>,
    now: Instant,
    os: &mut dyn Os,
) -> Vec<Service> {
    let mut old: Vec<Option<Service>> = old.into_iter().map(Some).collect();
    let mut out = Vec::with_capacity(specs.len());
    for spec in specs {
        let same_name = old
            .iter_mut()
            .find(|s| s.as_ref().is_some_and(|s| s.spec.name == spec.name))
            .and_then(Option::take);
        let Some(prev) = same_name else {
            out.push(Service::new(spec));
            continue;
        };
        if prev.spec == spec {
            out.push(prev);
            continue;
        }
        let mut s = Service::new(spec);
        s.status.restarts = prev.status.restarts;
        s.status.message = Some("restarted: its service file changed".into());
        // A process still of the old version (or one stopping already) must go first.
        let stopping = prev.replacing.map(|(pid, _)| pid);
        if let Some(pid) = prev.status.pid.or(stopping) {
            os.terminate(pid);
            s.replacing = Some((pid, now));
        }
        info!("service {}: file changed; restarting", s.spec.name);
        out.push(s);
    }
    // Services the new list lacks run on as they were.
    out.extend(old.into_iter().flatten());
    out
}

fn publish(services: &[Service]) {
    *lock(&TABLE) = services.iter().map(|s| s.status.clone()).collect();
}

/// Where a service's output goes.
fn log_path(name: &str) -> PathBuf {
    Path::new(LOG_DIR).join(format!("{name}.log"))
}

/// Rotates the log at `path` when it is larger than `max`: its last `max` bytes go
/// to `PATH.1` (replacing the one before), then it is emptied; whether it was
/// rotated. The service keeps writing to its descriptor (`O_APPEND`), so the file
/// is copied and truncated, not renamed; what it writes between the two is lost.
/// Never follows a symlink. Work per call is bounded by `max`.
pub fn rotate_log(path: &Path, max: u64) -> io::Result<bool> {
    let flags = nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC | nix::libc::O_NONBLOCK;
    let log = match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(flags)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let md = log.metadata()?;
    if !md.is_file() || md.len() <= max {
        return Ok(false);
    }
    let mut old = path.as_os_str().to_owned();
    old.push(".1");
    let mut tmp = old.clone();
    tmp.push(".tmp");
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut copy = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(md.permissions().mode() & 0o777)
        .custom_flags(flags)
        .open(&tmp)?;
    let mut from: &File = &log;
    from.seek(SeekFrom::Start(md.len() - max))?;
    io::copy(&mut from.take(max), &mut copy)?;
    std::fs::rename(&tmp, &old)?;
    log.set_len(0)?;
    Ok(true)
}

/// A service and what the supervisor knows of it.
pub struct Service {
    spec: ServiceSpec,
    status: ServiceStatus,
    started: Option<Instant>,
    not_before: Option<Instant>,
    /// When it was sent SIGTERM for missing its readiness timeout.
    terminated: Option<Instant>,
    /// Whether SIGKILL followed.
    killed: bool,
    /// The process of the version this one replaces, and when it was asked to
    /// stop: this one starts once it is gone.
    replacing: Option<(u32, Instant)>,
}

impl Service {
    fn new(spec: ServiceSpec) -> Service {
        let status = ServiceStatus {
            name: spec.name.clone(),
            state: ServiceState::Waiting,
            pid: None,
            restarts: 0,
            last_exit: None,
            message: None,
        };
        Service {
            spec,
            status,
            started: None,
            not_before: None,
            terminated: None,
            killed: false,
            replacing: None,
        }
    }
}

/// What the supervisor needs from the system.
pub trait Os {
    /// Starts the service's process; its pid.
    fn spawn(&mut self, spec: &ServiceSpec) -> Result<u32, String>;
    /// The exit code if `pid` has exited.
    fn exited(&mut self, pid: u32) -> Option<i32>;
    /// Whether the readiness condition holds now.
    fn ready(&mut self, ready: &Ready) -> bool;
    /// Asks the process group of `pid` to terminate (SIGTERM).
    fn terminate(&mut self, pid: u32);
    /// Kills the process group of `pid` (SIGKILL).
    fn kill(&mut self, pid: u32);
}

/// One pass over all services: start what may start, notice readiness and exits.
pub fn step(services: &mut [Service], now: Instant, os: &mut dyn Os) {
    for i in 0..services.len() {
        let (done, rest) = services.split_at_mut(i);
        let s = &mut rest[0];
        match s.status.state {
            ServiceState::Waiting => {
                if let Some((pid, since)) = s.replacing {
                    if os.exited(pid).is_none() {
                        // SIGTERM may be ignored; the restart must still come.
                        if !s.killed && now.saturating_duration_since(since) > KILL_GRACE {
                            os.kill(pid);
                            s.killed = true;
                        }
                        continue;
                    }
                    s.replacing = None;
                    s.killed = false;
                }
                if s.not_before.is_some_and(|t| now < t) {
                    continue;
                }
                let deps: Vec<&Service> = done
                    .iter()
                    .filter(|d| s.spec.after.contains(&d.spec.name))
                    .collect();
                if let Some(f) = deps.iter().find(|d| d.status.state == ServiceState::Failed) {
                    s.status.state = ServiceState::Failed;
                    s.status.message = Some(format!("{} failed", f.spec.name));
                    continue;
                }
                if !deps
                    .iter()
                    .all(|d| matches!(d.status.state, ServiceState::Ready | ServiceState::Done))
                {
                    continue;
                }
                match os.spawn(&s.spec) {
                    Ok(pid) => {
                        s.status.pid = Some(pid);
                        s.status.state = if s.spec.ready == Ready::Started {
                            ServiceState::Ready
                        } else {
                            ServiceState::Starting
                        };
                        s.status.message = None;
                        s.started = Some(now);
                    }
                    Err(e) => {
                        s.status.message = Some(e);
                        exited(s, 127, now);
                    }
                }
            }
            ServiceState::Starting | ServiceState::Ready => {
                let Some(pid) = s.status.pid else { continue };
                if let Some(code) = os.exited(pid) {
                    exited(s, code, now);
                } else if s.status.state == ServiceState::Starting {
                    let waited = s
                        .started
                        .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
                    if s.terminated.is_none()
                        && s.spec.ready != Ready::Exited
                        && os.ready(&s.spec.ready)
                    {
                        s.status.state = ServiceState::Ready;
                    } else if waited > Duration::from_secs(s.spec.ready_timeout_secs) {
                        match s.terminated {
                            None => {
                                s.status.message = Some(format!(
                                    "not ready after {}s; terminated",
                                    s.spec.ready_timeout_secs
                                ));
                                os.terminate(pid);
                                s.terminated = Some(now);
                            }
                            // SIGTERM may be ignored; the start must still end.
                            Some(t)
                                if !s.killed && now.saturating_duration_since(t) > KILL_GRACE =>
                            {
                                s.status.message = Some(format!(
                                    "not ready after {}s; killed ({}s after SIGTERM)",
                                    s.spec.ready_timeout_secs,
                                    KILL_GRACE.as_secs()
                                ));
                                os.kill(pid);
                                s.killed = true;
                            }
                            Some(_) => {}
                        }
                    }
                }
            }
            ServiceState::Done | ServiceState::Failed => {}
        }
    }
}

/// Records an exit and decides between done, failed and a restart after back-off.
fn exited(s: &mut Service, code: i32, now: Instant) {
    s.status.pid = None;
    s.terminated = None;
    s.killed = false;
    s.status.last_exit = Some(code);
    let restart = match s.spec.restart {
        Restart::Always => !(s.spec.ready == Ready::Exited && code == 0),
        Restart::OnFailure => code != 0,
        Restart::Never => false,
    };
    if restart {
        s.status.restarts += 1;
        s.status.state = ServiceState::Waiting;
        let backoff =
            Duration::from_millis(500) * 2u32.saturating_pow(s.status.restarts.min(7) - 1);
        s.not_before = Some(now + backoff.min(MAX_BACKOFF));
    } else if code == 0 {
        s.status.state = ServiceState::Done;
    } else {
        s.status.state = ServiceState::Failed;
        s.status
            .message
            .get_or_insert_with(|| format!("exited with {code}"));
    }
}

/// The real system: processes through the reaper, logs under /var/log.
struct RealOs;

/// Starts a service's process, output appended to its log.
fn spawn(spec: &ServiceSpec) -> Result<u32, String> {
    let log_path = log_path(&spec.name);
    // A log left over the limit by an earlier run is rotated first.
    if let Err(e) = rotate_log(&log_path, LOG_MAX) {
        warn!("services: rotate {}: {e}", log_path.display());
    }
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&log_path)
        .map_err(|e| format!("open {}: {e}", log_path.display()))?;
    let err = log
        .try_clone()
        .map_err(|e| format!("{}: {e}", log_path.display()))?;
    let mut cmd = Command::new(&spec.command[0]);
    cmd.args(&spec.command[1..])
        .env_clear()
        // A service file's `env` may override it.
        .env("PATH", crate::exec::PATH)
        .env("HOME", "/root")
        .envs(&spec.env)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .process_group(0);
    let child = REAPER
        .spawn(&mut cmd)
        .map_err(|e| format!("start {}: {e}", spec.command[0]))?;
    info!("service {} started (pid {})", spec.name, child.id());
    Ok(child.id())
}

impl Os for RealOs {
    fn spawn(&mut self, spec: &ServiceSpec) -> Result<u32, String> {
        start_unless_stopping(&STOPPING, || spawn(spec))
    }

    fn exited(&mut self, pid: u32) -> Option<i32> {
        let code = REAPER.wait(pid as i32, Some(Instant::now()))?;
        info!("service pid {pid} exited with {code}");
        Some(code)
    }

    fn ready(&mut self, ready: &Ready) -> bool {
        match ready {
            Ready::Started => true,
            Ready::Exited => false,
            Ready::Path(p) => Path::new(p).exists(),
            Ready::Tcp(addr) => addr
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .is_some_and(|a| {
                    TcpStream::connect_timeout(&a, Duration::from_millis(200)).is_ok()
                }),
        }
    }

    fn terminate(&mut self, pid: u32) {
        if let Err(e) = REAPER.kill_group(pid as i32, Signal::SIGTERM) {
            warn!("services: SIGTERM to pid {pid}: {e}");
        }
    }

    fn kill(&mut self, pid: u32) {
        if let Err(e) = REAPER.kill_group(pid as i32, Signal::SIGKILL) {
            warn!("services: SIGKILL to pid {pid}: {e}");
        }
    }
}

#[cfg(test)]
mod tests;
