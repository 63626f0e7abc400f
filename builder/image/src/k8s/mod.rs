//! The Kubernetes flavour's inputs: the Kubernetes server binaries from a release
//! folder or `kubernetes-server-linux-amd64.tar.gz` (given, or downloaded by version:
//! [`download`]), checked before any work starts, and their version, which the
//! service files depend on ([`version`]).

pub mod download;
pub mod preload;
pub mod version;

use kimg_formats::elf::{elf_kind, ElfKind};
use kimg_util::fs::{IoError, PathContext};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use version::KubeVersion;

/// The Kubernetes binaries a `--k8s` image carries, installed as /usr/bin/NAME.
pub const K8S_BINARIES: &[&str] = &[
    "kubelet",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kube-proxy",
    "kubectl",
];

pub use kimg_contract::k8s::IMAGES_DIR;

/// Where users get the binaries, for error messages.
pub const WHERE_TO_GET: &str = "give a release version with --k8s-version (e.g. v1.31.4: \
kimg downloads its kubernetes-server-linux-amd64.tar.gz once, verified, into its cache), or \
a local kubernetes-server-linux-amd64.tar.gz or its unpacked folder with --k8s-release";

/// Folders inside a release where the binaries are looked for, in order.
const BIN_DIRS: &[&str] = &["", "kubernetes/server/bin", "server/bin", "bin"];

/// Errors finding the Kubernetes binaries.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    /// `--k8s` without `--k8s-release` or `--k8s-version`.
    #[error("--k8s needs the Kubernetes binaries {}: {WHERE_TO_GET}", K8S_BINARIES.join(", "))]
    NoRelease,
    /// Some binaries are missing or not x86-64 programs.
    #[error("{release}: {}\n{WHERE_TO_GET}", problems.join("; "))]
    Bad {
        /// The release given.
        release: PathBuf,
        /// One entry per missing or bad binary.
        problems: Vec<String>,
    },
    /// The release's version is unknown or older than kimg knows flags for.
    #[error(
        "{release}: {problem}; kimg renders the services for Kubernetes {} and later",
        version::OLDEST
    )]
    Version {
        /// The release given.
        release: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A container image tarball is not one, or two have the same name.
    #[error("{path}: {why} (image tarballs are what `docker save` or `ctr images export` write)")]
    Image {
        /// The tarball.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A file of rootfs/k8s.toml could not be rendered for the release.
    #[error("rootfs/k8s.toml: {0}")]
    Render(String),
    /// `--k8s-version` is not an exact release version kimg supports.
    #[error("--k8s-version {given:?}: {why}")]
    BadVersion {
        /// The version given.
        given: String,
        /// What is wrong with it.
        why: String,
    },
    /// The mirror is not an http(s) URL.
    #[error(
        "Kubernetes mirror {url:?} (--k8s-mirror or ${}): not an http(s) URL; give the base \
         that holds VERSION/{}, like {}",
        download::MIRROR_ENV,
        download::TARBALL,
        download::DEFAULT_MIRROR
    )]
    BadMirror {
        /// The mirror given.
        url: String,
    },
    /// The mirror has no such release.
    #[error(
        "Kubernetes {version}: {url} is not there (HTTP 404); check the version \
         (https://kubernetes.io/releases lists them) and the mirror (--k8s-mirror or ${}, \
         default {})",
        download::MIRROR_ENV,
        download::DEFAULT_MIRROR
    )]
    NotFound {
        /// The version asked for.
        version: String,
        /// The URL that answered 404.
        url: String,
    },
    /// Downloading the release failed.
    #[error(
        "downloading Kubernetes {version}: {error}\nkimg needs the network once per release, \
         then builds from {}; offline, pass a local {} or its folder with --k8s-release",
        cache.display(),
        download::TARBALL
    )]
    Download {
        /// The version asked for.
        version: String,
        /// Where it would have been cached.
        cache: PathBuf,
        /// What failed.
        #[source]
        error: crate::fetch::FetchError,
    },
    /// The published sha512 is not a sha512.
    #[error(
        "{url}: not a sha512 file (128 hex digits, optionally followed by the file name), \
         it starts {start:?}; check the mirror (--k8s-mirror or ${})",
        download::MIRROR_ENV
    )]
    BadSums {
        /// The `.sha512` URL.
        url: String,
        /// The start of what it held.
        start: String,
    },
    /// The download does not match its published sha512.
    #[error(
        "{url}: sha512 is {actual}, but {sums_url} says {expected}; nothing was cached \
         (run again to download it afresh; if it fails the same way, the mirror serves a \
         file that does not match its checksum: try another --k8s-mirror)"
    )]
    Checksum {
        /// The tarball's URL.
        url: String,
        /// The `.sha512` URL.
        sums_url: String,
        /// The published digest.
        expected: String,
        /// The digest of what was downloaded.
        actual: String,
    },
    /// The build-time image import failed (see [`preload`]).
    #[error("importing the container images at build time: {0}")]
    Preload(String),
    /// The release could not be read or unpacked.
    #[error(transparent)]
    Io(#[from] IoError),
}

