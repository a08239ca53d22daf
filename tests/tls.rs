//! TLS and mutual TLS on the one port, for gRPC and HTTP, with certificates
//! made in the test (rcgen).

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        Pki { ca: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap() }
    }

    /// A certificate for `names`, signed by this CA: (cert PEM, key PEM).
    fn issue(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn ca_pem(&self) -> String {
        self.ca.pem()
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// A server with TLS (and mutual TLS when `client_ca` is given).
fn tls_server(tmp: &Path, pki: &Pki, client_ca: Option<&Pki>) -> TestServer {
    let (cert, key) = pki.issue(&["localhost", "127.0.0.1"]);
    let mut args = vec!["--tls-cert".to_string(), write(tmp, "server.pem", &cert)];
    args.extend(["--tls-key".to_string(), write(tmp, "server.key", &key)]);
    if let Some(ca) = client_ca {
        args.extend(["--tls-client-ca".to_string(), write(tmp, "client-ca.pem", &ca.ca_pem())]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    TestServer::start(&tmp.join("data"), &args)
}

async fn grpc(
    server: &TestServer,
    pki: &Pki,
    identity: Option<(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pki.ca_pem())).domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let port = server.addr.rsplit(':').next().unwrap();
    Channel::from_shared(format!("https://localhost:{port}")).unwrap().tls_config(tls)?.connect().await
}

async fn capabilities(channel: Channel) -> Result<(), tonic::Status> {
    let mut caps = larder::proto::reapi::capabilities_client::CapabilitiesClient::new(channel);
    caps.get_capabilities(larder::proto::reapi::GetCapabilitiesRequest::default()).await.map(|_| ())
}

/// GET /healthz over TLS with HTTP/1.1: the status line.
async fn https_healthz(server: &TestServer, pki: &Pki) -> String {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls_pki_types::CertificateDer::from_pem_slice(pki.ca_pem().as_bytes()).unwrap()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut reply = String::new();
    tls.read_to_string(&mut reply).await.unwrap();
    reply.lines().next().unwrap_or("").to_string()
}

use rustls_pki_types::pem::PemObject;

#[tokio::test]
async fn grpc_and_http_over_tls_on_one_port() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new("test CA");
    let server = tls_server(tmp.path(), &pki, None);
    capabilities(grpc(&server, &pki, None).await.unwrap()).await.unwrap();
    assert_eq!(https_healthz(&server, &pki).await, "HTTP/1.1 200 OK");
    // Plain text to a TLS port gets nowhere.
    let plain = Channel::from_shared(format!("http://{}", server.addr)).unwrap().connect().await;
    if let Ok(channel) = plain {
        assert!(capabilities(channel).await.is_err());
    }
    // A client that does not trust the server's CA refuses it.
    assert!(grpc(&server, &Pki::new("another CA"), None).await.is_err());
}

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_certificate_from_the_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let (pki, clients) = (Pki::new("server CA"), Pki::new("client CA"));
    let server = tls_server(tmp.path(), &pki, Some(&clients));
    let good = clients.issue(&["builder-1"]);
    capabilities(grpc(&server, &pki, Some(good)).await.unwrap()).await.unwrap();
    let stranger = Pki::new("stranger CA").issue(&["builder-2"]);
    for identity in [None, Some(stranger)] {
        let refused = match grpc(&server, &pki, identity).await {
            Err(_) => true,
            Ok(channel) => capabilities(channel).await.is_err(),
        };
        assert!(refused);
    }
}

#[test]
fn half_a_tls_configuration_is_refused_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_larder"))
        .args(["serve", "--listen", "127.0.0.1:0", "--tls-cert", "/nonexistent.pem", "--dir"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tls_key"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
