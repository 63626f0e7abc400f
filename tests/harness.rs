//! Shared harness of the end-to-end tests: the kimg binary, one image built per test
//! process, and clusters that are always stopped (even when a test fails).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The kimg binary under test (`$KIMG_BIN`, else the release build).
pub fn kimg_bin() -> PathBuf {
    let p = std::env::var_os("KIMG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/release/kimg"));
    assert!(
        p.is_file(),
        "{} missing: run scripts/build first",
        p.display()
    );
    p
}

/// Runs kimg with `args`; the runtime dir is the given one so tests never touch a
/// user's clusters.
pub fn kimg(runtime: &Path, args: &[&str]) -> Output {
    Command::new(kimg_bin())
        .args(args)
        .env("KIMG_RUNTIME_DIR", runtime)
        .output()
        .expect("kimg runs")
}

/// Text of an output's stdout and stderr, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A kimg cache of its own (for `KIMG_CACHE`) that shares only the downloaded kernel
/// packages and unpacked kernels with the user's: whatever else a test caches
/// (kimg-init, overlays, downloads) starts empty and goes with it.
pub fn own_cache() -> tempfile::TempDir {
    let cache = tempfile::Builder::new()
        .prefix("kimg-cache-")
        .tempdir()
        .unwrap();
    let shared = kimg_util::cache::cache_dir();
    for sub in ["debs", "kernels"] {
        std::fs::create_dir_all(shared.join(sub)).unwrap();
        std::os::unix::fs::symlink(shared.join(sub), cache.path().join(sub)).unwrap();
    }
    cache
}

/// A directory `BASE/PREFIX-PID` that lives as long as this test process. Statics
/// are never dropped, so a `TempDir` held by one would stay behind after every run
/// (118 MB per test binary for the shared image); instead each call first removes
/// the `PREFIX-PID` directories of processes that no longer exist.
pub fn process_dir(base: &Path, prefix: &str) -> PathBuf {
    let mine = std::process::id();
    if let Ok(entries) = std::fs::read_dir(base) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let pid = name.to_str().and_then(|n| {
                n.strip_prefix(prefix)?
                    .strip_prefix('-')?
                    .parse::<i32>()
                    .ok()
            });
            if pid.is_some_and(|p| p as u32 != mine && !kimg_cluster::process::alive(p)) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = base.join(format!("{prefix}-{mine}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// An image built once per test process by `kimg build`.
pub struct BuiltImage {
    /// Directory holding hd.img and hd.json.
    pub dir: PathBuf,
    /// The qcow2 image.
    pub image: PathBuf,
    /// Its manifest.
    pub manifest: kimg_contract::manifest::Manifest,
    /// Wall time of the build.
    pub build_time: Duration,
}

/// The shared base image (built on first use).
pub fn image() -> &'static BuiltImage {
    static IMAGE: OnceLock<BuiltImage> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let dir = process_dir(&std::env::temp_dir(), "kimg-e2e-image");
        let start = Instant::now();
        let out = Command::new(kimg_bin())
            .args(["build", "--out"])
            .arg(&dir)
            .output()
            .expect("kimg build runs");
        assert!(out.status.success(), "kimg build failed:\n{}", text(&out));
        let image = dir.join("hd.img");
        let manifest = serde_json::from_str(&std::fs::read_to_string(dir.join("hd.json")).unwrap())
            .expect("hd.json is a manifest");
        BuiltImage {
            dir,
            image,
            manifest,
            build_time: start.elapsed(),
        }
    })
}

/// How long [`TestCluster::reaches`] waits for an echo reply.
pub const REACH_WINDOW: Duration = Duration::from_secs(90);

/// A cluster started by a test in its own runtime dir; stopped on drop.
pub struct TestCluster {
    /// Runtime dir (KIMG_RUNTIME_DIR) of this cluster only.
    pub runtime: tempfile::TempDir,
    /// Cluster name.
    pub name: String,
}

impl TestCluster {
    /// A cluster named `name` in a fresh runtime dir (nothing started yet).
    pub fn new(name: &str) -> TestCluster {
        let runtime = tempfile::Builder::new()
            .prefix("kimg-rt-")
            .tempdir_in("/tmp")
            .unwrap();
        TestCluster {
            runtime,
            name: name.to_string(),
        }
    }

    /// Runs kimg with `--name` appended after the subcommand.
    pub fn kimg(&self, sub: &str, args: &[&str]) -> Output {
        let mut all = vec![sub, "--name", &self.name];
        all.extend_from_slice(args);
        kimg(self.runtime.path(), &all)
    }

    /// `kimg exec VM -- argv...`.
    pub fn exec(&self, vm: &str, argv: &[&str]) -> Output {
        let mut all = vec![vm, "--"];
        all.extend_from_slice(argv);
        self.kimg("exec", &all)
    }

