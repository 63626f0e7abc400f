//! A small ISO9660 writer with Rock Ridge: one root directory of regular files.
//!
//! That is all an overlay cdrom needs (`NN-NAME.tar[.zst]` files), so the layout is
//! fixed: system area, primary volume descriptor (label [`VOLUME_LABEL`]), terminator,
//! little- and big-endian path tables, the root directory, one continuation block with
//! the Rock Ridge `ER` entry, then the files. File data is streamed straight into its
//! place (no temporary copies); the descriptors are written last. Timestamps come from
//! one fixed epoch, so the same inputs give the same bytes. A last file, the index
//! ([`INDEX_NAME`]), lists every file's sha256, size and name; the index's own sha256
//! goes into the descriptor's application-use field so that kimg-init can tell cdroms
//! apart by reading one sector, and trust the index by hashing one small file.

use kimg_contract::cdrom::{
    app_use, index_text, IndexEntry, INDEX_NAME, PVD_APP_USE, VOLUME_LABEL,
};
use sha2::{Digest, Sha256};
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// ISO9660 logical sector size.
pub const SECTOR: u64 = 2048;
/// Longest Rock Ridge name: one directory record (at most 255 bytes) carries the
/// ISO name, PX, TF and NM.
pub const MAX_NAME: usize = 120;
/// Largest file an ISO9660 extent can hold.
pub const MAX_FILE: u64 = u32::MAX as u64;
const PVD_LBA: u32 = 16;
const TERM_LBA: u32 = 17;
const LPATH_LBA: u32 = 18;
const MPATH_LBA: u32 = 19;
const ROOT_LBA: u32 = 20;

/// Errors of the ISO writer.
#[derive(Debug, thiserror::Error)]
pub enum IsoError {
    /// Writing the image failed.
    #[error("write {path}: {source}")]
    Io {
        /// The image being written.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file's content could not be produced.
    #[error("{name}: {why}")]
    Source {
        /// The file on the cdrom.
        name: String,
        /// Why.
        why: String,
    },
    /// A name that Rock Ridge cannot carry in one NM entry, or twice the same name.
    #[error("bad cdrom file name {0:?}: use 1 to {MAX_NAME} bytes without '/', each name once")]
    Name(String),
    /// A file larger than one ISO9660 extent.
    #[error("{name} is {size} bytes; an ISO9660 file holds at most {MAX_FILE}")]
    TooBig {
        /// The file.
        name: String,
        /// Its size.
        size: u64,
    },
}

/// Produces a file's content into the image.
pub type Fill<'a> = Box<dyn FnOnce(&mut dyn Write) -> Result<(), String> + 'a>;

/// One file of the cdrom's root directory.
pub struct IsoSource<'a> {
    /// Its Rock Ridge name (the ISO9660 name is derived from it).
    pub name: String,
    /// Writes its content.
    pub fill: Fill<'a>,
}

/// A file as it ended up in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsoEntry {
    /// Rock Ridge name.
    pub name: String,
    /// Plain ISO9660 name (`01_BASE.TAR;1`).
    pub iso_name: String,
    /// First sector.
    pub lba: u32,
    /// Size in bytes.
    pub size: u64,
    /// sha256 of its content.
    pub sha256: String,
}

/// What [`write`] made.
#[derive(Debug, Clone)]
pub struct IsoImage {
    /// The files in name order (the index not among them).
    pub entries: Vec<IsoEntry>,
    /// Content hash: the index's sha256 (also in the volume descriptor).
    pub sha256: String,
    /// Image size in bytes.
    pub size: u64,
}

