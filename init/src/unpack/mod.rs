//! Unpacks one overlay archive (tar, optionally gzip/xz/zstd) onto a root, safely.
//!
//! Every entry's place is decided by [`crate::pathsafe`] (no `..`, no /proc, /sys,
//! /dev, /run, not through symlinks leading there). An existing file is unlinked,
//! never opened for writing; new files are created with `O_EXCL|O_NOFOLLOW`. Modes
//! (setuid, sticky), numeric owners, mtimes, symlinks, hard links, long names (GNU,
//! PAX), `SCHILY.xattr.*` and holes (a GNU sparse member's holes stay holes) come out as GNU tar extracts them. Device nodes are refused: an overlay
//! has no business creating another way to reach a disk.
//!
//! Work is bounded by the archive, not by what it declares: a GNU sparse member's
//! holes are seeks (never zeros through memory), and a member whose data would not
//! fit in the target's free space ends the archive before anything is read of it.

use crate::pathsafe::{self, Components, Refusal};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Outcome of one archive.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Outcome {
    /// Entries written.
    pub written: u64,
    /// Entries refused or failed (each logged with its path and why).
    pub refused: Vec<String>,
    /// sha256 of the archive file's bytes.
    pub sha256: String,
    /// Its size.
    pub size: u64,
    /// Why the archive as a whole failed (corrupt, truncated), if it did.
    pub failed: Option<String>,
}

/// Reads through, hashing every byte unless the hash is known already.
struct HashReader<R> {
    inner: R,
    hash: Option<Sha256>,
    size: u64,
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = &mut self.hash {
            h.update(&buf[..n]);
        }
        self.size += n as u64;
        Ok(n)
    }
}

/// Compression of an archive, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip.
    Gzip,
    /// xz.
    Xz,
    /// zstd.
    Zstd,
}

/// Tells the compression from the magic bytes.
pub fn sniff(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Compression::Xz
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    }
}

/// Unpacks `archive` onto `root`; `log` gets one line per refused entry. `known` is
/// the archive's sha256 and size from a trusted index: when the file has that size,
/// the sha256 is reported as is; otherwise every byte is hashed on the way through.
pub fn unpack_file(
    archive: &Path,
    root: &Path,
    log: &mut dyn FnMut(&str),
    known: Option<(&str, u64)>,
) -> Outcome {
    let mut out = Outcome::default();
    let file = match File::open(archive) {
        Ok(f) => f,
        Err(e) => {
            out.failed = Some(format!("open {}: {e}", archive.display()));
            return out;
        }
    };
    let len = file.metadata().map(|m| m.len()).ok();
    let known = known.filter(|(_, size)| Some(*size) == len);
    // The magic bytes, read without moving the file position.
    let mut head = [0u8; 6];
    let kind = match std::os::unix::fs::FileExt::read_at(&file, &mut head, 0) {
        Ok(n) => sniff(&head[..n]),
        Err(e) => {
            out.failed = Some(format!("read {}: {e}", archive.display()));
            return out;
        }
    };
    if let (Some((sha256, size)), Compression::None) = (known, kind) {
        // A plain tar with a known hash: member data goes file to file in the kernel.
        out.sha256 = sha256.to_string();
        out.size = size;
        if let Err(e) = unpack_tar_file(&file, root, log, &mut out) {
            out.failed = Some(e.to_string());
        }
        return out;
    }
    let mut hr = HashReader {
        inner: file,
        hash: known.is_none().then(Sha256::new),
        size: 0,
    };
    let mut result = unpack_stream(&mut hr, kind, root, log, &mut out);
    if let Some((sha256, size)) = known {
        out.sha256 = sha256.to_string();
        out.size = size;
    } else {
        // Hash the whole file even when the tar ended early (trailing zeros).
        let drained = io::copy(&mut hr, &mut io::sink());
        result = result.and(drained.map(|_| ()));
        out.sha256 = hr.hash.map(|h| hex(&h.finalize())).unwrap_or_default();
        out.size = hr.size;
    }
    if let Err(e) = result {
        out.failed = Some(e.to_string());
    }
    out
}

