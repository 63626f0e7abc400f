//! The overlay cdrom at boot: find it by its label, mount it read-only, unpack each
//! overlay in name order onto /, once per VM disk, and report how each went. The
//! cdrom is unmounted once unpacked: what a VM's own cdrom carries (its secrets)
//! lives on only as the files unpacked, with their own modes.

use crate::unpack;
use kimg_contract::cdrom::{
    parse_app_use, parse_index, Applied, IndexEntry, OverlayReport, APPLIED_FILE, INDEX_NAME,
    MOUNT_POINT, PVD_APP_USE, PVD_OFFSET, VOLUME_LABEL,
};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long to wait for the cdrom's device to appear (SCSI scanning is asynchronous).
pub const WAIT: Duration = Duration::from_secs(20);

/// A kimg cdrom: its device and content hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cdrom {
    /// `/dev/srN`.
    pub dev: PathBuf,
    /// Content hash from the volume descriptor.
    pub sha256: String,
}

/// Reads the primary volume descriptor of `dev`: `Some(hash)` when it is a kimg cdrom.
pub fn probe(dev: &Path) -> Option<String> {
    let mut f = fs::File::open(dev).ok()?;
    f.seek(SeekFrom::Start(PVD_OFFSET)).ok()?;
    let mut pvd = vec![0u8; 2048];
    f.read_exact(&mut pvd).ok()?;
    parse_pvd(&pvd)
}

/// The content hash out of a primary volume descriptor labelled [`VOLUME_LABEL`].
pub fn parse_pvd(pvd: &[u8]) -> Option<String> {
    if pvd.len() < 2048 || pvd[0] != 1 || &pvd[1..6] != b"CD001" {
        return None;
    }
    let label = std::str::from_utf8(&pvd[40..72]).ok()?.trim_end();
    if label != VOLUME_LABEL {
        return None;
    }
    parse_app_use(&pvd[PVD_APP_USE..PVD_APP_USE + 512])
}

/// Waits up to `wait` for a /dev/sr* carrying a kimg cdrom.
pub fn find(wait: Duration) -> Option<Cdrom> {
    find_matching(wait, |_| true)
}

/// Waits up to `wait` for a /dev/sr* carrying the kimg cdrom whose hash is `sha256`
/// (a medium the host just inserted: the kernel notices it when the device is
/// opened, which probing does).
pub fn find_hash(sha256: &str, wait: Duration) -> Option<Cdrom> {
    find_matching(wait, |h| h == sha256)
}