/// Writes an ISO image with `files` at `out` (via a temporary file and rename, so a
/// failure leaves nothing behind). `epoch` is every timestamp, in Unix seconds.
pub fn write(out: &Path, files: Vec<IsoSource<'_>>, epoch: i64) -> Result<IsoImage, IsoError> {
    let io_err = |source| IsoError::Io {
        path: out.to_path_buf(),
        source,
    };
    let mut files = files;
    files.sort_by(|a, b| a.name.cmp(&b.name));
    for (i, f) in files.iter().enumerate() {
        let bad = f.name.is_empty()
            || f.name.len() > MAX_NAME
            || f.name.contains(['/', '\0', '\n'])
            || f.name == "."
            || f.name == ".."
            || f.name == INDEX_NAME
            || (i > 0 && files[i - 1].name == f.name);
        if bad {
            return Err(IsoError::Name(f.name.clone()));
        }
    }
    // The index is one more file of the root directory; its data goes last.
    let mut all_names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
    all_names.push(INDEX_NAME);
    all_names.sort();
    let all_iso = iso_names(&all_names);
    // Directory records must be sorted by their ISO name.
    let dir_sectors = dir_layout(&all_names, &all_iso).len() as u32;
    let iso_of: std::collections::HashMap<String, String> = all_names
        .iter()
        .map(|n| n.to_string())
        .zip(all_iso)
        .collect();
    let iso_name = |name: &str| iso_of.get(name).cloned().unwrap_or_default();
    let ce_lba = ROOT_LBA + dir_sectors;
    let data_lba = ce_lba + 1;

    let dir = out.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".kimg-iso-")
        .tempfile_in(dir)
        .map_err(io_err)?;
    let mut w = BufWriter::with_capacity(1 << 20, tmp.as_file());
    w.seek(SeekFrom::Start(data_lba as u64 * SECTOR))
        .map_err(io_err)?;
    let mut pos = data_lba as u64 * SECTOR;
    let mut entries = Vec::new();
    for f in files {
        let mut hw = HashWriter {
            inner: &mut w,
            hash: Sha256::new(),
            size: 0,
        };
        let name = f.name.clone();
        (f.fill)(&mut hw).map_err(|why| IsoError::Source {
            name: name.clone(),
            why,
        })?;
        let (size, sha) = (hw.size, hex::encode(hw.hash.finalize()));
        if size > MAX_FILE {
            return Err(IsoError::TooBig { name, size });
        }
        let pad = (SECTOR - size % SECTOR) % SECTOR;
        w.write_all(&vec![0u8; pad as usize]).map_err(io_err)?;
        entries.push(IsoEntry {
            iso_name: iso_name(&name),
            name,
            lba: (pos / SECTOR) as u32,
            size,
            sha256: sha,
        });
        pos += size + pad;
    }
    let index = index_text(
        &entries
            .iter()
            .map(|e| IndexEntry {
                name: e.name.clone(),
                size: e.size,
                sha256: e.sha256.clone(),
            })
            .collect::<Vec<_>>(),
    );
    let index_entry = IsoEntry {
        name: INDEX_NAME.to_string(),
        iso_name: iso_name(INDEX_NAME),
        lba: (pos / SECTOR) as u32,
        size: index.len() as u64,
        sha256: hex::encode(Sha256::digest(index.as_bytes())),
    };
    w.write_all(index.as_bytes()).map_err(io_err)?;
    let pad = (SECTOR - index_entry.size % SECTOR) % SECTOR;
    w.write_all(&vec![0u8; pad as usize]).map_err(io_err)?;
    pos += index_entry.size + pad;
    let sha256 = index_entry.sha256.clone();
    let total_sectors = (pos / SECTOR) as u32;
    // The descriptors, path tables, directory and continuation block.
    let mut head = vec![0u8; data_lba as usize * SECTOR as usize];
    let root_size = dir_sectors * SECTOR as u32;
    let root = dir_record(&[0], ROOT_LBA, root_size, true, epoch, &[]);
    let pvd = pvd(total_sectors, &root, epoch, &sha256);
    put(&mut head, PVD_LBA, &pvd);
    let mut term = vec![0u8; 7];
    term[0] = 255;
    term[1..6].copy_from_slice(b"CD001");
    term[6] = 1;
    put(&mut head, TERM_LBA, &term);
    put(&mut head, LPATH_LBA, &path_table(ROOT_LBA, false));
    put(&mut head, MPATH_LBA, &path_table(ROOT_LBA, true));
    let mut listed = entries.clone();
    listed.push(index_entry);
    let records = dir_records(&listed, ROOT_LBA, root_size, ce_lba, epoch);
    for (i, sector) in dir_layout_records(records).into_iter().enumerate() {
        put(&mut head, ROOT_LBA + i as u32, &sector);
    }
    put(&mut head, ce_lba, &er_entry());
    w.seek(SeekFrom::Start(0)).map_err(io_err)?;
    w.write_all(&head).map_err(io_err)?;
    w.flush().map_err(io_err)?;
    drop(w);
    tmp.as_file().set_len(pos).map_err(io_err)?;
    tmp.as_file().sync_all().map_err(io_err)?;
    tmp.persist(out).map_err(|e| io_err(e.error))?;
    let mut perms = std::fs::metadata(out).map_err(io_err)?.permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
    std::fs::set_permissions(out, perms).map_err(io_err)?;
    Ok(IsoImage {
        entries,
        sha256,
        size: pos,
    })
}

