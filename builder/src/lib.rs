//! kimg: build minimal bootable Linux images and run throw-away QEMU clusters.
//!
//! The `kimg` binary only parses arguments and calls into these modules; tests call
//! them directly.

pub mod bench;
pub mod cache;
pub mod civil;
pub mod cmd;
pub mod disk;
pub mod elf;
pub mod fetch;
pub mod hash;
pub mod image;
pub mod initramfs;
pub mod iso;
pub mod k8s;
pub mod kernel;
pub mod overlay;
pub mod pki;
pub mod publish;
pub mod rootfs;
pub mod vm;
