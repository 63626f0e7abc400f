//! Choosing the QEMU accelerator: KVM only when it really works, else TCG.
//!
//! `/dev/kvm` existing proves nothing (nested setups have the node but no vmx/svm,
//! and QEMU with KVM then spins forever). KVM is used when the device opens
//! read-write, the CPU advertises vmx or svm, and a tiny guest run under KVM exits
//! through `isa-debug-exit` within a timeout.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// The accelerator a VM runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// QEMU's software emulation.
    Tcg,
}

impl Accel {
    /// The `-accel` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// What the user asked for on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AccelChoice {
    /// KVM if it works here, else TCG.
    #[default]
    Auto,
    /// KVM; an error if it does not work.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl From<Accel> for AccelChoice {
    /// The choice that gives exactly `accel` (e.g. to boot again as a first run did).
    fn from(accel: Accel) -> AccelChoice {
        match accel {
            Accel::Kvm => AccelChoice::Kvm,
            Accel::Tcg => AccelChoice::Tcg,
        }
    }
}

/// How long the probe guest may take before KVM counts as hanging.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Exit status QEMU returns when the probe guest writes 1 to isa-debug-exit.
const PROBE_EXIT: i32 = (1 << 1) | 1;

/// Decides the accelerator; `Err` explains why KVM was refused when it was asked for.
pub fn choose(choice: AccelChoice, qemu: &str, scratch: &Path) -> Result<Accel, String> {
    match choice {
        AccelChoice::Tcg => Ok(Accel::Tcg),
        AccelChoice::Auto => Ok(kvm_usable(qemu, scratch).map_or(Accel::Tcg, |()| Accel::Kvm)),
        AccelChoice::Kvm => kvm_usable(qemu, scratch)
            .map(|()| Accel::Kvm)
            .map_err(|why| {
                format!(
                    "--accel kvm: KVM does not work on this host ({why}); use --accel tcg or auto"
                )
            }),
    }
}

/// Checks the three conditions; the error says which failed.
pub fn kvm_usable(qemu: &str, scratch: &Path) -> Result<(), String> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("cannot open /dev/kvm read-write: {e}"))?;
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if !cpu_has_virt(&cpuinfo) {
        return Err("the CPU advertises neither vmx nor svm (no nested virtualisation?)".into());
    }
    probe_guest(qemu, "kvm", scratch)
}

/// True when a `flags` line of /proc/cpuinfo lists vmx or svm.
pub fn cpu_has_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// A 64 KiB BIOS whose reset vector writes 1 to port 0xf4 and halts.
fn probe_bios() -> Vec<u8> {
    let mut bios = vec![0xf4u8; 64 * 1024]; // hlt everywhere
                                            // mov al, 1; out 0xf4, al; hlt; jmp $-1
    bios[0xfff0..0xfff7].copy_from_slice(&[0xb0, 0x01, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd]);
    bios
}

/// Runs the probe guest under `accel`; Ok when it exits as programmed in time.
pub fn probe_guest(qemu: &str, accel: &str, scratch: &Path) -> Result<(), String> {
    let bios = scratch.join("kimg-accel-probe.bin");
    std::fs::File::create(&bios)
        .and_then(|mut f| f.write_all(&probe_bios()))
        .map_err(|e| format!("cannot write {}: {e}", bios.display()))?;
    let mut child = kimg_util::cmd::command(qemu)
        .args([
            "-M",
            "pc",
            "-accel",
            accel,
            "-m",
            "16",
            "-nodefaults",
            "-no-user-config",
        ])
        .args([
            "-display",
            "none",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ])
        .arg("-bios")
        .arg(&bios)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {qemu}: {e}"))?;
    let start = Instant::now();
    let result = loop {
        match child.try_wait() {
            Ok(Some(st)) if st.code() == Some(PROBE_EXIT) => break Ok(()),
            Ok(Some(st)) => break Err(format!("probe guest under {accel} ended with {st}")),
            Ok(None) if start.elapsed() > PROBE_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!(
                    "probe guest under {accel} hung for {PROBE_TIMEOUT:?}"
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => break Err(format!("waiting for the probe guest: {e}")),
        }
    };
    let _ = std::fs::remove_file(&bios);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_flags_are_read_per_word() {
        assert!(cpu_has_virt("processor : 0\nflags\t\t: fpu vme vmx sse\n"));
        assert!(cpu_has_virt("flags : svm lm\n"));
        assert!(!cpu_has_virt(
            "flags : fpu vmxx svm_lock\nmodel name : vmx\n"
        ));
        assert!(!cpu_has_virt(""));
    }

    #[test]
    fn probe_guest_really_runs_under_tcg() {
        // The probe itself must be proven to work: under TCG it always can.
        let dir = tempfile::tempdir().unwrap();
        probe_guest("qemu-system-x86_64", "tcg", dir.path()).unwrap();
        assert!(probe_guest("qemu-system-x86_64", "no-such-accel", dir.path()).is_err());
        assert_eq!(
            choose(AccelChoice::Tcg, "qemu-system-x86_64", dir.path()),
            Ok(Accel::Tcg)
        );
    }
}
