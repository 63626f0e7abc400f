//! `kimg completions SHELL` and `kimg man`: shell completions and the man page, made
//! from the command line's own definition.
//!
//! Printed by the binary rather than made at build time: `cargo install` installs one
//! file, so the user puts these where their shell or man looks.

use std::process::ExitCode;

/// Print shell completions, e.g. `kimg completions bash >
/// ~/.local/share/bash-completion/completions/kimg`, `kimg completions zsh >
/// ~/.zfunc/_kimg`, `kimg completions fish > ~/.config/fish/completions/kimg.fish`.
#[derive(clap::Args)]
pub struct Args {
    /// The shell.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

/// Print kimg's man page (roff), e.g. `kimg man > ~/.local/share/man/man1/kimg.1`,
/// or read it with `kimg man | man -l -`.
#[derive(clap::Args)]
pub struct ManArgs {}

/// Runs `kimg completions`; `cli` is kimg's command line.
pub fn run(a: Args, mut cli: clap::Command) -> anyhow::Result<ExitCode> {
    clap_complete::generate(a.shell, &mut cli, "kimg", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}

/// Runs `kimg man`; `cli` is kimg's command line.
pub fn run_man(_: ManArgs, cli: clap::Command) -> anyhow::Result<ExitCode> {
    clap_mangen::Man::new(cli).render(&mut std::io::stdout())?;
    Ok(ExitCode::SUCCESS)
}
