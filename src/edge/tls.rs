//! TLS on the listener: the certificate and key named by `server.tls`, served by a
//! resolver whose certificate is swapped in place when the files change, so a renewed
//! certificate (cert-manager, certbot, a Kubernetes secret update) needs no restart.
//!
//! The files are polled every [`POLL`] (modification time, size and inode, following
//! symlinks, so the atomic symlink swap of a Kubernetes secret volume counts) and re-read
//! on SIGHUP. A pair that fails to load (half-written, mismatched) is logged and the
//! certificate in use is kept; the next change or SIGHUP tries again. At start, a failure
//! is an error naming the key, and the gateway does not start.
//!
//! Provider: `ring` (rustls' lighter build). ALPN offers `http/1.1` only (the WebSocket
//! upgrade is HTTP/1.1). Session tickets are on, so a client reconnecting to the same
//! node after a network blip resumes without a full handshake.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::TlsConfig;
use crate::metrics;

/// How often the certificate files are checked for changes.
pub const POLL: Duration = Duration::from_secs(2);
/// A PEM file larger than this is not a certificate or a key.
const MAX_PEM_BYTES: u64 = 1 << 20;

/// Why a certificate pair could not be loaded. The message names the config key and file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// (`cause` is part of the message, not a `source`, so a printed chain says it once.)
    #[error("{key}: {path}: {cause}")]
    Read {
        key: &'static str,
        path: String,
        cause: std::io::Error,
    },
    #[error("{key}: {path}: {message}")]
    Invalid {
        key: &'static str,
        path: String,
        message: String,
    },
    #[error("server.tls.key: {path}: does not match the certificate in server.tls.cert")]
    Mismatch { path: String },
    #[error("setting up TLS: {0}")]
    Setup(rustls::Error),
}

/// The certificate in use, and where it comes from.
pub struct CertStore {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<CertifiedKey>,
    /// The files' stamps taken just before the pair in use at start was read: the
    /// watcher's baseline, so a change made at any time after that read is seen.
    loaded: [Option<Stamp>; 2],
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl CertStore {
    /// Loads the pair named by `cfg`.
    ///
    /// # Errors
    /// A file that is missing, unreadable or invalid, or a key that does not match.
    pub fn open(cfg: &TlsConfig) -> Result<Arc<Self>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let loaded = stamps(&cfg.cert, &cfg.key);
        let pair = load_pair(&cfg.cert, &cfg.key, &provider)?;
        Ok(Arc::new(Self {
            cert: cfg.cert.clone(),
            key: cfg.key.clone(),
            provider,
            current: ArcSwap::from_pointee(pair),
            loaded,
        }))
    }

    /// The rustls server configuration serving this store's certificate.
    ///
    /// # Errors
    /// rustls refused the setup (not expected with its safe defaults).
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Setup)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        cfg.ticketer = rustls::crypto::ring::Ticketer::new().map_err(TlsError::Setup)?;
        Ok(Arc::new(cfg))
    }

    /// Re-reads the files; on failure the certificate in use stays.
    ///
    /// # Errors
    /// As [`CertStore::open`].
    pub fn reload(&self) -> Result<(), TlsError> {
        let pair = load_pair(&self.cert, &self.key, &self.provider)?;
        self.current.store(Arc::new(pair));
        Ok(())
    }

    /// Reloads when the files change or on SIGHUP, until `stop`.
    pub fn watch(self: &Arc<Self>, stop: &CancellationToken, tasks: &TaskTracker) {
        // Registered now, not in the task, so a SIGHUP right after start is ours (the
        // default action would end the process).
        #[cfg(unix)]
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no SIGHUP handler: certificates reload on file changes only");
                None
            }
        };
        let store = Arc::clone(self);
        let stop = stop.clone();
        tasks.spawn(async move {
            let mut seen = store.loaded;
            let mut tick = tokio::time::interval(POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                #[cfg(unix)]
                let hangup = async {
                    match hup.as_mut() {
                        Some(s) => s.recv().await,
                        None => std::future::pending().await,
                    }
                };
                #[cfg(not(unix))]
                let hangup = std::future::pending::<Option<()>>();
                let why = tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {
                        let s = Arc::clone(&store);
                        let Ok(now) = tokio::task::spawn_blocking(move || stamps(&s.cert, &s.key)).await
                        else {
                            continue;
                        };
                        if now == seen {
                            continue;
                        }
                        seen = now;
                        "files changed"
                    }
                    _ = hangup => "SIGHUP",
                };
                let s = Arc::clone(&store);
                match tokio::task::spawn_blocking(move || s.reload()).await {
                    Ok(Ok(())) => {
                        metrics::tls_cert_reload("ok");
                        tracing::info!(cert = %store.cert.display(), why, "TLS certificate reloaded");
                    }
                    Ok(Err(e)) => {
                        metrics::tls_cert_reload("error");
                        tracing::error!(error = %e, why, "TLS certificate reload failed; keeping the certificate in use");
                    }
                    Err(e) => {
                        metrics::tls_cert_reload("error");
                        tracing::error!(error = %e, "TLS certificate reload task failed");
                    }
                }
            }
        });
    }
}

/// What tells a changed file from an unchanged one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

/// Stamps of the certificate and key files (`None`: missing or unreadable).
fn stamps(cert: &Path, key: &Path) -> [Option<Stamp>; 2] {
    [stamp(cert), stamp(key)]
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&m);
    #[cfg(not(unix))]
    let inode = 0;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode,
    })
}

/// Reads a PEM file named by config `key`.
fn read_pem(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let read = |cause| TlsError::Read {
        key,
        path: path.display().to_string(),
        cause,
    };
    let len = std::fs::metadata(path).map_err(read)?.len();
    if len > MAX_PEM_BYTES {
        return Err(TlsError::Invalid {
            key,
            path: path.display().to_string(),
            message: format!("{len} bytes is too large for a PEM file"),
        });
    }
    std::fs::read(path).map_err(read)
}

/// Loads and checks a certificate chain and its key.
fn load_pair(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let invalid = |key_name: &'static str, path: &Path, message: String| TlsError::Invalid {
        key: key_name,
        path: path.display().to_string(),
        message,
    };
    let pem_error = |e: pem::Error| format!("not valid PEM: {e}");
    let cert_pem = read_pem("server.tls.cert", cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid("server.tls.cert", cert, pem_error(e)))?;
    if chain.is_empty() {
        return Err(invalid(
            "server.tls.cert",
            cert,
            "no certificate found (expected PEM \"BEGIN CERTIFICATE\")".into(),
        ));
    }
    let key_pem = read_pem("server.tls.key", key)?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        pem::Error::NoItemsFound => invalid(
            "server.tls.key",
            key,
            "no private key found (expected PEM \"BEGIN PRIVATE KEY\", \"BEGIN RSA PRIVATE KEY\" \
             or \"BEGIN EC PRIVATE KEY\")"
                .into(),
        ),
        e => invalid("server.tls.key", key, pem_error(e)),
    })?;
    CertifiedKey::from_der(chain, key_der, provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => TlsError::Mismatch {
            path: key.display().to_string(),
        },
        rustls::Error::InvalidCertificate(e) => {
            invalid("server.tls.cert", cert, format!("invalid certificate: {e}"))
        }
        e => invalid("server.tls.key", key, format!("unusable private key: {e}")),
    })
}
