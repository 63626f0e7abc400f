//! The host side of a cluster's closed networks: one switch per network of the plan
//! (kimg_contract::net), and the QEMU NIC arguments that plug each VM into it.
//!
//! `user` (default, no root): a daemonized `vde_switch` per network with its control
//! directory and pid file in the cluster dir; QEMU joins with `-netdev vde`.
//! `bridge` (root): a network namespace `kimg-NAME` holding a Linux bridge per network
//! and a tap per VM NIC; QEMU runs inside the namespace with `-netdev tap`. Neither
//! backend has a route to anything outside the cluster's networks.

use crate::qemu::Machine;
use kimg_contract::net::{self, Net, NETS};
use kimg_contract::VmId;
use kimg_util::cmd::{self, CmdError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The user-space switch of the default backend (Debian's vde2).
pub const VDE_SWITCH: &str = "vde_switch";

/// Errors of network setup and teardown.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A program failed.
    #[error(transparent)]
    Cmd(#[from] CmdError),
    /// A switch did not come up.
    #[error("vde_switch for net {net} did not create {path} within 5 s (is vde2 installed? `kimg doctor` checks)")]
    SwitchTimeout {
        /// Network.
        net: Net,
        /// Control socket expected.
        path: PathBuf,
    },
    /// A switch's start could not be recorded (its pid file never appeared).
    #[error("recording the switch's start: {0}")]
    Record(kimg_util::fs::IoError),
    /// `--net bridge` without root.
    #[error("--net bridge needs root (network namespace, bridges, taps); use --net user")]
    NotRoot,
}

/// How VMs of a cluster are connected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NetBackend {
    /// vde_switch per network, no root needed.
    #[default]
    User,
    /// Linux bridges and taps in a network namespace kimg creates (root).
    Bridge,
}

/// The switch control directory of `net` in `cluster_dir`.
pub fn switch_dir(cluster_dir: &Path, net: Net) -> PathBuf {
    cluster_dir.join(format!("net{}.vde", net.number()))
}

/// The pid file of `net`'s switch.
pub fn switch_pidfile(cluster_dir: &Path, net: Net) -> PathBuf {
    cluster_dir.join(format!("net{}.vde.pid", net.number()))
}

/// The network namespace of cluster `name` (bridge backend).
pub fn netns(name: &str) -> String {
    format!("kimg-{name}")
}

fn bridge(net: Net) -> String {
    format!("kbr{}", net.number())
}

/// Tap name of `vm` on `net` (at most 15 bytes): `t001n1`.
pub fn tap(vm: VmId, net: Net) -> String {
    format!("t{:03}n{}", vm.number(), net.number())
}

/// Creates the cluster's networks.
pub fn create(backend: NetBackend, name: &str, cluster_dir: &Path) -> Result<(), NetworkError> {
    match backend {
        NetBackend::User => {
            for net in NETS {
                let dir = switch_dir(cluster_dir, net);
                cmd::run(
                    cmd::command(VDE_SWITCH)
                        .arg("--daemon")
                        .arg("--sock")
                        .arg(&dir)
                        .arg("--pidfile")
                        .arg(switch_pidfile(cluster_dir, net))
                        .args(["--numports", "256", "--dirmode", "0700", "--mode", "0600"]),
                )?;
                let ctl = dir.join("ctl");
                let deadline = Instant::now() + Duration::from_secs(5);
                while !ctl.exists() {
                    if Instant::now() > deadline {
                        return Err(NetworkError::SwitchTimeout { net, path: ctl });
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                record_switch(cluster_dir, net)?;
            }
            Ok(())
        }
        NetBackend::Bridge => {
            if !nix::unistd::geteuid().is_root() {
                return Err(NetworkError::NotRoot);
            }
            let ns = netns(name);
            cmd::run(cmd::command("ip").args(["netns", "add", &ns]))?;
            for net in NETS {
                let br = bridge(net);
                cmd::run(
                    cmd::command("ip").args(["-n", &ns, "link", "add", &br, "type", "bridge"]),
                )?;
                cmd::run(cmd::command("ip").args(["-n", &ns, "link", "set", &br, "up"]))?;
            }
            Ok(())
        }
    }
}

/// Records the start time of `net`'s switch (its pid file may lag its socket).
fn record_switch(cluster_dir: &Path, net: Net) -> Result<(), NetworkError> {
    let pidfile = switch_pidfile(cluster_dir, net);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match crate::process::record_start(&pidfile) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(NetworkError::Record(e)),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Plugs `vm` in: creates its taps (bridge) and returns the QEMU arguments of its
/// NICs, net 1 first, with the plan's MACs.
pub fn attach(
    backend: NetBackend,
    name: &str,
    cluster_dir: &Path,
    vm: VmId,
    machine: Machine,
) -> Result<Vec<String>, NetworkError> {
    let mut args = Vec::new();
    for nic in net::nics(vm) {
        let id = format!("net{}", nic.net.number());
        let netdev = match backend {
            NetBackend::User => format!(
                "vde,id={id},sock={}",
                switch_dir(cluster_dir, nic.net)
                    .to_string_lossy()
                    .replace(',', ",,")
            ),
            NetBackend::Bridge => {
                let ns = netns(name);
                let tap = tap(vm, nic.net);
                cmd::run(
                    cmd::command("ip")
                        .args(["-n", &ns, "tuntap", "add", "dev", &tap, "mode", "tap"]),
                )?;
                cmd::run(cmd::command("ip").args([
                    "-n",
                    &ns,
                    "link",
                    "set",
                    &tap,
                    "master",
                    &bridge(nic.net),
                    "up",
                ]))?;
                format!("tap,id={id},ifname={tap},script=no,downscript=no")
            }
        };
        args.push("-netdev".to_string());
        args.push(netdev);
        args.push("-device".to_string());
        args.push(format!(
            "{},netdev={id},mac={}",
            machine.virtio("net"),
            nic.mac
        ));
    }
    Ok(args)
}

/// Wraps a QEMU command so that it runs where its NICs are (inside the namespace
/// for the bridge backend).
pub fn wrap(backend: NetBackend, name: &str, qemu: Command) -> Command {
    match backend {
        NetBackend::User => qemu,
        NetBackend::Bridge => {
            let mut c = cmd::command("ip");
            c.args(["netns", "exec", &netns(name)])
                .arg(qemu.get_program())
                .args(qemu.get_args());
            c
        }
    }
}

/// Removes a VM's taps (after its QEMU is gone); errors are ignored (already gone).
pub fn detach(backend: NetBackend, name: &str, vm: VmId) {
    if backend == NetBackend::Bridge {
        for nic in net::nics(vm) {
            let _ = cmd::run(cmd::command("ip").args([
                "-n",
                &netns(name),
                "link",
                "del",
                &tap(vm, nic.net),
            ]));
        }
    }
}

/// The pid of `net`'s switch if it still runs (and is the switch kimg started).
pub fn switch_pid(cluster_dir: &Path, net: Net) -> Option<nix::unistd::Pid> {
    crate::process::daemon_pid(&switch_pidfile(cluster_dir, net), "vde_switch")
}

/// Removes whatever networks cluster `name` has: switches stopped (SIGTERM, SIGKILL
/// after 3 s, given up on [`crate::process::KILL_WAIT`] later), namespace deleted.
/// Safe to call for a cluster with none; returns the switches that would not go.
pub fn destroy(name: &str, cluster_dir: &Path) -> Result<Vec<String>, NetworkError> {
    use nix::sys::signal::{kill, Signal};
    let mut stuck = Vec::new();
    for net in NETS {
        if let Some(pid) = switch_pid(cluster_dir, net) {
            let running = || switch_pid(cluster_dir, net).is_some();
            let _ = kill(pid, Signal::SIGTERM);
            if !crate::process::wait_gone(running, crate::process::deadline(Duration::from_secs(3)))
                && !crate::process::kill_and_wait(pid, running, crate::process::KILL_WAIT)
            {
                stuck.push(format!("vde_switch of net {net} (pid {pid})"));
            }
        }
    }
    let ns = netns(name);
    if Path::new("/run/netns").join(&ns).exists() {
        cmd::run(cmd::command("ip").args(["netns", "del", &ns]))?;
    }
    Ok(stuck)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nic_arguments_carry_the_plan_macs() {
        let vm = VmId::new(201).unwrap();
        let args = attach(NetBackend::User, "c", Path::new("/r/c"), vm, Machine::Q35).unwrap();
        assert_eq!(args.len(), 8);
        assert_eq!(args[1], "vde,id=net1,sock=/r/c/net1.vde");
        assert_eq!(args[3], "virtio-net-pci,netdev=net1,mac=02:6b:69:01:00:c9");
        assert_eq!(args[7], "virtio-net-pci,netdev=net2,mac=02:6b:69:02:00:c9");
        assert_eq!(tap(VmId::new(221).unwrap(), Net::Tester), "t221n2");
        let wrapped = wrap(NetBackend::Bridge, "c", Command::new("qemu-system-x86_64"));
        let line = kimg_util::cmd::display(&wrapped);
        assert!(
            // `ip` as found by kimg_util::cmd::find (a full path).
            line.contains("ip netns exec kimg-c qemu-system-x86_64"),
            "{line}"
        );
    }
}
