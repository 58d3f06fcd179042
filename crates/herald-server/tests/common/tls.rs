//! A certificate authority made in the test (rcgen), the PEM files a server loads, and a TLS
//! client that trusts only that authority (tokio-rustls, ring).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::{Client, TestServer};

/// The name every test certificate is issued for.
pub const SERVER_NAME: &str = "localhost";

pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pub dir: tempfile::TempDir,
}

/// A leaf certificate and its key, as PEM.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        TestCa {
            issuer,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A fresh leaf for [`SERVER_NAME`] with its own key.
    pub fn issue(&self) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![SERVER_NAME.to_owned()])
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    pub fn key_path(&self) -> PathBuf {
        self.dir.path().join("key.pem")
    }

    /// Writes a leaf where the server's `tls.cert` and `tls.key` point.
    pub fn install(&self, leaf: &Leaf) {
        std::fs::write(self.cert_path(), &leaf.cert_pem).unwrap();
        std::fs::write(self.key_path(), &leaf.key_pem).unwrap();
    }

    /// A TLS client trusting only this authority.
    pub fn connector(&self) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.issuer.der().clone()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    }

    /// Opens a TLS connection to the server; returns the stream and the certificate it showed.
    pub async fn tls_connect(
        &self,
        server: &TestServer,
    ) -> (TlsStream<TcpStream>, CertificateDer<'static>) {
        self.tls_connect_to(server.addr).await
    }

    /// Opens a TLS connection to any address.
    pub async fn tls_connect_to(
        &self,
        addr: SocketAddr,
    ) -> (TlsStream<TcpStream>, CertificateDer<'static>) {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from(SERVER_NAME).unwrap();
        let stream = self
            .connector()
            .connect(name, tcp)
            .await
            .expect("TLS handshake");
        let shown = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
        (stream, shown)
    }

    /// Opens a WSS connection as `user` and reads the welcome; also returns the certificate
    /// the server showed.
    pub async fn connect_wss(
        &self,
        server: &TestServer,
        user: &str,
    ) -> (Client<TlsStream<TcpStream>>, CertificateDer<'static>) {
        let query = format!("/ws?token={}", server.token(user));
        self.connect_wss_to(server.addr, &query).await
    }

    /// Opens a WSS connection to `path_and_query` at any address and reads the welcome.
    pub async fn connect_wss_to(
        &self,
        addr: SocketAddr,
        path_and_query: &str,
    ) -> (Client<TlsStream<TcpStream>>, CertificateDer<'static>) {
        let (stream, shown) = self.tls_connect_to(addr).await;
        let url = format!("wss://{SERVER_NAME}:{}{path_and_query}", addr.port());
        let (ws, _) = tokio_tungstenite::client_async(url.into_client_request().unwrap(), stream)
            .await
            .expect("WebSocket handshake over TLS");
        (Client::from_socket(ws).await, shown)
    }
}
