//! kimg's cache directory: downloaded kernel packages, unpacked kernels, fetched images.

use std::path::PathBuf;

/// `$KIMG_CACHE`, else `$XDG_CACHE_HOME/kimg`, else `~/.cache/kimg`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KIMG_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("kimg");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".cache").join("kimg")
}
