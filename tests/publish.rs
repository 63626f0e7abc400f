//! End-to-end: two builds give the same bytes; a published image, fetched into the
//! cache, boots by name under UEFI (OVMF -> systemd-boot on the ESP -> kernel) with
//! its hostname from SMBIOS, and answers over the agent.

use kimg_tests::{image, kimg_bin, text, TestCluster};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn sha256(path: &Path) -> String {
    kimg_util::hash::file_sha256(path).unwrap().0
}

fn run(cmd: &mut Command) -> Output {
    let o = cmd.output().expect("command runs");
    assert!(o.status.success(), "{cmd:?}:\n{}", text(&o));
    o
}

/// `kimg publish IMAGE --out DIR --level 1`; returns DIR/hd.img.xz.
fn publish(image: &Path, out: &Path) -> PathBuf {
    run(Command::new(kimg_bin())
        .arg("publish")
        .arg(image)
        .arg("--out")
        .arg(out)
        .args(["--level", "1"]));
    out.join("hd.img.xz")
}

/// Where two qcow2 images first differ: partition (from the manifest) and, for the
/// root filesystem, the first file whose content differs.
fn first_difference(a: &Path, b: &Path) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let raw = |img: &Path, n: &str| {
        let out = tmp.path().join(n);
        run(Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(img)
            .arg(&out));
        std::fs::read(out).unwrap()
    };
    let (ra, rb) = (raw(a, "a.raw"), raw(b, "b.raw"));
    let Some(at) = ra.iter().zip(&rb).position(|(x, y)| x != y) else {
        return "the raw disks are equal: only qcow2 metadata differs".into();
    };
    let m = &image().manifest;
    let Some(p) = m
        .partitions
        .iter()
        .find(|p| (p.offset..p.offset + p.size).contains(&(at as u64)))
    else {
        return format!("byte {at}, outside the partitions (GPT)");
    };
    let mut why = format!("partition {} at byte {}", p.name, at as u64 - p.offset);
    if p.fs == "ext4" {
        let range = p.offset as usize..(p.offset + p.size) as usize;
        for (n, r) in [("a", &ra), ("b", &rb)] {
            std::fs::write(tmp.path().join(format!("{n}.ext4")), &r[range.clone()]).unwrap();
            std::fs::create_dir(tmp.path().join(n)).unwrap();
            run(Command::new("debugfs")
                .arg("-R")
                .arg(format!("rdump / {}", tmp.path().join(n).display()))
                .arg(tmp.path().join(format!("{n}.ext4"))));
        }
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let pa = tmp.path().join("a").join(&rel);
            if pa.is_dir() {
                let mut names: Vec<_> = std::fs::read_dir(&pa)
                    .unwrap()
                    .map(|e| e.unwrap().file_name())
                    .collect();
                names.sort();
                stack.extend(names.into_iter().rev().map(|n| rel.join(n)));
            } else if std::fs::read(&pa).ok() != std::fs::read(tmp.path().join("b").join(&rel)).ok()
            {
                why.push_str(&format!(", first differing file /{}", rel.display()));
                break;
            }
        }
    }
    why
}

#[test]
fn two_builds_give_identical_images_and_archives() {
    let first = image();
    let dir = tempfile::tempdir().unwrap();
    let out = run(Command::new(kimg_bin())
        .args(["build", "--out"])
        .arg(dir.path()));
    let _ = out;
    let second = dir.path().join("hd.img");
    if sha256(&first.image) != sha256(&second) {
        panic!(
            "two builds differ: {}",
            first_difference(&first.image, &second)
        );
    }
    assert_eq!(
        std::fs::read_to_string(first.dir.join("hd.json")).unwrap(),
        std::fs::read_to_string(dir.path().join("hd.json")).unwrap(),
        "manifests differ"
    );
    let xa = publish(&first.image, &dir.path().join("pub-a"));
    let xb = publish(&second, &dir.path().join("pub-b"));
    assert_eq!(sha256(&xa), sha256(&xb), "hd.img.xz differs");
    run(Command::new("xz").arg("-t").arg(&xa));
}

#[test]
fn published_image_fetched_by_name_boots_under_uefi() {
    let img = image();
    let dir = tempfile::tempdir().unwrap();
    let xz = publish(&img.image, &dir.path().join("pub"));
    // What users do without kimg: check the sum, decompress, get the image back.
    run(Command::new("sha256sum")
        .args(["-c", "hd.img.xz.sha256"])
        .current_dir(dir.path().join("pub")));
    let back = run(Command::new("xz").arg("-dc").arg(&xz));
    assert!(back.stdout == std::fs::read(&img.image).unwrap());

    let c = TestCluster::new("e2e-uefi");
    let cache = dir.path().join("cache");
    let kimg = |args: &[&str]| {
        let o = Command::new(kimg_bin())
            .args(args)
            .env("KIMG_CACHE", &cache)
            .env("KIMG_RUNTIME_DIR", c.runtime.path())
            .output()
            .expect("kimg runs");
        assert!(o.status.success(), "kimg {args:?}:\n{}", text(&o));
        o
    };
    kimg(&["fetch", xz.to_str().unwrap(), "--name", "pubtest"]);
    let list: serde_json::Value =
        serde_json::from_slice(&kimg(&["images", "--json"]).stdout).unwrap();
    assert_eq!(list[0]["name"], "pubtest", "{list}");
    assert_eq!(list[0]["kernel"], img.manifest.kernel.version.as_str());
    assert_eq!(list[0]["sha256"], sha256(&xz).as_str());

    kimg(&[
        "run",
        "--name",
        &c.name,
        "--image",
        "pubtest",
        "--uefi",
        "--nodes",
        "1",
        "--routers",
        "0",
        "--wait=240",
    ]);
    let st = c.status_answered();
    let vm = &st["vms"][0];
    assert_eq!(vm["state"], "ready", "{st}");
    assert_eq!(vm["agent"]["hostname"], "vm-001", "{st}");
    assert!(
        st["image"].as_str().unwrap_or("").contains("pubtest"),
        "{st}"
    );
    // systemd-boot passed its loader entry's command line (it adds `initrd=`), and
    // no launcher-provided hostname: that came from SMBIOS.
    let cmdline = c.exec_ok("vm-001", &["cat", "/proc/cmdline"]);
    assert!(cmdline.contains("initrd=\\kimg\\initrd.img"), "{cmdline}");
    assert!(!cmdline.contains("kimg.hostname"), "{cmdline}");
    assert_eq!(c.exec_ok("vm-001", &["hostname"]).trim(), "vm-001");
}
