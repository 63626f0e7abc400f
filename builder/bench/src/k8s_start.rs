//! `kimg bench k8s-start`: a Kubernetes cluster's cold start, milestone by milestone
//! (issue 14): etcd serving, the apiserver's port open, `/readyz`, each node
//! registered and Ready, the `default` service account, a first pod Running, each in
//! seconds from `kimg run`, for each cluster shape and each variant (kimg's defaults
//! next to what they replaced), run one after the other on the same machine, round
//! after round; then what the running cluster costs the host once idle (its QEMUs'
//! CPU over a minute), which every test against a cluster pays while it runs.
//!
//! Everything is asked inside vm-001 through the agent, with one curl per poll (one
//! TLS connection for every URL, as the cluster's admin: the curl `kimg run --wait`
//! uses, [`k8s::apiserver_curl`]): a kubectl start costs vm-001 seconds of CPU
//! under TCG, and the host may have no kubectl.

use super::{cpu_secs, median, qemu_pids, BenchError};
use kimg_cluster::accel::AccelChoice;
use kimg_cluster::{self as cluster, k8s, session, RunOptions};
use kimg_contract::k8s::{CONTROL_PLANE, DEFAULT_SA_PATH, READYZ_PATH};
use kimg_contract::service::ServiceState;
use kimg_contract::VmId;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const NAME: &str = "bench-k8s-start";
/// How often vm-001 is asked.
const POLL: Duration = Duration::from_secs(2);
/// The longest one request of a poll may take.
const REQUEST_MAX: Duration = Duration::from_secs(10);
/// The pod of the "first pod Running" milestone: the pause image, which every
/// release kimg builds with carries (containerd's sandbox image).
const POD: &str = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"bench-first"},
"spec":{"containers":[{"name":"c","image":"registry.k8s.io/pause:3.9","imagePullPolicy":"IfNotPresent"}]}}"#;

/// One way of starting the cluster.
#[derive(Debug, Clone)]
pub struct Variant {
    /// What it is, for the report.
    pub label: String,
    /// The image (`kimg build --k8s`, or with `--k8s-images-at-boot`).
    pub image: PathBuf,
    /// vm-001's vCPUs; `None`: kimg's default.
    pub vm001_cpus: Option<u32>,
}

/// Options of the suite.
#[derive(Debug, Clone)]
pub struct K8sStartOptions {
    /// (nodes, routers) of each cluster.
    pub shapes: Vec<(u16, u16)>,
    /// The variants, each run for every shape.
    pub variants: Vec<Variant>,
    /// Runs of each variant on each shape, the variants alternating.
    pub rounds: u32,
    /// Give up on a run after this long.
    pub limit: Duration,
    /// Accelerator.
    pub accel: AccelChoice,
    /// Runtime dir of the benchmark's clusters.
    pub runtime: PathBuf,
}

/// The milestones of one cold start, seconds from `kimg run` (None: not reached
/// within the limit).
#[derive(Debug, Clone, Serialize)]
pub struct ColdStart {
    /// The variant's label.
    pub variant: String,
    /// Nodes of the cluster.
    pub nodes: u16,
    /// Routers of the cluster.
    pub routers: u16,
    /// etcd's service ready on vm-001.
    pub etcd: Option<f64>,
    /// kube-apiserver's port open.
    pub apiserver_port: Option<f64>,
    /// `/readyz` answered ok.
    pub readyz: Option<f64>,
    /// Each node registered.
    pub registered: BTreeMap<String, f64>,
    /// Each node Ready.
    pub ready: BTreeMap<String, f64>,
    /// Every node Ready.
    pub all_ready: Option<f64>,
    /// The `default` service account exists (pods are admitted).
    pub default_sa: Option<f64>,
    /// A first pod Running.
    pub first_pod: Option<f64>,
    /// Seconds of CPU all the cluster's QEMUs used in [`IDLE_WINDOW`], [`SETTLE`]
    /// after the first pod ran (None: it never ran).
    pub idle_cpu: Option<f64>,
    /// The same for vm-001's QEMU alone.
    pub idle_cpu_vm001: Option<f64>,
}

/// How long the cluster runs before its idle cost is measured.
pub const SETTLE: Duration = Duration::from_secs(20);
/// How long the idle cost is measured.
pub const IDLE_WINDOW: Duration = Duration::from_secs(60);

