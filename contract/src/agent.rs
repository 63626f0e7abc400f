//! The agent protocol: a control port for requests and answers, and session ports
//! for streams (exec, shells, copies, logs).
//!
//! # Control port
//!
//! Line-delimited JSON over the `kimg.agent` virtio-serial port. The host writes one
//! [`Request`] per line and reads [`Response`] lines until one carries the same `id`;
//! lines with other ids are answers to earlier clients that went away and are
//! skipped. kimg-init answers every request with exactly one line of at most
//! [`MAX_LINE`] bytes.
//!
//! # Session ports: why several ports and not a multiplexer
//!
//! Streams go over [`SESSION_PORTS`] more virtio-serial ports, `kimg.agent.0` ..
//! `kimg.agent.7`, one QEMU unix socket each; a host client takes a free one with a
//! lock file beside the socket and holds it for one session. A QEMU socket chardev
//! serves one client at a time, so concurrency needs either this or a multiplexer on
//! one port. Separate ports were chosen because each session then gets flow control
//! for free from virtio-serial: when the host does not read, the guest's writes to
//! that port block, kimg-init stops reading the command's output, the pipe fills and
//! the command waits. A multiplexer would need per-channel credit windows (as ssh
//! has) so that one slow reader does not stall every other session and status behind
//! it; with ports, a shell nobody reads cannot delay an exec, a copy or `kimg status`
//! (which keeps its own port). The price is a fixed number of sessions per VM
//! (eight at once) and one idle thread per port in kimg-init.
//!
//! A session is a sequence of binary frames (header [`FRAME_MAGIC`], a [`Kind`]
//! byte, a big-endian u32 length, then at most [`MAX_FRAME`] payload bytes), so
//! stdin/stdout/stderr and file bytes go through unchanged. The host opens with
//! [`Kind::Open`] (an [`Open`] as JSON with a fresh nonce); kimg-init answers
//! [`Kind::Ready`] with the nonce, then streams. Bytes an earlier client left in the
//! port are skipped by scanning for that exact Ready frame (host) or for an Open
//! header (guest). A session ends with [`Kind::Exit`] or [`Kind::Error`] from the
//! guest, or when the host disconnects (the guest then kills what it started).
//! kimg-init holds at most a couple of frames per direction per session: it reads the
//! next frame from the port only once the previous one is handed on, and reads a
//! command's output only while its outgoing buffer has room.

use serde::{Deserialize, Serialize};

/// Name of the control port (`/sys/class/virtio-ports/*/name`).
pub const PORT_NAME: &str = "kimg.agent";
/// Longest control line either side accepts, newline included.
pub const MAX_LINE: usize = 1 << 20;
/// How many session ports a VM has (sessions at once).
pub const SESSION_PORTS: usize = 8;
/// Frame header: two magic bytes, the kind, the payload length (u32, big-endian).
pub const FRAME_MAGIC: [u8; 2] = *b"kF";
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 7;
/// Largest frame payload.
pub const MAX_FRAME: usize = 64 * 1024;

/// Name of session port `k` (`kimg.agent.K`).
pub fn session_port_name(k: usize) -> String {
    format!("{PORT_NAME}.{k}")
}

/// The index of a session port from its name, if it is one.
pub fn session_port_index(name: &str) -> Option<usize> {
    let k: usize = name
        .strip_prefix(PORT_NAME)?
        .strip_prefix('.')?
        .parse()
        .ok()?;
    (k < SESSION_PORTS).then_some(k)
}

/// One request from the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Chosen by the client, echoed in the response.
    pub id: u64,
    /// What to do.
    #[serde(flatten)]
    pub op: Op,
}

/// What the host asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Report [`Status`].
    Status,
    /// Sync, unmount and power the VM off. Answered before the power goes.
    Poweroff,
    /// Set the wall clock (after a restore the guest's clock is behind by the time
    /// it was saved). Answered with [`Reply::Ok`] once set.
    SetClock {
        /// Seconds since the Unix epoch.
        secs: i64,
        /// Nanoseconds within the second.
        nanos: u32,
    },
}

