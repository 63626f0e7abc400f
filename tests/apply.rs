//! End-to-end: `kimg apply` on a running cluster (2 nodes + 1 router). An overlay
//! with a start hook and a service file starts the service on every VM, a changed
//! service file restarts it (on the VMs named only), `kimg status` lists the
//! overlays "at boot" and "applied at", and an overlay with an entry leading out
//! of / is refused naming the overlay and the entry, with nothing of it written and
//! the VM healthy.

use kimg_tests::{image, text, TestCluster};
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

const VMS: [&str; 3] = ["vm-001", "vm-002", "vm-201"];

/// An overlay folder `dir/NAME` (overlay.toml + root/) with the service `web`
/// writing `version` to /run/web.version, and a start hook.
fn web_overlay(dir: &Path, name: &str, version: &str) {
    let root = dir.join(name).join("root");
    fs::create_dir_all(root.join("etc/kimg/services")).unwrap();
    fs::create_dir_all(root.join("etc/kimg/start.d")).unwrap();
    fs::write(
        dir.join(name).join("overlay.toml"),
        "description = \"apply test\"\n",
    )
    .unwrap();
    fs::write(
        root.join("etc/kimg/services/web.toml"),
        format!(
            "command = [\"/bin/sh\", \"-c\", \"echo {version} > /run/web.version; exec sleep 100000\"]\n\
             restart = \"always\"\n"
        ),
    )
    .unwrap();
    let hook = root.join("etc/kimg/start.d/50-apply-test");
    fs::write(
        &hook,
        format!("#!/bin/sh\necho {version}-$KIMG_HOSTNAME >> /root/hook.out\n"),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
}

/// A plain tar: a good file, then an entry climbing out of the root.
fn bad_overlay(path: &Path) {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("etc/bad-overlay-was-here", &b"x"[..]),
        ("../../etc/evil", b"PWNED"),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    fs::write(path, b.into_inner().unwrap()).unwrap();
}

/// `cat FILE` in `vm` until it prints `want` (services start asynchronously).
fn wait_file(c: &TestCluster, vm: &str, file: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = c.exec(vm, &["cat", file]);
        let got = String::from_utf8_lossy(&o.stdout).into_owned();
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{vm}: {file} is {got:?}, want {want:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn web_pid(c: &TestCluster, vm: &str) -> u64 {
    let svc = c.wait_service(vm, "web", &["ready"], Duration::from_secs(60));
    svc["pid"].as_u64().unwrap_or_else(|| panic!("{vm}: {svc}"))
}

fn overlays_of(st: &serde_json::Value, vm: &str) -> Vec<(String, String)> {
    st["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vm"] == vm)
        .and_then(|v| v["overlays"].as_array())
        .unwrap_or_else(|| panic!("{vm} has no overlays in {st}"))
        .iter()
        .map(|o| {
            (
                o["name"].as_str().unwrap_or_default().to_string(),
                o["when"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn apply_starts_and_restarts_services_runs_hooks_and_refuses_bad_overlays() {
    let work = tempfile::tempdir().unwrap();
    let ovl = work.path().join("ovl");
    web_overlay(&ovl, "web", "v1");
    let c = TestCluster::new("apply");
    let img = image();
    let t = Instant::now();
    let run = c.kimg(
        "run",
        &[
            "--image",
            img.image.to_str().unwrap(),
            "--nodes",
            "2",
            "--routers",
            "1",
            "--mem",
            "256",
            "--wait=300",
            "test",
        ],
    );
    assert!(run.status.success(), "kimg run:\n{}", text(&run));
    let cold = t.elapsed();

    // Every VM: hook run with the VM's identity, service started.
    let t = Instant::now();
    let o = c.kimg("apply", &["--ovlpath", ovl.to_str().unwrap(), "web"]);
    let hot = t.elapsed();
    assert!(o.status.success(), "kimg apply:\n{}", text(&o));
    eprintln!(
        "cold run --wait of 3 VMs: {:.2}s; apply of one overlay to them: {:.2}s",
        cold.as_secs_f64(),
        hot.as_secs_f64()
    );
    let mut pids = Vec::new();
    for vm in VMS {
        assert_eq!(
            c.exec_ok(vm, &["cat", "/root/hook.out"]),
            format!("v1-{vm}\n")
        );
        wait_file(&c, vm, "/run/web.version", "v1\n");
        pids.push(web_pid(&c, vm));
    }
    // The drive is empty again; the VM is still ready.
    let st = c.status_answered();
    for vm in VMS {
        let ovs = overlays_of(&st, vm);
        assert_eq!(ovs[0].1, "at boot", "{vm}: {ovs:?}");
        let last = ovs.last().unwrap();
        assert!(
            last.0.ends_with("-web.tar.zst") && last.1.starts_with("applied at "),
            "{vm}: {ovs:?}"
        );
    }
    let text_status = c.kimg("status", &[]);
    assert!(
        String::from_utf8_lossy(&text_status.stdout).contains("(applied at "),
        "{}",
        text(&text_status)
    );

    // A changed service file restarts the service, only where applied; the hook,
    // changed too, runs again there.
    let ovl2 = work.path().join("ovl2");
    web_overlay(&ovl2, "web", "v2");
    let o = c.kimg(
        "apply",
        &[
            "--vms",
            "vm-001",
            "--ovlpath",
            ovl2.to_str().unwrap(),
            "web",
        ],
    );
    assert!(o.status.success(), "kimg apply v2:\n{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("restarted: web"),
        "{}",
        text(&o)
    );
    wait_file(&c, "vm-001", "/run/web.version", "v2\n");
    let deadline = Instant::now() + Duration::from_secs(60);
    while web_pid(&c, "vm-001") == pids[0] {
        assert!(Instant::now() < deadline, "web kept its old process");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        c.exec_ok("vm-001", &["cat", "/root/hook.out"]),
        "v1-vm-001\nv2-vm-001\n"
    );
    assert_eq!(c.exec_ok("vm-002", &["cat", "/run/web.version"]), "v1\n");
    assert_eq!(web_pid(&c, "vm-002"), pids[1]);
    // The same overlay again: nothing changed, nothing restarted.
    let pid = web_pid(&c, "vm-001");
    let o = c.kimg(
        "apply",
        &["--vms", "1", "--ovlpath", ovl2.to_str().unwrap(), "web"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("restarted"),
        "{}",
        text(&o)
    );
    assert_eq!(web_pid(&c, "vm-001"), pid);

    // A bad overlay is refused, named with its entry; nothing of it is written.
    let bad = work.path().join("bad.tar");
    bad_overlay(&bad);
    let o = c.kimg("apply", &["--vms", "vm-002", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        err.contains("01-bad.tar") && err.contains("../../etc/evil") && err.contains("refused"),
        "{}",
        text(&o)
    );
    let written = c.exec("vm-002", &["ls", "/etc/bad-overlay-was-here"]);
    assert!(!written.status.success(), "{}", text(&written));
    let st = c.status_answered();
    let vm2 = st["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vm"] == "vm-002")
        .unwrap();
    assert_eq!(vm2["state"], "ready", "{vm2}");
    assert!(
        !overlays_of(&st, "vm-002")
            .iter()
            .any(|o| o.0.contains("bad")),
        "{st}"
    );
    assert_eq!(web_pid(&c, "vm-002"), pids[1]);
    // And a good apply still works after it.
    let o = c.kimg(
        "apply",
        &[
            "--vms",
            "vm-002",
            "--ovlpath",
            ovl2.to_str().unwrap(),
            "web",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    wait_file(&c, "vm-002", "/run/web.version", "v2\n");
}