/// A checked set of Kubernetes binaries.
#[derive(Debug, Clone)]
pub struct Release {
    /// (name, file) for each of [`K8S_BINARIES`].
    pub binaries: Vec<(String, PathBuf)>,
    /// The release's version: its `version` file, else what `kubelet --version` says.
    pub version: String,
    /// Its major and minor version.
    pub kube_version: KubeVersion,
    /// Holds the unpacked tarball while the build runs.
    _unpacked: Option<std::sync::Arc<tempfile::TempDir>>,
}

/// Finds and checks the binaries in `release` (a folder or a .tar.gz); `scratch` is
/// where a tarball is unpacked.
pub fn find_release(release: &Path, scratch: &Path) -> Result<Release, K8sError> {
    let (root, unpacked) = if release.is_dir() {
        (release.to_path_buf(), None)
    } else {
        let tmp = tempfile::Builder::new()
            .prefix(".kimg-k8s-")
            .tempdir_in(scratch)
            .with_path(scratch)?;
        unpack_binaries(release, tmp.path()).with_path(release)?;
        (tmp.path().to_path_buf(), Some(std::sync::Arc::new(tmp)))
    };
    let mut binaries = Vec::new();
    let mut problems = Vec::new();
    for name in K8S_BINARIES {
        let found = BIN_DIRS
            .iter()
            .map(|d| root.join(d).join(name))
            .find(|p| p.is_file());
        match found {
            None => problems.push(format!("{name} is missing")),
            Some(p) => match elf_kind(&p) {
                Ok(ElfKind::Static | ElfKind::Dynamic) => binaries.push((name.to_string(), p)),
                Ok(kind) => problems.push(format!(
                    "{} is not an x86-64 program ({kind:?})",
                    p.display()
                )),
                Err(e) => problems.push(format!("{}: {e}", p.display())),
            },
        }
    }
    if !problems.is_empty() {
        return Err(K8sError::Bad {
            release: release.to_path_buf(),
            problems,
        });
    }
    let version_err = |problem: String| K8sError::Version {
        release: release.to_path_buf(),
        problem,
    };
    let version = match ["version", "kubernetes/version"]
        .iter()
        .find_map(|v| fs::read_to_string(root.join(v)).ok())
    {
        Some(v) => v.trim().to_string(),
        None => {
            let kubelet = binaries.iter().find(|(n, _)| n == "kubelet");
            let kubelet = kubelet.ok_or_else(|| version_err("no kubelet".into()))?;
            version::kubelet_version(&kubelet.1).map_err(version_err)?
        }
    };
    let kube_version = KubeVersion::parse(&version)
        .ok_or_else(|| version_err(format!("version {version:?} is not vMAJOR.MINOR.PATCH")))?;
    if kube_version < version::OLDEST {
        return Err(version_err(format!("Kubernetes {version} is too old")));
    }
    Ok(Release {
        binaries,
        version,
        kube_version,
        _unpacked: unpacked,
    })
}

/// Unpacks the Kubernetes binaries (and the version file) of a release tarball,
/// flattened into `dest`; other members are skipped.
fn unpack_binaries(tarball: &Path, dest: &Path) -> io::Result<()> {
    let file = fs::File::open(tarball)?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let wanted =
            K8S_BINARIES.contains(&name) || (name == "version" && path.components().count() <= 2);
        if wanted && entry.header().entry_type().is_file() {
            entry.unpack(dest.join(name))?;
        }
    }
    Ok(())
}

