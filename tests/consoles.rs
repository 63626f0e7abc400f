//! End-to-end: the serial console as a person uses it, driven through tmux
//! (send-keys, capture-pane): `kimg console vm-002` gives a prompt that answers
//! `hostname`, `kimg consoles` makes one tmux window per VM, and
//! `--append kimg.console=off` leaves the console without a shell.

use kimg_tests::{image, kimg_bin, text, TestCluster};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A tmux server of this test only (its own TMUX_TMPDIR), killed on drop.
struct Tmux {
    dir: tempfile::TempDir,
}

impl Tmux {
    fn new() -> Tmux {
        assert!(
            kimg_util::cmd::exists("tmux"),
            "tmux is missing: apt-get install tmux (scripts/setup-host installs it)"
        );
        Tmux {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A command with this server's environment (and not the one of a tmux the
    /// tests may run in).
    fn command(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        c.env("TMUX_TMPDIR", self.dir.path()).env_remove("TMUX");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(Path::new("tmux")).args(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "tmux {args:?}:\n{}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Types `keys` and Enter into `target`, then waits until its screen has a line
    /// that is exactly `line`; returns the screen.
    fn type_and_wait_for(&self, target: &str, keys: &str, line: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut screen = String::new();
        // A slow boot may still be printing: type again every 15 s until the answer.
        let mut typed = Instant::now() - Duration::from_secs(60);
        while Instant::now() < deadline {
            if typed.elapsed() > Duration::from_secs(15) {
                self.ok(&["send-keys", "-t", target, keys, "Enter"]);
                typed = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(500));
            screen = self.ok(&["capture-pane", "-p", "-t", target]);
            if screen.lines().any(|l| l.trim_end() == line) {
                return screen;
            }
        }
        panic!("{target}: no line {line:?} after typing {keys:?}; screen:\n{screen}");
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

fn quote(p: &Path) -> String {
    format!("'{}'", p.display())
}

/// `nodes` nodes from vm-001 on, ready, with `extra` arguments to `kimg run`.
fn nodes(name: &str, nodes: &str, extra: &[&str]) -> TestCluster {
    let img = image().image.to_str().unwrap();
    let c = TestCluster::new(name);
    let mut args = vec![
        "--image",
        img,
        "--nodes",
        nodes,
        "--routers",
        "0",
        "--wait=300",
    ];
    args.extend_from_slice(extra);
    let run = c.kimg("run", &args);
    assert!(run.status.success(), "kimg run:\n{}", text(&run));
    c
}

#[test]
fn kimg_console_vm_002_gives_a_prompt_and_kimg_consoles_a_window_per_vm() {
    let c = nodes("console", "2", &[]);
    let tmux = Tmux::new();
    let console = format!(
        "KIMG_RUNTIME_DIR={} {} console --name {} vm-002",
        quote(c.runtime.path()),
        quote(&kimg_bin()),
        c.name
    );
    tmux.ok(&[
        "new-session",
        "-d",
        "-s",
        "t",
        "-x",
        "100",
        "-y",
        "30",
        &console,
    ]);
    let screen = tmux.type_and_wait_for("t", "hostname", "vm-002");
    assert!(screen.contains("vm-002:~#"), "a root prompt: {screen}");
    // ctrl-c stops the command in the foreground: PID 1 blocks SIGINT for itself,
    // and the console's shell and its commands must not inherit that.
    tmux.ok(&["send-keys", "-t", "t", "sleep 600", "Enter"]);
    c.wait_for_process("vm-002", "sleep 600", Duration::from_secs(60));
    tmux.ok(&["send-keys", "-t", "t", "C-c"]);
    tmux.type_and_wait_for("t", "echo interrupted-$((6*7))", "interrupted-42");
    // ctrl-] detaches: kimg console ends, and with it the window and the session.
    tmux.ok(&["send-keys", "-t", "t", "C-]"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while tmux.run(&["has-session", "-t", "t"]).status.success() {
        assert!(Instant::now() < deadline, "kimg console did not detach");
        std::thread::sleep(Duration::from_millis(200));
    }

    let session = format!("kimg-{}", c.name);
    // `kimg consoles --detach`: it prints how to attach, and makes one window per VM.
    let consoles = || {
        let o = tmux
            .command(&kimg_bin())
            .args(["consoles", "--name", &c.name, "--detach"])
            .env("KIMG_RUNTIME_DIR", c.runtime.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "kimg consoles:\n{}", text(&o));
        assert_eq!(
            String::from_utf8_lossy(&o.stdout).trim(),
            format!("tmux attach -t {session}")
        );
        let windows = tmux.ok(&["list-windows", "-t", &session, "-F", "#{window_name}"]);
        assert_eq!(windows.lines().collect::<Vec<_>>(), ["vm-001", "vm-002"]);
    };
    consoles();
    tmux.type_and_wait_for(&format!("{session}:vm-001"), "hostname", "vm-001");
    // Again, while it is the server's only session: replaced, not doubled, and the
    // new windows' consoles (queued behind the old ones) answer once the old go.
    for round in 0..3 {
        consoles();
        let sessions = tmux.ok(&["list-sessions", "-F", "#{session_name}"]);
        assert_eq!(sessions.trim(), session);
        tmux.type_and_wait_for(
            &format!("{session}:vm-002"),
            &format!("echo round-$(({round}+100))"),
            &format!("round-{}", round + 100),
        );
    }
}

#[test]
fn kimg_run_with_console_off_leaves_the_console_without_a_shell() {
    let c = nodes("console-off", "1", &["--append", "kimg.console=off"]);
    let ps = c.processes("vm-001");
    assert!(!ps.contains("/bin/sh -l"), "no console shell:\n{ps}");
    let log = c.kimg("logs", &["vm-001"]);
    assert!(
        String::from_utf8_lossy(&log.stdout).contains("ready in"),
        "{}",
        text(&log)
    );
    drop(c);
    let on = nodes("console-on", "1", &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ps = on.processes("vm-001");
        if ps.contains("/bin/sh -l") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no console shell by default:\n{ps}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}
