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
    let release = nix::sys::utsname::uname().context(|| "uname")?;
    let base = Path::new(MODULES_DIR).join(release.release());
    let mut loaded = Loaded::default();
    for rel in parse_modules_load(&text) {
        let path: PathBuf = base.join(rel);
        match load_one(&path) {
            Ok(()) => loaded.ok += 1,
            Err(e) => loaded.failed.push(e.to_string()),
        }
    }
    Ok(loaded)
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
    fn missing_list_is_nothing_to_load() {
        let l = load_list("/nonexistent/modules.load").unwrap();
        assert_eq!((l.ok, l.failed.len()), (0, 0));
    }
}
