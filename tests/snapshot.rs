//! End-to-end: snapshots. A saved cluster comes back from `kimg run --from` with its
//! files, processes and networks, its clocks set to now, twice at once; `kimg
//! suspend` / `kimg resume` bring the same VMs back; a damaged snapshot is refused;
//! a save killed midway leaves no snapshot and VMs that run on.
//! Each test has its own cache (KIMG_CACHE) so no user's snapshots are touched.

use kimg_tests::{image, kimg_bin, text, TestCluster};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// kimg in cluster `c`'s runtime dir with the snapshot cache `cache`, `--name` after
/// the subcommand (`snapshot save`; `snapshot ls` and `rm` take none).
fn k(c: &TestCluster, cache: &Path, args: &[&str]) -> Output {
    let mut all: Vec<&str> = Vec::new();
    let (sub, rest) = args.split_first().expect("a subcommand");
    all.push(sub);
    let mut rest = rest.to_vec();
    let mut named = true;
    if *sub == "snapshot" {
        let verb = rest.remove(0);
        named = verb == "save";
        all.push(verb);
    }
    if named {
        all.extend(["--name", &c.name]);
    }
    all.extend(rest);
    Command::new(kimg_bin())
        .args(&all)
        .env("KIMG_RUNTIME_DIR", c.runtime.path())
        .env("KIMG_CACHE", cache)
        .output()
        .expect("kimg runs")
}

fn ok(o: Output, what: &str) -> String {
    assert!(o.status.success(), "{what}:\n{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn boot(c: &TestCluster, cache: &Path, nodes: &str, routers: &str) {
    let img = image();
    ok(
        k(
            c,
            cache,
            &[
                "run",
                "--image",
                img.image.to_str().unwrap(),
                "--nodes",
                nodes,
                "--routers",
                routers,
                "--mem",
                "256",
                "--wait=300",
            ],
        ),
        "kimg run",
    );
}

/// Starts `sleep 100000` detached on vm-001; its pid.
fn start_sleeper(c: &TestCluster) -> String {
    c.exec_ok(
        "vm-001",
        &[
            "sh",
            "-c",
            "setsid sleep 100000 >/dev/null 2>&1 </dev/null & echo $!",
        ],
    )
    .trim()
    .to_string()
}

/// Whether process `pid` on `vm` is the sleeper.
fn sleeper_runs(c: &TestCluster, vm: &str, pid: &str) -> bool {
    let o = c.exec(vm, &["cat", &format!("/proc/{pid}/cmdline")]);
    o.status.success() && String::from_utf8_lossy(&o.stdout).contains("100000")
}

/// Guest clock minus host clock on `vm`, in seconds (the exec's own latency counts
/// against the guest, so the midpoint of the call is the host's time).
fn clock_skew(c: &TestCluster, vm: &str) -> f64 {
    let now = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    let before = now();
    // busybox date has no %N: /proc/uptime is not wall time either; use adjtimex-free
    // whole seconds from `date +%s` and allow the second's rounding.
    let out = c.exec_ok(vm, &["date", "+%s"]);
    let after = now();
    let guest: f64 = out.trim().parse().expect("date +%s is a number");
    // The guest's whole second lies in [guest, guest+1): compare with the host's span.
    if guest + 1.0 < before {
        guest + 1.0 - before
    } else if guest > after {
        guest - after
    } else {
        0.0
    }
}

fn uptime(c: &TestCluster, vm: &str) -> f64 {
    let st = c.status_answered();
    st["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vm"] == vm)
        .and_then(|v| v["agent"]["uptime_secs"].as_f64())
        .unwrap_or_else(|| panic!("{vm} has no uptime in {st}"))
}

/// Pings from `from` to each of `targets`; every one answers (right after a restore
/// the first echo can go before the neighbour tables are back).
fn pings(c: &TestCluster, from: &str, targets: &[&str]) {
    for t in targets {
        c.reaches(from, t, &[]);
    }
}

