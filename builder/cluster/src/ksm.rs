//! Kernel same-page merging for big clusters. VMs booted from one image hold many
//! identical pages (the same kernel, page cache of the same files, zeroed memory).
//! QEMU marks guest RAM mergeable by default, but the host's ksmd merges only while
//! `/sys/kernel/mm/ksm/run` is 1, and most hosts leave it 0. Measured here (31 VMs
//! of 128 MiB, TCG, idle): their QEMUs' proportional memory went from 4065 to 2562
//! MiB within 60 s of turning it on, for ~6% of one core in ksmd.

use std::fs;
use std::path::Path;

/// Clusters of more VMs than this get KSM turned on: the size where the host's
/// memory, not its cores, starts to decide how many VMs it holds.
const BIG_CLUSTER: usize = 20;
/// ksmd's pages per wake-up (20 ms) when kimg turns it on. The kernel's default of
/// 100 scans ~20 MB/s, so 100 VMs' guest RAM would take over ten minutes a pass;
/// 1000 takes ~70 s.
const PAGES_TO_SCAN: u64 = 1000;

/// Left by kimg when it turned ksmd on, so that a stop that leaves no QEMU running
/// turns it off again (a ksmd someone else started is theirs).
const MARK: &str = "/run/kimg-ksm-on";

/// What [`share_pages_of`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KsmOutcome {
    /// ksmd was running already; its settings were left alone.
    AlreadyOn,
    /// kimg started it; it runs until a stop leaves no QEMU on the host.
    TurnedOn,
    /// It could not be turned on (no such kernel feature, not root, ...): why.
    Unavailable(String),
}

/// ksmd's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KsmStats {
    /// Whether ksmd runs (`run` is 1).
    pub running: bool,
    /// Pages mapped where identical ones were (the memory saved, in pages).
    pub pages_sharing: u64,
    /// Full passes over all mergeable memory so far.
    pub full_scans: u64,
}

/// The host's KSM directory.
const DIR: &str = "/sys/kernel/mm/ksm";

fn read(dir: &Path, file: &str) -> Option<u64> {
    fs::read_to_string(dir.join(file)).ok()?.trim().parse().ok()
}

/// ksmd's counters, if the host has KSM.
pub fn stats() -> Option<KsmStats> {
    stats_in(Path::new(DIR))
}

fn stats_in(dir: &Path) -> Option<KsmStats> {
    Some(KsmStats {
        running: read(dir, "run")? == 1,
        pages_sharing: read(dir, "pages_sharing")?,
        full_scans: read(dir, "full_scans")?,
    })
}

/// For a cluster of `vms` VMs (after a scaleout, all of them): above
/// [`BIG_CLUSTER`], starts ksmd if it is not running, scanning [`PAGES_TO_SCAN`]
/// pages per wake-up, and says what it found or did; else nothing.
pub fn share_pages_of(vms: usize) -> Option<KsmOutcome> {
    (vms > BIG_CLUSTER).then(|| ensure_on_in(Path::new(DIR), Path::new(MARK)))
}

fn ensure_on_in(dir: &Path, mark: &Path) -> KsmOutcome {
    match read(dir, "run") {
        None => KsmOutcome::Unavailable(format!(
            "{} is missing (a kernel without CONFIG_KSM)",
            dir.join("run").display()
        )),
        Some(1) => KsmOutcome::AlreadyOn,
        Some(_) => {
            let write = |file: &str, value: u64| {
                let path = dir.join(file);
                fs::write(&path, value.to_string())
                    .map_err(|e| format!("writing {}: {e}", path.display()))
            };
            match write("pages_to_scan", PAGES_TO_SCAN).and_then(|()| write("run", 1)) {
                Ok(()) => {
                    // Without the mark (no /run) ksmd stays on: it idles with nothing to merge.
                    let _ = fs::write(mark, "");
                    KsmOutcome::TurnedOn
                }
                Err(why) => KsmOutcome::Unavailable(why),
            }
        }
    }
}

/// After a stop: turns ksmd off again if kimg turned it on and no QEMU runs on the
/// host any more. Pages it merged stay merged until written.
pub fn off_when_unused() {
    off_when_unused_in(
        Path::new(DIR),
        Path::new(MARK),
        crate::process::any_qemu_runs(),
    );
}

fn off_when_unused_in(dir: &Path, mark: &Path, qemu_runs: bool) {
    if !qemu_runs && mark.exists() && fs::write(dir.join("run"), "0").is_ok() {
        let _ = fs::remove_file(mark);
    }
}

/// Unmerges every shared page (`run` = 2), then lets ksmd run on: how `kimg bench
/// scale` measures what the VMs hold without sharing, in the same run.
pub fn unmerge_all() -> std::io::Result<()> {
    let run = Path::new(DIR).join("run");
    fs::write(&run, "2")?;
    fs::write(&run, "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(run: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (f, v) in [
            ("run", run),
            ("pages_to_scan", "100"),
            ("pages_sharing", "7"),
            ("full_scans", "3"),
        ] {
            fs::write(d.path().join(f), format!("{v}\n")).unwrap();
        }
        d
    }

    #[test]
    fn turns_ksmd_on_with_a_faster_scan_and_off_after_the_last_qemu() {
        let d = fake("0");
        let mark = d.path().join("mark");
        assert_eq!(ensure_on_in(d.path(), &mark), KsmOutcome::TurnedOn);
        assert_eq!(read(d.path(), "run"), Some(1));
        assert_eq!(read(d.path(), "pages_to_scan"), Some(PAGES_TO_SCAN));
        let s = stats_in(d.path()).unwrap();
        assert!(
            s.running && s.pages_sharing == 7 && s.full_scans == 3,
            "{s:?}"
        );
        off_when_unused_in(d.path(), &mark, true);
        assert_eq!(read(d.path(), "run"), Some(1), "a QEMU still runs");
        off_when_unused_in(d.path(), &mark, false);
        assert_eq!(read(d.path(), "run"), Some(0));
        assert!(!mark.exists());
    }

    #[test]
    fn leaves_a_running_ksmd_as_the_host_tuned_it() {
        let d = fake("1");
        let mark = d.path().join("mark");
        assert_eq!(ensure_on_in(d.path(), &mark), KsmOutcome::AlreadyOn);
        assert_eq!(read(d.path(), "pages_to_scan"), Some(100));
        off_when_unused_in(d.path(), &mark, false);
        assert_eq!(read(d.path(), "run"), Some(1), "not kimg's to turn off");
    }

    #[test]
    fn a_host_without_ksm_is_named() {
        let d = tempfile::tempdir().unwrap();
        let KsmOutcome::Unavailable(why) = ensure_on_in(d.path(), &d.path().join("mark")) else {
            panic!("no run file, yet not unavailable");
        };
        assert!(why.contains("run is missing"), "{why}");
        assert_eq!(stats_in(d.path()), None);
    }
}
