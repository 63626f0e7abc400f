//! What a flavour adds to a cluster, behind one trait: the launcher asks the add-on
//! of the image's flavour and never compares flavours itself. The base flavour adds
//! nothing; the Kubernetes one is [`crate::k8s`].

use crate::error::ClusterError;
use crate::state::ClusterState;
use kimg_contract::{Flavour, VmId};
use kimg_image::overlay::Overlay;
use std::path::Path;

/// A flavour's contribution to a cluster's life.
pub trait Addon: Sync {
    /// Whether the cluster may boot from a ready cdrom (`--cdrom`); an add-on that
    /// puts generated files first on the cdrom says no.
    fn takes_ready_cdrom(&self) -> bool {
        true
    }

    /// Fills in the add-on's part of a new cluster's state (e.g. a host port).
    fn prepare(&self, _state: &mut ClusterState) -> Result<(), ClusterError> {
        Ok(())
    }

    /// The overlay that goes first on a new cluster's cdrom (written under `dir`).
    fn first_overlay(
        &self,
        _dir: &Path,
        _state: &ClusterState,
    ) -> Result<Option<Overlay>, ClusterError> {
        Ok(None)
    }

    /// The overlay that goes first on the cdrom of VMs added later, if they need
    /// one of their own.
    fn scaleout_overlay(
        &self,
        _dir: &Path,
        _added: &[VmId],
    ) -> Result<Option<Overlay>, ClusterError> {
        Ok(None)
    }

    /// Extra QEMU arguments of `vm`.
    fn qemu_args(&self, _vm: VmId, _state: &ClusterState) -> Vec<String> {
        Vec::new()
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
