//! End-to-end: the Kubernetes flavour. `kimg build --k8s` takes containerd, runc,
//! the CNI plugins and etcd from the host's Debian packages and the Kubernetes
//! binaries from a release; kimg-init starts the services by role.
//!
//! No Kubernetes release can be downloaded on the test machines: the release used
//! here is made of test doubles (tests/doubles/k8s-double.c, built static), which
//! record their arguments and stay up; the real release is run by tests/k8s_real.rs.

use kimg_tests::{kimg, kimg_bin, text, wait_until, TestCluster};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kimg_image::k8s::K8S_BINARIES;

/// A release folder of test doubles, laid out like kubernetes-server-linux-amd64.
fn double_release(dir: &Path) -> PathBuf {
    let bin = dir.join("kubernetes/server/bin");
    std::fs::create_dir_all(&bin).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("doubles/k8s-double.c");
    let out = dir.join("k8s-double");
    let st = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&out)
        .arg(&src)
        .args(["-lssl", "-lcrypto"])
        .status()
        .unwrap();
    assert!(
        st.success(),
        "gcc -static of the test double (apt-get install gcc libc6-dev libssl-dev)"
    );
    for name in K8S_BINARIES {
        std::fs::copy(&out, bin.join(name)).unwrap();
    }
    std::fs::write(dir.join("kubernetes/version"), "v1.31.0-test-double\n").unwrap();
    // A pre-pulled image, as scripts/k8s-release lays out the pause image.
    std::fs::create_dir_all(dir.join("images")).unwrap();
    image_tarball(&dir.join("images"), "pre");
    dir.to_path_buf()
}

/// A docker-archive image tarball (what `docker save` writes) with one layer, made
/// here because no image can be pulled on the test machines: `dir/NAME.tar` tagged
/// `kimg.test/NAME:1`.
fn image_tarball(dir: &Path, name: &str) -> PathBuf {
    fn sha(b: &[u8]) -> String {
        kimg_util::hash::sha256(b)
    }
    fn append(t: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1);
        h.set_cksum();
        t.append_data(&mut h, path, data).unwrap();
    }
    let mut layer = tar::Builder::new(Vec::new());
    append(&mut layer, "hello.txt", b"hello from an offline image\n");
    let layer = layer.into_inner().unwrap();
    let layer_sha = sha(&layer);
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":["sha256:{layer_sha}"]}}}}"#
    );
    let config_sha = sha(config.as_bytes());
    let manifest = format!(
        r#"[{{"Config":"{config_sha}.json","RepoTags":["kimg.test/{name}:1"],"Layers":["{layer_sha}/layer.tar"]}}]"#
    );
    let mut t = tar::Builder::new(Vec::new());
    append(&mut t, &format!("{config_sha}.json"), config.as_bytes());
    append(&mut t, &format!("{layer_sha}/layer.tar"), &layer);
    append(&mut t, "manifest.json", manifest.as_bytes());
    let path = dir.join(format!("{name}.tar"));
    std::fs::write(&path, t.into_inner().unwrap()).unwrap();
    path
}

/// An overlay archive carrying the image tarball and a test service.
fn k8s_test_overlay(dir: &Path) -> PathBuf {
    let image = std::fs::read(image_tarball(dir, "hello")).unwrap();
    let service = "command = [\"/bin/sh\", \"-c\", \"echo started; touch /run/probe.ready; exec sleep 100000\"]\n\
                   roles = [\"node\"]\nready = { path = \"/run/probe.ready\" }\nrestart = \"always\"\n";
    let mut t = tar::Builder::new(Vec::new());
    for (path, data, mode) in [
        ("var/lib/kimg/images/hello.tar", &image[..], 0o644),
        ("etc/kimg/services/probe.toml", service.as_bytes(), 0o644),
    ] {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_mtime(1);
        h.set_cksum();
        t.append_data(&mut h, path, data).unwrap();
    }
    let path = dir.join("k8s-test.tar");
    std::fs::write(&path, t.into_inner().unwrap()).unwrap();
    path
}

/// An overlay that holds the apiserver double's `/readyz` and its default service
/// account (tests/doubles/k8s-double.c) until a test removes its files.
fn hold_overlay(dir: &Path) -> PathBuf {
    let mut t = tar::Builder::new(Vec::new());
    for path in ["etc/kimg-double/hold-readyz", "etc/kimg-double/hold-sa"] {
        let mut h = tar::Header::new_ustar();
        h.set_size(0);
        h.set_mode(0o644);
        h.set_mtime(1);
        h.set_cksum();
        t.append_data(&mut h, path, &b""[..]).unwrap();
    }
    let path = dir.join("hold.tar");
    std::fs::write(&path, t.into_inner().unwrap()).unwrap();
    path
}

