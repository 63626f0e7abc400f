//! The real Kubernetes release on the standard cluster, the way a network-function
//! developer uses it (xcluster's workflow): 4 nodes + 2 routers + 1 tester, every
//! node Ready, a pod on every node, pod to pod in IPv4 and IPv6 (TCP and UDP), node
//! and router to pod (UDP), ClusterIP Services
//! in IPv4, IPv6 and dual-stack from pods and from nodes, a NodePort and a ClusterIP
//! (by name) reached from the tester through a router and spread over all 4
//! backends (the seed's mconnect check), routers reaching pods, Service names
//! resolved by cluster DNS everywhere; then kube-proxy switched to ipvs on every node and
//! the Service checks again; then the cluster saved (`kimg snapshot save --stop`)
//! and a new one restored from it (`kimg run --from --wait`): every node Ready with
//! its kubelet alive again, and a new pod that reaches a pod on another node.
//! Before the ipvs switch, Kubernetes' own judge: upstream's sig-network
//! conformance tests (`e2e.test` of the same release; a CI-sized subset, see
//! [`E2E_FOCUS`]) against the cluster.
//!
//! Runs when `KIMG_K8S_RELEASE` names a release folder (`scripts/k8s-release`
//! builds v1.20.2 from Debian's source and prints it; `scripts/test` sets it):
//! `kimg build --k8s` pre-pulls the release's `images/` (pause, agnhost). Without it
//! the test says SKIPPED and passes: no release can be downloaded on the test
//! machines, and the build takes minutes.

use kimg_tests::{kimg_bin, text, TestCluster};
use kimg_util::civil::utc_now;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// How long each stage may take under TCG on a busy 2-core machine.
const STAGE: Duration = Duration::from_secs(900);
const NODES: [&str; 4] = ["vm-001", "vm-002", "vm-003", "vm-004"];
/// agnhost as the e2e suite names it (scripts/k8s-release builds it; its entrypoint
/// takes agnhost's subcommands as arguments), pre-pulled in the image.
const POD_IMAGE: &str = "k8s.gcr.io/e2e-test-images/agnhost:2.21";

/// The workload: agnhost netexec (answers `/hostname` with the pod's name) on every
/// node (one per node by anti-affinity), one Service per family policy, a headless
/// one and a NodePort.
fn manifest(image: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: echo}}
spec:
  replicas: 4
  selector: {{matchLabels: {{app: echo}}}}
  template:
    metadata: {{labels: {{app: echo}}}}
    spec:
      affinity:
        podAntiAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
          - labelSelector: {{matchLabels: {{app: echo}}}}
            topologyKey: kubernetes.io/hostname
      containers:
      - name: echo
        image: {image}
        imagePullPolicy: Never
        args: ["netexec", "--http-port=8080"]
