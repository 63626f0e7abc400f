//! The agent: serves line-delimited JSON requests on the `kimg.agent` control port
//! (status, poweroff) and starts the session ports' servers ([`crate::session`]:
//! exec, shells, copies). Status and errors are answered by the pure [`handle`]; one
//! writer thread owns the port's write side, so a host that is gone (writes block)
//! never stalls reading or PID 1's main loop.

use kimg_contract::agent::{self, BootState, Op, Reply, Request, Response, Status, MAX_LINE};
use kimg_contract::{Role, VmId};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Virtio-serial ports, one directory each with a `name` file.
pub const VIRTIO_PORTS: &str = "/sys/class/virtio-ports";
/// Where the port nodes are.
pub const DEV_DIR: &str = "/dev";
/// Where the kernel's uptime is.
pub const PROC_UPTIME: &str = "/proc/uptime";
/// How long to wait for the port to appear at boot.
pub const PORT_WAIT: Duration = Duration::from_secs(5);
/// Pause while no host client is connected (reads return EOF).
const IDLE: Duration = Duration::from_millis(50);

/// What the agent reports, fixed when the boot is done.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    /// The hostname set at boot.
    pub hostname: String,
    /// `uname -r`.
    pub kernel: String,
    /// Seconds from kernel start to the ready line.
    pub ready_secs: Option<f64>,
    /// Failed boot steps.
    pub problems: Vec<String>,
    /// Addresses the network step configured.
    pub addresses: Vec<String>,
    /// What the overlay cdrom's overlays did.
    pub overlays: Vec<kimg_contract::cdrom::OverlayReport>,
}

/// Seconds since the kernel started (first field of /proc/uptime).
pub fn uptime() -> Option<f64> {
    let text = std::fs::read_to_string(PROC_UPTIME).ok()?;
    text.split_ascii_whitespace().next()?.parse().ok()
}

/// The status report for `state`.
pub fn status(state: &State) -> Status {
    Status {
        hostname: state.hostname.clone(),
        role: state
            .hostname
            .parse::<VmId>()
            .map_or(Role::Reserved, VmId::role),
        state: if state.problems.is_empty() {
            BootState::Ready
        } else {
            BootState::Degraded
        },
        uptime_secs: uptime().unwrap_or(0.0),
        ready_secs: state.ready_secs,
        kernel: state.kernel.clone(),
        init_version: env!("CARGO_PKG_VERSION").to_string(),
        problems: state.problems.clone(),
        services: crate::services::snapshot(),
        addresses: state.addresses.clone(),
        overlays: state.overlays.clone(),
    }
}

/// What to do with one request line.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send this answer.
    Reply(Response),
    /// Send this answer, then power off.
    Poweroff(Response),
}

/// Decides what to do with one line; answers status and bad requests itself.
pub fn handle(line: &str, state: &State) -> Action {
    let req: Request = match agent::from_line(line) {
        Ok(r) => r,
        Err(e) => {
            // Echo the id when at least that much is readable.
            let id = serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("id").and_then(serde_json::Value::as_u64))
                .unwrap_or(0);
            return Action::Reply(error(id, format!("bad request: {e}")));
        }
    };
    match req.op {
        Op::Status => Action::Reply(Response {
            id: req.id,
            reply: Reply::Status(status(state)),
        }),
        // Set at once in the reader: the sooner, the closer to the host's time.
        Op::SetClock { secs, nanos } => Action::Reply(match crate::clock::set(secs, nanos) {
            Ok(()) => Response {
                id: req.id,
                reply: Reply::Ok,
            },
            Err(message) => error(req.id, message),
        }),
        Op::Poweroff => Action::Poweroff(Response {
            id: req.id,
            reply: Reply::Ok,
        }),
    }
}

fn error(id: u64, message: String) -> Response {
    Response {
        id,
        reply: Reply::Error { message },
    }
}

/// Finds the node of the virtio-serial port named [`agent::PORT_NAME`].
pub fn find_port() -> Option<PathBuf> {
    find_named_port(agent::PORT_NAME)
}

/// Finds the node of the virtio-serial port named `wanted`.
pub fn find_named_port(wanted: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(VIRTIO_PORTS).ok()?.flatten() {
        let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim() == wanted {
            return Some(PathBuf::from(DEV_DIR).join(entry.file_name()));
        }
    }
    None
}

/// A line to write, and who to tell once it is written.
type Outgoing = (String, Option<Sender<()>>);

/// Starts the agent thread. `poweroff` is called (in the agent thread) after the
/// poweroff answer is written or could not be written within a second.
pub fn start(state: Arc<State>, poweroff: fn()) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("agent".into())
        .spawn(move || serve(&state, poweroff))
        .map(drop)
}