/// The HTTP status of the apiserver's `/readyz` as curl on vm-001 sees it (`000`:
/// no answer).
fn readyz_status(c: &TestCluster) -> String {
    let o = c.exec(
        "vm-001",
        &[
            "curl",
            "-s",
            "--max-time",
            "10",
            "--cacert",
            "/etc/kubernetes/pki/ca.crt",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "https://127.0.0.1:6443/readyz",
        ],
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A kimg process a test watches while it runs: its stderr collected as it comes;
/// killed if the test ends first.
struct Running {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Running {
    fn spawn(cmd: &mut Command) -> Running {
        use std::io::BufRead;
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let (pipe, text) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut t = text.lock().unwrap();
                t.push_str(&line);
                t.push('\n');
            }
        });
        Running { child, stderr }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `kimg run --wait` on a Kubernetes image returns once a deployment can be
/// applied: the apiserver double holds `/readyz`, then the default service account
/// (answered to the admin certificate alone), until the test removes a file, and
/// `kimg run` is still waiting, VMs ready, until the last one goes; it says on
/// stderr what it waits for and what passed. `--wait=vms` returns with the control
/// plane still held, and a bounded `--wait` on a held control plane fails naming
/// what was not ready and where to look.
#[test]
fn k8s_run_wait_returns_once_the_control_plane_takes_pods() {
    let work = tempfile::tempdir().unwrap();
    let release = double_release(&work.path().join("release"));
    let image = build_k8s(&release, work.path()).join("hd-k8s.img");
    let hold = hold_overlay(work.path());
    let args = |wait: &'static str| {
        [
            "--image",
            image.to_str().unwrap(),
            "--nodes",
            "1",
            "--routers",
            "0",
            "--mem",
            "512",
            wait,
            hold.to_str().unwrap(),
        ]
    };

    // --wait=vms: back once vm-001's agent is ready, the control plane held.
    let c = TestCluster::new("k8s-wait-vms");
    let t = Instant::now();
    let o = c.kimg("run", &args("--wait=vms:300"));
    let vms_secs = t.elapsed().as_secs_f64();
    assert!(o.status.success(), "kimg run --wait=vms:\n{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("vm-001 ready after") && !err.contains("control plane"),
        "{err}"
    );
    let at_return = readyz_status(&c);
    assert_ne!(at_return, "200", "/readyz answered though held");
    // Bounded, on a held control plane: the error says what and where. (A scaleout
    // of a VM the cluster has adds none and waits as `kimg run --wait` does.)
    wait_until(
        "the apiserver double up and held",
        Duration::from_secs(120),
        &mut || readyz_status(&c) == "500",
    );
    let o = c.kimg("scaleout", &["vm-001", "--wait=6"]);
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("apiserver /readyz answering HTTP 500 after 6 s on vm-001; see `kimg logs --name k8s-wait-vms vm-001 kube-apiserver`"),
        "{err}"
    );
    let logs = c.kimg("logs", &["vm-001", "kube-apiserver"]);
    assert!(logs.status.success(), "the hint fails: {}", text(&logs));
    drop(c);

    // --wait: still waiting with the VMs ready until each hold goes.
    let c = TestCluster::new("k8s-wait");
    let t = Instant::now();
    let mut run = Running::spawn(
        Command::new(kimg_bin())
            .args(["run", "--name", &c.name])
            .args(args("--wait=300"))
            .env("KIMG_RUNTIME_DIR", c.runtime.path()),
    );
    wait_until(
        "the control-plane wait",
        Duration::from_secs(300),
        &mut || {
            let err = run.stderr();
            assert!(run.running(), "kimg run --wait ended early:\n{err}");
            err.contains("vm-001 waiting for the Kubernetes control plane")
        },
    );
    let vms_ready_secs = t.elapsed().as_secs_f64();
    for (hold, passed) in [
        ("hold-readyz", "vm-001 apiserver /readyz answered after"),
        (
            "hold-sa",
            "vm-001 service account default/default present after",
        ),
    ] {
        // Several checks (one every 2 s) go by while the hold stands.
        std::thread::sleep(Duration::from_secs(6));
        assert!(
            run.running() && !run.stderr().contains(passed),
            "kimg run --wait did not wait for {hold}:\n{}",
            run.stderr()
        );
        c.exec_ok("vm-001", &["rm", &format!("/etc/kimg-double/{hold}")]);
        wait_until(passed, Duration::from_secs(60), &mut || {
            run.stderr().contains(passed)
        });
    }
    wait_until(
        "kimg run --wait returns",
        Duration::from_secs(60),
        &mut || !run.running(),
    );
    let status = run.child.wait().unwrap();
    let err = run.stderr();
    assert!(status.success(), "kimg run --wait: {status}\n{err}");
    let line = |s: &str| {
        err.find(s)
            .unwrap_or_else(|| panic!("{s:?} not in:\n{err}"))
    };
    assert!(
        line("vm-001 ready after") < line("waiting for the Kubernetes control plane")
            && line("/readyz answered") < line("default/default present"),
        "{err}"
    );
    // No answer at all (000: a curl a loaded host stalled past its 10 s) is asked
    // again; any answer must be 200.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut status = readyz_status(&c);
    while status == "000" && Instant::now() < deadline {
        status = readyz_status(&c);
    }
    assert_eq!(status, "200");
    eprintln!(
        "--wait=vms returned after {vms_secs:.1} s (/readyz {at_return}); --wait: VMs ready after {vms_ready_secs:.1} s, returned after {:.1} s, once both holds were gone",
        t.elapsed().as_secs_f64()
    );
}

