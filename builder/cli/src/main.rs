//! The `kimg` command: parses arguments and dispatches to the library.

use clap::{CommandFactory, Parser, Subcommand};
use std::process::ExitCode;

mod commands;

/// Build minimal bootable Linux images and boot throw-away QEMU clusters from them.
///
/// A typical session:
///
///   kimg build                    # Debian's cloud kernel -> out/hd.img + out/hd.json
///   kimg run --wait               # 4 nodes + 2 routers on closed networks
///   kimg exec vm-001 -- ip -br addr
///   kimg shell vm-001             # a terminal in the VM (`kimg cp` copies files)
///   kimg status
///   kimg stop
///
/// Overlays (`kimg mkcdrom`, `kimg run ... OVERLAY`) drop your files onto every VM at
/// boot; `kimg build --k8s --k8s-release DIR` makes the Kubernetes flavour.
#[derive(Parser)]
#[command(
    name = "kimg",
    version,
    about,
    long_about,
    verbatim_doc_comment,
    max_term_width = 100
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Build(commands::build::Args),
    Run(commands::run::Args),
    Status(commands::status::Args),
    Exec(commands::exec::Args),
    Shell(commands::shell::Args),
    Cp(commands::cp::Args),
    Stop(commands::stop::Args),
    Bench(commands::bench::Args),
    Console(commands::console::Args),
    Consoles(commands::consoles::Args),
    Logs(commands::logs::Args),
    Scaleout(commands::scale::OutArgs),
    Scalein(commands::scale::InArgs),
    Publish(commands::publish::Args),
    Fetch(commands::fetch::Args),
    Images(commands::images::Args),
    Mkcdrom(commands::mkcdrom::Args),
    Kernel(commands::kernel::Args),
    Kubectl(commands::kubectl::Args),
    Ls(commands::ls::Args),
    Doctor(commands::doctor::Args),
    Completions(commands::completions::Args),
    Man(commands::completions::ManArgs),
    Snapshot(commands::snapshot::Args),
    Suspend(commands::suspend::SuspendArgs),
    Resume(commands::suspend::ResumeArgs),
    Apply(commands::apply::Args),
}

fn main() -> ExitCode {
    restore_sigpipe();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Build(a) => commands::build::run(a),
        Command::Run(a) => commands::run::run(a),
        Command::Status(a) => commands::status::run(a),
        Command::Exec(a) => commands::exec::run(a),
        Command::Shell(a) => commands::shell::run(a),
        Command::Cp(a) => commands::cp::run(a),
        Command::Stop(a) => commands::stop::run(a),
        Command::Bench(a) => commands::bench::run(a),
        Command::Console(a) => commands::console::run(a),
        Command::Consoles(a) => commands::consoles::run(a),
        Command::Logs(a) => commands::logs::run(a),
        Command::Scaleout(a) => commands::scale::run_out(a),
        Command::Scalein(a) => commands::scale::run_in(a),
        Command::Publish(a) => commands::publish::run(a),
        Command::Fetch(a) => commands::fetch::run(a),
        Command::Images(a) => commands::images::run(a),
        Command::Mkcdrom(a) => commands::mkcdrom::run(a),
        Command::Kernel(a) => commands::kernel::run(a),
        Command::Kubectl(a) => commands::kubectl::run(a),
        Command::Ls(a) => commands::ls::run(a),
        Command::Doctor(a) => commands::doctor::run(a),
        Command::Completions(a) => commands::completions::run(a, Cli::command()),
        Command::Man(a) => commands::completions::run_man(a, Cli::command()),
        Command::Snapshot(a) => commands::snapshot::run(a),
        Command::Suspend(a) => commands::suspend::run_suspend(a),
        Command::Resume(a) => commands::suspend::run_resume(a),
        Command::Apply(a) => commands::apply::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kimg: error: {}", error_chain(&e));
            ExitCode::from(commands::EXIT_FAILURE)
        }
    }
}

/// The error and its causes joined by ": ", skipping a cause whose text the message
/// already carries (kimg's errors print their source themselves).
fn error_chain(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !msg.contains(&text) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&text);
        }
    }
    msg
}

/// Rust ignores SIGPIPE, so `kimg status | head` would panic on a closed pipe; a CLI
/// should just end quietly like other Unix tools.
fn restore_sigpipe() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: called first thing in main, before any thread exists; SIG_DFL installs
    // no Rust handler, so nothing can run in signal context.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seconds near u64::MAX once panicked in Instant arithmetic: clap refuses them.
    #[test]
    fn huge_wait_timeout_and_grace_are_refused_by_the_parser() {
        let huge = u64::MAX.to_string();
        let wait = format!("--wait={huge}");
        let wait_vms = format!("--wait=vms:{huge}");
        for args in [
            vec!["kimg", "stop", "--grace", &huge],
            vec!["kimg", "scalein", "--grace", &huge, "vm-001"],
            vec!["kimg", "exec", "--timeout", &huge, "vm-001", "--", "true"],
            vec!["kimg", "run", &wait],
            vec!["kimg", "scaleout", &wait, "vm-003"],
            vec!["kimg", "scaleout", &wait_vms, "vm-003"],
            vec!["kimg", "resume", &wait],
        ] {
            assert!(Cli::try_parse_from(&args).is_err(), "{args:?}");
        }
        let max = commands::MAX_SECS.to_string();
        assert!(Cli::try_parse_from(["kimg", "stop", "--grace", &max]).is_ok());
    }
}
