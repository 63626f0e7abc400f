//! Disk image: GPT, ESP (FAT32), root (ext4), qcow2.
//!
//! [`build_disk`] lays out a sparse raw disk (1 MiB aligned: ESP then root filling
//! the rest), converts it to qcow2 and renames it into place; [`extract_esp_files`]
//! reads files back from the ESP of such an image.

pub mod esp;
pub mod ext4;
pub mod fatfix;
pub mod gpt;
pub mod guid;
pub mod qcow2;
pub mod raw;

use guid::Guid;
use kimg_contract::cmdline::{ESP_PARTLABEL, ROOT_PARTLABEL};
use kimg_contract::manifest::Partition;
use kimg_util::cmd::CmdError;
use kimg_util::fs::{IoError, PathContext};
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

/// Smallest (and default) ESP: below ~65 MiB fatfs cannot make FAT32 with
/// 512-byte clusters' 65525-cluster minimum, and silently makes FAT16 below ~33 MiB.
pub const ESP_MIN_SIZE: u64 = 64 * MIB;
/// Smallest root partition kimg accepts.
pub const ROOT_MIN_SIZE: u64 = 16 * MIB;
/// Partition alignment.
pub const MIB: u64 = 1 << 20;

/// Inputs of one disk image.
#[derive(Debug, Clone)]
pub struct DiskSpec<'a> {
    /// Path inside the ESP (e.g. `kimg/vmlinuz`) -> host file to copy there.
    pub esp_files: &'a [(String, PathBuf)],
    /// Staging tree that becomes the ext4 root filesystem.
    pub root_dir: &'a Path,
    /// Virtual disk size in bytes; must hold the ESP, the root content and the GPT.
    pub size: u64,
    /// ESP size in bytes: at least [`ESP_MIN_SIZE`], a multiple of 1 MiB.
    pub esp_size: u64,
    /// Every GUID, volume id and hash seed is derived from this.
    pub seed: [u8; 32],
    /// Fixed timestamp (SOURCE_DATE_EPOCH) for all filesystem metadata.
    pub mtime: u64,
    /// zstd-compressed qcow2 clusters: smaller, a little slower to read.
    pub compress: bool,
    /// Paths (`/var/lib/containerd`) below which entries keep their owners from the
    /// staging tree (container image layers own their files); elsewhere all is root's.
    pub keep_owners: &'a [&'a str],
}

