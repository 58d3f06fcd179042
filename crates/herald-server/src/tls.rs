//! TLS for the one port: HTTPS, and WSS through the same upgrade, with rustls.
//!
//! The certificate can be replaced while the server runs. rustls asks a resolver for the
//! certificate on every handshake, so Herald keeps the current one in a slot that a reload
//! swaps: open connections keep the session they negotiated, and new handshakes get the new
//! certificate. A reload happens on SIGHUP and whenever the files' contents change (checked
//! every `tls.watch_interval`, which also survives the symlink swaps of Kubernetes secrets,
//! where file-change notifications do not). A reload that fails (unreadable files, a key that
//! does not match the certificate, a half-written pair) is logged and the current certificate
//! stays.
//!
//! The provider is *ring*: the HTTP client the CLI uses (`ureq`) builds on it too, and it
//! compiles without a C toolchain beyond `cc`.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::TlsConfig;

/// Why a certificate could not be (re)loaded; the message names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS is not configured: set both tls.cert and tls.key")]
    NotConfigured,
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tls.cert: {path} holds no PEM certificate{detail}")]
    NoCertificate { path: PathBuf, detail: String },
    #[error("tls.key: {path} holds no PEM private key: {detail}")]
    NoKey { path: PathBuf, detail: String },
    #[error("tls.key does not fit tls.cert: {0}")]
    Mismatch(rustls::Error),
    #[error("cannot build the TLS configuration: {0}")]
    Config(rustls::Error),
}

/// The TLS side of the server: the acceptor every connection task uses, and the certificate
/// slot that reloads swap.
pub struct ServerTls {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    slot: Arc<CertSlot>,
    acceptor: TlsAcceptor,
    /// The file contents behind the current certificate, to notice changes. Locked only by the
    /// one watcher task and explicit reloads, never across an `.await`.
    loaded: Mutex<(Vec<u8>, Vec<u8>)>,
    /// Counts successful reloads; tests and operators can wait for the next one.
    generation: watch::Sender<u64>,
}

/// The current certificate. `std::sync::RwLock`: read once per handshake for a pointer clone,
/// written only by a reload.
#[derive(Debug)]
struct CertSlot {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

impl ServerTls {
    /// Reads the certificate and key named in the config.
    pub fn load(config: &TlsConfig) -> Result<Arc<ServerTls>, TlsError> {
        let (Some(cert_path), Some(key_path)) = (&config.cert, &config.key) else {
            return Err(TlsError::NotConfigured);
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cert_pem = read(cert_path)?;
        let key_pem = read(key_path)?;
        let certified = certified_key(cert_path, &cert_pem, key_path, &key_pem, &provider)?;
        let slot = Arc::new(CertSlot {
            current: RwLock::new(Arc::new(certified)),
        });
        let mut server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_cert_resolver(slot.clone());
        // HTTP/1.1 only: WebSocket upgrades need it, and the server speaks nothing else.
        server_config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(ServerTls {
            cert_path: cert_path.clone(),
            key_path: key_path.clone(),
            provider,
            slot,
            acceptor: TlsAcceptor::from(Arc::new(server_config)),
            loaded: Mutex::new((cert_pem, key_pem)),
            generation: watch::Sender::new(0),
        }))
    }

    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Re-reads both files and swaps the certificate in if they changed. Returns whether it did.
    pub async fn reload(&self) -> Result<bool, TlsError> {
        let cert_pem = read_async(&self.cert_path).await?;
        let key_pem = read_async(&self.key_path).await?;
        {
            let loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
            if loaded.0 == cert_pem && loaded.1 == key_pem {
                return Ok(false);
            }
        }
        let certified = certified_key(
            &self.cert_path,
            &cert_pem,
            &self.key_path,
            &key_pem,
            &self.provider,
        )?;
        *self.slot.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(certified);
        *self.loaded.lock().unwrap_or_else(|e| e.into_inner()) = (cert_pem, key_pem);
        self.generation.send_modify(|generation| *generation += 1);
        Ok(true)
    }

    /// A receiver that changes after each successful reload.
    pub fn reloads(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Reloads on SIGHUP and, every `interval` (unless zero), when the files changed; until
    /// `stop` is cancelled. The SIGHUP handler is installed by this call, before the returned
    /// future first runs, so a signal right after startup reloads rather than ending the
    /// process (SIGHUP's default action).
    pub fn watch(
        self: Arc<Self>,
        interval: Duration,
        stop: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        let hangup = hangup_signal();
        self.watch_with(hangup, interval, stop)
    }

    async fn watch_with(
        self: Arc<Self>,
        mut hangup: Hangup,
        interval: Duration,
        stop: CancellationToken,
    ) {
        let mut tick = (!interval.is_zero()).then(|| {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick
        });
        loop {
            let trigger = tokio::select! {
                _ = stop.cancelled() => return,
                _ = next_hangup(&mut hangup) => "SIGHUP",
                _ = next_tick(&mut tick) => "file change",
            };
            match self.reload().await {
                Ok(true) => {
                    metrics::counter!("herald_tls_reloads_total", "result" => "ok").increment(1);
                    tracing::info!(trigger, cert = %self.cert_path.display(), "TLS certificate reloaded");
                }
                Ok(false) if trigger == "SIGHUP" => {
                    tracing::info!("SIGHUP: TLS certificate files unchanged");
                }
                Ok(false) => {}
                Err(error) => {
                    metrics::counter!("herald_tls_reloads_total", "result" => "error").increment(1);
                    tracing::warn!(trigger, %error, "TLS reload failed; keeping the current certificate");
                }
            }
        }
    }
}

fn certified_key(
    cert_path: &Path,
    cert_pem: &[u8],
    key_path: &Path,
    key_pem: &[u8],
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::NoCertificate {
            path: cert_path.to_owned(),
            detail: format!(": {error}"),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_owned(),
            detail: String::new(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|error| TlsError::NoKey {
        path: key_path.to_owned(),
        detail: error.to_string(),
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(TlsError::Mismatch)
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

async fn read_async(path: &Path) -> Result<Vec<u8>, TlsError> {
    tokio::fs::read(path)
        .await
        .map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

fn hangup_signal() -> Hangup {
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(signal) => Some(signal),
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGHUP; certificate reload on file change only");
                None
            }
        }
    }
    #[cfg(not(unix))]
    None
}

async fn next_hangup(hangup: &mut Hangup) {
    #[cfg(unix)]
    if let Some(signal) = hangup
        && signal.recv().await.is_some()
    {
        return;
    }
    let _ = hangup;
    std::future::pending().await
}

async fn next_tick(tick: &mut Option<tokio::time::Interval>) {
    match tick {
        Some(tick) => {
            tick.tick().await;
        }
        None => std::future::pending().await,
    }
}
