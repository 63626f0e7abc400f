//! `kimg cp` in the guest: receive a file or tree into the VM, or send one out, as
//! [`Entry`] frames with the file bytes in [`Kind::Data`] frames and each file's
//! sha256 in [`Kind::FileEnd`]. Received files are hashed as written and checked.
//!
//! Writing never follows a symlink below the destination: each directory on the way
//! is opened with `O_NOFOLLOW` relative to its parent, files are created with
//! `O_EXCL|O_NOFOLLOW` after the old entry is unlinked, and directory modes are set
//! at the end through a descriptor of the directory itself (a 0500 directory can
//! still be filled, and a symlink swapped in meanwhile is not chmod'ed through).
//! Memory is one frame and one path stack, whatever the size of the copy.

use crate::session::Port;
use kimg_contract::agent::{entry_components, Entry, EntryKind, Kind, MAX_FRAME};
use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fchmod, fstatat, mkdirat, Mode, SFlag};
use nix::unistd::{symlinkat, unlinkat, UnlinkatFlags};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Directories whose modes are set at the end of one copy, at most.
const MAX_DIRS: usize = 100_000;
/// Deepest tree sent.
const MAX_DEPTH: usize = 256;

/// What a session returns: `Ok(Some(code))`, `Ok(None)` if the host left, `Err`.
type SessionEnd = Result<Option<i32>, String>;

fn dir_flags() -> OFlag {
    OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY
}

/// Opens `comps` below `base`, never through a symlink.
fn walk(base: &OwnedFd, comps: &[String]) -> Result<OwnedFd, String> {
    let mut fd = base.try_clone().map_err(|e| format!("dup: {e}"))?;
    for (i, c) in comps.iter().enumerate() {
        fd = openat(&fd, c.as_str(), dir_flags(), Mode::empty()).map_err(|e| {
            let at = comps[..=i].join("/");
            match e {
                Errno::ELOOP | Errno::ENOTDIR => {
                    format!("{at}: not a directory (symlinks are not followed)")
                }
                e => format!("{at}: {e}"),
            }
        })?;
    }
    Ok(fd)
}

/// Removes what is at `leaf` unless it is a directory; true if a directory is there.
fn clear(parent: &OwnedFd, leaf: &str, shown: &str) -> Result<bool, String> {
    match fstatat(parent, leaf, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR => {
            Ok(true)
        }
        Ok(_) => unlinkat(parent, leaf, UnlinkatFlags::NoRemoveDir)
            .map(|_| false)
            .map_err(|e| format!("{shown}: remove the old one: {e}")),
        Err(Errno::ENOENT) => Ok(false),
        Err(e) => Err(format!("{shown}: {e}")),
    }
}

/// The file being received.
struct Incoming {
    file: File,
    hash: Sha256,
    mode: u32,
    shown: String,
}

