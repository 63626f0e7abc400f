//! Version, mirror and `.sha512` parsing, and downloads from a local mirror
//! ([`crate::testserver`] on 127.0.0.1) serving a stand-in release tarball: the real
//! kubernetes-server-linux-amd64.tar.gz (300 MB) cannot be downloaded here.

use super::*;
use crate::k8s::tests::standin_release_tarball;
use crate::testserver::serve;

const VERSION: &str = "v1.31.4";

/// A local mirror's folder with the stand-in tarball of [`VERSION`] and its
/// `.sha512` (`sums` of the tarball's bytes, or the real digest when `None`);
/// returns (mirror folder, tarball bytes, their sha512).
fn mirror(dir: &Path, sums: Option<&str>) -> (PathBuf, Vec<u8>, String) {
    let root = dir.join("mirror");
    let rel = root.join(VERSION);
    fs::create_dir_all(&rel).unwrap();
    let tgz = rel.join(TARBALL);
    standin_release_tarball(&tgz, VERSION);
    let bytes = fs::read(&tgz).unwrap();
    let digest = hex::encode(Sha512::digest(&bytes));
    // dl.k8s.io's .sha512 holds the digest alone, no newline.
    fs::write(
        rel.join(format!("{TARBALL}.sha512")),
        sums.unwrap_or(&digest),
    )
    .unwrap();
    (root, bytes, digest)
}

fn no_progress() -> impl Fn(&'static str, u64, Option<u64>) {
    |_, _, _| {}
}

#[test]
fn versions_are_exact_releases() {
    for (given, want) in [
        ("v1.31.4", "v1.31.4"),
        ("1.31.4", "v1.31.4"),
        ("v1.32.0-rc.1", "v1.32.0-rc.1"),
        ("v1.33.0-alpha.2", "v1.33.0-alpha.2"),
        ("v1.20.0", "v1.20.0"),
    ] {
        assert_eq!(parse_version(given).unwrap(), want, "{given}");
    }
    for given in [
        "latest",
        "stable",
        "v1.31",
        "v1.31.4.1",
        "v1.31.x",
        "v1.31.4-foo.1",
        "v1.31.4-rc",
        "../v1.31.4",
        "v1.31.4/..",
        "",
    ] {
        let e = parse_version(given).unwrap_err().to_string();
        assert!(e.contains("vMAJOR.MINOR.PATCH"), "{given}: {e}");
    }
    let e = parse_version("v1.19.16").unwrap_err().to_string();
    assert!(e.contains("too old") && e.contains("v1.20"), "{e}");
}

#[test]
fn mirrors_are_http_bases_and_urls_follow_upstreams_layout() {
    assert_eq!(
        release_url(&parse_mirror(DEFAULT_MIRROR).unwrap(), VERSION),
        "https://dl.k8s.io/release/v1.31.4/kubernetes-server-linux-amd64.tar.gz"
    );
    assert_eq!(
        parse_mirror("http://127.0.0.1:8080/k8s/").unwrap(),
        "http://127.0.0.1:8080/k8s"
    );
    for bad in [
        "ftp://x/y",
        "dl.k8s.io/release",
        "https://",
        "",
        "https://x/?a=1",
    ] {
        let e = parse_mirror(bad).unwrap_err().to_string();
        assert!(
            e.contains(MIRROR_ENV) && e.contains(DEFAULT_MIRROR),
            "{bad}: {e}"
        );
    }
}

#[test]
fn sha512_files_hold_the_digest_maybe_with_the_file_name() {
    let hex = "ab".repeat(64);
    for text in [
        hex.clone(),
        format!("{hex}\n"),
        format!("{hex}  {TARBALL}\n"),
        format!("{hex} *{TARBALL}"),
        hex.to_uppercase(),
    ] {
        assert_eq!(parse_sha512(&text).as_deref(), Some(&hex[..]), "{text:?}");
    }
    for text in [
        String::new(),
        "ab".repeat(32),                      // a sha256
        format!("{hex}0"),                    // too long
        format!("{}zz", &hex[..126]),         // not hex
        format!("{hex}  kubernetes.tar.gz"),  // another file's
        format!("{hex}\n{hex}  {TARBALL}\n"), // two lines
        "<html>Not Found</html>".to_string(),
    ] {
        assert_eq!(parse_sha512(&text), None, "{text:?}");
    }
}