/// Everything that can go wrong building or reading a disk image.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// An external program (mkfs.ext4, debugfs, qemu-img) failed.
    #[error(transparent)]
    Command(#[from] CmdError),
    /// debugfs ran but reported errors.
    #[error("debugfs on {}: {stderr}", path.display())]
    Debugfs {
        /// The filesystem image.
        path: PathBuf,
        /// debugfs's error lines.
        stderr: String,
    },
    /// Writing or reading the FAT filesystem failed.
    #[error("ESP {esp_path}: {source}")]
    Fat {
        /// Path inside the ESP, or the operation.
        esp_path: String,
        /// Why (fatfs reports io errors; "no space" means the ESP is too small).
        source: io::Error,
    },
    /// The spec is inconsistent.
    #[error("invalid disk spec: {0}")]
    Spec(String),
    /// The disk or a partition cannot hold what goes in it.
    #[error("{what} too small: needs at least {needed} bytes, has {available}")]
    TooSmall {
        /// Which part.
        what: &'static str,
        /// Bytes needed (lower bound).
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// A staging path debugfs could not address.
    #[error("{}: file names with `\"` or newlines are not supported", path.display())]
    UnsupportedName {
        /// The host path.
        path: PathBuf,
    },
    /// The image has no readable kimg partition table.
    #[error("{}: {reason}", image.display())]
    BadImage {
        /// The image.
        image: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A requested file is not on the ESP.
    #[error("{}: no file {path} on the ESP", image.display())]
    MissingEspFile {
        /// The image.
        image: PathBuf,
        /// The ESP path asked for.
        path: String,
    },
}

/// True when `x` is a multiple of `to` (written so as not to need Rust 1.87's
/// `is_multiple_of`; the workspace targets 1.80).
fn aligned(x: u64, to: u64) -> bool {
    x.checked_rem(to) == Some(0)
}

/// Byte offsets and sizes of the two partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    esp_offset: u64,
    esp_size: u64,
    root_offset: u64,
    root_size: u64,
}

impl Layout {
    fn new(size: u64, esp_size: u64) -> Result<Layout, DiskError> {
        if !aligned(size, gpt::SECTOR) {
            return Err(DiskError::Spec(format!(
                "disk size {size} is not a multiple of 512"
            )));
        }
        if esp_size < ESP_MIN_SIZE || !aligned(esp_size, MIB) {
            return Err(DiskError::Spec(format!(
                "ESP size {esp_size} must be a multiple of 1 MiB and at least {ESP_MIN_SIZE}"
            )));
        }
        let esp_offset = MIB;
        let root_offset = esp_offset + esp_size;
        // The root ends at the last MiB boundary before the backup GPT.
        let backup = (1 + gpt::ENTRY_SECTORS) * gpt::SECTOR;
        let root_end = size.saturating_sub(backup) / MIB * MIB;
        let root_size = root_end.saturating_sub(root_offset);
        if root_size < ROOT_MIN_SIZE {
            return Err(DiskError::TooSmall {
                what: "disk",
                needed: root_offset + ROOT_MIN_SIZE + MIB,
                available: size,
            });
        }
        Ok(Layout {
            esp_offset,
            esp_size,
            root_offset,
            root_size,
        })
    }
}

/// Seed-derived identities of one disk.
struct Ids {
    disk: Guid,
    esp_part: Guid,
    root_part: Guid,
    fat_volume_id: u32,
    ext4_uuid: Guid,
    ext4_hash_seed: Guid,
}

impl Ids {
    fn new(seed: &[u8; 32]) -> Ids {
        let v = guid::derive_bytes(seed, "fat-volume-id");
        Ids {
            disk: Guid::derive(seed, "gpt-disk"),
            esp_part: Guid::derive(seed, "gpt-part:kimg-esp"),
            root_part: Guid::derive(seed, "gpt-part:kimg-root"),
            fat_volume_id: u32::from_le_bytes([v[0], v[1], v[2], v[3]]),
            ext4_uuid: Guid::derive(seed, "ext4-uuid"),
            ext4_hash_seed: Guid::derive(seed, "ext4-hash-seed"),
        }
    }
}

/// Builds the qcow2 disk image `out` from `spec` and returns its partitions.
///
/// `out` is written atomically: everything happens in a temporary directory next
/// to it and the finished image is renamed into place; on any error nothing is
/// left at `out` (an existing file there is untouched) and temporary files are removed.
pub fn build_disk(spec: &DiskSpec, out: &Path) -> Result<Vec<Partition>, DiskError> {
    let layout = Layout::new(spec.size, spec.esp_size)?;
    let ids = Ids::new(&spec.seed);

    // Cheap checks before any heavy work.
    let staging = ext4::walk(spec.root_dir)?;
    if staging.data_bytes > layout.root_size {
        return Err(DiskError::TooSmall {
            what: "root partition",
            needed: staging.data_bytes,
            available: layout.root_size,
        });
    }
    let mut esp_bytes = 0;
    for (esp_path, host) in spec.esp_files {
        esp::esp_components(esp_path)?;
        esp_bytes += fs::metadata(host).with_path(host)?.len();
    }
    if esp_bytes > layout.esp_size {
        return Err(DiskError::TooSmall {
            what: "ESP",
            needed: esp_bytes,
            available: layout.esp_size,
        });
    }

    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = kimg_util::fs::work_dir(parent, ".kimg-disk-")?;

    let raw_path = tmp.path().join("disk.raw");
    let raw = File::create(&raw_path).with_path(&raw_path)?;
    raw.set_len(spec.size).with_path(&raw_path)?;

    // The FAT image is built in memory while mkfs.ext4 runs (2 cores, both CPU bound).
    let (esp, ext) = std::thread::scope(|s| {
        let esp = s.spawn(|| {
            esp::build(
                spec.esp_files,
                layout.esp_size,
                ids.fat_volume_id,
                spec.mtime,
            )
        });
        // mkfs first and into a still-empty disk: it then cannot clobber the rest.
        let ext = ext4::build(
            spec.root_dir,
            &staging,
            &raw_path,
            layout.root_offset,
            layout.root_size,
            ext4::Ext4Params {
                uuid: ids.ext4_uuid,
                hash_seed: ids.ext4_hash_seed,
                mtime: spec.mtime,
                keep_owners: spec.keep_owners,
            },
            tmp.path(),
        );
        let esp = esp
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (esp, ext)
    });
    ext?;
    raw::write_nonzero(&raw, &raw_path, layout.esp_offset, &esp?)?;

    let sectors = spec.size / gpt::SECTOR;
    let lba = |bytes: u64| bytes / gpt::SECTOR;
    let table = gpt::encode(
        sectors,
        ids.disk,
        &[
            gpt::GptPartition {
                type_guid: guid::ESP_TYPE,
                part_guid: ids.esp_part,
                first_lba: lba(layout.esp_offset),
                last_lba: lba(layout.esp_offset + layout.esp_size) - 1,
                name: ESP_PARTLABEL.into(),
            },
            gpt::GptPartition {
                type_guid: guid::ROOT_X86_64_TYPE,
                part_guid: ids.root_part,
                first_lba: lba(layout.root_offset),
                last_lba: lba(layout.root_offset + layout.root_size) - 1,
                name: ROOT_PARTLABEL.into(),
            },
        ],
    );
    raw::write_nonzero(&raw, &raw_path, 0, &table.primary)?;
    raw::write_nonzero(&raw, &raw_path, table.backup_offset, &table.backup)?;
    drop(raw);

    let qcow = tmp.path().join("disk.qcow2");
    qcow2::from_raw(&raw_path, &qcow, spec.compress)?;
    fs::remove_file(&raw_path).with_path(&raw_path)?;
    fs::rename(&qcow, out).with_path(out)?;

    Ok(vec![
        Partition {
            name: ESP_PARTLABEL.into(),
            type_guid: guid::ESP_TYPE.to_string(),
            part_uuid: ids.esp_part.to_string(),
            fs: "vfat".into(),
            fs_uuid: format!("{:08x}", ids.fat_volume_id),
            offset: layout.esp_offset,
            size: layout.esp_size,
        },
        Partition {
            name: ROOT_PARTLABEL.into(),
            type_guid: guid::ROOT_X86_64_TYPE.to_string(),
            part_uuid: ids.root_part.to_string(),
            fs: "ext4".into(),
            fs_uuid: ids.ext4_uuid.to_string(),
            offset: layout.root_offset,
            size: layout.root_size,
        },
    ])
}

/// Copies files from the ESP of the kimg qcow2 `image` to `dest_dir/<file name>`
/// (e.g. `kimg/vmlinuz` -> `dest_dir/vmlinuz`); returns the written paths in order.
pub fn extract_esp_files(
    image: &Path,
    esp_paths: &[&str],
    dest_dir: &Path,
) -> Result<Vec<PathBuf>, DiskError> {
    fs::create_dir_all(dest_dir).with_path(dest_dir)?;
    let tmp = kimg_util::fs::work_dir(dest_dir, ".kimg-esp-")?;
    let bad = |reason: String| DiskError::BadImage {
        image: image.to_path_buf(),
        reason,
    };

    let head = tmp.path().join("gpt.raw");
    qcow2::read_range(image, &head, gpt::SECTOR, 0, gpt::first_usable_lba())?;
    let bytes = fs::read(&head).with_path(&head)?;
    let parts = gpt::parse(&bytes).map_err(|e| bad(e.to_string()))?;
    let esp = parts
        .iter()
        .find(|p| p.name == ESP_PARTLABEL)
        .ok_or_else(|| bad(format!("no partition named {ESP_PARTLABEL}")))?;
    let offset = esp.first_lba * gpt::SECTOR;
    let size = (esp.last_lba + 1).saturating_sub(esp.first_lba) * gpt::SECTOR;
    if !aligned(offset, MIB) || !aligned(size, MIB) || size == 0 {
        return Err(bad(format!(
            "{ESP_PARTLABEL} at {offset}+{size} is not 1 MiB aligned"
        )));
    }

    let esp_raw = tmp.path().join("esp.raw");
    qcow2::read_range(image, &esp_raw, MIB, offset / MIB, size / MIB)?;
    esp::read_files(&esp_raw, image, esp_paths, dest_dir)
}

#[cfg(test)]
mod tests;