/// `kimg build --k8s --k8s-release RELEASE --out WORK/out`, which must succeed;
/// returns the out dir.
fn build_k8s(release: &Path, work: &Path) -> PathBuf {
    let out = work.join("out");
    let o = Command::new(kimg_bin())
        .args(["build", "--k8s", "--k8s-release"])
        .arg(release)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "kimg build --k8s:\n{}", text(&o));
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn k8s_build_without_release_fails_before_any_work_naming_the_binaries() {
    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("o");
    let o = kimg(
        out.path(),
        &["build", "--k8s", "--out", target.to_str().unwrap()],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    for b in K8S_BINARIES {
        assert!(err.contains(b), "{b} not named: {err}");
    }
    assert!(!target.exists(), "work was done before the check");
}

/// A local release mirror: a tiny HTTP server on 127.0.0.1 serving `dir` (GET only,
/// 404 for what is not there) in dl.k8s.io's layout, until [`Mirror::stop`].
struct Mirror {
    base: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Mirror {
    fn serve(dir: PathBuf) -> Mirror {
        use std::io::{BufRead, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopped.load(std::sync::atomic::Ordering::SeqCst) {
                    return; // the listener goes with the thread: connections are refused
                }
                let Ok(mut conn) = conn else { continue };
                let mut r = std::io::BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                let _ = r.read_line(&mut line);
                while let Ok(n) = r.read_line(&mut String::new()) {
                    if n <= 2 {
                        break; // the blank line after the headers
                    }
                }
                let path = line.split_whitespace().nth(1).unwrap_or("/");
                let _ = match std::fs::read(dir.join(path.trim_start_matches('/'))) {
                    Ok(body) => conn
                        .write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                body.len()
                            )
                            .as_bytes(),
                        )
                        .and_then(|()| conn.write_all(&body)),
                    Err(_) => conn.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    ),
                };
            }
        });
        Mirror { base, stop, thread }
    }

    /// Stops the server and closes its port.
    fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(self.base.trim_start_matches("http://"));
        self.thread.join().unwrap();
    }
}

/// A stand-in for the official kubernetes-server-linux-amd64.tar.gz (300 MB, which
/// cannot be downloaded on the test machines): the test doubles' release (static
/// x86-64 ELF programs under kubernetes/server/bin, kubernetes/version) as a tarball
/// at `mirror/VERSION/`, with the `.sha512` beside it that dl.k8s.io publishes (the
/// hex digest alone), or `sums` instead. Returns the tarball's real sha512.
fn standin_release_on_mirror(
    release: &Path,
    mirror: &Path,
    version: &str,
    sums: Option<&str>,
) -> String {
    use sha2::Digest;
    let dir = mirror.join(version);
    std::fs::create_dir_all(&dir).unwrap();
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut t = tar::Builder::new(gz);
    t.append_dir_all("kubernetes", release.join("kubernetes"))
        .unwrap();
    let bytes = t.into_inner().unwrap().finish().unwrap();
    let name = "kubernetes-server-linux-amd64.tar.gz";
    std::fs::write(dir.join(name), &bytes).unwrap();
    let digest = hex::encode(sha2::Sha512::digest(&bytes));
    std::fs::write(dir.join(format!("{name}.sha512")), sums.unwrap_or(&digest)).unwrap();
    digest
}

