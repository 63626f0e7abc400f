//! The kernel filesystems each stage mounts, as const tables walked by one function,
//! plus /proc/self/mountinfo parsing for "already mounted?" and for shutdown.

use crate::error::{Context, Error, Result};
use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// procfs.
pub const PROC: &str = "/proc";
/// sysfs.
pub const SYS: &str = "/sys";
/// devtmpfs (the kernel has DEVTMPFS=y but does not mount it itself).
pub const DEV: &str = "/dev";
/// Pseudo-terminals.
pub const DEV_PTS: &str = "/dev/pts";
/// POSIX shared memory.
pub const DEV_SHM: &str = "/dev/shm";
/// Runtime state.
pub const RUN: &str = "/run";
/// Scratch space.
pub const TMP: &str = "/tmp";
/// The unified cgroup hierarchy.
pub const CGROUP: &str = "/sys/fs/cgroup";
/// Where the mount table of this process is read from.
pub const MOUNTINFO: &str = "/proc/self/mountinfo";

/// One mount: `mount -t fstype -o data source target` with `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mount {
    /// Source (for kernel filesystems, just a name).
    pub source: &'static str,
    /// Mount point; created if missing.
    pub target: &'static str,
    /// Filesystem type.
    pub fstype: &'static str,
    /// Mount flags.
    pub flags: MsFlags,
    /// Filesystem options; empty for none.
    pub data: &'static str,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

const M_PROC: Mount = Mount {
    source: "proc",
    target: PROC,
    fstype: "proc",
    flags: NOSUID_NODEV_NOEXEC,
    data: "",
};
const M_SYS: Mount = Mount {
    source: "sysfs",
    target: SYS,
    fstype: "sysfs",
    flags: NOSUID_NODEV_NOEXEC,
    data: "",
};
const M_DEV: Mount = Mount {
    source: "devtmpfs",
    target: DEV,
    fstype: "devtmpfs",
    flags: MsFlags::MS_NOSUID,
    data: "mode=0755",
};
const M_RUN: Mount = Mount {
    source: "tmpfs",
    target: RUN,
    fstype: "tmpfs",
    flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
    data: "mode=0755",
};

/// Stage 1 (initramfs): what is needed to load modules and find the root.
pub const STAGE1: &[Mount] = &[M_PROC, M_SYS, M_DEV, M_RUN];

/// Stage 2 (root fs): everything a running system expects; already mounted ones
/// (moved over by stage 1) are skipped.
pub const STAGE2: &[Mount] = &[
    M_PROC,
    M_SYS,
    M_DEV,
    Mount {
        source: "devpts",
        target: DEV_PTS,
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: "ptmxmode=666,mode=620,gid=5",
    },
    Mount {
        source: "tmpfs",
        target: DEV_SHM,
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: "mode=1777",
    },
    M_RUN,
    Mount {
        source: "tmpfs",
        target: TMP,
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: "mode=1777",
    },
    Mount {
        source: "cgroup2",
        target: CGROUP,
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
];

/// Mounts every entry of `table` that is not mounted yet, in order. Goes on past a
/// failure; returns every failure.
pub fn mount_table(table: &[Mount]) -> std::result::Result<(), Vec<Error>> {
    // Before /proc is up there is no mountinfo: nothing is mounted then, and EBUSY
    // catches the rest.
    let mounted = std::fs::read_to_string(MOUNTINFO)
        .map(|t| parse_mountinfo(&t))
        .unwrap_or_default();
    let mut errors = Vec::new();
    for m in table {
        if mounted.iter().any(|p| p == m.target) {
            continue;
        }
        if let Err(e) = mount_one(m) {
            errors.push(e);
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn mount_one(m: &Mount) -> Result<()> {
    let what = || format!("mount {} ({})", m.target, m.fstype);
    std::fs::create_dir_all(m.target).context(|| format!("{}: create mount point", what()))?;
    let data = (!m.data.is_empty()).then_some(m.data);
    match mount(Some(m.source), m.target, Some(m.fstype), m.flags, data) {
        Ok(()) | Err(Errno::EBUSY) => Ok(()),
        Err(e) => Err(e).context(what),
    }
}

/// Mount points of a mountinfo text, in mount order, with `\040`-style escapes undone.
pub fn parse_mountinfo(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .collect()
}

fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts every mount but `/` in reverse mount order (failures, e.g. a busy /dev,
/// are logged at info level), then remounts `/` read-only.
pub fn unmount_all() -> Result<()> {
    let text = std::fs::read_to_string(MOUNTINFO).context(|| format!("read {MOUNTINFO}"))?;
    for target in parse_mountinfo(&text).iter().rev().filter(|t| *t != "/") {
        if let Err(e) = umount2(target.as_str(), MntFlags::empty()) {
            info!("shutdown: umount {target}: {e}");
        }
    }
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .context(|| "remount / read-only")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_absolute_and_unique() {
        for table in [STAGE1, STAGE2] {
            for (i, m) in table.iter().enumerate() {
                assert!(m.target.starts_with('/'), "{m:?}");
                assert!(table[..i].iter().all(|o| o.target != m.target), "{m:?}");
            }
        }
        // Stage 1 mounts what stage 2 finds already there, and parents come first.
        assert_eq!(&STAGE2[..3], &STAGE1[..3]);
        let pos = |t| STAGE2.iter().position(|m| m.target == t).unwrap();
        assert!(pos(DEV) < pos(DEV_PTS) && pos(DEV) < pos(DEV_SHM) && pos(SYS) < pos(CGROUP));
        let pts = STAGE2.iter().find(|m| m.target == DEV_PTS).unwrap();
        assert!(pts.data.contains("ptmxmode=666"));
    }

    #[test]
    fn mountinfo_mount_points_in_order() {
        let text = "\
22 1 254:2 / / rw,relatime shared:1 - ext4 /dev/vda2 rw
23 22 0:5 / /dev rw,nosuid shared:2 - devtmpfs devtmpfs rw,size=1k
24 23 0:21 / /dev/pts rw - devpts devpts rw,gid=5,mode=620,ptmxmode=666
25 22 0:22 / /mnt/my\\040disk rw - tmpfs tmpfs rw
";
        assert_eq!(
            parse_mountinfo(text),
            ["/", "/dev", "/dev/pts", "/mnt/my disk"]
        );
        assert!(parse_mountinfo("").is_empty());
        assert_eq!(unescape("a\\134b\\"), "a\\b\\");
    }
}
