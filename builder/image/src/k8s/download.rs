//! `kimg build --k8s --k8s-version vX.Y.Z`: the official release tarball, downloaded
//! once, verified against its published sha512, and cached by version.
//!
//! The layout is upstream's (dl.k8s.io, what kubernetes' own
//! `cluster/get-kube-binaries.sh` reads): `BASE/VERSION/kubernetes-server-linux-amd64.tar.gz`
//! and beside it `kubernetes-server-linux-amd64.tar.gz.sha512`, which holds the hex
//! digest alone (a `sha512sum` line, `HEX  NAME`, is accepted too). BASE is
//! [`DEFAULT_MIRROR`] unless a mirror is given (`--k8s-mirror`, `$KIMG_K8S_MIRROR`).
//!
//! The tarball goes to `cache/downloads/*.part` (an interrupted download resumes
//! with a `Range` request, as `kimg fetch`'s do), is hashed, and only when the digest
//! matches is it renamed to `cache/k8s-releases/VERSION/` ([`cached_release`]). That
//! name is the cache: when it exists no request is made, so a cached release builds
//! offline. A mismatch removes the download and caches nothing.

use super::version::{KubeVersion, OLDEST};
use super::K8sError;
use crate::fetch::{self, FetchError, Progress};
use kimg_util::fs::{IoError, PathContext};
use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha512};
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Where releases are downloaded from unless a mirror is given.
pub const DEFAULT_MIRROR: &str = "https://dl.k8s.io/release";
/// The environment variable naming a mirror (the `--k8s-mirror` flag wins).
pub const MIRROR_ENV: &str = "KIMG_K8S_MIRROR";
/// The release tarball with the server binaries.
pub const TARBALL: &str = "kubernetes-server-linux-amd64.tar.gz";
/// The cache subdirectory of downloaded releases, one folder per version.
const CACHE_SUBDIR: &str = "k8s-releases";
/// The most of a `.sha512` file that is read.
const MAX_SUMS_LEN: u64 = 4096;

/// A release tarball in the cache.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The verified tarball (`cache/k8s-releases/VERSION/kubernetes-server-linux-amd64.tar.gz`).
    pub tarball: PathBuf,
    /// Its sha512, when it was downloaded now (`None`: it was in the cache already).
    pub downloaded: Option<String>,
    /// The URL it is (or would be) downloaded from.
    pub url: String,
}

/// `v1.31.4` (or `1.31.4`, `v1.32.0-rc.1`) as `vMAJOR.MINOR.PATCH[-PRE]`; refuses
/// anything else (`latest`, `1.31`, a path), and releases older than kimg supports.
pub fn parse_version(given: &str) -> Result<String, K8sError> {
    let bad = |why: String| K8sError::BadVersion {
        given: given.to_string(),
        why,
    };
    let v = given.strip_prefix('v').unwrap_or(given);
    let (core, pre) = match v.split_once('-') {
        Some((core, pre)) => (core, Some(pre)),
        None => (v, None),
    };
    let number = |n: &str| !n.is_empty() && n.len() <= 6 && n.bytes().all(|b| b.is_ascii_digit());
    let pre_ok = pre.is_none_or(|p| {
        p.split_once('.')
            .is_some_and(|(tag, n)| ["alpha", "beta", "rc"].contains(&tag) && number(n))
    });
    let parts: Vec<&str> = core.split('.').collect();
    if parts.len() != 3 || !parts.iter().all(|n| number(n)) || !pre_ok {
        return Err(bad(
            "not a release version: give an exact one, vMAJOR.MINOR.PATCH such as v1.31.4 \
             (https://kubernetes.io/releases lists them)"
                .into(),
        ));
    }
    let version = format!("v{v}");
    match KubeVersion::parse(&version) {
        Some(kv) if kv >= OLDEST => Ok(version),
        _ => Err(bad(format!(
            "too old: kimg renders the services for Kubernetes {OLDEST} and later"
        ))),
    }
}

/// The mirror's base URL, checked, without a trailing `/`.
pub fn parse_mirror(url: &str) -> Result<String, K8sError> {
    let base = url.trim().trim_end_matches('/');
    let host = base
        .strip_prefix("https://")
        .or_else(|| base.strip_prefix("http://"));
    if host.is_none_or(|h| h.is_empty() || h.contains(['?', '#', ' '])) {
        return Err(K8sError::BadMirror {
            url: url.to_string(),
        });
    }
    Ok(base.to_string())
}

/// `MIRROR/VERSION/kubernetes-server-linux-amd64.tar.gz`.
pub fn release_url(mirror: &str, version: &str) -> String {
    format!("{mirror}/{version}/{TARBALL}")
}

