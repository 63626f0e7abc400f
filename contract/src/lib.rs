//! The contract between the kimg host tools and kimg-init inside the VM.
//!
//! Everything both sides must agree on lives here, once: the role table and VM
//! numbering, the kernel command line keys, the image manifest and the agent
//! protocol. The crate is pure Rust with no I/O so that the static PID 1 can use it.

pub mod agent;
pub mod boot;
pub mod cdrom;
pub mod cmdline;
pub mod flavour;
pub mod k8s;
pub mod manifest;
pub mod net;
pub mod role;
pub mod service;

pub use flavour::Flavour;
pub use role::{Role, VmId};