---
apiVersion: v1
kind: Service
metadata: {{name: echo-v4}}
spec:
  selector: {{app: echo}}
  ports: [{{port: 80, targetPort: 8080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: echo-v6}}
spec:
  ipFamilyPolicy: SingleStack
  ipFamilies: [IPv6]
  selector: {{app: echo}}
  ports: [{{port: 80, targetPort: 8080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: echo-dual}}
spec:
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  selector: {{app: echo}}
  ports: [{{port: 80, targetPort: 8080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: echo-headless}}
spec:
  clusterIP: None
  selector: {{app: echo}}
  ports: [{{port: 8080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: echo-np}}
spec:
  type: NodePort
  selector: {{app: echo}}
  ports: [{{port: 80, targetPort: 8080, nodePort: 30080}}]
"#
    )
}

struct Kubectl {
    bin: PathBuf,
    kubeconfig: PathBuf,
}

impl Kubectl {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--request-timeout=120s")
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = tries(&|| self.run(args));
        assert!(o.status.success(), "kubectl {args:?}: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn jsonpath(&self, kind: &str, name: &str, path: &str) -> String {
        self.ok(&["get", kind, name, "-o", &format!("jsonpath={path}")])
    }
}

/// Polls `ok` until it holds; panics naming `what` after [`STAGE`], with the
/// cluster's [`diagnosis`]. Prints how long it took since `t0` (figures for the
/// reader, not asserted).
fn until(t0: Instant, c: &TestCluster, k: &Kubectl, what: &str, ok: &mut dyn FnMut() -> bool) {
    let deadline = Instant::now() + STAGE;
    while !ok() {
        if Instant::now() >= deadline {
            panic!("{what} not within {STAGE:?}\n{}", diagnosis(c, k));
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    eprintln!("{:7.1} s  {what}", t0.elapsed().as_secs_f64());
}

/// What a reader of a CI log needs when a stage times out, most telling last (CI
/// shows the tail): the host's load, memory and disk; kimg's view of the VMs; each
/// node's last kubelet and containerd errors (or why its VM does not answer); the
/// pods; each node's Ready condition with its reason.
fn diagnosis(c: &TestCluster, k: &Kubectl) -> String {
    let host = Command::new("sh")
        .args([
            "-c",
            "echo load $(cut -d' ' -f1-3 /proc/loadavg), \
             $(grep MemAvailable /proc/meminfo | tr -s ' '), \
             $(df -h --output=avail /tmp | tail -n 1 | tr -d ' ') free in /tmp",
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut d = format!("--- diagnosis\nhost: {host}");
    d += &brief(&c.kimg("status", &[]));
    for n in NODES {
        // Bounded: a VM that hangs must not hang the diagnosis.
        let o = Command::new("timeout")
            .arg("60")
            .arg(kimg_bin())
            .args(["exec", "--name", &c.name, n, "--"])
            .args([
                "sh",
                "-c",
                "grep -hE '^[EF][0-9]{4} ' /var/log/kubelet.log | tail -n 3 | cut -c1-300; \
                 grep -h 'level=error' /var/log/containerd.log | tail -n 2 | cut -c1-300",
            ])
            .env("KIMG_RUNTIME_DIR", c.runtime.path())
            .output()
            .unwrap();
        d += &format!("{n} errors:\n{}", brief(&o));
    }
    let pods = k.run(&["get", "pods", "-A", "-o", "wide", "--no-headers"]);
    d += &format!("pods:\n{}", brief(&pods));
    let ready = k.run(&[
        "get",
        "nodes",
        "-o",
        r#"jsonpath={range .items[*]}{.metadata.name} Ready={.status.conditions[?(@.type=="Ready")].status} {.status.conditions[?(@.type=="Ready")].reason}: {.status.conditions[?(@.type=="Ready")].message}{"\n"}{end}"#,
    ]);
    d += &format!("nodes:\n{}", brief(&ready));
    d
}

/// The nodes whose status is Ready (`kubectl get nodes`; none when it fails).
fn ready_nodes(k: &Kubectl) -> BTreeSet<String> {
    let o = k.run(&["get", "nodes", "--no-headers"]);
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (name, status) = (f.next()?, f.next()?);
            (status == "Ready").then(|| name.to_string())
        })
        .collect()
}

/// stdout and stderr, and the exit status when it failed: a diagnosis line each.
fn brief(o: &Output) -> String {
    let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
    s += &String::from_utf8_lossy(&o.stderr);
    if !o.status.success() {
        s += &format!("({})\n", o.status);
    }
    s
}

/// `get` until it succeeds: 6 failed tries 10 s apart, not counting the tries
/// kubectl could not get through the control plane (see [`control_plane_busy`]),
/// which are retried for up to [`STAGE`]. Under TCG on 2 cores the apiserver can
/// stop answering for minutes (CI saw a TLS handshake time out for over 2 min
/// after the switch to ipvs, before kimg gave vm-001's QEMU its larger share of
/// the host's CPU: `kimg_cluster::cpu_share`); that says nothing about the Service
/// or pod being checked. A wrong answer still fails the check.
fn tries(get: &dyn Fn() -> Output) -> Output {
    let deadline = Instant::now() + STAGE;
    let mut failed = 0;
    let mut busy_since: Option<Instant> = None;
    loop {
        let o = get();
        let busy = !o.status.success() && control_plane_busy(&o) && Instant::now() < deadline;
        if busy {
            busy_since.get_or_insert_with(Instant::now);
        } else if let Some(since) = busy_since.take() {
            eprintln!(
                "          (the control plane did not answer kubectl for {:.0} s)",
                since.elapsed().as_secs_f64()
            );
        }
        if o.status.success() {
            return o;
        }
        if !busy {
            failed += 1;
            if failed == 6 {
                return o;
            }
        }
        std::thread::sleep(Duration::from_secs(10));
    }
}

/// Whether kubectl failed on its way through the control plane rather than in
/// what it ran: the apiserver not answering, or the apiserver not reaching a
/// kubelet, or a kubelet's access check timing out ("Authorization error").
fn control_plane_busy(o: &Output) -> bool {
    let err = String::from_utf8_lossy(&o.stderr);
    [
        "Unable to connect to the server",
        "error dialing backend",
        "Authorization error",
        "Error from server (Timeout)",
        "Error from server (ServiceUnavailable)",
        "Error from server (InternalError)",
    ]
    .iter()
    .any(|m| err.contains(m))
}

/// `cmd` run in pod `pod`, through [`tries`].
fn in_pod(k: &Kubectl, pod: &str, cmd: &[&str]) -> Output {
    let argv: Vec<&str> = ["exec", pod, "--"].iter().chain(cmd).copied().collect();
    tries(&|| k.run(&argv))
}

/// `cmd` run on VM `vm`, through [`tries`].
fn on_vm(c: &TestCluster, vm: &str, cmd: &[&str]) -> Output {
    tries(&|| c.exec(vm, cmd))
}

/// `url` fetched from inside pod `pod` (busybox wget; its -T crashes, so timeout).
fn from_pod(k: &Kubectl, pod: &str, url: &str) -> Output {
    in_pod(k, pod, &["timeout", "20", "wget", "-q", "-O", "-", url])
}

/// `url` fetched with curl on VM `vm`.
fn from_vm(c: &TestCluster, vm: &str, url: &str) -> Output {
    on_vm(c, vm, &["curl", "-sS", "-g", "--max-time", "20", url])
}

/// agnhost netexec's UDP port: it answers the datagram `hostname` with its pod's name.
const UDP_PORT: u16 = 8081;

/// A shell command that asks the netexec at `ip` for its pod's name over UDP with
/// OpenBSD's nc (`nc` in the test image, `nc.openbsd` on the VMs: busybox's `nc`
/// has no `-u`): `-W 1` ends it at the answer, `-w 3` after 3 s of silence, and
/// then it fails, so that [`tries`] sends again (a datagram may be lost).
fn udp_hostname(nc: &str, ip: &str) -> String {
    format!(r#"a=$(echo hostname | {nc} -u -W 1 -w 3 {ip} {UDP_PORT}) && [ -n "$a" ] && echo "$a""#)
}

fn url(ip: &str, port: u16, path: &str) -> String {
    if ip.contains(':') {
        format!("http://[{ip}]:{port}{path}")
    } else {
        format!("http://{ip}:{port}{path}")
    }
}

/// The Services answer from a pod and from a node, in every family they have;
/// each answer is the name of one of the pods.
fn services_answer(c: &TestCluster, k: &Kubectl, client_pod: &str, pods: &BTreeSet<String>) {
    for svc in ["echo-v4", "echo-v6", "echo-dual"] {
        let ips = k.jsonpath("service", svc, "{.spec.clusterIPs[*]}");
        let ips: Vec<&str> = ips.split_whitespace().collect();
        let want = if svc == "echo-dual" { 2 } else { 1 };
        assert_eq!(ips.len(), want, "{svc}: {ips:?}");
        if svc == "echo-v6" || svc == "echo-dual" {
            assert!(
                ips.iter().any(|ip| ip.starts_with("fd00:10:96:")),
                "{svc}: {ips:?}"
            );
        }
        for ip in ips {
            let u = url(ip, 80, "/hostname");
            for (who, o) in [
                (client_pod.to_string(), from_pod(k, client_pod, &u)),
                ("vm-002".to_string(), from_vm(c, "vm-002", &u)),
            ] {
                let name = String::from_utf8_lossy(&o.stdout).trim().to_string();
                assert!(
                    o.status.success() && pods.contains(&name),
                    "{svc} {u} from {who}: {}",
                    text(&o)
                );
            }
        }
    }
}

/// The NodePort of vm-002 and, by its name, the ClusterIP of echo-v4.
const FROM_TESTER: [(&str, usize); 2] = [
    ("http://192.168.1.2:30080/hostname", 100),
    ("http://echo-v4.default.svc.cluster.local/hostname", 40),
];

/// Requests from the tester through a router, to each of [`FROM_TESTER`]: every
/// one answered, by all 4 pods (xcluster's `mconnect -nconn 100` check; the
/// routers send the service range to the nodes, the name comes from cluster DNS).
/// A request that fails is sent again, twice at most (curl's `--retry`): in ipvs
/// mode under TCG one of 100 once got no answer (cause not seen: `-s`) while the
/// rest were answered.
fn tester_spreads(c: &TestCluster, pods: &BTreeSet<String>) {
    for (url, n) in FROM_TESTER {
        let curl = "curl -s --max-time 10 --retry 2 --retry-all-errors";
        let script = format!("for i in $(seq {n}); do {curl} {url}; echo; done");
        let out = c.exec_ok("vm-221", &["sh", "-c", &script]);
        let answers: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(answers.len(), n, "answers from {url}:\n{out}");
        let seen: BTreeSet<String> = answers.iter().map(|s| s.to_string()).collect();
        assert_eq!(&seen, pods, "backends that answered {url}:\n{out}");
    }
}

/// Cluster DNS: Service names resolve in a pod (short, through its search path,
/// and in full) and on a node, a router and the tester (their resolv.conf names
/// vm-001's dnsmasq); the headless Service's name gives the 4 pods' addresses; an
/// ExternalName Service's name is a CNAME to echo-v4 (with its address) until the
/// Service is deleted.
fn names_resolve(
    t0: Instant,
    c: &TestCluster,
    k: &Kubectl,
    client_pod: &str,
    pods: &[(String, String, String, String)],
) {
    let names: BTreeSet<&str> = pods.iter().map(|p| p.0.as_str()).collect();
    let answered = |o: &Output| {
        o.status.success() && names.contains(String::from_utf8_lossy(&o.stdout).trim())
    };
    for u in [
        "http://echo-dual/hostname",
        "http://echo-v6.default.svc.cluster.local/hostname",
    ] {
        let o = from_pod(k, client_pod, u);
        assert!(answered(&o), "{u} from {client_pod}: {}", text(&o));
    }
    for vm in ["vm-002", "vm-201", "vm-221"] {
        let u = "http://echo-dual.default.svc.cluster.local/hostname";
        let o = from_vm(c, vm, u);
        assert!(answered(&o), "{u} from {vm}: {}", text(&o));
    }
    let want: BTreeSet<String> = pods.iter().map(|p| p.2.clone()).collect();
    let mut got = BTreeSet::new();
    until(
        t0,
        c,
        k,
        "headless Service name gives the 4 pods",
        &mut || {
            let o = c.exec(
                "vm-221",
                &["nslookup", "echo-headless.default.svc.cluster.local"],
            );
            // busybox: "Address: IP" per answer (the server's line has a tab).
            got = String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.strip_prefix("Address: "))
                .map(|a| a.trim().to_string())
                .collect();
            got == want
        },
    );

    let target = "echo-v4.default.svc.cluster.local";
    let ip = k.jsonpath("service", "echo-v4", "{.spec.clusterIP}");
    k.ok(&[
        "create",
        "service",
        "externalname",
        "echo-alias",
        "--external-name",
        target,
    ]);
    let alias = "echo-alias.default.svc.cluster.local";
    let mut out = String::new();
    until(
        t0,
        c,
        k,
        "ExternalName Service name gives a CNAME to echo-v4 and its address",
        &mut || {
            out = String::from_utf8_lossy(&c.exec("vm-221", &["nslookup", alias]).stdout)
                .into_owned();
            out.contains(&format!("canonical name = {target}"))
                && out
                    .lines()
                    .any(|l| l.strip_prefix("Address: ").map(str::trim) == Some(ip.as_str()))
        },
    );
    k.ok(&["delete", "service", "echo-alias"]);
    until(
        t0,
        c,
        k,
        "the deleted ExternalName Service's name is gone",
        &mut || {
            // busybox prints "** server can't find NAME: NXDOMAIN".
            let o = text(&c.exec("vm-221", &["nslookup", alias]));
            !o.contains("canonical name") && o.contains("NXDOMAIN")
        },
    );
}

#[test]
fn k8s_real_standard_cluster_services_and_ipvs() {
    let Some(release) = std::env::var_os("KIMG_K8S_RELEASE").map(PathBuf::from) else {
        eprintln!(
            "SKIPPED: set KIMG_K8S_RELEASE to a release folder (R=$(scripts/k8s-release)) \
             to run the real Kubernetes test"
        );
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let b = Command::new(kimg_bin())
        .args(["build", "--k8s", "--k8s-release"])
        .arg(&release)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(b.status.success(), "kimg build --k8s:\n{}", text(&b));
    let kubectl_bin = ["kubernetes/server/bin/kubectl", "kubectl"]
        .iter()
        .map(|p| release.join(p))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("no kubectl in {release:?}"));

    let c = TestCluster::new("e2e-k8s-std");
    let t0 = Instant::now();
    let image = out.join("hd-k8s.img");
    // The VMs, then the control plane: the apiserver ready and the default service
    // account there (the `until` stages below have as long each).
    let wait = format!("--wait={}", STAGE.as_secs());
    let run = c.kimg(
        "run",
        &[
            "--image",
            image.to_str().unwrap(),
            "--nodes",
            "4",
            "--routers",
            "2",
            "--testers",
            "1",
            &wait,
        ],
    );
    assert!(run.status.success(), "kimg run:\n{}", text(&run));
    eprintln!(
        "{:7.1} s  kimg run --wait returned",
        t0.elapsed().as_secs_f64()
    );
    let k = Kubectl {
        bin: kubectl_bin.clone(),
        kubeconfig: c.runtime.path().join(&c.name).join("admin.kubeconfig"),
    };
    // `--wait` returned once the control plane takes pods: the apiserver ready and
    // the namespace's default service account there.
    assert_eq!(k.ok(&["get", "--raw=/readyz"]).trim(), "ok");
    assert_eq!(
        k.ok(&["get", "serviceaccount", "default", "-o", "name"])
            .trim(),
        "serviceaccount/default"
    );

    until(t0, &c, &k, "4 nodes Ready", &mut || {
        let ready = ready_nodes(&k);
        NODES.iter().all(|n| ready.contains(*n))
    });
    // kubectl on vm-001 needs no flags (root's kubeconfig is the admin one).
    let nodes = c.exec_ok("vm-001", &["kubectl", "get", "nodes"]);
    assert!(NODES.iter().all(|n| nodes.contains(n)), "{nodes}");

    let m = work.path().join("echo.yaml");
    std::fs::write(&m, manifest(POD_IMAGE)).unwrap();
    // Applying is idempotent: tried again while the apiserver is too slow to answer.
    until(t0, &c, &k, "workload applied", &mut || {
        k.run(&["apply", "-f", m.to_str().unwrap()])
            .status
            .success()
    });
    let mut pods: Vec<(String, String, String, String)> = Vec::new();
    until(t0, &c, &k, "4 echo pods Running, one per node", &mut || {
        let o = k.run(&[
            "get",
            "pods",
            "-l",
            "app=echo",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.spec.nodeName} {.status.phase} {.status.podIPs[*].ip}{\"\\n\"}{end}",
        ]);
        pods = String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() == 5 && f[2] == "Running")
                    .then(|| (f[0].into(), f[1].into(), f[3].into(), f[4].into()))
            })
            .collect();
        let on: BTreeSet<&str> = pods.iter().map(|p| p.1.as_str()).collect();
        pods.len() == 4 && on.len() == 4
    });
    let names: BTreeSet<String> = pods.iter().map(|p| p.0.clone()).collect();
    let (client, _, _, _) = pods.iter().find(|p| p.1 == "vm-001").unwrap().clone();

    // Pod to pod across nodes, both families; a router reaches every pod.
    for (name, node, ip4, ip6) in &pods {
        assert!(
            ip4.starts_with("10.244.") && ip6.starts_with("fd00:10:244:"),
            "{name}: {ip4} {ip6}"
        );
        // Pod to pod over TCP, then UDP from a pod, a node and a router (upstream's
        // "Networking Granular Checks" do pod and node with pods of their own: too
        // slow for CI, see E2E_FOCUS).
        for ip in [ip4, ip6] {
            let o = from_pod(&k, &client, &url(ip, 8080, "/hostname"));
            assert!(
                o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == name,
                "{client} -> {name} on {node} at {ip}: {}",
                text(&o)
            );
            let (in_image, on_vms) = (udp_hostname("nc", ip), udp_hostname("nc.openbsd", ip));
            for (who, o) in [
                (
                    client.as_str(),
                    in_pod(&k, &client, &["sh", "-c", &in_image]),
                ),
                ("vm-002", on_vm(&c, "vm-002", &["sh", "-c", &on_vms])),
                ("vm-201", on_vm(&c, "vm-201", &["sh", "-c", &on_vms])),
            ] {
                assert!(
                    o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == name,
                    "{who} -> {name} on {node} at {ip} udp/{UDP_PORT}: {}",
                    text(&o)
                );
            }
        }
        let o = from_vm(&c, "vm-201", &url(ip4, 8080, "/hostname"));
        assert!(
            o.status.success(),
            "vm-201 -> {name} at {ip4}: {}",
            text(&o)
        );
    }
    eprintln!(
        "{:7.1} s  pod to pod (v4, v6; TCP, UDP), node and router to pods (UDP)",
        t0.elapsed().as_secs_f64()
    );
    services_answer(&c, &k, &client, &names);
    tester_spreads(&c, &names);
    eprintln!("{:7.1} s  Services (iptables)", t0.elapsed().as_secs_f64());
    names_resolve(t0, &c, &k, &client, &pods);
    upstream_conformance(&release, &k, work.path());
    eprintln!(
        "{:7.1} s  upstream sig-network conformance",
        t0.elapsed().as_secs_f64()
    );

    // kube-proxy in ipvs mode: the mode file on every node, kube-proxy killed
    // (kimg-init restarts it, the wrapper reads the file).
    for n in NODES {
        c.exec_ok(
            n,
            &[
                "sh",
                "-c",
                "echo ipvs > /etc/kubernetes/kube-proxy-mode && killall kube-proxy",
            ],
        );
    }
    until(
        t0,
        &c,
        &k,
        "kube-proxy in ipvs mode on every node",
        &mut || {
            NODES.iter().all(|n| {
                c.exec(n, &["grep", "-q", ":7580", "/proc/net/ip_vs"])
                    .status
                    .success()
            })
        },
    );
    services_answer(&c, &k, &client, &names);
    tester_spreads(&c, &names);
    eprintln!("{:7.1} s  Services (ipvs)", t0.elapsed().as_secs_f64());

    restored_cluster_works(&c, &kubectl_bin, &pods, t0);
}

/// Issue 13 for real: `kimg snapshot save --stop` of the running cluster, `kimg run
/// --from` of a new one: every node Ready with its kubelet alive again (its Lease
/// renewed after the restore began: a restored Node object says Ready before any
/// kubelet runs), the apiserver, etcd and a kubelet the same processes as before
/// the save, and a new pod on vm-002 reaches the echo pod on vm-003.
fn restored_cluster_works(
    c: &TestCluster,
    kubectl_bin: &std::path::Path,
    pods: &[(String, String, String, String)],
    t0: Instant,
) {
    // The processes that must come back as they were, not restarted.
    let kept = [
        ("vm-001", "kube-apiserver"),
        ("vm-001", "etcd"),
        ("vm-002", "kubelet"),
    ];
    let pid = |c: &TestCluster, vm: &str, svc: &str| {
        c.wait_service(vm, svc, &["ready"], Duration::from_secs(60))["pid"].as_u64()
    };
    let pids: Vec<_> = kept.iter().map(|(vm, svc)| pid(c, vm, svc)).collect();
    // Snapshots go to a cache of the test's own, never the user's.
    let cache = tempfile::tempdir().unwrap();
    let save = Command::new(kimg_bin())
        .args(["snapshot", "save", "--name", &c.name, "std", "--stop"])
        .env("KIMG_RUNTIME_DIR", c.runtime.path())
        .env("KIMG_CACHE", cache.path())
        .output()
        .unwrap();
    assert!(save.status.success(), "snapshot save:\n{}", text(&save));
    eprintln!("{:7.1} s  snapshot saved", t0.elapsed().as_secs_f64());

    let r = TestCluster::new("e2e-k8s-restored");
    let since = utc_now();
    let wait = format!("--wait={}", STAGE.as_secs());
    let run = Command::new(kimg_bin())
        .args(["run", "--from", "std", "--name", &r.name, &wait])
        .env("KIMG_RUNTIME_DIR", r.runtime.path())
        .env("KIMG_CACHE", cache.path())
        .output()
        .unwrap();
    assert!(run.status.success(), "kimg run --from:\n{}", text(&run));
    eprintln!(
        "{:7.1} s  kimg run --from --wait returned",
        t0.elapsed().as_secs_f64()
    );
    let k = Kubectl {
        bin: kubectl_bin.to_path_buf(),
        kubeconfig: r.runtime.path().join(&r.name).join("admin.kubeconfig"),
    };
    until(
        t0,
        &r,
        &k,
        "restored: 4 nodes Ready, Leases renewed",
        &mut || {
            let leases = k.run(&[
                "get",
                "leases",
                "-n",
                "kube-node-lease",
                "-o",
                "jsonpath={range .items[*]}{.metadata.name} {.spec.renewTime}{\"\\n\"}{end}",
            ]);
            let leases = String::from_utf8_lossy(&leases.stdout).to_string();
            let ready = ready_nodes(&k);
            NODES.iter().all(|n| {
                ready.contains(*n)
                    && leases.lines().any(|l| {
                        l.split_once(' ').is_some_and(|(name, renew)| {
                            name == *n
                                && renew
                                    .get(..since.len())
                                    .is_some_and(|t| t >= since.as_str())
                        })
                    })
            })
        },
    );

    for ((vm, svc), before) in kept.iter().zip(&pids) {
        assert_eq!(
            &pid(&r, vm, svc),
            before,
            "restored: {vm} {svc} was restarted"
        );
    }

    let (target, _, ip4, _) = pods.iter().find(|p| p.1 == "vm-003").unwrap();
    let probe = work_file(
        "probe.yaml",
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: probe}}
spec:
  nodeName: vm-002
  containers:
  - name: probe
    image: {POD_IMAGE}
    imagePullPolicy: Never
    args: ["netexec", "--http-port=8080"]
"#
        ),
    );
    k.ok(&["apply", "-f", probe.1.to_str().unwrap()]);
    until(t0, &r, &k, "restored: a new pod Running", &mut || {
        k.run(&["get", "pod", "probe", "-o", "jsonpath={.status.phase}"])
            .stdout
            == b"Running"
    });
    let o = from_pod(&k, "probe", &url(ip4, 8080, "/hostname"));
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == target,
        "restored: probe on vm-002 -> {target} on vm-003 at {ip4}: {}",
        text(&o)
    );
    eprintln!(
        "{:7.1} s  restored: new pod reaches a pod on another node",
        t0.elapsed().as_secs_f64()
    );
}

