//! The Kubernetes release's version and what depends on it: the one place where the
//! files of rootfs/k8s.toml get their version-dependent parts.
//!
//! rootfs/k8s.toml holds what every supported release accepts, in the components'
//! config files where they have one (KubeletConfiguration, KubeProxyConfiguration);
//! [`render`] adds what a release needs or refuses depending on its version:
//!
//! - before 1.21, the feature gate `IPv6DualStack` (dual-stack was alpha and off):
//!   `featureGates` in the config files, `--feature-gates` for kube-apiserver and
//!   kube-controller-manager;
//! - before 1.27, the kubelet's `--container-runtime=remote` and
//!   `--container-runtime-endpoint`;
//! - before 1.22, kube-apiserver's `--runtime-config` turning off the beta group
//!   versions that have a GA twin: a fifth less CPU for its start (OpenAPI and
//!   storage for each group), minutes under TCG. 1.22 removed most of them, and an
//!   apiserver refuses to start when told about a group version it does not have.
//!
//! From 1.21 dual-stack is on by default (the gate is gone in 1.25); from 1.27 the
//! kubelet has only the remote runtime and reads its endpoint from the
//! KubeletConfiguration (`containerRuntimeEndpoint`, which older kubelets ignore
//! with a warning), and `--container-runtime` is gone.

use crate::rootfs::RootfsManifest;
use kimg_contract::service::{ServiceSpec, SERVICES_DIR};
use std::fmt;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The oldest release whose flags kimg knows.
pub const OLDEST: KubeVersion = KubeVersion {
    major: 1,
    minor: 20,
};
/// containerd's CRI socket, as the kubelet names it.
const CRI_ENDPOINT: &str = "unix:///run/containerd/containerd.sock";
/// The component config files' kinds; each has a `featureGates` map.
const CONFIG_KINDS: &[&str] = &["KubeletConfiguration", "KubeProxyConfiguration"];
/// How long `kubelet --version` may take on the build host.
const VERSION_TIMEOUT: Duration = Duration::from_secs(30);

/// A release's major and minor version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KubeVersion {
    /// Major (1).
    pub major: u32,
    /// Minor.
    pub minor: u32,
}

impl fmt::Display for KubeVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}.{}", self.major, self.minor)
    }
}

impl KubeVersion {
    /// Parses `v1.20.2`, `Kubernetes v1.20.2` or `v1.31.0-rc.1` (the last word).
    pub fn parse(text: &str) -> Option<Self> {
        let word = text.split_whitespace().last()?;
        let mut parts = word.strip_prefix('v')?.split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        Some(Self { major, minor })
    }

    const fn at_least(self, major: u32, minor: u32) -> bool {
        self.major > major || (self.major == major && self.minor >= minor)
    }
}

/// The version a release's kubelet reports (`kubelet --version`, run on the build
/// host with a time limit), for releases without a `version` file.
pub fn kubelet_version(kubelet: &Path) -> Result<String, String> {
    let mut child = Command::new(kubelet)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{} --version: {e}", kubelet.display()))?;
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if start.elapsed() < VERSION_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{} --version did not finish within {VERSION_TIMEOUT:?}",
                    kubelet.display()
                ));
            }
            Err(e) => return Err(format!("{} --version: {e}", kubelet.display())),
        }
    };
    let mut out = String::new();
    if let Some(mut s) = child.stdout.take() {
        s.read_to_string(&mut out)
            .map_err(|e| format!("{} --version: {e}", kubelet.display()))?;
    }
    if !status.success() {
        return Err(format!("{} --version: {status}", kubelet.display()));
    }
    Ok(out
        .split_whitespace()
        .last()
        .unwrap_or_default()
        .to_string())
}

/// The feature gates release `v` needs turned on.
fn feature_gates(v: KubeVersion) -> &'static [&'static str] {
    if v.at_least(1, 21) {
        &[]
    } else {
        &["IPv6DualStack"]
    }
}

