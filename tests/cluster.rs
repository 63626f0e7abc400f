//! End-to-end: clusters with networks. One 4-node, 2-router, 1-tester cluster on the
//! default (vde_switch) backend proves the plan, the pings and a dead VM; a small
//! cluster on `--net bridge` proves the namespace path, replacement and clean stop.

use kimg_contract::agent::Status;
use kimg_contract::net::{self, Net};
use kimg_contract::VmId;
use kimg_tests::{image, text, TestCluster};
use std::path::Path;

/// Every VM's agent status, from `kimg status --json` (once every live VM answered).
fn statuses(c: &TestCluster) -> Vec<(String, String, Option<Status>)> {
    c.status_answered()["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|vm| {
            (
                vm["vm"].as_str().unwrap().to_string(),
                vm["state"].as_str().unwrap().to_string(),
                serde_json::from_value(vm["agent"].clone()).ok(),
            )
        })
        .collect()
}

fn run(c: &TestCluster, args: &[&str]) {
    let img = image();
    let mut all = vec!["--image", img.image.to_str().unwrap(), "--mem", "256"];
    all.extend_from_slice(args);
    all.push("--wait=240");
    let o = c.kimg("run", &all);
    assert!(o.status.success(), "kimg run {args:?}:\n{}", text(&o));
}

/// The plan's addresses of `vm`, as kimg-init reports them.
fn planned(vm: &str) -> Vec<String> {
    let id: VmId = vm.parse().unwrap();
    let mut out = Vec::new();
    for nic in net::nics(id) {
        out.push(format!("{}/{}", nic.ipv4, net::PREFIX4));
        out.push(format!("{}/{}", nic.ipv6, net::PREFIX6));
    }
    out
}

/// A shell function `p`: runs its arguments up to 3 times until they succeed. One
/// echo or neighbour query lost on a loaded host is no failed ping.
const RETRY: &str = "p() { for i in 1 2 3; do \"$@\" && return; done; return 1; }; ";

/// A shell loop pinging each target over IPv4 and IPv6; prints FAIL lines.
fn ping_script(targets: &[String]) -> String {
    format!(
        "{RETRY}for h in {}; do p ping -c1 -W3 $h >/dev/null || echo FAIL4 $h; \
         p ping6 -c1 -W3 $h >/dev/null || echo FAIL6 $h; done; echo done",
        targets.join(" ")
    )
}

