//! The cluster credential: mutual TLS between nodes from a CA derived from `cluster.secret`.
//!
//! Every node derives the same Ed25519 CA key from the cluster secret (HKDF-SHA256 with its
//! own label, [`crate::keys`]), then issues itself a fresh leaf certificate signed by that key.
//! Both ends of a QUIC link require a certificate chaining to the CA (TLS 1.3, client auth
//! required), and each leaf names its node id ([`node_name`]): the dialer asks for the node it
//! expects, the acceptor checks the name against the peer's hello. So a process
//! without the secret can neither complete a handshake (to read or inject frames) nor pose as
//! a node. The secret never leaves the process; changing it is a cluster-wide restart.

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Domain under which a node's certificate names it (see [`node_name`]).
pub const NODE_DOMAIN: &str = "node.imgate";

/// The DNS name a node's certificate carries for node id `id`: the id's bytes in hex, in labels
/// of at most 62 characters, under [`NODE_DOMAIN`] (`n1` is `6e31.node.imgate`). Hex keeps any
/// node id a valid DNS name.
pub fn node_name(id: &str) -> String {
    let hex: String = id.bytes().map(|b| format!("{b:02x}")).collect();
    let labels: Vec<&str> = hex
        .as_bytes()
        .chunks(62)
        .map(|c| std::str::from_utf8(c).expect("hex is ASCII"))
        .collect();
    format!("{}.{NODE_DOMAIN}", labels.join("."))
}

/// Checks that `cert` (already verified to chain to the cluster CA by the handshake) names node
/// `id`.
///
/// # Errors
/// A message saying why not.
pub fn check_names_node(cert: &CertificateDer<'_>, id: &str) -> Result<(), String> {
    let name = rustls::pki_types::ServerName::try_from(node_name(id))
        .map_err(|e| format!("node id `{id}` gives no DNS name: {e}"))?;
    let cert = webpki::EndEntityCert::try_from(cert).map_err(|e| format!("certificate: {e}"))?;
    cert.verify_is_valid_for_subject_name(&name)
        .map_err(|_| format!("the certificate does not name node `{id}`"))
}

/// ALPN of the peer protocol.
pub const ALPN: &[u8] = b"imgate-peer/1";

/// Errors building the credential.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Certificate generation failed.
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    /// A verifier could not be built.
    #[error("verifier: {0}")]
    Verifier(String),
}

/// PKCS#8 v1 prefix of an Ed25519 private key (RFC 8410), followed by the 32-byte seed.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "imgate cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn ca_key(secret: &str) -> Result<KeyPair, TlsError> {
    let seed = crate::keys::derive(secret, crate::keys::KeyUse::ClusterCa, "");
    let mut der = ED25519_PKCS8_PREFIX.to_vec();
    der.extend_from_slice(&seed);
    let pkcs8 = PrivatePkcs8KeyDer::from(der);
    Ok(KeyPair::from_pkcs8_der_and_sign_algo(
        &pkcs8,
        &rcgen::PKCS_ED25519,
    )?)
}

/// A node's TLS material: the CA certificate and its own leaf.
pub struct Credential {
    ca: CertificateDer<'static>,
    leaf: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credential { .. }")
    }
}

impl Credential {
    /// Derives the CA from `secret` and issues a fresh leaf for node `node` of this process,
    /// naming it ([`node_name`]).
    ///
    /// # Errors
    /// [`TlsError`] if certificate generation fails.
    pub fn for_node(secret: &str, node: &str) -> Result<Credential, TlsError> {
        let ca_key = ca_key(secret)?;
        let ca_params = ca_params();
        let ca = ca_params.self_signed(&ca_key)?;
        let leaf_key = KeyPair::generate()?;
        let mut leaf_params = CertificateParams::new(vec![node_name(node)])?;
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "imgate node");
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = leaf_params.signed_by(&leaf_key, &issuer)?;
        Ok(Credential {
            ca: ca.der().clone(),
            leaf: leaf.der().clone(),
            key: PrivatePkcs8KeyDer::from(leaf_key.serialize_der()),
        })
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn roots(&self) -> Arc<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.ca.clone())
            .expect("our own CA certificate parses");
        Arc::new(roots)
    }

    fn chain(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (
            vec![self.leaf.clone(), self.ca.clone()],
            PrivateKeyDer::Pkcs8(self.key.clone_key()),
        )
    }

    /// The server side: requires a client certificate from the cluster CA.
    ///
    /// # Errors
    /// [`TlsError`] if rustls refuses the configuration.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots(),
            Self::provider(),
        )
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let (chain, key) = self.chain();
        let mut cfg = rustls::ServerConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }

    /// The client side: trusts only the cluster CA and presents this node's leaf.
    ///
    /// # Errors
    /// [`TlsError`] if rustls refuses the configuration.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let (chain, key) = self.chain();
        let mut cfg = rustls::ClientConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots())
            .with_client_auth_cert(chain, key)?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_secret_same_ca_key() {
        let a = ca_key("s").unwrap();
        let b = ca_key("s").unwrap();
        let c = ca_key("t").unwrap();
        assert_eq!(a.public_key_raw(), b.public_key_raw());
        assert_ne!(a.public_key_raw(), c.public_key_raw());
    }

    #[test]
    fn configs_build() {
        let cred = Credential::for_node("s", "n1").unwrap();
        cred.server_config().unwrap();
        cred.client_config().unwrap();
    }

    #[test]
    fn a_leaf_names_its_node_only() {
        assert_eq!(node_name("n1"), "6e31.node.imgate");
        let long = "é".repeat(32); // 64 bytes, the longest node id
        assert!(rustls::pki_types::ServerName::try_from(node_name(&long)).is_ok());
        let cred = Credential::for_node("s", "n1").unwrap();
        assert_eq!(check_names_node(&cred.leaf, "n1"), Ok(()));
        for other in ["n2", "n10", "N1", "n"] {
            assert!(check_names_node(&cred.leaf, other).is_err(), "{other}");
        }
    }
}
