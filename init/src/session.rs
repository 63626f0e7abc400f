//! The session ports (`kimg.agent.0` ..): one thread per port serves one session at
//! a time (exec, shell, copy in, copy out, apply) in the framed protocol of
//! [`kimg_contract::agent`]. The thread lives as long as PID 1; a session starts no
//! other thread. What a session holds is bounded: one incoming frame, a couple of
//! outgoing ones.

use crate::exec::{self, Child, Ended, Sink};
use kimg_contract::agent::{self, parse_frame, Kind, Open, Session, HEADER_LEN, MAX_FRAME};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

/// Pause while no host client is connected (the port reads EOF and polls HUP then,
/// so there is nothing to block on), on a port whose events cannot wake us
/// ([`crate::hostwait`] failed, or a test's socket).
const IDLE: Duration = Duration::from_millis(20);
/// Outgoing bytes held before the program's output is no longer read.
const OUT_ROOM: usize = 2 * (HEADER_LEN + MAX_FRAME);
/// How long the last frames of a session may wait for a host that does not read.
const FLUSH_WAIT: Duration = Duration::from_secs(30);
/// How long "no host" on a port is not believed right after a client's bytes came.
const HUP_GRACE: Duration = Duration::from_secs(5);

/// One session port: its descriptor, unparsed input, unsent output.
pub struct Port {
    file: File,
    name: String,
    /// Whether the port's events wake this thread ([`crate::hostwait::arm`]).
    armed: bool,
    inbuf: Vec<u8>,
    out: Vec<u8>,
}

/// What reading the port gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Fill {
    /// Bytes were added.
    Some,
    /// Nothing now.
    Nothing,
    /// No host is connected (or the port failed).
    Gone,
}

