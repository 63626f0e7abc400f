//! Service files: `/etc/kimg/services/NAME.toml`, from the image or any overlay.
//!
//! A service says what to run, on which roles or VMs, after which other services,
//! how readiness is seen and whether it is restarted. kimg-init starts the services
//! of its VM in dependency order and reports their [`ServiceStatus`] in the agent.
//!
//! ```toml
//! command = ["/usr/bin/containerd"]
//! roles = ["node"]
//! after = ["kimg-images"]
//! ready = { path = "/run/containerd/containerd.sock" }
//! restart = "always"
//! ```

use crate::{Role, VmId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Where kimg-init reads service files.
pub const SERVICES_DIR: &str = "/etc/kimg/services";
/// Where a service's stdout and stderr go: `/var/log/NAME.log`.
pub const LOG_DIR: &str = "/var/log";

/// One service file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Name; the file's stem when absent.
    #[serde(default)]
    pub name: String,
    /// Program and arguments.
    pub command: Vec<String>,
    /// Extra environment (PATH is set to the system's).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Roles it runs on; every role when empty.
    #[serde(default)]
    pub roles: Vec<Role>,
    /// VMs it runs on; every VM (of the roles) when empty.
    #[serde(default)]
    pub vms: Vec<VmId>,
    /// Services on the same VM that must be ready first.
    #[serde(default)]
    pub after: Vec<String>,
    /// How readiness is seen.
    #[serde(default)]
    pub ready: Ready,
    /// Seconds to become ready before the start counts as failed.
    #[serde(default = "default_ready_timeout")]
    pub ready_timeout_secs: u64,
    /// Restart policy.
    #[serde(default)]
    pub restart: Restart,
}

fn default_ready_timeout() -> u64 {
    60
}

/// How a service shows it is ready.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ready {
    /// As soon as it was started.
    #[default]
    Started,
    /// When this path (a socket or a file) exists.
    Path(String),
    /// When a TCP connect to this `host:port` succeeds.
    Tcp(String),
    /// When it exited with code 0 (one-shot setup steps).
    Exited,
}

/// When a service that stopped is started again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    /// Whenever it exits.
    Always,
    /// When it exits non-zero or is killed.
    #[default]
    OnFailure,
    /// Never.
    Never,
}

/// Where a service is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceState {
    /// Waiting for the services it starts after (or for a restart back-off).
    Waiting,
    /// Started, not yet ready.
    Starting,
    /// Ready.
    Ready,
    /// Exited with code 0 and is not restarted.
    Done,
    /// Failed and is not restarted (or a dependency failed).
    Failed,
}

/// What the agent reports per service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Service name.
    pub name: String,
    /// Its state.
    pub state: ServiceState,
    /// Pid of the running process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// How often it was restarted.
    #[serde(default)]
    pub restarts: u32,
    /// Exit code of the last run (128 + signal when killed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<i32>,
    /// Why it failed, for a human.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl ServiceSpec {
    /// Parses a service file; `stem` names it when it has no `name`.
    pub fn parse(stem: &str, text: &str) -> Result<ServiceSpec, String> {
        let mut spec: ServiceSpec = toml::from_str(text).map_err(|e| e.to_string())?;
        if spec.name.is_empty() {
            spec.name = stem.to_string();
        }
        if spec.command.is_empty() || spec.command[0].is_empty() {
            return Err("`command` must name a program".into());
        }
        if !spec
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(format!(
                "name {:?}: use letters, digits, '-', '_' and '.'",
                spec.name
            ));
        }
        Ok(spec)
    }

    /// Whether this service runs on `vm`.
    pub fn runs_on(&self, vm: VmId) -> bool {
        (self.roles.is_empty() || self.roles.contains(&vm.role()))
            && (self.vms.is_empty() || self.vms.contains(&vm))
    }
}