struct HashWriter<'a, W: Write> {
    inner: &'a mut W,
    hash: Sha256,
    size: u64,
}

impl<W: Write> Write for HashWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn put(head: &mut [u8], lba: u32, bytes: &[u8]) {
    let at = lba as usize * SECTOR as usize;
    head[at..at + bytes.len()].copy_from_slice(bytes);
}

/// Plain ISO9660 names (level 2: `[A-Z0-9_]`, at most 30 characters with `.` and
/// `;1`), unique: a clash gets a numbered suffix.
fn iso_names(names: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for name in names {
        let (stem, ext) = match name.split_once('.') {
            Some((s, e)) => (s, e.replace('.', "_")),
            None => (*name, String::new()),
        };
        let clean = |s: &str, max: usize| -> String {
            s.chars()
                .map(|c| match c.to_ascii_uppercase() {
                    c @ ('A'..='Z' | '0'..='9' | '_') => c,
                    _ => '_',
                })
                .take(max)
                .collect()
        };
        let ext = clean(&ext, 8);
        let mut stem = clean(stem, 28 - ext.len());
        let mut n = 0;
        let make = |stem: &str| format!("{stem}.{ext};1");
        while out.contains(&make(&stem)) {
            n += 1;
            let suffix = format!("_{n}");
            let keep = (28 - ext.len()).saturating_sub(suffix.len());
            stem = format!("{}{suffix}", &clean(name, keep));
        }
        out.push(make(&stem));
    }
    out
}

fn both16(v: u16) -> [u8; 4] {
    let mut b = [0u8; 4];
    b[..2].copy_from_slice(&v.to_le_bytes());
    b[2..].copy_from_slice(&v.to_be_bytes());
    b
}

fn both32(v: u32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&v.to_le_bytes());
    b[4..].copy_from_slice(&v.to_be_bytes());
    b
}

/// 7-byte directory-record date (also Rock Ridge TF's short form).
fn date7(t: i64) -> [u8; 7] {
    let (y, mo, d, h, mi, s) = kimg_util::civil::civil(t);
    [(y - 1900).clamp(0, 255) as u8, mo, d, h, mi, s, 0]
}

/// 17-byte volume descriptor date.
fn date17(t: i64) -> [u8; 17] {
    let (y, mo, d, h, mi, s) = kimg_util::civil::civil(t);
    let text = format!("{:04}{mo:02}{d:02}{h:02}{mi:02}{s:02}00", y.clamp(0, 9999));
    let mut b = [0u8; 17];
    b[..16].copy_from_slice(text.as_bytes());
    b
}

fn padded(s: &str, len: usize) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.resize(len, b' ');
    v
}