    /// stdout of a command that must succeed in `vm`.
    pub fn exec_ok(&self, vm: &str, argv: &[&str]) -> String {
        let o = self.exec(vm, argv);
        assert!(o.status.success(), "{vm}: {argv:?}:\n{}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `from` gets an echo reply from `target` (a name or an address) within
    /// [`REACH_WINDOW`], asking one echo at a time. A single `ping -c 3` rests on the
    /// ARP of its first echo: three requests in 3 s, after which the kernel drops the
    /// echoes queued behind it, so a busy host's 3-s stall fails it (stop 25's CI: one
    /// of 100 nodes under 101 TCG VMs got no reply to 3 echoes in 20 s). A target not
    /// reached for the whole window fails the test with the neighbour tables, links
    /// and routes of `from` and of the VMs in `diagnose`.
    pub fn reaches(&self, from: &str, target: &str, diagnose: &[&str]) {
        let t = Instant::now();
        let mut tries = 0;
        let mut last = String::new();
        let answered = poll_until(REACH_WINDOW, &mut || {
            tries += 1;
            let o = self.exec(from, &["ping", "-c", "1", "-W", "5", target]);
            last = text(&o);
            o.status.success()
        });
        if answered {
            if tries > 1 {
                eprintln!(
                    "{from} -> {target}: answered on try {tries}, after {:?}",
                    t.elapsed()
                );
            }
            return;
        }
        let mut report = format!(
            "{from} -> {target}: no reply in {tries} tries over {:?}:\n{last}",
            t.elapsed()
        );
        for vm in std::iter::once(&from).chain(diagnose) {
            let o = self.exec(vm, &["sh", "-c", "ip neigh; ip -s link; ip route"]);
            report.push_str(&format!("\n{vm}:\n{}", text(&o)));
        }
        panic!("{report}");
    }

    /// The command lines of the processes in `vm`, one per line (arguments joined
    /// by spaces, with a trailing space).
    pub fn processes(&self, vm: &str) -> String {
        self.exec_ok(
            vm,
            &[
                "sh",
                "-c",
                "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done",
            ],
        )
    }

    /// Waits (up to `limit`) until a process of `vm` has the command line `cmdline`:
    /// what was typed into a terminal has started, and a key such as ctrl-c now
    /// reaches it rather than the shell.
    pub fn wait_for_process(&self, vm: &str, cmdline: &str, limit: Duration) {
        wait_until(&format!("{vm}: process `{cmdline}`"), limit, &mut || {
            self.processes(vm).lines().any(|l| l.trim() == cmdline)
        });
    }

    /// Pids of QEMU processes whose command line mentions this cluster's runtime dir.
    pub fn qemu_pids(&self) -> Vec<u32> {
        qemu_pids_of(&self.runtime.path().to_string_lossy())
    }
}

/// Polls `ok` every half second until it holds or `limit` has passed; whether it held.
pub fn poll_until(limit: Duration, ok: &mut dyn FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if ok() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Polls `ok` every half second until it holds; panics naming `what` after `limit`.
pub fn wait_until(what: &str, limit: Duration, ok: &mut dyn FnMut() -> bool) {
    assert!(poll_until(limit, ok), "{what}: not within {limit:?}");
}

/// Pids of QEMU processes whose command line mentions `needle` (a runtime dir).
pub fn qemu_pids_of(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        // argv[0] is `qemu-system-x86_64`, or its full path under `ip netns exec`.
        let argv0 = cmd.split('\0').next().unwrap_or_default();
        let program = argv0.rsplit('/').next().unwrap_or_default();
        if program.starts_with("qemu-system") && cmd.contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let _ = self.kimg("stop", &["--grace", "5"]);
        for pid in self.qemu_pids() {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
    }
}

impl TestCluster {
    /// `kimg status --json` of this cluster.
    pub fn status_json(&self) -> serde_json::Value {
        let o = self.kimg("status", &["--json"]);
        assert!(o.status.success(), "{}", text(&o));
        serde_json::from_slice(&o.stdout).expect("status --json is JSON")
    }

    /// `kimg status --json` once every VM that is not dead has its agent's report in
    /// it. Status asks each agent once, for 3 s: a VM whose vCPU a loaded host stalls
    /// longer shows as "booting" with no report, which is not what a test checks.
    pub fn status_answered(&self) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let st = self.status_json();
            let silent = st["vms"].as_array().is_none_or(|vms| {
                vms.iter()
                    .any(|v| v["state"] != "dead" && v["agent"].is_null())
            });
            if !silent || Instant::now() > deadline {
                return st;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// Waits until `path` exists on `vm` (a service's process writes it some time
    /// after its service counts as started, e.g. behind a readiness wait); its text.
    pub fn wait_file(&self, vm: &str, path: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let o = self.exec(vm, &["cat", path]);
            if o.status.success() {
                return String::from_utf8_lossy(&o.stdout).into_owned();
            }
            assert!(
                Instant::now() < deadline,
                "{vm}: no {path} after {timeout:?}: {}",
                text(&o)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Waits until service `name` on `vm` is in one of `states`; its last status.
    pub fn wait_service(
        &self,
        vm: &str,
        name: &str,
        states: &[&str],
        timeout: Duration,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.status_json();
            let svc = st["vms"]
                .as_array()
                .and_then(|vms| vms.iter().find(|v| v["vm"] == vm))
                .and_then(|v| v["agent"]["services"].as_array())
                .and_then(|s| s.iter().find(|s| s["name"] == name).cloned())
                .unwrap_or(serde_json::Value::Null);
            if states.iter().any(|s| svc["state"] == *s) {
                return svc;
            }
            assert!(
                Instant::now() < deadline,
                "{vm}: service {name} not {states:?} in {timeout:?}: {svc}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}
