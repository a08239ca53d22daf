//! TLS for every protocol on a port (rustls with the ring provider): gRPC
//! over h2, HTTP over h2 or HTTP/1.1, told apart by ALPN; mutual TLS when a
//! client CA is given.

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// The acceptor for `cert` and `key` (PEM), requiring client certificates
/// signed by `client_ca` when it is given.
pub fn acceptor(cert: &Path, key_path: &Path, client_ca: Option<&Path>) -> Result<TlsAcceptor, Error> {
    let chain =
        CertificateDer::pem_file_iter(cert).and_then(|certs| certs.collect::<Result<Vec<_>, _>>()).map_err(
            |e| Error::Read("certificate chain (tls_cert)", cert.display().to_string(), e.to_string()),
        )?;
    if chain.is_empty() {
        return Err(Error::Read(
            "certificate chain (tls_cert)",
            cert.display().to_string(),
            "no certificate in it".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| Error::Read("private key (tls_key)", key_path.display().to_string(), e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            let cas = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    Error::Read("client CA (tls_client_ca)", path.display().to_string(), e.to_string())
                })?;
            for ca in cas {
                roots.add(ca).map_err(|e| {
                    Error::Read("client CA (tls_client_ca)", path.display().to_string(), e.to_string())
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| Error::Config(format!("client CA {}: {e}", path.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| Error::Config(format!("{} and {}: {e}", cert.display(), key_path.display())))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the TLS {0} {1}: {2} (a PEM file is expected)")]
    Read(&'static str, String, String),
    #[error("TLS configuration: {0}")]
    Config(String),
}
