//! What a flavour adds to a cluster, behind one trait: the launcher asks the add-on
//! of the image's flavour and never compares flavours itself. The base flavour adds
//! nothing; the Kubernetes one is [`crate::k8s`].

use crate::error::ClusterError;
use crate::launch::RunEvent;
use crate::qemu::GuestCode;
use crate::state::ClusterState;
use kimg_contract::{Flavour, VmId};
use kimg_image::overlay::Overlay;
use std::path::Path;
use std::time::{Duration, Instant};

/// A VM's memory and vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    /// Memory in MiB.
    pub mem_mb: u32,
    /// vCPUs.
    pub cpus: u32,
}

/// What a VM gets unless told otherwise: enough for kimg-init, a shell and the
/// tools of a network-function developer.
pub const BASE_SIZE: VmSize = VmSize {
    mem_mb: 384,
    cpus: 1,
};

/// A flavour's contribution to a cluster's life.
pub trait Addon: Sync {
    /// The size of `vm` when `kimg run` is not given one for it or for every VM.
    fn default_size(&self, _vm: VmId) -> VmSize {
        BASE_SIZE
    }

    /// How much code the flavour's VMs run, which decides whether the memory levers
    /// suit them ([`crate::qemu::lean`]).
    fn guest_code(&self) -> GuestCode {
        GuestCode::Small
    }

    /// Whether the cluster may boot from a ready cdrom (`--cdrom`); an add-on that
    /// puts generated files first on the cdrom says no.
    fn takes_ready_cdrom(&self) -> bool {
        true
    }

    /// Fills in the add-on's part of a new cluster's state (e.g. a host port).
    fn prepare(&self, _state: &mut ClusterState) -> Result<(), ClusterError> {
        Ok(())
    }

    /// Generates the add-on's per-cluster material in the new cluster's `dir` (e.g.
    /// the PKI), once, before any VM's cdrom is made.
    fn generate(&self, _dir: &Path, _state: &ClusterState) -> Result<(), ClusterError> {
        Ok(())
    }

    /// Extends that material for VMs added to a running cluster (`kimg scaleout`).
    fn add_vms(&self, _dir: &Path, _added: &[VmId]) -> Result<(), ClusterError> {
        Ok(())
    }

    /// The overlay that goes first on `vm`'s own cdrom (assembled under `dir`), when
    /// the VM needs files no other VM may see (its secrets); `None`: the VM shares
    /// the cluster's cdrom.
    fn first_overlay(&self, _dir: &Path, _vm: VmId) -> Result<Option<Overlay>, ClusterError> {
        Ok(None)
    }

    /// Whether `vm` gets a cdrom of its own ([`Addon::first_overlay`] gives it one):
    /// such a cdrom holds secrets and must never serve as the cluster's shared one.
    fn own_cdrom(&self, _vm: VmId) -> bool {
        false
    }

    /// Extra QEMU arguments of `vm`.
    fn qemu_args(&self, _vm: VmId, _state: &ClusterState) -> Vec<String> {
        Vec::new()
    }

    /// How long `--wait` without seconds waits, for the VMs and
    /// [`Addon::wait_ready`] together.
    fn ready_wait(&self) -> Duration {
        crate::health::DEFAULT_WAIT
    }

    /// Waits for what the flavour means by ready beyond every VM's agent (`--wait`,
    /// not `--wait=vms`) in the cluster `name`, once its VMs are, until `limit`
    /// after `start` (when the whole wait began; progress counts from there too).
    fn wait_ready(
        &self,
        _name: &str,
        _start: Instant,
        _limit: Duration,
        _on_event: &(dyn Fn(RunEvent) + Sync),
    ) -> Result<(), ClusterError> {
        Ok(())
    }
}

/// The base flavour: nothing to add.
struct Base;

impl Addon for Base {}

/// The add-on of `flavour`.
pub fn of(flavour: Flavour) -> &'static dyn Addon {
    match flavour {
        Flavour::Base => &Base,
        Flavour::K8s => &crate::k8s::K8s,
    }
}
