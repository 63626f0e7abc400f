//! The image manifest (`hd.json` beside `hd.img`): what an image is made of.
//!
//! Written by `kimg build`, read by `kimg run` (kernel and command line), `kimg
//! publish` and users' scripts. The format is versioned by `format`.

use serde::{Deserialize, Serialize};

/// Current manifest format version.
pub const MANIFEST_FORMAT: u32 = 1;

/// Everything `kimg build` records about an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version ([`MANIFEST_FORMAT`]).
    pub format: u32,
    /// Version of the kimg that built the image.
    pub kimg_version: String,
    /// What the image is for (`base` or `k8s` in the JSON).
    pub flavour: crate::Flavour,
    /// The kernel and how it is booted.
    pub kernel: KernelInfo,
    /// Size of the virtual disk in bytes.
    pub disk_size: u64,
    /// GPT partitions in table order.
    pub partitions: Vec<Partition>,
    /// Every input that went into the image, with its digest.
    pub components: Vec<Component>,
    /// Build time, seconds since the epoch: SOURCE_DATE_EPOCH (so the same inputs
    /// give the same manifest). 0 in manifests written before this field existed.
    #[serde(default)]
    pub build_time: u64,
}

/// The kernel inside the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelInfo {
    /// `uname -r` of the kernel, e.g. `6.1.0-56-cloud-amd64`.
    pub version: String,
    /// Command line the boot entry uses; the launcher appends the hostname.
    pub cmdline: String,
    /// Path of the kernel on the ESP.
    pub esp_kernel: String,
    /// Path of the initramfs on the ESP.
    pub esp_initrd: String,
    /// sha256 of the kernel's config file.
    pub config_sha256: String,
    /// Stage 1 finds its devices on virtio-mmio too (`virtio_mmio` loaded or built
    /// in): the image boots on QEMU's microvm. Images from before it are q35 only.
    #[serde(default)]
    pub mmio: bool,
}

/// One GPT partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    /// GPT partition name (label).
    pub name: String,
    /// Partition type GUID.
    pub type_guid: String,
    /// Unique partition GUID.
    pub part_uuid: String,
    /// Filesystem type: `vfat` or `ext4`.
    pub fs: String,
    /// Filesystem UUID (ext4) or volume id (FAT, 8 hex digits).
    pub fs_uuid: String,
    /// First byte of the partition on the disk.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
}

/// One input of the image: the kernel, the initramfs, kimg-init, busybox, a binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Component {
    /// Short name, e.g. `kernel`, `initramfs`, `kimg-init`, `busybox`.
    pub name: String,
    /// Where it is inside the image (ESP paths start with `esp:`).
    pub path: String,
    /// Version, where one is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// sha256 of the content, lower-case hex.
    pub sha256: String,
}

impl Manifest {
    /// The component named `name`, if any.
    pub fn component(&self, name: &str) -> Option<&Component> {
        self.components.iter().find(|c| c.name == name)
    }

    /// The partition named `name`, if any.
    pub fn partition(&self, name: &str) -> Option<&Partition> {
        self.partitions.iter().find(|p| p.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            kimg_version: "0.1.0".into(),
            flavour: crate::Flavour::Base,
            kernel: KernelInfo {
                version: "6.1.0-56-cloud-amd64".into(),
                cmdline: "console=ttyS0".into(),
                esp_kernel: "kimg/vmlinuz".into(),
                esp_initrd: "kimg/initrd.img".into(),
                config_sha256: "00".repeat(32),
                mmio: true,
            },
            disk_size: 2 << 30,
            partitions: vec![Partition {
                name: "kimg-root".into(),
                type_guid: "0fc63daf-8483-4772-8e79-3d69d8477de4".into(),
                part_uuid: "11111111-2222-3333-4444-555555555555".into(),
                fs: "ext4".into(),
                fs_uuid: "66666666-7777-8888-9999-000000000000".into(),
                offset: 1 << 20,
                size: 1 << 30,
            }],
            components: vec![Component {
                name: "busybox".into(),
                path: "/usr/bin/busybox".into(),
                version: Some("1.35.0".into()),
                size: 10,
                sha256: "ab".repeat(32),
            }],
            build_time: 1_700_000_000,
        }
    }

    #[test]
    fn json_round_trip_and_lookups() {
        let m = sample();
        let json = serde_json::to_string_pretty(&m).unwrap();
        let back: Manifest = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.component("busybox").unwrap().path, "/usr/bin/busybox");
        assert!(back.partition("kimg-root").is_some());
        assert!(back.partition("nope").is_none());
    }

    #[test]
    fn build_time_defaults_to_zero_in_older_manifests() {
        let mut v = serde_json::to_value(sample()).unwrap();
        v.as_object_mut().unwrap().remove("build_time");
        let m: Manifest = serde_json::from_value(v).unwrap();
        assert_eq!(m.build_time, 0);
    }

    #[test]
    fn version_is_optional_in_json() {
        let json = r#"{"name":"x","path":"/x","size":1,"sha256":"00"}"#;
        let c: Component = serde_json::from_str(json).unwrap();
        assert_eq!(c.version, None);
        assert!(!serde_json::to_string(&c).unwrap().contains("version"));
    }
}
