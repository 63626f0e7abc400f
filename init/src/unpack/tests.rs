//! Tests of the overlay unpacker.

use super::*;
use std::os::unix::fs::MetadataExt;

thread_local! {
    /// Member bytes this thread's unpacker pulled into its copy buffer.
    pub(super) static PULLED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// One raw entry: path, type, link target, mode, data.
type RawEntry<'a> = (&'a str, tar::EntryType, Option<&'a str>, u32, &'a [u8]);

/// An archive of raw headers (tar::Builder refuses some of what tests need).
fn raw_tar(entries: &[RawEntry<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, kind, link, mode, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_mode(*mode);
        h.set_mtime(1_000_000);
        h.set_size(data.len() as u64);
        h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        if let Some(l) = link {
            h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// Issue 15, defect 3, as reproduced: a directory entry, then a symlink entry in
/// its place leading out of the root. The directory's mode, applied when the
/// archive is done, went through the path and so through the symlink: a 0600
/// file outside became 4777. Now nothing outside changes (mode, owner,
/// contents, mtime), on both read paths, and a directory left alone still gets
/// its mode and mtime.
#[test]
fn directory_mode_is_not_applied_through_a_symlink_put_in_its_place() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let outside = t.path().join("outside");
    fs::create_dir_all(&root).unwrap();
    fs::create_dir_all(&outside).unwrap();
    let secret = outside.join("secret");
    fs::write(&secret, "secret").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    set_mtime(&secret, (12345, 0)).unwrap();
    let abs = secret.to_str().unwrap().to_string();
    let before = fs::metadata(&secret).unwrap();
    let data = raw_tar(&[
        ("y", tar::EntryType::Directory, None, 0o4777, b""),
        ("y", tar::EntryType::Symlink, Some(&abs), 0o777, b""),
        // The kernel resolves a relative target from root/, so this one is the
        // same outside file.
        ("w", tar::EntryType::Directory, None, 0o4777, b""),
        (
            "w",
            tar::EntryType::Symlink,
            Some("../outside/secret"),
            0o777,
            b"",
        ),
        ("keep", tar::EntryType::Directory, None, 0o750, b""),
        ("keep/f", tar::EntryType::Regular, None, 0o644, b"f"),
    ]);
    let ar = t.path().join("a.tar");
    fs::write(&ar, &data).unwrap();
    for known in [None, Some(("00", data.len() as u64))] {
        let mut lines = Vec::new();
        let o = unpack_file(&ar, &root, &mut |l| lines.push(l.to_string()), known);
        assert_eq!(o.failed, None, "{lines:?}");
        let after = fs::metadata(&secret).unwrap();
        assert_eq!(after.mode() & 0o7777, 0o600, "outside file's mode changed");
        assert_eq!((after.uid(), after.gid()), (before.uid(), before.gid()));
        assert_eq!(after.mtime(), 12345);
        assert_eq!(fs::read(&secret).unwrap(), b"secret");
        assert!(fs::symlink_metadata(root.join("y")).unwrap().is_symlink());
        // (The second run finds y a symlink already: the directory entry then
        // follows it, inside the root, and that directory gets its mode.)
        assert!(
            known.is_some()
                || lines
                    .iter()
                    .any(|l| l.contains("root/y: mode and mtime not set")),
            "{lines:?}"
        );
        let keep = fs::metadata(root.join("keep")).unwrap();
        assert_eq!((keep.mode() & 0o7777, keep.mtime()), (0o750, 1_000_000));
    }
}

/// Issue 15, defect 11: a tiny archive declaring an 8 GiB sparse member made the
/// unpacker pull 8 GiB of zeros through memory (the boot stalled). Now the holes
/// are seeks: nothing of them passes through the copy buffer, the file has its
/// real size, its data where the map says, and a few blocks allocated. Both
/// read paths: streamed (gzip) and a plain tar with a known hash.
#[test]
fn a_huge_sparse_member_costs_its_data_not_its_size() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    sh(
        "truncate -s 8G big && printf middle | dd of=big bs=1 seek=1048576 conv=notrunc 2>/dev/null && \
         echo tail >> big && tar --sparse -cf ../s.tar big && gzip -c ../s.tar > ../s.tar.gz",
        &src,
    );
    let size = (8u64 << 30) + 5;
    for (a, plain) in [("s.tar.gz", false), ("s.tar", true)] {
        let path = t.path().join(a);
        let bytes = fs::read(&path).unwrap();
        assert!(bytes.len() < 1 << 20, "{a} is {} bytes", bytes.len());
        let known = plain.then_some(("00", bytes.len() as u64));
        let root = t.path().join(format!("r-{a}"));
        fs::create_dir(&root).unwrap();
        PULLED.with(|p| p.set(0));
        let o = unpack_file(&path, &root, &mut |_| {}, known);
        assert_eq!(o.failed, None, "{a}");
        assert!(o.refused.is_empty(), "{a}: {:?}", o.refused);
        assert!(
            PULLED.with(|p| p.get()) < 1 << 20,
            "{a}: zeros read through"
        );
        let f = File::open(root.join("big")).unwrap();
        let md = f.metadata().unwrap();
        assert_eq!(md.len(), size, "{a}");
        assert!(md.blocks() * 512 < 1 << 20, "{a}: {} blocks", md.blocks());
        let at = |off: u64, n: usize| {
            let mut b = vec![0; n];
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, off).unwrap();
            b
        };
        assert_eq!(at(1 << 20, 6), b"middle");
        assert_eq!(at(size - 5, 5), b"tail\n");
        assert_eq!(at(4096, 16), [0; 16]);
    }
}

