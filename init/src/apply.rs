//! `kimg apply` in the guest: the overlay cdrom the host just put into the drive,
//! applied to the running VM the way the boot applies its cdrom (same unpacker,
//! same name order), then what the boot does after the overlays: the start hooks
//! (the ones these overlays carry), the sysctls, and the services
//! (new ones started, changed ones restarted). Every overlay is checked before any
//! is unpacked, so an overlay with an entry that can never be written changes
//! nothing. One apply at a time; the cdrom is unmounted again whatever happened.

use crate::{hooks, overlays, services, sysctl, unpack};
use kimg_contract::agent::{ApplyReport, MAX_FRAME};
use kimg_contract::cdrom::{MOUNT_POINT, START_DIR};
use kimg_contract::VmId;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, TryLockError};
use std::time::{Duration, Instant};

/// How long the medium the host inserted may take to show up.
pub const MEDIUM_WAIT: Duration = Duration::from_secs(20);
/// Refused entries named per overlay in an error.
const SHOWN: usize = 5;
/// Lines kept per list of a report, and characters per line: the report is one frame.
const MAX_LINES: usize = 40;
const MAX_CHARS: usize = 400;

/// Held while an apply runs.
static BUSY: Mutex<()> = Mutex::new(());

/// Applies the cdrom whose content hash is `cdrom_sha256`; `Err` names the overlay
/// (and its entries) that failed and what was applied before it.
pub fn apply(cdrom_sha256: &str) -> Result<ApplyReport, String> {
    let _busy = match BUSY.try_lock() {
        Ok(g) => g,
        Err(TryLockError::Poisoned(p)) => p.into_inner(),
        Err(TryLockError::WouldBlock) => {
            return Err(
                "another apply is under way on this VM: wait for it to end, then apply again"
                    .into(),
            )
        }
    };
    let start = Instant::now();
    let cd = overlays::find_hash(cdrom_sha256, MEDIUM_WAIT).ok_or_else(|| {
        format!(
            "no /dev/sr* holds the cdrom with sha256 {cdrom_sha256} after {}s (did the host insert it into drive cdrom0?)",
            MEDIUM_WAIT.as_secs()
        )
    })?;
    overlays::mount(&cd.dev).map_err(|e| format!("overlays: {e}"))?;
    let result = apply_mounted(Path::new(MOUNT_POINT), &cd.sha256);
    let unmounted = nix::mount::umount(MOUNT_POINT);
    let mut report = result?;
    if let Err(e) = unmounted {
        report
            .problems
            .push(format!("overlays: unmount {MOUNT_POINT}: {e}"));
    }
    report.secs = start.elapsed().as_secs_f64();
    info!(
        "apply: {} overlays in {:.2}s",
        report.overlays.len(),
        report.secs
    );
    Ok(report)
}

fn apply_mounted(dir: &Path, cdrom_sha256: &str) -> Result<ApplyReport, String> {
    let index = overlays::read_index(dir, cdrom_sha256).map_err(|e| format!("overlays: {e}"))?;
    let names = overlays::names(dir).map_err(|e| format!("overlays: {e}"))?;
    for name in &names {
        let refused = unpack::precheck(&dir.join(name), SHOWN)
            .map_err(|e| format!("overlay {name}: {e}; nothing was applied"))?;
        if !refused.is_empty() {
            return Err(format!(
                "overlay {name} refused, nothing was applied: {}; fix the overlay and apply again",
                refused.join("; ")
            ));
        }
    }
    let hooks_before = stamps(Path::new(START_DIR));
    let mut report = ApplyReport::default();
    for name in &names {
        let (r, refused) = overlays::unpack_one(dir, name, Path::new("/"), &index);
        let what = if r.failed() {
            r.result.clone()
        } else if !refused.is_empty() {
            let shown: Vec<&str> = refused.iter().take(SHOWN).map(String::as_str).collect();
            format!("entries refused: {}", shown.join("; "))
        } else {
            report.overlays.push(r);
            continue;
        };
        let before: Vec<&str> = report.overlays.iter().map(|o| o.name.as_str()).collect();
        let before = if before.is_empty() {
            "no overlay before it was applied".to_string()
        } else {
            format!("applied before it: {}", before.join(", "))
        };
        return Err(format!(
            "overlay {name}: {what}; {before}; start hooks and services not run: fix the overlay and apply again"
        ));
    }
    let hostname = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let hooks_after = stamps(Path::new(START_DIR));
    let changed: Vec<PathBuf> = hooks::list(Path::new(START_DIR))
        .into_iter()
        .filter(|h| hooks_after.get(h) != hooks_before.get(h))
        .collect();
    for r in hooks::run(&changed, &hostname) {
        match r {
            Ok(line) => report.hooks.push(line),
            Err(p) => {
                report.hooks.push(p.clone());
                report.problems.push(p);
            }
        }
    }
    for p in sysctl::apply_dir(Path::new(sysctl::SYSCTL_DIR)) {
        report.problems.push(format!("sysctl: {p}"));
    }
    if let Ok(vm) = hostname.parse::<VmId>() {
        let changes = services::reload(vm, &mut report.problems);
        report.started = changes.started;
        report.restarted = changes.restarted;
    }
    Ok(report)
}

/// What identifies each file of `dir` as the one it is: the unpacker replaces a
/// file by a new inode, so a file an overlay wrote has a new stamp.
fn stamps(dir: &Path) -> BTreeMap<PathBuf, (u64, u64, i64, i64)> {
    fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let md = fs::metadata(e.path()).ok()?;
                    Some((e.path(), (md.dev(), md.ino(), md.ctime(), md.ctime_nsec())))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The report as one frame's JSON: long lists and lines are cut.
pub fn report_json(report: &ApplyReport) -> Vec<u8> {
    let mut r = report.clone();
    for list in [
        &mut r.hooks,
        &mut r.started,
        &mut r.restarted,
        &mut r.problems,
    ] {
        if list.len() > MAX_LINES {
            let more = list.len() - MAX_LINES;
            list.truncate(MAX_LINES);
            list.push(format!("... and {more} more (see the VM's log)"));
        }
        for line in list.iter_mut() {
            if line.len() > MAX_CHARS {
                let mut cut = MAX_CHARS;
                while !line.is_char_boundary(cut) {
                    cut -= 1;
                }
                line.truncate(cut);
                line.push_str("...");
            }
        }
    }
    let json = serde_json::to_vec(&r).unwrap_or_default();
    if json.len() <= MAX_FRAME {
        return json;
    }
    r.overlays.truncate(MAX_LINES);
    r.hooks.clear();
    r.problems = vec!["the report was too long to send: see the VM's log".into()];
    serde_json::to_vec(&r).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_always_fits_one_frame() {
        let r = ApplyReport {
            problems: vec!["é".repeat(1000); 500],
            started: vec!["s".into()],
            ..ApplyReport::default()
        };
        let json = report_json(&r);
        assert!(json.len() <= MAX_FRAME);
        let back: ApplyReport = serde_json::from_slice(&json).unwrap();
        assert_eq!(back.problems.len(), MAX_LINES + 1);
        assert!(back.problems[0].ends_with("..."));
        assert_eq!(back.started, ["s"]);
    }

    #[test]
    fn stamps_change_when_a_file_is_replaced() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("50-hook");
        fs::write(&f, "a").unwrap();
        let before = stamps(t.path());
        assert_eq!(stamps(t.path()), before);
        // As the unpacker writes: unlink, then a new file.
        fs::remove_file(&f).unwrap();
        fs::write(&f, "a").unwrap();
        assert_ne!(stamps(t.path()).get(&f), before.get(&f));
    }
}
