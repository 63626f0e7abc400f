//! End-to-end tests: build real images and check them with qemu-img, sgdisk,
//! fsck.vfat, e2fsck and debugfs.

use super::*;
use kimg_util::cmd;
use std::os::unix::fs::{lchown, symlink, PermissionsExt};
use std::process::Command;

const MTIME: u64 = 1_700_000_000;

fn sh(program: &str, args: &[&str]) -> String {
    cmd::run_stdout(Command::new(program).args(args)).unwrap()
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A staging tree with the cases that matter, plus two ESP files.
struct Fixture {
    dir: tempfile::TempDir,
    root: PathBuf,
    esp_files: Vec<(String, PathBuf)>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::create_dir_all(root.join("etc/deep/er")).unwrap();
        fs::create_dir_all(root.join("home/user")).unwrap();
        let mode = |rel: &str, m: u32| {
            fs::set_permissions(root.join(rel), fs::Permissions::from_mode(m)).unwrap()
        };
        fs::write(root.join("bin/tool"), b"#!/bin/sh\necho tool\n").unwrap();
        mode("bin/tool", 0o755);
        fs::write(root.join("bin/suid"), vec![0x7fu8; 10_000]).unwrap();
        mode("bin/suid", 0o4755);
        fs::write(root.join("etc/deep/er/file.conf"), b"a=1\n").unwrap();
        symlink("bin/tool", root.join("link")).unwrap();
        fs::write(root.join("home/user/notes"), b"mine\n").unwrap();
        // The tests run as root: give some entries a normal user's ids, as a
        // non-root kimg run would, so the debugfs fix-up is exercised.
        if nix::unistd::geteuid().is_root() {
            for rel in ["home/user", "home/user/notes", "link"] {
                lchown(root.join(rel), Some(1000), Some(1000)).unwrap();
            }
        }
        let kernel = dir.path().join("vmlinuz");
        let blob: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        fs::write(&kernel, blob).unwrap();
        let entry = dir.path().join("kimg.conf");
        fs::write(&entry, b"title kimg\nlinux /kimg/vmlinuz\n").unwrap();
        Fixture {
            esp_files: vec![
                ("kimg/vmlinuz".into(), kernel),
                ("loader/entries/kimg.conf".into(), entry),
            ],
            root,
            dir,
        }
    }

    fn spec(&self, seed: u8) -> DiskSpec<'_> {
        DiskSpec {
            esp_files: &self.esp_files,
            root_dir: &self.root,
            size: 256 * MIB,
            esp_size: ESP_MIN_SIZE,
            seed: [seed; 32],
            mtime: MTIME,
            compress: false,
            keep_owners: &[],
        }
    }
}

/// Names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Copies `size` bytes at `offset` of `raw` into a new file `out`.
fn slice(raw: &Path, offset: u64, size: u64, out: &Path) {
    sh(
        "dd",
        &[
            &format!("if={}", s(raw)),
            &format!("of={}", s(out)),
            "bs=1M",
            &format!("skip={}", offset / MIB),
            &format!("count={}", size / MIB),
            "status=none",
        ],
    );
}