/// A member whose data could not fit in the free space of the target (a small
/// compressed archive can declare a petabyte) ends the archive before any of it
/// is read or written: no disk filled, no petabyte decompressed to skip it.
#[test]
fn a_member_larger_than_the_free_space_ends_the_archive_at_once() {
    let t = tempfile::tempdir().unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_path("huge").unwrap();
    h.set_mode(0o644);
    h.set_size(1 << 50);
    h.set_cksum();
    let mut raw = h.as_bytes().to_vec();
    raw.extend_from_slice(&[0; 1 << 16]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&raw).unwrap();
    let ar = t.path().join("huge.tar.gz");
    fs::write(&ar, gz.finish().unwrap()).unwrap();
    let root = t.path().join("root");
    fs::create_dir(&root).unwrap();
    PULLED.with(|p| p.set(0));
    let o = unpack_file(&ar, &root, &mut |_| {}, None);
    let why = o.failed.unwrap_or_default();
    assert!(why.contains("huge") && why.contains("free"), "{why:?}");
    assert!(!root.join("huge").exists());
    assert_eq!(PULLED.with(|p| p.get()), 0);
}

/// Runs a shell script in `dir` through the [`crate::reaper::REAPER`] (this test
/// binary reaps every child in the background), returning its stdout.
fn sh(script: &str, dir: &Path) -> String {
    crate::reaper::tests::start_test_reaper();
    let full = format!("cd '{}' && {script}", dir.display());
    let r = crate::exec::run(&["sh".to_string(), "-c".to_string(), full], None);
    assert_eq!(r.exit_code, 0, "{script}: {}", r.stderr);
    r.stdout
}

/// `find` listing of a tree: type, mode, size, link target, sha256 of files.
fn listing(root: &Path) -> String {
    sh("find . -mindepth 1 -printf '%y %m %s %l %T@ %p\\n' | grep -v '^d' | sort; find . -type f -exec sha256sum {} + | sort -k2", root)
}