#[test]
fn snapshot_save_then_run_from_twice_brings_back_files_processes_networks_and_clock() {
    let cache = tempfile::tempdir().unwrap();
    let c = TestCluster::new("snap-src");
    boot(&c, cache.path(), "2", "1");
    c.exec_ok(
        "vm-001",
        &["sh", "-c", "echo before-save > /root/kept && sync"],
    );
    let pid = start_sleeper(&c);
    ok(k(&c, cache.path(), &["snapshot", "save", "base"]), "save");

    // The source cluster runs on after the save, its clock right.
    assert!(sleeper_runs(&c, "vm-001", &pid));
    assert!(clock_skew(&c, "vm-001").abs() <= 2.0);
    let ls = ok(k(&c, cache.path(), &["snapshot", "ls", "--json"]), "ls");
    let list: serde_json::Value = serde_json::from_str(&ls).unwrap();
    assert_eq!(list[0]["name"], "base", "{list}");
    assert_eq!(list[0]["vms"], 3, "{list}");
    drop(c);

    // Restored a minute later (guest clocks must be set, not a minute behind), two
    // clusters from one snapshot at the same time.
    std::thread::sleep(Duration::from_secs(60));
    let a = TestCluster::new("snap-a");
    let b = TestCluster::new("snap-b");
    for r in [&a, &b] {
        ok(
            k(r, cache.path(), &["run", "--from", "base", "--wait=120"]),
            "run --from",
        );
    }
    for r in [&a, &b] {
        assert_eq!(
            r.exec_ok("vm-001", &["cat", "/root/kept"]).trim(),
            "before-save"
        );
        assert!(
            sleeper_runs(r, "vm-001", &pid),
            "{}: the sleeper (pid {pid}) is gone",
            r.name
        );
        // Set, not a minute behind; within 10 s, as the host's time reaches a guest
        // that two restores at once keep busy only after a while.
        for vm in ["vm-001", "vm-002", "vm-201"] {
            let skew = clock_skew(r, vm);
            assert!(
                skew.abs() <= 10.0,
                "{}: {vm} clock off by {skew:.1}s",
                r.name
            );
        }
        // Across the router: node to the router's far side, and node to node.
        pings(
            r,
            "vm-002",
            &["192.168.1.1", "192.168.1.201", "192.168.2.201"],
        );
        let st = r.status_json();
        assert_eq!(st["restored_from"], "base", "{st}");
    }
    // Apart: a file written in one is not in the other.
    a.exec_ok("vm-001", &["sh", "-c", "echo only-a > /root/mine"]);
    assert!(!b.exec("vm-001", &["cat", "/root/mine"]).status.success());

    // A snapshot in use is not removed; once its clusters are gone it is.
    let o = k(&a, cache.path(), &["snapshot", "rm", "base"]);
    assert!(!o.status.success(), "{}", text(&o));
    drop(a);
    drop(b);
    ok(
        k(
            &TestCluster::new("x"),
            cache.path(),
            &["snapshot", "rm", "base"],
        ),
        "rm",
    );
    assert!(!cache.path().join("snapshots/base").exists());
}

#[test]
fn suspend_then_resume_brings_the_same_vms_back() {
    let cache = tempfile::tempdir().unwrap();
    let c = TestCluster::new("snap-susp");
    boot(&c, cache.path(), "1", "1");
    let pid = start_sleeper(&c);
    let before = uptime(&c, "vm-001");
    ok(k(&c, cache.path(), &["suspend"]), "suspend");
    assert!(c.qemu_pids().is_empty(), "QEMUs left after suspend");
    assert!(!k(&c, cache.path(), &["status"]).status.success());
    assert!(cache
        .path()
        .join("suspended/snap-susp/manifest.json")
        .is_file());
    std::thread::sleep(Duration::from_secs(5));
    ok(k(&c, cache.path(), &["resume", "--wait=120"]), "resume");
    assert!(sleeper_runs(&c, "vm-001", &pid), "the sleeper is gone");
    let after = uptime(&c, "vm-001");
    assert!(after >= before, "uptime went back: {before} -> {after}");
    assert!(clock_skew(&c, "vm-001").abs() <= 2.0);
    pings(&c, "vm-001", &["192.168.1.201", "192.168.2.201"]);
    // Resumed in place: the suspended state is used up.
    assert!(!cache.path().join("suspended/snap-susp").exists());
}

