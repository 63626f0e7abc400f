//! `kimg consoles`: every VM's serial console as a window of one tmux session (what
//! xcluster's xterm or screen consoles were), each window running `kimg console VM`.

use crate::error::ClusterError;
use kimg_contract::VmId;
use kimg_util::cmd;
use std::path::Path;

/// The tmux session of cluster `name`'s consoles.
pub fn session_name(name: &str) -> String {
    format!("kimg-{name}")
}

/// Quotes `s` for a POSIX shell (tmux runs a window's command with `sh -c`).
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The shell command of one window: `kimg console` of `vm`, with the runtime dir
/// passed on (a tmux server started earlier has another environment).
pub fn window_command(kimg: &Path, runtime: &Path, name: &str, vm: VmId) -> String {
    format!(
        "KIMG_RUNTIME_DIR={} exec {} console --name {} {vm}",
        sh_quote(&runtime.to_string_lossy()),
        sh_quote(&kimg.to_string_lossy()),
        sh_quote(name),
    )
}

/// The tmux command lines that make session `session` of cluster `name`: a detached
/// session whose first window is the first VM, then one window per further VM.
pub fn tmux_plan(
    kimg: &Path,
    runtime: &Path,
    session: &str,
    name: &str,
    vms: &[VmId],
) -> Vec<Vec<String>> {
    let mut plan = Vec::new();
    for (i, vm) in vms.iter().enumerate() {
        let cmd = window_command(kimg, runtime, name, *vm);
        let mut argv: Vec<String> = if i == 0 {
            vec![
                "new-session".into(),
                "-d".into(),
                "-s".into(),
                session.into(),
            ]
        } else {
            // `SESSION:` is the session's next free window index.
            vec![
                "new-window".into(),
                "-d".into(),
                "-t".into(),
                format!("{session}:"),
            ]
        };
        argv.extend(["-n".into(), vm.to_string(), cmd]);
        plan.push(argv);
    }
    plan
}

/// Makes the tmux session of cluster `name`'s consoles, one window per VM running
/// `kimg console` through the binary `kimg`; returns the session's name. An earlier
/// session of the same name is replaced, and kept if the new one cannot be made.
pub fn open(kimg: &Path, name: &str) -> Result<String, ClusterError> {
    let (_, state) = crate::state::load(name)?;
    if !cmd::exists("tmux") {
        return Err(ClusterError::Usage(
            "`kimg consoles` needs tmux: apt-get install tmux (or use `kimg console VM` per VM)"
                .into(),
        ));
    }
    let vms: Vec<VmId> = state.vms.iter().map(|r| r.vm).collect();
    let session = session_name(name);
    // Built under a name of its own, then renamed over the old session: killing the
    // old one first would leave a server with no session, which exits, and the next
    // command can reach it while it does ("server exited unexpectedly"). The new
    // windows' consoles wait in the console socket's backlog until the old ones go.
    let building = format!("{session}-new-{}", std::process::id());
    for argv in tmux_plan(kimg, &crate::state::runtime_root(), &building, name, &vms) {
        if let Err(e) = tmux(&argv) {
            let _ = tmux(&["kill-session", "-t", &format!("={building}")]);
            return Err(e.into());
        }
    }
    // No session of that name is the usual case: its failure means nothing.
    let _ = tmux(&["kill-session", "-t", &format!("={session}")]);
    tmux(&["rename-session", "-t", &format!("={building}"), &session])?;
    Ok(session)
}

/// Runs tmux with `argv`. A server that is still exiting (the user's last session
/// ended just before) makes tmux fail "server exited unexpectedly": tried again then,
/// for 10 s at most, by which time a new server is started.
fn tmux(argv: &[impl AsRef<std::ffi::OsStr>]) -> Result<std::process::Output, cmd::CmdError> {
    let mut tries = 100;
    loop {
        match cmd::run(cmd::command("tmux").args(argv)) {
            Err(cmd::CmdError::Failed { stderr, .. })
                if tries > 0 && stderr.contains("server exited unexpectedly") =>
            {
                tries -= 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            done => return done,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_window_per_vm_named_by_vm() {
        let vms: Vec<VmId> = [1, 2, 201]
            .into_iter()
            .map(|n| VmId::new(n).unwrap())
            .collect();
        let plan = tmux_plan(
            Path::new("/bin/kimg"),
            Path::new("/run/k m"),
            "kimg-c1",
            "c1",
            &vms,
        );
        assert_eq!(plan.len(), 3);
        assert_eq!(plan[0][..4], ["new-session", "-d", "-s", "kimg-c1"]);
        assert_eq!(plan[1][..4], ["new-window", "-d", "-t", "kimg-c1:"]);
        let names: Vec<&str> = plan.iter().map(|a| a[5].as_str()).collect();
        assert_eq!(names, ["vm-001", "vm-002", "vm-201"]);
        assert_eq!(
            plan[2][6],
            "KIMG_RUNTIME_DIR='/run/k m' exec '/bin/kimg' console --name 'c1' vm-201"
        );
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }
}
