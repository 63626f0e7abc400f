//! The QEMU command line of one VM.
//!
//! One place decides the machine: microvm (virtio-mmio, described by its ACPI tables)
//! or q35 (PCI; UEFI), direct kernel boot, the VM's qcow2 layer as a virtio disk, the
//! serial console on a socket with a log file, the agent's virtio-serial ports on
//! sockets, virtio-rng fed from the host's urandom, a virtio-balloon that takes back
//! the pages the guest freed; the memory levers (a small TCG code buffer, no
//! transparent huge pages, free page reporting) for the many small VMs only
//! ([`lean`]).

use super::accel::Accel;
use kimg_contract::agent::{session_port_name, PORT_NAME, SESSION_PORTS};
use kimg_contract::VmId;
use serde::{Deserialize, Serialize};
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

/// TCG's small translated-code buffer, MiB, of a [`lean`] VM.
/// QEMU 7.2's default grows to ~60 MB resident per VM; 16 MB costs a few
/// retranslations at boot of the base image (measured: idle RSS -47 MB per VM, boot
/// CPU within the noise of a loaded host).
pub const TCG_TB_MB: u32 = 16;

/// The most guest memory, MiB, of a [`lean`] VM.
pub const LEAN_MAX_MEM_MB: u32 = 512;

/// How much code a VM's guest runs, as far as TCG's code buffer is concerned (the
/// image's flavour says: [`crate::addon::Addon::guest_code`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestCode {
    /// kimg-init, busybox and a developer's tools: a few MB of hot code.
    Small,
    /// Kubernetes: kubelet, containerd, etcd and the control plane, 100+ MB of Go.
    Big,
}

/// Whether a VM of `mem_mb` and `cpus` running `code` is one of the many small VMs
/// the memory levers are for: TCG's small code buffer ([`TCG_TB_MB`]), transparent
/// huge pages off ([`without_huge_pages`]) and the balloon's free page reporting.
/// The one place this is decided. Each lever trades host CPU for memory: a guest
/// whose hot code does not fit in 16 MB (a Kubernetes node's Go binaries) has TCG
/// translate the same code again and again, and a busy guest refaults the pages it
/// reported (the real Kubernetes test ran 42% longer, 1030 s against 723 s, when
/// its VMs had no huge pages and reported free pages).
/// A VM above [`LEAN_MAX_MEM_MB`] is given memory to run more, not to be one of
/// many. One vCPU only: QEMU 7.2 segfaulted once booting a 2-vCPU base VM with the
/// small buffer, where multi-threaded TCG flushes it across vCPU threads (not
/// reproduced in 59 boots, so a suspicion, not a finding). Under KVM there is no
/// code buffer; the other two levers hold.
pub fn lean(mem_mb: u32, cpus: u32, code: GuestCode) -> bool {
    code == GuestCode::Small && mem_mb <= LEAN_MAX_MEM_MB && cpus == 1
}

/// The QEMU machine type of a cluster's VMs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Machine {
    /// The PC of today: PCI devices, HPET and ACPI timers, UEFI. Clusters and
    /// snapshots from before microvm were all q35 (the default when unrecorded).
    #[default]
    Q35,
    /// No PCI and no legacy PC devices but the serial port, PIT and RTC: virtio-mmio
    /// devices listed in ACPI. Direct kernel boot only.
    Microvm,
}

impl Machine {
    /// The machine's name (`-M`).
    pub fn as_str(self) -> &'static str {
        match self {
            Machine::Q35 => "q35",
            Machine::Microvm => "microvm",
        }
    }

    /// The virtio device `kind` (`blk`, `net`, ...) on this machine's transport.
    pub fn virtio(self, kind: &str) -> String {
        match self {
            Machine::Q35 => format!("virtio-{kind}-pci"),
            Machine::Microvm => format!("virtio-{kind}-device"),
        }
    }
}