/// Receives entries into `dest` (see [`kimg_contract::agent::Session::CopyIn`]).
pub fn receive(port: &mut Port, dest: &str, name: &str) -> SessionEnd {
    let dest_path = Path::new(dest);
    if !dest_path.is_absolute() {
        return Err(format!("{dest}: the destination must be an absolute path"));
    }
    let (base, root) = if dest_path.is_dir() {
        (dest_path.to_path_buf(), name.to_string())
    } else {
        let leaf = dest_path
            .file_name()
            .map(|n| String::from_utf8_lossy(n.as_bytes()).into_owned());
        match (dest_path.parent(), leaf) {
            (Some(p), Some(l)) => (p.to_path_buf(), l),
            _ => return Err(format!("{dest}: not a place for a copy")),
        }
    };
    if entry_components(&root).is_none_or(|c| c.len() != 1) {
        return Err(format!("{name:?}: not a file name"));
    }
    let base_fd: OwnedFd = match File::open(&base) {
        Ok(f) if f.metadata().is_ok_and(|m| m.is_dir()) => f.into(),
        Ok(_) => return Err(format!("{}: not a directory", base.display())),
        Err(e) => return Err(format!("{}: {e}", base.display())),
    };
    let mut failed: Option<String> = None;
    let mut current: Option<Incoming> = None;
    let mut dirs: Vec<(Vec<String>, u32)> = Vec::new();
    let mut written = 0u64;
    loop {
        let Some((kind, payload)) = port.recv()? else {
            return Ok(None);
        };
        // After a failure the rest is read and dropped, so the stream stays in step.
        match kind {
            Kind::Entry if failed.is_none() => {
                current = None;
                let r = serde_json::from_slice::<Entry>(&payload)
                    .map_err(|e| format!("bad entry: {e}"))
                    .and_then(|e| start_entry(&base_fd, &root, &e, &mut dirs));
                match r {
                    Ok(inc) => current = inc,
                    Err(e) => failed = Some(e),
                }
            }
            Kind::Data if failed.is_none() => {
                if let Some(inc) = &mut current {
                    inc.hash.update(&payload);
                    written += payload.len() as u64;
                    if let Err(e) = inc.file.write_all(&payload) {
                        failed = Some(format!("{}: write: {e}", inc.shown));
                    }
                }
            }
            Kind::FileEnd if failed.is_none() => {
                if let Some(inc) = current.take() {
                    let got = inc.hash.finalize();
                    if got.as_slice() != payload.as_slice() {
                        failed = Some(format!(
                            "{}: sha256 differs from the sender's (corrupted on the way)",
                            inc.shown
                        ));
                    } else if let Err(e) = fchmod(&inc.file, Mode::from_bits_truncate(inc.mode)) {
                        failed = Some(format!("{}: chmod: {e}", inc.shown));
                    }
                }
            }
            Kind::StdinEof => break,
            _ => {}
        }
    }
    drop(current);
    if let Some(e) = failed {
        return Err(e);
    }
    // Deepest first, so a read-only parent is set after its children.
    for (comps, mode) in dirs.iter().rev() {
        let fd = walk(&base_fd, comps)?;
        fchmod(&fd, Mode::from_bits_truncate(*mode))
            .map_err(|e| format!("{}: chmod: {e}", comps.join("/")))?;
    }
    info!("copy: {written} bytes into {dest}");
    Ok(Some(0))
}

fn start_entry(
    base: &OwnedFd,
    root: &str,
    e: &Entry,
    dirs: &mut Vec<(Vec<String>, u32)>,
) -> Result<Option<Incoming>, String> {
    let rel =
        entry_components(&e.path).ok_or_else(|| format!("{:?}: refused entry path", e.path))?;
    let mut comps: Vec<String> = vec![root.to_string()];
    comps.extend(rel.iter().map(|s| s.to_string()));
    let shown = comps.join("/");
    let (leaf, parents) = comps.split_last().ok_or_else(|| "empty path".to_string())?;
    let parent = walk(base, parents)?;
    let mode = e.mode & 0o7777;
    match &e.kind {
        EntryKind::Dir => {
            if !clear(&parent, leaf, &shown)? {
                mkdirat(&parent, leaf.as_str(), Mode::from_bits_truncate(0o700))
                    .map_err(|err| format!("{shown}: mkdir: {err}"))?;
            }
            if dirs.len() >= MAX_DIRS {
                return Err(format!("more than {MAX_DIRS} directories in one copy"));
            }
            dirs.push((comps.clone(), mode));
            Ok(None)
        }
        EntryKind::Symlink { target } => {
            if clear(&parent, leaf, &shown)? {
                return Err(format!("{shown}: a directory is in the symlink's place"));
            }
            symlinkat(target.as_str(), &parent, leaf.as_str())
                .map_err(|err| format!("{shown}: symlink: {err}"))?;
            Ok(None)
        }
        EntryKind::File { .. } => {
            if clear(&parent, leaf, &shown)? {
                return Err(format!("{shown}: a directory is in the file's place"));
            }
            let fd = openat(
                &parent,
                leaf.as_str(),
                OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_WRONLY
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o600),
            )
            .map_err(|err| format!("{shown}: create: {err}"))?;
            Ok(Some(Incoming {
                file: File::from(fd),
                hash: Sha256::new(),
                mode,
                shown,
            }))
        }
    }
}

