//! Finding the root partition: by GPT partition name (sysfs uevent `PARTNAME=`) or by
//! GPT unique partition GUID (read from each disk's partition table), retrying while
//! the disks appear after module load.

use kimg_contract::cmdline::RootSpec;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Whole disks, one directory each; partitions are subdirectories with a `partition` file.
pub const SYS_BLOCK: &str = "/sys/block";
/// Device nodes (devtmpfs).
pub const DEV_DIR: &str = "/dev";
/// How long stage 1 waits for the root partition to appear.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between two scans.
pub const POLL: Duration = Duration::from_millis(15);

/// What a sysfs `uevent` file says about a block device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Uevent {
    /// `DEVNAME=`: the node under /dev.
    pub devname: Option<String>,
    /// `PARTNAME=`: the GPT partition name.
    pub partname: Option<String>,
    /// `PARTN=`: the partition number.
    pub partn: Option<u32>,
}

/// Parses a uevent file's `KEY=value` lines.
pub fn parse_uevent(text: &str) -> Uevent {
    let mut u = Uevent::default();
    for (k, v) in text.lines().filter_map(|l| l.split_once('=')) {
        match k {
            "DEVNAME" => u.devname = Some(v.to_string()),
            "PARTNAME" => u.partname = Some(v.to_string()),
            "PARTN" => u.partn = v.parse().ok(),
            _ => {}
        }
    }
    u
}

/// One block device seen in sysfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDev {
    /// Node name under /dev, e.g. `vda2`.
    pub devname: String,
    /// The whole disk it is on (itself for a disk).
    pub disk: String,
    /// Partition number; `None` for a whole disk.
    pub partn: Option<u32>,
    /// GPT partition name.
    pub partname: Option<String>,
}

impl BlockDev {
    /// The device node.
    pub fn node(&self) -> PathBuf {
        PathBuf::from(DEV_DIR).join(&self.devname)
    }
}

/// Every disk and partition sysfs knows now.
pub fn scan() -> Vec<BlockDev> {
    let mut out = Vec::new();
    let Ok(disks) = std::fs::read_dir(SYS_BLOCK) else {
        return out;
    };
    for disk in disks.flatten() {
        let dir = disk.path();
        let disk_name = disk.file_name().to_string_lossy().into_owned();
        let u = read_uevent(&dir);
        out.push(BlockDev {
            devname: u.devname.unwrap_or_else(|| disk_name.clone()),
            disk: disk_name.clone(),
            partn: None,
            partname: None,
        });
        let Ok(subs) = std::fs::read_dir(&dir) else {
            continue;
        };
        for sub in subs.flatten() {
            let p = sub.path();
            if !p.join("partition").exists() {
                continue;
            }
            let u = read_uevent(&p);
            out.push(BlockDev {
                devname: u
                    .devname
                    .unwrap_or_else(|| sub.file_name().to_string_lossy().into_owned()),
                disk: disk_name.clone(),
                partn: u.partn,
                partname: u.partname,
            });
        }
    }
    out.sort_by(|a, b| a.devname.cmp(&b.devname));
    out
}

fn read_uevent(dir: &std::path::Path) -> Uevent {
    std::fs::read_to_string(dir.join("uevent"))
        .map(|t| parse_uevent(&t))
        .unwrap_or_default()
}

/// Looks for the root once in `devs`; a match counts only once its node exists.
pub fn find_once(spec: &RootSpec, devs: &[BlockDev]) -> Option<PathBuf> {
    let found = match spec {
        RootSpec::PartLabel(label) => devs
            .iter()
            .find(|d| d.partn.is_some() && d.partname.as_deref() == Some(label.as_str())),
        RootSpec::PartUuid(uuid) => devs.iter().filter(|d| d.partn.is_none()).find_map(|disk| {
            let n = gpt_partition_with_guid(&disk.node(), disk_sector_size(&disk.disk), uuid)?;
            devs.iter()
                .find(|d| d.disk == disk.disk && d.partn == Some(n))
        }),
    }?;
    let node = found.node();
    node.exists().then_some(node)
}

/// Waits up to `timeout` for the root partition. On failure, returns the devices of
/// the last scan for the error report.
pub fn find(spec: &RootSpec, timeout: Duration) -> Result<PathBuf, Vec<BlockDev>> {
    let start = Instant::now();
    loop {
        let devs = scan();
        if let Some(node) = find_once(spec, &devs) {
            return Ok(node);
        }
        if start.elapsed() >= timeout {
            return Err(devs);
        }
        std::thread::sleep(POLL);
    }
}

fn disk_sector_size(disk: &str) -> u64 {
    std::fs::read_to_string(format!("{SYS_BLOCK}/{disk}/queue/logical_block_size"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|s| *s >= 512)
        .unwrap_or(512)
}

/// Reads the GPT of `disk` and returns the number (1-based) of the partition whose
/// unique GUID is `guid`.
fn gpt_partition_with_guid(disk: &std::path::Path, sector: u64, guid: &str) -> Option<u32> {
    let mut f = File::open(disk).ok()?;
    let mut header = vec![0u8; 92];
    f.seek(SeekFrom::Start(sector)).ok()?;
    f.read_exact(&mut header).ok()?;
    let h = parse_gpt_header(&header)?;
    let mut entries = vec![0u8; (h.count as usize) * (h.entry_size as usize)];
    f.seek(SeekFrom::Start(h.entries_lba.checked_mul(sector)?))
        .ok()?;
    f.read_exact(&mut entries).ok()?;
    find_guid_in_entries(&entries, h.entry_size as usize, guid)
}

/// The fields of a GPT header kimg-init needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GptHeader {
    /// First LBA of the partition entry array.
    pub entries_lba: u64,
    /// Number of entries.
    pub count: u32,
    /// Size of one entry in bytes.
    pub entry_size: u32,
}