impl Port {
    /// Opens the port node (non-blocking).
    pub fn open(node: &std::path::Path, name: &str) -> std::io::Result<Port> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_NOCTTY | nix::libc::O_NONBLOCK)
            .open(node)?;
        Ok(Port::from_file(file, name))
    }

    /// A port over any non-blocking descriptor (tests use a socketpair).
    pub fn from_file(file: File, name: &str) -> Port {
        Port {
            file,
            name: name.to_string(),
            armed: false,
            inbuf: Vec::with_capacity(HEADER_LEN + MAX_FRAME),
            out: Vec::with_capacity(OUT_ROOM),
        }
    }

    /// Reads what fits into the input buffer (one frame's worth at most).
    pub fn fill(&mut self) -> Fill {
        let have = self.inbuf.len();
        let room = (HEADER_LEN + MAX_FRAME).saturating_sub(have);
        if room == 0 {
            return Fill::Nothing;
        }
        self.inbuf.resize(have + room, 0);
        let r = loop {
            match nix::unistd::read(self.file.as_fd(), &mut self.inbuf[have..]) {
                Err(Errno::EINTR) => continue,
                other => break other,
            }
        };
        let got = match r {
            Ok(0) => {
                self.inbuf.truncate(have);
                return Fill::Gone;
            }
            Ok(n) => n,
            Err(Errno::EAGAIN) => 0,
            Err(e) => {
                self.inbuf.truncate(have);
                warn!("session {}: read: {e}", self.name);
                return Fill::Gone;
            }
        };
        self.inbuf.truncate(have + got);
        if got == 0 {
            Fill::Nothing
        } else {
            Fill::Some
        }
    }

    /// Has the port's events (host connected, bytes in) wake this thread while it
    /// waits for a host; without it the port is looked at every [`IDLE`].
    pub fn arm(&mut self) {
        match crate::hostwait::arm(self.file.as_fd()) {
            Ok(()) => self.armed = true,
            Err(e) => warn!("session {}: port events: {e}; polling", self.name),
        }
    }

    /// Waits for the host (no client now): until the port's event, or [`IDLE`].
    fn idle(&self) {
        crate::hostwait::idle(self.armed, IDLE);
    }

    /// Kind of the next whole frame, without taking it.
    pub fn peek_kind(&self) -> Option<Kind> {
        match parse_frame(&self.inbuf) {
            Ok(Some((k, _, _))) => Some(k),
            _ => None,
        }
    }

    /// Takes the next whole frame; `Err` if the input is out of step.
    pub fn next_frame(&mut self) -> Result<Option<(Kind, Vec<u8>)>, agent::FrameError> {
        let Some((kind, range, used)) = parse_frame(&self.inbuf)? else {
            return Ok(None);
        };
        let payload = self.inbuf[range].to_vec();
        self.inbuf.drain(..used);
        Ok(Some((kind, payload)))
    }

    /// Drops input up to the next possible frame start (after garbage).
    fn resync(&mut self) {
        let n = agent::resync_len(&self.inbuf);
        self.inbuf.drain(..n);
    }

    /// Whether another frame may be queued without passing the bound.
    pub fn has_room(&self) -> bool {
        self.out.len() + HEADER_LEN + MAX_FRAME <= OUT_ROOM
    }

    /// Queues a frame (payloads longer than a frame are split).
    pub fn queue(&mut self, kind: Kind, payload: &[u8]) {
        if payload.is_empty() {
            self.out.extend_from_slice(&agent::frame(kind, payload));
        }
        for chunk in payload.chunks(MAX_FRAME) {
            self.out.extend_from_slice(&agent::frame(kind, chunk));
        }
    }

    /// Writes what the port takes now; `Err` if the host is gone.
    pub fn flush_some(&mut self) -> Result<(), String> {
        while !self.out.is_empty() {
            match nix::unistd::write(self.file.as_fd(), &self.out) {
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => return Ok(()),
                Err(e) => return Err(format!("write: {e}")),
            }
        }
        Ok(())
    }

    /// Writes everything queued, waiting for the host up to `wait`. A port that
    /// says the host is gone (POLLHUP) is believed only after `hup_grace`: the
    /// kernel learns of a new connection through a control message handled in a
    /// work queue, which can come after the client's first bytes under load.
    pub fn flush_all(&mut self, wait: Duration, hup_grace: Duration) -> Result<(), String> {
        let start = Instant::now();
        loop {
            self.flush_some()?;
            if self.out.is_empty() {
                return Ok(());
            }
            let left = wait.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(format!("host did not read for {wait:?}"));
            }
            let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLOUT)];
            let t = PollTimeout::try_from(left.min(Duration::from_secs(1)))
                .unwrap_or(PollTimeout::ZERO);
            let _ = poll(&mut fds, t);
            let rev = fds[0].revents().unwrap_or(PollFlags::empty());
            if rev.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
                if start.elapsed() >= hup_grace {
                    return Err("host went away".into());
                }
                std::thread::sleep(IDLE);
            }
        }
    }

    /// Blocks until the port may have input (or a second passes).
    fn wait_input(&self) -> bool {
        let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::from(1000u16));
        let rev = fds[0].revents().unwrap_or(PollFlags::empty());
        !rev.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)
    }

    /// Blocks until an Open frame is at the head of the input; stale frames and
    /// garbage before it are dropped.
    pub fn wait_open(&mut self) -> Vec<u8> {
        // Since when the port has said "no host" with no byte in between.
        let mut gone_since: Option<Instant> = None;
        loop {
            match parse_frame(&self.inbuf) {
                Ok(Some((Kind::Open, range, used))) => {
                    let p = self.inbuf[range].to_vec();
                    self.inbuf.drain(..used);
                    return p;
                }
                Ok(Some((_, _, used))) => {
                    self.inbuf.drain(..used);
                    continue;
                }
                Ok(None) => {}
                Err(_) => {
                    self.resync();
                    continue;
                }
            }
            match self.fill() {
                Fill::Some => gone_since = None,
                Fill::Nothing => {
                    if !self.wait_input() {
                        self.idle();
                    }
                }
                Fill::Gone => {
                    // A partial frame of a client that left is dropped, once the port
                    // has been without a host for a while: a new client's first bytes
                    // can come before the kernel knows it is connected.
                    let since = *gone_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= HUP_GRACE {
                        self.inbuf.clear();
                    }
                    self.idle();
                }
            }
        }
    }

    /// The next frame, waiting for it; `Ok(None)` when the host went away (or a new
    /// client sent its Open, which stays for the next session).
    pub fn recv(&mut self) -> Result<Option<(Kind, Vec<u8>)>, String> {
        loop {
            if self.peek_kind() == Some(Kind::Open) {
                return Ok(None);
            }
            if let Some(f) = self.next_frame().map_err(|e| format!("protocol: {e}"))? {
                return Ok(Some(f));
            }
            match self.fill() {
                Fill::Some => {}
                Fill::Nothing => {
                    if !self.wait_input() {
                        return Ok(None);
                    }
                }
                Fill::Gone => return Ok(None),
            }
        }
    }

    /// Queues a frame once there is room, writing to the host meanwhile; false when
    /// the host went away.
    pub fn send(&mut self, kind: Kind, payload: &[u8]) -> bool {
        while !self.has_room() {
            if self.flush_some().is_err() {
                return false;
            }
            if self.has_room() {
                break;
            }
            let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLOUT)];
            let _ = poll(&mut fds, PollTimeout::from(1000u16));
            let rev = fds[0].revents().unwrap_or(PollFlags::empty());
            if rev.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
                return false;
            }
        }
        self.queue(kind, payload);
        true
    }

    /// The descriptor, for poll.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Starts one server thread per session port present (after the control port is
