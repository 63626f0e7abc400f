//! End-to-end: kimg as a user gets it. The README's install command (`cargo install
//! --locked --path builder/cli`) into a temporary root, the binary then copied alone
//! into an empty directory and run from another one with a cache of its own: no
//! checkout, no target/ on any path. Build, boot, exec; doctor; the sbin lookup as a
//! normal user; completions and the man page; `kimg ls`.

use kimg_tests::{text, workspace};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The installed kimg, copied alone into an empty directory (readable by any user).
fn installed() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = tempfile::Builder::new()
            .prefix("kimg-install-root-")
            .tempdir()
            .unwrap();
        // The README's command. The workspace's target dir is reused (scripts/build made
        // the same release build), so this is a copy, not a second build.
        let out = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["install", "--locked", "--path", "builder/cli", "--root"])
            .arg(root.path())
            .env(
                "CARGO_TARGET_DIR",
                std::env::var_os("CARGO_TARGET_DIR")
                    .map_or_else(|| workspace().join("target"), PathBuf::from),
            )
            .current_dir(workspace())
            .output()
            .expect("cargo install runs");
        assert!(out.status.success(), "cargo install:\n{}", text(&out));
        let alone = kimg_tests::process_dir(Path::new("/tmp"), "kimg-alone");
        std::fs::set_permissions(&alone, std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin = alone.join("kimg");
        std::fs::copy(root.path().join("bin/kimg"), &bin).unwrap();
        let size = std::fs::metadata(&bin).unwrap().len();
        eprintln!("installed kimg: {size} bytes");
        bin
    })
}

/// A directory far from the checkout, with a cache of its own that shares only the
/// downloaded kernel packages ([`kimg_tests::own_cache`]: kimg-init and the overlays
/// must come from the binary).
struct Elsewhere {
    cwd: tempfile::TempDir,
    cache: tempfile::TempDir,
    runtime: tempfile::TempDir,
}

impl Elsewhere {
    fn new() -> Elsewhere {
        let cache = kimg_tests::own_cache();
        Elsewhere {
            cwd: tempfile::Builder::new()
                .prefix("kimg-cwd-")
                .tempdir()
                .unwrap(),
            cache,
            runtime: tempfile::Builder::new()
                .prefix("kimg-rt-")
                .tempdir_in("/tmp")
                .unwrap(),
        }
    }

    /// The installed kimg with `args`, from the empty directory; nothing of cargo's
    /// environment (CARGO_MANIFEST_DIR, KIMG_INIT) leaks in.
    fn kimg(&self, args: &[&str]) -> Output {
        Command::new(installed())
            .args(args)
            .current_dir(self.cwd.path())
            .env_remove("CARGO_MANIFEST_DIR")
            .env_remove("KIMG_INIT")
            .env_remove("KIMG_OVLPATH")
            .env("KIMG_CACHE", self.cache.path())
            .env("KIMG_RUNTIME_DIR", self.runtime.path())
            .output()
            .expect("kimg runs")
    }