fn pvd(total_sectors: u32, root: &[u8], epoch: i64, sha256: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(2048);
    p.push(1);
    p.extend_from_slice(b"CD001");
    p.push(1);
    p.push(0);
    p.extend(padded("LINUX", 32));
    p.extend(padded(VOLUME_LABEL, 32));
    p.extend([0u8; 8]);
    p.extend(both32(total_sectors));
    p.extend([0u8; 32]);
    p.extend(both16(1)); // volume set size
    p.extend(both16(1)); // volume sequence number
    p.extend(both16(SECTOR as u16));
    p.extend(both32(10)); // path table size: the root's entry only
    p.extend(LPATH_LBA.to_le_bytes());
    p.extend(0u32.to_le_bytes());
    p.extend(MPATH_LBA.to_be_bytes());
    p.extend(0u32.to_be_bytes());
    p.extend_from_slice(root);
    p.extend(padded("", 128)); // volume set
    p.extend(padded("", 128)); // publisher
    p.extend(padded("", 128)); // preparer
    p.extend(padded("KIMG MKCDROM", 128)); // application
    p.extend(padded("", 37 * 3));
    for _ in 0..2 {
        p.extend(date17(epoch));
    }
    p.extend(b"0000000000000000\0"); // expiration: none
    p.extend(date17(epoch));
    p.push(1); // file structure version
    p.push(0);
    debug_assert_eq!(p.len(), PVD_APP_USE);
    p.extend(padded(&app_use(sha256), 512));
    p.resize(2048, 0);
    p
}

fn path_table(root_lba: u32, big_endian: bool) -> Vec<u8> {
    let mut t = vec![1u8, 0];
    t.extend(if big_endian {
        root_lba.to_be_bytes()
    } else {
        root_lba.to_le_bytes()
    });
    t.extend(if big_endian {
        1u16.to_be_bytes()
    } else {
        1u16.to_le_bytes()
    });
    t.extend([0u8, 0]);
    t
}

/// One directory record with its system-use area.
fn dir_record(name: &[u8], lba: u32, size: u32, dir: bool, epoch: i64, su: &[u8]) -> Vec<u8> {
    let mut r = vec![0u8, 0];
    r.extend(both32(lba));
    r.extend(both32(size));
    r.extend(date7(epoch));
    r.push(if dir { 2 } else { 0 });
    r.extend([0u8, 0]);
    r.extend(both16(1));
    r.push(name.len() as u8);
    r.extend_from_slice(name);
    if r.len() % 2 == 1 {
        r.push(0);
    }
    r.extend_from_slice(su);
    if r.len() % 2 == 1 {
        r.push(0);
    }
    r[0] = r.len() as u8;
    r
}

/// Rock Ridge PX: mode, links, uid 0, gid 0 (RRIP 1.10 form, 36 bytes).
fn px(mode: u32, links: u32) -> Vec<u8> {
    let mut e = vec![b'P', b'X', 36, 1];
    e.extend(both32(mode));
    e.extend(both32(links));
    e.extend(both32(0));
    e.extend(both32(0));
    e
}

/// Rock Ridge TF: modification and access time.
fn tf(epoch: i64) -> Vec<u8> {
    let mut e = vec![b'T', b'F', 5 + 14, 1, 0x06];
    e.extend(date7(epoch));
    e.extend(date7(epoch));
    e
}

const ER_ID: &str = "RRIP_1991A";
const ER_DES: &str =
    "THE ROCK RIDGE INTERCHANGE PROTOCOL PROVIDES SUPPORT FOR POSIX FILE SYSTEM SEMANTICS";
const ER_SRC: &str = "PLEASE CONTACT DISC PUBLISHER FOR SPECIFICATION SOURCE.  SEE PUBLISHER IDENTIFIER IN PRIMARY VOLUME DESCRIPTOR FOR CONTACT INFORMATION.";

/// SUSP ER entry naming Rock Ridge (in the continuation block: too big for a record).
fn er_entry() -> Vec<u8> {
    let mut e = vec![
        b'E',
        b'R',
        0,
        1,
        ER_ID.len() as u8,
        ER_DES.len() as u8,
        ER_SRC.len() as u8,
        1,
    ];
    e.extend(ER_ID.as_bytes());
    e.extend(ER_DES.as_bytes());
    e.extend(ER_SRC.as_bytes());
    e[2] = e.len() as u8;
    e
}

