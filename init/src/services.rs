//! The service supervisor: starts the services of this VM in dependency order,
//! watches readiness, restarts with back-off, logs to /var/log/NAME.log and keeps
//! a status table for the agent.
//!
//! The decisions are a pure state machine ([`step`]) over an [`Os`] interface, so
//! they are unit-tested; [`RealOs`] does the processes, files and sockets.

use crate::reaper::REAPER;
use kimg_contract::service::{
    start_order, Ready, Restart, ServiceSpec, ServiceState, ServiceStatus, LOG_DIR, SERVICES_DIR,
};
use kimg_contract::VmId;
use nix::sys::signal::Signal;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often the supervisor looks at its services.
const TICK: Duration = Duration::from_millis(50);
/// Longest pause before a restart.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What the agent reports; updated by the supervisor thread.
static TABLE: Mutex<Vec<ServiceStatus>> = Mutex::new(Vec::new());
/// Set at power off: nothing is started or restarted any more.
static STOPPING: AtomicBool = AtomicBool::new(false);

/// The services' current states, in start order.
pub fn snapshot() -> Vec<ServiceStatus> {
    TABLE.lock().map(|t| t.clone()).unwrap_or_default()
}

/// Stops starting and restarting services (power off is under way).
pub fn stop() {
    STOPPING.store(true, Ordering::SeqCst);
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
    for f in files {
        let stem = f
            .file_stem()
            .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
        match std::fs::read_to_string(&f)
            .map_err(|e| e.to_string())
            .and_then(|t| ServiceSpec::parse(&stem, &t))
        {
            Ok(spec) => all.push(spec),
            Err(e) => problems.push(format!("service file {}: {e}", f.display())),
        }
    }
    let here: Vec<usize> = (0..all.len()).filter(|&i| all[i].runs_on(vm)).collect();
    match start_order(&all, &here) {
        Ok(order) => order.into_iter().map(|i| all[i].clone()).collect(),
        Err(e) => {
            problems.push(format!("services: {e}"));
            Vec::new()
        }
    }
}