fn find_matching(wait: Duration, wanted: impl Fn(&str) -> bool) -> Option<Cdrom> {
    let deadline = Instant::now() + wait;
    loop {
        let mut devs: Vec<PathBuf> = fs::read_dir("/dev")
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("sr"))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default();
        devs.sort();
        for dev in devs {
            if let Some(sha256) = probe(&dev).filter(|h| wanted(h)) {
                return Some(Cdrom { dev, sha256 });
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Finds, mounts and applies the cdrom onto `/`. Returns the reports and problems.
pub fn apply() -> (Vec<OverlayReport>, Vec<String>) {
    let Some(cd) = find(WAIT) else {
        return (
            vec![],
            vec![format!(
                "overlays: no /dev/sr* with volume label {VOLUME_LABEL:?} within {}s",
                WAIT.as_secs()
            )],
        );
    };
    if let Ok(text) = fs::read_to_string(APPLIED_FILE) {
        if let Ok(done) = serde_json::from_str::<Applied>(&text) {
            if done.cdrom_sha256 == cd.sha256 {
                info!(
                    "overlays: cdrom {} already applied to this disk",
                    &cd.sha256[..12]
                );
                let problems = failures(&done.overlays);
                let reports = done
                    .overlays
                    .into_iter()
                    .map(|r| OverlayReport {
                        this_boot: false,
                        ..r
                    })
                    .collect();
                return (reports, problems);
            }
        }
    }
    if let Err(e) = mount(&cd.dev) {
        return (vec![], vec![format!("overlays: {e}")]);
    }
    let dir = Path::new(MOUNT_POINT);
    let (index, mut problems) = match read_index(dir, &cd.sha256) {
        Ok(index) => (index, vec![]),
        Err(e) => {
            warn!("overlays: {e}; hashing every overlay instead");
            (vec![], vec![format!("overlays: {e}")])
        }
    };
    let reports = unpack_all(dir, Path::new("/"), &index);
    problems.extend(failures(&reports));
    if let Err(e) = nix::mount::umount(MOUNT_POINT) {
        problems.push(format!("overlays: unmount {MOUNT_POINT}: {e}"));
    }
    let applied = Applied {
        cdrom_sha256: cd.sha256,
        overlays: reports.clone(),
    };
    if let Err(e) = save(&applied) {
        problems.push(format!("overlays: save {APPLIED_FILE}: {e}"));
    }
    (reports, problems)
}

fn failures(reports: &[OverlayReport]) -> Vec<String> {
    reports
        .iter()
        .filter(|r| r.failed())
        .map(|r| format!("overlay {}: {}", r.name, r.result))
        .collect()
}

/// Mounts the cdrom `dev` read-only on [`MOUNT_POINT`].
pub fn mount(dev: &Path) -> std::io::Result<()> {
    use nix::mount::MsFlags;
    fs::create_dir_all(MOUNT_POINT)?;
    nix::mount::mount(
        Some(dev),
        MOUNT_POINT,
        Some("iso9660"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(|e| {
        std::io::Error::other(format!(
            "mount {} on {MOUNT_POINT} (iso9660): {e}",
            dev.display()
        ))
    })
}

/// The cdrom's index, if its sha256 is the hash in the volume descriptor.
pub fn read_index(dir: &Path, cdrom_sha256: &str) -> Result<Vec<IndexEntry>, String> {
    let path = dir.join(INDEX_NAME);
    let bytes = fs::read(&path).map_err(|e| format!("read {}: {e}", path.display()))?;
    let got = unpack::hex(&Sha256::digest(&bytes));
    if got != cdrom_sha256 {
        return Err(format!(
            "{} has sha256 {got}, the volume descriptor says {cdrom_sha256}",
            path.display()
        ));
    }
    let text = String::from_utf8(bytes).map_err(|_| format!("{} is not UTF-8", path.display()))?;
    parse_index(&text)
}

/// The overlays on the cdrom mounted at `dir`, in name order (the index left out).
pub fn names(dir: &Path) -> Result<Vec<String>, String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map_err(|e| format!("read {}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != INDEX_NAME)
        .collect();
    names.sort();
    Ok(names)
}

/// Unpacks every overlay of `dir` in name order onto `root`; `index` (checked by
/// [`read_index`], may be empty) gives their hashes.
pub fn unpack_all(dir: &Path, root: &Path, index: &[IndexEntry]) -> Vec<OverlayReport> {
    let names = match names(dir) {
        Ok(n) => n,
        Err(e) => {
            error!("overlays: {e}");
            return vec![];
        }
    };
    names
        .iter()
        .map(|name| unpack_one(dir, name, root, index).0)
        .collect()
}

/// Unpacks overlay `name` of `dir` onto `root`: its report, and the entries refused.
pub fn unpack_one(
    dir: &Path,
    name: &str,
    root: &Path,
    index: &[IndexEntry],
) -> (OverlayReport, Vec<String>) {
    let t = Instant::now();
    let mut log = |line: &str| warn!("overlay {name}: {line}");
    let known = index
        .iter()
        .find(|e| e.name == *name)
        .map(|e| (e.sha256.as_str(), e.size));
    let o = unpack::unpack_file(&dir.join(name), root, &mut log, known);
    let secs = t.elapsed().as_secs_f64();
    let result = match (&o.failed, o.refused.len()) {
        (Some(why), _) => format!("failed: {why}"),
        (None, 0) => "ok".to_string(),
        (None, n) => format!("ok, {n} entries refused"),
    };
    if o.failed.is_some() {
        error!("overlay {name}: {result}");
    } else {
        info!(
            "overlay {name}: {result} ({} entries, {secs:.2}s)",
            o.written
        );
    }
    let report = OverlayReport {
        name: name.to_string(),
        sha256: o.sha256,
        size: o.size,
        secs,
        result,
        this_boot: true,
    };
    (report, o.refused)
}

fn save(applied: &Applied) -> std::io::Result<()> {
    let path = Path::new(APPLIED_FILE);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_string_pretty(applied).map_err(std::io::Error::other)?;
    fs::write(&tmp, text)?;
    fs::File::open(&tmp)?.sync_all()?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvd_needs_the_label_and_the_hash() {
        let mut pvd = vec![0u8; 2048];
        pvd[0] = 1;
        pvd[1..6].copy_from_slice(b"CD001");
        pvd[40..72].copy_from_slice(format!("{:32}", "kimg").as_bytes());
        assert_eq!(parse_pvd(&pvd), None);
        let h = "0f".repeat(32);
        let au = kimg_contract::cdrom::app_use(&h);
        pvd[PVD_APP_USE..PVD_APP_USE + au.len()].copy_from_slice(au.as_bytes());
        assert_eq!(parse_pvd(&pvd), Some(h));
        pvd[40..72].copy_from_slice(format!("{:32}", "other").as_bytes());
        assert_eq!(parse_pvd(&pvd), None);
    }

    /// A cdrom directory with two plain tars and the index `kimg mkcdrom` would write.
    fn cdrom_dir(dir: &Path) -> (Vec<IndexEntry>, String) {
        let mut index = Vec::new();
        for (name, file, body) in [("01-a.tar", "a", "first"), ("02-b.tar", "b", "second")] {
            let mut b = tar::Builder::new(Vec::new());
            let mut h = tar::Header::new_gnu();
            h.set_size(body.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, format!("etc/{file}"), body.as_bytes())
                .unwrap();
            let bytes = b.into_inner().unwrap();
            fs::write(dir.join(name), &bytes).unwrap();
            index.push(IndexEntry {
                name: name.into(),
                size: bytes.len() as u64,
                sha256: unpack::hex(&Sha256::digest(&bytes)),
            });
        }
        let text = kimg_contract::cdrom::index_text(&index);
        fs::write(dir.join(INDEX_NAME), &text).unwrap();
        (index, unpack::hex(&Sha256::digest(text.as_bytes())))
    }

    #[test]
    fn the_index_is_trusted_only_when_it_matches_the_volume_hash() {
        let t = tempfile::tempdir().unwrap();
        let (index, cdrom_sha) = cdrom_dir(t.path());
        assert_eq!(read_index(t.path(), &cdrom_sha).unwrap(), index);
        let e = read_index(t.path(), &"00".repeat(32)).unwrap_err();
        assert!(e.contains("volume descriptor says"), "{e}");
        fs::remove_file(t.path().join(INDEX_NAME)).unwrap();
        assert!(read_index(t.path(), &cdrom_sha).is_err());
    }

    #[test]
    fn unpack_all_reports_indexed_hashes_and_hashes_what_the_index_lacks() {
        let t = tempfile::tempdir().unwrap();
        let cd = t.path().join("cd");
        let root = t.path().join("root");
        fs::create_dir_all(&cd).unwrap();
        fs::create_dir_all(&root).unwrap();
        let (index, _) = cdrom_dir(&cd);
        // With the index: its hashes, in name order, the index itself not unpacked.
        let r = unpack_all(&cd, &root, &index);
        let names: Vec<&str> = r.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["01-a.tar", "02-b.tar"]);
        assert_eq!(r[0].sha256, index[0].sha256);
        assert_eq!(r[1].size, index[1].size);
        assert!(r.iter().all(|r| r.result == "ok"), "{r:?}");
        assert_eq!(fs::read_to_string(root.join("etc/b")).unwrap(), "second");
        // An entry whose size does not match the file is not trusted: hashed instead.
        let mut wrong = index.clone();
        wrong[0].sha256 = "11".repeat(32);
        wrong[0].size += 1;
        let r = unpack_all(&cd, &root, &wrong);
        assert_eq!(r[0].sha256, index[0].sha256);
        // Without an index every overlay is hashed on the way through.
        let r = unpack_all(&cd, &root, &[]);
        assert_eq!(r[1].sha256, index[1].sha256);
        assert_eq!(r[1].size, index[1].size);
    }
}