/// Kernel command line words for the guest's clock under `accel`, on either machine.
/// Under TCG the guest's TSC is the host's, so its frequency is told (`tsc_early_khz`)
/// rather than calibrated: on a busy host the vCPU stalls inside the kernel's PIT
/// loop, and a CI run's vm-002 on q35 took "PIT calibration deviates from HPET: 88186
/// 2097392", kept 88 MHz (the later refinement rejects anything over 1% off) and ran
/// its clocks 24 times too fast (Kubernetes' leases and timeouts with them). microvm
/// has no HPET or ACPI PM timer, and there the calibration fails outright. The TSC
/// needs no watchdog under TCG either (`tsc=reliable`): its checks would wake an idle
/// VM twice a second and judge the TSC by jiffies TCG delivers late.
pub fn clock_cmdline(accel: Accel) -> String {
    match (accel, host_tsc_khz()) {
        (Accel::Tcg, Some(khz)) => format!("tsc_early_khz={khz} tsc=reliable"),
        (Accel::Tcg, None) => "tsc=reliable".into(),
        (Accel::Kvm, _) => String::new(),
    }
}

/// The host's TSC frequency in kHz, measured once against CLOCK_MONOTONIC over 20 ms.
/// Each end reads the TSC between two clock reads less than 20 µs apart, so a
/// preemption of this thread mid-read costs a retry, not the figure (which would
/// then be off by the preemption's share of 20 ms).
pub fn host_tsc_khz() -> Option<u64> {
    static KHZ: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *KHZ.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let origin = std::time::Instant::now();
            // (TSC, ns since origin at the read), or None if never read tightly.
            let read = || {
                (0..1000).find_map(|_| {
                    let a = origin.elapsed().as_nanos();
                    // SAFETY: every x86-64 CPU has RDTSC; it reads a counter, touches
                    // no memory.
                    let tsc = unsafe { std::arch::x86_64::_rdtsc() };
                    let b = origin.elapsed().as_nanos();
                    (b - a < 20_000).then_some((tsc, (a + b) / 2))
                })
            };
            let (c0, t0) = read()?;
            std::thread::sleep(std::time::Duration::from_millis(20));
            let (c1, t1) = read()?;
            let khz = u128::from(c1.wrapping_sub(c0)) * 1_000_000 / (t1 - t0).max(1);
            u64::try_from(khz).ok().filter(|&k| k > 0)
        }
        #[cfg(not(target_arch = "x86_64"))]
        None
    })
}

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
    /// Machine type.
    pub machine: Machine,
    /// How much code the guest runs (whether the VM is [`lean`]).
    pub code: GuestCode,
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

impl VmSpec {
    /// Whether the memory levers apply ([`lean`]).
    pub fn lean(&self) -> bool {
        lean(self.mem_mb, self.cpus, self.code)
    }
}

