//! `kimg bench <suite>`: the figures the issues ask for, each measured side by side
//! with what it is compared to, in one run. One module per suite.

pub mod boot;
pub mod cdrom;
pub mod cluster;
pub mod exec;
pub mod k8s;
pub mod k8s_start;
pub mod kernel;
pub mod publish;
pub mod scale;
pub mod snapshot;

use kimg_cluster::qemu::VmPaths;
use kimg_contract::VmId;
use kimg_util::fs::IoError;
use nix::unistd::Pid;

/// Errors of every suite: what failed underneath, or a step of the suite itself.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Building an image failed.
    #[error(transparent)]
    Build(#[from] kimg_image::BuildError),
    /// Building a kernel failed.
    #[error(transparent)]
    Source(#[from] kimg_kernel::source::SourceError),
    /// A cluster step failed.
    #[error(transparent)]
    Cluster(#[from] kimg_cluster::ClusterError),
    /// Publishing (compressing) failed.
    #[error(transparent)]
    Publish(#[from] kimg_image::publish::PublishError),
    /// Fetching failed.
    #[error(transparent)]
    Fetch(#[from] kimg_image::fetch::FetchError),
    /// A command failed.
    #[error(transparent)]
    Command(#[from] kimg_util::cmd::CmdError),
    /// A file of the suite could not be read or written.
    #[error(transparent)]
    Io(#[from] IoError),
    /// A step of the suite itself failed.
    #[error("{step}: {why}")]
    Step {
        /// What was being done.
        step: String,
        /// Why it failed.
        why: String,
    },
}

/// Turns an error into a [`BenchError::Step`] named `step`.
pub fn step<E: std::fmt::Display>(step: &str) -> impl FnOnce(E) -> BenchError + '_ {
    move |e| BenchError::Step {
        step: step.to_string(),
        why: e.to_string(),
    }
}

/// The QEMU of each VM of cluster `name` that runs.
pub(crate) fn qemu_pids(name: &str) -> Result<Vec<(VmId, Pid)>, BenchError> {
    let (dir, state) = kimg_cluster::load(name)?;
    Ok(state
        .vms
        .iter()
        .filter_map(|r| Some((r.vm, kimg_cluster::qemu_pid(&VmPaths::new(&dir, r.vm))?)))
        .collect())
}

/// utime + stime of a process in seconds; 0 once it is gone.
pub(crate) fn cpu_secs(pid: Pid) -> f64 {
    kimg_cluster::process::cpu_time(pid).map_or(0.0, |d| d.as_secs_f64())
}

/// The median of some samples (0 when empty).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