/// One answer from kimg-init.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// The request's id.
    pub id: u64,
    /// The answer.
    #[serde(flatten)]
    pub reply: Reply,
}

/// The answer to an [`Op`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// Answer to [`Op::Status`].
    Status(Status),
    /// The request was accepted (poweroff).
    Ok,
    /// The request could not be carried out.
    Error {
        /// What went wrong, for a human.
        message: String,
    },
}

/// Boot state of a VM as kimg-init sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootState {
    /// Still starting.
    Booting,
    /// Every step succeeded.
    Ready,
    /// Up, but a step failed (see `problems`).
    Degraded,
}

/// What `kimg status` shows for a VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The VM's hostname.
    pub hostname: String,
    /// Its role from the role table.
    pub role: crate::Role,
    /// Boot state.
    pub state: BootState,
    /// Seconds since the kernel started.
    pub uptime_secs: f64,
    /// Seconds from kernel start to kimg-init's ready line.
    pub ready_secs: Option<f64>,
    /// `uname -r`.
    pub kernel: String,
    /// kimg-init's version.
    pub init_version: String,
    /// Failed steps, one line each.
    #[serde(default)]
    pub problems: Vec<String>,
    /// The services of this VM, in start order.
    #[serde(default)]
    pub services: Vec<crate::service::ServiceStatus>,
    /// Addresses configured at boot, `ADDR/PREFIX` (IPv4 first), per the net plan.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Overlays from the cdrom, in the order they were unpacked.
    #[serde(default)]
    pub overlays: Vec<crate::cdrom::OverlayReport>,
}

/// Outcome of an exec collected whole by the host (`kimg_cluster::exec`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    /// Exit code; 128 + signal number when killed by a signal, as shells do.
    pub exit_code: i32,
    /// Standard output (invalid UTF-8 replaced).
    pub stdout: String,
    /// Standard error (invalid UTF-8 replaced).
    pub stderr: String,
}

/// What a session frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Host: an [`Open`] as JSON, first frame of a session.
    Open = 1,
    /// Guest: the Open's nonce (8 bytes, big-endian); streams follow.
    Ready = 2,
    /// Host: bytes for the command's stdin (or the terminal).
    Stdin = 3,
    /// Host: no more stdin (a copy into the VM: no more entries).
    StdinEof = 4,
    /// Host: the terminal's size, rows and columns (two big-endian u16).
    Resize = 5,
    /// Guest: bytes the command wrote to stdout (or the terminal).
    Stdout = 6,
    /// Guest: bytes the command wrote to stderr.
    Stderr = 7,
    /// Guest: the command's exit code (i32, big-endian); the session is over.
    Exit = 8,
    /// Guest: the session failed (UTF-8 message); the session is over.
    Error = 9,
    /// Either: a copied file, directory or symlink, an [`Entry`] as JSON.
    Entry = 10,
    /// Either: bytes of the file of the last [`Kind::Entry`].
    Data = 11,
    /// Either: the file is complete; its sha256 (32 bytes) as the sender read it.
    FileEnd = 12,
    /// Guest: what an apply did, an [`ApplyReport`] as JSON; [`Kind::Exit`] follows.
    Report = 13,
}

impl Kind {
    /// The kind of a header byte.
    pub fn from_byte(b: u8) -> Option<Kind> {
        use Kind::*;
        [
            Open, Ready, Stdin, StdinEof, Resize, Stdout, Stderr, Exit, Error, Entry, Data,
            FileEnd, Report,
        ]
        .into_iter()
        .find(|k| *k as u8 == b)
    }
}

/// A frame that cannot be parsed; the stream is out of step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The header does not start with [`FRAME_MAGIC`].
    Magic,
    /// Unknown kind byte.
    Kind(u8),
    /// Payload longer than [`MAX_FRAME`].
    TooLong(usize),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Magic => f.write_str("frame without the magic bytes"),
            FrameError::Kind(k) => write!(f, "unknown frame kind {k}"),
            FrameError::TooLong(n) => write!(f, "frame of {n} bytes (limit {MAX_FRAME})"),
        }
    }
}

