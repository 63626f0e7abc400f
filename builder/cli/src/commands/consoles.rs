//! `kimg consoles`: every VM's console as a window of one tmux session.

use anyhow::Context;
use kimg_cluster as cluster;
use std::io::IsTerminal;
use std::os::unix::process::CommandExt;
use std::process::ExitCode;

/// Open the serial console of every VM of a cluster as a window of one tmux session
/// (`kimg-NAME`), each window named by its VM and running `kimg console VM`: what
/// xcluster's xterm consoles were. From a terminal it attaches (switches client when
/// already inside tmux); with --detach, or without a terminal, it prints the command
/// to attach.
///
/// In tmux: ctrl-b n / ctrl-b p next / previous VM, ctrl-b w a list, ctrl-b d detach;
/// ctrl-] ends one VM's console and closes its window. An earlier session of the same
/// cluster is replaced. Needs tmux (apt-get install tmux).
///
/// Example: kimg consoles && kimg consoles --name c2 --detach
#[derive(clap::Args)]
pub struct Args {
    /// Cluster name.
    #[arg(long, default_value = super::DEFAULT_CLUSTER)]
    name: String,
    /// Make the session but do not attach; print `tmux attach -t SESSION`.
    #[arg(long)]
    detach: bool,
}

/// Runs `kimg consoles`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let kimg = std::env::current_exe().context("find the path of this kimg binary")?;
    let session = cluster::consoles::open(&kimg, &a.name)?;
    let terminal = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    if a.detach || !terminal {
        println!("tmux attach -t {session}");
        return Ok(ExitCode::SUCCESS);
    }
    // Inside tmux an attach would nest; switch this client over instead.
    let verb = if std::env::var_os("TMUX").is_some() {
        "switch-client"
    } else {
        "attach-session"
    };
    let e = kimg_util::cmd::command("tmux")
        .args([verb, "-t", &session])
        .exec();
    Err(e).with_context(|| format!("tmux {verb} -t {session}"))
}