/// `kimg build --k8s --k8s-version` against a local mirror serving a stand-in release
/// tarball (see [`standin_release_on_mirror`]): downloaded, verified and cached, then
/// built again with the mirror gone; a wrong `.sha512` and a missing release fail
/// before any work, naming the URL, and cache nothing. Builds only, no boot.
#[test]
fn k8s_version_downloads_standin_release_from_local_mirror_then_builds_offline() {
    let work = tempfile::tempdir().unwrap();
    let release = double_release(&work.path().join("release"));
    let mirror_dir = work.path().join("mirror");
    let digest = standin_release_on_mirror(&release, &mirror_dir, "v1.31.0", None);
    let wrong = "0".repeat(128);
    standin_release_on_mirror(&release, &mirror_dir, "v1.31.1", Some(&wrong));
    let cache = kimg_tests::own_cache();
    let releases = cache.path().join("k8s-releases");
    let build = |version: &str, out: &Path, mirror: &str| {
        Command::new(kimg_bin())
            .args(["build", "--k8s", "--k8s-version", version, "--out"])
            .arg(out)
            .env("KIMG_CACHE", cache.path())
            .env("KIMG_K8S_MIRROR", mirror)
            .output()
            .unwrap()
    };
    let mirror = Mirror::serve(mirror_dir);
    let base = mirror.base.clone();
    let url = format!("{base}/v1.31.0/kubernetes-server-linux-amd64.tar.gz");

    // Downloaded, verified, cached, built from (the flag wins over the variable).
    let out1 = work.path().join("out1");
    let o = Command::new(kimg_bin())
        .args([
            "build",
            "--k8s",
            "--k8s-version",
            "v1.31.0",
            "--k8s-mirror",
            &base,
        ])
        .arg("--out")
        .arg(&out1)
        .env("KIMG_CACHE", cache.path())
        .env("KIMG_K8S_MIRROR", "http://127.0.0.1:1")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "kimg build --k8s-version:\n{}",
        text(&o)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("{url} downloaded, sha512 {digest} verified")),
        "{err}"
    );
    let cached = releases.join("v1.31.0/kubernetes-server-linux-amd64.tar.gz");
    assert!(cached.is_file(), "{err}");
    let manifest = |out: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(out.join("hd-k8s.json")).unwrap()).unwrap()
    };
    let kubelet = |m: &serde_json::Value| {
        m["components"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "kubelet")
            .map(|c| c["version"].clone())
    };
    // The binaries are the downloaded tarball's (its version file).
    assert_eq!(
        kubelet(&manifest(&out1)),
        Some(serde_json::json!("v1.31.0-test-double"))
    );

    // The mirror gone, the cached release builds the same image.
    mirror.stop();
    let out2 = work.path().join("out2");
    let o = build("v1.31.0", &out2, &base);
    assert!(o.status.success(), "offline build:\n{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("(cached)"),
        "{}",
        text(&o)
    );
    assert_eq!(manifest(&out1), manifest(&out2));
    assert!(
        std::fs::read(out1.join("hd-k8s.img")).unwrap()
            == std::fs::read(out2.join("hd-k8s.img")).unwrap(),
        "same release, same image"
    );

    // A wrong .sha512: the URL and both sums named, nothing cached, no work done.
    let mirror = Mirror::serve(work.path().join("mirror"));
    let base = mirror.base.clone();
    let out3 = work.path().join("out3");
    let o = build("v1.31.1", &out3, &base);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!(
            "{base}/v1.31.1/kubernetes-server-linux-amd64.tar.gz: sha512 is {digest}, but {base}/v1.31.1/kubernetes-server-linux-amd64.tar.gz.sha512 says {wrong}; nothing was cached"
        )),
        "{err}"
    );
    assert!(!releases.join("v1.31.1").exists());
    assert!(!out3.exists(), "work was done before the check");

    // A release the mirror does not have: 404, named, with what to check.
    let o = build("v1.31.2", &out3, &base);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!(
            "{base}/v1.31.2/kubernetes-server-linux-amd64.tar.gz.sha512 is not there (HTTP 404)"
        )) && err.contains("--k8s-mirror"),
        "{err}"
    );
    assert!(!releases.join("v1.31.2").exists());
    mirror.stop();

    // --k8s-version and --k8s-release exclude each other.
    let o = Command::new(kimg_bin())
        .args([
            "build",
            "--k8s",
            "--k8s-version",
            "v1.31.0",
            "--k8s-release",
        ])
        .arg(&release)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cannot be used with"),
        "{}",
        text(&o)
    );
}