/// up, so they are all there); logs how many.
pub fn start() {
    let mut found = 0;
    for k in 0..agent::SESSION_PORTS {
        let name = agent::session_port_name(k);
        let Some(node) = crate::agent::find_named_port(&name) else {
            continue;
        };
        let thread_name = name.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("session-{k}"))
            .spawn(move || serve(&node, &thread_name));
        match spawned {
            Ok(_) => found += 1,
            Err(e) => error!("session: cannot start the thread of {name}: {e}"),
        }
    }
    if found == 0 {
        warn!("session: no session ports (kimg.agent.N); exec, shell and cp need them");
    } else {
        info!("session: serving {found} session ports");
    }
}

fn serve(node: &std::path::Path, name: &str) {
    let mut port = loop {
        match Port::open(node, name) {
            Ok(p) => break p,
            Err(e) => {
                error!("session: open {}: {e}; retrying", node.display());
                std::thread::sleep(Duration::from_secs(5));
            }
        }
    };
    port.arm();
    loop {
        let open = port.wait_open();
        run_session(&mut port, &open);
        port.out.clear();
    }
}

/// Serves one session whose Open payload is `open`.
pub fn run_session(port: &mut Port, open: &[u8]) {
    let open: Open = match serde_json::from_slice(open) {
        Ok(o) => o,
        Err(e) => {
            port.queue(Kind::Error, format!("bad open frame: {e}").as_bytes());
            let _ = port.flush_all(FLUSH_WAIT, HUP_GRACE);
            return;
        }
    };
    port.queue(Kind::Ready, &open.nonce.to_be_bytes());
    // A copy into the VM only reads until its end: the host waits for Ready first.
    if let Err(e) = port.flush_all(FLUSH_WAIT, HUP_GRACE) {
        warn!("session {}: {e}", port.name);
        return;
    }
    let end = match open.session {
        Session::Exec(spec) => exec_session(port, &spec),
        Session::CopyIn { dest, name } => crate::copy::receive(port, &dest, &name),
        Session::CopyOut { src } => crate::copy::send(port, &src),
        Session::Apply { cdrom_sha256 } => crate::apply::apply(&cdrom_sha256).map(|report| {
            port.queue(Kind::Report, &crate::apply::report_json(&report));
            Some(i32::from(!report.problems.is_empty()))
        }),
    };
    match end {
        Ok(Some(code)) => port.queue(Kind::Exit, &code.to_be_bytes()),
        Ok(None) => return, // the host went away
        Err(msg) => port.queue(Kind::Error, msg.as_bytes()),
    }
    if let Err(e) = port.flush_all(FLUSH_WAIT, Duration::ZERO) {
        warn!("session {}: last frames not delivered: {e}", port.name);
    }
}

/// The pump's sink on a port: output as frames, stdin and resizes from frames.
struct PortSink<'a> {
    port: &'a mut Port,
    stdin: Option<Vec<u8>>,
    forward_stdin: bool,
}

