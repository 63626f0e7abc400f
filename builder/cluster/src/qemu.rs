//! The QEMU command line of one VM.
//!
//! One place decides the machine: q35, direct kernel boot, the VM's qcow2 layer as a
//! virtio disk, the serial console on a socket with a log file, the agent's
//! virtio-serial port on a socket, virtio-rng fed from the host's urandom.

use super::accel::Accel;
use kimg_contract::agent::{session_port_name, PORT_NAME, SESSION_PORTS};
use kimg_contract::VmId;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The QEMU binary kimg runs.
pub const QEMU: &str = "qemu-system-x86_64";
/// OVMF firmware code (Debian's ovmf package), read-only and shared by every VM.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE.fd";
/// OVMF's variable store template; each VM boots from its own copy.
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS.fd";

/// The qdev id of every VM's cdrom device (QMP `blockdev-change-medium` names it).
pub const CDROM_DEVICE: &str = "cdrom0";

/// Files of one VM inside the cluster directory.
#[derive(Debug, Clone)]
pub struct VmPaths {
    /// `<cluster>/vm-NNN`.
    pub dir: PathBuf,
}

impl VmPaths {
    /// The directory of `vm` in `cluster_dir`.
    pub fn new(cluster_dir: &Path, vm: VmId) -> Self {
        VmPaths {
            dir: cluster_dir.join(vm.hostname()),
        }
    }
    /// The VM's qcow2 layer over the base image.
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }
    /// Unix socket of the agent (mode 0600).
    pub fn agent(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }
    /// Unix socket of QEMU's QMP monitor (one client at a time; mode 0600).
    pub fn qmp(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    /// Unix socket of session port `k` (`kimg.agent.K`).
    pub fn session_socket(&self, k: usize) -> PathBuf {
        self.dir.join(format!("session-{k}.sock"))
    }
    /// Lock file a client holds while it uses session port `k`.
    pub fn session_lock(&self, k: usize) -> PathBuf {
        self.dir.join(format!("session-{k}.lock"))
    }
    /// Unix socket of the serial console.
    pub fn console(&self) -> PathBuf {
        self.dir.join("console.sock")
    }
    /// Everything the serial console printed.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// The VM's own overlay cdrom, when an add-on gives it files of its own.
    pub fn cdrom(&self) -> PathBuf {
        self.dir.join("cdrom.iso")
    }
    /// QEMU's pid file.
    pub fn pidfile(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }
    /// The VM's copy of the UEFI variable store (`--uefi`).
    pub fn efi_vars(&self) -> PathBuf {
        self.dir.join("OVMF_VARS.fd")
    }
}

/// What one VM is started with.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// The VM.
    pub vm: VmId,
    /// Memory in MiB.
    pub mem_mb: u32,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Accelerator.
    pub accel: Accel,
    /// Kernel for direct boot.
    pub kernel: PathBuf,
    /// Initramfs for direct boot.
    pub initrd: PathBuf,
    /// Full kernel command line (hostname included).
    pub cmdline: String,
    /// Boot through OVMF and the image's ESP (systemd-boot) instead of direct kernel
    /// boot; the kernel, initrd and command line above are then not used.
    pub uefi: bool,
    /// Overlay cdrom, attached read-only as a virtio-scsi cd (the drive is there,
    /// empty, without one).
    pub cdrom: Option<PathBuf>,
}