    fn kimg_ok(&self, args: &[&str]) -> String {
        let o = self.kimg(args);
        assert!(o.status.success(), "kimg {args:?}:\n{}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

impl Drop for Elsewhere {
    fn drop(&mut self) {
        for c in ["inst-a", "inst-b"] {
            let _ = self.kimg(&["stop", "--name", c, "--grace", "5"]);
        }
    }
}

/// `kimg ls --json` as (name, state, running, vms).
fn ls(e: &Elsewhere) -> Vec<(String, String, u64, u64)> {
    let v: serde_json::Value = serde_json::from_str(&e.kimg_ok(&["ls", "--json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["state"].as_str().unwrap().to_string(),
                c["running"].as_u64().unwrap(),
                c["vms"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn installed_kimg_builds_boots_and_lists_clusters_from_an_empty_directory() {
    let e = Elsewhere::new();
    e.kimg_ok(&["build"]);
    let image = e.cwd.path().join("out/hd.img");
    assert!(image.is_file(), "kimg build wrote no out/hd.img");

    // kimg-init came out of the binary into the cache, by its sha256, and the manifest
    // records that sha256.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(e.cwd.path().join("out/hd.json")).unwrap()).unwrap();
    let init_sha = manifest["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "kimg-init")
        .map(|c| c["sha256"].as_str().unwrap().to_string())
        .expect("the manifest lists kimg-init");
    let cached = e
        .cache
        .path()
        .join("init")
        .join(&init_sha)
        .join("kimg-init");
    assert!(cached.is_file(), "{} missing", cached.display());

    // A one-node cluster with the built-in overlay `test` (carried in the binary).
    let img = image.to_str().unwrap();
    let run = |name: &str, overlay: &[&str]| {
        let mut args = vec!["run", "--name", name, "--image", img, "--nodes", "1"];
        args.extend(["--routers", "0", "--mem", "256", "--wait=240"]);
        args.extend_from_slice(overlay);
        e.kimg_ok(&args);
    };
    run("inst-a", &["test"]);
    let host = e.kimg_ok(&["exec", "--name", "inst-a", "vm-001", "--", "hostname"]);
    assert_eq!(host.trim(), "vm-001");
    let marker = e.kimg_ok(&[
        "exec",
        "--name",
        "inst-a",
        "vm-001",
        "--",
        "cat",
        "/etc/kimg-test-overlay",
    ]);
    assert!(
        !marker.trim().is_empty(),
        "the built-in overlay was not unpacked"
    );
    // `kimg doctor` names the accelerator `kimg run` chose.
    let doctor: serde_json::Value =
        serde_json::from_slice(&e.kimg(&["doctor", "--json"]).stdout).unwrap();
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(e.runtime.path().join("inst-a/cluster.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(doctor["accel"]["accel"], state["accel"], "{doctor}");

    // `kimg ls`: both clusters, running; none after both are stopped.
    run("inst-b", &[]);
    let listed = ls(&e);
    assert_eq!(
        listed,
        [
            ("inst-a".to_string(), "running".to_string(), 1, 1),
            ("inst-b".to_string(), "running".to_string(), 1, 1),
        ],
        "{listed:?}"
    );
    let table = e.kimg_ok(&["ls"]);
    assert!(table.contains("inst-a") && table.contains(img), "{table}");
    for c in ["inst-a", "inst-b"] {
        e.kimg_ok(&["stop", "--name", c]);
    }
    assert_eq!(ls(&e), []);
}

#[test]
fn doctor_reports_qemu_and_the_accelerator_it_will_use() {
    let e = Elsewhere::new();
    let o = e.kimg(&["doctor", "--json"]);
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).expect("doctor --json is JSON");
    assert_eq!(o.status.success(), r["ok"] == true, "{}", text(&o));
    let qemu = r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "qemu-system-x86_64")
        .expect("qemu is checked");
    assert_eq!(qemu["ok"], true, "{qemu}");
    assert!(qemu["detail"]
        .as_str()
        .unwrap()
        .contains("QEMU emulator version"));
    let accel = r["accel"]["accel"].as_str().unwrap();
    let reason = r["accel"]["reason"].as_str().unwrap();
    eprintln!("doctor: accel {accel}: {reason}");
    assert!(accel == "kvm" || accel == "tcg", "{accel}");
    // This host (no vmx/svm, or no /dev/kvm) says why KVM is not used.
    if !Path::new("/dev/kvm").exists() {
        assert_eq!(accel, "tcg");
        assert!(reason.contains("/dev/kvm"), "{reason}");
    }
    assert!(!reason.is_empty());
    // The human form names the accelerator and what to install (if anything).
    let human = e.kimg(&["doctor"]);
    let out = String::from_utf8_lossy(&human.stdout);
    assert!(out.contains(&format!("accel    {accel}")), "{out}");
}

#[test]
fn normal_user_finds_mkfs_ext4_in_sbin() {
    // A normal user's PATH lacks /usr/sbin; kimg looks there too.
    let user = "kimg-e2e-user";
    let exists = Command::new("id")
        .arg(user)
        .output()
        .unwrap()
        .status
        .success();
    if !exists {
        let o = Command::new("useradd")
            .args(["--no-create-home", "--shell", "/bin/sh", user])
            .output()
            .expect("useradd runs (tests run as root)");
        assert!(o.status.success(), "useradd:\n{}", text(&o));
    }
    let o = Command::new("runuser")
        .args([
            "-u",
            user,
            "--",
            "env",
            "-i",
            "PATH=/usr/bin:/bin",
            "HOME=/tmp",
        ])
        .arg(installed())
        .args(["doctor", "--json"])
        .current_dir("/tmp")
        .output()
        .expect("runuser runs");
    let r: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|_| panic!("doctor --json as {user}:\n{}", text(&o)));
    for tool in ["mkfs.ext4", "debugfs"] {
        let c = r["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == tool)
            .unwrap();
        let path = c["detail"].as_str().unwrap();
        assert!(c["ok"] == true && path.contains("sbin/"), "{tool}: {c}");
    }
}

#[test]
fn completions_and_man_page_are_accepted_by_their_tools() {
    let e = Elsewhere::new();
    let dir = tempfile::tempdir().unwrap();
    let bash = dir.path().join("kimg.bash");
    std::fs::write(&bash, e.kimg_ok(&["completions", "bash"])).unwrap();
    let o = Command::new("bash").arg("-n").arg(&bash).output().unwrap();
    assert!(o.status.success(), "bash -n:\n{}", text(&o));
    let sourced = Command::new("bash")
        .arg("-c")
        .arg(format!(". {}; complete -p kimg", bash.to_str().unwrap()))
        .output()
        .unwrap();
    assert!(sourced.status.success(), "{}", text(&sourced));
    for shell in ["zsh", "fish"] {
        assert!(
            e.kimg_ok(&["completions", shell]).contains("doctor"),
            "{shell}"
        );
    }
    let man = e.kimg_ok(&["man"]);
    assert!(man.contains(".TH kimg 1"), "{man}");
    assert!(man.contains("doctor") && man.contains("completions"));
}
