//! The kernel command line keys kimg-init reads, and the fixed names of the disk.
//!
//! The launcher writes `kimg.hostname=vm-NNN`; the image's boot entry carries the
//! rest. Both sides build and read the line through this module.

/// GPT partition name of the root filesystem; stage 1 looks for it by default.
pub const ROOT_PARTLABEL: &str = "kimg-root";
/// GPT partition name of the EFI system partition.
pub const ESP_PARTLABEL: &str = "kimg-esp";
/// Path of the kernel on the ESP.
pub const ESP_KERNEL: &str = "kimg/vmlinuz";
/// Path of the initramfs on the ESP.
pub const ESP_INITRD: &str = "kimg/initrd.img";
/// Path of the boot loader on the ESP: the removable-media default that UEFI firmware
/// starts when it has no boot entries (systemd-boot, which reads `loader/`).
pub const ESP_BOOTLOADER: &str = "EFI/BOOT/BOOTX64.EFI";
/// Kernel command line key carrying the VM's hostname.
pub const KEY_HOSTNAME: &str = "kimg.hostname";
/// Kernel command line key naming the root partition: `PARTLABEL=..` or `PARTUUID=..`.
pub const KEY_ROOT: &str = "kimg.root";
/// Kernel command line flag: stop in an emergency shell before switching root.
pub const KEY_SHELL: &str = "kimg.shell";
/// Kernel command line key: number of nodes in the cluster (for /etc/hosts).
pub const KEY_NODES: &str = "kimg.nodes";
/// Kernel command line key: number of routers in the cluster.
pub const KEY_ROUTERS: &str = "kimg.routers";
/// Kernel command line key: number of testers in the cluster.
pub const KEY_TESTERS: &str = "kimg.testers";
/// Kernel command line flag: an overlay cdrom is attached; wait for it and unpack it.
/// `kimg.cdrom=off` (or `=0`) later on the line takes it back: the cdrom stays
/// attached but is left alone (to look at a broken overlay by hand).
pub const KEY_CDROM: &str = "kimg.cdrom";
/// Kernel command line key: `kimg.console=off` (or `=0`) leaves the serial console
/// without a login shell (by default kimg-init keeps a root shell on it after boot).
pub const KEY_CONSOLE: &str = "kimg.console";
/// The serial console every kimg VM logs to.
pub const CONSOLE: &str = "ttyS0";

/// How stage 1 finds the root partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootSpec {
    /// By GPT partition name.
    PartLabel(String),
    /// By GPT unique partition GUID (lower case, with dashes).
    PartUuid(String),
}

impl Default for RootSpec {
    fn default() -> Self {
        RootSpec::PartLabel(ROOT_PARTLABEL.to_string())
    }
}

impl RootSpec {
    /// The `kimg.root=` value for this spec.
    pub fn to_arg(&self) -> String {
        match self {
            RootSpec::PartLabel(l) => format!("PARTLABEL={l}"),
            RootSpec::PartUuid(u) => format!("PARTUUID={u}"),
        }
    }
}

/// What kimg-init takes from `/proc/cmdline`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KimgArgs {
    /// `kimg.hostname=`, if the launcher gave one.
    pub hostname: Option<String>,
    /// `kimg.root=`; the default partition label when absent or unreadable.
    pub root: RootSpec,
    /// `kimg.shell`: drop to a shell in stage 1 instead of booting.
    pub shell: bool,
    /// `kimg.nodes=`, `kimg.routers=`, `kimg.testers=`: the cluster's size, when the
    /// launcher gave all three.
    pub size: Option<crate::net::ClusterSize>,
    /// `kimg.cdrom`: an overlay cdrom is attached (and not taken back by a later
    /// `kimg.cdrom=off`).
    pub cdrom: bool,
    /// `kimg.console=off`: no shell on the serial console (a later `kimg.console`
    /// without `=off` takes it back).
    pub console_off: bool,
}

