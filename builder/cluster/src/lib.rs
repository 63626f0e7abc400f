//! Running clusters of VMs: one QEMU per VM over the image's shared base, on closed
//! networks, talked to through each VM's agent.
//!
//! By job: [`state`] (the cluster's directory, lock and `cluster.json`),
//! [`bootfiles`] (kernel and initramfs out of the image), [`launch`] (`kimg run`),
//! [`health`] (QEMU, console and agent status, the wait for ready), [`consoles`]
//! (every VM's console in one tmux session), [`ops`] (exec,
//! stop, scale), [`network`], [`qemu`] and [`accel`] (command lines and the
//! accelerator), [`agent`] (the control client), [`session`] (exec, shell and copy
//! streams), and [`addon`] with what a flavour adds to a cluster ([`k8s`]: the PKI
//! of [`pki`] and the apiserver forward). [`snapshot`] saves a running cluster
//! through each VM's QEMU monitor ([`qmp`]); [`restore`] starts clusters from
//! snapshots (`run --from`, suspend and resume). [`apply`] puts overlays onto
//! running VMs (`kimg apply`). [`list`] (`kimg ls`) and [`doctor`]
//! (what this host has of what kimg needs).

pub mod accel;
pub mod addon;
pub mod agent;
pub mod apply;
pub mod bootfiles;
pub mod capacity;
pub mod consoles;
pub mod cpu_share;
pub mod doctor;
pub mod error;
pub mod health;
pub mod k8s;
pub mod ksm;
pub mod launch;
pub mod list;
pub mod network;
pub mod ops;
pub mod pki;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod restore;
pub mod session;
pub mod snapshot;
pub mod state;

pub use error::ClusterError;
pub use health::{console_tail, status, VmStatus, Wait, WaitFor};
pub use launch::{run, RunEvent, RunOptions};
pub use ops::{scalein, scaleout, stop, stop_holding_lock, StopReport};
pub use process::{alive, qemu_pid};
pub use session::{copy_in, copy_out, exec, exec_stream, CopyReport};
pub use state::{cluster_dir, load, runtime_root, vm_paths, ClusterState, VmRecord};