#[test]
fn k8s_image_runs_containerd_on_nodes_and_etcd_on_vm_001() {
    let work = tempfile::tempdir().unwrap();
    let release = double_release(&work.path().join("release"));
    let out = build_k8s(Path::new(&release), work.path());
    let image = out.join("hd-k8s.img");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("hd-k8s.json")).unwrap()).unwrap();
    assert_eq!(manifest["flavour"], "k8s");
    let comps = manifest["components"].as_array().unwrap();
    let version_of = |n: &str| {
        comps
            .iter()
            .find(|c| c["name"] == n)
            .map(|c| c["version"].clone())
            .unwrap_or_default()
    };
    assert!(
        version_of("containerd")
            .as_str()
            .unwrap_or("")
            .starts_with("containerd "),
        "{:?}",
        version_of("containerd")
    );
    assert!(version_of("etcd")
        .as_str()
        .unwrap_or("")
        .starts_with("etcd-server "));
    assert_eq!(version_of("kubelet"), "v1.31.0-test-double");
    // The release's images/ went into the image, imported at build time (the
    // tests run as root) into the image's containerd store.
    assert!(
        comps
            .iter()
            .any(|c| c["path"] == "containerd:k8s.io/pre.tar"),
        "{comps:?}"
    );
    // The image holds no private key (the PKI is generated per cluster).
    let bytes = std::fs::read(&image).unwrap();
    assert!(
        !contains(&bytes, b"PRIVATE KEY-----"),
        "a private key is in the image"
    );

    let c = TestCluster::new("e2e-k8s");
    let overlay = k8s_test_overlay(work.path());
    let run = c.kimg(
        "run",
        &[
            "--image",
            image.to_str().unwrap(),
            "--nodes",
            "2",
            "--routers",
            "1",
            "--mem",
            "512",
            "--wait=240",
            overlay.to_str().unwrap(),
        ],
    );
    assert!(run.status.success(), "kimg run:\n{}", text(&run));
    for vm in ["vm-001", "vm-002"] {
        c.wait_service(vm, "containerd", &["ready"], Duration::from_secs(120));
        let v = c.exec_ok(
            vm,
            &[
                "ctr",
                "--address",
                "/run/containerd/containerd.sock",
                "version",
            ],
        );
        assert!(v.contains("Server:") && v.contains("Version:"), "{vm}: {v}");
        c.wait_service(vm, "kimg-images", &["done"], Duration::from_secs(60));
        // The image tarballs from the overlay and the image (pre-pulled) were
        // imported before kubelet's turn.
        let images = c.exec_ok(
            vm,
            &[
                "ctr",
                "--address",
                "/run/containerd/containerd.sock",
                "-n",
                "k8s.io",
                "images",
                "ls",
                "-q",
            ],
        );
        let log = c.exec(
            vm,
            &[
                "sh",
                "-c",
                "cat /var/log/kimg-images.log; ls -l /var/lib/kimg/images",
            ],
        );
        assert!(
            images.contains("kimg.test/hello:1") && images.contains("kimg.test/pre:1"),
            "{vm}: {images}\nimport log:\n{}\nstatus: {}",
            text(&log),
            c.status_json()
        );
        // A service from an overlay: started by role, ready by its path, logged.
        let probe = c.wait_service(vm, "probe", &["ready"], Duration::from_secs(30));
        assert!(probe["pid"].as_u64().is_some(), "{probe}");
        assert_eq!(c.exec_ok(vm, &["cat", "/var/log/probe.log"]), "started\n");
        let logs = c.kimg("logs", &[vm, "probe"]);
        assert!(logs.status.success(), "{}", text(&logs));
        assert_eq!(String::from_utf8_lossy(&logs.stdout), "started\n");
    }
    // The router runs no Kubernetes component.
    let st = c.status_answered();
    let router = st["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vm"] == "vm-201")
        .unwrap()
        .clone();
    assert_eq!(router["state"], "ready", "{router}");
    assert_eq!(
        router["agent"]["services"],
        serde_json::json!([]),
        "{router}"
    );
    let logs = c.kimg("logs", &["vm-201", "containerd"]);
    assert!(!logs.status.success());
    assert!(
        String::from_utf8_lossy(&logs.stderr).contains("its services: none"),
        "{}",
        text(&logs)
    );
    let ps = c.exec_ok("vm-201", &["ps", "-o", "comm"]);
    assert!(!ps.contains("containerd") && !ps.contains("etcd"), "{ps}");
    // kubectl on the control plane finds the admin kubeconfig without flags.
    let kc = c.exec_ok(
        "vm-001",
        &[
            "sh",
            "-c",
            "readlink $HOME/.kube/config; test -s $HOME/.kube/config && echo present",
        ],
    );
    assert_eq!(kc, "/etc/kubernetes/admin.kubeconfig\npresent\n");
    // `kimg kubectl` runs the image's kubectl on vm-001 (the double records its
    // arguments), and `kimg status` names the host's admin kubeconfig.
    let k = c.kimg("kubectl", &["--in-vm", "get", "nodes", "-o", "wide"]);
    assert!(k.status.success(), "{}", text(&k));
    let args = c.exec_ok("vm-001", &["cat", "/var/log/kimg-doubles/kubectl.args"]);
    assert!(args.contains("get\nnodes\n-o\nwide\n--\n"), "{args}");
    kubectl_in_vm_streams_and_takes_stdin(&c);
    let st = c.kimg("status", &[]);
    assert!(
        String::from_utf8_lossy(&st.stdout).contains("admin.kubeconfig"),
        "{}",
        text(&st)
    );
    // etcd only on vm-001, and healthy.
    c.wait_service("vm-001", "etcd", &["ready"], Duration::from_secs(120));
    let h = c.exec(
        "vm-001",
        &[
            "etcdctl",
            // etcdctl's own 2 s dial and 5 s command limits are short under TCG.
            "--dial-timeout=30s",
            "--command-timeout=30s",
            "--endpoints",
            "http://127.0.0.1:2379",
            "endpoint",
            "health",
        ],
    );
    assert!(
        h.status.success() && String::from_utf8_lossy(&h.stderr).contains("is healthy"),
        "{}",
        text(&h)
    );
    assert!(!c.exec_ok("vm-002", &["ps", "-o", "comm"]).contains("etcd"));
    // Modules and sysctls of the flavour are in place.
    let modules = c.exec_ok("vm-002", &["cat", "/proc/modules"]);
    for m in ["overlay", "br_netfilter", "ipip", "rbd"] {
        assert!(
            modules.lines().any(|l| l.starts_with(&format!("{m} "))),
            "{m} not loaded: {modules}"
        );
    }
    assert_eq!(
        c.exec_ok(
            "vm-002",
            &["cat", "/proc/sys/net/bridge/bridge-nf-call-iptables"]
        )
        .trim(),
        "1"
    );
    assert!(c
        .exec_ok("vm-002", &["iptables", "-t", "nat", "-L", "-n"])
        .contains("Chain POSTROUTING"));
    control_plane_and_pki(&c, work.path());
    secrets_only_where_a_role_needs_them(&c);
    pod_network(&c);
    scaleout_node_gets_its_credentials(&c);
}