/// Runs every variant on every shape; `log` gets one line per milestone. No
/// cluster is left running.
pub fn run(o: &K8sStartOptions, log: &dyn Fn(&str)) -> Result<Vec<ColdStart>, BenchError> {
    std::env::set_var("KIMG_RUNTIME_DIR", &o.runtime);
    let mut out = Vec::new();
    for &(nodes, routers) in &o.shapes {
        for round in 1..=o.rounds {
            for v in &o.variants {
                log(&format!(
                    "{nodes} nodes + {routers} routers, {} (round {round} of {})",
                    v.label, o.rounds
                ));
                let r = measure(o, v, nodes, routers, log);
                let _ = cluster::stop(NAME, Duration::from_secs(10));
                out.push(r?);
            }
        }
    }
    Ok(out)
}

/// Where the pod of [`POD`] is created.
const PODS_PATH: &str = "/api/v1/namespaces/default/pods";

/// The curl run in vm-001 on every poll: `/readyz`, the nodes, the service account
/// and the pod.
fn poll_argv() -> Vec<String> {
    get_argv(&[
        READYZ_PATH,
        NODES_PATH,
        DEFAULT_SA_PATH,
        &format!("{PODS_PATH}/bench-first"),
    ])
}

/// The nodes, as the API lists them.
pub(crate) const NODES_PATH: &str = "/api/v1/nodes";

/// One curl (in vm-001) that GETs every path, each answer followed by a line
/// `@@ CODE` for [`answers`].
pub(crate) fn get_argv(paths: &[&str]) -> Vec<String> {
    let mut argv = k8s::apiserver_curl(REQUEST_MAX);
    argv.extend(["-w".into(), "\n@@ %{http_code}\n".into()]);
    argv.extend(paths.iter().map(|p| k8s::apiserver_url(p)));
    argv
}

/// Creates the pod (an answer 201, or 409 if an earlier try got through).
fn create_pod_argv() -> Vec<String> {
    let mut argv = k8s::apiserver_curl(REQUEST_MAX);
    for a in [
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        POD,
    ] {
        argv.push(a.into());
    }
    argv.push(k8s::apiserver_url(PODS_PATH));
    argv
}

/// The answers of one poll: (body, HTTP code) per URL, in order.
pub(crate) fn answers(out: &str) -> Vec<(String, u16)> {
    let mut v = Vec::new();
    let mut body = String::new();
    for line in out.lines() {
        match line.strip_prefix("@@ ") {
            Some(code) => v.push((std::mem::take(&mut body), code.trim().parse().unwrap_or(0))),
            None => {
                body.push_str(line);
                body.push('\n');
            }
        }
    }
    v
}

/// (name, Ready) of each node in a `/api/v1/nodes` answer.
pub(crate) fn nodes_of(json: &str) -> Vec<(String, bool)> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    let items = v["items"].as_array().cloned().unwrap_or_default();
    items
        .iter()
        .map(|n| {
            let name = n["metadata"]["name"].as_str().unwrap_or("").to_string();
            let ready = n["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            (name, ready)
        })
        .collect()
}