/// The digest of a `.sha512` file: its first word, 128 hex digits (lower-cased);
/// a file name may follow it (`sha512sum`'s format), nothing else may.
pub fn parse_sha512(text: &str) -> Option<String> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let line = lines.next()?;
    if lines.next().is_some() {
        return None;
    }
    let mut words = line.split_whitespace();
    let hex = words.next()?;
    let name_ok = match (words.next(), words.next()) {
        (None, _) => true,
        (Some(name), None) => name.trim_start_matches('*') == TARBALL,
        _ => false,
    };
    (hex.len() == 128 && hex.bytes().all(|b| b.is_ascii_hexdigit()) && name_ok)
        .then(|| hex.to_ascii_lowercase())
}

/// Where the verified tarball of `version` is cached.
pub fn cached_release(cache: &Path, version: &str) -> PathBuf {
    cache.join(CACHE_SUBDIR).join(version).join(TARBALL)
}

/// The tarball of `version` (from [`parse_version`]) from the cache, else downloaded
/// from `mirror` (from [`parse_mirror`]), verified and cached first.
pub fn fetch_release(
    version: &str,
    mirror: &str,
    cache: &Path,
    progress: Progress,
) -> Result<Fetched, K8sError> {
    let tarball = cached_release(cache, version);
    let url = release_url(mirror, version);
    let fetched = |downloaded| Fetched {
        tarball: tarball.clone(),
        downloaded,
        url: url.clone(),
    };
    if tarball.is_file() {
        return Ok(fetched(None));
    }
    let downloads = cache.join("downloads");
    fs::create_dir_all(&downloads).with_path(&downloads)?;
    // One download per version at a time: a second build waits, then finds it cached.
    let lock_path = downloads.join(format!("k8s-{version}.lock"));
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_path(&lock_path)?;
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
        .map_err(|(_, e)| IoError::new(&lock_path, std::io::Error::from_raw_os_error(e as i32)))?;
    if tarball.is_file() {
        return Ok(fetched(None));
    }
    let download_err = |error: FetchError| K8sError::Download {
        version: version.to_string(),
        cache: tarball.clone(),
        error,
    };
    let sums_url = format!("{url}.sha512");
    let expected = read_sha512(&sums_url, version).map_err(|e| match e {
        Sums::Missing(e) => e,
        Sums::Failed(e) => download_err(e),
    })?;
    let part = downloads.join(format!("k8s-{version}-{TARBALL}.part"));
    fetch::download(&url, &part, progress).map_err(download_err)?;
    let actual = file_sha512(&part, progress)?;
    if actual != expected {
        // A corrupt download cannot be resumed into a good one.
        let _ = fs::remove_file(&part);
        return Err(K8sError::Checksum {
            url,
            sums_url,
            expected,
            actual,
        });
    }
    let dir = tarball.parent().unwrap_or(cache);
    fs::create_dir_all(dir).with_path(dir)?;
    // What was verified, where `sha512sum -c` finds it; written before the tarball,
    // whose name alone marks the entry whole.
    let sums = dir.join(format!("{TARBALL}.sha512"));
    kimg_util::fs::write_atomic(&sums, format!("{actual}  {TARBALL}\n"))?;
    kimg_util::fs::rename(&part, &tarball)?;
    Ok(fetched(Some(actual)))
}

/// Why the published sha512 is not at hand.
enum Sums {
    /// The mirror has no such file (or it is no sha512 file): a [`K8sError`] of its own.
    Missing(K8sError),
    /// The request failed.
    Failed(FetchError),
}

/// The digest published at `sums_url`.
fn read_sha512(sums_url: &str, version: &str) -> Result<String, Sums> {
    let resp = match fetch::agent().get(sums_url).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(404, _)) => {
            return Err(Sums::Missing(K8sError::NotFound {
                version: version.to_string(),
                url: sums_url.to_string(),
            }))
        }
        Err(e) => return Err(Sums::Failed(fetch::http_err(sums_url, e))),
    };
    let mut text = String::new();
    resp.into_reader()
        .take(MAX_SUMS_LEN)
        .read_to_string(&mut text)
        .map_err(|e| {
            Sums::Failed(FetchError::Http {
                url: sums_url.to_string(),
                why: e.to_string(),
            })
        })?;
    parse_sha512(&text).ok_or_else(|| {
        Sums::Missing(K8sError::BadSums {
            url: sums_url.to_string(),
            start: text.chars().take(80).collect(),
        })
    })
}

/// sha512 of a file, as lower-case hex, reporting `verify` progress.
fn file_sha512(path: &Path, progress: Progress) -> Result<String, IoError> {
    let mut file = File::open(path).with_path(path)?;
    let total = file.metadata().with_path(path)?.len();
    let mut hash = Sha512::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = file.read(&mut buf).with_path(path)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        done += n as u64;
        progress("verify", done, Some(total));
    }
    Ok(hex::encode(hash.finalize()))
}

#[cfg(test)]
mod tests;
