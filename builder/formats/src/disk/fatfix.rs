//! Repairs two fatfs 0.3 defects in freshly built FAT32 volumes, in memory.
//!
//! fatfs 0.3 writes a long-name entry before each `.` and `..` entry of a new
//! directory (so they are not in slots 0 and 1) and points `..` of a top-level
//! directory at the root's cluster instead of 0. `fsck.vfat` rejects both, and so
//! may firmware. It also leaves the FSInfo free-cluster count unset.

/// A FAT32 volume's geometry, from its boot sector.
struct Geometry {
    fat_offset: usize,
    data_offset: usize,
    cluster_size: usize,
    clusters: u32,
    root_cluster: u32,
    fs_info_offset: usize,
}

const ENTRY: usize = 32;
const ATTR_LFN: u8 = 0x0f;
const ATTR_DIR: u8 = 0x10;
const END_OF_CHAIN: u32 = 0x0fff_fff8;

fn le16(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_le_bytes([b[at], b[at + 1]]))
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Geometry {
    fn read(img: &[u8]) -> Option<Geometry> {
        let bps = le16(img.get(..512)?, 11);
        let spc = usize::from(img[13]);
        let reserved = le16(img, 14);
        let fats = usize::from(img[16]);
        let fat_sectors = le32(img, 36) as usize;
        let total_sectors = le32(img, 32) as usize;
        let data_sector = reserved + fats * fat_sectors;
        let cluster_size = bps * spc;
        if cluster_size == 0 || total_sectors * bps > img.len() || data_sector > total_sectors {
            return None;
        }
        Some(Geometry {
            fat_offset: reserved * bps,
            data_offset: data_sector * bps,
            cluster_size,
            clusters: u32::try_from((total_sectors - data_sector) / spc).ok()?,
            root_cluster: le32(img, 44),
            fs_info_offset: le16(img, 48) * bps,
        })
    }

    fn next(&self, img: &[u8], cluster: u32) -> u32 {
        le32(img, self.fat_offset + 4 * cluster as usize) & 0x0fff_ffff
    }

    fn valid(&self, cluster: u32) -> bool {
        (2..self.clusters + 2).contains(&cluster)
    }

    fn cluster_offset(&self, cluster: u32) -> usize {
        self.data_offset + (cluster as usize - 2) * self.cluster_size
    }

    /// The clusters of a chain, stopping at its end or at anything invalid.
    fn chain(&self, img: &[u8], first: u32) -> Vec<u32> {
        let mut out = Vec::new();
        let mut c = first;
        while self.valid(c) && out.len() <= self.clusters as usize {
            out.push(c);
            c = self.next(img, c);
            if c >= END_OF_CHAIN {
                break;
            }
        }
        out
    }
}

fn entry_cluster(e: &[u8]) -> u32 {
    (le16(e, 20) as u32) << 16 | le16(e, 26) as u32
}

fn set_entry_cluster(e: &mut [u8], cluster: u32) {
    e[20..22].copy_from_slice(&((cluster >> 16) as u16).to_le_bytes());
    e[26..28].copy_from_slice(&(cluster as u16).to_le_bytes());
}

/// Puts `.` and `..` into slots 0 and 1 of every subdirectory, with `..` of
/// top-level directories pointing at cluster 0, and fills in the FSInfo free count.
/// Does nothing to an image it cannot read as FAT32.
pub fn fix(img: &mut [u8]) {
    let Some(g) = Geometry::read(img) else {
        return;
    };
    // (directory cluster, value its `..` must hold); the root has no dot entries.
    let mut stack = vec![(g.root_cluster, None)];
    let mut seen = 0usize;
    while let Some((dir, dotdot)) = stack.pop() {
        seen += 1;
        if seen > g.clusters as usize {
            return; // a directory cycle: not something fatfs produced
        }
        let children_parent = if dir == g.root_cluster { 0 } else { dir };
        for c in g.chain(img, dir) {
            let base = g.cluster_offset(c);
            for e in img[base..base + g.cluster_size].chunks_exact(ENTRY) {
                let (first, attr) = (e[0], e[11]);
                if first == 0 {
                    break;
                }
                if first == 0xe5 || attr == ATTR_LFN || attr & ATTR_DIR == 0 || first == b'.' {
                    continue;
                }
                stack.push((entry_cluster(e), Some(children_parent)));
            }
        }
        if let Some(parent) = dotdot {
            if g.valid(dir) {
                fix_dots(
                    &mut img[g.cluster_offset(dir)..][..g.cluster_size],
                    dir,
                    parent,
                );
            }
        }
    }
    let free = (2..g.clusters + 2).filter(|&c| g.next(img, c) == 0).count() as u32;
    let fsi = g.fs_info_offset;
    if fsi > 0 && img.len() >= fsi + 512 && &img[fsi..fsi + 4] == b"RRaA" {
        img[fsi + 488..fsi + 492].copy_from_slice(&free.to_le_bytes());
    }
}