/// Starts the supervisor thread for `specs` (already in start order).
pub fn start(specs: Vec<ServiceSpec>) -> std::io::Result<()> {
    let mut services: Vec<Service> = specs.into_iter().map(Service::new).collect();
    publish(&services);
    if services.is_empty() {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("services".into())
        .spawn(move || {
            let mut os = RealOs;
            loop {
                if !STOPPING.load(Ordering::SeqCst) {
                    step(&mut services, Instant::now(), &mut os);
                    publish(&services);
                }
                std::thread::sleep(TICK);
            }
        })?;
    Ok(())
}

fn publish(services: &[Service]) {
    if let Ok(mut t) = TABLE.lock() {
        *t = services.iter().map(|s| s.status.clone()).collect();
    }
}

/// A service and what the supervisor knows of it.
pub struct Service {
    spec: ServiceSpec,
    status: ServiceStatus,
    started: Option<Instant>,
    not_before: Option<Instant>,
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
    /// Asks the process group of `pid` to terminate.
    fn terminate(&mut self, pid: u32);
}

/// One pass over all services: start what may start, notice readiness and exits.
pub fn step(services: &mut [Service], now: Instant, os: &mut dyn Os) {
    for i in 0..services.len() {
        let (done, rest) = services.split_at_mut(i);
        let s = &mut rest[0];
        match s.status.state {
            ServiceState::Waiting => {
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
                    if s.spec.ready != Ready::Exited && os.ready(&s.spec.ready) {
                        s.status.state = ServiceState::Ready;
                    } else if waited > Duration::from_secs(s.spec.ready_timeout_secs)
                        && s.status.message.is_none()
                    {
                        s.status.message = Some(format!(
                            "not ready after {}s; terminated",
                            s.spec.ready_timeout_secs
                        ));
                        os.terminate(pid);
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

impl Os for RealOs {
    fn spawn(&mut self, spec: &ServiceSpec) -> Result<u32, String> {
        let log_path = Path::new(LOG_DIR).join(format!("{}.log", spec.name));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    /// Test double of the process interface: spawns are recorded, exits and
    /// readiness are set by the test.
    #[derive(Default)]
    struct FakeOs {
        next_pid: u32,
        spawned: Vec<String>,
        exits: BTreeMap<u32, i32>,
        ready: BTreeSet<String>,
        terminated: Vec<u32>,
        fail_spawn: BTreeSet<String>,
    }

    impl Os for FakeOs {
        fn spawn(&mut self, spec: &ServiceSpec) -> Result<u32, String> {
            if self.fail_spawn.contains(&spec.name) {
                return Err("no such program".into());
            }
            self.next_pid += 1;
            self.spawned.push(spec.name.clone());
            Ok(self.next_pid)
        }
        fn exited(&mut self, pid: u32) -> Option<i32> {
            self.exits.remove(&pid)
        }
        fn ready(&mut self, ready: &Ready) -> bool {
            match ready {
                Ready::Started => true,
                Ready::Path(p) | Ready::Tcp(p) => self.ready.contains(p),
                Ready::Exited => false,
            }
        }
        fn terminate(&mut self, pid: u32) {
            self.terminated.push(pid);
        }
    }

    fn svc(name: &str, extra: &str) -> Service {
        Service::new(
            ServiceSpec::parse(name, &format!("command = [\"/bin/{name}\"]\n{extra}")).unwrap(),
        )
    }

    fn states(s: &[Service]) -> Vec<ServiceState> {
        s.iter().map(|s| s.status.state).collect()
    }

    #[test]
    fn starts_in_order_after_readiness() {
        use ServiceState::*;
        let mut s = vec![
            svc("etcd", "ready = { tcp = \"127.0.0.1:2379\" }"),
            svc("apiserver", "after = [\"etcd\"]"),
        ];
        let mut os = FakeOs::default();
        let t0 = Instant::now();
        step(&mut s, t0, &mut os);
        assert_eq!(states(&s), [Starting, Waiting]);
        step(&mut s, t0, &mut os);
        assert_eq!(os.spawned, ["etcd"], "apiserver must wait for etcd's port");
        os.ready.insert("127.0.0.1:2379".into());
        step(&mut s, t0, &mut os);
        assert_eq!(states(&s), [Ready, Ready]);
        assert_eq!(os.spawned, ["etcd", "apiserver"]);
    }

    #[test]
    fn restarts_with_backoff_and_one_shots_finish() {
        use ServiceState::*;
        let mut s = vec![
            svc("d", "restart = \"on-failure\""),
            svc("setup", "ready = \"exited\""),
        ];
        let mut os = FakeOs::default();
        let t0 = Instant::now();
        step(&mut s, t0, &mut os);
        os.exits.insert(1, 137);
        os.exits.insert(2, 0);
        step(&mut s, t0, &mut os);
        assert_eq!(states(&s), [Waiting, Done]);
        assert_eq!(
            (s[0].status.restarts, s[0].status.last_exit),
            (1, Some(137))
        );
        step(&mut s, t0 + Duration::from_millis(100), &mut os);
        assert_eq!(os.spawned.len(), 2, "restart waits for the back-off");
        step(&mut s, t0 + Duration::from_millis(600), &mut os);
        assert_eq!(os.spawned, ["d", "setup", "d"]);
        assert_eq!(states(&s), [Ready, Done]);
    }

    #[test]
    fn failures_propagate_and_timeouts_terminate() {
        use ServiceState::*;
        let mut s = vec![
            svc("missing", "restart = \"never\""),
            svc("dependant", "after = [\"missing\"]"),
            svc("slow", "ready = { path = \"/run/slow.sock\" }\nready_timeout_secs = 1\nrestart = \"never\""),
        ];
        let mut os = FakeOs {
            fail_spawn: ["missing".to_string()].into(),
            ..FakeOs::default()
        };
        let t0 = Instant::now();
        step(&mut s, t0, &mut os);
        assert_eq!(states(&s), [Failed, Failed, Starting]);
        assert_eq!(s[0].status.message.as_deref(), Some("no such program"));
        assert_eq!(s[1].status.message.as_deref(), Some("missing failed"));
        step(&mut s, t0 + Duration::from_secs(2), &mut os);
        assert_eq!(os.terminated, [1]);
        os.exits.insert(1, 143);
        step(&mut s, t0 + Duration::from_secs(2), &mut os);
        assert_eq!(states(&s), [Failed, Failed, Failed]);
        assert!(s[2]
            .status
            .message
            .as_deref()
            .unwrap()
            .contains("not ready after 1s"));
    }

    #[test]
    fn load_dir_filters_orders_and_reports_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("b.toml"),
            "command = [\"b\"]\nafter = [\"a\"]",
        )
        .unwrap();
        std::fs::write(dir.path().join("a.toml"), "command = [\"a\"]").unwrap();
        std::fs::write(
            dir.path().join("r.toml"),
            "command = [\"r\"]\nroles = [\"router\"]",
        )
        .unwrap();
        std::fs::write(dir.path().join("bad.toml"), "command = 1").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let mut problems = Vec::new();
        let specs = load_dir(dir.path(), "vm-002".parse().unwrap(), &mut problems);
        let names: Vec<_> = specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("bad.toml"));
        assert!(load_dir(
            &dir.path().join("none"),
            "vm-001".parse().unwrap(),
            &mut problems
        )
        .is_empty());
    }
}
