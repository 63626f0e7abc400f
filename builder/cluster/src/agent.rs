//! Host side of the agent's control port: one request, one matching response, over
//! the unix socket QEMU exposes for a VM's `kimg.agent` port. The timeout is a
//! deadline for the whole call (connect, write, every read), and an answer line is
//! at most `MAX_LINE` bytes, so a guest that drips or floods costs a bounded time
//! and memory.

use kimg_contract::agent::{from_line, to_line, Op, Reply, Request, Response, MAX_LINE};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Errors talking to a VM's agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The socket could not be opened (QEMU gone?).
    #[error("cannot connect to the agent at {path}: {source}")]
    Connect {
        /// Socket path.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// No answer within the time allowed.
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
    /// The connection broke.
    #[error("agent connection: {0}")]
    Io(#[from] io::Error),
    /// The agent closed the connection.
    #[error("the agent closed the connection")]
    Closed,
    /// An answer line passed the limit.
    #[error("the agent sent a line longer than {MAX_LINE} bytes")]
    TooLong,
    /// The caller's liveness check failed while waiting (its VM is gone).
    #[error("gave up waiting for the agent: its VM is gone")]
    Gone,
}

/// How often [`request_while`] asks its liveness check while it waits for an answer.
pub const ALIVE_CHECK: Duration = Duration::from_millis(100);

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A fresh request id, unique across processes in practice (pid in the high bits),
/// so a late answer to an earlier client is never mistaken for ours.
fn next_id() -> u64 {
    (u64::from(std::process::id()) << 32) | NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Sends `op` and waits up to `timeout` (a deadline for the whole call) for its
/// answer.
pub fn request(socket: &Path, op: Op, timeout: Duration) -> Result<Reply, AgentError> {
    request_while(socket, op, timeout, &|| true)
}

/// [`request`] that also gives up ([`AgentError::Gone`]) once `alive` says false,
/// asked every [`ALIVE_CHECK`] while no answer has come.
///
/// This is how a booting VM is waited for: a request held open until the agent
/// serves. QEMU keeps the request in the socket until the guest opens its port and
/// then delivers it, so the answer comes the moment the agent starts, and a VM whose
/// QEMU died is seen within [`ALIVE_CHECK`].
pub fn request_while(
    socket: &Path,
    op: Op,
    timeout: Duration,
    alive: &dyn Fn() -> bool,
) -> Result<Reply, AgentError> {
    let deadline = Instant::now() + timeout;
    let stream = UnixStream::connect(socket).map_err(|source| AgentError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    let id = next_id();
    let left = |d: Instant| {
        let l = d.saturating_duration_since(Instant::now());
        (!l.is_zero())
            .then_some(l)
            .ok_or(AgentError::Timeout(timeout))
    };
    stream.set_write_timeout(Some(left(deadline)?))?;
    (&stream)
        .write_all(to_line(&Request { id, op }).as_bytes())
        .map_err(|e| {
            if is_timeout(&e) {
                AgentError::Timeout(timeout)
            } else {
                e.into()
            }
        })?;
    let mut line: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        // Whole lines first: answers to earlier clients are skipped.
        while let Some(nl) = line.iter().position(|b| *b == b'\n') {
            let one: Vec<u8> = line.drain(..=nl).collect();
            if let Ok(resp) = from_line::<Response>(&String::from_utf8_lossy(&one)) {
                if resp.id == id {
                    return Ok(resp.reply);
                }
            }
        }
        if line.len() > MAX_LINE {
            return Err(AgentError::TooLong);
        }
        stream.set_read_timeout(Some(left(deadline)?.min(ALIVE_CHECK)))?;
        match (&stream).read(&mut chunk) {
            Ok(0) => return Err(AgentError::Closed),
            Ok(n) => line.extend_from_slice(&chunk[..n]),
            Err(e) if is_timeout(&e) => {
                left(deadline)?;
                if !alive() {
                    return Err(AgentError::Gone);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;

    #[test]
    fn skips_stale_answers_and_returns_the_matching_one() {
        let (_dir, sock, server) = fake_guest(|s, req| {
            let stale = Response {
                id: req.id ^ 1,
                reply: Reply::Ok,
            };
            let ours = Response {
                id: req.id,
                reply: Reply::Error {
                    message: "ours".into(),
                },
            };
            (&s).write_all(b"garbage\n").unwrap();
            (&s).write_all(to_line(&stale).as_bytes()).unwrap();
            (&s).write_all(to_line(&ours).as_bytes()).unwrap();
        });
        let reply = request(&sock, Op::Status, Duration::from_secs(5)).unwrap();
        assert!(
            matches!(&reply, Reply::Error { message } if message == "ours"),
            "{reply:?}"
        );
        server.join().unwrap();
    }

    #[test]
    fn silence_is_a_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let _listener = UnixListener::bind(&sock).unwrap();
        let err = request(&sock, Op::Status, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, AgentError::Timeout(_)), "{err}");
        let err = request(
            &dir.path().join("none"),
            Op::Status,
            Duration::from_millis(200),
        )
        .unwrap_err();
        assert!(err.to_string().contains("none"), "{err}");
    }

    /// A fake guest on a real unix socket: accepts, reads the request, then runs
    /// `behave` on the connection and the request.
    fn fake_guest(
        behave: impl FnOnce(UnixStream, Request) + Send + 'static,
    ) -> (
        tempfile::TempDir,
        std::path::PathBuf,
        std::thread::JoinHandle<()>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            behave(s, from_line(&line).unwrap());
        });
        (dir, sock, t)
    }

    #[test]
    fn a_wait_ends_when_the_vm_is_gone_not_at_the_deadline() {
        let (_dir, sock, t) = fake_guest(|s, _| {
            // A guest that never answers, until the host hangs up.
            let _ = (&s).read(&mut [0u8; 1]);
        });
        let checks = std::sync::atomic::AtomicU32::new(0);
        let alive = || checks.fetch_add(1, Ordering::Relaxed) < 3;
        let err = request_while(&sock, Op::Status, Duration::from_secs(600), &alive).unwrap_err();
        assert!(matches!(err, AgentError::Gone), "{err}");
        assert_eq!(checks.load(Ordering::Relaxed), 4);
        t.join().unwrap();
    }

    #[test]
    fn an_answer_slower_than_the_liveness_checks_still_arrives() {
        let (_dir, sock, t) = fake_guest(|s, req| {
            std::thread::sleep(ALIVE_CHECK * 5);
            let r = Response {
                id: req.id,
                reply: Reply::Ok,
            };
            (&s).write_all(to_line(&r).as_bytes()).unwrap();
        });
        let reply = request_while(&sock, Op::Status, Duration::from_secs(600), &|| true).unwrap();
        assert_eq!(reply, Reply::Ok);
        t.join().unwrap();
    }

    #[test]
    fn a_dripping_guest_cannot_stretch_the_deadline() {
        let (_dir, sock, t) = fake_guest(|mut s, _| {
            // A byte every 100 ms, never a newline: per-read timeouts never fire.
            for _ in 0..40 {
                if s.write_all(b"x").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let start = Instant::now();
        let err = request(&sock, Op::Status, Duration::from_millis(500)).unwrap_err();
        let took = start.elapsed();
        assert!(matches!(err, AgentError::Timeout(_)), "{err}");
        assert!(took < Duration::from_millis(1500), "took {took:?}");
        t.join().unwrap();
    }

    #[test]
    fn a_flooding_guest_is_cut_at_the_line_limit() {
        let (_dir, sock, t) = fake_guest(|mut s, _| {
            let junk = vec![b'x'; 64 * 1024];
            // Far more than the limit, without a newline; stops when the client leaves.
            for _ in 0..(4 * MAX_LINE / junk.len()) {
                if s.write_all(&junk).is_err() {
                    return;
                }
            }
        });
        let err = request(&sock, Op::Status, Duration::from_secs(20)).unwrap_err();
        assert!(matches!(err, AgentError::TooLong), "{err}");
        t.join().unwrap();
    }
}
