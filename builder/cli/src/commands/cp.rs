//! `kimg cp`: copy files and directory trees between the host and a VM.

use kimg_cluster as cluster;
use kimg_contract::VmId;
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

/// Copy a file or a directory tree between the host and a VM, through the agent
/// (docker cp conventions): `VM:PATH` on one side. Into an existing directory the
/// copy lands under its own name; otherwise it is created as DST. Modes (0700 stays
/// 0700), symlinks (copied as symlinks) and directories are kept; each file's sha256
/// is checked on the receiving side. Nothing is written through a symlink below the
/// destination.
///
/// Examples:
///
///   kimg cp ./tool vm-001:/usr/local/bin/     # into a directory
///   kimg cp ./conf vm-002:/etc/myapp          # a tree, created as /etc/myapp
///   kimg cp vm-001:/var/log/kimg ./logs       # out of the VM
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Cluster name.
    #[arg(long, default_value = super::DEFAULT_CLUSTER)]
    name: String,
    /// Source: a host path or VM:PATH.
    src: String,
    /// Destination: a host path or VM:PATH.
    dst: String,
}

/// `VM:PATH` split, if `s` names a VM (vm-001:/x or 1:/x); relative paths are from /.
fn vm_path(s: &str) -> Option<(VmId, String)> {
    let (vm, path) = s.split_once(':')?;
    let vm: VmId = vm.parse().ok()?;
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    Some((vm, path))
}

/// Runs `kimg cp`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let start = Instant::now();
    let (report, what) = match (vm_path(&a.src), vm_path(&a.dst)) {
        (None, Some((vm, dest))) => (
            cluster::copy_in(&a.name, vm, Path::new(&a.src), &dest)?,
            format!("to {vm}:{dest}"),
        ),
        (Some((vm, src)), None) => (
            cluster::copy_out(&a.name, vm, &src, Path::new(&a.dst))?,
            format!("from {vm}:{src}"),
        ),
        _ => anyhow::bail!(
            "one of SRC and DST must be VM:PATH (e.g. vm-001:/tmp), the other a host path"
        ),
    };
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "kimg cp: {} files ({:.1} MB, sha256 checked) and {} directories/symlinks copied {what} in {secs:.2} s",
        report.files,
        report.bytes as f64 / 1e6,
        report.others
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_paths_are_told_from_host_paths() {
        let (vm, p) = vm_path("vm-001:/tmp/x").unwrap();
        assert_eq!(
            (vm.hostname(), p.as_str()),
            ("vm-001".to_string(), "/tmp/x")
        );
        assert_eq!(vm_path("3:etc").unwrap().1, "/etc");
        assert!(vm_path("./a:b").is_none());
        assert!(vm_path("/tmp/x").is_none());
    }
}