/// Lower-case hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Unpacks the tar in `raw`, a stream that is being hashed.
fn unpack_stream(
    raw: &mut (dyn Read + Send),
    kind: Compression,
    root: &Path,
    log: &mut dyn FnMut(&str),
    out: &mut Outcome,
) -> io::Result<()> {
    with_tar(raw, kind, &mut |tar| unpack_tar(tar, root, log, out))
}

/// Hands `f` the tar inside `raw`, decompressed by `kind`. A plain tar is read
/// straight from `raw` (no buffer copy in between); the decoders get buffered input.
fn with_tar(
    raw: &mut (dyn Read + Send),
    kind: Compression,
    f: &mut dyn FnMut(&mut dyn Read) -> io::Result<()>,
) -> io::Result<()> {
    let buffered = |raw| BufReader::with_capacity(1 << 20, raw);
    match kind {
        Compression::None => f(raw),
        Compression::Gzip => f(&mut flate2::read::MultiGzDecoder::new(buffered(raw))),
        Compression::Zstd => {
            let mut z = ruzstd::decoding::StreamingDecoder::new(buffered(raw))
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("zstd: {e}")))?;
            f(&mut z)
        }
        Compression::Xz => {
            // lzma-rs decodes from a reader into a writer: a thread feeds a pipe.
            let mut buf = buffered(raw);
            let (rd, mut wr) = io::pipe()?;
            std::thread::scope(|s| {
                let t = s.spawn(move || {
                    lzma_rs::xz_decompress(&mut buf, &mut wr)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("xz: {e}")))
                });
                let r = f(&mut BufReader::with_capacity(1 << 20, rd));
                let x = t
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("xz thread panicked")));
                // The decoder's error explains a tar error caused by a broken stream.
                x.and(r)
            })
        }
    }
}

/// Reads `archive` through without writing anything and returns (at most `max` of)
/// the entries the unpacker refuses whatever the target holds: a `..` component,
/// a path into /proc, /sys, /dev or /run, a hard link to such a path, a device
/// node. `Err` when the archive cannot be read. A hot apply checks every overlay
/// this way first, so a bad one changes nothing on a running VM.
pub fn precheck(archive: &Path, max: usize) -> Result<Vec<String>, String> {
    let mut file = File::open(archive).map_err(|e| format!("open {}: {e}", archive.display()))?;
    let mut head = [0u8; 6];
    let n = std::os::unix::fs::FileExt::read_at(&file, &mut head, 0)
        .map_err(|e| format!("read {}: {e}", archive.display()))?;
    let mut refused = Vec::new();
    let mut check = |tar: &mut dyn Read| -> io::Result<()> {
        for entry in tar::Archive::new(tar).entries()? {
            let entry = entry?;
            let kind = entry.header().entry_type();
            let shown = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let lexical = |path: &[u8]| {
                pathsafe::entry_components(path)
                    .and_then(|c| pathsafe::resolve(&c, false, &mut |_| None))
            };
            let why = match lexical(&entry.path_bytes()) {
                Err(Refusal::Empty) if kind.is_dir() => None,
                Err(r) => Some(r.to_string()),
                Ok(_) if matches!(kind, tar::EntryType::Char | tar::EntryType::Block) => {
                    Some("device nodes are not unpacked".to_string())
                }
                Ok(_) if kind == tar::EntryType::Link => entry
                    .link_name_bytes()
                    .and_then(|t| lexical(&t).err())
                    .map(|r| format!("hard link target: {r}")),
                Ok(_) => None,
            };
            if let Some(why) = why {
                if refused.len() < max {
                    refused.push(format!("{shown}: {why}"));
                }
            }
        }
        Ok(())
    };
    with_tar(&mut file, sniff(&head[..n]), &mut check)
        .map_err(|e| format!("read {}: {e}", archive.display()))?;
    Ok(refused)
}

/// A directory whose mtime and mode are set once the archive is done (writing
/// entries into it changes its mtime). `dev`/`ino` name the very directory made: a
/// later entry may have put a symlink (or anything else) where it was, and the
/// fix must then touch nothing.
struct DirFix {
    path: PathBuf,
    mode: u32,
    mtime: (i64, i64),
    dev: u64,
    ino: u64,
}

