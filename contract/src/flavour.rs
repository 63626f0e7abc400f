//! The flavours of kimg images. The wire strings (`base`, `k8s`) are what manifests
//! carry; everything that differs by flavour on the host side is resolved once from
//! this enum (kimg-image's build plan, kimg-cluster's add-ons).

use serde::{Deserialize, Serialize};
use std::fmt;

/// What an image is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavour {
    /// The minimal image: busybox, kimg-init, networking tools (`hd.img`).
    #[default]
    Base,
    /// Kubernetes: containerd, runc, CNI, etcd and a Kubernetes release (`hd-k8s.img`).
    K8s,
}

impl Flavour {
    /// Every flavour, in the order `kimg build` documents them.
    pub const ALL: [Flavour; 2] = [Flavour::Base, Flavour::K8s];

    /// The wire name (`base`, `k8s`).
    pub fn name(self) -> &'static str {
        match self {
            Flavour::Base => "base",
            Flavour::K8s => "k8s",
        }
    }

    /// The image's file stem (`hd`, `hd-k8s`).
    pub fn image_stem(self) -> &'static str {
        match self {
            Flavour::Base => "hd",
            Flavour::K8s => "hd-k8s",
        }
    }
}

impl fmt::Display for Flavour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_are_unchanged() {
        for f in Flavour::ALL {
            let json = serde_json::to_string(&f).unwrap();
            assert_eq!(json, format!("\"{}\"", f.name()));
            assert_eq!(serde_json::from_str::<Flavour>(&json).unwrap(), f);
        }
        assert_eq!(Flavour::K8s.name(), "k8s");
        assert!(serde_json::from_str::<Flavour>("\"gpu\"").is_err());
    }
}
