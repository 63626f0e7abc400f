//! Each VM's share of the host's CPU when the VMs want more than the host has: in
//! proportion to its vCPUs.
//!
//! QEMU's `-daemonize` puts every VM in a session of its own, and with the
//! kernel's autogroup scheduling (on in Debian's and most distributions' kernels)
//! the CPU is then split evenly between sessions: a VM with 2 vCPUs got what a VM
//! with 1 got. Seen here with a Kubernetes cluster (4 nodes + 2 routers + 1
//! tester, 2 cores, TCG, during upstream's conformance tests): vm-001's QEMU got
//! the same ~0.47 of a core as each node, its vCPU threads waited for a core 60% of
//! the time, a TLS handshake with the apiserver took over 10 s, the kubelets timed
//! out, dropped their connections and listed everything again, and `kubectl get ns`
//! took 10-114 s without recovering. With vm-001's session at nice -10 it answered
//! in 0.6-1.1 s within a minute.
//!
//! A lead for the control plane beyond its vCPUs was tried and dropped: at ~9x a
//! node's weight the nodes' kubelets stopped renewing their leases (all NotReady);
//! at ~4x (nodes at nice 6) the nodes became Ready 133 s later than before and the
//! echo pods ran 300 s later (a container start timed out), as a node's work
//! (image import, containers) was starved while vm-001 took whatever it was given.
//!
//! So every QEMU gets a nice value by its vCPUs: per thread (set between fork and
//! exec, inherited by every thread QEMU starts) for hosts that schedule by cgroup
//! or with autogroup off, and on its session (`/proc/PID/autogroup`). Only values >= 0: no
//! root needed, and a cluster yields to the host's other work rather than the
//! reverse.

use std::process::Command;

/// Nice steps per doubling of the weight (each step is ~1.25x).
const PER_DOUBLING: u32 = 3;

/// The nice value of a VM with `cpus` vCPUs in a cluster whose largest VM has
/// `max_cpus`: weights in proportion to vCPUs, the largest VM at 0.
pub fn nice(cpus: u32, max_cpus: u32) -> u32 {
    let doublings = (max_cpus.max(1) / cpus.max(1)).ilog2();
    (doublings * PER_DOUBLING).min(19)
}

/// Has `qemu` start `nice` steps below kimg (every thread it starts inherits it);
/// nothing for 0. Set on the final command, like `qemu::without_huge_pages`.
pub fn lower_threads(qemu: &mut Command, nice: u32) {
    use std::os::unix::process::CommandExt;
    if nice == 0 {
        return;
    }
    let incr = nice as std::ffi::c_int;
    // SAFETY: the closure runs in the child between fork and exec and only makes
    // the nice system call, which is async-signal-safe. Its result is not
    // checked: raising one's own nice value cannot be refused, and -1 is also a
    // valid new value.
    unsafe {
        qemu.pre_exec(move || {
            nix::libc::nice(incr);
            Ok(())
        });
    }
}

/// Sets the autogroup nice of the session of process `pid` (the daemonized QEMU,
/// alone in it). Without autogroup (kernel without it: no file; turned off: the
/// value is kept and unused) there is nothing to do; a failed write leaves the
/// VM at an even share, which is how it ran before, so it is not an error.
pub fn set_session_nice(pid: i32, nice: u32) {
    if nice > 0 {
        let _ = std::fs::write(format!("/proc/{pid}/autogroup"), nice.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_follow_vcpus() {
        // A cluster of equal VMs is left as it is.
        assert_eq!(nice(1, 1), 0);
        assert_eq!(nice(2, 2), 0);
        // A 1-vCPU VM next to a 2-vCPU one (Kubernetes' vm-001): half the weight
        // (526 against 1024); next to 4: a quarter.
        assert_eq!(nice(1, 2), 3);
        assert_eq!(nice(1, 4), 6);
        assert_eq!(nice(2, 4), 3);
        // Between powers of two, the doublings below.
        assert_eq!(nice(1, 3), 3);
        // Never past nice's range, whatever the sizes.
        assert_eq!(nice(1, 1 << 20), 19);
        assert_eq!(nice(0, 0), 0);
    }

    #[test]
    fn qemu_is_run_niced_only_when_it_is_niced() {
        // nice(1) without arguments prints the value it runs at.
        let runs_at = |n: u32| -> i32 {
            let mut c = Command::new("nice");
            lower_threads(&mut c, n);
            let out = c.output().unwrap();
            String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
        };
        let own = runs_at(0);
        assert!(own <= 9, "the test itself runs at nice {own}");
        assert_eq!(runs_at(10), own + 10);
    }
}
