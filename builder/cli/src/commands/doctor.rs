//! `kimg doctor`: checks this host for what kimg needs.

use kimg_cluster::doctor;
use std::process::ExitCode;

/// Check this host for what kimg needs: QEMU and its version, qemu-img, vde_switch,
/// e2fsprogs, busybox, systemd-boot, apt for kernels, OVMF for --uefi, tmux, free disk
/// and memory; whether KVM will be used and why not; the apt-get command that installs
/// what is missing. Exits 1 when something essential is missing.
#[derive(clap::Args)]
pub struct Args {
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `kimg doctor`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let scratch = tempfile::Builder::new().prefix("kimg-doctor-").tempdir()?;
    let r = doctor::check(&kimg_util::cache::cache_dir(), scratch.path());
    let code = if r.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::EXIT_FAILURE)
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(code);
    }
    let w = r.checks.iter().map(|c| c.name.len()).max().unwrap_or(8);
    for c in &r.checks {
        let mark = match (c.ok, c.essential) {
            (true, _) => "ok",
            (false, true) => "MISSING",
            (false, false) => "missing",
        };
        println!("{mark:<8} {:<w$} {}", c.name, c.detail);
        if !c.ok {
            let pkg = c.package.map(|p| format!(" [{p}]")).unwrap_or_default();
            println!("{:<8} {:<w$} needed for {}{pkg}", "", "", c.needed_for);
        }
    }
    println!("accel    {:<w$} {}", r.accel.accel.as_str(), r.accel.reason);
    match &r.install_command {
        Some(cmd) => println!("\ninstall what is missing:\n  {cmd}"),
        None => println!("\nnothing is missing"),
    }
    if !r.ok {
        eprintln!("kimg doctor: something essential (MISSING) is not there");
    }
    Ok(code)
}
