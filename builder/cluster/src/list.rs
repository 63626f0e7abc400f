//! `kimg ls`: the clusters this user runs, read from the runtime root (each cluster's
//! `cluster.json`) with each VM's QEMU checked for life.

use crate::process::qemu_pid;
use crate::qemu::VmPaths;
use crate::state::{load, runtime_root};
use serde::Serialize;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

/// Whether a cluster's VMs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Liveness {
    /// Every VM's QEMU runs.
    Running,
    /// Some do.
    Partly,
    /// None does (`kimg stop --name NAME` cleans it up).
    Dead,
}

impl Liveness {
    /// How `kimg ls` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Liveness::Running => "running",
            Liveness::Partly => "partly",
            Liveness::Dead => "dead",
        }
    }
}

/// One cluster, as `kimg ls` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterSummary {
    /// Its name (`--name`).
    pub name: String,
    /// The base image it runs.
    pub image: PathBuf,
    /// How many VMs it has.
    pub vms: usize,
    /// How many of them run.
    pub running: usize,
    /// Running, partly or dead.
    pub state: Liveness,
    /// Unix time it was started.
    pub started: u64,
    /// Seconds since then.
    pub age_secs: u64,
    /// Its directory (console logs, sockets, layers).
    pub dir: PathBuf,
}

/// The clusters under the runtime root, by name. A directory without a readable
/// `cluster.json` (being made, or not kimg's) is left out.
pub fn clusters() -> Vec<ClusterSummary> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let Ok(entries) = std::fs::read_dir(runtime_root()) else {
        return Vec::new(); // no runtime root: nothing was ever started
    };
    let mut out: Vec<ClusterSummary> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let (dir, state) = load(&name).ok()?;
            let running = state
                .vms
                .iter()
                .filter(|r| qemu_pid(&VmPaths::new(&dir, r.vm)).is_some())
                .count();
            Some(ClusterSummary {
                name,
                image: state.image,
                vms: state.vms.len(),
                running,
                state: liveness(running, state.vms.len()),
                started: state.started,
                age_secs: now.saturating_sub(state.started),
                dir,
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn liveness(running: usize, vms: usize) -> Liveness {
    match running {
        0 => Liveness::Dead,
        n if n >= vms => Liveness::Running,
        _ => Liveness::Partly,
    }
}

/// An age as `kubectl get` prints it: 45s, 12m, 3h, 2d.
pub fn human_age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_counts_running_vms() {
        assert_eq!(liveness(0, 3), Liveness::Dead);
        assert_eq!(liveness(2, 3), Liveness::Partly);
        assert_eq!(liveness(3, 3), Liveness::Running);
        assert_eq!(liveness(0, 0), Liveness::Dead);
    }

    #[test]
    fn ages_read_like_kubectl() {
        assert_eq!(human_age(5), "5s");
        assert_eq!(human_age(600), "10m");
        assert_eq!(human_age(3 * 3600), "3h");
        assert_eq!(human_age(3 * 86400), "3d");
    }
}
