//! qemu-img calls: raw -> qcow2, and reading byte ranges back out of a qcow2.

use super::DiskError;
use crate::cmd;
use std::path::Path;
use std::process::Command;

/// Converts the raw disk `raw` into a qcow2 (v3, `compat=1.1`) at `out`.
///
/// Writes stay in order (no `-W`), so the same raw input gives the same qcow2 bytes.
pub fn from_raw(raw: &Path, out: &Path) -> Result<(), DiskError> {
    cmd::run(
        Command::new("qemu-img")
            .args([
                "convert",
                "-q",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                "compat=1.1",
            ])
            .arg(raw)
            .arg(out),
    )?;
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
    if_arg.push(image);
    let mut of_arg = std::ffi::OsString::from("of=");
    of_arg.push(out);
    cmd::run(
        Command::new("qemu-img")
            .args(["dd", "-f", "qcow2", "-O", "raw"])
            .arg(format!("bs={bs}"))
            .arg(format!("skip={skip}"))
            .arg(format!("count={count}"))
            .arg(if_arg)
            .arg(of_arg),
    )?;
    Ok(())
}
