//! `kimg kubectl`: kubectl against a Kubernetes cluster, with no kubeconfig to find.

use anyhow::Context;
use kimg_cluster as cluster;
use kimg_contract::VmId;
use std::io::Write;
use std::process::{Command, ExitCode};

/// Run kubectl against a Kubernetes cluster (an image built with `kimg build --k8s`).
///
/// With a kubectl on this host's PATH it runs here with the cluster's admin
/// kubeconfig (CLUSTERDIR/admin.kubeconfig, whose server is the host's forward to
/// vm-001's apiserver; `kimg status` prints its path). Without one, it runs the
/// image's kubectl on vm-001 through the agent (files named with -f must then be
/// on vm-001).
///
///   kimg kubectl get nodes -o wide
///   kimg kubectl --name k8s -- get pods -A
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
    let argv = std::iter::once("kubectl".to_string())
        .chain(a.args)
        .collect();
    let r = cluster::exec(&a.name, vm1, argv, None)?;
    std::io::stdout().write_all(r.stdout.as_bytes())?;
    std::io::stderr().write_all(r.stderr.as_bytes())?;
    Ok(ExitCode::from(u8::try_from(r.exit_code).unwrap_or(255)))
}
