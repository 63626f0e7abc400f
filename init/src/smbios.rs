//! The hostname from an SMBIOS OEM string (`-smbios type=11,value=kimg.hostname=vm-001`),
//! for boots without a launcher-provided kernel command line (UEFI from the ESP).

use kimg_contract::cmdline::KEY_HOSTNAME;
use std::path::Path;

/// Where the kernel (CONFIG_DMI_SYSFS) shows the raw SMBIOS structures.
pub const DMI_ENTRIES: &str = "/sys/firmware/dmi/entries";

/// The `kimg.hostname=` value of any type 11 (OEM strings) structure, if valid.
pub fn hostname() -> Option<String> {
    hostname_in(Path::new(DMI_ENTRIES))
}

/// [`hostname`] reading the entries below `dir` (`11-0/raw`, `11-1/raw`, ...).
pub fn hostname_in(dir: &Path) -> Option<String> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("11-"))
        .collect();
    entries.sort();
    entries.iter().find_map(|n| {
        let raw = std::fs::read(dir.join(n).join("raw")).ok()?;
        oem_strings(&raw).into_iter().find_map(|s| {
            let v = s.strip_prefix(KEY_HOSTNAME)?.strip_prefix('=')?;
            valid_hostname(v).then(|| v.to_string())
        })
    })
}

/// The strings of one raw SMBIOS structure: after the formatted area (its length is
/// byte 1), NUL-terminated strings up to an empty one.
pub fn oem_strings(raw: &[u8]) -> Vec<String> {
    // Every structure has at least the 4-byte header (type, length, handle).
    let len = raw.get(1).map_or(0, |&l| usize::from(l));
    if len < 4 {
        return Vec::new();
    }
    raw.get(len..)
        .unwrap_or_default()
        .split(|&b| b == 0)
        .take_while(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// A single DNS label: what kimg VM names are.
fn valid_hostname(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !s.starts_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Type 11, length 5, handle, count 2, then two strings.
    fn structure(strings: &[&str]) -> Vec<u8> {
        let mut raw = vec![11, 5, 0x00, 0x0b, strings.len() as u8];
        for s in strings {
            raw.extend_from_slice(s.as_bytes());
            raw.push(0);
        }
        raw.push(0);
        raw
    }

    #[test]
    fn finds_the_hostname_among_oem_strings() {
        let dir = tempfile::tempdir().unwrap();
        for (entry, strings) in [
            ("11-0", &["vendor=x"][..]),
            ("11-1", &["a=b", "kimg.hostname=vm-201"][..]),
            ("1-0", &["kimg.hostname=wrong"][..]),
        ] {
            std::fs::create_dir(dir.path().join(entry)).unwrap();
            std::fs::write(dir.path().join(entry).join("raw"), structure(strings)).unwrap();
        }
        assert_eq!(hostname_in(dir.path()).as_deref(), Some("vm-201"));
        assert_eq!(
            oem_strings(&structure(&["x", "y"])),
            vec!["x".to_string(), "y".to_string()]
        );
    }

    #[test]
    fn rejects_missing_truncated_and_bad_values() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(hostname_in(&dir.path().join("none")), None);
        std::fs::create_dir(dir.path().join("11-0")).unwrap();
        std::fs::write(
            dir.path().join("11-0/raw"),
            structure(&["kimg.hostname=a b/c"]),
        )
        .unwrap();
        assert_eq!(hostname_in(dir.path()), None);
        assert!(oem_strings(&[11]).is_empty());
        assert!(oem_strings(&[11, 2, 0, b'x', 0, 0]).is_empty());
        assert!(oem_strings(&[11, 200, 0]).is_empty());
    }
}
