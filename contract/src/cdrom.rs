//! The overlay cdrom: how `kimg mkcdrom` labels it and where kimg-init finds, mounts
//! and remembers it, and the per-overlay report in the agent's status.

use serde::{Deserialize, Serialize};

/// ISO9660 volume identifier of a kimg overlay cdrom.
pub const VOLUME_LABEL: &str = "kimg";
/// Byte offset of the primary volume descriptor (sector 16 of 2048 bytes).
pub const PVD_OFFSET: u64 = 16 * 2048;
/// Offset of the application-use field inside the primary volume descriptor.
pub const PVD_APP_USE: usize = 883;
/// Prefix of the application-use field; the cdrom's content hash follows in hex.
pub const APP_USE_PREFIX: &str = "kimg-cdrom sha256=";
/// Where kimg-init mounts the cdrom (read-only; under /run, which overlays never touch).
pub const MOUNT_POINT: &str = "/run/kimg/cdrom";
/// The record of the last cdrom applied to this VM disk (JSON [`Applied`]).
pub const APPLIED_FILE: &str = "/var/lib/kimg/overlays.applied";
/// Directory of start hooks, run in name order after the overlays are unpacked.
pub const START_DIR: &str = "/etc/kimg/start.d";
/// Log of the start hooks' output.
pub const START_LOG: &str = "/var/log/kimg/start.d.log";
/// Top-level directories overlays may never write into (besides the mount point).
pub const FORBIDDEN_TOP: &[&str] = &["proc", "sys", "dev", "run"];

/// The cdrom's content hash as written into the volume descriptor's application use.
pub fn app_use(sha256_hex: &str) -> String {
    format!("{APP_USE_PREFIX}{sha256_hex}")
}

/// The content hash out of an application-use field, if it is a kimg one.
pub fn parse_app_use(field: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(field).ok()?;
    let hex = text
        .trim_end_matches([' ', '\0'])
        .strip_prefix(APP_USE_PREFIX)?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| hex.to_string())
}

/// What happened to one overlay at boot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OverlayReport {
    /// File name on the cdrom (`NN-NAME.tar[.zst]`).
    pub name: String,
    /// sha256 of the file as read from the cdrom.
    pub sha256: String,
    /// Its size in bytes.
    pub size: u64,
    /// Seconds spent unpacking.
    pub secs: f64,
    /// `ok`, `ok, N entries refused` or `failed: why`.
    pub result: String,
    /// Whether it was unpacked at this boot (false: an earlier boot of this disk did).
    #[serde(default)]
    pub this_boot: bool,
}

impl OverlayReport {
    /// Whether the overlay failed (corrupt, truncated, unreadable).
    pub fn failed(&self) -> bool {
        self.result.starts_with("failed")
    }
}

/// Content of [`APPLIED_FILE`]: which cdrom was unpacked onto this disk, and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    /// The cdrom's content hash.
    pub cdrom_sha256: String,
    /// The reports of that boot.
    pub overlays: Vec<OverlayReport>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_use_round_trips_and_rejects_others() {
        let h = "ab".repeat(32);
        let mut field = app_use(&h).into_bytes();
        field.resize(512, b' ');
        assert_eq!(parse_app_use(&field), Some(h));
        assert_eq!(parse_app_use(b"kimg-cdrom sha256=zz"), None);
        assert_eq!(parse_app_use(&[0u8; 512]), None);
    }
}
