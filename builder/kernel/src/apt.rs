//! Fetching Debian's current cloud kernel package with apt, into kimg's cache.
//!
//! A download is checked against the archive's SHA256 (from `apt-cache show`) and then
//! marked with a `<file>.sha256` beside it; only marked files are reused, so a download
//! that was interrupted half way is fetched again instead of failing later.

use super::KernelError;
use kimg_util::cmd;
use kimg_util::fs::IoError;
use std::path::{Path, PathBuf};

/// The Debian metapackage that tracks the current cloud kernel.
pub const DEBIAN_META_PACKAGE: &str = "linux-image-cloud-amd64";

/// A verified kernel package in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Download {
    /// The `.deb` file.
    pub deb: PathBuf,
    /// Package name and version, e.g. `linux-image-6.1.0-56-cloud-amd64 6.1.192-2`.
    pub package: String,
    /// sha256 of the `.deb`, lower-case hex.
    pub sha256: String,
}

/// Resolves [`DEBIAN_META_PACKAGE`] to its versioned kernel package and downloads that
/// into `<cache>/debs` with `apt-get download`, reusing a verified earlier download.
pub fn download_default(cache: &Path) -> Result<Download, KernelError> {
    for program in ["apt-cache", "apt-get"] {
        if !cmd::exists(program) {
            return Err(KernelError::NoApt { program });
        }
    }
    let show = cmd::run_stdout(cmd::command("apt-cache").args([
        "show",
        "--no-all-versions",
        DEBIAN_META_PACKAGE,
    ]))?;
    let resolve_err = |package: &str, reason: &str| KernelError::Resolve {
        package: package.to_string(),
        reason: reason.to_string(),
    };
    let (package, version) = kernel_dependency(&show)
        .ok_or_else(|| resolve_err(DEBIAN_META_PACKAGE, "no linux-image-* dependency"))?;
    let version = match version {
        Some(v) => v,
        None => {
            let policy = cmd::run_stdout(cmd::command("apt-cache").args(["policy", &package]))?;
            candidate_version(&policy)
                .ok_or_else(|| resolve_err(&package, "no candidate version"))?
        }
    };
    download_exact(cache, &package, &version)
}

/// Downloads the candidate version of `package` (any Debian package, e.g.
/// `linux-source-6.1`) into `<cache>/debs`, reusing a verified earlier download.
pub fn download_package(cache: &Path, package: &str) -> Result<Download, KernelError> {
    for program in ["apt-cache", "apt-get"] {
        if !cmd::exists(program) {
            return Err(KernelError::NoApt { program });
        }
    }
    let policy = cmd::run_stdout(cmd::command("apt-cache").args(["policy", package]))?;
    let version = candidate_version(&policy).ok_or_else(|| KernelError::Resolve {
        package: package.to_string(),
        reason: "no candidate version (run apt-get update?)".into(),
    })?;
    download_exact(cache, package, &version)
}

/// Downloads `package` at `version`, checked against the archive's SHA256.
fn download_exact(cache: &Path, package: &str, version: &str) -> Result<Download, KernelError> {
    let spec = format!("{package}={version}");
    let record =
        cmd::run_stdout(cmd::command("apt-cache").args(["show", "--no-all-versions", &spec]))?;
    download_record(cache, package, version, &record)
}

