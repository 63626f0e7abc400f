//! The Kubernetes flavour's add-on: the cluster's PKI, each VM's share of it first on
//! its own cdrom (and kubelet credentials for nodes added later), vm-001's extra
//! NIC that forwards a host port on 127.0.0.1 to the apiserver, and `--wait`'s
//! control-plane check.

use crate::addon::{Addon, VmSize, BASE_SIZE};
use crate::error::ClusterError;
use crate::launch::RunEvent;
use crate::pki;
use crate::qemu::{GuestCode, Machine};
use crate::session;
use crate::state::ClusterState;
use kimg_contract::agent::ExecResult;
use kimg_contract::k8s::{
    self, ADMIN_CERT, ADMIN_KEY, APISERVER_PORT, CA_CERT, CONTROL_PLANE, DEFAULT_SA_PATH,
    READYZ_PATH,
};
use kimg_contract::{Role, VmId};
use kimg_image::overlay::Overlay;
use kimg_util::fs::PathContext;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long `--wait` without seconds waits for a Kubernetes cluster: a cold
/// control plane takes minutes under TCG on 2 cores (the image gives the apiserver
/// as long to start).
const READY_WAIT: Duration = Duration::from_secs(600);
/// How often the control plane is asked while it is not ready.
const POLL: Duration = Duration::from_secs(2);
/// The longest one request of a check may take: an apiserver starting on busy
/// cores answers slowly, and one slow answer is no failure.
const REQUEST_MAX: Duration = Duration::from_secs(20);
/// The least time one request of a check gets, even when that ends it past the
/// deadline: a TLS handshake under TCG on a loaded host can take a second, and a
/// last check cut shorter would call an apiserver that answers "not answering".
const REQUEST_MIN: Duration = Duration::from_secs(5);
/// curl's exit code when it cannot load its client certificate or key.
const CURL_CERT_PROBLEM: i32 = 58;
/// The first check of the control-plane wait, as progress lines name it.
const READYZ_CHECK: &str = "apiserver /readyz";
/// The second check, as progress lines name it.
const SA_CHECK: &str = "service account default/default";

/// The Kubernetes add-on.
pub struct K8s;

impl Addon for K8s {
    /// The control plane on vm-001 is the critical path of a cold start and runs
    /// half a dozen Go programs: two vCPUs there took one node from `kimg run` to
    /// Ready in 95 s instead of 134 s under TCG on an idle 2-core host. Nodes run
    /// kubelet, containerd and pods; routers and testers need nothing more.
    fn default_size(&self, vm: VmId) -> VmSize {
        match (vm.role(), vm.number()) {
            (Role::Node, 1) => VmSize {
                mem_mb: 2048,
                cpus: 2,
            },
            (Role::Node, _) => VmSize {
                mem_mb: 1536,
                cpus: 1,
            },
            _ => BASE_SIZE,
        }
    }

    /// A node's kubelet and containerd, and vm-001's etcd and control plane, are
    /// 100+ MB of Go: a 16 MB TCG code buffer would thrash. Routers and testers of
    /// the image run no Kubernetes code but are sized alike for simplicity.
    fn guest_code(&self) -> GuestCode {
        GuestCode::Big
    }

    fn takes_ready_cdrom(&self) -> bool {
        false
    }

    fn prepare(&self, state: &mut ClusterState) -> Result<(), ClusterError> {
        let port = free_port().with_path("127.0.0.1:0")?;
        state.api_port = Some(port);
        Ok(())
    }

    fn generate(&self, dir: &Path, state: &ClusterState) -> Result<(), ClusterError> {
        Ok(pki::generate(dir, &state.size, state.api_port)?)
    }

    fn add_vms(&self, dir: &Path, added: &[VmId]) -> Result<(), ClusterError> {
        let nodes: Vec<VmId> = added
            .iter()
            .copied()
            .filter(|vm| vm.role() == Role::Node)
            .collect();
        Ok(pki::add_nodes(dir, &nodes)?)
    }

    fn first_overlay(&self, dir: &Path, vm: VmId) -> Result<Option<Overlay>, ClusterError> {
        Ok(pki::vm_overlay(dir, vm)?)
    }

    fn own_cdrom(&self, vm: VmId) -> bool {
        !pki::files_for(vm).is_empty()
    }

    fn qemu_args(&self, vm: VmId, state: &ClusterState) -> Vec<String> {
        match state.api_port {
            Some(port) if vm.number() == 1 => api_forward_args(port, state.machine),
            _ => Vec::new(),
        }
    }

    fn ready_wait(&self) -> Duration {
        READY_WAIT
    }

    fn wait_ready(
        &self,
        name: &str,
        start: Instant,
        limit: Duration,
        on_event: &(dyn Fn(RunEvent) + Sync),
    ) -> Result<(), ClusterError> {
        wait_control_plane(name, start, limit, on_event)
    }
}