fn serve(state: &State, poweroff: fn()) {
    let start = Instant::now();
    let node = loop {
        if let Some(n) = find_port().filter(|n| n.exists()) {
            break n;
        }
        if start.elapsed() > PORT_WAIT {
            error!(
                "agent: no virtio-serial port named {} after {PORT_WAIT:?}; agent not served",
                agent::PORT_NAME
            );
            return;
        }
        std::thread::sleep(IDLE);
    };
    info!("agent: serving on {}", node.display());
    crate::session::start();
    loop {
        match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_NOCTTY)
            .open(&node)
        {
            Ok(port) => match port.try_clone() {
                Ok(w) => {
                    // Sleep until the host connects, not in IDLE steps (an idle VM's
                    // CPU under TCG).
                    let armed = crate::hostwait::arm(port.as_fd())
                        .inspect_err(|e| warn!("agent: port events: {e}; polling"))
                        .is_ok();
                    let tx = start_writer(w);
                    read_requests(port, &tx, state, poweroff, armed);
                }
                Err(e) => error!("agent: dup {}: {e}", node.display()),
            },
            Err(e) => error!("agent: open {}: {e}", node.display()),
        }
        // Reopening is the last resort after a read error; don't spin on it.
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn start_writer(mut port: File) -> Sender<Outgoing> {
    let (tx, rx): (Sender<Outgoing>, Receiver<Outgoing>) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("agent-writer".into())
        .spawn(move || {
            for (line, done) in rx {
                // A write blocks while no host is connected; that only holds this thread.
                if let Err(e) = port.write_all(line.as_bytes()) {
                    warn!("agent: write: {e}");
                }
                if let Some(done) = done {
                    let _ = done.send(()); // the waiter may have given up
                }
            }
        });
    if let Err(e) = spawned {
        error!("agent: cannot start the writer thread: {e}");
    }
    tx
}

/// Reads lines until a read error (EOF just means "no host connected": wait, go on).
fn read_requests(
    mut port: File,
    tx: &Sender<Outgoing>,
    state: &State,
    poweroff: fn(),
    armed: bool,
) {
    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = match port.read(&mut chunk) {
            Ok(0) => {
                // No host client: a partial line from a client that left is dropped.
                pending.clear();
                crate::hostwait::idle(armed, IDLE);
                continue;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                error!("agent: read: {e}; reopening the port");
                return;
            }
        };
        pending.extend_from_slice(&chunk[..n]);
        while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line);
            if !line.trim().is_empty() {
                dispatch(&line, tx, state, poweroff);
            }
        }
        if pending.len() > MAX_LINE {
            pending.clear();
            send(
                tx,
                error(0, format!("bad request: line longer than {MAX_LINE} bytes")),
                None,
            );
        }
    }
}

fn send(tx: &Sender<Outgoing>, r: Response, done: Option<Sender<()>>) {
    if tx.send((agent::to_line(&r), done)).is_err() {
        error!("agent: writer thread gone; answer to {} lost", r.id);
    }
}

fn dispatch(line: &str, tx: &Sender<Outgoing>, state: &State, poweroff: fn()) {
    match handle(line, state) {
        Action::Reply(r) => send(tx, r, None),
        Action::Poweroff(r) => {
            info!("agent: poweroff requested");
            let (done_tx, done_rx) = mpsc::channel();
            send(tx, r, Some(done_tx));
            if done_rx.recv_timeout(Duration::from_secs(1)).is_err() {
                warn!("agent: poweroff answer not written within 1s; powering off anyway");
            }
            poweroff();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(problems: &[&str]) -> State {
        State {
            hostname: "vm-201".into(),
            kernel: "6.1.0-test".into(),
            ready_secs: Some(2.5),
            problems: problems.iter().map(|s| s.to_string()).collect(),
            addresses: Vec::new(),
            overlays: vec![],
        }
    }

    fn reply(a: Action) -> Response {
        match a {
            Action::Reply(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn status_reports_role_state_and_versions() {
        let r = reply(handle("{\"id\":1,\"op\":\"status\"}\n", &state(&[])));
        assert_eq!(r.id, 1);
        let Reply::Status(s) = r.reply else { panic!() };
        assert_eq!(s.role, Role::Router);
        assert_eq!(s.state, BootState::Ready);
        assert_eq!(s.kernel, "6.1.0-test");
        assert_eq!(s.ready_secs, Some(2.5));
        assert_eq!(s.init_version, env!("CARGO_PKG_VERSION"));
        assert!(s.uptime_secs > 0.0);

        let mut st = state(&["modules: x.ko: ENOENT"]);
        st.hostname = "kimg".into();
        let Reply::Status(s) = reply(handle("{\"id\":2,\"op\":\"status\"}", &st)).reply else {
            panic!()
        };
        assert_eq!((s.role, s.state), (Role::Reserved, BootState::Degraded));
        assert_eq!(s.problems.len(), 1);
    }

    #[test]
    fn bad_lines_get_errors_with_the_id_when_readable() {
        let st = state(&[]);
        for (line, id) in [
            ("garbage", 0),
            ("{\"id\":5,\"op\":\"reboot\"}", 5),
            ("{\"op\":\"status\"}", 0),
        ] {
            let r = reply(handle(line, &st));
            assert_eq!(r.id, id, "{line}");
            assert!(matches!(r.reply, Reply::Error { .. }), "{line}");
        }
    }

    #[test]
    fn poweroff_is_an_action_and_exec_is_no_longer_a_request() {
        let st = state(&[]);
        assert_eq!(
            handle("{\"id\":4,\"op\":\"poweroff\"}", &st),
            Action::Poweroff(Response {
                id: 4,
                reply: Reply::Ok
            })
        );
        let r = reply(handle(
            "{\"id\":3,\"op\":\"exec\",\"argv\":[\"true\"]}",
            &st,
        ));
        assert!(matches!(r.reply, Reply::Error { .. }));
    }
}