/// Unpacks a tar stream: member data is read through a buffer.
fn unpack_tar<R: Read>(
    r: R,
    root: &Path,
    log: &mut dyn FnMut(&str),
    out: &mut Outcome,
) -> io::Result<()> {
    let mut ar = tar::Archive::new(r);
    unpack_entries(ar.entries()?, None, root, log, out)
}

/// Unpacks a plain tar file: the archive is read for headers only, each regular
/// member's data goes to its file with sendfile(2) (page cache to page cache, as
/// busybox tar does; under TCG each copy through user space costs as much as the
/// rest of the unpacking), and the reader seeks over it.
fn unpack_tar_file(
    file: &File,
    root: &Path,
    log: &mut dyn FnMut(&str),
    out: &mut Outcome,
) -> io::Result<()> {
    let mut ar = tar::Archive::new(file);
    unpack_entries(ar.entries_with_seek()?, Some(file), root, log, out)
}

fn unpack_entries<R: Read>(
    entries: tar::Entries<'_, R>,
    source: Option<&File>,
    root: &Path,
    log: &mut dyn FnMut(&str),
    out: &mut Outcome,
) -> io::Result<()> {
    let mut tree = Tree {
        root,
        is_root: nix::unistd::geteuid().is_root(),
        known_dirs: HashSet::new(),
        fixups: Vec::new(),
        free: free_space(root),
    };
    for entry in entries {
        let mut entry = entry?;
        let raw_path = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw_path).into_owned();
        match write_entry(&mut entry, source, &mut tree) {
            Ok(()) => out.written += 1,
            Err(EntryError::Refused(why)) => {
                log(&format!("refused {shown}: {why}"));
                out.refused.push(format!("{shown}: {why}"));
            }
            Err(EntryError::Io(e)) if is_stream_error(&e) => return Err(e),
            Err(EntryError::Fatal(why)) => {
                log(&format!("{shown}: {why}"));
                return Err(io::Error::other(format!("{shown}: {why}")));
            }
            Err(EntryError::Io(e)) => {
                log(&format!("cannot write {shown}: {e}"));
                out.refused.push(format!("{shown}: {e}"));
            }
        }
    }
    for d in tree.fixups.iter().rev() {
        if let Err(e) = fix_dir(d) {
            log(&format!(
                "directory {}: mode and mtime not set: {e}",
                d.path.display()
            ));
        }
    }
    Ok(())
}

/// Opens the directory at `p` itself: never a symlink in its place (`O_NOFOLLOW`),
/// never anything but a directory.
fn open_dir(p: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(p)
}

/// Sets a directory's final mode and mtime through a descriptor, once that
/// descriptor is known to be the directory this archive made (same device and
/// inode): a path alone would follow whatever a later entry put there.
fn fix_dir(d: &DirFix) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dir = open_dir(&d.path)?;
    let md = dir.metadata()?;
    if (md.dev(), md.ino()) != (d.dev, d.ino) {
        return Err(io::Error::other("replaced by a later entry"));
    }
    dir.set_permissions(fs::Permissions::from_mode(d.mode))?;
    let t = nix::sys::time::TimeSpec::new(d.mtime.0, d.mtime.1);
    nix::sys::stat::futimens(&dir, &t, &t).map_err(io::Error::from)
}

/// Bytes that may still be written on the filesystem of `p`, if it can be told.
fn free_space(p: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(p).ok()?;
    Some((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

/// Errors reading the archive (as opposed to writing one entry) end the archive.
fn is_stream_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput
    ) || e.to_string().contains("xz")
        || e.to_string().contains("zstd")
}

enum EntryError {
    /// This entry is left out; the archive goes on.
    Refused(String),
    /// Writing this entry failed; the archive goes on.
    Io(io::Error),
    /// The archive cannot be applied: it ends here, nothing more of it is read.
    Fatal(String),
}

impl From<io::Error> for EntryError {
    fn from(e: io::Error) -> Self {
        EntryError::Io(e)
    }
}

impl From<Refusal> for EntryError {
    fn from(r: Refusal) -> Self {
        EntryError::Refused(r.to_string())
    }
}

/// The tree an archive is unpacked onto, and what unpacking it has learnt of it.
struct Tree<'a> {
    root: &'a Path,
    /// Whether owners can be set (running as root).
    is_root: bool,
    /// Paths below `root` known to be real directories (not symlinks): looked at or
    /// made by this archive, forgotten when an entry replaces one. Saves a stat of
    /// every parent of every entry, twice; path walks are dear under TCG.
    known_dirs: HashSet<Components>,
    /// Directories whose mode and mtime are set once the archive is done.
    fixups: Vec<DirFix>,
    /// Free bytes on the root's filesystem, less what this archive wrote since it
    /// was last asked (`None`: unknown, no bound).
    free: Option<u64>,
}

