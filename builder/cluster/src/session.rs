//! Host side of the agent's session ports (see `kimg_contract::agent`): take a free
//! port with its lock file, open a session, stream frames; and on top of that
//! `kimg exec`'s streaming exec and `kimg cp`'s copies in both directions.

use crate::error::ClusterError;
use crate::process::qemu_pid;
use crate::qemu::VmPaths;
use crate::state::load;
use kimg_contract::agent::{
    self, entry_components, find, parse_frame, Entry, EntryKind, ExecResult, ExecSpec, Kind, Open,
    Session as Op, HEADER_LEN, MAX_FRAME, SESSION_PORTS,
};
use kimg_contract::VmId;
use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long opening a session may take (the guest polls idle ports; TCG is slow).
pub const OPEN_WAIT: Duration = Duration::from_secs(30);

/// Errors of a session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Every session port is taken.
    #[error("all {SESSION_PORTS} session ports stayed in use (close a shell, or run fewer sessions at once)")]
    Busy,
    /// The port's lock file could not be made.
    #[error("lock {path}: {source}")]
    Lock {
        /// Lock path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The socket could not be opened.
    #[error("connect to {path}: {source} (a VM started by an older kimg has no session ports)")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The guest did not answer the Open in time.
    #[error("no answer from kimg-init on {path} within {wait:?}")]
    Timeout {
        /// Socket path.
        path: PathBuf,
        /// Time allowed.
        wait: Duration,
    },
    /// The connection broke.
    #[error("session: {0}")]
    Io(#[from] io::Error),
    /// The guest sent something out of protocol.
    #[error("session protocol: {0}")]
    Protocol(String),
    /// The guest ended the session with an error.
    #[error("{0}")]
    Remote(String),
    /// The guest closed the connection before the end of the session.
    #[error("the VM closed the session before it ended")]
    Closed,
    /// Copying on the host side failed.
    #[error("{path}: {why}")]
    Local {
        /// Host path.
        path: PathBuf,
        /// What failed.
        why: String,
    },
}

/// An open session on one of a VM's session ports.
pub struct Session {
    stream: UnixStream,
    inbuf: Vec<u8>,
    _lock: Flock<File>,
}

fn nonce() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ (u64::from(std::process::id()) << 40)
}

impl Session {
    /// Takes a free session port of the VM at `paths` and opens `op` on it.
    /// When every port is taken it waits for one, up to `wait`: like docker exec,
    /// a script may start more sessions at once than a VM has ports.
    pub fn open(paths: &VmPaths, op: Op, wait: Duration) -> Result<Session, SessionError> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(s) = Self::try_open(paths, &op, wait)? {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                return Err(SessionError::Busy);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Takes the first free port and opens `op` on it; `None` when all are taken.
    fn try_open(paths: &VmPaths, op: &Op, wait: Duration) -> Result<Option<Session>, SessionError> {
        for k in 0..SESSION_PORTS {
            let lock_path = paths.session_lock(k);
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&lock_path)
                .map_err(|source| SessionError::Lock {
                    path: lock_path.clone(),
                    source,
                })?;
            let Ok(lock) = Flock::lock(f, FlockArg::LockExclusiveNonblock) else {
                continue;
            };
            let sock = paths.session_socket(k);
            let stream = UnixStream::connect(&sock).map_err(|source| SessionError::Connect {
                path: sock.clone(),
                source,
            })?;
            let mut s = Session {
                stream,
                inbuf: Vec::new(),
                _lock: lock,
            };
            s.start(op.clone(), &sock, wait)?;
            return Ok(Some(s));
        }
        Ok(None)
    }

