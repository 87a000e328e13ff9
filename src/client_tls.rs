//! TLS for clients: HTTPS and WSS on a node's `http` address.
//!
//! The certificate chain and key come from PEM files (`[tls]` or the node's own pair). They are
//! checked at start (readable, a key that matches the leaf, a leaf valid now), and read again
//! on SIGHUP: new connections get the new certificate, open sessions keep their connection. A
//! reload that fails keeps the old certificate and logs why.
//!
//! rustls with the ring provider, the one already used between nodes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Why a certificate could not be used; the message names the setting and the file.
#[derive(Debug, thiserror::Error)]
#[error("`{setting}` ({path}): {message}")]
pub struct TlsError {
    /// The setting that names the file (`tls.cert_path`, `nodes[0].key_path`, `--tls-cert`).
    pub setting: String,
    /// The file.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

/// Where a node's certificate comes from, and under which setting names.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate chain, PEM.
    pub cert: PathBuf,
    /// Private key, PEM.
    pub key: PathBuf,
    /// Setting that names `cert`, for errors.
    pub cert_setting: String,
    /// Setting that names `key`, for errors.
    pub key_setting: String,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn err(setting: &str, path: &Path, message: impl Into<String>) -> TlsError {
    TlsError {
        setting: setting.to_string(),
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Reads and checks the pair: a chain with a leaf valid now (unix seconds `now`), and a key
/// that matches it.
///
/// # Errors
/// [`TlsError`] naming the setting and file at fault.
pub fn load(files: &TlsFiles, now: i64) -> Result<Arc<CertifiedKey>, TlsError> {
    let read = |setting: &str, path: &Path| {
        std::fs::read(path).map_err(|e| err(setting, path, format!("cannot read: {e}")))
    };
    let cert_pem = read(&files.cert_setting, &files.cert)?;
    let key_pem = read(&files.key_setting, &files.key)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| err(&files.cert_setting, &files.cert, format!("not PEM: {e}")))?;
    let Some(leaf) = chain.first() else {
        return Err(err(
            &files.cert_setting,
            &files.cert,
            "no CERTIFICATE block in the file",
        ));
    };
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf).map_err(|e| {
        err(
            &files.cert_setting,
            &files.cert,
            format!("not an X.509 certificate: {e}"),
        )
    })?;
    let validity = parsed.validity();
    if validity.not_after.timestamp() < now {
        return Err(err(
            &files.cert_setting,
            &files.cert,
            format!("the certificate expired at {}", validity.not_after),
        ));
    }
    if validity.not_before.timestamp() > now {
        return Err(err(
            &files.cert_setting,
            &files.cert,
            format!(
                "the certificate is not valid before {}",
                validity.not_before
            ),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        err(
            &files.key_setting,
            &files.key,
            format!("no private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}"),
        )
    })?;
    let signer = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| err(&files.key_setting, &files.key, format!("unusable key: {e}")))?;
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(|_| {
        err(
            &files.key_setting,
            &files.key,
            format!(
                "the key does not match the certificate in {}",
                files.cert.display()
            ),
        )
    })?;
    Ok(Arc::new(certified))
}

/// The certificate being served; swapped on reload.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().expect("certificate lock").clone())
    }
}

/// A node's client TLS: the acceptor and the files to reload from.
#[derive(Clone)]
pub struct ClientTls {
    files: TlsFiles,
    current: Arc<Current>,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("cert", &self.files.cert)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Loads and checks the files; HTTP/1.1 only (ALPN `http/1.1`).
    ///
    /// # Errors
    /// [`TlsError`] naming the setting and file at fault.
    pub fn new(files: TlsFiles) -> Result<ClientTls, TlsError> {
        let key = load(&files, now_s())?;
        let current = Arc::new(Current(RwLock::new(key)));
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| err(&files.cert_setting, &files.cert, e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ClientTls {
            files,
            current,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
        })
    }

    /// Reads the files again and serves the new certificate to new connections.
    ///
    /// # Errors
    /// [`TlsError`]; the old certificate stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let key = load(&self.files, now_s())?;
        *self.current.0.write().expect("certificate lock") = key;
        Ok(())
    }

    /// The acceptor for new connections.
    pub fn acceptor(&self) -> &tokio_rustls::TlsAcceptor {
        &self.acceptor
    }

    /// The DER of the leaf certificate served now.
    pub fn leaf(&self) -> CertificateDer<'static> {
        self.current.0.read().expect("certificate lock").cert[0].clone()
    }
}

fn now_s() -> i64 {
    i64::try_from(crate::clock::unix_now()).unwrap_or(i64::MAX)
}