/// Beta group versions kube-apiserver 1.20 and 1.21 serve beside a GA version of
/// the same resources (`autoscaling/v2beta*` beside v1, `extensions/v1beta1`'s
/// Ingress beside networking v1): off, so nothing is served twice. Beta groups
/// with no GA twin there stay (batch/v1beta1 CronJob, policy/v1beta1
/// PodDisruptionBudget, discovery.k8s.io/v1beta1 EndpointSlice, which kube-proxy
/// reads, flowcontrol v1beta1).
const TWIN_BETAS: &[&str] = &[
    "admissionregistration.k8s.io/v1beta1",
    "apiextensions.k8s.io/v1beta1",
    "apiregistration.k8s.io/v1beta1",
    "authentication.k8s.io/v1beta1",
    "authorization.k8s.io/v1beta1",
    "autoscaling/v2beta1",
    "autoscaling/v2beta2",
    "certificates.k8s.io/v1beta1",
    "coordination.k8s.io/v1beta1",
    "events.k8s.io/v1beta1",
    "extensions/v1beta1",
    "networking.k8s.io/v1beta1",
    "node.k8s.io/v1beta1",
    "rbac.authorization.k8s.io/v1beta1",
    "scheduling.k8s.io/v1beta1",
    "storage.k8s.io/v1beta1",
];

/// The arguments `component` needs on release `v` beyond those in rootfs/k8s.toml
/// (components with a config file get their gates there, see [`config_additions`]).
pub fn extra_args(component: &str, v: KubeVersion) -> Vec<String> {
    let mut args = Vec::new();
    if matches!(component, "kube-apiserver" | "kube-controller-manager") {
        args.extend(
            feature_gates(v)
                .iter()
                .map(|g| format!("--feature-gates={g}=true")),
        );
    }
    if component == "kube-apiserver" && !v.at_least(1, 22) {
        let off: Vec<String> = TWIN_BETAS.iter().map(|g| format!("{g}=false")).collect();
        args.push(format!("--runtime-config={}", off.join(",")));
    }
    if component == "kubelet" && !v.at_least(1, 27) {
        args.push("--container-runtime=remote".to_string());
        args.push(format!("--container-runtime-endpoint={CRI_ENDPOINT}"));
    }
    args
}

/// YAML that release `v` needs appended to a component config file of `kind`.
fn config_additions(kind: &str, v: KubeVersion) -> String {
    let gates = feature_gates(v);
    if !CONFIG_KINDS.contains(&kind) || gates.is_empty() {
        return String::new();
    }
    let mut yaml = "featureGates:\n".to_string();
    for g in gates {
        yaml.push_str(&format!("  {g}: true\n"));
    }
    yaml
}

