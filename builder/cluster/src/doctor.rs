//! `kimg doctor`: what this host has of what kimg needs, whether KVM will be used (and
//! why not), and the one apt-get command that installs what is missing.
//!
//! Programs are looked up the way every command kimg runs is ([`kimg_util::cmd::find`]:
//! PATH, then the sbin directories), so what doctor finds is what kimg will use.

use crate::accel::{self, Accel};
use crate::qemu::{OVMF_CODE, QEMU};
use serde::Serialize;
use std::path::Path;

/// Free space below which the cache dir is reported short (a kernel, an image and a
/// cluster's layers).
pub const MIN_DISK: u64 = 2 << 30;
/// Available memory below which the host is reported short (one VM's default).
pub const MIN_MEMORY: u64 = 512 << 20;

/// One thing checked.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// A program, a file, or a resource (`disk`, `memory`).
    pub name: String,
    /// What kimg needs it for.
    pub needed_for: &'static str,
    /// Whether kimg's build and run cannot work without it.
    pub essential: bool,
    /// Whether it is there (or enough of it).
    pub ok: bool,
    /// Where it was found, its version, or how much there is.
    pub detail: String,
    /// The Debian package that provides it, if any.
    pub package: Option<&'static str>,
}

/// The accelerator `kimg run --accel auto` will choose here.
#[derive(Debug, Clone, Serialize)]
pub struct AccelReport {
    /// kvm or tcg.
    pub accel: Accel,
    /// Why KVM is not used (device, CPU flags, probe), or that it works.
    pub reason: String,
}

/// Everything `kimg doctor` found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The checks, essentials first.
    pub checks: Vec<Check>,
    /// The accelerator VMs will run with.
    pub accel: AccelReport,
    /// Packages providing what is missing.
    pub missing_packages: Vec<&'static str>,
    /// The command that installs them (None when nothing is missing).
    pub install_command: Option<String>,
    /// Every essential check passed.
    pub ok: bool,
}

/// A program kimg runs: name, package, essential, what for.
const PROGRAMS: &[(&str, Option<&str>, bool, &str)] = &[
    (QEMU, Some("qemu-system-x86"), true, "runs the VMs"),
    (
        "qemu-img",
        Some("qemu-utils"),
        true,
        "the image's qcow2 and each VM's layer",
    ),
    (
        "vde_switch",
        Some("vde2"),
        true,
        "the cluster networks (--net user, the default)",
    ),
    (
        "mkfs.ext4",
        Some("e2fsprogs"),
        true,
        "kimg build: the root filesystem",
    ),
    (
        "debugfs",
        Some("e2fsprogs"),
        true,
        "kimg build: device nodes and owners in the root filesystem",
    ),
    (
        "apt-get",
        None,
        false,
        "downloading Debian's kernel (else --kernel-deb, or --kernel and --modules)",
    ),
    (
        "apt-cache",
        None,
        false,
        "resolving Debian's kernel package (else --kernel-deb)",
    ),
    (
        "dpkg-query",
        None,
        false,
        "kimg build --k8s: versions of the host packages copied in",
    ),
    (
        "tmux",
        Some("tmux"),
        false,
        "consoles in a terminal multiplexer",
    ),
    (
        "ip",
        Some("iproute2"),
        false,
        "kimg run --net bridge (root)",
    ),
    (
        "e2fsck",
        Some("e2fsprogs"),
        false,
        "only the test suite (checks the built filesystem)",
    ),
    (
        "xorriso",
        Some("xorriso"),
        false,
        "only the test suite (kimg writes its cdroms itself)",
    ),
];

/// Files kimg reads: path, package, essential, what for.
const FILES: &[(&str, &str, bool, &str)] = &[
    (
        "/bin/busybox",
        "busybox-static",
        true,
        "the image's userland (a static busybox)",
    ),
    (
        kimg_image::build::SYSTEMD_BOOT,
        "systemd-boot-efi",
        true,
        "the image's UEFI boot loader",
    ),
    (OVMF_CODE, "ovmf", false, "kimg run --uefi"),
];