/// Upstream's e2e suite in the release (`scripts/k8s-release --e2e`), as the
/// kubernetes-test tarball lays it out.
const E2E_TEST: &str = "kubernetes/test/bin/e2e.test";
/// The sig-network [Conformance] tests of v1.20.2 CI runs: the apiserver's own
/// Service and an Endpoints object's lifecycle (seconds each). The "Networking
/// Granular Checks" (UDP/HTTP pod to pod and node to pod) pass here but each starts
/// 6 pods of its own: 400-620 s each on CI's loaded cluster, where one failed
/// (2026-11-30: its netserver pods were not Ready within the suite's timeout), so
/// the checks above do UDP with the echo pods instead. `KIMG_E2E_FOCUS` runs
/// others, such as all of them:
/// `KIMG_E2E_FOCUS='\[sig-network\].*\[Conformance\]'` (13 run, ~30 min).
const E2E_FOCUS: &str = r"\[sig-network\] Services should (provide secure master service|test the lifecycle of an Endpoint) .*\[Conformance\]";
/// Never run: the 8 DNS tests. They query with `dig` from the jessie-dnsutils
/// image, which kimg does not build, and ask for what kimg's cluster DNS does not
/// serve (SRV records, pod A records, ExternalName CNAMEs).
const E2E_SKIP: &str = r"\[sig-network\] DNS ";

