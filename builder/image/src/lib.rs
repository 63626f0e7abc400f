//! kimg's images: `kimg build` (kernel, initramfs, rootfs, disk, manifest) by the
//! flavour's plan, overlays (also from Debian packages) and their cdrom, `kimg publish` and `kimg fetch`.

pub mod build;
pub mod debpkg;
pub mod embedded;
pub mod fetch;
pub mod k8s;
pub mod overlay;
pub mod plan;
pub mod publish;
pub mod rootfs;
#[cfg(test)]
mod testserver;

pub use build::{build, default_init, source_date_epoch, BuildError, BuildOptions, DEFAULT_SIZE};
