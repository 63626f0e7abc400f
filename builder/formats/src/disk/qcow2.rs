//! qemu-img calls: raw -> qcow2, and reading byte ranges back out of a qcow2.

use super::DiskError;
use kimg_util::cmd;
use std::path::{Path, PathBuf};

/// Converts the raw disk `raw` into a qcow2 (v3, `compat=1.1`) at `out`; with
/// `compress`, every cluster is zstd-compressed (`-c`, `compression_type=zstd`).
///
/// Writes stay in order (no `-W`), so the same raw input gives the same qcow2 bytes.
pub fn from_raw(raw: &Path, out: &Path, compress: bool) -> Result<(), DiskError> {
    let mut c = cmd::command("qemu-img");
    c.args(["convert", "-q", "-f", "raw", "-O", "qcow2"]);
    if compress {
        c.args(["-c", "-o", "compat=1.1,compression_type=zstd"]);
    } else {
        c.args(["-o", "compat=1.1"]);
    }
    cmd::run(c.arg(plain(raw)).arg(plain(out)))?;
    Ok(())
}

/// Copies `count` blocks of `bs` bytes, starting at block `skip`, of the qcow2
/// `image` into the raw file `out`.
pub fn read_range(
    image: &Path,
    out: &Path,
    bs: u64,
    skip: u64,
    count: u64,
) -> Result<(), DiskError> {
    let mut if_arg = std::ffi::OsString::from("if=");
    if_arg.push(plain(image));
    let mut of_arg = std::ffi::OsString::from("of=");
    of_arg.push(plain(out));
    cmd::run(
        cmd::command("qemu-img")
            .args(["dd", "-f", "qcow2", "-O", "raw"])
            .arg(format!("bs={bs}"))
            .arg(format!("skip={skip}"))
            .arg(format!("count={count}"))
            .arg(if_arg)
            .arg(of_arg),
    )?;
    Ok(())
}

/// `path` as qemu reads it literally: a relative path whose first `/` comes after a
/// `:` (`a:b/c`) would be taken as a `protocol:` prefix, so it gets a `./`.
fn plain(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        Path::new(".").join(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_cannot_look_like_protocols() {
        assert_eq!(
            plain(Path::new("nbd:x/hd.qcow2")),
            Path::new("./nbd:x/hd.qcow2")
        );
        assert_eq!(plain(Path::new("/a:b")), Path::new("/a:b"));
    }
}