/// `kimg kubectl --in-vm` forwards a piped stdin (`apply -f -`) and streams the
/// output: a watch's first line arrives while the watch still runs (the double
/// stays up after it, as `kubectl get -w` does), and ending kimg ends it in the VM.
fn kubectl_in_vm_streams_and_takes_stdin(c: &TestCluster) {
    use std::io::{BufRead, Write};
    use std::process::Stdio;
    let kubectl = |args: &[&str]| {
        let mut cmd = Command::new(kimg_bin());
        cmd.args(["kubectl", "--name", &c.name, "--in-vm"])
            .args(args)
            .env("KIMG_RUNTIME_DIR", c.runtime.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.spawn().unwrap()
    };
    let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: from-stdin\n";
    let mut apply = kubectl(&["apply", "-f", "-"]);
    apply
        .stdin
        .take()
        .unwrap()
        .write_all(pod.as_bytes())
        .unwrap(); // then closed
    let o = apply.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        c.exec_ok("vm-001", &["cat", "/var/log/kimg-doubles/kubectl.stdin"]),
        pod
    );

    let mut watch = kubectl(&["get", "pods", "-w"]);
    let stdout = watch.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(60));
    let still_running = watch.try_wait().unwrap().is_none();
    let _ = watch.kill();
    let _ = watch.wait();
    assert_eq!(
        line.as_deref(),
        Ok("NAME   READY   STATUS   RESTARTS   AGE\n"),
        "the watch's first line did not come while it ran"
    );
    assert!(still_running, "kimg kubectl returned while the watch ran");
    // The watch in the VM went with kimg (the agent kills what its host left).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ps = c.exec_ok("vm-001", &["ps", "-o", "args"]);
        if !ps.lines().any(|l| l.contains("kubectl get pods -w")) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "watch left running: {ps}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A node added to the running cluster gets a kubelet kubeconfig of its own from
/// the cluster's CA (on a new cdrom, with the cluster's overlays) and starts kubelet.
fn scaleout_node_gets_its_credentials(c: &TestCluster) {
    let o = c.kimg("scaleout", &["vm-003", "--wait=300"]);
    assert!(o.status.success(), "kimg scaleout:\n{}", text(&o));
    c.wait_service("vm-003", "kubelet", &["ready"], Duration::from_secs(120));
    // The kubelet (a double) starts once the apiserver (a double) answers /readyz.
    let args = c.wait_file(
        "vm-003",
        "/var/log/kimg-doubles/kubelet.args",
        Duration::from_secs(120),
    );
    let kc = "/etc/kubernetes/kubelet-vm-003.kubeconfig";
    assert!(args.contains(kc), "{args}");
    assert!(c
        .exec_ok("vm-003", &["cat", kc])
        .contains("server: https://192.168.1.1:6443"));
    let ca = |vm| c.exec_ok(vm, &["cat", "/etc/kubernetes/pki/ca.crt"]);
    assert_eq!(ca("vm-003"), ca("vm-001"));
    // Only its own credentials came along: no CA key, no other node's kubelet.
    let files = c.exec_ok("vm-003", &["find", "/etc/kubernetes", "-type", "f"]);
    assert!(
        !files.contains("ca.key") && !files.contains("admin"),
        "{files}"
    );
    assert!(!files.contains("kubelet-vm-002"), "{files}");
    // The cluster's other overlays came along on the new cdrom.
    c.exec_ok("vm-003", &["test", "-s", "/var/lib/kimg/images/hello.tar"]);
}

/// Issue 15, defects 1 and 8: each VM holds only the secrets its role needs, none
/// readable by another uid, the cdrom is gone after boot, and /etc is still 0755
/// (the PKI overlay no longer carries `kimg run`'s umask 077).
fn secrets_only_where_a_role_needs_them(c: &TestCluster) {
    let files = |vm| {
        c.exec_ok(
            vm,
            &["sh", "-c", "find /etc/kubernetes -type f 2>/dev/null; true"],
        )
    };
    let cp = files("vm-001");
    for f in [
        "pki/ca.key",
        "pki/sa.key",
        "pki/apiserver.key",
        "admin.kubeconfig",
    ] {
        assert!(
            cp.contains(&format!("/etc/kubernetes/{f}")),
            "vm-001 lacks {f}: {cp}"
        );
    }
    let node = files("vm-002");
    for f in [
        "ca.key",
        "sa.key",
        "apiserver.key",
        "admin.kubeconfig",
        "kubelet-vm-001",
    ] {
        assert!(!node.contains(f), "vm-002 has {f}: {node}");
    }
    assert!(
        node.contains("/etc/kubernetes/kubelet-vm-002.kubeconfig"),
        "{node}"
    );
    assert!(node.contains("/etc/kubernetes/pki/ca.crt"), "{node}");
    let router = files("vm-201");
    assert!(
        !router.contains(".key") && !router.contains("kubeconfig"),
        "vm-201: {router}"
    );
    for vm in ["vm-001", "vm-002", "vm-201"] {
        // Nothing under /etc/kubernetes but certificates is readable by another uid,
        // and a non-root uid really cannot read a key or a kubeconfig.
        let loose = c.exec_ok(
            vm,
            &["sh", "-c", "find /etc/kubernetes -type f -perm -004 ! -name '*.crt' ! -name '*.pub' 2>/dev/null; true"],
        );
        assert_eq!(loose, "", "{vm}: readable by others: {loose}");
        let secret = if vm == "vm-001" {
            "/etc/kubernetes/pki/ca.key"
        } else {
            "/etc/kubernetes/kubelet-vm-002.kubeconfig"
        };
        if vm != "vm-201" {
            let r = c.exec(
                vm,
                &[
                    "busybox",
                    "su",
                    "-s",
                    "/bin/sh",
                    "nobody",
                    "-c",
                    &format!("cat {secret}"),
                ],
            );
            assert!(
                !r.status.success(),
                "{vm}: nobody read {secret}: {}",
                text(&r)
            );
            assert!(
                !String::from_utf8_lossy(&r.stdout).contains("PRIVATE KEY"),
                "{vm}"
            );
        }
        // The cdrom is unmounted once unpacked, and its device is root's alone.
        let mounts = c.exec_ok(vm, &["cat", "/proc/mounts"]);
        assert!(!mounts.contains("/run/kimg/cdrom"), "{vm}: {mounts}");
        let dev = c.exec_ok(
            vm,
            &["sh", "-c", "stat -c '%a %u' /dev/sr* 2>/dev/null; true"],
        );
        for line in dev.lines() {
            let (mode, uid) = line.split_once(' ').unwrap_or((line, ""));
            assert!(mode.ends_with('0') && uid == "0", "{vm}: /dev/sr*: {dev}");
        }
        // /etc keeps its mode (defect 8).
        assert_eq!(
            c.exec_ok(vm, &["stat", "-c", "%a", "/etc"]).trim(),
            "755",
            "{vm}"
        );
    }
    // The host keeps the whole PKI where only the user reaches it.
    let store = c.runtime.path().join(&c.name).join("pki");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&store).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o700);
}