/// The container image tarballs (`*.tar`, by name) in `dirs`, in order: the first
/// folder may be missing (a release without `images/`), the others must exist. Each
/// must be a docker-archive or OCI layout tarball (a `manifest.json` or `index.json`
/// at its top); two with the same file name are refused.
pub fn image_tarballs(dirs: &[PathBuf]) -> Result<Vec<(String, PathBuf)>, K8sError> {
    let mut found: Vec<(String, PathBuf)> = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        if i == 0 && !dir.is_dir() {
            continue;
        }
        let mut tars: Vec<PathBuf> = fs::read_dir(dir)
            .with_path(dir)?
            .filter_map(|e| Some(e.ok()?.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "tar"))
            .collect();
        tars.sort();
        for path in tars {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if let Some((_, other)) = found.iter().find(|(n, _)| *n == name) {
                return Err(K8sError::Image {
                    path,
                    why: format!("same name as {}", other.display()),
                });
            }
            check_image_tarball(&path)?;
            found.push((name, path));
        }
    }
    Ok(found)
}

/// A tarball with `manifest.json` (docker-archive) or `index.json` (OCI) at its top.
fn check_image_tarball(path: &Path) -> Result<(), K8sError> {
    let bad = |why: String| K8sError::Image {
        path: path.to_path_buf(),
        why,
    };
    let file = fs::File::open(path).with_path(path)?;
    let mut archive = tar::Archive::new(file);
    let entries = archive
        .entries_with_seek()
        .map_err(|e| bad(format!("not a tar: {e}")))?;
    for entry in entries {
        let entry = entry.map_err(|e| bad(format!("not a tar: {e}")))?;
        let p = entry.path_bytes();
        let p = p.strip_prefix(b"./").unwrap_or(&p);
        if p == b"manifest.json" || p == b"index.json" {
            return Ok(());
        }
    }
    Err(bad("no manifest.json or index.json at its top".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_tarballs_are_checked_and_named_once() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        for dir in [&a, &b] {
            fs::create_dir(dir).unwrap();
        }
        let tar_with = |path: &Path, member: &str| {
            let mut t = tar::Builder::new(Vec::new());
            let mut h = tar::Header::new_ustar();
            h.set_size(2);
            h.set_mode(0o644);
            h.set_cksum();
            t.append_data(&mut h, member, &b"{}"[..]).unwrap();
            fs::write(path, t.into_inner().unwrap()).unwrap();
        };
        tar_with(&a.join("pause.tar"), "manifest.json");
        tar_with(&b.join("app.tar"), "index.json");
        fs::write(b.join("notes.txt"), "not an image").unwrap();
        let missing = d.path().join("missing");
        let got = image_tarballs(&[missing.clone(), a.clone(), b.clone()]).unwrap();
        let names: Vec<_> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["pause.tar", "app.tar"]);
        // A user's folder must exist.
        assert!(image_tarballs(&[a.clone(), missing]).is_err());
        // The same name twice, and a tar that is no image, are refused by path.
        tar_with(&b.join("pause.tar"), "manifest.json");
        let e = image_tarballs(&[a.clone(), b.clone()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("same name as") && e.contains("pause.tar"), "{e}");
        fs::remove_file(b.join("pause.tar")).unwrap();
        tar_with(&b.join("x.tar"), "hello.txt");
        let e = image_tarballs(&[a, b]).unwrap_err().to_string();
        assert!(e.contains("x.tar") && e.contains("no manifest.json"), "{e}");
    }

    /// rootfs/k8s.toml spells out addresses whose one home is kimg-contract: each
    /// must be the contract's, so a change there cannot leave the services behind.
    #[test]
    fn k8s_toml_addresses_are_the_contracts() {
        use kimg_contract::k8s as c;
        use kimg_contract::net::{self, Net};
        let toml = crate::rootfs::K8S_TOML;
        let vm1 = kimg_contract::VmId::new(1).unwrap();
        let services = format!(
            "{}/{},{}/{}",
            c::SERVICE_RANGE4.0,
            c::SERVICE_RANGE4.1,
            c::SERVICE_RANGE6.0,
            c::SERVICE_RANGE6.1
        );
        // vm-001's cluster addresses and the cluster DNS Service's.
        let (cp4, cp6) = (
            net::ipv4(Net::Cluster, vm1).unwrap(),
            net::ipv6(Net::Cluster, vm1),
        );
        let (dns4, dns6) = (c::cluster_dns4(), c::cluster_dns6());
        let expected = [
            format!("\"--advertise-address\", \"{cp4}\""),
            format!("\"--service-cluster-ip-range\", \"{services}\""),
            format!("clusterDNS: [\"{dns4}\", \"{dns6}\"]"),
            // Cluster DNS: dnsmasq on vm-001, the kube-dns Service in front of it.
            format!("nameserver {cp4}"),
            format!("--listen-address={cp4},{cp6}"),
            format!("ready = {{ tcp = \"{cp4}:53\" }}"),
            format!("clusterIP: {dns4}"),
            format!("clusterIPs: [{dns4}, \"{dns6}\"]"),
            format!("addresses: [{{ip: {cp4}}}, {{ip: \"{cp6}\"}}]"),
            format!(
                "clusterCIDR: \"{}/{},{}/{}\"",
                c::POD_SUPERNET4.0,
                c::POD_SUPERNET4.1,
                c::POD_SUPERNET6.0,
                c::POD_SUPERNET6.1
            ),
        ];
        for line in expected {
            assert!(toml.contains(&line), "rootfs/k8s.toml lacks {line}");
        }
        assert!(toml.contains(&format!("{IMAGES_DIR}/*.tar")));
        // No other address of those ranges is spelled out: a new one belongs in
        // kimg-contract first, then here.
        for (lit, n) in [
            ("192.168.", 5),
            ("fd00:6b69:", 2),
            ("10.96.", 5),
            ("10.244.", 1),
            ("fd00:10:", 5),
        ] {
            assert_eq!(toml.matches(lit).count(), n, "{lit} in rootfs/k8s.toml");
        }
    }

    #[test]
    fn missing_and_bad_binaries_are_listed_together() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("kubernetes/server/bin");
        fs::create_dir_all(&bin).unwrap();
        fs::copy("/bin/busybox", bin.join("kubelet")).unwrap();
        fs::write(bin.join("kubectl"), "#!/bin/sh\n").unwrap();
        let err = find_release(dir.path(), dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("kube-apiserver is missing"), "{err}");
        assert!(err.contains("kubectl is not an x86-64 program"), "{err}");
        assert!(!err.contains("kubelet"), "kubelet is fine: {err}");
        assert!(err.contains("--k8s-release"), "{err}");
    }

    /// A stand-in for kubernetes-server-linux-amd64.tar.gz (the real one is 300 MB
    /// and cannot be downloaded here): its layout, with busybox as every binary (a
    /// real x86-64 ELF program) and `version`.
    pub(super) fn standin_release_tarball(tgz: &Path, version: &str) {
        let gz = flate2::write::GzEncoder::new(
            fs::File::create(tgz).unwrap(),
            flate2::Compression::fast(),
        );
        let mut b = tar::Builder::new(gz);
        let data = fs::read("/bin/busybox").unwrap();
        for name in K8S_BINARIES {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o755);
            h.set_cksum();
            b.append_data(&mut h, format!("kubernetes/server/bin/{name}"), &data[..])
                .unwrap();
        }
        let text = format!("{version}\n");
        let mut h = tar::Header::new_gnu();
        h.set_size(text.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "kubernetes/version", text.as_bytes())
            .unwrap();
        b.into_inner().unwrap().finish().unwrap();
    }

    #[test]
    fn a_release_tarball_is_found_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let tgz = dir.path().join("kubernetes-server-linux-amd64.tar.gz");
        standin_release_tarball(&tgz, "v1.31.0");
        let r = find_release(&tgz, dir.path()).unwrap();
        assert_eq!(r.binaries.len(), K8S_BINARIES.len());
        assert_eq!(r.version, "v1.31.0");
        assert_eq!(r.kube_version.to_string(), "v1.31");
        assert!(r.binaries.iter().all(|(_, p)| p.is_file()));
    }
}