#[test]
fn matches_gnu_tar_for_a_mixed_archive_and_later_overrides() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    let long = "l".repeat(130);
    sh(
        &format!(
            "mkdir -p a/b {long} && echo one > a/f && chmod 4755 a/f && ln a/f a/hard && \
             ln -s f a/sym && mkdir -p t && chmod 1777 t && echo x > {long}/{long} && \
             truncate -s 10M sparse && echo tail >> sparse && touch -d @1000000 a/f && \
             tar --sort=name --sparse -cf ../one.tar . && \
             echo two > a/f && rm a/hard && ln -s /etc a/hard && tar --format=pax -cJf ../two.tar.xz a && \
             tar --zstd -cf ../three.tar.zst a/f && gzip -c ../one.tar > ../one.tar.gz"
        ),
        &src,
    );
    let gnu = t.path().join("gnu");
    fs::create_dir(&gnu).unwrap();
    for a in ["one.tar", "two.tar.xz", "three.tar.zst"] {
        sh(
            &format!("tar --numeric-owner -xpf {}", t.path().join(a).display()),
            &gnu,
        );
    }
    // Streamed (hashed on the way, decoders) and, for the plain tar with its hash
    // known from an index, sendfile: both come out as GNU tar's extraction.
    for (first, known) in [("one.tar.gz", false), ("one.tar", true)] {
        let ours = t.path().join(format!("ours-{first}"));
        fs::create_dir(&ours).unwrap();
        for a in [first, "two.tar.xz", "three.tar.zst"] {
            let path = t.path().join(a);
            let bytes = fs::read(&path).unwrap();
            let sha = hex(&Sha256::digest(&bytes));
            let known = known.then_some((sha.as_str(), bytes.len() as u64));
            let mut lines = Vec::new();
            let o = unpack_file(&path, &ours, &mut |l| lines.push(l.to_string()), known);
            assert_eq!(o.failed, None, "{a}: {lines:?}");
            assert!(o.refused.is_empty(), "{a}: {:?}", o.refused);
            assert_eq!(o.size, bytes.len() as u64);
            assert_eq!(o.sha256, sha);
        }
        assert_eq!(listing(&ours), listing(&gnu), "{first}");
        let md = fs::metadata(ours.join("sparse")).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert!(
            md.blocks() * 512 < 1 << 20,
            "{first}: sparse file is not sparse"
        );
    }
}

#[test]
fn hostile_entries_change_nothing_outside() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let outside = t.path().join("outside");
    fs::create_dir_all(root.join("dev")).unwrap();
    fs::create_dir_all(root.join("proc")).unwrap();
    fs::create_dir_all(&outside).unwrap();
    fs::write(root.join("dev/vda"), "disk").unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, kind: tar::EntryType, link: Option<&str>, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        // Raw names: tar::Builder would refuse `..` itself.
        let bytes = path.as_bytes();
        h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
        if let Some(l) = link {
            h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_cksum();
        b.append(&h, data).unwrap();
    };
    let out = outside.to_str().unwrap().to_string();
    add("dev/vda", tar::EntryType::Regular, None, b"pwned");
    add("proc/sysrq-trigger", tar::EntryType::Regular, None, b"b");
    add("p", tar::EntryType::Symlink, Some("/proc"), b"");
    add("p/sysrq-trigger", tar::EntryType::Regular, None, b"b");
    add("d", tar::EntryType::Symlink, Some("/dev/vda"), b"");
    add(
        "d",
        tar::EntryType::Regular,
        None,
        b"replaces the link only",
    );
    add("e", tar::EntryType::Symlink, Some("../../dev"), b"");
    add("e/vda", tar::EntryType::Regular, None, b"pwned");
    add("../escape", tar::EntryType::Regular, None, b"pwned");
    add("o", tar::EntryType::Symlink, Some(&out), b"");
    add("o/x", tar::EntryType::Regular, None, b"stays inside");
    add("/abs", tar::EntryType::Regular, None, b"inside");
    add("h", tar::EntryType::Link, Some("dev/vda"), b"");
    add("n", tar::EntryType::Block, None, b"");
    // A directory the unpacker has seen, replaced by a symlink out of the root:
    // what it knew of `y` must not outlive it (else the kernel would follow the
    // link to the real `outside`).
    add("y", tar::EntryType::Directory, None, b"");
    add("y", tar::EntryType::Symlink, Some(&out), b"");
    add("y/z", tar::EntryType::Regular, None, b"inside too");
    let data = b.into_inner().unwrap();
    let ar = t.path().join("hostile.tar");
    fs::write(&ar, &data).unwrap();
    // Streamed, then through the sendfile path (hash known) onto what the first
    // run left (its symlinks included).
    for known in [None, Some(("00", data.len() as u64))] {
        let o = unpack_file(&ar, &root, &mut |_| {}, known);
        assert_eq!(o.failed, None);
        assert_eq!(fs::read(root.join("dev/vda")).unwrap(), b"disk");
        assert!(!root.join("proc/sysrq-trigger").exists());
        assert!(!t.path().join("escape").exists());
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
        // Absolute link targets resolve inside the root (chroot semantics).
        assert_eq!(
            fs::read(root.join(&out[1..]).join("x")).unwrap(),
            b"stays inside"
        );
        assert_eq!(fs::read(root.join("abs")).unwrap(), b"inside");
        assert_eq!(fs::read(root.join("d")).unwrap(), b"replaces the link only");
        assert!(!root.join("h").exists() && !root.join("n").exists());
        assert_eq!(
            fs::read(root.join(&out[1..]).join("z")).unwrap(),
            b"inside too"
        );
        assert_eq!(o.refused.len(), 7, "{:?}", o.refused);
    }
}