#[test]
fn image_passes_standard_tools() {
    let fx = Fixture::new();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("hd.qcow2");
    let parts = build_disk(&fx.spec(1), &out).unwrap();
    assert_eq!(listing(work.path()), ["hd.qcow2"], "temp files left");

    sh("qemu-img", &["check", s(&out)]);
    let info = sh("qemu-img", &["info", s(&out)]);
    assert!(info.contains("file format: qcow2"), "{info}");
    assert!(info.contains("compat: 1.1"), "{info}");
    assert!(info.contains("virtual size: 256 MiB"), "{info}");

    let raw = work.path().join("hd.raw");
    sh(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", s(&out), s(&raw)],
    );
    let verify = sh("sgdisk", &["-v", s(&raw)]);
    assert!(verify.contains("No problems found"), "{verify}");
    let table = sh("sgdisk", &["-p", s(&raw)]);
    assert!(
        table.contains("kimg-esp") && table.contains("kimg-root"),
        "{table}"
    );
    let info1 = sh("sgdisk", &["-i", "1", s(&raw)]).to_lowercase();
    assert!(info1.contains(&parts[0].part_uuid), "{info1}");
    assert!(
        info1.contains("c12a7328-f81f-11d2-ba4b-00a0c93ec93b"),
        "{info1}"
    );
    let info2 = sh("sgdisk", &["-i", "2", s(&raw)]).to_lowercase();
    assert!(info2.contains(&parts[1].part_uuid), "{info2}");
    assert!(
        info2.contains("4f68bce3-e8cd-4db1-96e7-fbcaf984b709"),
        "{info2}"
    );

    let (esp, root) = (&parts[0], &parts[1]);
    assert_eq!((esp.name.as_str(), esp.fs.as_str()), ("kimg-esp", "vfat"));
    assert_eq!(
        (root.name.as_str(), root.fs.as_str()),
        ("kimg-root", "ext4")
    );
    assert_eq!((esp.offset, esp.size), (MIB, 64 * MIB));
    assert_eq!(root.offset, 65 * MIB);
    assert_eq!(root.offset + root.size, 255 * MIB);
    assert_eq!(esp.fs_uuid.len(), 8);

    let esp_raw = work.path().join("esp.raw");
    slice(&raw, esp.offset, esp.size, &esp_raw);
    sh("fsck.vfat", &["-n", s(&esp_raw)]);
    // FAT32 boot sector: volume id at 67, label at 71, type at 82.
    let boot = fs::read(&esp_raw).unwrap();
    let id = u32::from_le_bytes(boot[67..71].try_into().unwrap());
    assert_eq!(format!("{id:08x}"), esp.fs_uuid);
    assert_eq!(&boot[71..82], b"KIMG-ESP   ");
    assert_eq!(&boot[82..90], b"FAT32   ");
    let root_raw = work.path().join("root.raw");
    slice(&raw, root.offset, root.size, &root_raw);
    sh("e2fsck", &["-fn", s(&root_raw)]);

    let header = sh("dumpe2fs", &["-h", s(&root_raw)]);
    assert!(header.contains(&root.fs_uuid), "{header}");
    assert!(header.contains("Maximum mount count:      -1"), "{header}");
    assert!(header.contains("Check interval:           0"), "{header}");
    let stat = |path: &str| sh("debugfs", &["-R", &format!("stat {path}"), s(&root_raw)]);
    for path in ["/home/user", "/home/user/notes", "/link", "/bin/tool", "/"] {
        let st = stat(path);
        assert!(st.contains("User:     0   Group:     0"), "{path}: {st}");
        assert!(st.contains("mtime: 0x6553f100:00000000"), "{path}: {st}");
        assert!(st.contains("ctime: 0x6553f100:00000000"), "{path}: {st}");
    }
    assert!(stat("/bin/tool").contains("Mode:  0755"));
    assert!(stat("/bin/suid").contains("Mode:  04755"));
    assert!(stat("/link").contains("Type: symlink"));
    let cat = sh(
        "debugfs",
        &["-R", "cat /etc/deep/er/file.conf", s(&root_raw)],
    );
    assert_eq!(cat, "a=1\n");

    let dest = work.path().join("boot");
    let got =
        extract_esp_files(&out, &["kimg/vmlinuz", "loader/entries/kimg.conf"], &dest).unwrap();
    assert_eq!(got, [dest.join("vmlinuz"), dest.join("kimg.conf")]);
    for (g, (_, host)) in got.iter().zip(&fx.esp_files) {
        assert_eq!(fs::read(g).unwrap(), fs::read(host).unwrap());
    }
    assert_eq!(listing(&dest), ["kimg.conf", "vmlinuz"], "temp files left");
    let err = extract_esp_files(&out, &["kimg/nope"], &dest).unwrap_err();
    assert!(
        matches!(&err, DiskError::MissingEspFile { path, .. } if path == "kimg/nope"),
        "{err}"
    );
    assert!(err.to_string().contains("hd.qcow2"), "{err}");
}

/// A compressed build is a valid qcow2 with zstd clusters, smaller, with the same
/// disk content as the plain one, and still deterministic.
#[test]
fn compressed_image_is_smaller_and_holds_the_same_disk() {
    let fx = Fixture::new();
    let work = tempfile::tempdir().unwrap();
    let (plain, packed, again) = (
        work.path().join("plain.qcow2"),
        work.path().join("packed.qcow2"),
        work.path().join("again.qcow2"),
    );
    build_disk(&fx.spec(1), &plain).unwrap();
    let spec = DiskSpec {
        compress: true,
        ..fx.spec(1)
    };
    build_disk(&spec, &packed).unwrap();
    build_disk(&spec, &again).unwrap();
    sh("qemu-img", &["check", s(&packed)]);
    let info = sh("qemu-img", &["info", s(&packed)]);
    assert!(info.contains("compression type: zstd"), "{info}");
    let size = |p: &Path| fs::metadata(p).unwrap().len();
    assert!(size(&packed) < size(&plain), "{info}");
    let cmp = sh("qemu-img", &["compare", s(&plain), s(&packed)]);
    assert!(cmp.contains("Images are identical"), "{cmp}");
    assert_eq!(
        kimg_util::hash::file_sha256(&packed).unwrap(),
        kimg_util::hash::file_sha256(&again).unwrap()
    );
}