/// Rewrites the first cluster of a directory so slot 0 is `.` and slot 1 is `..`.
fn fix_dots(cluster: &mut [u8], this: u32, parent: u32) {
    let is_dot = |e: &[u8], name: &[u8; 11]| e[11] != ATTR_LFN && &e[..11] == name;
    let find = |name: &[u8; 11]| {
        (0..4.min(cluster.len() / ENTRY)).find(|&i| is_dot(&cluster[i * ENTRY..][..ENTRY], name))
    };
    let (Some(dot), Some(dotdot)) = (find(b".          "), find(b"..         ")) else {
        return;
    };
    let mut d = [0u8; ENTRY];
    d.copy_from_slice(&cluster[dot * ENTRY..][..ENTRY]);
    let mut dd = [0u8; ENTRY];
    dd.copy_from_slice(&cluster[dotdot * ENTRY..][..ENTRY]);
    set_entry_cluster(&mut d, this);
    set_entry_cluster(&mut dd, parent);
    // Slots the dot entries and their long names used beyond 0 and 1 become deleted
    // entries, which every FAT reader skips.
    for i in 2..=dot.max(dotdot) {
        cluster[i * ENTRY] = 0xe5;
    }
    cluster[..ENTRY].copy_from_slice(&d);
    cluster[ENTRY..2 * ENTRY].copy_from_slice(&dd);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::process::Command;

    #[test]
    fn nested_directories_pass_fsck_vfat() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("f");
        std::fs::write(&host, b"x").unwrap();
        let files: Vec<(String, PathBuf)> = ["top", "d/a", "d/e/b", "d/e/c", "x/y/z/w"]
            .iter()
            .map(|p| (p.to_string(), host.clone()))
            .collect();
        // 64 MiB gets 512-byte clusters, 300 MiB larger ones.
        for size in [64u64 << 20, 300 << 20] {
            check(&files, size, dir.path());
        }
    }

    fn check(files: &[(String, PathBuf)], size: u64, dir: &std::path::Path) {
        let img = crate::disk::esp::build(files, size, 1, 1_700_000_000).unwrap();
        let g = Geometry::read(&img).unwrap();
        // Slot 0 and 1 of each subdirectory are the dot entries; `..` of a top-level
        // directory is 0.
        let root = &img[g.cluster_offset(g.root_cluster)..][..g.cluster_size];
        let d = root
            .chunks_exact(ENTRY)
            .find(|e| &e[..11] == b"D          ")
            .map(entry_cluster)
            .unwrap();
        let first = &img[g.cluster_offset(d)..][..2 * ENTRY];
        assert_eq!(&first[..11], b".          ");
        assert_eq!(entry_cluster(first), d);
        assert_eq!(&first[ENTRY..ENTRY + 11], b"..         ");
        assert_eq!(entry_cluster(&first[ENTRY..]), 0);

        let raw = dir.join("esp.raw");
        std::fs::write(&raw, &img).unwrap();
        // Exit status 0 is the check: fsck.vfat found nothing to repair.
        kimg_util::cmd::run(Command::new("fsck.vfat").arg("-n").arg(&raw)).unwrap();
    }

    #[test]
    fn leaves_garbage_alone() {
        let mut junk = vec![0xffu8; 4096];
        fix(&mut junk);
        assert!(junk.iter().all(|&b| b == 0xff));
        fix(&mut []);
    }
}
