//! kimg-init, the PID 1 of a kimg VM, as a library: each module is one job of the
//! boot (mounts, modules, overlays, network, services, the agent, shutdown); [`boot`]
//! runs them in order. The binary (`main.rs`) only calls [`boot::main`]; the fuzz
//! targets and tests use the modules directly.

#[macro_use]
pub mod log;
pub mod agent;
pub mod apply;
pub mod boot;
pub mod clock;
pub mod cni;
pub mod console;
pub mod copy;
pub mod emergency;
pub mod error;
pub mod exec;
pub mod hooks;
pub mod hostwait;
pub mod modules;
pub mod mounts;
pub mod net;
pub mod netlink;
pub mod overlays;
pub mod pathsafe;
pub mod reaper;
pub mod rootdev;
pub mod services;
pub mod session;
pub mod shutdown;
pub mod smbios;
pub mod switchroot;
pub mod sysctl;
pub mod unpack;
pub mod xattr;