fn measure(
    o: &K8sStartOptions,
    v: &Variant,
    nodes: u16,
    routers: u16,
    log: &dyn Fn(&str),
) -> Result<ColdStart, BenchError> {
    let mut r = ColdStart {
        variant: v.label.clone(),
        nodes,
        routers,
        etcd: None,
        apiserver_port: None,
        readyz: None,
        registered: BTreeMap::new(),
        ready: BTreeMap::new(),
        all_ready: None,
        default_sa: None,
        first_pod: None,
        idle_cpu: None,
        idle_cpu_vm001: None,
    };
    let t = Instant::now();
    cluster::run(
        &RunOptions {
            name: NAME.into(),
            image: v.image.clone(),
            nodes,
            routers,
            accel: o.accel,
            cpus_overrides: v
                .vm001_cpus
                .map(|c| vec![(CONTROL_PLANE, c)])
                .unwrap_or_default(),
            ..RunOptions::default()
        },
        &|_| {},
    )?;
    let mark = |what: &str, slot: &mut Option<f64>| {
        if slot.is_none() {
            let s = t.elapsed().as_secs_f64();
            *slot = Some(s);
            log(&format!("{s:7.1} s  {what}"));
        }
    };
    while t.elapsed() < o.limit && (r.first_pod.is_none() || r.all_ready.is_none()) {
        std::thread::sleep(POLL);
        if r.apiserver_port.is_none() {
            let Ok((_, vms)) = cluster::status(NAME) else {
                continue;
            };
            let state = |svc: &str| {
                vms.iter()
                    .filter(|s| s.vm == CONTROL_PLANE)
                    .filter_map(|s| s.agent.as_ref())
                    .flat_map(|a| a.services.iter())
                    .any(|s| s.name == svc && s.state == ServiceState::Ready)
            };
            if state("etcd") {
                mark("etcd serving", &mut r.etcd);
            }
            if state("kube-apiserver") {
                mark("apiserver port open", &mut r.apiserver_port);
            }
            continue;
        }
        let Ok(out) = session::exec(
            NAME,
            CONTROL_PLANE,
            poll_argv(),
            Some(Duration::from_secs(30)),
        ) else {
            continue;
        };
        let a = answers(&out.stdout);
        let [readyz, nodes_json, sa, pod] = a.as_slice() else {
            continue;
        };
        if readyz.1 == 200 {
            mark("apiserver /readyz", &mut r.readyz);
        }
        for (name, ready) in nodes_of(&nodes_json.0) {
            let s = t.elapsed().as_secs_f64();
            if !r.registered.contains_key(&name) {
                log(&format!("{s:7.1} s  {name} registered"));
                r.registered.insert(name.clone(), s);
            }
            if ready && !r.ready.contains_key(&name) {
                log(&format!("{s:7.1} s  {name} Ready"));
                r.ready.insert(name, s);
            }
        }
        if r.ready.len() == usize::from(nodes) {
            mark("every node Ready", &mut r.all_ready);
        }
        if sa.1 == 200 && r.default_sa.is_none() {
            mark("default service account", &mut r.default_sa);
        }
        if r.default_sa.is_some() && pod.1 == 404 {
            let _ = session::exec(
                NAME,
                CONTROL_PLANE,
                create_pod_argv(),
                Some(Duration::from_secs(30)),
            );
        }
        let phase: serde_json::Value = serde_json::from_str(&pod.0).unwrap_or_default();
        if phase["status"]["phase"] == "Running" {
            mark("first pod Running", &mut r.first_pod);
        }
    }
    if r.first_pod.is_some() {
        std::thread::sleep(SETTLE);
        let (all, vm001) = idle_cpu()?;
        log(&format!(
            "QEMU CPU over {} s idle: {all:.1} s in all, vm-001 {vm001:.1} s",
            IDLE_WINDOW.as_secs()
        ));
        r.idle_cpu = Some(all);
        r.idle_cpu_vm001 = Some(vm001);
    }
    Ok(r)
}

/// CPU seconds of every QEMU of the cluster, and of vm-001's, over [`IDLE_WINDOW`].
fn idle_cpu() -> Result<(f64, f64), BenchError> {
    let pids = qemu_pids(NAME)?;
    let before: Vec<f64> = pids.iter().map(|&(_, p)| cpu_secs(p)).collect();
    std::thread::sleep(IDLE_WINDOW);
    let used: Vec<(VmId, f64)> = pids
        .iter()
        .zip(before)
        .map(|(&(vm, p), b)| (vm, cpu_secs(p) - b))
        .collect();
    let all = used.iter().map(|u| u.1).sum();
    let vm001 = used
        .iter()
        .filter(|u| u.0 == CONTROL_PLANE)
        .map(|u| u.1)
        .sum();
    Ok((all, vm001))
}

/// The columns of a cold start's row, as [`ColdStart::figures`] gives them.
pub const COLUMNS: [&str; 9] = [
    "etcd",
    "port",
    "/readyz",
    "registered",
    "all Ready",
    "SA",
    "pod",
    "idle CPU",
    "vm-001",
];

impl ColdStart {
    /// Its figures in [`COLUMNS`]' order ("registered": the last node's).
    pub fn figures(&self) -> [Option<f64>; 9] {
        [
            self.etcd,
            self.apiserver_port,
            self.readyz,
            self.registered.values().copied().reduce(f64::max),
            self.all_ready,
            self.default_sa,
            self.first_pod,
            self.idle_cpu,
            self.idle_cpu_vm001,
        ]
    }