#[test]
fn cluster_of_nodes_routers_and_a_tester_talks_and_survives_a_dead_vm() {
    let c = TestCluster::new("e2e-net");
    run(
        &c,
        &[
            "--nodes",
            "4",
            "--routers",
            "2",
            "--testers",
            "1",
            "--cpus",
            "vm-201=2",
            "--mem",
            "vm-202=320",
        ],
    );
    let nodes = ["vm-001", "vm-002", "vm-003", "vm-004"];
    let routers = ["vm-201", "vm-202"];

    // Hostname, role and addresses of every VM, as the plan says.
    let st = statuses(&c);
    let names: Vec<&str> = st.iter().map(|(vm, _, _)| vm.as_str()).collect();
    assert_eq!(
        names,
        ["vm-001", "vm-002", "vm-003", "vm-004", "vm-201", "vm-202", "vm-221"]
    );
    for (vm, state, agent) in &st {
        let a = agent
            .as_ref()
            .unwrap_or_else(|| panic!("{vm}: no agent status"));
        assert_eq!(state, "ready", "{vm}: {:?}", a.problems);
        assert_eq!(&a.hostname, vm);
        assert_eq!(a.role, vm.parse::<VmId>().unwrap().role());
        assert_eq!(a.addresses, planned(vm), "{vm}");
    }
    // Per-VM overrides reached the VMs (256 MiB gives a MemTotal below 256 MiB).
    let cpus = c.exec_ok("vm-201", &["grep", "-c", "^processor", "/proc/cpuinfo"]);
    assert_eq!(cpus.trim(), "2");
    let mem_kb = |vm: &str| -> u64 {
        let m = c.exec_ok(vm, &["head", "-1", "/proc/meminfo"]);
        m.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    assert!(mem_kb("vm-202") > 256 * 1024 && mem_kb("vm-201") < 256 * 1024);
    // Host CPU in proportion to vCPUs (cpu_share): vm-201's 2 at nice 0, the
    // 1-vCPU VMs at 3 (half the weight), on every QEMU thread and its session.
    // /proc/PID/stat's field 19, the 17th after comm's closing parenthesis.
    let nice = |stat: &Path| -> i32 {
        let s = std::fs::read_to_string(stat).unwrap();
        let f = s.rsplit_once(')').unwrap().1.split_whitespace().nth(16);
        f.unwrap().parse().unwrap()
    };
    for vm in &names {
        let pid = std::fs::read_to_string(c.runtime.path().join(format!("e2e-net/{vm}/qemu.pid")));
        let proc = Path::new("/proc").join(pid.unwrap().trim());
        let want = if *vm == "vm-201" { 0 } else { 3 };
        for task in std::fs::read_dir(proc.join("task")).unwrap() {
            assert_eq!(nice(&task.unwrap().path().join("stat")), want, "{vm}");
        }
        if let Ok(ag) = std::fs::read_to_string(proc.join("autogroup")) {
            assert!(
                ag.trim_end().ends_with(&format!("nice {want}")),
                "{vm}: {ag}"
            );
        }
    }
    let table = c.kimg("status", &[]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("192.168.1.0/24") && table.contains("fd00:6b69:0:2::/64"),
        "{table}"
    );

    // Every node reaches every other node and both routers, by name, v4 and v6.
    for n in nodes {
        let targets: Vec<String> = nodes
            .iter()
            .chain(routers.iter())
            .filter(|t| **t != n)
            .map(|t| t.to_string())
            .collect();
        let out = c.exec_ok(n, &["sh", "-c", &ping_script(&targets)]);
        assert_eq!(out.trim(), "done", "{n}: {out}");
    }
    // The tester reaches a node only through a router (TTL one lower on the way back).
    let ip4 = net::ipv4(Net::Cluster, "vm-003".parse().unwrap()).unwrap();
    let ip6 = net::ipv6(Net::Cluster, "vm-003".parse().unwrap());
    let out = c.exec_ok(
        "vm-221",
        &[
            "sh",
            "-c",
            &format!("{RETRY}p ping -c1 -W3 {ip4} && p ping6 -c1 -W3 {ip6}"),
        ],
    );
    assert_eq!(out.matches("ttl=63").count(), 2, "{out}");
    let hosts = c.exec_ok("vm-221", &["cat", "/etc/hosts"]);
    assert!(hosts.contains("192.168.1.4\tvm-004"), "{hosts}");

    // An image booted without kimg.hostname finds its number from its MAC: restart
    // vm-003's own QEMU command line without that key.
    let pidfile = c.runtime.path().join("e2e-net/vm-003/qemu.pid");
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    let argv: Vec<String> = std::fs::read(format!("/proc/{}/cmdline", pid.trim()))
        .unwrap()
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .map(|a| a.replace(" kimg.hostname=vm-003", ""))
        .collect();
    // The SMBIOS OEM string (for UEFI boots) carries the hostname too: drop it.
    let argv: Vec<String> = argv
        .iter()
        .enumerate()
        .filter(|(i, a)| !(a.as_str() == "-smbios" || (*i > 0 && argv[i - 1] == "-smbios")))
        .map(|(_, a)| a.clone())
        .collect();
    assert!(
        argv.iter().any(|a| a.contains("kimg.nodes=4"))
            && !argv.iter().any(|a| a.contains("kimg.hostname"))
    );
    kill9(pid.trim());
    let o = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(240);
    let agent = loop {
        let st = statuses(&c);
        if let Some((_, state, Some(a))) = st.iter().find(|(vm, _, _)| vm == "vm-003") {
            if state != "booting" {
                break a.clone();
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "vm-003 did not come back"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    assert_eq!(agent.hostname, "vm-003", "{:?}", agent.problems);
    assert!(agent.problems.is_empty(), "{:?}", agent.problems);
    assert_eq!(agent.addresses, planned("vm-003"));
    let out = c.exec_ok("vm-003", &["sh", "-c", &ping_script(&["vm-001".into()])]);
    assert_eq!(out.trim(), "done", "{out}");

    // Kill one QEMU: it shows dead with console lines, the others still answer.
    let pidfile = c.runtime.path().join("e2e-net/vm-004/qemu.pid");
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    kill9(pid.trim());
    let st = statuses(&c);
    for (vm, state, _) in &st {
        let want = if vm == "vm-004" { "dead" } else { "ready" };
        assert_eq!(state, want, "{vm}");
    }
    let o = c.kimg("status", &[]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("| kimg-init: ready"),
        "{}",
        text(&o)
    );
    for vm in ["vm-001", "vm-201", "vm-221"] {
        assert_eq!(c.exec_ok(vm, &["hostname"]).trim(), vm);
    }
    let o = c.kimg("logs", &["vm-004"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("ready in"),
        "{}",
        text(&o)
    );

    // Scale in the dead VM, scale out a new node: it joins the network.
    let o = c.kimg("scalein", &["vm-004", "--grace", "2"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = c.kimg("scaleout", &["vm-005", "--wait=240"]);
    assert!(o.status.success(), "{}", text(&o));
    let st = statuses(&c);
    let names: Vec<&str> = st.iter().map(|(vm, _, _)| vm.as_str()).collect();
    assert_eq!(
        names,
        ["vm-001", "vm-002", "vm-003", "vm-005", "vm-201", "vm-202", "vm-221"]
    );
    let out = c.exec_ok(
        "vm-005",
        &[
            "sh",
            "-c",
            &ping_script(&["vm-001".into(), "vm-201".into()]),
        ],
    );
    assert_eq!(out.trim(), "done", "vm-005: {out}");

    let o = c.kimg("stop", &["--grace", "10"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(c.qemu_pids().is_empty());
    assert_eq!(vde_switches(c.runtime.path()), Vec::<u32>::new());
}

/// Live (non-zombie) vde_switch processes whose command line mentions `runtime`.
fn vde_switches(runtime: &Path) -> Vec<u32> {
    let needle = runtime.to_string_lossy().into_owned();
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).starts_with("vde_switch")
            && String::from_utf8_lossy(&cmd).contains(&needle)
            && kimg_cluster::alive(pid as i32)
        {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn bridge_backend_in_a_namespace_replaces_and_stops_cleanly() {
    if !nix_is_root() {
        eprintln!("skipped: --net bridge needs root");
        return;
    }
    let c = TestCluster::new("e2e-br");
    let ns = Path::new("/run/netns/kimg-e2e-br");
    run(&c, &["--net", "bridge", "--nodes", "1", "--routers", "1"]);
    assert!(ns.exists());
    let first = c.qemu_pids();
    assert_eq!(first.len(), 2);
    // Same name while it runs: the old cluster goes, a new one comes up.
    run(&c, &["--net", "bridge", "--nodes", "2", "--routers", "1"]);
    let second = c.qemu_pids();
    assert_eq!(second.len(), 3, "{second:?}");
    assert!(
        first.iter().all(|p| !second.contains(p)),
        "{first:?} {second:?}"
    );
    let out = c.exec_ok(
        "vm-001",
        &[
            "sh",
            "-c",
            &ping_script(&["vm-002".into(), "vm-201".into()]),
        ],
    );
    assert_eq!(out.trim(), "done", "{out}");
    let o = c.kimg("stop", &["--grace", "10"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(c.qemu_pids().is_empty());
    assert!(!ns.exists(), "namespace left behind");
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

/// SIGKILLs a process and waits until it is gone or a zombie.
fn kill9(pid: &str) {
    let k = std::process::Command::new("kill")
        .args(["-9", pid])
        .status()
        .unwrap();
    assert!(k.success());
    while kimg_cluster::alive(pid.parse().unwrap()) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
