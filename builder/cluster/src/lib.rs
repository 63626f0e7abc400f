//! Running clusters of VMs: accelerator choice, QEMU command lines, networks, the
//! agent client and the cluster lifecycle (run, status, exec, stop, scale), with the
//! add-ons a flavour brings to a cluster (the Kubernetes PKI and apiserver forward).

pub mod accel;
pub mod agent;
pub mod cluster;
pub mod network;
pub mod pki;
pub mod qemu;
