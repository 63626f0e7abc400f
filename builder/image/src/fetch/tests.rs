//! fetch from a local file and from an HTTP server on 127.0.0.1 (with Range support,
//! [`crate::testserver`]) started by the test.

use super::*;
use crate::publish::{publish, Codec, PublishOptions};
use crate::testserver::serve;

/// A published fake image: returns (dir with hd.img.xz/.sha256/hd.json, raw bytes).
fn published(dir: &Path, codec: Codec) -> (PathBuf, Vec<u8>) {
    let img = dir.join("hd.img");
    let mut data = Vec::new();
    for i in 0u32..300_000 {
        data.extend_from_slice(&(i.wrapping_mul(2_654_435_761) >> 7).to_le_bytes());
    }
    data.resize(data.len() + (2 << 20), 0);
    fs::write(&img, &data).unwrap();
    let m = r#"{"format":1,"kimg_version":"0","flavour":"base","kernel":{"version":"6.1.0-test","cmdline":"c","esp_kernel":"a","esp_initrd":"b","config_sha256":""},"disk_size":1,"partitions":[],"components":[]}"#;
    fs::write(dir.join("hd.json"), m).unwrap();
    let out = dir.join("pub");
    publish(
        &PublishOptions {
            image: img,
            out_dir: out.clone(),
            level: 1,
            threads: 2,
            codec,
        },
        &|_, _| {},
    )
    .unwrap();
    (out, data)
}

fn opts(src: String, cache: &Path) -> FetchOptions {
    FetchOptions {
        src,
        sha256: None,
        name: None,
        cache: cache.to_path_buf(),
    }
}

#[test]
fn local_xz_and_zstd_are_verified_decompressed_and_listed() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    for (codec, name) in [(Codec::Xz, "hd"), (Codec::Zstd, "z")] {
        let sub = dir.path().join(name);
        fs::create_dir(&sub).unwrap();
        let (out, data) = published(&sub, codec);
        let mut o = opts(
            out.join(format!("hd{}", codec.suffix()))
                .display()
                .to_string(),
            &cache,
        );
        o.name = Some(name.into());
        let got = fetch(&o, &|_, _, _| {}).unwrap();
        assert_eq!(fs::read(&got.path).unwrap(), data);
        assert_eq!(got.kernel, "6.1.0-test");
    }
    let names: Vec<String> = list(&cache).unwrap().into_iter().map(|c| c.name).collect();
    assert_eq!(names, ["hd", "z"]);
    // Nothing hidden left behind.
    for e in fs::read_dir(images_dir(&cache)).unwrap() {
        let n = e.unwrap().file_name();
        assert!(!n.to_string_lossy().starts_with('.'), "{n:?}");
    }
}

#[test]
fn mismatch_is_an_error_and_caches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let (out, _) = published(dir.path(), Codec::Xz);
    let mut o = opts(out.join("hd.img.xz").display().to_string(), &cache);
    o.sha256 = Some("00".repeat(32));
    let e = fetch(&o, &|_, _, _| {}).unwrap_err();
    assert!(matches!(e, FetchError::Mismatch { .. }), "{e}");
    assert!(list(&cache).unwrap().is_empty());
    assert_eq!(fs::read_dir(images_dir(&cache)).unwrap().count(), 0);
    // A missing .sha256 is an error that says what to pass.
    fs::remove_file(out.join("hd.img.xz.sha256")).unwrap();
    o.sha256 = None;
    let e = fetch(&o, &|_, _, _| {}).unwrap_err().to_string();
    assert!(e.contains("--sha256"), "{e}");
}

#[test]
fn http_download_resumes_with_range_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let (out, data) = published(dir.path(), Codec::Xz);
    let (base, seen) = serve(out, Some(".xz"));
    let o = opts(format!("{base}/hd.img.xz"), &cache);
    // The connection drops halfway: an error that says how to resume, no image cached.
    let e = fetch(&o, &|_, _, _| {}).unwrap_err().to_string();
    assert!(e.contains("resume"), "{e}");
    assert!(list(&cache).unwrap().is_empty());
    // The second run asks only for the rest.
    let got = fetch(&o, &|_, _, _| {}).unwrap();
    assert_eq!(fs::read(&got.path).unwrap(), data);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0], "");
    assert!(
        seen[1].starts_with("bytes=") && seen[1] != "bytes=0-",
        "{seen:?}"
    );
    // The partial download is gone once the image is cached.
    assert_eq!(fs::read_dir(cache.join("downloads")).unwrap().count(), 0);
}