/// How one test of the suite ended, from its JUnit report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Passed,
    Failed,
    Skipped,
}

/// The test cases of a ginkgo JUnit report: (name, outcome, seconds).
fn junit_cases(xml: &str) -> Vec<(String, Outcome, f64)> {
    let attr = |tag: &str, key: &str| -> Option<String> {
        let start = tag.find(&format!(" {key}=\""))? + key.len() + 3;
        let len = tag[start..].find('"')?;
        Some(
            tag[start..start + len]
                .replace("&#39;", "'")
                .replace("&#34;", "\"")
                .replace("&quot;", "\"")
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&amp;", "&"),
        )
    };
    xml.split("<testcase")
        .skip(1)
        .filter_map(|case| {
            let body = case.split("</testcase>").next().unwrap_or(case);
            let head = &body[..body.find('>')?];
            let outcome = if body.contains("<failure") || body.contains("<error") {
                Outcome::Failed
            } else if body.contains("<skipped") {
                Outcome::Skipped
            } else {
                Outcome::Passed
            };
            let secs = attr(head, "time")
                .and_then(|t| t.parse().ok())
                .unwrap_or(0.0);
            Some((attr(head, "name")?, outcome, secs))
        })
        .collect()
}

/// Runs the release's `e2e.test` on the host against the cluster (through the
/// admin kubeconfig's apiserver forward; the suite's `kubectl exec`s use the
/// release's kubectl) with [`E2E_FOCUS`] but [`E2E_SKIP`], and prints passed /
/// failed / skipped with each test's time. Every test it runs must pass, and at
/// least one must run. Says SKIPPED when the release has no `e2e.test`.
fn upstream_conformance(release: &std::path::Path, k: &Kubectl, work: &std::path::Path) {
    let e2e = release.join(E2E_TEST);
    if !e2e.is_file() {
        eprintln!("SKIPPED upstream conformance: no {E2E_TEST} in {release:?} (scripts/k8s-release --e2e)");
        return;
    }
    let focus = std::env::var("KIMG_E2E_FOCUS").unwrap_or_else(|_| E2E_FOCUS.into());
    let report = work.join("e2e-report");
    std::fs::create_dir_all(&report).unwrap();
    let t = Instant::now();
    let o = Command::new(&e2e)
        .arg("--kubeconfig")
        .arg(&k.kubeconfig)
        .arg("--kubectl-path")
        .arg(&k.bin)
        .arg("--report-dir")
        .arg(&report)
        .args([
            "--provider=skeleton",
            "--ginkgo.noColor",
            "--ginkgo.focus",
            &focus,
            "--ginkgo.skip",
            E2E_SKIP,
            // A hung suite ends with a panic and its goroutines, not CI's timeout.
            "-test.timeout=60m",
        ])
        .output()
        .unwrap();
    let wall = t.elapsed().as_secs_f64();
    let log = work.join("e2e.log");
    std::fs::write(&log, [&o.stdout[..], &o.stderr[..]].concat()).unwrap();
    let xml = std::fs::read_to_string(report.join("junit_01.xml")).unwrap_or_else(|e| {
        panic!(
            "e2e.test wrote no JUnit report ({e}); its output:\n{}",
            text(&o)
        )
    });
    let cases = junit_cases(&xml);
    // Every test of the suite is in the report; the ones not focused are skipped.
    let is_conformance = |n: &str| n.starts_with("[sig-network]") && n.contains("[Conformance]");
    let of = |want| -> Vec<&(String, Outcome, f64)> {
        cases
            .iter()
            .filter(|(n, o, _)| *o == want && (want != Outcome::Skipped || is_conformance(n)))
            .collect()
    };
    let (passed, failed, skipped) = (
        of(Outcome::Passed),
        of(Outcome::Failed),
        of(Outcome::Skipped),
    );
    for (name, outcome, secs) in passed.iter().chain(&failed) {
        eprintln!("  {outcome:?} {secs:6.1} s  {name}");
    }
    eprintln!(
        "upstream conformance (focus {focus:?}): {} passed, {} failed, {} sig-network conformance skipped, in {wall:.0} s",
        passed.len(),
        failed.len(),
        skipped.len()
    );
    let tail: String = {
        let all = String::from_utf8_lossy(&o.stdout);
        let lines: Vec<&str> = all.lines().collect();
        lines[lines.len().saturating_sub(80)..].join("\n")
    };
    assert!(
        failed.is_empty() && o.status.success(),
        "upstream conformance failed: {failed:#?}\nlast lines of e2e.test's output ({log:?}):\n{tail}"
    );
    assert!(
        !passed.is_empty(),
        "upstream conformance: no test ran (focus {focus:?}):\n{tail}"
    );
}

