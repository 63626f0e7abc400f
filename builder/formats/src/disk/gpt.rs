//! Hand-written GPT: protective MBR, primary and backup headers and entry arrays.
//!
//! Written by hand rather than with the `gpt` crate so that every GUID comes from
//! the seed and the bytes are fully reproducible; the format is small and fixed.

use super::guid::Guid;

/// Logical sector size of kimg disks.
pub const SECTOR: u64 = 512;
/// Number of partition entries in each array (the usual minimum).
pub const ENTRIES: usize = 128;
/// Size of one partition entry.
pub const ENTRY_SIZE: usize = 128;
/// Sectors taken by one entry array (16 KiB).
pub const ENTRY_SECTORS: u64 = (ENTRIES * ENTRY_SIZE) as u64 / SECTOR;
/// Size of the GPT header proper; the rest of its sector is zero.
const HEADER_SIZE: usize = 92;

/// CRC-32 (IEEE 802.3, reflected, as used by GPT, zlib and PNG).
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            // Branch-free: mask is all ones when the low bit is set.
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xedb8_8320 & mask);
        }
    }
    !crc
}

/// One partition to put in the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GptPartition {
    /// Partition type GUID.
    pub type_guid: Guid,
    /// Unique partition GUID.
    pub part_guid: Guid,
    /// First sector.
    pub first_lba: u64,
    /// Last sector, inclusive.
    pub last_lba: u64,
    /// Partition name (at most 36 UTF-16 code units).
    pub name: String,
}

/// Sector-aligned blobs to write at byte offsets of the raw disk.
pub struct GptBlobs {
    /// Protective MBR, primary header and primary entries: write at offset 0.
    pub primary: Vec<u8>,
    /// Backup entries and backup header: write at `backup_offset`.
    pub backup: Vec<u8>,
    /// Byte offset of the backup entries.
    pub backup_offset: u64,
}

/// First LBA a partition may use (after MBR, header and entries).
pub fn first_usable_lba() -> u64 {
    2 + ENTRY_SECTORS
}

/// Last LBA a partition may use on a disk of `total_sectors`.
pub fn last_usable_lba(total_sectors: u64) -> u64 {
    total_sectors - 2 - ENTRY_SECTORS
}