impl Sink for PortSink<'_> {
    fn has_room(&self) -> bool {
        self.port.has_room()
    }
    fn output(&mut self, kind: Kind, bytes: &[u8]) {
        self.port.queue(kind, bytes);
    }
    fn poll_fd(&self) -> Option<(BorrowedFd<'_>, PollFlags)> {
        let mut ev = PollFlags::empty();
        // The next frame is read only once the stdin bytes before it are taken.
        if matches!(&self.stdin, Some(b) if b.is_empty()) || self.stdin.is_none() {
            ev |= PollFlags::POLLIN;
        }
        if !self.port.out.is_empty() {
            ev |= PollFlags::POLLOUT;
        }
        Some((self.port.fd(), ev))
    }
    fn service(&mut self, revents: PollFlags, child: &mut Child) -> Result<(), String> {
        self.port.flush_some()?;
        if revents.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
            return Err("host went away".into());
        }
        if revents.contains(PollFlags::POLLIN) && self.port.fill() == Fill::Gone {
            return Err("host went away".into());
        }
        loop {
            if matches!(&self.stdin, Some(b) if !b.is_empty()) {
                return Ok(());
            }
            if self.port.peek_kind() == Some(Kind::Open) {
                // A new client: this one is gone; its Open stays for the next session.
                return Err("a new client took the port".into());
            }
            match self.port.next_frame() {
                Ok(Some((Kind::Stdin, bytes))) => {
                    if let Some(b) = &mut self.stdin {
                        if self.forward_stdin {
                            *b = bytes;
                        }
                    }
                }
                Ok(Some((Kind::StdinEof, _))) => {
                    if child.pty {
                        // The terminal's EOF character, as a user's ctrl-d.
                        self.stdin = Some(vec![4]);
                    } else {
                        self.stdin = None;
                    }
                }
                Ok(Some((Kind::Resize, p))) if p.len() == 4 && child.pty => {
                    if let Some(fd) = &child.input {
                        let rows = u16::from_be_bytes([p[0], p[1]]);
                        let cols = u16::from_be_bytes([p[2], p[3]]);
                        exec::resize(fd.as_fd(), rows, cols);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => return Ok(()),
                Err(e) => return Err(format!("protocol: {e}")),
            }
        }
    }
    fn stdin(&mut self) -> &mut Option<Vec<u8>> {
        &mut self.stdin
    }
}