#[test]
fn junit_cases_reads_ginkgos_report() {
    let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
  <testsuite name="Kubernetes e2e suite" tests="3" failures="1" errors="0" time="90.5">
      <testcase name="[sig-network] Services should serve a basic endpoint from pods  [Conformance]" classname="Kubernetes e2e suite" time="61.25"></testcase>
      <testcase name="[sig-network] DNS should provide DNS for the cluster  [Conformance]" classname="Kubernetes e2e suite" time="29.1">
          <failure type="Failure">timed out &lt;x&gt;</failure>
          <system-out>log</system-out>
      </testcase>
      <testcase name="[sig-storage] it&#39;s &quot;skipped&quot; &amp; more" classname="Kubernetes e2e suite" time="0">
          <skipped></skipped>
      </testcase>
  </testsuite>"#;
    assert_eq!(
        junit_cases(xml),
        vec![
            (
                "[sig-network] Services should serve a basic endpoint from pods  [Conformance]"
                    .into(),
                Outcome::Passed,
                61.25
            ),
            (
                "[sig-network] DNS should provide DNS for the cluster  [Conformance]".into(),
                Outcome::Failed,
                29.1
            ),
            (
                r#"[sig-storage] it's "skipped" & more"#.into(),
                Outcome::Skipped,
                0.0
            ),
        ]
    );
    assert!(junit_cases("<testsuite></testsuite>").is_empty());
}

/// A file of the given text in a temp dir (kept alive by the returned handle).
fn work_file(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    (dir, p)
}