#[test]
fn same_inputs_same_bytes() {
    let fx = Fixture::new();
    let work = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        work.path().join("a.qcow2"),
        work.path().join("b.qcow2"),
        work.path().join("c.qcow2"),
    );
    let pa = build_disk(&fx.spec(1), &a).unwrap();
    // Host atimes/ctimes move between builds; the image must not.
    fs::read(fx.root.join("bin/tool")).unwrap();
    lchown(fx.root.join("bin/tool"), Some(0), Some(0)).unwrap();
    let pb = build_disk(&fx.spec(1), &b).unwrap();
    assert_eq!(pa, pb);
    assert_eq!(
        kimg_util::hash::file_sha256(&a).unwrap(),
        kimg_util::hash::file_sha256(&b).unwrap()
    );
    let pc = build_disk(&fx.spec(2), &c).unwrap();
    for (x, y) in pa.iter().zip(&pc) {
        assert_ne!(x.part_uuid, y.part_uuid);
        assert_ne!(x.fs_uuid, y.fs_uuid);
        assert_eq!(x.type_guid, y.type_guid);
    }
}

#[test]
fn failures_leave_nothing_behind() {
    let fx = Fixture::new();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("hd.qcow2");
    let check = |spec: &DiskSpec| {
        let err = build_disk(spec, &out).unwrap_err();
        assert!(listing(work.path()).is_empty(), "{err}: left files");
        err
    };

    let mut spec = fx.spec(1);
    spec.size = 70 * MIB;
    assert!(matches!(
        check(&spec),
        DiskError::TooSmall { what: "disk", .. }
    ));

    let missing = fx.dir.path().join("missing");
    let mut spec = fx.spec(1);
    spec.root_dir = &missing;
    assert!(matches!(check(&spec), DiskError::Io { .. }));

    let mut spec = fx.spec(1);
    spec.esp_size = 32 * MIB;
    assert!(matches!(check(&spec), DiskError::Spec(_)));

    // Fits the cheap estimate but not ext4 with its journal: fails inside mkfs,
    // after the temporary directory exists.
    let big = tempfile::tempdir().unwrap();
    fs::write(big.path().join("blob"), vec![0x55u8; 19 << 20]).unwrap();
    let mut spec = fx.spec(1);
    spec.root_dir = big.path();
    spec.size = 86 * MIB;
    let err = check(&spec);
    assert!(matches!(err, DiskError::Command(_)), "{err}");

    // A pre-existing file at `out` survives a failed build untouched.
    fs::write(&out, b"old").unwrap();
    assert!(build_disk(&spec, &out).is_err());
    assert_eq!(listing(work.path()), ["hd.qcow2"]);
    assert_eq!(fs::read(&out).unwrap(), b"old");
}

#[test]
fn layout_rules() {
    let l = Layout::new(2 << 30, ESP_MIN_SIZE).unwrap();
    assert_eq!(
        (l.esp_offset, l.esp_size, l.root_offset),
        (MIB, 64 * MIB, 65 * MIB)
    );
    assert_eq!(l.root_offset + l.root_size, (2 << 30) - MIB);
    assert!(Layout::new((2 << 30) + 1, ESP_MIN_SIZE).is_err());
    assert!(Layout::new(2 << 30, ESP_MIN_SIZE + 1).is_err());
    assert!(Layout::new(81 * MIB, ESP_MIN_SIZE).is_err());
    assert!(Layout::new(82 * MIB, ESP_MIN_SIZE).is_ok());
}

/// Timing of a realistic build: `KIMG_BENCH_ROOT=<staging dir> KIMG_BENCH_ESP=<dir
/// with vmlinuz and initrd.img> [KIMG_BENCH_OUT=<keep image here>] cargo test -p kimg bench_2g -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_2g() {
    let root = PathBuf::from(std::env::var("KIMG_BENCH_ROOT").unwrap());
    let esp = PathBuf::from(std::env::var("KIMG_BENCH_ESP").unwrap());
    let esp_files = vec![
        ("kimg/vmlinuz".to_string(), esp.join("vmlinuz")),
        ("kimg/initrd.img".to_string(), esp.join("initrd.img")),
    ];
    let work = tempfile::tempdir_in(&esp).unwrap();
    let out = work.path().join("hd.qcow2");
    let spec = DiskSpec {
        esp_files: &esp_files,
        root_dir: &root,
        size: 2 << 30,
        esp_size: ESP_MIN_SIZE,
        seed: [3; 32],
        mtime: MTIME,
        compress: false,
        keep_owners: &[],
    };
    let t = std::time::Instant::now();
    build_disk(&spec, &out).unwrap();
    let built = t.elapsed();
    let t = std::time::Instant::now();
    let dest = work.path().join("boot");
    extract_esp_files(&out, &["kimg/vmlinuz", "kimg/initrd.img"], &dest).unwrap();
    let size = fs::metadata(&out).unwrap().len();
    eprintln!(
        "build_disk: {built:?}, qcow2 {} MB; extract_esp_files: {:?}",
        size / 1_000_000,
        t.elapsed()
    );
    if let Some(keep) = std::env::var_os("KIMG_BENCH_OUT") {
        fs::rename(&out, keep).unwrap();
    }
}