/// The records of the root directory: `.` (with SP, CE to the ER), `..`, the files.
fn dir_records(
    entries: &[IsoEntry],
    root_lba: u32,
    root_size: u32,
    ce_lba: u32,
    epoch: i64,
) -> Vec<Vec<u8>> {
    let er_len = er_entry().len() as u32;
    let mut dot_su = vec![b'S', b'P', 7, 1, 0xBE, 0xEF, 0];
    dot_su.extend(px(0o040755, 2));
    dot_su.extend(tf(epoch));
    let mut ce = vec![b'C', b'E', 28, 1];
    ce.extend(both32(ce_lba));
    ce.extend(both32(0));
    ce.extend(both32(er_len));
    dot_su.extend(ce);
    let mut dotdot_su = px(0o040755, 2);
    dotdot_su.extend(tf(epoch));
    let mut records = vec![
        dir_record(&[0], root_lba, root_size, true, epoch, &dot_su),
        dir_record(&[1], root_lba, root_size, true, epoch, &dotdot_su),
    ];
    let mut sorted: Vec<&IsoEntry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.iso_name.cmp(&b.iso_name));
    for e in sorted {
        let mut su = px(0o100444, 1);
        let mut nm = vec![b'N', b'M', 5 + e.name.len() as u8, 1, 0];
        nm.extend(e.name.as_bytes());
        su.extend(nm);
        su.extend(tf(epoch));
        records.push(dir_record(
            e.iso_name.as_bytes(),
            e.lba,
            e.size as u32,
            false,
            epoch,
            &su,
        ));
    }
    records
}

/// Packs records into sectors (a record never crosses a sector boundary).
fn dir_layout_records(records: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let mut sectors = vec![Vec::new()];
    for r in records {
        let cur = sectors.last_mut().map_or(0, |s| s.len());
        if cur + r.len() > SECTOR as usize {
            sectors.push(Vec::new());
        }
        if let Some(s) = sectors.last_mut() {
            s.extend(r);
        }
    }
    sectors
}