/// The command that starts `spec` daemonized, with its files under `paths`.
pub fn command(spec: &VmSpec, paths: &VmPaths) -> Command {
    let mut c = machine(spec.accel, spec.mem_mb, spec.cpus);
    c.args(["-name", &spec.vm.hostname()])
        .arg("-daemonize")
        .arg("-pidfile")
        .arg(paths.pidfile());
    if spec.uefi {
        c.arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={}",
                escape(Path::new(OVMF_CODE))
            ))
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=1,file={}",
                escape(&paths.efi_vars())
            ));
    } else {
        c.arg("-kernel")
            .arg(&spec.kernel)
            .arg("-initrd")
            .arg(&spec.initrd)
            .args(["-append", &spec.cmdline]);
    }
    // The hostname also reaches kimg-init without a command line: SMBIOS OEM string.
    c.arg("-smbios")
        .arg(format!(
            "type=11,value={}={}",
            kimg_contract::cmdline::KEY_HOSTNAME,
            spec.vm.hostname()
        ))
        .arg("-drive")
        .arg(format!(
            "file={},format=qcow2,if=virtio,discard=unmap",
            escape(&paths.disk())
        ))
        .arg("-chardev")
        .arg(format!(
            "socket,id=con,path={},server=on,wait=off,logfile={}",
            escape(&paths.console()),
            escape(&paths.console_log())
        ))
        .args(["-serial", "chardev:con"])
        .args(["-device", "virtio-serial-pci,id=vser"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=agent,path={},server=on,wait=off",
            escape(&paths.agent())
        ))
        .arg("-device")
        .arg(format!(
            "virtserialport,bus=vser.0,chardev=agent,name={PORT_NAME}"
        ));
    // Streams (exec, shells, copies) get ports of their own: see kimg_contract::agent.
    for k in 0..SESSION_PORTS {
        c.arg("-chardev")
            .arg(format!(
                "socket,id=session{k},path={},server=on,wait=off",
                escape(&paths.session_socket(k))
            ))
            .arg("-device")
            .arg(format!(
                "virtserialport,bus=vser.0,chardev=session{k},name={}",
                session_port_name(k)
            ));
    }
    c // The apiserver (and anything else) never waits for entropy.
        .args(["-object", "rng-random,filename=/dev/urandom,id=rng0"])
        .args(["-device", "virtio-rng-pci,rng=rng0"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", escape(&paths.qmp())));
    let medium = spec.cdrom.as_ref().map_or(String::new(), |iso| {
        format!("file={},format=raw,", escape(iso))
    });
    c.args(["-device", "virtio-scsi-pci,id=scsi0"])
        .arg("-drive")
        .arg(format!("{medium}if=none,media=cdrom,id=cd0,readonly=on"))
        .arg("-device")
        .arg(format!("scsi-cd,bus=scsi0.0,drive=cd0,id={CDROM_DEVICE}"));
    c
}

/// QEMU with the machine every kimg VM gets (and the boot benchmark's floor too):
/// q35, no default devices, no display, exit instead of reboot.
pub fn machine(accel: Accel, mem_mb: u32, cpus: u32) -> Command {
    let cpu = match accel {
        Accel::Kvm => "host",
        Accel::Tcg => "max",
    };
    let mut c = kimg_util::cmd::command(QEMU);
    c.args(["-M", "q35", "-accel", accel.as_str(), "-cpu", cpu])
        .args(["-m", &mem_mb.to_string(), "-smp", &cpus.to_string()])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]);
    c
}

/// QEMU option values separate with commas; a comma in a path is written twice.
fn escape(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_has_the_contract_port_and_escaped_paths() {
        let vm: VmId = "vm-002".parse().unwrap();
        let paths = VmPaths::new(Path::new("/run/k,1"), vm);
        let spec = VmSpec {
            vm,
            mem_mb: 384,
            cpus: 1,
            accel: Accel::Tcg,
            kernel: "/b/vmlinuz".into(),
            initrd: "/b/initrd.img".into(),
            cmdline: "console=ttyS0 kimg.hostname=vm-002".into(),
            uefi: false,
            cdrom: Some("/c,d.iso".into()),
        };
        let line = kimg_util::cmd::display(&command(&spec, &paths));
        assert!(line.contains("name=kimg.agent"), "{line}");
        assert!(
            line.contains("path=/run/k,,1/vm-002/session-7.sock")
                && line.contains("chardev=session7,name=kimg.agent.7"),
            "{line}"
        );
        assert!(line.contains("path=/run/k,,1/vm-002/agent.sock"), "{line}");
        assert!(line.contains("-accel tcg"), "{line}");
        assert!(line.contains("-m 384"), "{line}");
        assert!(line.contains("kimg.hostname=vm-002"), "{line}");
        assert!(
            line.contains("-smbios type=11,value=kimg.hostname=vm-002"),
            "{line}"
        );
        assert!(!line.contains("pflash"), "{line}");
        assert!(
            line.contains("-qmp unix:/run/k,,1/vm-002/qmp.sock,server=on,wait=off"),
            "{line}"
        );
        assert!(
            line.contains("file=/c,,d.iso,format=raw,if=none,media=cdrom"),
            "{line}"
        );
    }

    #[test]
    fn uefi_boots_from_pflash_without_kernel_arguments() {
        let vm: VmId = "vm-001".parse().unwrap();
        let paths = VmPaths::new(Path::new("/run/k"), vm);
        let spec = VmSpec {
            vm,
            mem_mb: 384,
            cpus: 1,
            accel: Accel::Tcg,
            kernel: "/b/vmlinuz".into(),
            initrd: "/b/initrd.img".into(),
            cmdline: "console=ttyS0".into(),
            uefi: true,
            cdrom: None,
        };
        let line = kimg_util::cmd::display(&command(&spec, &paths));
        assert!(
            line.contains(
                "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE.fd"
            ),
            "{line}"
        );
        assert!(
            line.contains("unit=1,file=/run/k/vm-001/OVMF_VARS.fd"),
            "{line}"
        );
        assert!(
            !line.contains("-kernel") && !line.contains("-append"),
            "{line}"
        );
        assert!(line.contains("value=kimg.hostname=vm-001"), "{line}");
        // No cdrom: the drive is there, empty, for `kimg apply`.
        assert!(
            line.contains("-drive if=none,media=cdrom,id=cd0,readonly=on -device scsi-cd,bus=scsi0.0,drive=cd0,id=cdrom0"),
            "{line}"
        );
    }
}