#[test]
fn corrupt_and_truncated_archives_fail_with_a_reason() {
    let t = tempfile::tempdir().unwrap();
    sh("mkdir s && head -c 300000 /dev/urandom > s/f && tar --zstd -cf a.tar.zst s && tar -cJf a.tar.xz s && tar -cf a.tar s", t.path());
    for a in ["a.tar.zst", "a.tar.xz", "a.tar"] {
        let bytes = fs::read(t.path().join(a)).unwrap();
        let cut = t.path().join(format!("cut-{a}"));
        fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let root = t.path().join(format!("r-{a}"));
        fs::create_dir(&root).unwrap();
        let o = unpack_file(&cut, &root, &mut |_| {}, None);
        assert!(o.failed.is_some(), "{a}: {o:?}");
        // The same with the hash known (a plain tar then takes the sendfile path).
        let known = Some(("00", bytes.len() as u64 / 2));
        let o = unpack_file(&cut, &root, &mut |_| {}, known);
        assert!(o.failed.is_some(), "{a} (known hash): {o:?}");
    }
}

/// The hot-apply check names each entry that could never be written and writes
/// nothing; a clean archive (compressed too) has nothing to name.
#[test]
fn precheck_names_what_is_always_refused_and_writes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let bad = raw_tar(&[
        ("./", tar::EntryType::Directory, None, 0o755, b""),
        ("etc/ok", tar::EntryType::Regular, None, 0o644, b"fine"),
        ("../../etc/evil", tar::EntryType::Regular, None, 0o644, b"x"),
        ("proc/x", tar::EntryType::Regular, None, 0o644, b"x"),
        ("etc/disk", tar::EntryType::Block, None, 0o600, b""),
        ("etc/l", tar::EntryType::Link, Some("../shadow"), 0o644, b""),
    ]);
    let p = t.path().join("bad.tar");
    fs::write(&p, &bad).unwrap();
    let refused = precheck(&p, 10).unwrap();
    assert_eq!(refused.len(), 4, "{refused:?}");
    assert!(refused[0].starts_with("../../etc/evil: "), "{refused:?}");
    assert!(refused[1].contains("/proc"), "{refused:?}");
    assert!(refused[2].contains("device"), "{refused:?}");
    assert!(
        refused[3].starts_with("etc/l: hard link target"),
        "{refused:?}"
    );
    assert_eq!(precheck(&p, 1).unwrap().len(), 1);
    let good = raw_tar(&[("etc/ok", tar::EntryType::Regular, None, 0o644, b"fine")]);
    let z = t.path().join("good.tar.gz");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &good).unwrap();
    fs::write(&z, gz.finish().unwrap()).unwrap();
    assert_eq!(precheck(&z, 10).unwrap(), Vec::<String>::new());
    fs::write(&z, b"\x1f\x8bnot gzip").unwrap();
    assert!(precheck(&z, 10).unwrap_err().contains("good.tar.gz"));
    assert!(!t.path().join("etc").exists());
}