/// Parses the GPT header at LBA 1; `None` without the `EFI PART` signature or with
/// implausible sizes.
pub fn parse_gpt_header(b: &[u8]) -> Option<GptHeader> {
    if b.len() < 92 || &b[..8] != b"EFI PART" {
        return None;
    }
    let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let mut lba = [0u8; 8];
    lba.copy_from_slice(&b[72..80]);
    let h = GptHeader {
        entries_lba: u64::from_le_bytes(lba),
        count: u32_at(80),
        entry_size: u32_at(84),
    };
    (h.count > 0 && h.count <= 1024 && (128..=4096).contains(&h.entry_size)).then_some(h)
}

/// Formats a 16-byte on-disk GUID (first three fields little endian) as lower-case text.
pub fn guid_to_string(g: &[u8]) -> String {
    let hex = |r: &[u8]| r.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let rev = |r: &[u8]| r.iter().rev().copied().collect::<Vec<u8>>();
    format!(
        "{}-{}-{}-{}-{}",
        hex(&rev(&g[0..4])),
        hex(&rev(&g[4..6])),
        hex(&rev(&g[6..8])),
        hex(&g[8..10]),
        hex(&g[10..16])
    )
}

/// The 1-based number of the entry whose unique GUID (bytes 16..32) is `guid`.
pub fn find_guid_in_entries(entries: &[u8], entry_size: usize, guid: &str) -> Option<u32> {
    let want = guid.to_ascii_lowercase();
    entries
        .chunks_exact(entry_size)
        .position(|e| e[..16].iter().any(|b| *b != 0) && guid_to_string(&e[16..32]) == want)
        .and_then(|i| u32::try_from(i + 1).ok())
}

/// A human report of what was looked for and what was seen, for the emergency console.
pub fn report(spec: &RootSpec, seen: &[BlockDev]) -> String {
    let mut s = format!("looked for root {} for {:?}\n", spec.to_arg(), TIMEOUT);
    if seen.is_empty() {
        s.push_str("  no block devices at all (is virtio_blk loaded?)\n");
    }
    for d in seen {
        s.push_str(&format!(
            "  /dev/{} {} PARTNAME={}\n",
            d.devname,
            d.partn
                .map_or("disk".to_string(), |n| format!("part {n} of {}", d.disk)),
            d.partname.as_deref().unwrap_or("-")
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// LBA 1 and 2 of a disk made with
    /// `sgdisk -n1:2048:+64M -c1:kimg-esp -t1:ef00 -n2:0:0 -c2:kimg-root -t2:8304`.
    const GPT_FIXTURE: &[u8] = include_bytes!("../test_data/gpt-lba1-2.bin");
    /// `sgdisk -i2` of that disk.
    const ROOT_GUID: &str = include_str!("../test_data/gpt-root-guid.txt");

    #[test]
    fn uevent_of_a_partition() {
        let u = parse_uevent("MAJOR=254\nMINOR=2\nDEVNAME=vda2\nDEVTYPE=partition\nDISKSEQ=9\nPARTN=2\nPARTNAME=kimg-root\n");
        assert_eq!(u.devname.as_deref(), Some("vda2"));
        assert_eq!(u.partname.as_deref(), Some("kimg-root"));
        assert_eq!(u.partn, Some(2));
        assert_eq!(parse_uevent("garbage\n"), Uevent::default());
    }

    #[test]
    fn guid_is_mixed_endian() {
        let raw = [
            0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47,
            0x7d, 0xe4,
        ];
        assert_eq!(guid_to_string(&raw), "0fc63daf-8483-4772-8e79-3d69d8477de4");
    }

    #[test]
    fn gpt_fixture_finds_the_root_entry() {
        let h = parse_gpt_header(&GPT_FIXTURE[..512]).unwrap();
        assert_eq!(h.entries_lba, 2);
        assert_eq!(h.entry_size, 128);
        let entries = &GPT_FIXTURE[512..];
        let guid = ROOT_GUID.trim();
        assert_eq!(find_guid_in_entries(entries, 128, guid), Some(2));
        assert_eq!(
            find_guid_in_entries(entries, 128, &guid.to_uppercase()),
            Some(2)
        );
        assert_eq!(
            find_guid_in_entries(entries, 128, "00000000-0000-0000-0000-000000000000"),
            None
        );
        assert!(parse_gpt_header(&[0u8; 512]).is_none());
    }

    #[test]
    fn find_by_label_needs_a_partition() {
        let devs = vec![
            BlockDev {
                devname: "vda".into(),
                disk: "vda".into(),
                partn: None,
                partname: None,
            },
            BlockDev {
                devname: "vda2".into(),
                disk: "vda".into(),
                partn: Some(2),
                partname: Some("kimg-root".into()),
            },
        ];
        // /dev/vda2 does not exist on the test host, so no match is reported.
        assert_eq!(
            find_once(&RootSpec::PartLabel("kimg-root".into()), &devs),
            None
        );
        let r = report(&RootSpec::default(), &devs);
        assert!(
            r.contains("/dev/vda2 part 2 of vda PARTNAME=kimg-root"),
            "{r}"
        );
    }
}