/// Orders the services that run on one VM so each comes after what it starts after.
///
/// `after` names of services that exist but do not run here are ignored (the
/// control plane is on vm-001 only); a name no service file defines is an error, and
/// so is a cycle. `all` is every service file, `here` the indexes running on this VM.
pub fn start_order(all: &[ServiceSpec], here: &[usize]) -> Result<Vec<usize>, String> {
    let known: BTreeSet<&str> = all.iter().map(|s| s.name.as_str()).collect();
    let local: BTreeMap<&str, usize> = here.iter().map(|&i| (all[i].name.as_str(), i)).collect();
    for &i in here {
        for dep in &all[i].after {
            if !known.contains(dep.as_str()) {
                return Err(format!(
                    "service {}: `after` names unknown service {dep:?}",
                    all[i].name
                ));
            }
        }
    }
    let mut order = Vec::new();
    let mut state: BTreeMap<usize, bool> = BTreeMap::new(); // false = visiting, true = done
    fn visit(
        i: usize,
        all: &[ServiceSpec],
        local: &BTreeMap<&str, usize>,
        state: &mut BTreeMap<usize, bool>,
        order: &mut Vec<usize>,
        path: &mut Vec<String>,
    ) -> Result<(), String> {
        match state.get(&i) {
            Some(true) => return Ok(()),
            Some(false) => {
                path.push(all[i].name.clone());
                return Err(format!(
                    "services start after each other in a cycle: {}",
                    path.join(" -> ")
                ));
            }
            None => {}
        }
        state.insert(i, false);
        path.push(all[i].name.clone());
        for dep in &all[i].after {
            if let Some(&d) = local.get(dep.as_str()) {
                visit(d, all, local, state, order, path)?;
            }
        }
        path.pop();
        state.insert(i, true);
        order.push(i);
        Ok(())
    }
    // Visit in name order so the result does not depend on directory order.
    for &i in local.values() {
        visit(i, all, &local, &mut state, &mut order, &mut Vec::new())?;
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, text: &str) -> ServiceSpec {
        ServiceSpec::parse(name, text).unwrap()
    }

    #[test]
    fn parses_defaults_and_every_field() {
        let s = spec("containerd", "command = [\"/usr/bin/containerd\"]");
        assert_eq!(s.name, "containerd");
        assert_eq!(
            (s.ready.clone(), s.restart, s.ready_timeout_secs),
            (Ready::Started, Restart::OnFailure, 60)
        );
        let s = spec(
            "x",
            r#"
            name = "etcd"
            command = ["etcd", "--data-dir", "/var/lib/etcd"]
            env = { ETCD_NAME = "vm-001" }
            roles = ["node"]
            vms = ["vm-001"]
            after = ["net"]
            ready = { tcp = "127.0.0.1:2379" }
            ready_timeout_secs = 30
            restart = "always"
            "#,
        );
        assert_eq!(s.name, "etcd");
        assert_eq!(s.ready, Ready::Tcp("127.0.0.1:2379".into()));
        assert_eq!(s.restart, Restart::Always);
        assert!(s.runs_on("vm-001".parse().unwrap()));
        assert!(!s.runs_on("vm-002".parse().unwrap()));
        let p = spec(
            "p",
            "command = [\"a\"]\nready = { path = \"/run/a.sock\" }\nroles = [\"router\"]",
        );
        assert_eq!(p.ready, Ready::Path("/run/a.sock".into()));
        assert!(p.runs_on("vm-201".parse().unwrap()) && !p.runs_on("vm-001".parse().unwrap()));
    }

    #[test]
    fn bad_files_are_errors() {
        for bad in [
            "",
            "command = []",
            "command = [\"a\"]\nbogus = 1",
            "command = [\"a\"]\nroles = [\"king\"]",
            "command = [\"a\"]\nname = \"a/b\"",
            "command = [\"a\"]\nready = { smoke = \"x\" }",
        ] {
            assert!(ServiceSpec::parse("s", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn order_follows_after_ignores_remote_and_refuses_cycles_and_unknowns() {
        let all = vec![
            spec(
                "kubelet",
                "command = [\"k\"]\nafter = [\"containerd\", \"kube-apiserver\"]",
            ),
            spec("containerd", "command = [\"c\"]"),
            spec(
                "kube-apiserver",
                "command = [\"a\"]\nafter = [\"etcd\"]\nvms = [\"vm-001\"]",
            ),
            spec("etcd", "command = [\"e\"]\nvms = [\"vm-001\"]"),
        ];
        let names = |o: Vec<usize>| {
            o.into_iter()
                .map(|i| all[i].name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(start_order(&all, &[0, 1, 2, 3]).unwrap()),
            ["containerd", "etcd", "kube-apiserver", "kubelet"]
        );
        // On vm-002 the apiserver is elsewhere: kubelet only waits for containerd.
        assert_eq!(
            names(start_order(&all, &[0, 1]).unwrap()),
            ["containerd", "kubelet"]
        );
        let cyc = vec![
            spec("a", "command = [\"a\"]\nafter = [\"b\"]"),
            spec("b", "command = [\"b\"]\nafter = [\"a\"]"),
        ];
        assert!(start_order(&cyc, &[0, 1])
            .unwrap_err()
            .contains("a -> b -> a"));
        let unk = vec![spec("a", "command = [\"a\"]\nafter = [\"nope\"]")];
        assert!(start_order(&unk, &[0]).unwrap_err().contains("nope"));
    }

    #[test]
    fn status_json_is_compact() {
        let st = ServiceStatus {
            name: "a".into(),
            state: ServiceState::Ready,
            pid: Some(7),
            restarts: 0,
            last_exit: None,
            message: None,
        };
        assert_eq!(
            serde_json::to_string(&st).unwrap(),
            r#"{"name":"a","state":"ready","pid":7,"restarts":0}"#
        );
    }
}