/// What keeps the control plane from being ready, as one check saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pending {
    /// The check did not run: vm-001's agent did not take or finish it.
    Agent(String),
    /// The apiserver did not answer (curl's error).
    Apiserver(String),
    /// `/readyz` answered with this HTTP status, not 200.
    Readyz(String),
    /// `/readyz` answered 200; the default service account's lookup this status.
    ServiceAccount(String),
}

impl Pending {
    /// The timeout error's text: what was not ready after `limit` in cluster
    /// `name`, and where to look.
    fn message(&self, name: &str, limit: Duration) -> String {
        let (vm, secs) = (CONTROL_PLANE, limit.as_secs());
        let logs = |service: &str| format!("see `kimg logs --name {name} {vm} {service}`");
        match self {
            Pending::Agent(why) => format!(
                "the control-plane check did not run on {vm} within {secs} s: {why}; see `kimg status --name {name}`"
            ),
            Pending::Apiserver(why) => format!(
                "apiserver {READYZ_PATH} not answering after {secs} s on {vm} ({why}); {}",
                logs("kube-apiserver")
            ),
            Pending::Readyz(code) => format!(
                "apiserver {READYZ_PATH} answering HTTP {code} after {secs} s on {vm}; {}",
                logs("kube-apiserver")
            ),
            Pending::ServiceAccount(code) if code == "404" => format!(
                "no service account default in namespace default after {secs} s on {vm} (the apiserver is ready; the controller-manager makes it); {}",
                logs("kube-controller-manager")
            ),
            Pending::ServiceAccount(code) => format!(
                "service account default/default answering HTTP {code} to the admin certificate after {secs} s on {vm}; {}",
                logs("kube-apiserver")
            ),
        }
    }
}

/// Waits until vm-001's apiserver answers `/readyz` and the `default` service account
/// exists (the apiserver refuses pods in namespace `default` until it does), asking
/// with curl on vm-001 through its agent every [`POLL`], until `limit` after `start`.
fn wait_control_plane(
    name: &str,
    start: Instant,
    limit: Duration,
    on_event: &(dyn Fn(RunEvent) + Sync),
) -> Result<(), ClusterError> {
    let vm = CONTROL_PLANE;
    let deadline = crate::process::deadline_from(start, limit);
    on_event(RunEvent::Waiting(
        vm,
        format!("waiting for the Kubernetes control plane: {READYZ_CHECK}, then {SA_CHECK}"),
    ));
    let mut readyz = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let pending = match check(name, left) {
            Ok(out) => parse_check(&out).err(),
            // Gone for good (stopped, scaled in): no waiting brings it back.
            Err(
                e @ (ClusterError::Dead(_)
                | ClusterError::NoSuchVm { .. }
                | ClusterError::NotFound(_)
                | ClusterError::ControlPlane(_)),
            ) => return Err(e),
            Err(e) => Some(Pending::Agent(e.to_string())),
        };
        if !readyz && matches!(pending, None | Some(Pending::ServiceAccount(_))) {
            readyz = true;
            on_event(RunEvent::Passed(
                vm,
                format!("{READYZ_CHECK} answered"),
                start.elapsed(),
            ));
        }
        let Some(pending) = pending else {
            on_event(RunEvent::Passed(
                vm,
                format!("{SA_CHECK} present"),
                start.elapsed(),
            ));
            return Ok(());
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ClusterError::ControlPlane(pending.message(name, limit)));
        }
        std::thread::sleep(left.min(POLL));
    }
}

/// One check on vm-001: curl asks `/readyz` and the default service account with
/// the admin certificate, each request at most `left` (within [`REQUEST_MIN`] and
/// [`REQUEST_MAX`]: a control plane already up passes after a wait the VMs used up),
/// and prints the two HTTP statuses (`000` for no answer).
fn check(name: &str, left: Duration) -> Result<ExecResult, ClusterError> {
    let max = left.clamp(REQUEST_MIN, REQUEST_MAX);
    let mut argv = apiserver_curl(max);
    argv.extend(["-w".into(), "%{http_code}\n".into()]);
    for path in [READYZ_PATH, DEFAULT_SA_PATH] {
        argv.extend(["-o".into(), "/dev/null".into(), apiserver_url(path)]);
    }
    // Two requests, and the session's own start, within the command's timeout.
    let timeout = 2 * max + Duration::from_secs(10);
    let out = session::exec(name, CONTROL_PLANE, argv, Some(timeout))?;
    if out.exit_code == CURL_CERT_PROBLEM {
        // No waiting fixes a missing key: say so at once.
        return Err(ClusterError::ControlPlane(format!(
            "curl on {CONTROL_PLANE} cannot use the admin certificate {} ({}); a cluster made by an older kimg lacks it: use `--wait=vms`, or start the cluster anew",
            k8s::pki_path(ADMIN_CERT),
            out.stderr.trim()
        )));
    }
    Ok(out)
}