impl KimgArgs {
    /// Reads the kimg keys out of a kernel command line; unknown words are ignored,
    /// a malformed `kimg.root=` falls back to the default label.
    pub fn parse(cmdline: &str) -> KimgArgs {
        let mut args = KimgArgs::default();
        let (mut nodes, mut routers, mut testers) = (None, None, None);
        for word in cmdline.split_ascii_whitespace() {
            let (key, value) = word.split_once('=').unwrap_or((word, ""));
            match key {
                KEY_HOSTNAME if !value.is_empty() => args.hostname = Some(value.to_string()),
                KEY_ROOT => {
                    if let Some(l) = value.strip_prefix("PARTLABEL=").filter(|l| !l.is_empty()) {
                        args.root = RootSpec::PartLabel(l.to_string());
                    } else if let Some(u) =
                        value.strip_prefix("PARTUUID=").filter(|u| !u.is_empty())
                    {
                        args.root = RootSpec::PartUuid(u.to_ascii_lowercase());
                    }
                }
                KEY_SHELL => args.shell = true,
                KEY_NODES => nodes = value.parse().ok(),
                KEY_ROUTERS => routers = value.parse().ok(),
                KEY_TESTERS => testers = value.parse().ok(),
                KEY_CDROM => args.cdrom = !matches!(value, "off" | "0"),
                KEY_CONSOLE => args.console_off = matches!(value, "off" | "0"),
                _ => {}
            }
        }
        if let (Some(nodes), Some(routers), Some(testers)) = (nodes, routers, testers) {
            args.size = Some(crate::net::ClusterSize {
                nodes,
                routers,
                testers,
            });
        }
        args
    }
}

/// Kernel words that only make a throw-away VM's boot quicker. Measured under TCG
/// here (median of 5 boots each, one VM to ready): the crypto self-tests cost 0.35 s
/// (`cryptomgr.notests` skips the algorithm tests, the blacklisted initcall is the
/// CTR-KDF test alone and registers nothing), KASLR's relocation in the decompressor
/// 0.1 s. Without KASLR the kernel's addresses are also the same on every boot, which
/// helps whoever debugs in the VM. (`nokaslr` is read by the decompressor; the kernel
/// proper does not know it and hands it to /init as an argument, which kimg-init
/// ignores.)
pub const FAST_BOOT: &str = "cryptomgr.notests initcall_blacklist=crypto_kdf108_init nokaslr";

/// The command line an image boots with, before the launcher adds the hostname.
pub fn base_cmdline(root: &RootSpec) -> String {
    format!(
        "console={CONSOLE} {KEY_ROOT}={} panic=-1 quiet loglevel=4 {FAST_BOOT}",
        root.to_arg()
    )
}

/// `base` plus the VM's hostname, as the launcher passes it.
pub fn with_hostname(base: &str, hostname: &str) -> String {
    format!("{base} {KEY_HOSTNAME}={hostname}")
}

/// `base` plus the cluster's size, as the launcher passes it.
pub fn with_size(base: &str, size: &crate::net::ClusterSize) -> String {
    format!(
        "{base} {KEY_NODES}={} {KEY_ROUTERS}={} {KEY_TESTERS}={}",
        size.nodes, size.routers, size.testers
    )
}

/// `base` plus the flag that an overlay cdrom is attached.
pub fn with_cdrom(base: &str) -> String {
    format!("{base} {KEY_CDROM}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_through_the_launcher_line() {
        let root = RootSpec::PartUuid("0fc63daf-8483-4772-8e79-3d69d8477de4".into());
        let line = with_hostname(&base_cmdline(&root), "vm-003");
        let args = KimgArgs::parse(&line);
        assert_eq!(args.hostname.as_deref(), Some("vm-003"));
        assert_eq!(args.root, root);
        assert!(!args.shell);
        assert_eq!(args.size, None);
        let size = crate::net::ClusterSize {
            nodes: 5,
            routers: 1,
            testers: 2,
        };
        assert_eq!(KimgArgs::parse(&with_size(&line, &size)).size, Some(size));
        assert_eq!(
            KimgArgs::parse("kimg.nodes=3 kimg.routers=x kimg.testers=0").size,
            None
        );
    }

    #[test]
    fn defaults_and_garbage() {
        let args = KimgArgs::parse("BOOT_IMAGE=/x kimg.root=BOGUS kimg.hostname= kimg.shell");
        assert_eq!(args.root, RootSpec::default());
        assert_eq!(args.hostname, None);
        assert!(args.shell);
        assert_eq!(KimgArgs::parse(""), KimgArgs::default());
    }

    #[test]
    fn a_later_cdrom_off_takes_the_flag_back() {
        assert!(KimgArgs::parse(&with_cdrom("quiet")).cdrom);
        assert!(!KimgArgs::parse("kimg.cdrom kimg.cdrom=off").cdrom);
        assert!(!KimgArgs::parse("kimg.cdrom kimg.cdrom=0").cdrom);
        assert!(KimgArgs::parse("kimg.cdrom=off kimg.cdrom").cdrom);
    }

    #[test]
    fn the_console_shell_is_on_unless_turned_off() {
        assert!(!KimgArgs::parse("quiet").console_off);
        assert!(KimgArgs::parse("quiet kimg.console=off").console_off);
        assert!(KimgArgs::parse("kimg.console=0").console_off);
        assert!(!KimgArgs::parse("kimg.console=off kimg.console=on").console_off);
    }
}
