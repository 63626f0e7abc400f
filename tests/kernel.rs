//! End-to-end: the `kimg kernel` commands on real inputs (Debian's cloud kernel config,
//! Debian's linux-source tree), and (opt-in) an image with a kernel built from source
//! booting to ready.

use kimg_kernel::{prepare, KernelSource};
use kimg_tests::{kimg, text, TestCluster};
use std::path::PathBuf;

fn debian_config() -> PathBuf {
    let k = prepare(&KernelSource::DebianDefault, &kimg_util::cache::cache_dir()).unwrap();
    k.config.expect("Debian's kernel package has its config")
}

fn source_tree(rt: &std::path::Path) -> String {
    let o = kimg(rt, &["kernel", "source"]);
    assert!(o.status.success(), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn kernel_check_on_debian_cloud_config() {
    let rt = tempfile::tempdir().unwrap();
    let config = debian_config();
    let cfg = config.to_str().unwrap();
    let o = kimg(rt.path(), &["kernel", "check", "--config", cfg, "--k8s"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("base.config: all") && out.contains("k8s.config: all"),
        "{out}"
    );

    // Debian builds virtio_blk as a module: a fragment that needs it built in fails,
    // naming the symbol, also as JSON.
    let dir = tempfile::tempdir().unwrap();
    let frag = dir.path().join("stage1.config");
    std::fs::write(
        &frag,
        "CONFIG_VIRTIO_BLK=y # kimg: builtin\nCONFIG_EXT4_FS=y\n",
    )
    .unwrap();
    let f = frag.to_str().unwrap();
    let o = kimg(
        rt.path(),
        &["kernel", "check", "--config", cfg, "--fragment", f],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("CONFIG_VIRTIO_BLK: want y (built in, not m), found m"),
        "{out}"
    );
    assert!(!out.contains("CONFIG_EXT4_FS:"), "{out}");
    let o = kimg(
        rt.path(),
        &[
            "kernel",
            "check",
            "--config",
            cfg,
            "--fragment",
            f,
            "--json",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(
        v["fragments"][1]["misses"][0]["symbol"],
        "CONFIG_VIRTIO_BLK"
    );
}

/// `kimg kernel config` on Debian's linux-source: the k8s config comes out whole;
/// a fragment switching IP_VS off makes the IPVS schedulers drop, reported with the
/// dependency, and the output is then not written.
#[test]
fn kernel_config_on_linux_source() {
    let rt = tempfile::tempdir().unwrap();
    let tree = source_tree(rt.path());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("k8s.config");
    let o_arg = out.to_str().unwrap();
    let o = kimg(
        rt.path(),
        &[
            "kernel", "config", "--source", &tree, "--k8s", "--out", o_arg,
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let written = std::fs::read_to_string(&out).unwrap();
    assert!(written.contains("CONFIG_IP_VS_RR=m\n"), "IPVS is on");
    assert!(
        written.contains("CONFIG_VIRTIO_BLK=y\n"),
        "stage 1 built in"
    );
    assert!(!std::path::Path::new(&tree).join(".config").exists());

    std::fs::remove_file(&out).unwrap();
    let off = dir.path().join("off.config");
    std::fs::write(&off, "# CONFIG_IP_VS is not set\n").unwrap();
    let o = kimg(
        rt.path(),
        &[
            "kernel",
            "config",
            "--source",
            &tree,
            "--k8s",
            "--fragment",
            off.to_str().unwrap(),
            "--out",
            o_arg,
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("CONFIG_IP_VS_RR: requested m or y, got n; depends on IP_VS"),
        "{err}"
    );
    assert!(err.contains("off: CONFIG_IP_VS"), "{err}");
    assert!(!out.exists(), "nothing written when symbols dropped");
}

/// Opt-in (a full kernel build, tens of minutes unless cached):
/// `cargo test --release -p kimg-tests --test kernel -- --ignored`.
/// An image with the built kernel (everything stage 1 needs built in) boots to ready;
/// the k8s modules load from the image.
#[test]
#[ignore]
fn image_with_kernel_from_source_boots() {
    let rt = tempfile::tempdir().unwrap();
    let tree = source_tree(rt.path());
    let dir = tempfile::tempdir().unwrap();
    let o = kimg(
        rt.path(),
        &[
            "build",
            "--kernel-source",
            &tree,
            "--k8s",
            "--out",
            dir.path().to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let image = dir.path().join("hd.img");
    let c = TestCluster::new("e2e-kernel-src");
    let run = c.kimg(
        "run",
        &[
            "--image",
            image.to_str().unwrap(),
            "--nodes",
            "1",
            "--routers",
            "0",
            "--wait=300",
        ],
    );
    assert!(run.status.success(), "kimg run:\n{}", text(&run));
    let st = c.status_answered();
    assert_eq!(st["vms"][0]["state"], "ready", "{st}");
    let release = c.exec_ok("vm-001", &["uname", "-r"]);
    assert!(release.starts_with("6.1."), "{release}");
    // Stage 1 loaded nothing: the disk drivers are built in.
    assert_eq!(c.exec_ok("vm-001", &["cat", "/proc/modules"]), "");
    c.exec_ok("vm-001", &["modprobe", "ip_vs_rr"]);
    let modules = c.exec_ok("vm-001", &["cat", "/proc/modules"]);
    assert!(
        modules.contains("ip_vs_rr ") && modules.contains("ip_vs "),
        "{modules}"
    );
}
