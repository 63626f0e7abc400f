//! End-to-end: living in a VM through the agent's session ports. `kimg shell` driven
//! through tmux as a person would (send-keys, capture-pane), `kimg exec` streaming,
//! stdin and docker's rule for background children, kimg-init's memory under a
//! flood of output, and `kimg cp` both ways with modes, symlinks and hashes.

use kimg_tests::{image, kimg_bin, text, TestCluster};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn start(c: &TestCluster, nodes: &str) {
    let img = image();
    let o = c.kimg(
        "run",
        &[
            "--image",
            img.image.to_str().unwrap(),
            "--mem",
            "256",
            "--nodes",
            nodes,
            "--routers",
            "0",
            "--wait=300",
        ],
    );
    assert!(o.status.success(), "kimg run:\n{}", text(&o));
}

/// A tmux server of its own (socket in the test's dir), killed on drop.
struct Tmux {
    socket: std::path::PathBuf,
}

impl Tmux {
    fn new(dir: &Path) -> Tmux {
        Tmux {
            socket: dir.join("tmux.sock"),
        }
    }
    fn cmd(&self, args: &[&str]) -> String {
        let o = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux runs");
        assert!(o.status.success(), "tmux {args:?}: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
    fn keys(&self, pane: &str, keys: &[&str]) {
        let mut a = vec!["send-keys", "-t", pane];
        a.extend_from_slice(keys);
        self.cmd(&a);
    }
    fn screen(&self, pane: &str) -> String {
        self.cmd(&["capture-pane", "-p", "-J", "-S", "-200", "-t", pane])
    }
    /// Waits until the pane shows `want` (searching the whole scrollback).
    fn wait_for(&self, pane: &str, want: &str, timeout: Duration) -> String {
        let end = Instant::now() + timeout;
        loop {
            let s = self.screen(pane);
            if s.contains(want) {
                return s;
            }
            assert!(
                Instant::now() < end,
                "pane {pane}: no {want:?} in {timeout:?}; screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .status();
    }
}

#[test]
fn shell_in_a_vm_works_like_a_terminal() {
    let c = TestCluster::new("shell");
    start(&c, "2");
    let tmux = Tmux::new(c.runtime.path());
    let kimg = format!(
        "KIMG_RUNTIME_DIR={} {} shell --name {}",
        c.runtime.path().display(),
        kimg_bin().display(),
        c.name
    );
    let long = Duration::from_secs(120);
    for (pane, vm) in [("one", "vm-001"), ("two", "vm-002")] {
        tmux.cmd(&[
            "new-session",
            "-d",
            "-s",
            pane,
            "-x",
            "100",
            "-y",
            "30",
            "sh",
        ]);
        tmux.keys(pane, &[&format!("{kimg} {vm}; echo rc=$?"), "Enter"]);
    }
    // Two shells on two VMs at once, each answering its own hostname.
    for (pane, vm) in [("one", "vm-001"), ("two", "vm-002")] {
        tmux.keys(pane, &["echo host-is-$(hostname)", "Enter"]);
        tmux.wait_for(pane, &format!("host-is-{vm}"), long);
    }
    // The window size follows a resize.
    tmux.keys("one", &["stty size", "Enter"]);
    tmux.wait_for("one", "30 100", long);
    // The resize travels apart from the keys: the guest waits for it to land.
    tmux.cmd(&["resize-window", "-t", "one", "-x", "90", "-y", "25"]);
    tmux.keys(
        "one",
        &[
            "while [ \"$(stty size)\" != '25 90' ]; do sleep 1; done; echo resized-$((1+1))",
            "Enter",
        ],
    );
    tmux.wait_for("one", "resized-2", long);
    // ctrl-c reaches the foreground process: sleep ends, the shell answers again.
    // (A child sh, since busybox ash runs its own sleep in-process.)
    tmux.keys("one", &["sh -c 'sleep 100'", "Enter"]);
    c.wait_for_process("vm-001", "sleep 100", long);
    let t = Instant::now();
    tmux.keys("one", &["C-c"]);
    tmux.keys("one", &["echo after-ctrl-c=$?", "Enter"]);
    tmux.wait_for("one", "after-ctrl-c=130", long);
    assert!(t.elapsed() < Duration::from_secs(90), "{:?}", t.elapsed());
    // The login environment.
    tmux.keys("one", &["echo home=$HOME term=$TERM", "Enter"]);
    tmux.wait_for("one", "home=/root term=", long);
    // `exit 3` ends kimg shell with status 3, and the terminal is restored.
    tmux.keys("one", &["exit 3", "Enter"]);
    tmux.wait_for("one", "rc=3", long);
    tmux.keys("two", &["exit", "Enter"]);
    tmux.wait_for("two", "rc=0", long);
    tmux.keys(
        "one",
        &["stty -a | grep -o ' icanon' ; echo cooked", "Enter"],
    );
    tmux.wait_for("one", " icanon\ncooked", long);
}

#[test]
fn exec_streams_output_takes_stdin_and_returns_like_docker_exec() {
    let c = TestCluster::new("exec");
    start(&c, "1");
    // The first line reaches the host before the command ends.
    let start_t = Instant::now();
    let mut child = Command::new(kimg_bin())
        .args([
            "exec",
            "--name",
            &c.name,
            "vm-001",
            "--",
            "sh",
            "-c",
            "echo a; sleep 3; echo b",
        ])
        .env("KIMG_RUNTIME_DIR", c.runtime.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    let mut first_at = None;
    loop {
        let n = out.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        if first_at.is_none() && got.starts_with(b"a\n") {
            first_at = Some(Instant::now());
        }
    }
    let ended = Instant::now();
    assert!(child.wait().unwrap().success());
    assert_eq!(got, b"a\nb\n");
    let first_at = first_at.expect("a arrived");
    assert!(
        ended.duration_since(first_at) >= Duration::from_secs(2),
        "a arrived {:?} before the end (started {:?} ago)",
        ended.duration_since(first_at),
        start_t.elapsed()
    );

    // stdin is forwarded with -i, its end closes the command's stdin.
    let mut child = Command::new(kimg_bin())
        .args(["exec", "-i", "--name", &c.name, "vm-001", "--", "cat"])
        .env("KIMG_RUNTIME_DIR", c.runtime.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"hi\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hi\n", "{}", text(&o));

    // A background child keeping the pipe open does not hold the exec, nor lose output.
    let t = Instant::now();
    let o = c.exec("vm-001", &["sh", "-c", "echo hello; sleep 30 &"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hello\n");
    assert!(t.elapsed() < Duration::from_secs(25), "{:?}", t.elapsed());

    // The exit code and stderr are the command's.
    let o = c.exec("vm-001", &["sh", "-c", "echo oops >&2; exit 7"]);
    assert_eq!(o.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&o.stderr), "oops\n");

    // 200 MB of output: kimg-init's RSS stays bounded and the VM keeps answering.
    let rss = |c: &TestCluster| -> u64 {
        let s = c.exec_ok("vm-001", &["grep", "VmRSS", "/proc/1/status"]);
        s.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let before = rss(&c);
    let mut child = Command::new(kimg_bin())
        .args([
            "exec",
            "--name",
            &c.name,
            "vm-001",
            "--",
            "head",
            "-c",
            "200000000",
            "/dev/zero",
        ])
        .env("KIMG_RUNTIME_DIR", c.runtime.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut total = 0u64;
    let mut big = vec![0u8; 1 << 20];
    let mut peak = before;
    let mut next_probe = 50_000_000u64;
    loop {
        let n = out.read(&mut big).unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
        if total >= next_probe {
            // Measured while the flood is in flight, through a second session.
            peak = peak.max(rss(&c));
            next_probe += 50_000_000;
        }
    }
    assert!(child.wait().unwrap().success());
    assert_eq!(total, 200_000_000);
    let after = rss(&c);
    eprintln!("kimg-init VmRSS: before {before} kB, peak during {peak} kB, after {after} kB");
    assert!(
        peak.max(after) < 64 * 1024,
        "kimg-init RSS {peak} kB / {after} kB"
    );
    let st = c.kimg("status", &[]);
    assert!(st.status.success(), "{}", text(&st));
}

fn sha256(p: &Path) -> String {
    let o = Command::new("sha256sum").arg(p).output().unwrap();
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn cp_copies_files_and_trees_in_and_out_with_modes_and_hashes() {
    let c = TestCluster::new("cp");
    start(&c, "1");
    let dir = tempfile::tempdir().unwrap();
    // A 50 MB file of varied bytes.
    let big = dir.path().join("big.bin");
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!("head -c 50000000 /dev/urandom > {}", big.display()))
        .status()
        .unwrap();
    assert!(o.success());
    let cp = |a: &str, b: &str| {
        let o = c.kimg("cp", &[a, b]);
        assert!(o.status.success(), "kimg cp {a} {b}:\n{}", text(&o));
    };
    cp(big.to_str().unwrap(), "vm-001:/root/");
    let guest = c.exec_ok("vm-001", &["sha256sum", "/root/big.bin"]);
    assert!(guest.starts_with(&sha256(&big)), "{guest}");
    let back = dir.path().join("back.bin");
    cp("vm-001:/root/big.bin", back.to_str().unwrap());
    assert_eq!(sha256(&back), sha256(&big));

    // A tree with a symlink, a 0700 dir and an executable.
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("private/deep")).unwrap();
    std::fs::write(tree.join("private/deep/key"), "secret\n").unwrap();
    std::fs::write(tree.join("run.sh"), "#!/bin/sh\necho ran\n").unwrap();
    std::fs::set_permissions(tree.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("private/deep/key", tree.join("link")).unwrap();
    std::fs::set_permissions(tree.join("private"), std::fs::Permissions::from_mode(0o700)).unwrap();
    cp(tree.to_str().unwrap(), "vm-001:/root/tree");
    let listing = c.exec_ok(
        "vm-001",
        &["sh", "-c", "cd /root/tree && stat -c '%a %F %n' private run.sh link && readlink link && cat link && ./run.sh"],
    );
    assert!(listing.contains("700 directory private"), "{listing}");
    assert!(listing.contains("755 regular file run.sh"), "{listing}");
    assert!(listing.contains("symbolic link link"), "{listing}");
    assert!(
        listing.contains("private/deep/key\nsecret\nran\n"),
        "{listing}"
    );
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    cp("vm-001:/root/tree", out.to_str().unwrap());
    let got = out.join("tree");
    assert_eq!(mode(&got.join("private")), 0o700);
    assert_eq!(mode(&got.join("run.sh")), 0o755);
    assert_eq!(
        std::fs::read_link(got.join("link")).unwrap(),
        Path::new("private/deep/key")
    );
    assert_eq!(
        std::fs::read_to_string(got.join("private/deep/key")).unwrap(),
        "secret\n"
    );
}