/// The root directory's sectors for these files (sizes and places do not change
/// record lengths, so zeros stand in for them).
fn dir_layout(names: &[&str], iso_names: &[String]) -> Vec<Vec<u8>> {
    let fake: Vec<IsoEntry> = names
        .iter()
        .zip(iso_names)
        .map(|(name, n)| IsoEntry {
            name: name.to_string(),
            iso_name: n.clone(),
            lba: 0,
            size: 0,
            sha256: String::new(),
        })
        .collect();
    dir_layout_records(dir_records(&fake, 0, 0, 0, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(name: &str, content: Vec<u8>) -> IsoSource<'static> {
        IsoSource {
            name: name.to_string(),
            fill: Box::new(move |w| w.write_all(&content).map_err(|e| e.to_string())),
        }
    }

    #[test]
    fn iso_names_are_clean_and_unique() {
        let n = iso_names(&["01-base.tar.zst", "02-base.tar.zst", "x"]);
        assert_eq!(n, ["01_BASE.TAR_ZST;1", "02_BASE.TAR_ZST;1", "X.;1"]);
        let n = iso_names(&["a-b.tar", "a_b.tar"]);
        assert_ne!(n[0], n[1]);
    }

    #[test]
    fn xorriso_and_isoinfo_read_names_order_and_content() {
        if !kimg_util::cmd::exists("xorriso") {
            panic!("xorriso missing: run scripts/setup-host");
        }
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("c.iso");
        let many: Vec<IsoSource> = (0..60)
            .map(|i| {
                source(
                    &format!("{i:02}-overlay-with-a-long-name-{i}.tar.zst"),
                    vec![i as u8; i * 1000],
                )
            })
            .collect();
        let img = write(&out, many, 1_700_000_000).unwrap();
        assert_eq!(img.entries.len(), 60);
        let o = kimg_util::cmd::run_stdout(
            std::process::Command::new("xorriso")
                .args(["-abort_on", "WARNING", "-indev"])
                .arg(&out)
                .args(["-find", "/", "-type", "f", "-exec", "lsdl"]),
        )
        .unwrap();
        let names: Vec<&str> = o
            .lines()
            .filter_map(|l| l.rsplit_once(" '/").map(|(_, n)| n.trim_end_matches('\'')))
            .collect();
        let want: Vec<String> = (0..60)
            .map(|i| format!("{i:02}-overlay-with-a-long-name-{i}.tar.zst"))
            .chain([INDEX_NAME.to_string()])
            .collect();
        assert_eq!(names, want, "{o}");
        assert!(o.contains("-r--r--r--"), "{o}");
        // Content read back by xorriso equals what went in.
        let x = dir.path().join("x");
        kimg_util::cmd::run(
            std::process::Command::new("xorriso")
                .args(["-osirrox", "on", "-indev"])
                .arg(&out)
                .args(["-extract", "/37-overlay-with-a-long-name-37.tar.zst"])
                .arg(&x),
        )
        .unwrap();
        assert_eq!(std::fs::read(&x).unwrap(), vec![37u8; 37000]);
        // The index lists every file with its size and sha256; its own sha256 is the
        // cdrom's hash.
        let ix = dir.path().join("ix");
        kimg_util::cmd::run(
            std::process::Command::new("xorriso")
                .args(["-osirrox", "on", "-indev"])
                .arg(&out)
                .args(["-extract", &format!("/{INDEX_NAME}")])
                .arg(&ix),
        )
        .unwrap();
        let index = std::fs::read(&ix).unwrap();
        assert_eq!(hex::encode(Sha256::digest(&index)), img.sha256);
        let listed =
            kimg_contract::cdrom::parse_index(std::str::from_utf8(&index).unwrap()).unwrap();
        assert_eq!(listed.len(), 60);
        assert_eq!(listed[37].name, "37-overlay-with-a-long-name-37.tar.zst");
        assert_eq!(listed[37].size, 37000);
        assert_eq!(
            listed[37].sha256,
            hex::encode(Sha256::digest(vec![37u8; 37000]))
        );
        // Lower-case names with '-' and the modes above came from Rock Ridge (NM, PX).
        let info = kimg_util::cmd::run_stdout(
            std::process::Command::new("xorriso")
                .arg("-indev")
                .arg(&out)
                .arg("-pvd_info"),
        )
        .unwrap();
        assert!(info.contains("Volume Id    : kimg"), "{info}");
        // Deterministic: same inputs, same bytes.
        let again = dir.path().join("d.iso");
        write(
            &again,
            (0..60)
                .map(|i| {
                    source(
                        &format!("{i:02}-overlay-with-a-long-name-{i}.tar.zst"),
                        vec![i as u8; i * 1000],
                    )
                })
                .collect(),
            1_700_000_000,
        )
        .unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&again).unwrap());
        let head = std::fs::read(&out).unwrap();
        let pvd = &head[16 * 2048..17 * 2048];
        assert_eq!(
            kimg_contract::cdrom::parse_app_use(&pvd[PVD_APP_USE..PVD_APP_USE + 512]),
            Some(img.sha256)
        );
    }

    #[test]
    fn names_that_do_not_fit_a_record_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("c.iso");
        let long = format!("01-{}.tar", "x".repeat(MAX_NAME));
        let e = write(&out, vec![source(&long, vec![])], 0).unwrap_err();
        assert!(matches!(e, IsoError::Name(_)), "{e}");
        let twice = vec![source("a.tar", vec![]), source("a.tar", vec![])];
        assert!(matches!(write(&out, twice, 0), Err(IsoError::Name(_))));
        for bad in [INDEX_NAME, "a\nb.tar"] {
            let e = write(&out, vec![source(bad, vec![])], 0).unwrap_err();
            assert!(matches!(e, IsoError::Name(_)), "{e}");
        }
        let fits = format!("{}.tar", "y".repeat(MAX_NAME - 4));
        write(&out, vec![source(&fits, vec![1])], 0).unwrap();
        let o = kimg_util::cmd::run_stdout(
            std::process::Command::new("xorriso")
                .args(["-abort_on", "WARNING", "-indev"])
                .arg(&out)
                .args(["-find", "/", "-type", "f"]),
        )
        .unwrap();
        assert!(o.contains(&fits), "{o}");
    }

    #[test]
    fn a_failing_source_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("c.iso");
        let bad = IsoSource {
            name: "02-bad.tar".into(),
            fill: Box::new(|_| Err("tar script failed".into())),
        };
        let e = write(&out, vec![source("01-a.tar", vec![1; 10]), bad], 0).unwrap_err();
        assert!(e.to_string().contains("02-bad.tar"), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
