//! `kimg status`: a table (or JSON) of a cluster's VMs.

use kimg_cluster as cluster;
use std::process::ExitCode;

/// Show each VM of a cluster: role, state (booting, ready, degraded, dead),
/// uptime, its QEMU's resident memory on the host, addresses, problems and overlays
/// ("at boot" or "applied at"), under the cluster's network plan; then the QEMUs'
/// memory in all, resident and proportional (pages the VMs share, counted once). A
/// dead VM shows its last console lines. VMs a killed `kimg snapshot save` left
/// paused are resumed first.
#[derive(clap::Args)]
pub struct Args {
    /// Cluster name.
    #[arg(long, default_value = super::DEFAULT_CLUSTER)]
    name: String,
    /// Print JSON for scripts.
    #[arg(long)]
    json: bool,
}

/// Runs `kimg status`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    // VMs a killed `snapshot save` left paused would not answer: let them run.
    match cluster::snapshot::resume_abandoned(&a.name) {
        Ok(vms) if !vms.is_empty() => {
            let names: Vec<String> = vms.iter().map(|v| v.to_string()).collect();
            eprintln!(
                "kimg status: resumed {} (left paused by a snapshot save that did not finish)",
                names.join(", ")
            );
        }
        Ok(_) => {}
        Err(e) => eprintln!(
            "kimg status: paused VMs not resumed: {e} (try `kimg resume --name {}`)",
            a.name
        ),
    }
    let (state, vms) = cluster::status(&a.name)?;
    let kubeconfig = cluster::cluster_dir(&a.name)
        .ok()
        .and_then(|d| cluster::k8s::admin_kubeconfig(&d));
    if a.json {
        let out = serde_json::json!({ "name": state.name, "image": state.image, "accel": state.accel, "net": state.net, "size": state.size, "plan": kimg_contract::net::describe(&state.size), "admin_kubeconfig": kubeconfig, "restored_from": state.restored_from, "vms": vms });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "cluster {} ({}, image {})",
        state.name,
        state.accel.as_str(),
        state.image.display()
    );
    if let Some(snap) = &state.restored_from {
        println!("  restored from {snap}");
    }
    for line in kimg_contract::net::describe(&state.size) {
        println!("  {line}");
    }
    if let Some(k) = &kubeconfig {
        println!("  kubeconfig {} (or `kimg kubectl ...`)", k.display());
    }
    println!(
        "{:<8} {:<8} {:<9} {:>8} {:>8}  {:<44} PROBLEMS",
        "VM", "ROLE", "STATE", "UPTIME", "RSS", "ADDRESSES"
    );
    let total_kib: u64 = vms.iter().filter_map(|v| v.qemu_rss_kib).sum();
    for v in &vms {
        let uptime = v
            .agent
            .as_ref()
            .map_or("-".to_string(), |a| format!("{:.0}s", a.uptime_secs));
        let problems = v
            .agent
            .as_ref()
            .map_or(String::new(), |a| a.problems.join("; "));
        let addresses = v
            .agent
            .as_ref()
            .map_or(String::new(), |a| a.addresses.join(" "));
        let rss = v
            .qemu_rss_kib
            .map_or("-".to_string(), |k| format!("{}M", k / 1024));
        println!(
            "{:<8} {:<8} {:<9} {:>8} {:>8}  {:<44} {}",
            v.vm, v.role, v.state, uptime, rss, addresses, problems
        );
        for o in &v.overlays {
            println!("         overlay {} ({})", o.name, o.when);
        }
        for l in &v.last_console {
            println!("         | {l}");
        }
    }
    // Resident counts a page each QEMU maps, once per QEMU; proportional counts it
    // once in all, so the two differ by what the VMs share (KSM's merged pages).
    let pss_kib: u64 = vms.iter().filter_map(|v| v.qemu_pss_kib).sum();
    let ksm = match cluster::ksm::stats() {
        Some(k) if k.running => "on",
        Some(_) => "off",
        None => "not in this kernel",
    };
    println!(
        "QEMU memory: {} MiB resident in all, {} MiB proportional ({} VMs; KSM {ksm})",
        total_kib / 1024,
        pss_kib / 1024,
        vms.len()
    );
    Ok(ExitCode::SUCCESS)
}