impl std::error::Error for FrameError {}

/// The header of a frame of `kind` with `len` payload bytes (`len` <= [`MAX_FRAME`];
/// longer payloads are the sender's bug and are cut by the caller).
pub fn header(kind: Kind, len: usize) -> [u8; HEADER_LEN] {
    let n = u32::try_from(len.min(MAX_FRAME)).unwrap_or(0).to_be_bytes();
    [
        FRAME_MAGIC[0],
        FRAME_MAGIC[1],
        kind as u8,
        n[0],
        n[1],
        n[2],
        n[3],
    ]
}

/// One whole frame, header and payload (payload cut at [`MAX_FRAME`]).
pub fn frame(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let payload = &payload[..payload.len().min(MAX_FRAME)];
    let mut v = Vec::with_capacity(HEADER_LEN + payload.len());
    v.extend_from_slice(&header(kind, payload.len()));
    v.extend_from_slice(payload);
    v
}

/// Parses the frame at the start of `buf`: `Ok(None)` when more bytes are needed,
/// else the kind, the payload's range in `buf` and the bytes the frame takes.
pub fn parse_frame(
    buf: &[u8],
) -> Result<Option<(Kind, std::ops::Range<usize>, usize)>, FrameError> {
    if buf.len() < HEADER_LEN {
        if !FRAME_MAGIC.starts_with(&buf[..buf.len().min(2)]) {
            return Err(FrameError::Magic);
        }
        return Ok(None);
    }
    if buf[..2] != FRAME_MAGIC {
        return Err(FrameError::Magic);
    }
    let kind = Kind::from_byte(buf[2]).ok_or(FrameError::Kind(buf[2]))?;
    let len = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLong(len));
    }
    let end = HEADER_LEN + len;
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some((kind, HEADER_LEN..end, end)))
}

/// How many bytes to drop from `buf`, whose head is no frame ([`parse_frame`] said
/// so), to reach the next place a frame may start: the next [`FRAME_MAGIC`], or a
/// last byte that may begin one. At least 1 for any `buf` that is not empty, so a
/// reader that resyncs always gets on (one that kept a lone last byte which was no
/// magic's start spun on it for ever).
pub fn resync_len(buf: &[u8]) -> usize {
    match find(buf.get(1..).unwrap_or(&[]), &FRAME_MAGIC) {
        Some(i) => i + 1,
        None if buf.len() > 1 && buf.last() == Some(&FRAME_MAGIC[0]) => buf.len() - 1,
        None => buf.len(),
    }
}

/// Where `pattern` starts in `buf`, for resynchronising on a Ready or Open frame.
pub fn find(buf: &[u8], pattern: &[u8]) -> Option<usize> {
    if pattern.is_empty() || buf.len() < pattern.len() {
        return None;
    }
    buf.windows(pattern.len()).position(|w| w == pattern)
}

/// The Ready frame answering an Open with `nonce`: what the host scans for.
pub fn ready_frame(nonce: u64) -> Vec<u8> {
    frame(Kind::Ready, &nonce.to_be_bytes())
}

/// The first frame of a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Open {
    /// Chosen by the host, echoed in [`Kind::Ready`].
    pub nonce: u64,
    /// What to do.
    pub session: Session,
}

