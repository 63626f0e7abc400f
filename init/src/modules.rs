//! Kernel module loading: `/etc/kimg/modules.load` lists `.ko` files relative to
//! `/lib/modules/<uname -r>/`, one per line, dependencies first; each is loaded with
//! finit_module(2).

use crate::error::{Context, Result};
use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};
use std::fs::File;
use std::path::{Path, PathBuf};

pub use kimg_contract::boot::{parse_modules_load, MODULES_LOAD};
/// Parent of the per-kernel module trees.
pub const MODULES_DIR: &str = "/lib/modules";

/// Outcome of loading a list: how many were loaded (or already there) and which failed.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Modules loaded now or found already loaded.
    pub ok: usize,
    /// `path: why` for each module that failed.
    pub failed: Vec<String>,
}

/// Loads every module `list` names. A missing list means nothing to load. A failing
/// module is recorded and the rest are still tried.
pub fn load_list(list: &str) -> Result<Loaded> {
    let text = match std::fs::read_to_string(list) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Loaded::default()),
        Err(e) => return Err(e).context(|| format!("read {list}")),
    };
    let mut loaded = Loaded::default();
    for path in listed_files(Path::new("/"), &text)? {
        match load_one(&path) {
            Ok(()) => loaded.ok += 1,
            Err(e) => loaded.failed.push(e.to_string()),
        }
    }
    Ok(loaded)
}

/// The module files a `modules.load` list names, in the running kernel's module tree
/// under `root` (`/`, or the root stage 1 mounted).
pub fn listed_files(root: &Path, list: &str) -> Result<Vec<PathBuf>> {
    let release = nix::sys::utsname::uname().context(|| "uname")?;
    let base = root
        .join(MODULES_DIR.trim_start_matches('/'))
        .join(release.release());
    Ok(parse_modules_load(list)
        .into_iter()
        .map(|rel| base.join(rel))
        .collect())
}

/// Smallest free block, as a power of two of 4 KiB pages, that the balloon reports
/// back to the host. The kernel takes the pageblock order (2 MiB) when the balloon
/// registers, and reports only while a zone has that order's batch (32 blocks, 64
/// MiB) free above its low watermark: a small VM never does.
pub const PAGE_REPORTING_ORDER: u32 = 5;
/// Where the kernel reads [`PAGE_REPORTING_ORDER`] (built-in `page_reporting`).
const PAGE_REPORTING_PARAM: &str = "/sys/module/page_reporting/parameters/page_reporting_order";

/// Sets the free page reporting order once the balloon is loaded (a kernel without
/// page reporting has nothing to set).
pub fn report_small_free_blocks() -> Result<()> {
    if !Path::new(PAGE_REPORTING_PARAM).exists() {
        return Ok(());
    }
    std::fs::write(PAGE_REPORTING_PARAM, PAGE_REPORTING_ORDER.to_string())
        .context(|| PAGE_REPORTING_PARAM.to_string())
}

fn load_one(path: &Path) -> Result<()> {
    let f = File::open(path).context(|| format!("{}", path.display()))?;
    match finit_module(&f, c"", ModuleInitFlags::empty()) {
        Ok(()) | Err(Errno::EEXIST) => Ok(()),
        Err(e) => Err(e).context(|| format!("{}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_keeps_order_and_skips_noise() {
        let text = "kernel/drivers/virtio/virtio.ko\n\n  # comment\nkernel/drivers/virtio/virtio_ring.ko  \n\
                    kernel/drivers/block/virtio_blk.ko";
        assert_eq!(
            parse_modules_load(text),
            [
                "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/block/virtio_blk.ko"
            ]
        );
        assert!(parse_modules_load("").is_empty());
    }

    #[test]
    fn listed_files_are_in_the_running_kernels_tree_under_the_root() {
        let release = nix::sys::utsname::uname().unwrap();
        let release = release.release().to_string_lossy();
        let files = listed_files(
            Path::new("/newroot"),
            "kernel/a.ko\n# no\n\nkernel/b/c.ko\n",
        )
        .unwrap();
        assert_eq!(
            files,
            [
                PathBuf::from(format!("/newroot/lib/modules/{release}/kernel/a.ko")),
                PathBuf::from(format!("/newroot/lib/modules/{release}/kernel/b/c.ko")),
            ]
        );
    }

    #[test]
    fn missing_list_is_nothing_to_load() {
        let l = load_list("/nonexistent/modules.load").unwrap();
        assert_eq!((l.ok, l.failed.len()), (0, 0));
    }
}