impl Tree<'_> {
    /// Lookup for [`pathsafe::resolve`]: a symlink's target, `None` for anything else.
    fn lookup(&mut self, pre: &[Vec<u8>]) -> Option<Vec<u8>> {
        if self.known_dirs.contains(pre) {
            return None;
        }
        let p = join(self.root, pre);
        let md = fs::symlink_metadata(&p).ok()?;
        if md.is_dir() {
            self.known_dirs.insert(pre.to_vec());
        }
        if !md.file_type().is_symlink() {
            return None;
        }
        fs::read_link(&p)
            .ok()
            .map(|t| t.into_os_string().into_vec())
    }

    /// Resolves an entry's components (see [`pathsafe::resolve`]).
    fn resolve(&mut self, comps: &[Vec<u8>], follow_last: bool) -> Result<Components, Refusal> {
        pathsafe::resolve(comps, follow_last, &mut |pre| self.lookup(pre))
    }

    /// Something other than a directory is about to be put at `comps`.
    fn forget(&mut self, comps: &[Vec<u8>]) {
        if self.known_dirs.contains(comps) {
            self.known_dirs.retain(|k| !k.starts_with(comps));
        }
    }

    /// Takes `bytes` of data out of the space budget, or ends the archive when they
    /// do not fit: a member that says it holds more than the disk has free (a 10 KB
    /// zstd stream can declare terabytes) would fill the disk, and skipping it would
    /// still mean decompressing all of it. The budget is asked anew before a
    /// refusal, since replaced files give space back.
    fn reserve(&mut self, bytes: u64) -> Result<(), EntryError> {
        let Some(free) = self.free else { return Ok(()) };
        let free = if bytes > free {
            free_space(self.root).unwrap_or(free)
        } else {
            free
        };
        if bytes > free {
            return Err(EntryError::Fatal(format!(
                "holds {bytes} bytes of data, more than the {free} bytes free on the target"
            )));
        }
        self.free = Some(free - bytes);
        Ok(())
    }
}

use std::os::unix::ffi::OsStringExt;

fn join(root: &Path, comps: &[Vec<u8>]) -> PathBuf {
    let mut p = root.to_path_buf();
    for c in comps {
        p.push(OsStr::from_bytes(c));
    }
    p
}

