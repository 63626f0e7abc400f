//! A small typed QMP client: the QEMU Machine Protocol over a VM's unix socket
//! (`-qmp unix:PATH,server=on,wait=off`), with serde types for the commands kimg uses.
//!
//! Every call has a deadline and every reply line is bounded in size, so a hung or
//! garbling QEMU costs a bounded wait and an error naming the socket, never a hang.
//! A QMP socket serves one client at a time: hold a [`Qmp`] only as long as needed.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Longest reply line accepted (query-block of a VM is a few KiB).
pub const MAX_LINE: u64 = 1 << 20;

/// Errors talking QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be opened (QEMU gone, or started without QMP).
    #[error("cannot connect to QMP at {path}: {source} (is the VM's QEMU running? clusters started by an older kimg have no QMP socket: restart them)")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Reading or writing failed.
    #[error("QMP {path}: {source}")]
    Io {
        /// Socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// No answer in time.
    #[error("QMP {path}: no answer to {command} within {timeout:?}")]
    Timeout {
        /// Socket path.
        path: PathBuf,
        /// The command waited for.
        command: String,
        /// The time allowed.
        timeout: Duration,
    },
    /// A line that is not QMP (or too long).
    #[error("QMP {path}: bad message: {why}")]
    Protocol {
        /// Socket path.
        path: PathBuf,
        /// What was wrong.
        why: String,
    },
    /// QEMU answered with an error.
    #[error("QMP {path}: {command} failed: {class}: {desc}")]
    Command {
        /// Socket path.
        path: PathBuf,
        /// The command.
        command: String,
        /// QMP error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
}

/// A QMP command with its typed arguments and reply.
pub trait Command: Serialize {
    /// The command's QMP name.
    const NAME: &'static str;
    /// What it returns.
    type Reply: DeserializeOwned;
    /// Whether it has arguments (`"arguments"` is left out when not).
    const HAS_ARGS: bool = true;
}

/// An empty reply (`{}`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Empty {}

macro_rules! no_arg_command {
    ($(#[$doc:meta])* $ty:ident, $name:literal, $reply:ty) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Default, Serialize)]
        pub struct $ty;
        impl Command for $ty {
            const NAME: &'static str = $name;
            type Reply = $reply;
            const HAS_ARGS: bool = false;
        }
    };
}

no_arg_command!(
    /// Leaves capabilities negotiation mode (sent by [`Qmp::connect`]).
    QmpCapabilities,
    "qmp_capabilities",
    Empty
);
no_arg_command!(
    /// Pauses the VM (its block devices are drained and flushed).
    Stop,
    "stop",
    Empty
);
no_arg_command!(
    /// Resumes a paused VM.
    Cont,
    "cont",
    Empty
);
no_arg_command!(
    /// The state of the last or current migration.
    QueryMigrate,
    "query-migrate",
    MigrationInfo
);
no_arg_command!(
    /// Cancels the migration under way (one whose reader is gone).
    MigrateCancel,
    "migrate_cancel",
    Empty
);
no_arg_command!(
    /// The run state.
    QueryStatus,
    "query-status",
    StatusInfo
);
no_arg_command!(
    /// The block devices and their media.
    QueryBlock,
    "query-block",
    Vec<BlockInfo>
);
no_arg_command!(
    /// Ends QEMU at once (no guest shutdown).
    Quit,
    "quit",
    Empty
);

/// Migrates the VM's RAM and device state to `uri` (`exec:CMD` writes to a command).
#[derive(Debug, Clone, Serialize)]
pub struct Migrate {
    /// Where to: `exec:zstd -1 > FILE`.
    pub uri: String,
}

impl Command for Migrate {
    const NAME: &'static str = "migrate";
    type Reply = Empty;
}

/// Sets migration parameters (only the bandwidth cap here: QEMU's default is
/// 32 MiB/s, far below what a local file takes).
#[derive(Debug, Clone, Serialize)]
pub struct MigrateSetParameters {
    /// Bytes per second.
    #[serde(rename = "max-bandwidth")]
    pub max_bandwidth: u64,
}

impl Command for MigrateSetParameters {
    const NAME: &'static str = "migrate-set-parameters";
    type Reply = Empty;
}

/// Puts a new medium into a removable drive.
#[derive(Debug, Clone, Serialize)]
pub struct BlockdevChangeMedium {
    /// The qdev id of the drive's device.
    pub id: String,
    /// The new medium's file.
    pub filename: String,
    /// Its format (`raw`).
    pub format: String,
    /// `read-only`, `read-write` or `retain`.
    #[serde(rename = "read-only-mode")]
    pub read_only_mode: String,
}

impl Command for BlockdevChangeMedium {
    const NAME: &'static str = "blockdev-change-medium";
    type Reply = Empty;
}

/// Ejects a removable drive's medium.
#[derive(Debug, Clone, Serialize)]
pub struct Eject {
    /// The qdev id of the drive's device.
    pub id: String,
    /// Eject even when the guest locked the tray.
    pub force: bool,
}

impl Command for Eject {
    const NAME: &'static str = "eject";
    type Reply = Empty;
}

/// Reply of [`QueryMigrate`].
#[derive(Debug, Clone, Default, Deserialize)]
pub struct MigrationInfo {
    /// `setup`, `active`, `completed`, `failed`, ... (absent before any migration).
    #[serde(default)]
    pub status: Option<String>,
    /// Why it failed.
    #[serde(default, rename = "error-desc")]
    pub error_desc: Option<String>,
    /// Milliseconds the migration took (when completed).
    #[serde(default, rename = "total-time")]
    pub total_time: Option<u64>,
}

/// Reply of [`QueryStatus`].
#[derive(Debug, Clone, Deserialize)]
pub struct StatusInfo {
    /// Whether the vCPUs run.
    pub running: bool,
    /// The run state: `running`, `paused`, `inmigrate`, `postmigrate`, ...
    pub status: String,
}

/// One entry of [`QueryBlock`].
#[derive(Debug, Clone, Deserialize)]
pub struct BlockInfo {
    /// The drive id (`-drive id=`).
    pub device: String,
    /// The device's qdev id or path.
    #[serde(default)]
    pub qdev: Option<String>,
    /// Whether the medium is removable.
    #[serde(default)]
    pub removable: bool,
    /// The medium, when one is inserted.
    #[serde(default)]
    pub inserted: Option<Inserted>,
}

/// The medium in a drive.
#[derive(Debug, Clone, Deserialize)]
pub struct Inserted {
    /// Its file.
    pub file: String,
}

/// QEMU's version from the greeting.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// `major.minor.micro`.
    pub qemu: String,
    /// The distribution's package string.
    pub package: String,
}

#[derive(Deserialize)]
struct Greeting {
    #[serde(rename = "QMP")]
    qmp: GreetingBody,
}

#[derive(Deserialize)]
struct GreetingBody {
    version: GreetingVersion,
}

#[derive(Deserialize)]
struct GreetingVersion {
    qemu: Triple,
    #[serde(default)]
    package: String,
}

#[derive(Deserialize)]
struct Triple {
    major: u32,
    minor: u32,
    micro: u32,
}

/// One message from QEMU: a reply (return or error) or an event (skipped).
#[derive(Deserialize)]
struct Message {
    #[serde(default, rename = "return")]
    ret: Option<serde_json::Value>,
    #[serde(default)]
    error: Option<ErrorBody>,
    #[serde(default)]
    id: Option<u64>,
}

#[derive(Deserialize)]
struct ErrorBody {
    class: String,
    desc: String,
}

#[derive(Serialize)]
struct Envelope<'a, C> {
    execute: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    arguments: Option<&'a C>,
    id: u64,
}