fn exec_session(
    port: &mut Port,
    spec: &kimg_contract::agent::ExecSpec,
) -> Result<Option<i32>, String> {
    let child = match exec::spawn(spec) {
        Ok(c) => c,
        Err(e) => {
            port.queue(Kind::Stderr, e.message.as_bytes());
            return Ok(Some(e.code));
        }
    };
    let forward = spec.stdin || spec.tty.is_some();
    let mut sink = PortSink {
        port,
        stdin: if forward { Some(Vec::new()) } else { None },
        forward_stdin: spec.stdin,
    };
    let timeout = spec.timeout_secs.map(Duration::from_secs);
    match exec::pump(child, &mut sink, timeout) {
        Ended::Exited(code) => Ok(Some(code)),
        Ended::HungUp(why) => {
            info!("session {}: exec ended: {why}", sink.port.name);
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reaper::tests::start_test_reaper;
    use kimg_contract::agent::{frame, ExecSpec, Tty};
    use std::io::{Read, Write};
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;

    /// Serves one session on a socketpair; the host side gets every frame back.
    fn session(spec: ExecSpec, input: &[u8]) -> Vec<(Kind, Vec<u8>)> {
        start_test_reaper();
        let (a, host) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut port = Port::from_file(File::from(OwnedFd::from(a)), "test");
        let open = serde_json::to_vec(&Open {
            nonce: 9,
            session: Session::Exec(spec),
        })
        .unwrap();
        let mut w = host.try_clone().unwrap();
        let input = input.to_vec();
        let writer = std::thread::spawn(move || {
            w.write_all(b"stale bytes").unwrap();
            w.write_all(&frame(Kind::Open, &open)).unwrap();
            w.write_all(&input).unwrap();
        });
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            let _ = (&host).read_to_end(&mut all);
            all
        });
        let open = port.wait_open();
        run_session(&mut port, &open);
        drop(port);
        writer.join().unwrap();
        let all = reader.join().unwrap();
        let mut out = Vec::new();
        let mut at = 0;
        while let Ok(Some((k, r, used))) = parse_frame(&all[at..]) {
            out.push((k, all[at..][r].to_vec()));
            at += used;
        }
        out
    }

    #[test]
    fn a_lone_stale_byte_read_alone_does_not_stall_the_port() {
        // The first read gets one byte that cannot begin a frame; the Open comes
        // 200 ms later. wait_open used to keep that byte and spin on it for ever
        // without reading again (seen as a hung unit test at 100% CPU).
        let (a, mut host) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut port = Port::from_file(File::from(OwnedFd::from(a)), "test");
        let open = frame(Kind::Open, b"{}");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(port.wait_open()));
        host.write_all(b"s").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        host.write_all(&open).unwrap();
        let got = rx.recv_timeout(Duration::from_secs(10));
        assert_eq!(got.as_deref(), Ok(&b"{}"[..]));
    }

    fn spec(argv: &[&str]) -> ExecSpec {
        ExecSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            tty: None,
            stdin: false,
            login: false,
            timeout_secs: None,
        }
    }

    fn stream(frames: &[(Kind, Vec<u8>)], kind: Kind) -> String {
        let b: Vec<u8> = frames
            .iter()
            .filter(|(k, _)| *k == kind)
            .flat_map(|(_, p)| p.clone())
            .collect();
        String::from_utf8_lossy(&b).into_owned()
    }

    #[test]
    fn exec_streams_both_outputs_then_the_exit_code() {
        let f = session(spec(&["sh", "-c", "echo out; echo err >&2; exit 3"]), b"");
        assert_eq!(f[0], (Kind::Ready, 9u64.to_be_bytes().to_vec()));
        assert_eq!(stream(&f, Kind::Stdout), "out\n");
        assert_eq!(stream(&f, Kind::Stderr), "err\n");
        assert_eq!(
            f.last().unwrap(),
            &(Kind::Exit, 3i32.to_be_bytes().to_vec())
        );
    }

    #[test]
    fn stdin_is_forwarded_and_its_end_closes_it() {
        let mut s = spec(&["cat"]);
        s.stdin = true;
        let mut input = frame(Kind::Stdin, b"hi\n");
        input.extend(frame(Kind::StdinEof, b""));
        let f = session(s, &input);
        assert_eq!(stream(&f, Kind::Stdout), "hi\n");
        assert_eq!(f.last().unwrap().0, Kind::Exit);
    }

    #[test]
    fn a_pty_session_is_a_terminal_with_the_asked_size() {
        let mut s = spec(&["sh", "-c", "tty; stty size; echo TERM=$TERM"]);
        s.tty = Some(Tty {
            term: "xterm-kimg".into(),
            rows: 33,
            cols: 77,
        });
        let f = session(s, b"");
        let out = stream(&f, Kind::Stdout);
        assert!(out.contains("/dev/pts/"), "{out}");
        assert!(out.contains("33 77"), "{out}");
        assert!(out.contains("TERM=xterm-kimg"), "{out}");
        assert_eq!(
            f.last().unwrap(),
            &(Kind::Exit, 0i32.to_be_bytes().to_vec())
        );
    }

    #[test]
    fn output_waits_for_a_slow_host_within_the_bound() {
        start_test_reaper();
        let (a, host) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut port = Port::from_file(File::from(OwnedFd::from(a)), "test");
        let open = serde_json::to_vec(&Open {
            nonce: 1,
            session: Session::Exec(spec(&["head", "-c", "20000000", "/dev/zero"])),
        })
        .unwrap();
        (&host).write_all(&frame(Kind::Open, &open)).unwrap();
        let reader = std::thread::spawn(move || {
            let mut total = 0usize;
            let mut buf = vec![0u8; 4096];
            loop {
                // A slow reader: the guest side must wait, not buffer.
                std::thread::sleep(Duration::from_micros(50));
                match (&host).read(&mut buf) {
                    Ok(0) | Err(_) => return total,
                    Ok(n) => total += n,
                }
            }
        });
        let open = port.wait_open();
        run_session(&mut port, &open);
        assert!(
            port.out.capacity() <= 2 * OUT_ROOM,
            "{}",
            port.out.capacity()
        );
        assert!(port.inbuf.capacity() <= 2 * (HEADER_LEN + MAX_FRAME));
        drop(port);
        let total = reader.join().unwrap();
        assert!(total > 20_000_000, "{total}");
    }
}
