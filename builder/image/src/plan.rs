//! A flavour's build plan, resolved once: which kernel fragments the kernel must
//! satisfy, which modules stage 2 loads, which rootfs manifests and extra binaries go
//! onto the root, and how the disk is written. `build` reads the plan and never asks
//! which flavour it builds.

use crate::build::{BuildError, BuildOptions};
use crate::k8s::{self, Release};
use crate::rootfs::{self, RootfsManifest};
use kimg_contract::Flavour;
use std::path::PathBuf;

/// Modules kimg-init loads from the root filesystem in stage 2, every flavour.
/// `virtio_balloon` reports the pages the guest freed (the kernel's decompression,
/// the initramfs) so that the host drops them from QEMU's resident memory.
pub const STAGE2_MODULES: &[&str] = &["virtio_net", "virtio_rng", "virtio_balloon"];
/// Further stage-2 modules of the Kubernetes flavour (the rest, e.g. xt matches,
/// the kernel loads on demand through modprobe and modules.dep).
pub const K8S_MODULES: &[&str] = &[
    "overlay",
    "br_netfilter",
    "nf_conntrack",
    "ipip",
    "rbd",
    "veth",
    "vxlan",
    "ip_vs",
    "ip_vs_rr",
    "ip_vs_wrr",
    "ip_vs_sh",
];

/// Everything that differs between flavours, for one build.
#[derive(Debug)]
pub struct Plan {
    /// The flavour planned.
    pub flavour: Flavour,
    /// Kernel config fragments (name, text) the kernel must satisfy.
    pub kernel_fragments: Vec<(&'static str, &'static str)>,
    /// Modules stage 2 loads (their dependencies are added from the kernel).
    pub stage2_modules: Vec<&'static str>,
    /// Rootfs manifests, applied in order (base first).
    pub rootfs: Vec<RootfsManifest>,
    /// Files from outside the host's PATH: (file, path in the image, version).
    /// ELF binaries bring their library closure; image tarballs go as they are.
    pub extra_binaries: Vec<(PathBuf, String, Option<String>)>,
    /// Container image tarballs (name, file) imported into the image's containerd
    /// store at build time ([`k8s::preload`]); otherwise they are in
    /// `extra_binaries`, for the import at boot.
    pub preload_images: Vec<(String, PathBuf)>,
    /// Whether the qcow2's clusters are zstd-compressed.
    pub compress: bool,
    /// The Kubernetes release (kept: a tarball stays unpacked while it lives).
    pub release: Option<Release>,
}

impl Plan {
    /// Resolves the plan of the options' flavour; the Kubernetes flavour's release
    /// and image tarballs are found and checked here, before any work is done (a
    /// release tarball is unpacked under the output directory).
    pub fn resolve(opts: &BuildOptions) -> Result<Plan, BuildError> {
        let flavour = opts.flavour;
        let scratch = opts.out_dir.as_path();
        let mut plan = Plan {
            flavour,
            kernel_fragments: kimg_kernel::config::builtin_fragments(flavour),
            stage2_modules: STAGE2_MODULES.to_vec(),
            rootfs: vec![RootfsManifest::parse(
                "rootfs/base.toml",
                rootfs::BASE_TOML,
            )?],
            extra_binaries: Vec::new(),
            preload_images: Vec::new(),
            compress: false,
            release: None,
        };
        match flavour {
            Flavour::Base => {}
            Flavour::K8s => {
                let release = opts
                    .k8s_release
                    .as_deref()
                    .ok_or(k8s::K8sError::NoRelease)?;
                std::fs::create_dir_all(scratch)
                    .map_err(|e| BuildError::Io(kimg_util::fs::IoError::new(scratch, e)))?;
                let r = k8s::find_release(release, scratch)?;
                let mut m = RootfsManifest::parse("rootfs/k8s.toml", rootfs::K8S_TOML)?;
                k8s::version::render(&mut m, r.kube_version).map_err(k8s::K8sError::Render)?;
                plan.rootfs.push(m);
                plan.stage2_modules.extend_from_slice(K8S_MODULES);
                plan.extra_binaries = r
                    .binaries
                    .iter()
                    .map(|(name, path)| {
                        (
                            path.clone(),
                            format!("/usr/bin/{name}"),
                            Some(r.version.clone()),
                        )
                    })
                    .collect();
                // Pre-pulled images: the release's own (pause, test image), then the
                // user's; imported at build time where the host can, else by
                // kimg-images at boot, before kubelet starts.
                let mut dirs = vec![release.join("images")];
                dirs.extend(opts.k8s_images.iter().cloned());
                let tarballs = k8s::image_tarballs(&dirs)?;
                if !opts.k8s_images_at_boot && k8s::preload::unavailable().is_none() {
                    plan.preload_images = tarballs;
                } else {
                    for (name, file) in tarballs {
                        plan.extra_binaries.push((
                            file,
                            format!("{}/{name}", k8s::IMAGES_DIR),
                            None,
                        ));
                    }
                }
                // The k8s image is mostly Go binaries: compressed clusters take it
                // from 736 MB to 234 MB (v1.20.2) for ~10% longer to nodes Ready
                // under TCG.
                plan.compress = true;
                plan.release = Some(r);
            }
        }
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(flavour: Flavour, release: Option<&std::path::Path>) -> BuildOptions {
        BuildOptions {
            out_dir: std::env::temp_dir(),
            kernel: kimg_kernel::KernelSource::DebianDefault,
            size: 0,
            init: PathBuf::new(),
            busybox: PathBuf::new(),
            mtime: 0,
            zstd_level: 0,
            flavour,
            k8s_release: release.map(PathBuf::from),
            k8s_images: Vec::new(),
            k8s_images_at_boot: false,
        }
    }

    #[test]
    fn base_plan_has_base_parts_only() {
        let p = Plan::resolve(&opts(Flavour::Base, None)).unwrap();
        assert_eq!(p.kernel_fragments.len(), 1);
        assert_eq!(p.stage2_modules, STAGE2_MODULES);
        assert_eq!(p.rootfs.len(), 1);
        assert!(!p.compress && p.release.is_none() && p.extra_binaries.is_empty());
    }

    #[test]
    fn k8s_plan_needs_a_release_before_any_work() {
        let dir = tempfile::tempdir().unwrap();
        let e = Plan::resolve(&opts(Flavour::K8s, None)).unwrap_err();
        assert!(e.to_string().contains("--k8s needs"), "{e}");
        let e = Plan::resolve(&opts(Flavour::K8s, Some(dir.path()))).unwrap_err();
        assert!(e.to_string().contains("kubelet is missing"), "{e}");
    }
}
