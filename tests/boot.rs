//! End-to-end: `kimg build` makes an image the standard tools accept, and one VM
//! booted from it answers through the agent as the contract says.

use kimg_tests::{image, kimg, text, TestCluster};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn tool(args: &[&str]) -> String {
    let o = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", args[0]));
    assert!(o.status.success(), "{args:?}:\n{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

fn sha256(path: &Path) -> String {
    kimg_util::hash::file_sha256(path).unwrap().0
}

#[test]
fn built_image_passes_qemu_img_sgdisk_e2fsck_and_fsck_vfat() {
    let img = image();
    eprintln!("kimg build took {:.2}s", img.build_time.as_secs_f64());
    tool(&["qemu-img", "check", img.image.to_str().unwrap()]);
    let info = tool(&["qemu-img", "info", img.image.to_str().unwrap()]);
    assert!(info.contains("file format: qcow2"), "{info}");

    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    tool(&[
        "qemu-img",
        "convert",
        "-O",
        "raw",
        img.image.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let v = tool(&["sgdisk", "-v", raw.to_str().unwrap()]);
    assert!(v.contains("No problems found"), "{v}");
    let p = tool(&["sgdisk", "-p", raw.to_str().unwrap()]);
    assert!(p.contains("kimg-esp") && p.contains("kimg-root"), "{p}");

    let m = &img.manifest;
    for (name, checker) in [("kimg-esp", "fsck.vfat"), ("kimg-root", "e2fsck")] {
        let part = m
            .partition(name)
            .unwrap_or_else(|| panic!("{name} in manifest"));
        let out = dir.path().join(format!("{name}.raw"));
        tool(&[
            "dd",
            &format!("if={}", raw.display()),
            &format!("of={}", out.display()),
            "bs=1M",
            &format!("skip={}", part.offset >> 20),
            &format!("count={}", part.size >> 20),
            "conv=sparse",
            "status=none",
        ]);
        let args: &[&str] = if checker == "e2fsck" {
            &["-fn"]
        } else {
            &["-n"]
        };
        let mut cmd = vec![checker];
        cmd.extend_from_slice(args);
        cmd.push(out.to_str().unwrap());
        tool(&cmd);
        if checker == "e2fsck" {
            // Everything in the image is owned by root, whoever built it.
            let ls = tool(&["debugfs", "-R", "ls -l /usr/sbin", out.to_str().unwrap()]);
            assert!(ls.contains("kimg-init"), "{ls}");
            for line in ls.lines().filter(|l| l.contains("kimg-init")) {
                let f: Vec<&str> = line.split_whitespace().collect();
                assert_eq!((f[3], f[4]), ("0", "0"), "uid, gid: {line}");
            }
            let stat = tool(&[
                "debugfs",
                "-R",
                "cat /etc/os-release",
                out.to_str().unwrap(),
            ]);
            assert!(stat.contains("ID=kimg"), "{stat}");
        }
    }
    assert!(
        m.kernel.version.contains("cloud-amd64"),
        "{}",
        m.kernel.version
    );
    for c in ["kernel", "initramfs", "kimg-init", "busybox"] {
        let comp = m.component(c).unwrap_or_else(|| panic!("component {c}"));
        assert_eq!(comp.sha256.len(), 64, "{c}");
    }
}

#[test]
fn one_vm_boots_runs_commands_and_stops_cleanly() {
    let img = image();
    let base_sha = sha256(&img.image);
    let c = TestCluster::new("e2e-boot");
    let image_arg = img.image.to_str().unwrap();
    let run = c.kimg(
        "run",
        &[
            "--image",
            image_arg,
            "--nodes",
            "1",
            "--routers",
            "0",
            "--wait=180",
        ],
    );
    assert!(run.status.success(), "kimg run:\n{}", text(&run));

    // Status says who and what the VM is.
    let st = c.status_answered();
    let vm = &st["vms"][0];
    assert_eq!(vm["vm"], "vm-001");
    assert_eq!(vm["role"], "node");
    assert_eq!(vm["state"], "ready", "{vm}");
    assert_eq!(vm["agent"]["hostname"], "vm-001");

    assert_eq!(c.exec_ok("vm-001", &["hostname"]).trim(), "vm-001");
    // Root is the disk's ext4 partition, PID 1 is kimg-init.
    let mounts = c.exec_ok("vm-001", &["cat", "/proc/mounts"]);
    let root = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("/"))
        .unwrap_or("");
    assert!(root.starts_with("/dev/vda2 / ext4 rw"), "{mounts}");
    assert_eq!(
        c.exec_ok("vm-001", &["readlink", "/proc/1/exe"]).trim(),
        "/usr/sbin/kimg-init"
    );
    // exec carries output and exit codes.
    let o = c.exec("vm-001", &["sh", "-c", "echo out; echo err >&2; exit 7"]);
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&o.stderr), "err\n");
    let o = c.exec("vm-001", &["no-such-program"]);
    assert_eq!(o.status.code(), Some(127), "{}", text(&o));
    // Binaries from rootfs/base.toml run with their libraries.
    assert!(c.exec_ok("vm-001", &["ip", "-V"]).contains("iproute2"));
    // busybox modprobe works from the image's modules.dep.
    c.exec_ok("vm-001", &["modprobe", "ipip"]);
    let modules = c.exec_ok("vm-001", &["cat", "/proc/modules"]);
    assert!(
        modules.contains("ipip ") && modules.contains("tunnel4 "),
        "{modules}"
    );

    // Under TCG the guest is told the host's TSC frequency rather than calibrating it
    // (a calibration on a busy host once ran a CI guest's clocks 24 times too fast):
    // the kernel took the figure, and the guest's uptime advances as the host's time.
    if st["accel"] == "tcg" {
        let cmdline = c.exec_ok("vm-001", &["cat", "/proc/cmdline"]);
        let khz: u64 = cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix("tsc_early_khz="))
            .unwrap_or_else(|| panic!("no tsc_early_khz under TCG: {cmdline}"))
            .parse()
            .unwrap();
        let dmesg = c.exec_ok("vm-001", &["dmesg"]);
        let detected = format!("tsc: Detected {}.{:03} MHz", khz / 1000, khz % 1000);
        assert!(dmesg.contains(&detected), "no {detected:?}: {dmesg}");
    }
    // The image's boot-speed words (kimg_contract::cmdline::FAST_BOOT) took effect in
    // the real kernel: no crypto self-tests, the KDF test's initcall skipped, the
    // kernel's text at its link address (no KASLR).
    let dmesg = c.exec_ok("vm-001", &["dmesg"]);
    assert!(dmesg.contains("alg: self-tests disabled"), "{dmesg}");
    assert!(
        dmesg.contains("initcall crypto_kdf108_init blacklisted"),
        "{dmesg}"
    );
    let kallsyms = c.exec_ok("vm-001", &["cat", "/proc/kallsyms"]);
    let text_addr = kallsyms
        .lines()
        .find(|l| l.ends_with(" T _text") || l.ends_with(" t _text"))
        .unwrap_or_else(|| panic!("no _text in /proc/kallsyms"));
    assert!(text_addr.starts_with("ffffffff81000000 "), "{text_addr}");
    let uptime = || {
        let up = c.exec_ok("vm-001", &["cat", "/proc/uptime"]);
        up.split_whitespace()
            .next()
            .unwrap()
            .parse::<f64>()
            .unwrap()
    };
    let (t0, u0, t1) = (Instant::now(), uptime(), Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    let (t2, u1, t3) = (Instant::now(), uptime(), Instant::now());
    // The guest read its clock within [t0, t1], then within [t2, t3] (+10 ms ticks).
    let (least, most) = ((t2 - t1).as_secs_f64(), (t3 - t0).as_secs_f64());
    assert!(
        (least - 0.02..=most + 0.02).contains(&(u1 - u0)),
        "guest uptime advanced {:.2} s while the host's time advanced {least:.2}-{most:.2} s",
        u1 - u0
    );

    let vmdir = c.runtime.path().join(&c.name).join("vm-001");
    let console = std::fs::read_to_string(vmdir.join("console.log")).unwrap();
    assert!(console.contains("kimg-init: ready in "), "{console}");
    let mode = std::fs::metadata(vmdir.join("agent.sock")).map(|m| {
        use std::os::unix::fs::PermissionsExt;
        m.permissions().mode() & 0o777
    });
    assert_eq!(mode.unwrap(), 0o600);

    // A long grace: a loaded host may take a while to sync and power off, and the
    // check is that it powers off itself, not how fast.
    let stop = c.kimg("stop", &["--grace", "120", "--json"]);
    assert!(stop.status.success(), "{}", text(&stop));
    let report: serde_json::Value = serde_json::from_slice(&stop.stdout).unwrap();
    assert_eq!(
        report["graceful"][0], "vm-001",
        "poweroff through the agent: {report}"
    );
    assert!(c.qemu_pids().is_empty(), "QEMU left behind");
    assert!(
        !c.runtime.path().join(&c.name).exists(),
        "cluster dir left behind"
    );
    assert_eq!(sha256(&img.image), base_sha, "the base image was written");
}

#[test]
fn build_with_bad_input_fails_clearly_and_leaves_nothing() {
    let out = tempfile::tempdir().unwrap();
    let garbage = out.path().join("garbage.deb");
    std::fs::write(&garbage, b"this is not a debian package").unwrap();
    let rt = tempfile::tempdir().unwrap();
    let target = out.path().join("o");
    let o = kimg(
        rt.path(),
        &[
            "build",
            "--out",
            target.to_str().unwrap(),
            "--kernel-deb",
            garbage.to_str().unwrap(),
        ],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("garbage.deb"), "{err}");
    let left: Vec<_> = std::fs::read_dir(&target)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");

    let o = kimg(
        rt.path(),
        &["exec", "--name", "nope", "vm-001", "--", "true"],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("kimg run --name nope"),
        "{}",
        text(&o)
    );
}

/// `kimg bench boot` splits each kimg boot by the real guest's kernel log: the marks
/// it looks for (the kernel's `Run /init` line, kimg-init's stage-2 banner) are
/// there, in order, and every part took time.
#[test]
fn bench_boot_splits_a_real_boot_by_the_guest_log() {
    let runtime = tempfile::tempdir().unwrap();
    let o = kimg(runtime.path(), &["bench", "boot", "--runs", "1", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let parts = r["parts"].as_array().unwrap();
    assert_eq!(parts.len(), 1, "{r}");
    for key in [
        "before_kernel_secs",
        "kernel_secs",
        "stage1_secs",
        "stage2_secs",
    ] {
        let secs = parts[0][key].as_f64().unwrap();
        assert!(secs > 0.0, "{key}: {r}");
    }
}
