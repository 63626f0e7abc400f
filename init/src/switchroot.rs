//! Stage 1's end: mount the root partition at /newroot, move the kernel filesystems
//! over, free the initramfs, make /newroot the root and exec its /sbin/init.

use crate::error::{Context, Error, Result};
use nix::mount::{mount, MsFlags};
use nix::unistd::{chdir, chroot, execv};
use std::convert::Infallible;
use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Where the root partition is mounted before it becomes `/`.
pub const NEWROOT: &str = "/newroot";
/// Filesystem of the root partition.
pub const ROOT_FSTYPE: &str = "ext4";
/// Mounts that move from the initramfs into the new root.
pub const MOVED: &[&str] = &["/dev", "/proc", "/sys", "/run"];
/// The init of the root filesystem (kimg-init again, as stage 2).
pub const NEXT_INIT: &str = "/sbin/init";

/// Mounts `dev` read-write at [`NEWROOT`].
pub fn mount_root(dev: &Path) -> Result<()> {
    std::fs::create_dir_all(NEWROOT).context(|| format!("create {NEWROOT}"))?;
    mount(
        Some(dev),
        NEWROOT,
        Some(ROOT_FSTYPE),
        MsFlags::empty(),
        Some(""),
    )
    .context(|| format!("mount {} at {NEWROOT} ({ROOT_FSTYPE})", dev.display()))
}

/// Starts reading what stage 2 reads first from the root into the page cache (its
/// init, the modules on its list) while stage 1 finishes: readahead, not waited for,
/// so the disk works while the CPU removes the initramfs. Measured under TCG:
/// switch_root to stage 2's first line 155 -> 71 ms, stage 2 to ready 443 -> 342 ms
/// (medians of 7). A failure only loses the head start.
pub fn prefetch_stage2() {
    let mut files = vec![std::path::PathBuf::from(format!("{NEWROOT}{NEXT_INIT}"))];
    let list = format!("{NEWROOT}{}", crate::modules::MODULES_LOAD);
    if let Ok(text) = std::fs::read_to_string(list) {
        files.extend(crate::modules::listed_files(Path::new(NEWROOT), &text).unwrap_or_default());
    }
    for path in files {
        if let Ok(f) = std::fs::File::open(&path) {
            let _ = nix::fcntl::posix_fadvise(
                &f,
                0,
                0,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
            );
        }
    }
}

/// Switches to the root mounted at [`NEWROOT`] and execs its init; returns only on failure.
pub fn switch_root() -> Result<Infallible> {
    let next = format!("{NEWROOT}{NEXT_INIT}");
    // Check before anything is moved or deleted, so a failure leaves a usable initramfs.
    if !Path::new(&next).exists() {
        return Err(Error::msg(format!(
            "{next} does not exist on the root partition"
        )));
    }
    for m in MOVED {
        let target = format!("{NEWROOT}{m}");
        std::fs::create_dir_all(&target).context(|| format!("create {target}"))?;
        mount(
            Some(*m),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .context(|| format!("move {m} to {target}"))?;
    }
    let root_dev = std::fs::symlink_metadata("/").context(|| "stat /")?.dev();
    let freed = remove_tree(Path::new("/"), root_dev);
    info!("switch_root: freed {} KiB of initramfs", freed / 1024);
    chdir(NEWROOT).context(|| format!("chdir {NEWROOT}"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .context(|| format!("move {NEWROOT} to /"))?;
    chroot(".").context(|| "chroot .")?;
    chdir("/").context(|| "chdir /")?;
    let path = CString::new(NEXT_INIT).context(|| "init path")?;
    execv(&path, &[&path]).context(|| format!("exec {NEXT_INIT}"))
}

/// Deletes everything under `dir` that is on device `dev` (never entering other
/// mounts, so /newroot is kept). Returns the bytes freed; failures are skipped.
fn remove_tree(dir: &Path, dev: u64) -> u64 {
    let mut freed = 0;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.dev() != dev {
            continue;
        }
        if meta.is_dir() {
            freed += remove_tree(&path, dev);
            if path != Path::new(NEWROOT) {
                // A mount point (other device inside) cannot be removed; that's fine.
                let _ = std::fs::remove_dir(&path);
            }
        } else if std::fs::remove_file(&path).is_ok() {
            freed += meta.len();
        }
    }
    freed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_tree_stays_on_its_device() {
        let base = std::env::temp_dir().join(format!("kimg-init-rm-{}", std::process::id()));
        std::fs::create_dir_all(base.join("a/b")).unwrap();
        std::fs::write(base.join("a/b/f"), b"12345").unwrap();
        std::os::unix::fs::symlink("/etc", base.join("a/link")).unwrap();
        let dev = std::fs::metadata(&base).unwrap().dev();
        assert_eq!(remove_tree(&base, dev + 1), 0, "other device: untouched");
        assert!(base.join("a/b/f").exists());
        assert_eq!(remove_tree(&base, dev), 5 + 4, "the file and the symlink");
        assert!(std::fs::read_dir(&base).unwrap().next().is_none());
        assert!(Path::new("/etc").exists());
        std::fs::remove_dir(&base).unwrap();
    }
}
