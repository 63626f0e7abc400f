//! The root filesystem: `mkfs.ext4 -d` from the staging tree, then one `debugfs`
//! pass that makes every entry root-owned and stamps fixed timestamps.

use super::guid::Guid;
use super::DiskError;
use kimg_contract::cmdline::ROOT_PARTLABEL;
use kimg_util::cmd;
use kimg_util::fs::IoError;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// ext4 block size kimg uses.
const BLOCK: u64 = 4096;

/// One entry of the staging tree, as the fix-up needs it.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Path inside the filesystem, starting with `/`, as raw bytes.
    pub fs_path: Vec<u8>,
    /// Owner on the host.
    pub uid: u32,
    /// Group on the host.
    pub gid: u32,
}

/// The walked staging tree.
#[derive(Debug, Clone, Default)]
pub struct Staging {
    /// Every entry below the root, parents before children, sorted by name.
    pub entries: Vec<Entry>,
    /// Estimate of the data blocks the tree needs, in bytes (without ext4 metadata).
    pub data_bytes: u64,
}

/// Walks `root_dir` without following symlinks.
///
/// Fails on names debugfs's command parser cannot take (`"` or newline).
pub fn walk(root_dir: &Path) -> Result<Staging, DiskError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DiskError::Io(IoError::new(path, source))
    };
    let meta = fs::metadata(root_dir).map_err(io_err(root_dir))?;
    if !meta.is_dir() {
        return Err(DiskError::Spec(format!(
            "root_dir {} is not a directory",
            root_dir.display()
        )));
    }
    let mut staging = Staging::default();
    let mut stack: Vec<(PathBuf, Vec<u8>)> = vec![(root_dir.to_path_buf(), Vec::new())];
    while let Some((dir, prefix)) = stack.pop() {
        let mut names: Vec<_> = fs::read_dir(&dir)
            .map_err(io_err(&dir))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io_err(&dir))?;
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let host = dir.join(&name);
            if name.as_bytes().iter().any(|&b| b == b'"' || b == b'\n') {
                return Err(DiskError::UnsupportedName { path: host });
            }
            let m = fs::symlink_metadata(&host).map_err(io_err(&host))?;
            let mut fs_path = prefix.clone();
            fs_path.push(b'/');
            fs_path.extend_from_slice(name.as_bytes());
            let ft = m.file_type();
            if ft.is_socket() {
                // mkfs.ext4 -d skips sockets (with a warning), so the fix-up must too.
                continue;
            }
            staging.data_bytes += data_estimate(&m);
            if m.is_dir() {
                subdirs.push((host, fs_path.clone()));
            }
            staging.entries.push(Entry {
                fs_path,
                uid: m.uid(),
                gid: m.gid(),
            });
        }
        // Reverse so the stack pops directories in name order.
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(staging)
}

/// Data bytes an entry takes in ext4: sparse files count their allocated blocks
/// only (mkfs keeps holes), short symlinks live in the inode.
fn data_estimate(m: &fs::Metadata) -> u64 {
    let bytes = if m.file_type().is_symlink() {
        if m.len() < 60 {
            0
        } else {
            m.len()
        }
    } else if m.is_file() {
        m.len().min(m.blocks() * 512)
    } else if m.is_dir() {
        m.len()
    } else {
        0
    };
    bytes.div_ceil(BLOCK) * BLOCK
}

/// The debugfs script: ownership to 0:0 where needed (not below `keep_owners`),
/// every timestamp to `mtime`, and no mount-count or interval driven fsck.
pub fn fixup_script(staging: &Staging, mtime: u64, keep_owners: &[&str]) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(b"ssv max_mnt_count -1\nssv checkinterval 0\n");
    let root = Entry {
        fs_path: b"/".to_vec(),
        uid: 0,
        gid: 0,
    };
    for e in std::iter::once(&root).chain(&staging.entries) {
        let mut sif = |field: &str, value: &str| {
            s.extend_from_slice(b"sif \"");
            s.extend_from_slice(&e.fs_path);
            s.extend_from_slice(format!("\" {field} {value}\n").as_bytes());
        };
        let kept = keep_owners.iter().any(|k| {
            e.fs_path
                .strip_prefix(k.as_bytes())
                .is_some_and(|rest| rest.first() == Some(&b'/'))
        });
        if e.uid != 0 && !kept {
            sif("uid", "0");
        }
        if e.gid != 0 && !kept {
            sif("gid", "0");
        }
        // Host atime/ctime change on every read or chown; fixed times keep builds
        // reproducible.
        let t = format!("@{mtime}");
        for field in ["atime", "ctime", "mtime", "crtime"] {
            sif(field, &t);
        }
    }
    s
}

/// Parameters of the root filesystem.
#[derive(Debug, Clone, Copy)]
pub struct Ext4Params<'a> {
    /// Filesystem UUID.
    pub uuid: Guid,
    /// Directory hash seed.
    pub hash_seed: Guid,
    /// Timestamp for all metadata (SOURCE_DATE_EPOCH).
    pub mtime: u64,
    /// Paths below which entries keep their staging tree's owners.
    pub keep_owners: &'a [&'a str],
}