/// Sends the file or tree at `src` (see [`kimg_contract::agent::Session::CopyOut`]).
pub fn send(port: &mut Port, src: &str) -> SessionEnd {
    let src_path = Path::new(src);
    let meta = std::fs::symlink_metadata(src_path).map_err(|e| format!("{src}: {e}"))?;
    if !send_entry(port, src_path, String::new(), &meta)? {
        return Ok(None);
    }
    // Pre-order walk with one open directory per level.
    let mut stack: Vec<(std::fs::ReadDir, String)> = Vec::new();
    if meta.is_dir() {
        let rd = std::fs::read_dir(src_path).map_err(|e| format!("{src}: {e}"))?;
        stack.push((rd, String::new()));
    }
    while let Some((rd, rel)) = stack.last_mut() {
        let Some(item) = rd.next() else {
            stack.pop();
            continue;
        };
        let item = item.map_err(|e| format!("{src}/{rel}: {e}"))?;
        let Ok(name) = std::str::from_utf8(item.file_name().as_bytes()).map(str::to_string) else {
            let note = format!("kimg cp: skipped a name that is not UTF-8 in {src}/{rel}\n");
            port.send(Kind::Stderr, note.as_bytes());
            continue;
        };
        let child_rel = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let path = item.path();
        let m = std::fs::symlink_metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if !send_entry(port, &path, child_rel.clone(), &m)? {
            return Ok(None);
        }
        if m.is_dir() {
            if stack.len() >= MAX_DEPTH {
                return Err(format!(
                    "{}: deeper than {MAX_DEPTH} levels",
                    path.display()
                ));
            }
            let rd = std::fs::read_dir(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            stack.push((rd, child_rel));
        }
    }
    Ok(Some(0))
}

/// Sends one entry (and a file's bytes); false if the host went away.
fn send_entry(
    port: &mut Port,
    path: &Path,
    rel: String,
    meta: &std::fs::Metadata,
) -> Result<bool, String> {
    let ft = meta.file_type();
    let mode = meta.mode() & 0o7777;
    let kind = if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_symlink() {
        let t = std::fs::read_link(path).map_err(|e| format!("{}: {e}", path.display()))?;
        EntryKind::Symlink {
            target: t.to_string_lossy().into_owned(),
        }
    } else if ft.is_file() {
        EntryKind::File { size: meta.len() }
    } else {
        let note = format!(
            "kimg cp: skipped {} (not a file, directory or symlink)\n",
            path.display()
        );
        return Ok(port.send(Kind::Stderr, note.as_bytes()));
    };
    let is_file = matches!(kind, EntryKind::File { .. });
    let e = Entry {
        path: rel,
        mode,
        kind,
    };
    let json = serde_json::to_vec(&e).map_err(|err| format!("encode entry: {err}"))?;
    if !port.send(Kind::Entry, &json) {
        return Ok(false);
    }
    if !is_file {
        return Ok(true);
    }
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(|err| format!("{}: {err}", path.display()))?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; MAX_FRAME];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(format!("{}: read: {err}", path.display())),
        };
        hash.update(&buf[..n]);
        if !port.send(Kind::Data, &buf[..n]) {
            return Ok(false);
        }
    }
    Ok(port.send(Kind::FileEnd, hash.finalize().as_slice()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;

    /// Runs `f` on a port whose host end is the returned stream's peer.
    fn port_pair() -> (Port, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (Port::from_file(File::from(OwnedFd::from(a)), "test"), b)
    }

    fn frames(bytes: &[u8]) -> Vec<(Kind, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = 0;
        while let Some((k, r, used)) = kimg_contract::agent::parse_frame(&bytes[at..]).unwrap() {
            out.push((k, bytes[at..][r].to_vec()));
            at += used;
        }
        out
    }

    #[test]
    fn a_tree_goes_out_and_back_in_with_modes_symlinks_and_hashes() {
        let src = tempfile::tempdir().unwrap();
        let t = src.path().join("t");
        std::fs::create_dir_all(t.join("secret")).unwrap();
        std::fs::write(t.join("secret/f"), vec![9u8; 200_000]).unwrap();
        std::fs::write(t.join("x.sh"), "echo\n").unwrap();
        std::fs::set_permissions(t.join("x.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", t.join("link")).unwrap();
        std::fs::set_permissions(t.join("secret"), std::fs::Permissions::from_mode(0o700)).unwrap();

        // Out: collect what the guest sends.
        let (mut port, host) = port_pair();
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            (&host).read_to_end(&mut all).unwrap();
            all
        });
        assert_eq!(send(&mut port, t.to_str().unwrap()), Ok(Some(0)));
        port.flush_all(std::time::Duration::from_secs(5), std::time::Duration::ZERO)
            .unwrap();
        drop(port);
        let sent = reader.join().unwrap();
        let fr = frames(&sent);
        assert!(fr.iter().any(|(k, p)| *k == Kind::Entry
            && String::from_utf8_lossy(p).contains("\"target\":\"/etc/passwd\"")));

        // In: feed the same frames to a receiver into another directory.
        let dst = tempfile::tempdir().unwrap();
        let (mut port, host) = port_pair();
        let writer = std::thread::spawn(move || {
            (&host).write_all(&sent).unwrap();
            (&host)
                .write_all(&kimg_contract::agent::frame(Kind::StdinEof, b""))
                .unwrap();
            host
        });
        let r = receive(&mut port, dst.path().to_str().unwrap(), "t");
        assert_eq!(r, Ok(Some(0)));
        drop(writer.join().unwrap());
        let got = dst.path().join("t");
        assert_eq!(
            std::fs::read(got.join("secret/f")).unwrap(),
            vec![9u8; 200_000]
        );
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&got.join("secret")), 0o700);
        assert_eq!(mode(&got.join("x.sh")), 0o755);
        assert_eq!(
            std::fs::read_link(got.join("link")).unwrap(),
            Path::new("/etc/passwd")
        );
    }

    #[test]
    fn a_bad_hash_or_a_path_through_a_symlink_is_refused() {
        let dst = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dst.path().join("t")).unwrap();
        let entry = |path: &str, kind| {
            let e = Entry {
                path: path.into(),
                mode: 0o644,
                kind,
            };
            kimg_contract::agent::frame(Kind::Entry, &serde_json::to_vec(&e).unwrap())
        };
        // dst/t is a symlink to elsewhere: copying a tree "t" into dst must not
        // write through it.
        let (mut port, host) = port_pair();
        let mut msg = entry("", EntryKind::Dir);
        msg.extend(entry("f", EntryKind::File { size: 1 }));
        msg.extend(kimg_contract::agent::frame(Kind::Data, b"x"));
        msg.extend(kimg_contract::agent::frame(
            Kind::FileEnd,
            &Sha256::digest(b"x"),
        ));
        msg.extend(kimg_contract::agent::frame(Kind::StdinEof, b""));
        (&host).write_all(&msg).unwrap();
        let r = receive(&mut port, dst.path().to_str().unwrap(), "t");
        // The symlink named t is replaced by a directory? No: t exists as a symlink,
        // clear() removes it and a real directory is made in its place.
        assert_eq!(r, Ok(Some(0)));
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
        assert!(!std::fs::symlink_metadata(dst.path().join("t"))
            .unwrap()
            .is_symlink());

        let (mut port, host) = port_pair();
        let mut msg = entry("", EntryKind::File { size: 1 });
        msg.extend(kimg_contract::agent::frame(Kind::Data, b"x"));
        msg.extend(kimg_contract::agent::frame(Kind::FileEnd, &[0u8; 32]));
        msg.extend(kimg_contract::agent::frame(Kind::StdinEof, b""));
        (&host).write_all(&msg).unwrap();
        let r = receive(&mut port, dst.path().join("g").to_str().unwrap(), "ignored");
        assert!(r.unwrap_err().contains("sha256"));

        // A symlink inside the tree is never walked through by a later entry.
        let (mut port, host) = port_pair();
        let mut msg = entry("", EntryKind::Dir);
        msg.extend(entry(
            "l",
            EntryKind::Symlink {
                target: outside.path().to_str().unwrap().into(),
            },
        ));
        msg.extend(entry("l/evil", EntryKind::File { size: 0 }));
        msg.extend(kimg_contract::agent::frame(Kind::StdinEof, b""));
        (&host).write_all(&msg).unwrap();
        let r = receive(&mut port, dst.path().join("u").to_str().unwrap(), "u");
        assert!(r.unwrap_err().contains("symlinks are not followed"));
        assert!(!outside.path().join("evil").exists());
    }
}