/// What a session does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Session {
    /// Run a program, streaming its output (`kimg exec`, `kimg shell`, `kimg logs`).
    Exec(ExecSpec),
    /// Receive entries into the VM (`kimg cp HOST VM:DEST`). `dest` names an existing
    /// directory (the copy lands in it as `name`) or a path to create.
    CopyIn {
        /// Absolute destination path in the VM.
        dest: String,
        /// Base name of the source, used when `dest` is a directory.
        name: String,
    },
    /// Send the file or tree at `src` (`kimg cp VM:SRC HOST`).
    CopyOut {
        /// Absolute source path in the VM (a symlink there is sent as a symlink).
        src: String,
    },
    /// Apply the overlay cdrom the host just put into the VM's drive (`kimg apply`):
    /// mount it, check every overlay, unpack them in name order as at boot, run the
    /// start hooks they brought, apply sysctls, start new services and restart those
    /// whose service file changed, unmount. Answered with [`Kind::Report`] and
    /// [`Kind::Exit`], or [`Kind::Error`] naming the overlay (and file) that failed.
    /// One apply at a time per VM.
    Apply {
        /// The cdrom's content hash (its volume descriptor's), so the guest knows
        /// the medium in the drive is the one meant.
        cdrom_sha256: String,
    },
}

/// What an apply did on one VM.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ApplyReport {
    /// Each overlay, in the order unpacked.
    pub overlays: Vec<crate::cdrom::OverlayReport>,
    /// The start hooks run (the ones these overlays carry), with `: ok` or
    /// why they failed.
    #[serde(default)]
    pub hooks: Vec<String>,
    /// Services started because the overlays added their files.
    #[serde(default)]
    pub started: Vec<String>,
    /// Services restarted because their file changed.
    #[serde(default)]
    pub restarted: Vec<String>,
    /// What failed after the unpacking (hooks, sysctls, service files), one line each.
    #[serde(default)]
    pub problems: Vec<String>,
    /// Seconds from the request to the report.
    pub secs: f64,
}

/// A program to run in a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecSpec {
    /// Program and arguments, looked up in PATH; empty with `login` means a login shell.
    pub argv: Vec<String>,
    /// A terminal for the program (docker's `-t`); stdout and stderr then both come
    /// as [`Kind::Stdout`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<Tty>,
    /// Forward [`Kind::Stdin`] (docker's `-i`); without it stdin is /dev/null.
    #[serde(default)]
    pub stdin: bool,
    /// A login environment: /etc/profile read, HOME=/root as the working directory.
    #[serde(default)]
    pub login: bool,
    /// Kill the program's process group after this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
}

/// The host terminal a PTY imitates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tty {
    /// TERM of the host.
    pub term: String,
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// One file, directory or symlink of a copy. Paths are relative to the copied
/// root, `/`-separated, without `.` or `..`; the root itself is `""`. Entries come
/// in pre-order (a directory before what it holds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Relative path.
    pub path: String,
    /// Permission bits (07777).
    pub mode: u32,
    /// What it is.
    #[serde(flatten)]
    pub kind: EntryKind,
}

/// The kind of an [`Entry`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EntryKind {
    /// A regular file; [`Kind::Data`] frames and a [`Kind::FileEnd`] follow.
    File {
        /// Its size in bytes.
        size: u64,
    },
    /// A directory.
    Dir,
    /// A symlink (never followed on the receiving side).
    Symlink {
        /// Where it points.
        target: String,
    },
}

/// Splits an entry path into its components; `None` if it has an empty, `.` or `..`
/// component or a NUL byte. The root (`""`) has no components.
pub fn entry_components(path: &str) -> Option<Vec<&str>> {
    if path.is_empty() {
        return Some(Vec::new());
    }
    let comps: Vec<&str> = path.split('/').collect();
    let bad = |c: &&str| c.is_empty() || *c == "." || *c == ".." || c.contains('\0');
    (!comps.iter().any(bad)).then_some(comps)
}

