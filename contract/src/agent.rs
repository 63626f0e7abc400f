//! The agent protocol: line-delimited JSON over the `kimg.agent` virtio-serial port.
//!
//! The host writes one [`Request`] per line and reads [`Response`] lines until one
//! carries the same `id`; lines with other ids are answers to earlier clients that
//! went away and are skipped. kimg-init answers every request with exactly one line.

use serde::{Deserialize, Serialize};

/// Name of the virtio-serial port (`/sys/class/virtio-ports/*/name`).
pub const PORT_NAME: &str = "kimg.agent";

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
    /// Run a program and report its exit and output.
    Exec {
        /// Program and arguments; the program is looked up in PATH.
        argv: Vec<String>,
        /// Kill the program after this many seconds (default: no limit).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_secs: Option<u64>,
    },
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
    /// Answer to [`Op::Exec`].
    Exec(ExecResult),
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

/// Outcome of an [`Op::Exec`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    /// Exit code; 128 + signal number when killed by a signal, as shells do.
    pub exit_code: i32,
    /// Standard output (invalid UTF-8 replaced).
    pub stdout: String,
    /// Standard error (invalid UTF-8 replaced).
    pub stderr: String,
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
            op: Op::Exec {
                argv: vec!["true".into()],
                timeout_secs: None,
            },
        };
        let line = to_line(&r);
        assert_eq!(line, "{\"id\":7,\"op\":\"exec\",\"argv\":[\"true\"]}\n");
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
            Reply::Exec(ExecResult {
                exit_code: 3,
                stdout: "a\n".into(),
                stderr: String::new(),
            }),
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
}