/// A QMP connection in command mode.
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    next_id: u64,
    version: Version,
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities, within `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path).map_err(|source| QmpError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let mut q = Qmp {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            next_id: 1,
            version: Version::default(),
        };
        let deadline = Instant::now() + timeout;
        // A reply QEMU owed a client that went away (a killed kimg) can come first.
        let greeting: Greeting = loop {
            let line = q.read_line(deadline, "the greeting", timeout)?;
            let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| q.protocol(e))?;
            if v.get("QMP").is_some() {
                break serde_json::from_value(v).map_err(|e| q.protocol(e))?;
            }
        };
        let v = greeting.qmp.version;
        q.version = Version {
            qemu: format!("{}.{}.{}", v.qemu.major, v.qemu.minor, v.qemu.micro),
            package: v.package.trim().to_string(),
        };
        q.execute(
            &QmpCapabilities,
            deadline.saturating_duration_since(Instant::now()),
        )?;
        Ok(q)
    }

    /// QEMU's version, from the greeting.
    pub fn version(&self) -> &Version {
        &self.version
    }

    /// Runs `cmd` and waits up to `timeout` for its reply; events on the way are skipped.
    pub fn execute<C: Command>(
        &mut self,
        cmd: &C,
        timeout: Duration,
    ) -> Result<C::Reply, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let env = Envelope {
            execute: C::NAME,
            arguments: C::HAS_ARGS.then_some(cmd),
            id,
        };
        let mut line = serde_json::to_string(&env).map_err(|e| self.protocol(e))?;
        line.push('\n');
        let path = self.path.clone();
        self.reader
            .get_mut()
            .write_all(line.as_bytes())
            .map_err(|source| QmpError::Io { path, source })?;
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.read_line(deadline, C::NAME, timeout)?;
            let msg: Message = serde_json::from_str(&text).map_err(|e| self.protocol(e))?;
            if msg.id != Some(id) {
                continue; // an event, or a reply to nobody
            }
            if let Some(e) = msg.error {
                return Err(QmpError::Command {
                    path: self.path.clone(),
                    command: C::NAME.to_string(),
                    class: e.class,
                    desc: e.desc,
                });
            }
            let ret = msg.ret.unwrap_or(serde_json::Value::Null);
            return serde_json::from_value(ret).map_err(|e| self.protocol(e));
        }
    }

    fn protocol(&self, e: impl std::fmt::Display) -> QmpError {
        QmpError::Protocol {
            path: self.path.clone(),
            why: e.to_string(),
        }
    }

    /// One line, at most [`MAX_LINE`] bytes, before `deadline`.
    fn read_line(
        &mut self,
        deadline: Instant,
        command: &str,
        timeout: Duration,
    ) -> Result<String, QmpError> {
        let mut buf = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let timed_out = || QmpError::Timeout {
                path: self.path.clone(),
                command: command.to_string(),
                timeout,
            };
            if left.is_zero() {
                return Err(timed_out());
            }
            let io_err = |source| QmpError::Io {
                path: self.path.clone(),
                source,
            };
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .map_err(io_err)?;
            let room = MAX_LINE.saturating_sub(buf.len() as u64);
            match (&mut self.reader).take(room).read_until(b'\n', &mut buf) {
                Ok(0) if room == 0 => {
                    return Err(self.protocol(format!("a line longer than {MAX_LINE} bytes")))
                }
                Ok(0) => {
                    return Err(QmpError::Io {
                        path: self.path.clone(),
                        source: io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "QEMU closed the connection",
                        ),
                    })
                }
                Ok(_) if buf.ends_with(b"\n") => {
                    return String::from_utf8(buf).map_err(|e| self.protocol(e))
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(timed_out())
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(QmpError::Io {
                        path: self.path.clone(),
                        source,
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7"}, "capabilities": ["oob"]}}"#;

    /// A fake QEMU: greets, then answers each command line with `answer(line)`
    /// (several lines allowed, joined by newlines).
    fn fake(
        sock: &Path,
        answer: fn(&serde_json::Value) -> String,
    ) -> std::thread::JoinHandle<Vec<String>> {
        let listener = UnixListener::bind(sock).unwrap();
        std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            writeln!(w, "{GREETING}").unwrap();
            let mut seen = Vec::new();
            for line in BufReader::new(s).lines() {
                let Ok(line) = line else { break };
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                seen.push(v["execute"].as_str().unwrap().to_string());
                let out = answer(&v);
                if out.is_empty() {
                    continue;
                }
                if w.write_all(format!("{out}\n").as_bytes()).is_err() {
                    break;
                }
            }
            seen
        })
    }

    fn ok(v: &serde_json::Value) -> String {
        let id = &v["id"];
        match v["execute"].as_str().unwrap() {
            "query-status" => format!(
                "{{\"event\": \"RESUME\"}}\n{{\"return\": {{\"running\": false, \"status\": \"paused\", \"singlestep\": false}}, \"id\": {id}}}"
            ),
            "query-migrate" => {
                assert!(v.get("arguments").is_none(), "{v}");
                format!("{{\"return\": {{\"status\": \"completed\", \"total-time\": 730}}, \"id\": {id}}}")
            }
            "migrate" => {
                assert_eq!(v["arguments"]["uri"], "exec:zstd -1 > /x");
                format!("{{\"return\": {{}}, \"id\": {id}}}")
            }
            "cont" => format!(
                "{{\"error\": {{\"class\": \"GenericError\", \"desc\": \"not paused\"}}, \"id\": {id}}}"
            ),
            "query-block" => format!(
                "{{\"return\": [{{\"device\": \"cd0\", \"qdev\": \"cdrom0\", \"removable\": true, \"inserted\": {{\"file\": \"/c.iso\", \"ro\": true}}}}, {{\"device\": \"virtio0\", \"removable\": false}}], \"id\": {id}}}"
            ),
            _ => format!("{{\"return\": {{}}, \"id\": {id}}}"),
        }
    }

    #[test]
    fn typed_commands_get_typed_replies_and_events_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let server = fake(&sock, ok);
        let t = Duration::from_secs(5);
        let mut q = Qmp::connect(&sock, t).unwrap();
        assert_eq!(q.version().qemu, "7.2.22");
        let st = q.execute(&QueryStatus, t).unwrap();
        assert_eq!((st.running, st.status.as_str()), (false, "paused"));
        q.execute(
            &Migrate {
                uri: "exec:zstd -1 > /x".into(),
            },
            t,
        )
        .unwrap();
        let m = q.execute(&QueryMigrate, t).unwrap();
        assert_eq!(m.status.as_deref(), Some("completed"));
        assert_eq!(m.total_time, Some(730));
        let blocks = q.execute(&QueryBlock, t).unwrap();
        assert_eq!(blocks[0].inserted.as_ref().unwrap().file, "/c.iso");
        assert!(blocks[1].inserted.is_none());
        let e = q.execute(&Cont, t).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("cont failed: GenericError: not paused"),
            "{msg}"
        );
        assert!(msg.contains("qmp.sock"), "{msg}");
        drop(q);
        let seen = server.join().unwrap();
        assert_eq!(
            seen,
            [
                "qmp_capabilities",
                "query-status",
                "migrate",
                "query-migrate",
                "query-block",
                "cont"
            ]
        );
    }

    #[test]
    fn a_reply_owed_to_a_client_gone_is_skipped_before_the_greeting() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            writeln!(w, "{{\"return\": {{}}, \"id\": 3}}\n{GREETING}").unwrap();
            let mut r = BufReader::new(s);
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            writeln!(w, "{{\"return\": {{}}, \"id\": {}}}", v["id"]).unwrap();
        });
        let q = Qmp::connect(&sock, Duration::from_secs(5)).unwrap();
        assert_eq!(q.version().qemu, "7.2.22");
        server.join().unwrap();
    }

    #[test]
    fn silence_is_a_timeout_naming_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let _server = fake(&sock, |v| {
            if v["execute"] == "stop" {
                String::new()
            } else {
                ok(v)
            }
        });
        let mut q = Qmp::connect(&sock, Duration::from_secs(5)).unwrap();
        let e = q.execute(&Stop, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
        assert!(e.to_string().contains("no answer to stop"), "{e}");
    }

    #[test]
    fn an_endless_line_is_refused_not_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let chunk = vec![b'x'; 1 << 16];
            for _ in 0..(MAX_LINE / chunk.len() as u64 + 2) {
                if s.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        let e = Qmp::connect(&sock, Duration::from_secs(5)).err().unwrap();
        assert!(matches!(e, QmpError::Protocol { .. }), "{e}");
        server.join().unwrap();
        let e = Qmp::connect(&dir.path().join("none"), Duration::from_secs(1))
            .err()
            .unwrap();
        assert!(e.to_string().contains("none"), "{e}");
    }

    #[test]
    fn wire_form_leaves_out_arguments_of_argumentless_commands() {
        let env = Envelope {
            execute: Stop::NAME,
            arguments: Stop::HAS_ARGS.then_some(&Stop),
            id: 3,
        };
        assert_eq!(
            serde_json::to_string(&env).unwrap(),
            r#"{"execute":"stop","id":3}"#
        );
        let m = BlockdevChangeMedium {
            id: "cdrom0".into(),
            filename: "/a.iso".into(),
            format: "raw".into(),
            read_only_mode: "read-only".into(),
        };
        let env = Envelope {
            execute: BlockdevChangeMedium::NAME,
            arguments: Some(&m),
            id: 4,
        };
        assert_eq!(
            serde_json::to_string(&env).unwrap(),
            r#"{"execute":"blockdev-change-medium","arguments":{"id":"cdrom0","filename":"/a.iso","format":"raw","read-only-mode":"read-only"},"id":4}"#
        );
    }
}
