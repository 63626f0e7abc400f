//! GUIDs derived from the build seed, and their two byte orders (text and GPT).

use sha2::{Digest, Sha256};
use std::fmt;

/// A GUID, stored in RFC 4122 (textual, big-endian) byte order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guid(pub [u8; 16]);

/// GPT type of an EFI system partition.
pub const ESP_TYPE: Guid = Guid([
    0xc1, 0x2a, 0x73, 0x28, 0xf8, 0x1f, 0x11, 0xd2, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9, 0x3b,
]);

/// GPT type of a Linux x86-64 root partition (Discoverable Partitions Specification).
pub const ROOT_X86_64_TYPE: Guid = Guid([
    0x4f, 0x68, 0xbc, 0xe3, 0xe8, 0xcd, 0x4d, 0xb1, 0x96, 0xe7, 0xfb, 0xca, 0xf9, 0x84, 0xb7, 0x09,
]);

/// The first 32 bytes of sha256(seed || label): one independent value per label.
pub fn derive_bytes(seed: &[u8; 32], label: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(seed);
    h.update(label.as_bytes());
    h.finalize().into()
}

impl Guid {
    /// A v4-style GUID from sha256(seed || label): same seed and label, same GUID.
    pub fn derive(seed: &[u8; 32], label: &str) -> Guid {
        let d = derive_bytes(seed, label);
        let mut b = [0u8; 16];
        b.copy_from_slice(&d[..16]);
        // Version 4 and RFC 4122 variant bits, so tools treat it as a normal random GUID.
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        Guid(b)
    }

    /// The GPT on-disk encoding: the first three fields are little-endian.
    pub fn to_gpt_bytes(self) -> [u8; 16] {
        let mut b = self.0;
        b[0..4].reverse();
        b[4..6].reverse();
        b[6..8].reverse();
        b
    }

    /// Decodes the GPT on-disk encoding (inverse of [`Guid::to_gpt_bytes`]).
    pub fn from_gpt_bytes(bytes: &[u8; 16]) -> Guid {
        // The byte swap is its own inverse.
        Guid(Guid(*bytes).to_gpt_bytes())
    }
}

impl fmt::Display for Guid {
    /// Lower-case `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = hex::encode(self.0);
        write!(
            f,
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_guids_format_and_encode_like_the_spec() {
        assert_eq!(ESP_TYPE.to_string(), "c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
        assert_eq!(
            ROOT_X86_64_TYPE.to_string(),
            "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"
        );
        // On-disk bytes of the ESP type as every GPT tool writes them.
        assert_eq!(
            hex::encode(ESP_TYPE.to_gpt_bytes()),
            "28732ac11ff8d211ba4b00a0c93ec93b"
        );
        assert_eq!(Guid::from_gpt_bytes(&ESP_TYPE.to_gpt_bytes()), ESP_TYPE);
    }

    #[test]
    fn derived_guids_are_stable_v4_and_label_dependent() {
        let seed = [7u8; 32];
        let a = Guid::derive(&seed, "disk");
        assert_eq!(a, Guid::derive(&seed, "disk"));
        assert_ne!(a, Guid::derive(&seed, "esp"));
        assert_ne!(a, Guid::derive(&[8u8; 32], "disk"));
        let s = a.to_string();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4", "{s}");
        assert!(matches!(&s[19..20], "8" | "9" | "a" | "b"), "{s}");
        // Pinned: changing the derivation would silently change every image's GUIDs.
        let mut h = Sha256::new();
        h.update([7u8; 32]);
        h.update(b"disk");
        let d: [u8; 32] = h.finalize().into();
        assert_eq!(&a.0[..6], &d[..6]);
        assert_eq!(a.0[6] & 0x0f, d[6] & 0x0f);
    }
}