/// Serialises a message as one protocol line, newline included.
pub fn to_line<T: Serialize>(msg: &T) -> String {
    // Serialising these plain structs cannot fail (no maps with non-string keys).
    let mut line = serde_json::to_string(msg)
        .unwrap_or_else(|e| format!(r#"{{"id":0,"reply":"error","message":"encode: {e}"}}"#));
    line.push('\n');
    line
}

/// Parses one protocol line (with or without its newline).
pub fn from_line<'a, T: Deserialize<'a>>(line: &'a str) -> Result<T, serde_json::Error> {
    serde_json::from_str(line.trim_end())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let r = Request {
            id: 7,
            op: Op::Status,
        };
        let line = to_line(&r);
        assert_eq!(line, "{\"id\":7,\"op\":\"status\"}\n");
        assert_eq!(from_line::<Request>(&line).unwrap(), r);
        let p: Request = from_line(r#"{"id":1,"op":"poweroff"}"#).unwrap();
        assert_eq!(p.op, Op::Poweroff);
        let c = Request {
            id: 2,
            op: Op::SetClock {
                secs: 1_700_000_000,
                nanos: 5,
            },
        };
        let line = to_line(&c);
        assert_eq!(
            line,
            "{\"id\":2,\"op\":\"set_clock\",\"secs\":1700000000,\"nanos\":5}\n"
        );
        assert_eq!(from_line::<Request>(&line).unwrap(), c);
    }

    #[test]
    fn responses_round_trip() {
        let status = Status {
            hostname: "vm-001".into(),
            role: crate::Role::Node,
            state: BootState::Ready,
            uptime_secs: 2.5,
            ready_secs: Some(2.1),
            kernel: "6.1".into(),
            init_version: "0.1.0".into(),
            problems: vec![],
            services: vec![],
            addresses: vec!["192.168.1.1/24".into()],
            overlays: vec![],
        };
        for reply in [
            Reply::Status(status),
            Reply::Ok,
            Reply::Error {
                message: "no".into(),
            },
        ] {
            let r = Response { id: 9, reply };
            assert_eq!(from_line::<Response>(&to_line(&r)).unwrap(), r);
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in ["", "{", "{\"id\":1}", "{\"id\":1,\"op\":\"reboot\"}", "[]"] {
            assert!(from_line::<Request>(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn frames_round_trip_and_bound_their_length() {
        let f = frame(Kind::Stdout, b"\0\xffbinary");
        assert_eq!(&f[..3], b"kF\x06");
        let (kind, range, used) = parse_frame(&f).unwrap().unwrap();
        assert_eq!(
            (kind, &f[range], used),
            (Kind::Stdout, &b"\0\xffbinary"[..], f.len())
        );
        // Incomplete: more bytes needed, for every prefix.
        for i in 0..f.len() {
            assert_eq!(parse_frame(&f[..i]), Ok(None), "{i}");
        }
        let big = vec![7u8; MAX_FRAME + 10];
        assert_eq!(frame(Kind::Data, &big).len(), HEADER_LEN + MAX_FRAME);
        let mut h = header(Kind::Data, 0).to_vec();
        h[3..7].copy_from_slice(&((MAX_FRAME as u32) + 1).to_be_bytes());
        assert_eq!(parse_frame(&h), Err(FrameError::TooLong(MAX_FRAME + 1)));
        assert_eq!(parse_frame(b"xx"), Err(FrameError::Magic));
        assert_eq!(parse_frame(b"kF\x63\0\0\0\0"), Err(FrameError::Kind(0x63)));
        for b in 0..=255u8 {
            if let Some(k) = Kind::from_byte(b) {
                assert_eq!(k as u8, b);
            }
        }
    }

    #[test]
    fn resync_always_gets_on_and_never_drops_a_frame() {
        // The lone byte that is no magic's start: it must go (it used to stay).
        assert_eq!(resync_len(b"s"), 1);
        assert_eq!(resync_len(b"stale bytes"), 11);
        assert_eq!(resync_len(b"stale k"), 6);
        assert_eq!(resync_len(b"xkF\x06"), 1);
        // Random garbage with frames spliced in (a fixed-seed generator, repeatable):
        // a reader that parses and resyncs until the input is used up gets on at
        // every step and finds every frame that was spliced in, unchanged.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..2000 {
            let mut buf = Vec::new();
            let mut want = Vec::new();
            for _ in 0..(next() % 6) {
                // Garbage rich in magic bytes (and a lone last "k" at times), then
                // perhaps a whole frame.
                for _ in 0..(next() % 12) {
                    buf.push(
                        *[b'k', b'F', b'x', 0, 0xff]
                            .get((next() % 5) as usize)
                            .unwrap(),
                    );
                }
                if next() % 2 == 0 {
                    let payload: Vec<u8> = (0..next() % 9).map(|_| next() as u8).collect();
                    buf.extend_from_slice(&frame(Kind::Stdout, &payload));
                    want.push(payload);
                }
            }
            let mut got = Vec::new();
            let mut rest = &buf[..];
            while !rest.is_empty() {
                match parse_frame(rest) {
                    Ok(Some((k, r, used))) => {
                        if k == Kind::Stdout {
                            got.push(rest[r].to_vec());
                        }
                        rest = &rest[used..];
                    }
                    Ok(None) => break,
                    Err(_) => {
                        let n = resync_len(rest);
                        assert!((1..=rest.len()).contains(&n), "{rest:?}");
                        rest = &rest[n..];
                    }
                }
            }
            // The garbage holds no kind byte, so none of it parses as a frame: what
            // was read is exactly the spliced frames, in order.
            assert_eq!(got, want, "{buf:?}");
        }
    }

    #[test]
    fn the_ready_frame_is_found_after_stale_bytes() {
        let mut stream = b"stale kF\x06\0\0".to_vec();
        stream.extend_from_slice(&ready_frame(1));
        let ours = ready_frame(42);
        stream.extend_from_slice(&ours);
        stream.extend_from_slice(&frame(Kind::Stdout, b"hi"));
        let at = find(&stream, &ours).unwrap();
        let (k, r, _) = parse_frame(&stream[at + ours.len()..]).unwrap().unwrap();
        assert_eq!(
            (k, &stream[at + ours.len()..][r]),
            (Kind::Stdout, &b"hi"[..])
        );
        assert_eq!(find(b"ab", &ours), None);
    }

    #[test]
    fn sessions_and_entries_have_a_stable_wire_form() {
        let open = Open {
            nonce: 5,
            session: Session::Exec(ExecSpec {
                argv: vec!["true".into()],
                tty: None,
                stdin: true,
                login: false,
                timeout_secs: None,
            }),
        };
        let json = serde_json::to_string(&open).unwrap();
        assert_eq!(
            json,
            r#"{"nonce":5,"session":{"op":"exec","argv":["true"],"stdin":true,"login":false}}"#
        );
        assert_eq!(serde_json::from_str::<Open>(&json).unwrap(), open);
        let apply = Session::Apply {
            cdrom_sha256: "ab".into(),
        };
        let json = serde_json::to_string(&apply).unwrap();
        assert_eq!(json, r#"{"op":"apply","cdrom_sha256":"ab"}"#);
        assert_eq!(serde_json::from_str::<Session>(&json).unwrap(), apply);
        let report: ApplyReport = serde_json::from_str(r#"{"overlays":[],"secs":0.5}"#).unwrap();
        assert_eq!(report.secs, 0.5);
        assert!(report.started.is_empty() && report.problems.is_empty());
        assert_eq!(Kind::from_byte(13), Some(Kind::Report));
        let e = Entry {
            path: "a/b".into(),
            mode: 0o700,
            kind: EntryKind::Symlink {
                target: "../x".into(),
            },
        };
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(
            json,
            r#"{"path":"a/b","mode":448,"type":"symlink","target":"../x"}"#
        );
        assert_eq!(serde_json::from_str::<Entry>(&json).unwrap(), e);
    }

    #[test]
    fn entry_paths_never_climb() {
        assert_eq!(entry_components(""), Some(vec![]));
        assert_eq!(entry_components("a/b"), Some(vec!["a", "b"]));
        for bad in ["..", "a/../b", "/a", "a//b", "a/", "./a", "a\0b"] {
            assert_eq!(entry_components(bad), None, "{bad:?}");
        }
        assert_eq!(session_port_index("kimg.agent.3"), Some(3));
        assert_eq!(session_port_index(&session_port_name(7)), Some(7));
        assert_eq!(session_port_index("kimg.agent.8"), None);
        assert_eq!(session_port_index("kimg.agent"), None);
    }
}