/// Checks this host. `cache` is where kimg keeps kernels and images (its free space is
/// checked); `scratch` is a writable directory for the KVM probe guest.
pub fn check(cache: &Path, scratch: &Path) -> Report {
    let mut checks: Vec<Check> = PROGRAMS
        .iter()
        .map(|&(name, package, essential, needed_for)| {
            let found = kimg_util::cmd::find(name);
            let mut detail = found
                .as_ref()
                .map_or_else(|| "not found".to_string(), |p| p.display().to_string());
            if let (Some(p), true) = (&found, name == QEMU) {
                if let Some(v) = qemu_version(p) {
                    detail = format!("{detail} ({v})");
                }
            }
            Check {
                name: name.to_string(),
                needed_for,
                essential,
                ok: found.is_some(),
                detail,
                package,
            }
        })
        .collect();
    checks.extend(FILES.iter().map(|&(path, package, essential, needed_for)| {
        let ok = Path::new(path).is_file();
        Check {
            name: path.to_string(),
            needed_for,
            essential,
            ok,
            detail: if ok { "present" } else { "not found" }.to_string(),
            package: Some(package),
        }
    }));
    checks.push(disk_check(cache));
    checks.push(memory_check());
    checks.sort_by_key(|c| !c.essential);

    let qemu = kimg_util::cmd::find(QEMU);
    let accel = match &qemu {
        None => AccelReport {
            accel: Accel::Tcg,
            reason: format!("{QEMU} not found"),
        },
        Some(q) => match accel::kvm_usable(&q.to_string_lossy(), scratch) {
            Ok(()) => AccelReport {
                accel: Accel::Kvm,
                reason: "/dev/kvm opens, the CPU has vmx/svm and a probe guest ran".into(),
            },
            Err(why) => AccelReport {
                accel: Accel::Tcg,
                reason: why,
            },
        },
    };
    let mut missing_packages: Vec<&'static str> = Vec::new();
    for p in checks.iter().filter(|c| !c.ok).filter_map(|c| c.package) {
        if !missing_packages.contains(&p) {
            missing_packages.push(p);
        }
    }
    let sudo = if nix::unistd::geteuid().is_root() {
        ""
    } else {
        "sudo "
    };
    let install_command = (!missing_packages.is_empty())
        .then(|| format!("{sudo}apt-get install -y {}", missing_packages.join(" ")));
    Report {
        ok: checks.iter().all(|c| c.ok || !c.essential),
        checks,
        accel,
        missing_packages,
        install_command,
    }
}

/// The first line of `qemu-system-x86_64 --version`.
fn qemu_version(qemu: &Path) -> Option<String> {
    let out = kimg_util::cmd::run_stdout(kimg_util::cmd::command(qemu).arg("--version")).ok()?;
    out.lines().next().map(|l| l.trim().to_string())
}

/// Free space where the cache lives (its nearest existing ancestor).
fn disk_check(cache: &Path) -> Check {
    let dir = cache
        .ancestors()
        .find(|d| d.exists())
        .unwrap_or(Path::new("/"));
    let free = nix::sys::statvfs::statvfs(dir)
        .map(|s| s.blocks_available().saturating_mul(s.fragment_size()));
    let (ok, detail) = match free {
        Ok(b) => (
            b >= MIN_DISK,
            format!("{} free in {}", gib(b), dir.display()),
        ),
        Err(e) => (false, format!("cannot stat {}: {e}", dir.display())),
    };
    Check {
        name: "disk".into(),
        needed_for: "kernels, images and each VM's layer (2 GiB or more)",
        essential: false,
        ok,
        detail,
        package: None,
    }
}

/// MemAvailable of /proc/meminfo.
fn memory_check() -> Check {
    let avail = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| mem_available(&m));
    let (ok, detail) = match avail {
        Some(b) => (b >= MIN_MEMORY, format!("{} available", gib(b))),
        None => (false, "cannot read /proc/meminfo".into()),
    };
    Check {
        name: "memory".into(),
        needed_for: "the VMs (256-512 MiB each by default)",
        essential: false,
        ok,
        detail,
        package: None,
    }
}

/// MemAvailable in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb.saturating_mul(1024))
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_is_read_in_bytes() {
        let m = "MemTotal:  4000 kB\nMemAvailable:    2048 kB\n";
        assert_eq!(mem_available(m), Some(2 << 20));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn report_finds_qemu_and_names_the_accelerator() {
        let dir = tempfile::tempdir().unwrap();
        let r = check(dir.path(), dir.path());
        let qemu = r.checks.iter().find(|c| c.name == QEMU).unwrap();
        assert!(qemu.ok && qemu.detail.contains("QEMU"), "{qemu:?}");
        assert!(!r.accel.reason.is_empty());
        assert!(r.checks.iter().any(|c| c.name == "disk"));
        // Essentials come first.
        let first_optional = r.checks.iter().position(|c| !c.essential).unwrap();
        assert!(r.checks[first_optional..].iter().all(|c| !c.essential));
        assert_eq!(r.install_command.is_some(), !r.missing_packages.is_empty());
    }
}
