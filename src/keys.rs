//! Keys derived from `cluster.secret`: one HKDF-SHA256 extraction, then one expansion per use
//! with its own label, so that no two uses share a key and knowing one derived key tells
//! nothing about another or about the secret.

use hkdf::Hkdf;
use sha2::Sha256;

/// Salt of the extraction: names the scheme, so a change of scheme changes every key.
const SALT: &[u8] = b"imgate key derivation v1";

/// What a derived key is for. Each use has a distinct label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyUse {
    /// The Ed25519 seed of the cluster CA (mutual TLS between nodes).
    ClusterCa,
    /// The HMAC-SHA256 key of gossip datagrams.
    GossipMac,
}

impl KeyUse {
    fn label(self) -> &'static [u8] {
        match self {
            KeyUse::ClusterCa => b"cluster-ca",
            KeyUse::GossipMac => b"gossip-mac",
        }
    }
}

/// The 32-byte key for `usage` from `secret`, bound to `context` (for example the cluster
/// id, so that two clusters sharing a secret still have different keys).
pub fn derive(secret: &str, usage: KeyUse, context: &str) -> [u8; 32] {
    let hk = Hkdf::<Sha256>::new(Some(SALT), secret.as_bytes());
    let mut info = Vec::with_capacity(usage.label().len() + 1 + context.len());
    info.extend_from_slice(usage.label());
    info.push(0);
    info.extend_from_slice(context.as_bytes());
    let mut key = [0u8; 32];
    hk.expand(&info, &mut key)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_differ_by_use_context_and_secret_and_are_stable() {
        let ca = derive("s", KeyUse::ClusterCa, "c");
        assert_eq!(ca, derive("s", KeyUse::ClusterCa, "c"), "deterministic");
        assert_ne!(ca, derive("s", KeyUse::GossipMac, "c"), "per use");
        assert_ne!(ca, derive("s", KeyUse::ClusterCa, "d"), "per context");
        assert_ne!(ca, derive("t", KeyUse::ClusterCa, "c"), "per secret");
        // Pinned (RFC 5869 computed independently with Python's hmac module): a change here is
        // a change of the scheme, which breaks clusters of mixed versions.
        let hex: String = derive("secret", KeyUse::GossipMac, "imgate-local")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hex.len(), 64);
        assert_eq!(hex, PINNED, "key derivation changed");
    }

    const PINNED: &str = "d29c0daa60a8387f6690f25ce089b578bb7e63a3ad04562561bf3823a0d72258";
}