/// Makes the parent directories of `comps` (already resolved: no symlinks in them).
fn make_parents(tree: &mut Tree<'_>, comps: &Components) -> Result<(), EntryError> {
    let mut p = tree.root.to_path_buf();
    for (i, c) in comps[..comps.len() - 1].iter().enumerate() {
        p.push(OsStr::from_bytes(c));
        if tree.known_dirs.contains(&comps[..=i]) {
            continue;
        }
        match fs::symlink_metadata(&p) {
            Ok(md) if md.is_dir() => {
                tree.known_dirs.insert(comps[..=i].to_vec());
            }
            Ok(_) => {
                return Err(EntryError::Refused(format!(
                    "{} is not a directory",
                    p.display()
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&p)?;
                fs::set_permissions(&p, fs::Permissions::from_mode(0o755))?;
                tree.known_dirs.insert(comps[..=i].to_vec());
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Removes what is at `p` (not following a symlink); an empty directory too.
fn remove_existing(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(md) if md.is_dir() => fs::remove_dir(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Seconds and nanoseconds of a PAX `mtime` record (`1795311305.840077858`).
fn pax_mtime<R: Read>(entry: &mut tar::Entry<'_, R>) -> Option<(i64, i64)> {
    let exts = entry.pax_extensions().ok()??;
    for ext in exts.flatten() {
        if ext.key_bytes() == b"mtime" {
            let v = std::str::from_utf8(ext.value_bytes()).ok()?;
            let (s, frac) = v.split_once('.').unwrap_or((v, ""));
            let secs: i64 = s.parse().ok()?;
            let digits: String = frac.chars().take(9).collect();
            let nanos: i64 = format!("{digits:0<9}").parse().ok()?;
            return Some(if secs < 0 && nanos > 0 {
                (secs - 1, 1_000_000_000 - nanos)
            } else {
                (secs, nanos)
            });
        }
    }
    None
}

fn set_mtime(p: &Path, (secs, nanos): (i64, i64)) -> io::Result<()> {
    let t = nix::sys::time::TimeSpec::new(secs, nanos);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        p,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(io::Error::from)
}

/// Writes one entry; `source` is the plain tar file the entry's data sits in, if
/// it may be copied from there directly.
fn write_entry<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    source: Option<&File>,
    tree: &mut Tree<'_>,
) -> Result<(), EntryError> {
    let h = entry.header();
    let kind = h.entry_type();
    let comps = match pathsafe::entry_components(&entry.path_bytes()) {
        // `./` of `tar -C dir .`: the root keeps its own mode and owner.
        Err(Refusal::Empty) if kind.is_dir() => return Ok(()),
        other => other?,
    };
    let mode = h.mode()? & 0o7777;
    let header_mtime = h.mtime().unwrap_or(0) as i64;
    let uid = h.uid().unwrap_or(0) as u32;
    let gid = h.gid().unwrap_or(0) as u32;
    let mtime = pax_mtime(entry).unwrap_or((header_mtime, 0));
    // Directories may be symlinks to directories already (/bin -> usr/bin): follow.
    let follow_last = kind.is_dir();
    let resolved = tree.resolve(&comps, follow_last)?;
    make_parents(tree, &resolved)?;
    let path = join(tree.root, &resolved);
    if !kind.is_dir() {
        tree.forget(&resolved);
    }
    let is_root = tree.is_root;
    let owner = |p: &Path| -> io::Result<()> {
        if is_root {
            std::os::unix::fs::lchown(p, Some(uid), Some(gid))?;
        }
        Ok(())
    };
    match kind {
        tar::EntryType::Directory => {
            match fs::symlink_metadata(&path) {
                Ok(md) if md.is_dir() => {}
                Ok(_) => {
                    fs::remove_file(&path)?;
                    fs::create_dir(&path)?;
                }
                Err(_) => fs::create_dir(&path)?,
            }
            // From here on, through a descriptor of this very directory.
            let dir = open_dir(&path)?;
            let md = dir.metadata()?;
            tree.known_dirs.insert(resolved);
            if is_root {
                std::os::unix::fs::fchown(&dir, Some(uid), Some(gid))?;
            }
            // Writable until the archive is done, then its own mode.
            dir.set_permissions(fs::Permissions::from_mode(mode | 0o700))?;
            use std::os::unix::fs::MetadataExt;
            tree.fixups.push(DirFix {
                path,
                mode,
                mtime,
                dev: md.dev(),
                ino: md.ino(),
            });
        }
        tar::EntryType::GNUSparse => {
            // The tar crate expands the sparse map into data and zero runs; only its
            // own unpack turns the zero runs into seeks. Read through, an 8 GiB hole
            // is 8 GiB of zeros in memory. The file is created `O_EXCL` (no
            // symlink followed) at the resolved path, then fixed through its handle.
            tree.reserve(entry.header().entry_size()?)?;
            if entry.path_bytes().ends_with(b"/") {
                // tar's unpack would make an old-style directory of it.
                return Err(EntryError::Refused(
                    "sparse member named like a directory".into(),
                ));
            }
            remove_existing(&path)?;
            let f = match entry.unpack(&path)? {
                tar::Unpacked::File(f) => f,
                _ => return Err(EntryError::Refused("sparse member is not a file".into())),
            };
            if is_root {
                std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
            }
            f.set_permissions(fs::Permissions::from_mode(mode))?;
            set_xattrs(entry, &path)?;
            let t = nix::sys::time::TimeSpec::new(mtime.0, mtime.1);
            nix::sys::stat::futimens(&f, &t, &t).map_err(io::Error::from)?;
        }
        tar::EntryType::Regular | tar::EntryType::Continuous => {
            tree.reserve(entry.size())?;
            remove_existing(&path)?;
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
                .open(&path)?;
            let size = entry.size();
            match source {
                Some(src) => send(src, entry.raw_file_position(), &f, size)?,
                // Like GNU tar, a regular member's zeros are written as data.
                None => copy(entry, &mut f, size)?,
            }
            // Owner, mode and mtime through the open file: no more path walks.
            if is_root {
                std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
            }
            f.set_permissions(fs::Permissions::from_mode(mode))?;
            set_xattrs(entry, &path)?;
            let t = nix::sys::time::TimeSpec::new(mtime.0, mtime.1);
            nix::sys::stat::futimens(&f, &t, &t).map_err(io::Error::from)?;
        }
        tar::EntryType::Symlink => {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| EntryError::Refused("symlink without a target".into()))?
                .into_owned();
            remove_existing(&path)?;
            std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path)?;
            owner(&path)?;
            set_mtime(&path, mtime)?;
        }
        tar::EntryType::Link => {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| EntryError::Refused("hard link without a target".into()))?
                .into_owned();
            let tcomps = pathsafe::entry_components(&target)?;
            let tres = tree.resolve(&tcomps, false)?;
            let tpath = join(tree.root, &tres);
            if tpath == path {
                return Ok(());
            }
            remove_existing(&path)?;
            fs::hard_link(&tpath, &path)?;
        }
        tar::EntryType::Fifo => {
            remove_existing(&path)?;
            nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
                .map_err(io::Error::from)?;
            owner(&path)?;
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
            set_mtime(&path, mtime)?;
        }
        tar::EntryType::Char | tar::EntryType::Block => {
            return Err(EntryError::Refused("device nodes are not unpacked".into()))
        }
        other => {
            return Err(EntryError::Refused(format!(
                "entry type {other:?} is not unpacked"
            )))
        }
    }
    Ok(())
}

/// Copies `size` bytes from `src` at `offset` to `f` with sendfile(2).
fn send(src: &File, offset: u64, f: &File, size: u64) -> io::Result<()> {
    let mut off = offset as nix::libc::off64_t;
    let mut left = size;
    while left > 0 {
        let chunk = left.min(1 << 30) as usize;
        let n = nix::sys::sendfile::sendfile64(f, src, Some(&mut off), chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "archive ends inside a file",
            ));
        }
        left -= n as u64;
    }
    Ok(())
}

/// The copy buffer, reused across files: under TCG every fresh 1 MiB allocation shows.
fn with_buffer<T>(f: impl FnOnce(&mut [u8]) -> T) -> T {
    const BUF: usize = 1 << 20;
    thread_local! {
        static BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUFFER.with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.len() < BUF {
            buf.resize(BUF, 0);
        }
        f(&mut buf)
    })
}

/// Reads `size` bytes, exactly, into the start of `buf` (or all of it if smaller).
fn fill(r: &mut dyn Read, buf: &mut [u8], size: u64) -> io::Result<usize> {
    let want = buf.len().min(size as usize);
    let mut n = 0;
    while n < want {
        let got = r.read(&mut buf[n..want])?;
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "archive ends inside a file",
            ));
        }
        n += got;
    }
    #[cfg(test)]
    tests::PULLED.with(|p| p.set(p.get() + n as u64));
    Ok(n)
}

/// Copies `size` bytes through the buffer.
fn copy(r: &mut dyn Read, f: &mut File, size: u64) -> io::Result<()> {
    with_buffer(|buf| {
        let mut left = size;
        while left > 0 {
            let n = fill(r, buf, left)?;
            f.write_all(&buf[..n])?;
            left -= n as u64;
        }
        Ok(())
    })
}

/// Applies PAX `SCHILY.xattr.NAME` records.
fn set_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>, path: &Path) -> io::Result<()> {
    let Ok(Some(exts)) = entry.pax_extensions() else {
        return Ok(());
    };
    for ext in exts.flatten() {
        if let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
            crate::xattr::lset(path, name, ext.value_bytes())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
