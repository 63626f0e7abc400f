//! The host processes of a cluster (QEMU, vde_switch): are they still running.

use crate::qemu::VmPaths;
use nix::unistd::Pid;
use std::fs;

/// The pid of a VM's QEMU if it is still running.
pub fn qemu_pid(paths: &VmPaths) -> Option<Pid> {
    let pid: i32 = fs::read_to_string(paths.pidfile())
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // Guard against pid reuse: the process must still be a QEMU.
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (comm.starts_with("qemu") && alive(pid)).then_some(Pid::from_raw(pid))
}

/// Whether process `pid` exists and is not a zombie (a killed daemon whose parent,
/// e.g. a container's PID 1, does not reap keeps its /proc entry).
pub fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest.trim_start());
        !(state.starts_with('Z') || state.starts_with('X'))
    })
}
