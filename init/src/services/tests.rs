//! Tests of the service supervisor.

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
    killed: Vec<u32>,
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
    fn kill(&mut self, pid: u32) {
        self.killed.push(pid);
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
        svc(
            "slow",
            "ready = { path = \"/run/slow.sock\" }\nready_timeout_secs = 1\nrestart = \"never\"",
        ),
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

/// Issue 15, defect 12: a service that missed its readiness timeout got SIGTERM
/// and nothing more; one ignoring SIGTERM stayed "starting" for ever. Now
/// SIGKILL follows after [`KILL_GRACE`], once, and the exit is recorded.
#[test]
fn a_service_ignoring_sigterm_is_killed_after_the_grace() {
    use ServiceState::*;
    let mut s = vec![svc(
        "stubborn",
        "ready = { path = \"/run/never\" }\nready_timeout_secs = 1\nrestart = \"never\"",
    )];
    let mut os = FakeOs::default();
    let t0 = Instant::now();
    step(&mut s, t0, &mut os);
    step(&mut s, t0 + Duration::from_secs(2), &mut os);
    assert_eq!(
        (os.terminated.as_slice(), os.killed.as_slice()),
        (&[1][..], &[][..])
    );
    // Still there within the grace: no SIGKILL yet, no second SIGTERM.
    step(&mut s, t0 + Duration::from_secs(3), &mut os);
    assert_eq!((os.terminated.len(), os.killed.len()), (1, 0));
    let late = t0 + Duration::from_secs(2) + KILL_GRACE + Duration::from_secs(1);
    step(&mut s, late, &mut os);
    step(&mut s, late + Duration::from_secs(10), &mut os);
    assert_eq!(
        (os.terminated.as_slice(), os.killed.as_slice()),
        (&[1][..], &[1][..])
    );
    assert!(s[0].status.message.as_deref().unwrap().contains("killed"));
    os.exits.insert(1, 137);
    step(&mut s, late + Duration::from_secs(11), &mut os);
    assert_eq!(states(&s), [Failed]);
    assert_eq!(s[0].status.last_exit, Some(137));
}

/// Issue 15, defect 12: one unknown `after` name or one cycle dropped every
/// service of the VM, and two files giving the same name silently dropped one.
/// Now only the services concerned (and what starts after them) are left out,
/// each named in a problem; a duplicate names both files.
#[test]
fn bad_after_lists_and_duplicates_cost_only_the_services_concerned() {
    let dir = tempfile::tempdir().unwrap();
    let files = [
        ("a.toml", "command = [\"a\"]"),
        ("b.toml", "command = [\"b\"]\nafter = [\"a\"]"),
        ("c.toml", "command = [\"c\"]\nafter = [\"a\", \"nope\"]"),
        ("d.toml", "command = [\"d\"]\nafter = [\"e\"]"),
        ("e.toml", "command = [\"e\"]\nafter = [\"d\"]"),
        ("f.toml", "command = [\"f\"]\nafter = [\"d\"]"),
        ("g.toml", "command = [\"f2\"]\nafter = [\"f\"]"),
        ("other-a.toml", "name = \"a\"\ncommand = [\"a2\"]"),
        // The same name on another VM is no duplicate here.
        (
            "remote-b.toml",
            "name = \"b\"\ncommand = [\"b\"]\nvms = [\"vm-009\"]",
        ),
    ];
    for (f, text) in files {
        std::fs::write(dir.path().join(f), text).unwrap();
    }
    let mut problems = Vec::new();
    let specs = load_dir(dir.path(), "vm-002".parse().unwrap(), &mut problems);
    let names: Vec<_> = specs.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a", "b"], "{problems:?}");
    assert_eq!(specs[0].command, ["a"], "the first file of a name wins");
    let has = |words: &[&str]| problems.iter().any(|p| words.iter().all(|w| p.contains(w)));
    assert!(
        has(&["a.toml", "other-a.toml", "service a"]),
        "{problems:?}"
    );
    assert!(has(&["service c", "unknown", "nope"]), "{problems:?}");
    assert!(has(&["services d, e", "cycle"]), "{problems:?}");
    assert!(has(&["service f", "after d"]), "{problems:?}");
    assert!(has(&["service g", "after f"]), "{problems:?}");
    assert_eq!(problems.len(), 5, "{problems:?}");
}

/// Issue 15, defect 12: the supervisor checked "stopping" and then started, so a
/// start could land after power off's kill rounds. Now a start holds the gate:
/// [`stop`] waits for one in progress, and none is made after it.
#[test]
fn nothing_starts_once_stop_has_returned() {
    use std::sync::mpsc;
    let gate = Mutex::new(false);
    let (started_tx, started_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (stopped_tx, stopped_rx) = mpsc::channel();
    std::thread::scope(|sc| {
        let gate = &gate;
        sc.spawn(move || {
            let r = start_unless_stopping(gate, || {
                started_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                Ok(7)
            });
            assert_eq!(r, Ok(7));
        });
        started_rx.recv().unwrap();
        sc.spawn(move || {
            stop_gate(gate);
            stopped_tx.send(()).unwrap();
        });
        // While the start is under way, stop cannot have returned.
        assert!(stopped_rx.recv_timeout(Duration::from_millis(200)).is_err());
        go_tx.send(()).unwrap();
        stopped_rx.recv().unwrap();
    });
    let mut ran = false;
    let r = start_unless_stopping(&gate, || {
        ran = true;
        Ok(8)
    });
    assert!(r.is_err() && !ran, "started after stop: {r:?}");
}

/// Issue 15, defect 4 (logs): /var/log/NAME.log grew without end. Past
/// `max` it is rotated: the last `max` bytes in NAME.log.1, the log emptied,
/// and the service's O_APPEND descriptor writes on at the new start. However
/// much a service writes, its two files stay near 2 * max.
#[test]
fn service_logs_are_rotated_and_stay_bounded() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("chatty.log");
    let old = dir.path().join("chatty.log.1");
    let max = 64 * 1024;
    let mut w = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .unwrap();
    assert!(!rotate_log(&log, max).unwrap(), "empty log rotated");
    let mut total = 0u64;
    for i in 0..200u32 {
        let line = format!("{i:08} {}\n", "x".repeat(1000));
        for _ in 0..10 {
            w.write_all(line.as_bytes()).unwrap();
            total += line.len() as u64;
        }
        rotate_log(&log, max).unwrap();
        let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        assert!(size(&log) <= max, "log not rotated at {total}");
        assert!(size(&old) <= max);
    }
    assert!(total > 20 * max);
    assert_eq!(std::fs::metadata(&old).unwrap().len(), max);
    w.write_all(b"after\n").unwrap();
    let now = std::fs::read(&log).unwrap();
    assert!(
        now.ends_with(b"after\n") && !now.contains(&0),
        "holes after truncation"
    );
    // Never through a symlink.
    let link = dir.path().join("link.log");
    std::os::unix::fs::symlink(&old, &link).unwrap();
    assert!(rotate_log(&link, 1).is_err());
    assert_eq!(std::fs::metadata(&old).unwrap().len(), max);
}

/// `kimg apply`: an unchanged service keeps its process, a changed one is stopped
/// and its new version starts only once the old process is gone (killed if it
/// ignores SIGTERM), a new one starts, one the new list lacks runs on.
#[test]
fn a_reload_restarts_changed_services_after_the_old_process_is_gone() {
    use ServiceState::*;
    let spec = |name: &str, extra: &str| {
        ServiceSpec::parse(name, &format!("command = [\"/bin/{name}\"]\n{extra}")).unwrap()
    };
    let mut os = FakeOs::default();
    let t0 = Instant::now();
    let mut s = vec![svc("same", ""), svc("web", ""), svc("old", "")];
    step(&mut s, t0, &mut os);
    assert_eq!(states(&s), [Ready, Ready, Ready]);
    let pids: Vec<u32> = s.iter().map(|s| s.status.pid.unwrap()).collect();

    let (merged, changes) = merge(
        &[spec("same", ""), spec("web", ""), spec("old", "")],
        vec![
            spec("same", ""),
            spec("web", "env = { V = \"2\" }"),
            spec("new", ""),
        ],
    );
    assert_eq!(changes.started, ["new"]);
    assert_eq!(changes.restarted, ["web"]);
    let names: Vec<&str> = merged.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["same", "web", "new", "old"]);

    let mut s = replace(s, merged, t0, &mut os);
    assert_eq!(os.terminated, [pids[1]]);
    step(&mut s, t0, &mut os);
    assert_eq!(s[0].status.pid, Some(pids[0]), "unchanged: same process");
    assert_eq!(states(&s), [Ready, Waiting, Ready, Ready]);
    assert_eq!(s[3].status.pid, Some(pids[2]), "left out: runs on");
    assert!(
        !os.spawned[3..].contains(&"web".to_string()),
        "{:?}",
        os.spawned
    );
    // The old web ignores SIGTERM: killed after the grace, then the new one starts.
    let later = t0 + KILL_GRACE + Duration::from_secs(1);
    step(&mut s, later, &mut os);
    assert_eq!(os.killed, [pids[1]]);
    os.exits.insert(pids[1], 137);
    step(&mut s, later, &mut os);
    assert_eq!(states(&s), [Ready, Ready, Ready, Ready]);
    assert_ne!(s[1].status.pid, Some(pids[1]));
    assert_eq!(s[1].spec.env.get("V").map(String::as_str), Some("2"));
}