    /// NODES+ROUTERS.
    pub fn shape(&self) -> String {
        format!("{}+{}", self.nodes, self.routers)
    }
}

/// (shape, variant, figures) for each shape and variant, in the order of their first
/// run: each figure the median of the runs that reached it.
pub fn medians(starts: &[ColdStart]) -> Vec<(String, String, [Option<f64>; 9])> {
    let mut groups: Vec<(String, String)> = Vec::new();
    for s in starts {
        let key = (s.shape(), s.variant.clone());
        if !groups.contains(&key) {
            groups.push(key);
        }
    }
    groups
        .into_iter()
        .map(|(shape, variant)| {
            let runs: Vec<_> = starts
                .iter()
                .filter(|s| s.shape() == shape && s.variant == variant)
                .map(ColdStart::figures)
                .collect();
            let figures = std::array::from_fn(|i| {
                let xs: Vec<f64> = runs.iter().filter_map(|r| r[i]).collect();
                (!xs.is_empty()).then(|| median(&xs))
            });
            (shape, variant, figures)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poll_is_split_into_answers_and_nodes_are_read() {
        let out = "ok\n@@ 200\n{\"items\":[{\"metadata\":{\"name\":\"vm-001\"},\"status\":{\"conditions\":[{\"type\":\"Ready\",\"status\":\"True\"}]}},\
                   {\"metadata\":{\"name\":\"vm-002\"},\"status\":{\"conditions\":[{\"type\":\"Ready\",\"status\":\"False\"}]}}]}\n@@ 200\n\n@@ 404\n@@ 000\n";
        let a = answers(out);
        let codes: Vec<u16> = a.iter().map(|x| x.1).collect();
        assert_eq!(codes, [200, 200, 404, 0]);
        assert_eq!(a[0].0, "ok\n");
        assert_eq!(
            nodes_of(&a[1].0),
            [("vm-001".to_string(), true), ("vm-002".to_string(), false)]
        );
        assert!(nodes_of("not json").is_empty());
        // One curl asks every URL, each answer's code after it, as `answers` reads.
        let poll = poll_argv();
        assert_eq!(poll.iter().filter(|a| a.starts_with("https://")).count(), 4);
        assert!(poll.contains(&"\n@@ %{http_code}\n".to_string()));
        assert!(create_pod_argv()
            .iter()
            .any(|a| a.contains("\"name\":\"bench-first\"")));
    }

    fn start(variant: &str, nodes: u16, all_ready: Option<f64>, idle: f64) -> ColdStart {
        ColdStart {
            variant: variant.into(),
            nodes,
            routers: 1,
            etcd: Some(10.0),
            apiserver_port: None,
            readyz: None,
            registered: BTreeMap::from([("vm-001".into(), 30.0), ("vm-002".into(), 40.0)]),
            ready: BTreeMap::new(),
            all_ready,
            default_sa: None,
            first_pod: None,
            idle_cpu: Some(idle),
            idle_cpu_vm001: None,
        }
    }

    #[test]
    fn medians_group_by_shape_and_variant_over_the_runs_that_reached_each_figure() {
        let runs = [
            start("a", 2, Some(100.0), 50.0),
            start("b", 2, Some(200.0), 80.0),
            start("a", 2, None, 40.0),
            start("a", 2, Some(140.0), 60.0),
            start("a", 4, Some(300.0), 90.0),
        ];
        let m = medians(&runs);
        let keys: Vec<(&str, &str)> = m.iter().map(|g| (g.0.as_str(), g.1.as_str())).collect();
        assert_eq!(keys, [("2+1", "a"), ("2+1", "b"), ("4+1", "a")]);
        let col = |name: &str| COLUMNS.iter().position(|c| *c == name).unwrap();
        // The run that never got every node Ready counts for the others only.
        assert_eq!(m[0].2[col("all Ready")], Some(120.0));
        assert_eq!(m[0].2[col("idle CPU")], Some(50.0));
        assert_eq!(m[0].2[col("registered")], Some(40.0));
        assert_eq!(m[0].2[col("port")], None);
        assert_eq!(m[1].2[col("all Ready")], Some(200.0));
        assert_eq!(m[2].2[col("idle CPU")], Some(90.0));
    }
}