    /// Sends the Open and skips what an earlier client left until our Ready.
    fn start(&mut self, op: Op, sock: &Path, wait: Duration) -> Result<(), SessionError> {
        let nonce = nonce();
        let open = serde_json::to_vec(&Open { nonce, session: op })
            .map_err(|e| SessionError::Protocol(e.to_string()))?;
        if open.len() > MAX_FRAME {
            return Err(SessionError::Protocol(
                "the command line is too long".into(),
            ));
        }
        self.send(Kind::Open, &open)?;
        let ready = agent::ready_frame(nonce);
        let deadline = Instant::now() + wait;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if let Some(at) = find(&self.inbuf, &ready) {
                self.inbuf.drain(..at + ready.len());
                self.stream.set_read_timeout(None)?;
                return Ok(());
            }
            // Keep only a tail that could start the Ready frame: bounded memory.
            let keep = ready.len() - 1;
            if self.inbuf.len() > keep {
                self.inbuf.drain(..self.inbuf.len() - keep);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(SessionError::Timeout {
                    path: sock.to_path_buf(),
                    wait,
                });
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut buf) {
                Ok(0) => return Err(SessionError::Closed),
                Ok(n) => self.inbuf.extend_from_slice(&buf[..n]),
                Err(e) if is_timeout(&e) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Sends one frame (payloads longer than a frame are split).
    pub fn send(&self, kind: Kind, payload: &[u8]) -> io::Result<()> {
        send_on(&self.stream, kind, payload)
    }

    /// A second handle for writing from another thread (stdin, resizes).
    pub fn writer(&self) -> io::Result<UnixStream> {
        self.stream.try_clone()
    }

    /// The next frame (blocking).
    pub fn recv(&mut self) -> Result<(Kind, Vec<u8>), SessionError> {
        let mut buf = [0u8; 64 * 1024];
        loop {
            match parse_frame(&self.inbuf) {
                Ok(Some((kind, range, used))) => {
                    let payload = self.inbuf[range].to_vec();
                    self.inbuf.drain(..used);
                    return Ok((kind, payload));
                }
                Ok(None) => {}
                Err(e) => return Err(SessionError::Protocol(e.to_string())),
            }
            // At most one frame plus one read is ever buffered.
            debug_assert!(self.inbuf.len() < HEADER_LEN + MAX_FRAME);
            match self.stream.read(&mut buf) {
                Ok(0) => return Err(SessionError::Closed),
                Ok(n) => self.inbuf.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Writes one frame (split at [`MAX_FRAME`]) on any stream.
pub fn send_on(mut w: impl Write, kind: Kind, payload: &[u8]) -> io::Result<()> {
    if payload.is_empty() {
        return w.write_all(&agent::frame(kind, payload));
    }
    for chunk in payload.chunks(MAX_FRAME) {
        w.write_all(&agent::header(kind, chunk.len()))?;
        w.write_all(chunk)?;
    }
    Ok(())
}

/// The paths of a running VM of cluster `name`.
pub fn running_vm(name: &str, vm: VmId) -> Result<VmPaths, ClusterError> {
    let (dir, state) = load(name)?;
    if !state.vms.iter().any(|r| r.vm == vm) {
        return Err(ClusterError::NoSuchVm {
            name: name.to_string(),
            vm,
        });
    }
    let paths = VmPaths::new(&dir, vm);
    if qemu_pid(&paths).is_none() {
        return Err(ClusterError::Dead(vm));
    }
    Ok(paths)
}

/// Opens a session on a running VM of cluster `name`.
pub fn open(name: &str, vm: VmId, op: Op) -> Result<Session, ClusterError> {
    let paths = running_vm(name, vm)?;
    Session::open(&paths, op, OPEN_WAIT).map_err(|source| ClusterError::Session { vm, source })
}

/// Runs `spec` in the VM, writing its output to `out` and `err` as it comes and
/// feeding it `stdin` (then EOF) if given; returns its exit code.
pub fn exec_stream(
    name: &str,
    vm: VmId,
    spec: ExecSpec,
    stdin: Option<Box<dyn Read + Send>>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<i32, ClusterError> {
    let mut s = open(name, vm, Op::Exec(spec))?;
    let fail = |source| ClusterError::Session { vm, source };
    if let Some(mut input) = stdin {
        let w = s.writer().map_err(|e| fail(e.into()))?;
        // Ends with the process: a blocked read of the host's stdin holds nothing.
        std::thread::spawn(move || {
            let mut buf = vec![0u8; MAX_FRAME];
            loop {
                match input.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if send_on(&w, Kind::Stdin, &buf[..n]).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = send_on(&w, Kind::StdinEof, b"");
        });
    }
    loop {
        let (kind, p) = s.recv().map_err(fail)?;
        match kind {
            Kind::Stdout => out
                .write_all(&p)
                .and_then(|()| out.flush())
                .map_err(|e| fail(e.into()))?,
            Kind::Stderr => err
                .write_all(&p)
                .and_then(|()| err.flush())
                .map_err(|e| fail(e.into()))?,
            Kind::Exit => return exit_code(&p).map_err(fail),
            Kind::Error => {
                return Err(fail(SessionError::Remote(
                    String::from_utf8_lossy(&p).into_owned(),
                )))
            }
            _ => {}
        }
    }
}

/// The code of an Exit frame.
pub fn exit_code(p: &[u8]) -> Result<i32, SessionError> {
    <[u8; 4]>::try_from(p)
        .map(i32::from_be_bytes)
        .map_err(|_| SessionError::Protocol(format!("exit frame of {} bytes", p.len())))
}

/// Runs `argv` in a VM and collects its output whole (for callers that want a
/// value; `kimg exec` streams with [`exec_stream`]).
pub fn exec(
    name: &str,
    vm: VmId,
    argv: Vec<String>,
    timeout: Option<Duration>,
) -> Result<ExecResult, ClusterError> {
    let spec = ExecSpec {
        argv,
        tty: None,
        stdin: false,
        login: false,
        timeout_secs: timeout.map(|t| t.as_secs().max(1)),
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = exec_stream(name, vm, spec, None, &mut out, &mut err)?;
    Ok(ExecResult {
        exit_code: code,
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr: String::from_utf8_lossy(&err).into_owned(),
    })
}

/// What a copy moved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyReport {
    /// Files copied (each verified by sha256 on the receiving side).
    pub files: u64,
    /// Directories and symlinks.
    pub others: u64,
    /// File bytes.
    pub bytes: u64,
}

/// Copies the host file or tree `src` to `dest` in the VM (docker cp rules: into
/// `dest` if it is a directory, else as `dest`).
pub fn copy_in(name: &str, vm: VmId, src: &Path, dest: &str) -> Result<CopyReport, ClusterError> {
    let base = src
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| ".".into());
    let fail = |source| ClusterError::Session { vm, source };
    let meta = std::fs::symlink_metadata(src).map_err(|e| fail(local(src, e)))?;
    let op = Op::CopyIn {
        dest: dest.to_string(),
        name: base,
    };
    let mut s = open(name, vm, op)?;
    let mut report = CopyReport::default();
    let w = s.writer().map_err(|e| fail(e.into()))?;
    let mut w = io::BufWriter::with_capacity(256 * 1024, w);
    send_tree(&mut w, src, &meta, &mut report).map_err(fail)?;
    send_on(&mut w, Kind::StdinEof, b"").map_err(|e| fail(e.into()))?;
    w.flush().map_err(|e| fail(e.into()))?;
    loop {
        let (kind, p) = s.recv().map_err(fail)?;
        match kind {
            Kind::Stderr => eprint!("{}", String::from_utf8_lossy(&p)),
            Kind::Exit => return Ok(report),
            Kind::Error => {
                return Err(fail(SessionError::Remote(
                    String::from_utf8_lossy(&p).into_owned(),
                )))
            }
            _ => {}
        }
    }
}

fn local(path: &Path, e: impl std::fmt::Display) -> SessionError {
    SessionError::Local {
        path: path.to_path_buf(),
        why: e.to_string(),
    }
}

/// Sends `src` and what it holds as entries, pre-order.
fn send_tree(
    w: &mut impl Write,
    src: &Path,
    meta: &std::fs::Metadata,
    report: &mut CopyReport,
) -> Result<(), SessionError> {
    send_entry(w, src, String::new(), meta, report)?;
    if !meta.is_dir() {
        return Ok(());
    }
    let mut stack = vec![(
        std::fs::read_dir(src).map_err(|e| local(src, e))?,
        String::new(),
    )];
    while let Some((rd, rel)) = stack.last_mut() {
        let Some(item) = rd.next() else {
            stack.pop();
            continue;
        };
        let item = item.map_err(|e| local(src, e))?;
        let path = item.path();
        let name = item
            .file_name()
            .into_string()
            .map_err(|_| local(&path, "name is not UTF-8"))?;
        let child = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let m = std::fs::symlink_metadata(&path).map_err(|e| local(&path, e))?;
        send_entry(w, &path, child.clone(), &m, report)?;
        if m.is_dir() {
            stack.push((
                std::fs::read_dir(&path).map_err(|e| local(&path, e))?,
                child,
            ));
        }
    }
    Ok(())
}

fn send_entry(
    w: &mut impl Write,
    path: &Path,
    rel: String,
    meta: &std::fs::Metadata,
    report: &mut CopyReport,
) -> Result<(), SessionError> {
    let ft = meta.file_type();
    let kind = if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_symlink() {
        let t = std::fs::read_link(path).map_err(|e| local(path, e))?;
        EntryKind::Symlink {
            target: t.to_string_lossy().into_owned(),
        }
    } else if ft.is_file() {
        EntryKind::File { size: meta.len() }
    } else {
        eprintln!(
            "kimg cp: skipped {} (not a file, directory or symlink)",
            path.display()
        );
        return Ok(());
    };
    let is_file = matches!(kind, EntryKind::File { .. });
    let e = Entry {
        path: rel,
        mode: meta.mode() & 0o7777,
        kind,
    };
    let json = serde_json::to_vec(&e).map_err(|err| SessionError::Protocol(err.to_string()))?;
    send_on(&mut *w, Kind::Entry, &json)?;
    if !is_file {
        report.others += 1;
        return Ok(());
    }
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| local(path, e))?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; MAX_FRAME];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(local(path, e)),
        };
        hash.update(&buf[..n]);
        report.bytes += n as u64;
        send_on(&mut *w, Kind::Data, &buf[..n])?;
    }
    report.files += 1;
    send_on(&mut *w, Kind::FileEnd, hash.finalize().as_slice())?;
    Ok(())
}

/// Copies the VM's file or tree `src` to the host's `dest` (docker cp rules).
/// Nothing is written through a symlink below `dest`; each file's sha256 is checked.
pub fn copy_out(name: &str, vm: VmId, src: &str, dest: &Path) -> Result<CopyReport, ClusterError> {
    let fail = |source| ClusterError::Session { vm, source };
    let base = Path::new(src)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| fail(local(Path::new(src), "names no file or directory")))?;
    let root = if dest.is_dir() {
        dest.join(base)
    } else {
        dest.to_path_buf()
    };
    let mut s = open(name, vm, Op::CopyOut { src: src.into() })?;
    let mut report = CopyReport::default();
    receive(&mut s, &root, &mut report).map_err(fail)?;
    Ok(report)
}

/// The file being received on the host.
struct Incoming {
    file: File,
    hash: Sha256,
    mode: u32,
    path: PathBuf,
}

fn receive(s: &mut Session, root: &Path, report: &mut CopyReport) -> Result<(), SessionError> {
    let mut current: Option<Incoming> = None;
    let mut dirs: Vec<(PathBuf, u32)> = Vec::new();
    loop {
        let (kind, p) = s.recv()?;
        match kind {
            Kind::Entry => {
                let e: Entry = serde_json::from_slice(&p)
                    .map_err(|err| SessionError::Protocol(format!("entry: {err}")))?;
                current = start_entry(root, &e, &mut dirs, report)?;
            }
            Kind::Data => {
                if let Some(inc) = &mut current {
                    inc.hash.update(&p);
                    report.bytes += p.len() as u64;
                    inc.file.write_all(&p).map_err(|e| local(&inc.path, e))?;
                }
            }
            Kind::FileEnd => {
                if let Some(inc) = current.take() {
                    if inc.hash.finalize().as_slice() != p.as_slice() {
                        return Err(local(&inc.path, "sha256 differs from the VM's"));
                    }
                    inc.file
                        .set_permissions(std::fs::Permissions::from_mode(inc.mode))
                        .map_err(|e| local(&inc.path, e))?;
                    report.files += 1;
                }
            }
            Kind::Stderr => eprint!("{}", String::from_utf8_lossy(&p)),
            Kind::Exit => break,
            Kind::Error => return Err(SessionError::Remote(String::from_utf8_lossy(&p).into())),
            _ => {}
        }
    }
    for (dir, mode) in dirs.iter().rev() {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_DIRECTORY)
            .open(dir)
            .map_err(|e| local(dir, e))?;
        f.set_permissions(std::fs::Permissions::from_mode(*mode))
            .map_err(|e| local(dir, e))?;
    }
    Ok(())
}

/// Creates one received entry below `root`, refusing to go through a symlink.
fn start_entry(
    root: &Path,
    e: &Entry,
    dirs: &mut Vec<(PathBuf, u32)>,
    report: &mut CopyReport,
) -> Result<Option<Incoming>, SessionError> {
    let comps = entry_components(&e.path)
        .ok_or_else(|| SessionError::Protocol(format!("refused entry path {:?}", e.path)))?;
    let mut path = root.to_path_buf();
    for c in &comps {
        // Every directory on the way was made by this copy or was there: none may be
        // a symlink (the VM could plant one to write outside `root`).
        let m = std::fs::symlink_metadata(&path).map_err(|err| local(&path, err))?;
        if !m.is_dir() {
            return Err(local(&path, "not a directory (symlinks are not followed)"));
        }
        path.push(c);
    }
    let existing = std::fs::symlink_metadata(&path).ok();
    let is_dir = existing.as_ref().is_some_and(|m| m.is_dir());
    let mode = e.mode & 0o7777;
    let remove = |path: &Path| -> Result<(), SessionError> {
        if existing.is_some() && !is_dir {
            std::fs::remove_file(path).map_err(|err| local(path, err))?;
        }
        Ok(())
    };
    match &e.kind {
        EntryKind::Dir => {
            remove(&path)?;
            if !is_dir {
                std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&path)
                    .map_err(|err| local(&path, err))?;
            }
            dirs.push((path, mode));
            report.others += 1;
            Ok(None)
        }
        EntryKind::Symlink { target } => {
            if is_dir {
                return Err(local(&path, "a directory is in the symlink's place"));
            }
            remove(&path)?;
            std::os::unix::fs::symlink(target, &path).map_err(|err| local(&path, err))?;
            report.others += 1;
            Ok(None)
        }
        EntryKind::File { .. } => {
            if is_dir {
                return Err(local(&path, "a directory is in the file's place"));
            }
            remove(&path)?;
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&path)
                .map_err(|err| local(&path, err))?;
            Ok(Some(Incoming {
                file,
                hash: Sha256::new(),
                mode,
                path,
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_split_at_the_limit() {
        let mut out = Vec::new();
        send_on(&mut out, Kind::Data, &vec![1u8; MAX_FRAME + 5]).unwrap();
        let (k, r, used) = parse_frame(&out).unwrap().unwrap();
        assert_eq!((k, r.len()), (Kind::Data, MAX_FRAME));
        let (_, r2, _) = parse_frame(&out[used..]).unwrap().unwrap();
        assert_eq!(r2.len(), 5);
        assert_eq!(exit_code(&3i32.to_be_bytes()).unwrap(), 3);
        assert!(exit_code(b"x").is_err());
    }

    #[test]
    fn received_entries_never_go_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = dir.path().join("t");
        let mut dirs = Vec::new();
        let mut rep = CopyReport::default();
        let e = |path: &str, kind| Entry {
            path: path.into(),
            mode: 0o755,
            kind,
        };
        start_entry(&root, &e("", EntryKind::Dir), &mut dirs, &mut rep).unwrap();
        let target = outside.path().to_string_lossy().into_owned();
        start_entry(
            &root,
            &e("l", EntryKind::Symlink { target }),
            &mut dirs,
            &mut rep,
        )
        .unwrap();
        let r = start_entry(
            &root,
            &e("l/x", EntryKind::File { size: 0 }),
            &mut dirs,
            &mut rep,
        );
        assert!(matches!(r, Err(e) if e.to_string().contains("symlinks")));
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
        let bad = start_entry(&root, &e("../x", EntryKind::Dir), &mut dirs, &mut rep);
        assert!(bad.is_err());
    }
}