#[test]
fn names_sources_and_dates() {
    assert_eq!(
        split_src("http://h/x/hd.img.xz?a=1").unwrap(),
        ("hd".into(), "http://h/x/hd.json".into())
    );
    assert_eq!(
        split_src("/a/k8s.img.zst").unwrap(),
        ("k8s".into(), "/a/k8s.json".into())
    );
    assert!(split_src("/a/hd.img").is_err());
    assert!(valid_name("hd-k8s_1.2").is_ok());
    assert!(valid_name("../x").is_err());
    assert!(valid_name(".x").is_err());
    assert_eq!(utc_date(0), "1970-01-01 00:00");
    assert_eq!(utc_date(1_700_000_000), "2023-11-14 22:13");
}

/// The `.sha256` covers NAME.json: a manifest changed after publishing (it feeds
/// every VM's kernel command line) is refused before anything is decompressed.
#[test]
fn a_manifest_changed_after_publishing_is_refused_and_nothing_cached() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let (out, _) = published(dir.path(), Codec::Xz);
    let sums = fs::read_to_string(out.join("hd.img.xz.sha256")).unwrap();
    assert_eq!(sums.lines().count(), 2, "{sums}");
    assert!(
        sums.lines().nth(1).unwrap().ends_with("  hd.json"),
        "{sums}"
    );
    let json = out.join("hd.json");
    let evil = fs::read_to_string(&json)
        .unwrap()
        .replace("\"c\"", "\"c init=/bin/sh\"");
    fs::write(&json, evil).unwrap();
    let o = opts(out.join("hd.img.xz").display().to_string(), &cache);
    let e = fetch(&o, &|_, _, _| {}).unwrap_err();
    assert!(
        matches!(&e, FetchError::Mismatch { src, .. } if src.ends_with("hd.json")),
        "{e}"
    );
    assert!(list(&cache).unwrap().is_empty());
}

/// A `.sha256` from before manifests were covered (one line) still works, with a
/// note that the manifest was not verified.
#[test]
fn an_old_single_line_sha256_is_read_with_a_note() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let (out, data) = published(dir.path(), Codec::Zstd);
    let sum = out.join("hd.img.zst.sha256");
    let first = fs::read_to_string(&sum)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string();
    fs::write(&sum, format!("{first}\n")).unwrap();
    let got = fetch(
        &opts(out.join("hd.img.zst").display().to_string(), &cache),
        &|_, _, _| {},
    )
    .unwrap();
    assert_eq!(fs::read(&got.path).unwrap(), data);
    assert_eq!(got.notes.len(), 1, "{:?}", got.notes);
    assert!(got.notes[0].contains("hd.json"), "{:?}", got.notes);
    // The current format gives no note.
    let sub = dir.path().join("x");
    fs::create_dir(&sub).unwrap();
    let (out2, _) = published(&sub, Codec::Xz);
    let mut o = opts(out2.join("hd.img.xz").display().to_string(), &cache);
    o.name = Some("x".into());
    assert!(fetch(&o, &|_, _, _| {}).unwrap().notes.is_empty());
}

/// An archive that inflates past what its manifest's disk can hold stops at the
/// bound, before its checksum is known, and caches nothing.
#[test]
fn output_past_the_manifests_disk_size_stops_at_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let img = dir.path().join("hd.img");
    // 40 MiB of zeros: a tiny archive, far past disk_size 1 + 16 MiB of slack.
    fs::File::create(&img).unwrap().set_len(40 << 20).unwrap();
    let m = r#"{"format":1,"kimg_version":"0","flavour":"base","kernel":{"version":"6.1.0-test","cmdline":"c","esp_kernel":"a","esp_initrd":"b","config_sha256":""},"disk_size":1,"partitions":[],"components":[]}"#;
    fs::write(dir.path().join("hd.json"), m).unwrap();
    let out = dir.path().join("pub");
    for codec in [Codec::Xz, Codec::Zstd] {
        let p = publish(
            &PublishOptions {
                image: img.clone(),
                out_dir: out.clone(),
                level: 1,
                threads: 2,
                codec,
            },
            &|_, _| {},
        )
        .unwrap();
        let most = std::cell::Cell::new(0u64);
        let e = fetch(
            &opts(p.archive.display().to_string(), &cache),
            &|_, done, _| most.set(most.get().max(done)),
        )
        .unwrap_err();
        assert!(
            matches!(e, FetchError::TooBig { cap, .. } if cap == max_image_size(1)),
            "{e}"
        );
        assert!(list(&cache).unwrap().is_empty());
        assert_eq!(fs::read_dir(images_dir(&cache)).unwrap().count(), 0);
    }
    assert!(max_image_size(u64::MAX) == u64::MAX);
}