/// Downloads `package` at `version` into `<cache>/debs` (reusing a verified earlier
/// download), checked against the SHA256 of `record`, its `apt-cache show` record:
/// for callers that asked apt about many packages at once.
pub fn download_record(
    cache: &Path,
    package: &str,
    version: &str,
    record: &str,
) -> Result<Download, KernelError> {
    let resolve_err = |package: &str, reason: &str| KernelError::Resolve {
        package: package.to_string(),
        reason: reason.to_string(),
    };
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| KernelError::Io(IoError::new(path, source))
    };
    let debs = cache.join("debs");
    std::fs::create_dir_all(&debs).map_err(io_err(&debs))?;
    let spec = format!("{package}={version}");
    // Architecture-independent packages (linux-source) are _all.deb.
    let arch = field(record, "Architecture")
        .filter(|a| a.bytes().all(|b| b.is_ascii_alphanumeric()))
        .unwrap_or_else(|| "amd64".into());
    // apt-get names downloads package_version_arch.deb, with an epoch's ':' as %3a.
    let file_name = format!("{package}_{}_{arch}.deb", version.replace(':', "%3a"));
    let deb = debs.join(&file_name);
    let marker = debs.join(format!("{file_name}.sha256"));
    let package_version = format!("{package} {version}");
    if let Ok(sha256) = std::fs::read_to_string(&marker) {
        if deb.is_file() {
            return Ok(Download {
                deb,
                package: package_version,
                sha256: sha256.trim().to_string(),
            });
        }
    }
    let expected = field(record, "SHA256")
        .ok_or_else(|| resolve_err(&spec, "apt-cache show gives no SHA256"))?;
    // A file without a marker is a leftover of an interrupted download.
    match std::fs::remove_file(&deb) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(&deb)(e)),
        _ => {}
    }
    cmd::run(
        cmd::command("apt-get")
            .args(["download", "-q"])
            .arg(&spec)
            .current_dir(&debs),
    )?;
    let (actual, _) = kimg_util::hash::file_sha256(&deb).map_err(io_err(&deb))?;
    if actual != expected {
        // Best effort: the checksum error is the one to report.
        let _ = std::fs::remove_file(&deb);
        return Err(KernelError::Checksum {
            path: deb,
            expected,
            actual,
        });
    }
    let tmp = debs.join(format!(".{file_name}.sha256.tmp"));
    std::fs::write(&tmp, format!("{actual}\n")).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &marker).map_err(io_err(&marker))?;
    Ok(Download {
        deb,
        package: package_version,
        sha256: actual,
    })
}

/// From `apt-cache show` output of the metapackage: the `linux-image-*` package it
/// depends on and, when pinned with `(= version)`, that version.
fn kernel_dependency(show: &str) -> Option<(String, Option<String>)> {
    let depends = field(show, "Depends")?;
    depends.split(',').find_map(|dep| {
        // An alternative (`a | b`) is not expected here; take its first choice.
        let dep = dep.split('|').next()?.trim();
        let (name, rest) = dep.split_once(' ').unwrap_or((dep, ""));
        if !name.starts_with("linux-image-") {
            return None;
        }
        let version = rest
            .trim()
            .strip_prefix("(=")
            .and_then(|v| v.strip_suffix(')'))
            .map(|v| v.trim().to_string());
        Some((name.to_string(), version))
    })
}

/// The `Candidate:` line of `apt-cache policy` output.
fn candidate_version(policy: &str) -> Option<String> {
    policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .filter(|v| !v.is_empty() && *v != "(none)")
        .map(str::to_string)
}

/// The first `Name: value` field of a Debian control record.
pub fn field(record: &str, name: &str) -> Option<String> {
    record
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_apt_output() {
        let show = "Package: linux-image-cloud-amd64\nVersion: 6.1.192-2\n\
                    Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)\nDescription: x\n\
                    SHA256: abc\n";
        assert_eq!(
            kernel_dependency(show),
            Some((
                "linux-image-6.1.0-56-cloud-amd64".into(),
                Some("6.1.192-2".into())
            ))
        );
        assert_eq!(
            kernel_dependency("Depends: foo, linux-image-6.12.1-cloud-amd64-unsigned\n"),
            Some(("linux-image-6.12.1-cloud-amd64-unsigned".into(), None))
        );
        assert_eq!(kernel_dependency("Depends: foo\n"), None);
        assert_eq!(kernel_dependency("Pre-Depends: linux-image-x\n"), None);
        assert_eq!(field(show, "SHA256").as_deref(), Some("abc"));
        assert_eq!(field("SHA2567: x\n", "SHA256"), None);
        let policy = "linux-image-x:\n  Installed: (none)\n  Candidate: 1:6.1-2\n";
        assert_eq!(candidate_version(policy).as_deref(), Some("1:6.1-2"));
        assert_eq!(candidate_version("  Candidate: (none)\n"), None);
    }
}