/// Encodes the whole table for a disk of `total_sectors` sectors.
pub fn encode(total_sectors: u64, disk_guid: Guid, parts: &[GptPartition]) -> GptBlobs {
    let mut entries = vec![0u8; ENTRIES * ENTRY_SIZE];
    for (i, p) in parts.iter().take(ENTRIES).enumerate() {
        let e = &mut entries[i * ENTRY_SIZE..(i + 1) * ENTRY_SIZE];
        e[0..16].copy_from_slice(&p.type_guid.to_gpt_bytes());
        e[16..32].copy_from_slice(&p.part_guid.to_gpt_bytes());
        e[32..40].copy_from_slice(&p.first_lba.to_le_bytes());
        e[40..48].copy_from_slice(&p.last_lba.to_le_bytes());
        // Attributes (48..56) stay zero.
        for (j, unit) in p.name.encode_utf16().take(36).enumerate() {
            e[56 + 2 * j..58 + 2 * j].copy_from_slice(&unit.to_le_bytes());
        }
    }
    let entries_crc = crc32(&entries);
    let last_lba = total_sectors - 1;
    let backup_entries_lba = last_lba - ENTRY_SECTORS;
    let header = |my_lba: u64, alt_lba: u64, entries_lba: u64| {
        let mut h = vec![0u8; SECTOR as usize];
        h[0..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&(HEADER_SIZE as u32).to_le_bytes());
        h[24..32].copy_from_slice(&my_lba.to_le_bytes());
        h[32..40].copy_from_slice(&alt_lba.to_le_bytes());
        h[40..48].copy_from_slice(&first_usable_lba().to_le_bytes());
        h[48..56].copy_from_slice(&last_usable_lba(total_sectors).to_le_bytes());
        h[56..72].copy_from_slice(&disk_guid.to_gpt_bytes());
        h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        h[80..84].copy_from_slice(&(ENTRIES as u32).to_le_bytes());
        h[84..88].copy_from_slice(&(ENTRY_SIZE as u32).to_le_bytes());
        h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        // The header CRC covers the header with its own CRC field zero.
        let crc = crc32(&h[..HEADER_SIZE]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    };

    let mut primary = protective_mbr(total_sectors);
    primary.extend_from_slice(&header(1, last_lba, 2));
    primary.extend_from_slice(&entries);
    let mut backup = entries;
    backup.extend_from_slice(&header(last_lba, 1, backup_entries_lba));
    GptBlobs {
        primary,
        backup,
        backup_offset: backup_entries_lba * SECTOR,
    }
}

/// A protective MBR: one 0xEE partition covering the disk (capped at 2^32-1 sectors).
fn protective_mbr(total_sectors: u64) -> Vec<u8> {
    let mut m = vec![0u8; SECTOR as usize];
    let e = &mut m[446..462];
    e[1..4].copy_from_slice(&[0x00, 0x02, 0x00]); // CHS of LBA 1
    e[4] = 0xee;
    e[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
    e[8..12].copy_from_slice(&1u32.to_le_bytes());
    let size = u32::try_from(total_sectors - 1).unwrap_or(u32::MAX);
    e[12..16].copy_from_slice(&size.to_le_bytes());
    m[510] = 0x55;
    m[511] = 0xaa;
    m
}

/// Why a GPT could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GptParseError {
    /// Too few bytes for a header and its entries.
    #[error("too short for a GPT")]
    Short,
    /// No `EFI PART` signature in LBA 1.
    #[error("no GPT signature")]
    Signature,
    /// Header or entry array CRC mismatch.
    #[error("GPT {0} CRC mismatch")]
    Crc(&'static str),
}

/// Reads the primary table from the first sectors of a disk (`bytes` starts at LBA 0).
pub fn parse(bytes: &[u8]) -> Result<Vec<GptPartition>, GptParseError> {
    let s = SECTOR as usize;
    let h = bytes.get(s..2 * s).ok_or(GptParseError::Short)?;
    if &h[0..8] != b"EFI PART" {
        return Err(GptParseError::Signature);
    }
    let le32 = |b: &[u8], at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let le64 = |b: &[u8], at: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(x)
    };
    let hsize = (le32(h, 12) as usize).clamp(HEADER_SIZE, s);
    let mut hdr = h[..hsize].to_vec();
    hdr[16..20].fill(0);
    if crc32(&hdr) != le32(h, 16) {
        return Err(GptParseError::Crc("header"));
    }
    let entries_at = usize::try_from(le64(h, 72)).map_err(|_| GptParseError::Short)? * s;
    let count = le32(h, 80) as usize;
    let size = le32(h, 84) as usize;
    let entries = entries_at
        .checked_add(count.saturating_mul(size))
        .and_then(|end| bytes.get(entries_at..end))
        .ok_or(GptParseError::Short)?;
    if size < ENTRY_SIZE || crc32(entries) != le32(h, 88) {
        return Err(GptParseError::Crc("entries"));
    }
    let mut parts = Vec::new();
    for e in entries.chunks_exact(size) {
        let mut ty = [0u8; 16];
        ty.copy_from_slice(&e[0..16]);
        if ty == [0u8; 16] {
            continue;
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&e[16..32]);
        let units: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        parts.push(GptPartition {
            type_guid: Guid::from_gpt_bytes(&ty),
            part_guid: Guid::from_gpt_bytes(&id),
            first_lba: le64(e, 32),
            last_lba: le64(e, 40),
            name: String::from_utf16_lossy(&units),
        });
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::guid::{ESP_TYPE, ROOT_X86_64_TYPE};

    #[test]
    fn crc32_known_vectors() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
        assert_eq!(
            crc32(b"The quick brown fox jumps over the lazy dog"),
            0x414f_a339
        );
    }

    fn sample() -> (u64, Vec<GptPartition>) {
        let seed = [1u8; 32];
        let parts = vec![
            GptPartition {
                type_guid: ESP_TYPE,
                part_guid: Guid::derive(&seed, "a"),
                first_lba: 2048,
                last_lba: 4095,
                name: "kimg-esp".into(),
            },
            GptPartition {
                type_guid: ROOT_X86_64_TYPE,
                part_guid: Guid::derive(&seed, "b"),
                first_lba: 4096,
                last_lba: 8191,
                name: "kimg-root".into(),
            },
        ];
        (10240, parts)
    }

    #[test]
    fn header_layout_and_round_trip() {
        let (total, parts) = sample();
        let disk = Guid::derive(&[1u8; 32], "disk");
        let b = encode(total, disk, &parts);
        assert_eq!(b.primary.len() as u64, (2 + ENTRY_SECTORS) * SECTOR);
        assert_eq!(b.backup.len() as u64, (1 + ENTRY_SECTORS) * SECTOR);
        assert_eq!(b.backup_offset + b.backup.len() as u64, total * SECTOR);
        assert_eq!(&b.primary[510..512], &[0x55, 0xaa]);
        assert_eq!(b.primary[446 + 4], 0xee);
        let h = &b.primary[512..1024];
        assert_eq!(&h[0..8], b"EFI PART");
        assert_eq!(u64::from_le_bytes(h[32..40].try_into().unwrap()), total - 1);
        assert_eq!(u64::from_le_bytes(h[40..48].try_into().unwrap()), 34);
        assert_eq!(
            u64::from_le_bytes(h[48..56].try_into().unwrap()),
            total - 34
        );
        assert_eq!(parse(&b.primary).unwrap(), parts);

        // The backup header points back at the primary and at its own entries.
        let bh = &b.backup[b.backup.len() - 512..];
        assert_eq!(
            u64::from_le_bytes(bh[24..32].try_into().unwrap()),
            total - 1
        );
        assert_eq!(u64::from_le_bytes(bh[32..40].try_into().unwrap()), 1);
        assert_eq!(
            u64::from_le_bytes(bh[72..80].try_into().unwrap()) * SECTOR,
            b.backup_offset
        );
        assert_eq!(&bh[88..92], &h[88..92]);
    }

    #[test]
    fn parse_rejects_corruption() {
        let (total, parts) = sample();
        let mut b = encode(total, Guid([0; 16]), &parts).primary;
        assert_eq!(parse(&b[..600]), Err(GptParseError::Short));
        b[2000] ^= 1;
        assert_eq!(parse(&b), Err(GptParseError::Crc("entries")));
        b[520] ^= 1;
        assert_eq!(parse(&b), Err(GptParseError::Crc("header")));
        b[512] = b'X';
        assert_eq!(parse(&b), Err(GptParseError::Signature));
    }
}