#[test]
fn a_release_is_downloaded_verified_cached_then_used_offline() {
    let dir = tempfile::tempdir().unwrap();
    let (root, bytes, digest) = mirror(dir.path(), None);
    let (base, _) = serve(root, None);
    let cache = dir.path().join("cache");
    let got = fetch_release(VERSION, &base, &cache, &no_progress()).unwrap();
    assert_eq!(got.downloaded.as_deref(), Some(&digest[..]));
    assert_eq!(got.url, format!("{base}/{VERSION}/{TARBALL}"));
    assert_eq!(got.tarball, cached_release(&cache, VERSION));
    assert_eq!(fs::read(&got.tarball).unwrap(), bytes);
    assert_eq!(
        fs::read_to_string(got.tarball.with_file_name(format!("{TARBALL}.sha512"))).unwrap(),
        format!("{digest}  {TARBALL}\n")
    );
    let r = crate::k8s::find_release(&got.tarball, dir.path()).unwrap();
    assert_eq!(r.version, VERSION);
    // Nothing is left in the downloads folder but the lock.
    let left: Vec<_> = fs::read_dir(cache.join("downloads"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left, [format!("k8s-{VERSION}.lock")]);

    // With no mirror to reach (nothing listens on port 1), the cached one is used.
    let offline = "http://127.0.0.1:1";
    let again = fetch_release(VERSION, offline, &cache, &no_progress()).unwrap();
    assert_eq!(again.downloaded, None);
    assert_eq!(again.tarball, got.tarball);
    // A version not cached needs the network, and the error says what to do.
    let e = fetch_release("v1.31.5", offline, &cache, &no_progress())
        .unwrap_err()
        .to_string();
    let sums_url = "http://127.0.0.1:1/v1.31.5/kubernetes-server-linux-amd64.tar.gz.sha512";
    assert_eq!(e.matches(sums_url).count(), 1, "the URL, once: {e}");
    assert!(e.contains("--k8s-release"), "{e}");
}

#[test]
fn a_wrong_checksum_names_the_url_and_both_sums_and_caches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let wrong = "0".repeat(128);
    let (root, _, digest) = mirror(dir.path(), Some(&wrong));
    let (base, _) = serve(root, None);
    let cache = dir.path().join("cache");
    let e = fetch_release(VERSION, &base, &cache, &no_progress()).unwrap_err();
    assert!(matches!(e, K8sError::Checksum { .. }), "{e:?}");
    let e = e.to_string();
    let url = format!("{base}/{VERSION}/{TARBALL}");
    assert!(
        e.contains(&url) && e.contains(&digest) && e.contains(&wrong),
        "{e}"
    );
    assert!(e.contains("nothing was cached"), "{e}");
    assert!(!cache.join(CACHE_SUBDIR).join(VERSION).exists());
    assert!(!cache
        .join("downloads")
        .join(format!("k8s-{VERSION}-{TARBALL}.part"))
        .exists());
}

#[test]
fn a_missing_release_is_a_404_naming_the_url_and_what_to_check() {
    let dir = tempfile::tempdir().unwrap();
    let (root, _, _) = mirror(dir.path(), None);
    let (base, _) = serve(root, None);
    let cache = dir.path().join("cache");
    let e = fetch_release("v1.31.9", &base, &cache, &no_progress()).unwrap_err();
    assert!(matches!(e, K8sError::NotFound { .. }), "{e:?}");
    let e = e.to_string();
    assert!(
        e.contains(&format!("{base}/v1.31.9/{TARBALL}.sha512"))
            && e.contains("404")
            && e.contains("--k8s-mirror"),
        "{e}"
    );
    assert!(!cached_release(&cache, "v1.31.9").exists());
}

#[test]
fn an_interrupted_download_is_never_taken_as_complete_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (root, bytes, digest) = mirror(dir.path(), None);
    // The first request of the tarball sends half of it and hangs up.
    let (base, seen) = serve(root, Some(".tar.gz"));
    let cache = dir.path().join("cache");
    let e = fetch_release(VERSION, &base, &cache, &no_progress()).unwrap_err();
    assert!(matches!(e, K8sError::Download { .. }), "{e:?}");
    assert!(e.to_string().contains("run the same command again"), "{e}");
    assert!(!cached_release(&cache, VERSION).exists());
    let got = fetch_release(VERSION, &base, &cache, &no_progress()).unwrap();
    assert_eq!(got.downloaded.as_deref(), Some(&digest[..]));
    assert_eq!(fs::read(&got.tarball).unwrap(), bytes);
    // The second request asked for the rest only.
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(
        seen[1].starts_with("bytes=") && seen[1] != "bytes=0-",
        "{seen:?}"
    );
}