/// Pod networking with the real CNI plugins, no Kubernetes: kimg-init's conflist
/// run by hand (as containerd would) gives a network namespace on each node an
/// address from its node's ranges, and the two reach each other over the pod routes.
/// (/usr/sbin/ip is iproute2's; the busybox `ip` first in PATH has no netns.)
fn pod_network(c: &TestCluster) {
    for (vm, n) in [("vm-001", 1), ("vm-002", 2)] {
        let text = c.exec_ok(vm, &["cat", "/etc/cni/net.d/10-kimg.conflist"]);
        let list: serde_json::Value = serde_json::from_str(&text).unwrap();
        // The bridge plugin alone takes a single-plugin config.
        let mut conf = list["plugins"][0].clone();
        conf["name"] = list["name"].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        let script = format!(
            "/usr/sbin/ip netns add pod && printf '%s' '{conf}' | CNI_COMMAND=ADD CNI_CONTAINERID=pod \
             CNI_NETNS=/run/netns/pod CNI_IFNAME=eth0 CNI_PATH=/usr/lib/cni /usr/lib/cni/bridge"
        );
        let r = c.exec_ok(vm, &["sh", "-c", &script]);
        assert!(r.contains(&format!("10.244.{n}.2/24")), "{vm}: {r}");
        let other = if n == 1 { 2 } else { 1 };
        let routes = c.exec_ok(vm, &["/usr/sbin/ip", "route"]);
        assert!(
            routes.contains(&format!("10.244.{other}.0/24 via 192.168.1.{other}")),
            "{vm}: {routes}"
        );
        let routes6 = c.exec_ok(vm, &["/usr/sbin/ip", "-6", "route"]);
        assert!(
            routes6.contains(&format!(
                "fd00:10:244:{other}::/64 via fd00:6b69:0:1::{other}"
            )),
            "{vm}: {routes6}"
        );
    }
    let router = c.exec_ok("vm-201", &["/usr/sbin/ip", "route"]);
    for n in [1, 2] {
        assert!(
            router.contains(&format!("10.244.{n}.0/24 via 192.168.1.{n}")),
            "{router}"
        );
    }
    assert!(c
        .exec("vm-201", &["test", "-e", "/etc/cni/net.d/10-kimg.conflist"])
        .status
        .code()
        .is_some_and(|c| c != 0));
    // vm-001's pod reaches vm-002's pod, both families (retrying while IPv6
    // duplicate address detection finishes).
    for target in ["10.244.2.2", "fd00:10:244:2::2"] {
        let ping = format!(
            "for i in $(seq 30); do /usr/sbin/ip netns exec pod ping -c1 -W2 {target} && exit 0; sleep 1; done; exit 1"
        );
        let r = c.exec("vm-001", &["sh", "-c", &ping]);
        assert!(r.status.success(), "pod to pod {target}: {}", text(&r));
    }
}

