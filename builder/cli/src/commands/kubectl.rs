//! `kimg kubectl`: kubectl against a Kubernetes cluster, with no kubeconfig to find.

use anyhow::Context;
use kimg_cluster as cluster;
use kimg_contract::agent::ExecSpec;
use kimg_contract::VmId;
use std::io::IsTerminal;
use std::process::{Command, ExitCode};

/// Run kubectl against a Kubernetes cluster (an image built with `kimg build --k8s`).
///
/// With a kubectl on this host's PATH it runs here with the cluster's admin
/// kubeconfig (CLUSTERDIR/admin.kubeconfig, whose server is the host's forward to
/// vm-001's apiserver; `kimg status` prints its path). Without one (or with
/// --in-vm), it runs the image's kubectl on vm-001 through the agent, its output
/// streamed as it comes (`get pods -w` works; ctrl-c ends it); files named with -f
/// must then be on vm-001, or come on stdin: stdin is forwarded when it is not a
/// terminal (a pipe or a file; give </dev/null in a loop that reads its own stdin).
///
///   kimg kubectl get nodes -o wide
///   kimg kubectl --name k8s -- get pods -A
///   kimg kubectl --in-vm get pods -w
///   kimg kubectl --in-vm apply -f - < pod.yaml
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Cluster name.
    #[arg(long, default_value = super::DEFAULT_CLUSTER)]
    name: String,
    /// Run the image's kubectl on vm-001 even if this host has one.
    #[arg(long)]
    in_vm: bool,
    /// kubectl's arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    args: Vec<String>,
}

/// Runs `kimg kubectl`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let (dir, _) = cluster::load(&a.name)?;
    let kubeconfig = cluster::k8s::admin_kubeconfig(&dir).with_context(|| {
        format!(
            "cluster {:?} is not a Kubernetes cluster (no admin kubeconfig in {}); build its image with `kimg build --k8s`",
            a.name,
            dir.display()
        )
    })?;
    let host_kubectl = if a.in_vm {
        None
    } else {
        kimg_util::cmd::find("kubectl")
    };
    if let Some(kubectl) = host_kubectl {
        let status = Command::new(&kubectl)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(&a.args)
            .status()
            .with_context(|| format!("running {}", kubectl.display()))?;
        return Ok(ExitCode::from(
            status
                .code()
                .and_then(|c| u8::try_from(c).ok())
                .unwrap_or(1),
        ));
    }
    let vm1 = VmId::new(1).context("vm-001")?;
    let forward_stdin = !std::io::stdin().is_terminal();
    let spec = ExecSpec {
        argv: std::iter::once("kubectl".to_string())
            .chain(a.args)
            .collect(),
        tty: None,
        stdin: forward_stdin,
        login: false,
        timeout_secs: None,
    };
    let stdin: Option<Box<dyn std::io::Read + Send>> = if forward_stdin {
        Some(Box::new(std::io::stdin()))
    } else {
        None
    };
    let code = cluster::exec_stream(
        &a.name,
        vm1,
        spec,
        stdin,
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    )?;
    Ok(super::shell::exit_code(code))
}
