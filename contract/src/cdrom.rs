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

/// The cdrom's index file: one line per overlay, `SHA256 SIZE NAME`, in name order.
/// The cdrom's content hash (in the volume descriptor) is the sha256 of this file, so
/// kimg-init checks one small file against one sector and then reports the recorded
/// hashes instead of reading every archive twice (software SHA-256 under TCG costs
/// more than the unpacking itself).
pub const INDEX_NAME: &str = "kimg-index";

/// One overlay of a cdrom's index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    /// File name on the cdrom.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// sha256 of its content, hex.
    pub sha256: String,
}

/// The index file's text for `entries` (already in name order).
pub fn index_text(entries: &[IndexEntry]) -> String {
    entries
        .iter()
        .map(|e| format!("{} {} {}\n", e.sha256, e.size, e.name))
        .collect()
}

/// Parses an index file; names may contain spaces, never newlines.
pub fn parse_index(text: &str) -> Result<Vec<IndexEntry>, String> {
    // Lines end at '\n' only: a name may end in '\r' (str::lines would drop it).
    text.strip_suffix('\n')
        .unwrap_or(text)
        .split('\n')
        .filter(|line| !text.is_empty() || !line.is_empty())
        .enumerate()
        .map(|(i, line)| {
            let bad = || format!("{INDEX_NAME} line {}: expected `SHA256 SIZE NAME`", i + 1);
            let (sha256, rest) = line.split_once(' ').ok_or_else(bad)?;
            let (size, name) = rest.split_once(' ').ok_or_else(bad)?;
            let hex_ok = sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit());
            if !hex_ok || name.is_empty() {
                return Err(bad());
            }
            Ok(IndexEntry {
                name: name.to_string(),
                size: size.parse().map_err(|_| bad())?,
                sha256: sha256.to_string(),
            })
        })
        .collect()
}

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
    /// sha256 of the file, from the cdrom's index (checked against the volume
    /// descriptor's hash), or computed while unpacking when the index does not match.
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

    #[test]
    fn index_round_trips_names_with_spaces_and_rejects_garbage() {
        let entries = vec![
            IndexEntry {
                name: "01-base.tar.zst".into(),
                size: 10240,
                sha256: "ab".repeat(32),
            },
            IndexEntry {
                name: "02-my overlay.tar".into(),
                size: 0,
                sha256: "0f".repeat(32),
            },
        ];
        let text = index_text(&entries);
        assert_eq!(parse_index(&text).unwrap(), entries);
        assert_eq!(parse_index("").unwrap(), vec![]);
        // Found by the cdrom_index fuzz target: a name ending in '\r' round-trips.
        let cr = vec![IndexEntry {
            name: "01-x.tar\r".into(),
            size: 1,
            sha256: "ab".repeat(32),
        }];
        assert_eq!(parse_index(&index_text(&cr)).unwrap(), cr);
        for bad in [
            "xyz 1 a",
            &format!("{} x a", "ab".repeat(32)),
            &format!("{} 1 ", "ab".repeat(32)),
            "nospaces",
        ] {
            let e = parse_index(bad).unwrap_err();
            assert!(e.contains("kimg-index line 1"), "{e}");
        }
    }
}