/// The command that starts `spec` daemonized, with its files under `paths`
/// (for a [`lean`] VM, also run it [`without_huge_pages`]).
pub fn command(spec: &VmSpec, paths: &VmPaths) -> Command {
    let m = spec.machine;
    let mut c = machine(spec.accel, m, spec.mem_mb, spec.cpus, spec.code);
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
    if m == Machine::Q35 {
        // The hostname also reaches kimg-init without a command line (UEFI boots):
        // an SMBIOS OEM string. microvm has no SMBIOS.
        c.arg("-smbios").arg(format!(
            "type=11,value={}={}",
            kimg_contract::cmdline::KEY_HOSTNAME,
            spec.vm.hostname()
        ));
    }
    c.arg("-drive")
        .arg(format!(
            "file={},format=qcow2,if=none,id=hd0,discard=unmap",
            escape(&paths.disk())
        ))
        .args(["-device", &format!("{},drive=hd0", m.virtio("blk"))])
        .arg("-chardev")
        .arg(format!(
            "socket,id=con,path={},server=on,wait=off,logfile={}",
            escape(&paths.console()),
            escape(&paths.console_log())
        ))
        .args(["-serial", "chardev:con"])
        // On PCI on either machine: QEMU's virtio-mmio offers 1024-deep queues and
        // the guest fills each port's with 4 KiB buffers (40 MiB for the ten ports;
        // PCI's queues are 128 deep). As many ports as kimg uses (number 0 is kept
        // for a console): the guest makes a pair of queues for each of max_ports.
        .args([
            "-device",
            &format!("virtio-serial-pci,id=vser,max_ports={}", SESSION_PORTS + 2),
        ])
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
        .args(["-device", &format!("{},rng=rng0", m.virtio("rng"))])
        // A lean VM's pages freed in big blocks go back to the host (the kernel's
        // decompression, the initramfs): idle RSS -28 MB at 384 MB of guest RAM.
        .args([
            "-device",
            &format!(
                "{},free-page-reporting={}",
                m.virtio("balloon"),
                if spec.lean() { "on" } else { "off" }
            ),
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", escape(&paths.qmp())));
    let medium = spec.cdrom.as_ref().map_or(String::new(), |iso| {
        format!("file={},format=raw,", escape(iso))
    });
    c.args(["-device", &format!("{},id=scsi0", m.virtio("scsi"))])
        .arg("-drive")
        .arg(format!("{medium}if=none,media=cdrom,id=cd0,readonly=on"))
        .arg("-device")
        .arg(format!("scsi-cd,bus=scsi0.0,drive=cd0,id={CDROM_DEVICE}"));
    c
}

/// QEMU with the machine every kimg VM gets (and the boot benchmark's floor too):
/// no default devices, no display, exit instead of reboot; under TCG a [`lean`]
/// VM's small code buffer.
pub fn machine(accel: Accel, machine: Machine, mem_mb: u32, cpus: u32, code: GuestCode) -> Command {
    let (cpu, accel) = match accel {
        Accel::Kvm => ("host", "kvm".to_string()),
        Accel::Tcg if lean(mem_mb, cpus, code) => ("max", format!("tcg,tb-size={TCG_TB_MB}")),
        Accel::Tcg => ("max", "tcg".to_string()),
    };
    let m = match machine {
        Machine::Q35 => "q35",
        // ACPI describes the virtio-mmio devices (Debian's kernel cannot take them
        // from the command line: no VIRTIO_MMIO_CMDLINE_DEVICES) and the PCIe host
        // bridge of the agent ports.
        Machine::Microvm => "microvm,acpi=on,pcie=on",
    };
    let mut c = kimg_util::cmd::command(QEMU);
    c.args(["-M", m, "-accel", &accel, "-cpu", cpu])
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

/// Makes `c` (QEMU, or the `ip netns exec` that runs it) start with transparent
/// huge pages off, inherited through fork and exec. QEMU asks for them on guest RAM
/// and the TCG code buffer (MADV_HUGEPAGE): a guest touching one 4 KiB page then
/// holds 2 MiB of host memory, and the pages the balloon reports back only split
/// huge pages instead of freeing memory.
pub fn without_huge_pages(c: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec and only makes
    // the prctl system call, which is async-signal-safe.
    unsafe {
        c.pre_exec(|| nix::sys::prctl::set_thp_disable(true).map_err(std::io::Error::from));
    }
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
            machine: Machine::Q35,
            code: GuestCode::Small,
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
        assert!(line.contains("-M q35 -accel tcg,tb-size=16"), "{line}");
        assert!(line.contains("virtio-blk-pci,drive=hd0"), "{line}");
        assert!(
            line.contains("virtio-balloon-pci,free-page-reporting=on"),
            "{line}"
        );
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
        // Not lean: QEMU's default code buffer, and the balloon reports nothing.
        let big = VmSpec {
            code: GuestCode::Big,
            ..spec
        };
        let line = kimg_util::cmd::display(&command(&big, &paths));
        assert!(line.contains("-M q35 -accel tcg -cpu"), "{line}");
        assert!(
            line.contains("virtio-balloon-pci,free-page-reporting=off"),
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
            machine: Machine::Q35,
            code: GuestCode::Small,
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

    #[test]
    fn microvm_has_mmio_devices_and_no_smbios() {
        let vm: VmId = "vm-201".parse().unwrap();
        let paths = VmPaths::new(Path::new("/run/k"), vm);
        let spec = VmSpec {
            vm,
            mem_mb: 96,
            cpus: 1,
            accel: Accel::Tcg,
            machine: Machine::Microvm,
            code: GuestCode::Small,
            kernel: "/b/vmlinuz".into(),
            initrd: "/b/initrd.img".into(),
            cmdline: "console=ttyS0".into(),
            uefi: false,
            cdrom: None,
        };
        let line = kimg_util::cmd::display(&command(&spec, &paths));
        assert!(line.contains("-M microvm,acpi=on,pcie=on"), "{line}");
        assert!(
            line.contains("virtio-serial-pci,id=vser,max_ports=10"),
            "{line}"
        );
        assert!(!line.contains("-smbios"), "{line}");
        for dev in ["blk", "rng", "balloon", "scsi"] {
            assert!(
                line.contains(&format!("virtio-{dev}-device")),
                "{dev}: {line}"
            );
        }
        assert_eq!(Machine::Microvm.virtio("net"), "virtio-net-device");
    }

    #[test]
    fn only_one_vcpu_small_code_vms_of_at_most_512_mib_are_lean() {
        assert!(lean(128, 1, GuestCode::Small));
        assert!(lean(512, 1, GuestCode::Small));
        assert!(!lean(513, 1, GuestCode::Small));
        assert!(!lean(2048, 1, GuestCode::Small));
        assert!(!lean(384, 2, GuestCode::Small));
        // A Kubernetes VM keeps QEMU's defaults, whatever its size.
        assert!(!lean(384, 1, GuestCode::Big));
        assert!(!lean(1536, 1, GuestCode::Big));
        let accel_of = |accel, mem_mb, cpus, code| {
            let line = kimg_util::cmd::display(&machine(accel, Machine::Q35, mem_mb, cpus, code));
            let words: Vec<String> = line.split(' ').map(String::from).collect();
            let i = words.iter().position(|w| w == "-accel").expect("-accel");
            words[i + 1].clone()
        };
        assert_eq!(
            accel_of(Accel::Tcg, 384, 1, GuestCode::Small),
            "tcg,tb-size=16"
        );
        assert_eq!(accel_of(Accel::Tcg, 384, 2, GuestCode::Small), "tcg");
        assert_eq!(accel_of(Accel::Tcg, 1024, 1, GuestCode::Small), "tcg");
        assert_eq!(accel_of(Accel::Tcg, 384, 1, GuestCode::Big), "tcg");
        assert_eq!(accel_of(Accel::Kvm, 384, 1, GuestCode::Small), "kvm");
    }

    #[test]
    fn tcg_guests_trust_the_tsc_and_are_told_its_frequency() {
        let khz = host_tsc_khz().expect("x86-64 hosts have a TSC");
        assert!((100_000..20_000_000).contains(&khz), "{khz} kHz");
        // Against a plain measurement ten times as long: within 1% (the kernel's own
        // refinement takes anything nearer).
        let t = std::time::Instant::now();
        // SAFETY: as in host_tsc_khz.
        let c0 = unsafe { std::arch::x86_64::_rdtsc() };
        std::thread::sleep(std::time::Duration::from_millis(200));
        // SAFETY: as in host_tsc_khz.
        let c1 = unsafe { std::arch::x86_64::_rdtsc() };
        let long = u128::from(c1 - c0) * 1_000_000 / t.elapsed().as_nanos();
        let long = u64::try_from(long).unwrap();
        assert!(khz.abs_diff(long) * 100 < long, "{khz} vs {long} kHz");
        assert_eq!(
            clock_cmdline(Accel::Tcg),
            format!("tsc_early_khz={khz} tsc=reliable")
        );
        assert_eq!(clock_cmdline(Accel::Kvm), "");
    }
}