/// The Kubernetes components (doubles here) ran on the right VMs, in order, with the
/// generated PKI; the admin kubeconfig's CA verifies the apiserver's certificate.
fn control_plane_and_pki(c: &TestCluster, work: &Path) {
    for s in [
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
    ] {
        c.wait_service("vm-001", s, &["ready"], Duration::from_secs(120));
    }
    for vm in ["vm-001", "vm-002"] {
        for s in ["kubelet", "kube-proxy"] {
            c.wait_service(vm, s, &["ready"], Duration::from_secs(120));
        }
    }
    // Each runs behind a wait for the apiserver's /readyz (curl, the cluster CA):
    // its arguments are written once that wait is over.
    for (vm, comp) in [
        ("vm-001", "kube-controller-manager"),
        ("vm-001", "kube-scheduler"),
        ("vm-001", "kubelet"),
        ("vm-001", "kube-proxy"),
        ("vm-002", "kubelet"),
        ("vm-002", "kube-proxy"),
    ] {
        let path = format!("/var/log/kimg-doubles/{comp}.args");
        c.wait_file(vm, &path, Duration::from_secs(120));
    }
    // Start order on vm-001: the apiserver found etcd up; the controller-manager and
    // the scheduler came after the apiserver listened.
    let order = c.exec_ok("vm-001", &["cat", "/var/log/kimg-doubles/order"]);
    let pos = |n: &str| {
        order
            .lines()
            .position(|l| l.split(' ').next() == Some(n))
            .unwrap_or_else(|| panic!("{n} never started on vm-001: {order}"))
    };
    assert!(order.contains("kube-apiserver etcd=up"), "{order}");
    assert!(
        pos("kube-apiserver") < pos("kube-controller-manager"),
        "{order}"
    );
    assert!(pos("kube-apiserver") < pos("kube-scheduler"), "{order}");
    // Only kubelet and kube-proxy on vm-002; nothing on the router.
    let order2 = c.exec_ok("vm-002", &["cat", "/var/log/kimg-doubles/order"]);
    let mut names: Vec<&str> = order2.lines().collect();
    names.sort();
    names.dedup();
    assert_eq!(names, ["kube-proxy", "kubelet"], "{order2}");
    let r = c.exec("vm-201", &["ls", "/var/log/kimg-doubles"]);
    assert!(
        !r.status.success(),
        "a Kubernetes component ran on the router"
    );
    // Every path in the recorded arguments exists in the guest.
    for (vm, comp) in [
        ("vm-001", "kube-apiserver"),
        ("vm-001", "kube-controller-manager"),
        ("vm-001", "kube-scheduler"),
        ("vm-001", "kubelet"),
        ("vm-002", "kubelet"),
        ("vm-002", "kube-proxy"),
    ] {
        let args = c.exec_ok(vm, &["cat", &format!("/var/log/kimg-doubles/{comp}.args")]);
        let paths: Vec<&str> = args.lines().filter(|a| a.starts_with('/')).collect();
        assert!(!paths.is_empty(), "{vm} {comp}: {args}");
        for p in paths {
            c.exec_ok(vm, &["test", "-s", p]);
        }
        if comp == "kubelet" {
            assert!(
                args.contains(&format!("/etc/kubernetes/kubelet-{vm}.kubeconfig")),
                "{args}"
            );
        }
    }
    // vm-002's kubelet is system:node:vm-002 (O system:nodes), signed by the CA.
    let kc = c.exec_ok(
        "vm-002",
        &["cat", "/etc/kubernetes/kubelet-vm-002.kubeconfig"],
    );
    let field = |kc: &str, key: &str| -> Vec<u8> {
        use base64::Engine;
        let v = kc
            .lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .unwrap_or_else(|| panic!("{key} missing: {kc}"));
        base64::engine::general_purpose::STANDARD
            .decode(v.trim())
            .unwrap()
    };
    let dir = work.join("pki-check");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("kubelet.crt"),
        field(&kc, "client-certificate-data:"),
    )
    .unwrap();
    let subject = Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-in"])
        .arg(dir.join("kubelet.crt"))
        .output()
        .unwrap();
    let subject = String::from_utf8_lossy(&subject.stdout);
    assert!(
        subject.contains("system:node:vm-002") && subject.contains("system:nodes"),
        "{subject}"
    );
    // The admin kubeconfig in the cluster dir: its CA verifies the apiserver
    // certificate in the guest (and the kubelet's).
    let admin = std::fs::read_to_string(c.runtime.path().join(&c.name).join("admin.kubeconfig"))
        .expect("admin.kubeconfig in the cluster dir");
    // Its server is the host's forward to vm-001's apiserver port: the double's
    // banner comes back through it (a bare connect would prove nothing: QEMU accepts
    // on the host side whatever the guest does).
    let port = admin
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: https://127.0.0.1:"))
        .unwrap_or_else(|| panic!("no 127.0.0.1 server: {admin}"));
    // QEMU accepts at once and closes (or stalls) when the guest is not there yet:
    // try again until the banner comes or a generous deadline passes.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let banner = loop {
        let mut banner = String::new();
        let got = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).and_then(|mut conn| {
            conn.set_read_timeout(Some(Duration::from_secs(10)))?;
            // Not a TLS handshake: the double answers it with its banner.
            std::io::Write::write_all(&mut conn, b"\n")?;
            std::io::Read::read_to_string(&mut conn, &mut banner)
        });
        if (got.is_ok() && !banner.is_empty()) || std::time::Instant::now() > deadline {
            break banner;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(banner, "kimg-double kube-apiserver\n");
    std::fs::write(
        dir.join("ca.crt"),
        field(&admin, "certificate-authority-data:"),
    )
    .unwrap();
    std::fs::write(
        dir.join("apiserver.crt"),
        c.exec_ok("vm-001", &["cat", "/etc/kubernetes/pki/apiserver.crt"]),
    )
    .unwrap();
    let v = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(dir.join("ca.crt"))
        .arg(dir.join("apiserver.crt"))
        .arg(dir.join("kubelet.crt"))
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", text(&v));
}
