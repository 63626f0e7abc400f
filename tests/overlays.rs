//! End-to-end: `kimg mkcdrom` writes a cdrom xorriso reads back in order, and one VM
//! booted with it unpacks the overlays exactly as GNU tar does on the host (later
//! overlays overriding earlier ones), refuses a hostile archive without harm, runs
//! the start hooks and reports every overlay in its status.

use kimg_tests::{image, kimg, text, TestCluster};
use std::fs;
use std::path::Path;
use std::process::Command;

/// One node of the test image, ready, with `extra` arguments to `kimg run`.
fn run_one_vm(name: &str, extra: &[&str]) -> TestCluster {
    let img = image().image.to_str().unwrap();
    let c = TestCluster::new(name);
    let mut args = vec![
        "--image",
        img,
        "--nodes",
        "1",
        "--routers",
        "0",
        "--wait=240",
    ];
    args.extend_from_slice(extra);
    let run = c.kimg("run", &args);
    assert!(run.status.success(), "kimg run:\n{}", text(&run));
    c
}

fn sh(script: &str, dir: &Path) -> String {
    let o = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{script}:\n{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// One line per path under `.`: type, mode, uid, gid, size, mtime (not for
/// directories: entries written into them move it), link target, sha256. Run with
/// busybox on both sides so that the formats match.
const LISTING: &str = r#"find . | sort | while read -r f; do
  if [ -L "$f" ]; then echo "$f link $(stat -c '%a %u %g %Y' "$f") -> $(readlink "$f")";
  elif [ -d "$f" ]; then echo "$f dir $(stat -c '%a %u %g' "$f")";
  else echo "$f file $(stat -c '%a %u %g %s %Y %h' "$f") $(sha256sum < "$f" | cut -c1-64)"; fi
done"#;

/// A tar with raw entry names and links (tar::Builder refuses `..`).
fn hostile_tar(path: &Path) {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, kind: tar::EntryType, link: Option<&str>, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = link {
            h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_cksum();
        b.append(&h, data).unwrap();
    };
    use tar::EntryType::{Link, Regular, Symlink};
    add("dev/vda", Regular, None, b"PWNED");
    add("proc/sysrq-trigger", Regular, None, b"c");
    add("srv/hostile/p", Symlink, Some("/proc"), b"");
    add("srv/hostile/p/sysrq-trigger", Regular, None, b"c");
    add("srv/hostile/d", Symlink, Some("/dev"), b"");
    add("srv/hostile/d/vda", Regular, None, b"PWNED");
    add("srv/hostile/disk", Symlink, Some("/dev/vda"), b"");
    add("srv/hostile/disk/x", Regular, None, b"PWNED");
    add("srv/hostile/up", Symlink, Some("../../../../dev"), b"");
    add("srv/hostile/up/vda", Regular, None, b"PWNED");
    add("../escape", Regular, None, b"PWNED");
    add("srv/../../escape2", Regular, None, b"PWNED");
    add("/run/kimg/cdrom/x", Regular, None, b"PWNED");
    add("srv/hostile/hard", Link, Some("dev/vda"), b"");
    // Issue 15, defect 3: a directory, then a symlink in its place; the directory's
    // mode (0644), set when the archive is done, must not reach /dev/vda.
    add("srv/hostile/y", tar::EntryType::Directory, None, b"");
    add("srv/hostile/y", Symlink, Some("/dev/vda"), b"");
    add(
        "/srv/hostile/absolute",
        Regular,
        None,
        b"lands under the root",
    );
    fs::write(path, b.into_inner().unwrap()).unwrap();
}
/// Entries of [`hostile_tar`] that must be refused.
const HOSTILE_REFUSED: usize = 10;

#[test]
fn overlays_unpack_like_gnu_tar_hostile_ones_change_nothing() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    let long = "n".repeat(140);
    // Three archives: plain tar, tar.xz (PAX), tar.zst; later ones override.
    sh(
        &format!(
            "mkdir -p srv/ovl/{long} srv/ovl/sticky usr/local/bin && chmod 1777 srv/ovl/sticky && \
             echo v1 > srv/ovl/shared && echo keep > srv/ovl/only-one && \
             printf '#!/bin/sh\\necho hi\\n' > usr/local/bin/ovl-tool && chmod 4755 usr/local/bin/ovl-tool && \
             ln usr/local/bin/ovl-tool srv/ovl/hardlink && ln -s ../../usr/local/bin/ovl-tool srv/ovl/sym && \
             echo deep > srv/ovl/{long}/{long} && truncate -s 8M srv/ovl/sparse && echo end >> srv/ovl/sparse && \
             touch -d @1600000000 srv/ovl/only-one && \
             tar --sparse --numeric-owner --owner=0 --group=0 -cf ../one.tar srv usr && \
             echo v2 > srv/ovl/shared && chmod 600 srv/ovl/shared && rm srv/ovl/sym && ln -s shared srv/ovl/sym && \
             tar --format=pax --owner=0 --group=0 -cJf ../two.tar.xz srv/ovl/shared srv/ovl/sym && \
             echo v3 > srv/ovl/shared && chmod 640 srv/ovl/shared && echo three > srv/ovl/three && \
             tar --owner=7 --group=8 --zstd -cf ../three.tar.zst srv/ovl/shared srv/ovl/three && \
             mkdir -p ../b/srv/broken && head -c 300000 /dev/urandom > ../b/srv/broken/f && \
             tar -C ../b --zstd -cf ../broken-full.tar.zst srv"
        ),
        &src,
    );
    let hostile = t.path().join("hostile.tar");
    hostile_tar(&hostile);
    // A truncated archive: that overlay fails, the boot goes on, the VM is degraded.
    let full = fs::read(t.path().join("broken-full.tar.zst")).unwrap();
    fs::write(t.path().join("broken.tar.zst"), &full[..full.len() / 2]).unwrap();

    // The cdrom: command-line order, read back by xorriso.
    let iso = t.path().join("cdrom.iso");
    let archives = [
        "one.tar",
        "hostile.tar",
        "two.tar.xz",
        "three.tar.zst",
        "broken.tar.zst",
    ];
    let mut args = vec!["mkcdrom", "--out", iso.to_str().unwrap(), "test"];
    let paths: Vec<String> = archives
        .iter()
        .map(|a| t.path().join(a).to_string_lossy().into_owned())
        .collect();
    args.extend(paths.iter().map(String::as_str));
    let o = kimg(t.path(), &args);
    assert!(o.status.success(), "{}", text(&o));
    let ls = sh(
        &format!(
            "xorriso -indev {} -find / -type f -exec lsdl 2>/dev/null",
            iso.display()
        ),
        t.path(),
    );
    let names: Vec<&str> = ls
        .lines()
        .filter_map(|l| l.rsplit_once(" '/").map(|(_, n)| n.trim_end_matches('\'')))
        .collect();
    let want = [
        "01-test.tar.zst",
        "02-one.tar",
        "03-hostile.tar",
        "04-two.tar.xz",
        "05-three.tar.zst",
        "06-broken.tar.zst",
        kimg_contract::cdrom::INDEX_NAME,
    ];
    assert_eq!(names, want, "{ls}");

    // What GNU tar makes of the same archives (hostile one excluded: it is refused).
    let gnu = t.path().join("gnu");
    fs::create_dir(&gnu).unwrap();
    for a in ["one.tar", "two.tar.xz", "three.tar.zst"] {
        sh(
            &format!("tar --numeric-owner -xpf {}", t.path().join(a).display()),
            &gnu,
        );
    }
    let expected = sh(
        &format!(
            "cd srv/ovl && busybox sh -c '{}'",
            LISTING.replace('\'', "'\\''")
        ),
        &gnu,
    ) + &sh("busybox stat -c '%a %u %g %s' usr/local/bin/ovl-tool", &gnu);

    let c = run_one_vm("e2e-ovl", &["--cdrom", iso.to_str().unwrap()]);

    let got = c.exec_ok(
        "vm-001",
        &["sh", "-c", &format!("cd /srv/ovl && {LISTING}")],
    ) + &c.exec_ok(
        "vm-001",
        &["stat", "-c", "%a %u %g %s", "/usr/local/bin/ovl-tool"],
    );
    assert_eq!(got, expected);
    assert!(got.contains("./shared file 640 7 8 3"), "{got}");
    // The sparse member stayed sparse (8 MiB apparent, a few KiB allocated).
    let blocks = c.exec_ok("vm-001", &["stat", "-c", "%b", "/srv/ovl/sparse"]);
    assert!(blocks.trim().parse::<u64>().unwrap() < 1024, "{blocks}");

    // The hostile archive changed nothing it must not.
    let check = c.exec_ok(
        "vm-001",
        &[
            "sh",
            "-c",
            "[ -b /dev/vda ] && echo vda-is-block; head -c 5 /dev/vda | grep -q PWNED && echo vda-pwned; \
             [ \"$(stat -c %a /dev/vda)\" = 644 ] && echo vda-chmodded; \
             ls /escape /escape2 /run/kimg/cdrom/x /srv/hostile/hard 2>/dev/null; \
             cat /srv/hostile/absolute; echo; readlink /srv/hostile/disk; readlink /proc/1/exe",
        ],
    );
    assert_eq!(
        check, "vda-is-block\nlands under the root\n/dev/vda\n/usr/sbin/kimg-init\n",
        "{check}"
    );

    // Status: every overlay with its hash, size and result; the VM is ready.
    let st = c.status_answered();
    let vm = &st["vms"][0];
    assert_eq!(vm["state"], "degraded", "{vm}");
    let problems = vm["agent"]["problems"].to_string();
    assert!(
        problems.contains("overlay 06-broken.tar.zst: failed"),
        "{problems}"
    );
    let ovs = vm["agent"]["overlays"].as_array().unwrap();
    let names: Vec<&str> = ovs.iter().map(|o| o["name"].as_str().unwrap()).collect();
    // The index is no overlay; its hashes are what status reports.
    assert_eq!(names, want[..want.len() - 1]);
    assert!(!problems.contains("kimg-index"), "{problems}");
    for (o, a) in ovs[1..].iter().zip(archives) {
        let (sha, size) = kimg_util::hash::file_sha256(&t.path().join(a)).unwrap();
        assert_eq!(o["sha256"], sha.as_str(), "{o}");
        assert_eq!(o["size"], size, "{o}");
        assert_eq!(o["this_boot"], true, "{o}");
    }
    let results: Vec<&str> = ovs.iter().map(|o| o["result"].as_str().unwrap()).collect();
    let refused = format!("ok, {HOSTILE_REFUSED} entries refused");
    assert_eq!(results[..5], ["ok", "ok", refused.as_str(), "ok", "ok"]);
    assert!(results[5].starts_with("failed: "), "{results:?}");
    let console = c.exec_ok("vm-001", &["dmesg"]);
    assert!(
        console.contains("overlay 03-hostile.tar: refused dev/vda"),
        "{console}"
    );

    // The test overlay's start hook ran with the VM's identity, logged to start.d.log.
    let env = c.exec_ok("vm-001", &["cat", "/var/lib/kimg-test/start.env"]);
    assert_eq!(
        env, "KIMG_HOSTNAME=vm-001\nKIMG_ROLE=node\nKIMG_VM_NUMBER=1\n",
        "{env}"
    );
    let log = c.exec_ok("vm-001", &["cat", "/var/log/kimg/start.d.log"]);
    assert!(log.contains("kimg-test hook: vm 1 (node) vm-001"), "{log}");
    let applied = c.exec_ok("vm-001", &["cat", "/var/lib/kimg/overlays.applied"]);
    assert!(applied.contains("05-three.tar.zst"), "{applied}");

    // The VM survived (no sysrq crash) and powers off cleanly.
    let stop = c.kimg("stop", &[]);
    assert!(stop.status.success(), "{}", text(&stop));
}

/// `--append kimg.cdrom=off`: the cdrom is attached but kimg-init leaves it alone
/// (nothing unpacked, nothing recorded), and it can be mounted by hand.
#[test]
fn cdrom_off_attaches_without_unpacking() {
    let c = run_one_vm("e2e-cdrom-off", &["--append", "kimg.cdrom=off", "test"]);
    let st = c.status_answered();
    let vm = &st["vms"][0];
    assert_eq!(vm["state"], "ready", "{vm}");
    assert_eq!(vm["agent"]["overlays"], serde_json::json!([]), "{vm}");
    let cmdline = c.exec_ok("vm-001", &["cat", "/proc/cmdline"]);
    assert!(
        cmdline.trim_end().ends_with("kimg.cdrom kimg.cdrom=off"),
        "{cmdline}"
    );
    let listed = c.exec_ok(
        "vm-001",
        &[
            "sh",
            "-c",
            "test ! -e /var/lib/kimg/overlays.applied && mkdir -p /mnt/cd && \
             mount -t iso9660 -o ro /dev/sr0 /mnt/cd && ls /mnt/cd",
        ],
    );
    assert_eq!(
        listed.split_whitespace().collect::<Vec<_>>(),
        ["01-test.tar.zst", "kimg-index"]
    );
    // --append is for direct kernel boot; with --uefi the loader entry decides.
    let o = c.kimg("run", &["--uefi", "--append", "quiet"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("--append"), "{}", text(&o));
}