/// curl on [`CONTROL_PLANE`] as the cluster's admin (the PKI overlay gives vm-001
/// the admin pair as files), each request at most `max`; add what to ask and the
/// URLs ([`apiserver_url`]). curl, not kubectl: a kubectl start costs seconds of
/// CPU under TCG.
pub fn apiserver_curl(max: Duration) -> Vec<String> {
    let mut argv: Vec<String> = ["curl", "-sS", "--max-time"].map(String::from).to_vec();
    argv.push(max.as_secs().max(1).to_string());
    for (flag, file) in [
        ("--cacert", CA_CERT),
        ("--cert", ADMIN_CERT),
        ("--key", ADMIN_KEY),
    ] {
        argv.extend([flag.to_string(), k8s::pki_path(file)]);
    }
    argv
}

/// The URL of the apiserver's `path` (`/readyz`, `/api/v1/...`) as seen on
/// [`CONTROL_PLANE`].
pub fn apiserver_url(path: &str) -> String {
    format!("https://127.0.0.1:{APISERVER_PORT}{path}")
}

/// The control plane's state from a [`check`]'s output: ready, or what is pending.
fn parse_check(out: &ExecResult) -> Result<(), Pending> {
    let mut codes = out.stdout.lines().map(str::trim);
    let readyz = codes.next().unwrap_or("000");
    let sa = codes.next().unwrap_or("000");
    match (readyz, sa) {
        ("200", "200") => Ok(()),
        ("200", code) => Err(Pending::ServiceAccount(code.to_string())),
        ("000", _) => Err(Pending::Apiserver(
            out.stderr
                .lines()
                .next()
                .unwrap_or("no answer")
                .trim()
                .to_string(),
        )),
        (code, _) => Err(Pending::Readyz(code.to_string())),
    }
}

/// The admin kubeconfig of the cluster in `dir` (its server is the host's forward
/// to vm-001's apiserver), if the cluster is a Kubernetes one.
pub fn admin_kubeconfig(dir: &Path) -> Option<std::path::PathBuf> {
    Some(dir.join(pki::ADMIN_KUBECONFIG)).filter(|p| p.is_file())
}

/// A free TCP port on 127.0.0.1 for the apiserver forward (the kernel picks it).
pub fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// QEMU arguments of vm-001's extra NIC: user-mode networking with no route out
/// (`restrict=on`) whose only use is `127.0.0.1:port` on the host forwarded to the
/// apiserver's port on the NIC's fixed guest address.
pub fn api_forward_args(port: u16, machine: Machine) -> Vec<String> {
    vec![
        "-netdev".into(),
        format!(
            "user,id=api,restrict=on,hostfwd=tcp:127.0.0.1:{port}-{}:{APISERVER_PORT}",
            k8s::API_FORWARD_ADDR4
        ),
        "-device".into(),
        format!(
            "{},netdev=api,mac={}",
            machine.virtio("net"),
            k8s::API_FORWARD_MAC
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(code: i32, stdout: &str, stderr: &str) -> ExecResult {
        ExecResult {
            exit_code: code,
            stdout: stdout.into(),
            stderr: stderr.into(),
        }
    }

    #[test]
    fn a_check_is_ready_only_with_readyz_and_the_service_account() {
        assert_eq!(parse_check(&out(0, "200\n200\n", "")), Ok(()));
        assert_eq!(
            parse_check(&out(0, "200\n404\n", "")),
            Err(Pending::ServiceAccount("404".into()))
        );
        // A service account that answers while /readyz fails is no ready apiserver.
        assert_eq!(
            parse_check(&out(0, "500\n200\n", "")),
            Err(Pending::Readyz("500".into()))
        );
        let refused = "curl: (7) Failed to connect to 127.0.0.1 port 6443: Connection refused\n";
        assert_eq!(
            parse_check(&out(7, "000\n000\n", &format!("{refused}{refused}"))),
            Err(Pending::Apiserver(refused.trim().into()))
        );
        assert_eq!(
            parse_check(&out(127, "", "")),
            Err(Pending::Apiserver("no answer".into()))
        );
    }

    #[test]
    fn the_timeout_names_what_was_not_ready_and_where_to_look() {
        let limit = Duration::from_secs(600);
        let down = Pending::Apiserver("curl: (7) refused".into()).message("k", limit);
        assert_eq!(
            down,
            "apiserver /readyz not answering after 600 s on vm-001 (curl: (7) refused); see `kimg logs --name k vm-001 kube-apiserver`"
        );
        let sa = Pending::ServiceAccount("404".into()).message("k", limit);
        assert!(
            sa.starts_with("no service account default in namespace default after 600 s on vm-001"),
            "{sa}"
        );
        assert!(
            sa.ends_with("`kimg logs --name k vm-001 kube-controller-manager`"),
            "{sa}"
        );
        let denied = Pending::ServiceAccount("403".into()).message("k", limit);
        assert!(
            denied.contains("HTTP 403 to the admin certificate"),
            "{denied}"
        );
    }
}
