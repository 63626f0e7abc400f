//! Running VMs: accelerator choice, QEMU command lines, the agent client and the
//! cluster lifecycle (run, status, exec, stop).

pub mod accel;
pub mod agent;
pub mod cluster;
pub mod network;
pub mod qemu;