#[test]
fn damaged_snapshot_is_refused_naming_the_file() {
    let cache = tempfile::tempdir().unwrap();
    let c = TestCluster::new("snap-dmg");
    boot(&c, cache.path(), "1", "0");
    ok(
        k(&c, cache.path(), &["snapshot", "save", "good", "--stop"]),
        "save --stop",
    );
    assert!(c.qemu_pids().is_empty(), "--stop left QEMUs");
    let snaps = cache.path().join("snapshots");
    for (name, damage) in [("truncated", 0u8), ("modified", 1)] {
        let dir = snaps.join(name);
        let o = Command::new("cp")
            .arg("-a")
            .arg(snaps.join("good"))
            .arg(&dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        let (file, why) = if damage == 0 {
            let f = dir.join("vm-001/state.zst");
            let len = std::fs::metadata(&f).unwrap().len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&f)
                .unwrap()
                .set_len(len / 2)
                .unwrap();
            (f, "truncated")
        } else {
            let f = dir.join("vm-001/disk.qcow2");
            let mut bytes = std::fs::read(&f).unwrap();
            let i = bytes.len() / 2;
            bytes[i] ^= 0xff;
            std::fs::write(&f, bytes).unwrap();
            (f, "modified")
        };
        let r = TestCluster::new("snap-dmg2");
        let o = k(&r, cache.path(), &["run", "--from", name]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{}", text(&o));
        assert!(
            err.contains(&file.display().to_string()) && err.contains(why),
            "{}",
            text(&o)
        );
        assert!(r.qemu_pids().is_empty());
    }
    // The undamaged one still restores.
    let r = TestCluster::new("snap-good");
    ok(
        k(&r, cache.path(), &["run", "--from", "good", "--wait=120"]),
        "run --from good",
    );
    assert!(r.exec("vm-001", &["true"]).status.success());
}

/// `kimg snapshot save` killed while the VMs are paused for it: no snapshot (ls
/// shows none, no directory by its name), the next `kimg status` lets the VMs run
/// again (their clocks set), and the next save removes the killed one's leftovers.
#[test]
fn a_killed_save_leaves_no_snapshot_and_the_vms_run_on() {
    let cache = tempfile::tempdir().unwrap();
    let c = TestCluster::new("snap-kill");
    boot(&c, cache.path(), "1", "1");
    let pid = start_sleeper(&c);
    let snaps = cache.path().join("snapshots");
    let mut save = Command::new(kimg_bin())
        .args(["snapshot", "save", "--name", &c.name, "killed"])
        .env("KIMG_RUNTIME_DIR", c.runtime.path())
        .env("KIMG_CACHE", cache.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The VMs are paused before the save makes a VM's directory in its temp dir.
    let paused = || {
        std::fs::read_dir(&snaps)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                e.file_name().to_string_lossy().starts_with(".tmp-killed-")
                    && e.path().join("vm-001").is_dir()
            })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !paused() {
        assert!(
            save.try_wait().unwrap().is_none(),
            "the save ended before it could be killed"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the save never paused the VMs"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    save.kill().unwrap();
    save.wait().unwrap();

    let ls = ok(k(&c, cache.path(), &["snapshot", "ls", "--json"]), "ls");
    assert_eq!(ls.trim(), "[]", "{ls}");
    assert!(!snaps.join("killed").exists());
    // Status notices the VMs a save left paused and lets them run.
    let o = k(&c, cache.path(), &["status"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("resumed vm-001"),
        "{}",
        text(&o)
    );
    assert!(sleeper_runs(&c, "vm-001", &pid));
    assert!(clock_skew(&c, "vm-001").abs() <= 2.0);
    pings(&c, "vm-001", &["192.168.1.201"]);
    // The next save works, and nothing of the killed one is left.
    ok(k(&c, cache.path(), &["snapshot", "save", "after"]), "save");
    let left: Vec<String> = std::fs::read_dir(&snaps)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["after"], "{left:?}");
    assert!(sleeper_runs(&c, "vm-001", &pid));
}