/// Renders `manifest` (rootfs/k8s.toml) for release `v`: [`extra_args`] appended to
/// the commands of the service files (`/etc/kimg/services/NAME.toml`),
/// [`config_additions`] to the component config files (found by their `kind:`).
pub fn render(manifest: &mut RootfsManifest, v: KubeVersion) -> Result<(), String> {
    for f in &mut manifest.files {
        if let Some(kind) = f.content.lines().find_map(|l| l.strip_prefix("kind: ")) {
            let more = config_additions(kind.trim(), v);
            f.content.push_str(&more);
            continue;
        }
        let Some(name) = f
            .path
            .strip_prefix(SERVICES_DIR)
            .and_then(|p| p.strip_prefix('/'))
            .and_then(|p| p.strip_suffix(".toml"))
        else {
            continue;
        };
        let args = extra_args(name, v);
        if args.is_empty() {
            continue;
        }
        let mut spec: ServiceSpec =
            toml::from_str(&f.content).map_err(|e| format!("{}: {e}", f.path))?;
        spec.command.extend(args);
        f.content = toml::to_string(&spec).map_err(|e| format!("{}: {e}", f.path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(v: &str) -> RootfsManifest {
        let mut m = RootfsManifest::parse("k8s.toml", crate::rootfs::K8S_TOML).unwrap();
        render(&mut m, KubeVersion::parse(v).unwrap()).unwrap();
        m
    }

    fn content<'a>(m: &'a RootfsManifest, path: &str) -> &'a str {
        &m.files.iter().find(|f| f.path == path).unwrap().content
    }

    fn command(m: &RootfsManifest, name: &str) -> Vec<String> {
        let text = content(m, &format!("{SERVICES_DIR}/{name}.toml"));
        toml::from_str::<ServiceSpec>(text).unwrap().command
    }

    /// The component config file of `kind`.
    fn config<'a>(m: &'a RootfsManifest, kind: &str) -> &'a str {
        let kind = format!("\nkind: {kind}\n");
        let f = m.files.iter().find(|f| f.content.contains(&kind));
        &f.unwrap().content
    }

    #[test]
    fn versions_parse_from_files_and_kubelet_output() {
        let v = |s| KubeVersion::parse(s);
        assert_eq!(
            v("v1.20.2\n"),
            Some(KubeVersion {
                major: 1,
                minor: 20
            })
        );
        assert_eq!(
            v("Kubernetes v1.31.0-rc.1"),
            Some(KubeVersion {
                major: 1,
                minor: 31
            })
        );
        assert_eq!(v("1.20.2"), None);
        assert_eq!(v("vX.Y"), None);
        assert!(v("v1.9.0").unwrap() < OLDEST && v("v2.0.0").unwrap() > OLDEST);
    }

    /// 1.20: dual-stack behind its gate on every component that has it (flag or
    /// config file), the kubelet told to use containerd by flags.
    #[test]
    fn v1_20_gets_the_dual_stack_gate_and_the_runtime_flags() {
        let m = rendered("v1.20.2");
        for c in ["kube-apiserver", "kube-controller-manager"] {
            assert!(
                command(&m, c).contains(&"--feature-gates=IPv6DualStack=true".into()),
                "{c}"
            );
        }
        for kind in CONFIG_KINDS {
            let c = config(&m, kind);
            assert!(
                c.ends_with("\nfeatureGates:\n  IPv6DualStack: true\n"),
                "{c}"
            );
            assert_eq!(c.matches("featureGates").count(), 1, "{c}");
        }
        for c in ["kube-scheduler", "kube-proxy", "kubelet"] {
            assert!(
                !command(&m, c).iter().any(|a| a.contains("feature-gates")),
                "{c}"
            );
        }
        let kubelet = command(&m, "kubelet");
        assert_eq!(kubelet[0], "/usr/lib/kimg/kubelet");
        assert!(kubelet.contains(&"--container-runtime=remote".into()));
        assert!(kubelet.contains(&format!("--container-runtime-endpoint={CRI_ENDPOINT}")));
        // The rest of each service is as written.
        let api = command(&m, "kube-apiserver");
        assert_eq!(api[api.len() - 3], "--enable-priority-and-fairness=false");
    }

    /// 1.27 and later: no gate (it is gone), no runtime flags (removed): every
    /// file as written in rootfs/k8s.toml.
    #[test]
    fn current_releases_get_nothing_they_would_refuse() {
        let plain = RootfsManifest::parse("k8s.toml", crate::rootfs::K8S_TOML).unwrap();
        for v in ["v1.27.0", "v1.31.1"] {
            let m = rendered(v);
            for (a, b) in plain.files.iter().zip(&m.files) {
                assert_eq!(a.content, b.content, "{v} {}", a.path);
            }
        }
        // 1.24-1.26: still the runtime flags (accepted, deprecated), no gate.
        let m = rendered("v1.25.3");
        let kubelet = command(&m, "kubelet");
        assert!(kubelet.contains(&"--container-runtime=remote".into()));
        assert!(!kubelet.iter().any(|a| a.starts_with("--feature-gates")));
        assert!(!content(&m, "/var/lib/kubelet/config.yaml").contains("featureGates"));
        assert!(!command(&m, "kube-apiserver")
            .iter()
            .any(|a| a.starts_with("--runtime-config")));
    }

    /// Before 1.22 the apiserver turns off the beta twins of GA groups, and only
    /// those: what a 1.20 component or user needs in beta stays on.
    #[test]
    fn v1_20_and_v1_21_turn_off_beta_twins_only() {
        for v in ["v1.20.2", "v1.21.14"] {
            let api = command(&rendered(v), "kube-apiserver");
            let rc: Vec<&String> = api
                .iter()
                .filter(|a| a.starts_with("--runtime-config="))
                .collect();
            assert_eq!(rc.len(), 1, "{v}: {api:?}");
            let off: Vec<&str> = rc[0]["--runtime-config=".len()..].split(',').collect();
            assert_eq!(off.len(), TWIN_BETAS.len(), "{v}");
            assert!(off.iter().all(|g| g.ends_with("=false")), "{off:?}");
            for keep in [
                "batch/v1beta1",
                "policy/v1beta1",
                "discovery.k8s.io/v1beta1",
            ] {
                assert!(!rc[0].contains(keep), "{v}: {keep} must stay on");
            }
        }
        let api = command(&rendered("v1.22.0"), "kube-apiserver");
        assert!(!api.iter().any(|a| a.starts_with("--runtime-config")));
    }
}