/// Makes the ext4 from `root_dir` in place at byte `offset` of the raw disk file
/// `disk` (`size` bytes, a multiple of 4096), then runs the ownership/timestamp
/// fix-up on it; `work` holds the debugfs script.
///
/// Both tools work on the partition inside the disk file (`mkfs.ext4 -E offset=`,
/// debugfs's `file?offset=` I/O option), so no separate filesystem image is made
/// and copied.
pub fn build(
    root_dir: &Path,
    staging: &Staging,
    disk: &Path,
    offset: u64,
    size: u64,
    params: Ext4Params,
    work: &Path,
) -> Result<(), DiskError> {
    let fake_time = params.mtime.to_string();
    cmd::run(
        cmd::command("mkfs.ext4")
            .env("E2FSPROGS_FAKE_TIME", &fake_time)
            .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256"])
            .args(["-L", ROOT_PARTLABEL])
            .arg("-U")
            .arg(params.uuid.to_string())
            .arg("-E")
            .arg(format!(
                "hash_seed={},root_owner=0:0,offset={offset},nodiscard,lazy_itable_init=0",
                params.hash_seed
            ))
            .arg("-d")
            .arg(root_dir)
            .arg(disk)
            .arg((size / BLOCK).to_string()),
    )?;

    let script = work.join("fixup.debugfs");
    fs::write(
        &script,
        fixup_script(staging, params.mtime, params.keep_owners),
    )
    .map_err(|source| DiskError::Io(IoError::new(script.clone(), source)))?;
    // The `?` introduces I/O options, so name the disk relative to its directory,
    // whose path may contain anything.
    let (dir, name) = match (disk.parent(), disk.file_name()) {
        (Some(d), Some(n)) if !n.as_bytes().contains(&b'?') => (d, n),
        _ => {
            return Err(DiskError::Spec(format!(
                "debugfs cannot address {}",
                disk.display()
            )))
        }
    };
    let mut device = name.to_os_string();
    device.push(format!("?offset={offset}"));
    let out = cmd::run(
        cmd::command("debugfs")
            .current_dir(if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            })
            .env("E2FSPROGS_FAKE_TIME", &fake_time)
            .arg("-w")
            .arg("-f")
            .arg(&script)
            .arg(device),
    )?;
    // debugfs exits 0 even when a command fails; its errors go to stderr, after the
    // version banner.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with("debugfs "))
        .collect();
    if !errors.is_empty() {
        return Err(DiskError::Debugfs {
            path: disk.to_path_buf(),
            stderr: errors.join("\n"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::fs::File;

    #[test]
    fn walk_and_script() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("b/c")).unwrap();
        fs::write(root.join("a file"), b"x").unwrap();
        fs::write(root.join("b/c/f"), vec![1u8; 5000]).unwrap();
        std::os::unix::fs::symlink("a file", root.join("l")).unwrap();
        std::os::unix::fs::lchown(root.join("l"), Some(1000), Some(1001)).unwrap();
        std::os::unix::fs::lchown(root.join("b/c/f"), Some(1000), Some(1001)).unwrap();
        let st = walk(root).unwrap();
        let paths: Vec<String> = st
            .entries
            .iter()
            .map(|e| String::from_utf8_lossy(&e.fs_path).into_owned())
            .collect();
        assert_eq!(paths, ["/a file", "/b", "/l", "/b/c", "/b/c/f"]);
        // Two directories and the 5000-byte file; the 1-byte file is one block.
        assert!(st.data_bytes >= 4 * 4096, "{}", st.data_bytes);
        let sparse = File::create(root.join("b/sparse")).unwrap();
        sparse.set_len(1 << 40).unwrap();
        assert!(walk(root).unwrap().data_bytes < 1 << 20);
        let _ = std::os::unix::net::UnixListener::bind(root.join("b/sock")).unwrap();
        assert!(!walk(root)
            .unwrap()
            .entries
            .iter()
            .any(|e| e.fs_path.ends_with(b"sock")));
        fs::remove_file(root.join("b/sparse")).unwrap();
        let script = String::from_utf8(fixup_script(&st, 42, &[])).unwrap();
        assert!(
            script.contains("sif \"/l\" uid 0\nsif \"/l\" gid 0\n"),
            "{script}"
        );
        assert!(script.contains("sif \"/b/c/f\" uid 0\n"), "{script}");
        // Below a kept path owners stay (container layers); "/l" is not below "/b/c".
        let kept = String::from_utf8(fixup_script(&st, 42, &["/b/c", "/"])).unwrap();
        assert!(!kept.contains("sif \"/b/c/f\" uid"), "{kept}");
        assert!(kept.contains("sif \"/l\" uid 0\n"), "{kept}");
        assert!(!script.contains("sif \"/b\" uid"), "{script}");
        assert!(script.contains("sif \"/a file\" crtime @42\n"), "{script}");
        assert!(script.contains("sif \"/\" mtime @42\n"), "{script}");

        fs::write(root.join("bad\"name"), b"").unwrap();
        assert!(matches!(walk(root), Err(DiskError::UnsupportedName { .. })));
        assert!(walk(&root.join("missing")).is_err());
    }
}
