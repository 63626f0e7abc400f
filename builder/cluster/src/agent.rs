//! Host side of the agent protocol: one request, one matching response, over the
//! unix socket QEMU exposes for a VM's `kimg.agent` port.

use kimg_contract::agent::{from_line, to_line, Op, Reply, Request, Response};
use std::io::{self, BufRead, BufReader, Write};
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
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A fresh request id, unique across processes in practice (pid in the high bits),
/// so a late answer to an earlier client is never mistaken for ours.
fn next_id() -> u64 {
    (u64::from(std::process::id()) << 32) | NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Sends `op` and waits up to `timeout` for its answer.
pub fn request(socket: &Path, op: Op, timeout: Duration) -> Result<Reply, AgentError> {
    let deadline = Instant::now() + timeout;
    let stream = UnixStream::connect(socket).map_err(|source| AgentError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    let id = next_id();
    (&stream).write_all(to_line(&Request { id, op }).as_bytes())?;
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(AgentError::Timeout(timeout));
        }
        stream.set_read_timeout(Some(left))?;
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return Err(AgentError::Closed),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(AgentError::Timeout(timeout))
            }
            Err(e) => return Err(e.into()),
        }
        // Lines for other ids (or garbage from a reset port) are skipped.
        if let Ok(resp) = from_line::<Response>(&line) {
            if resp.id == id {
                return Ok(resp.reply);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kimg_contract::agent::ExecResult;
    use std::os::unix::net::UnixListener;

    #[test]
    fn skips_stale_answers_and_returns_the_matching_one() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(&s);
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let req: Request = from_line(&line).unwrap();
            let stale = Response {
                id: req.id ^ 1,
                reply: Reply::Ok,
            };
            let ours = Response {
                id: req.id,
                reply: Reply::Exec(ExecResult {
                    exit_code: 4,
                    stdout: "x".into(),
                    stderr: "".into(),
                }),
            };
            (&s).write_all(b"garbage\n").unwrap();
            (&s).write_all(to_line(&stale).as_bytes()).unwrap();
            (&s).write_all(to_line(&ours).as_bytes()).unwrap();
        });
        let op = Op::Exec {
            argv: vec!["x".into()],
            timeout_secs: None,
        };
        let reply = request(&sock, op, Duration::from_secs(5)).unwrap();
        assert!(
            matches!(reply, Reply::Exec(ExecResult { exit_code: 4, .. })),
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
}
