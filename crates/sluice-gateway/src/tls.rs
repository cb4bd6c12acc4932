//! TLS on the front door (`serve --tls-cert F --tls-key F`): rustls with the ring provider,
//! HTTP/2 and HTTP/1.1 by ALPN, and a certificate that can be replaced while the node serves.
//!
//! The certificate and key are read at start (a bad file fails the start) and again whenever
//! either file's modification time or size changes (looked at every [`RELOAD_POLL`]) or the node
//! gets SIGHUP. rustls asks [`Reloading`] for the certificate at each handshake, so a new one
//! applies to the next handshake; connections open already keep theirs and are not dropped. A
//! reload that fails (a half-written file, a key that does not match) keeps the certificate in
//! use and says why on the node's log.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// How often the certificate files are looked at for a change.
pub const RELOAD_POLL: Duration = Duration::from_secs(2);

/// The ALPN protocols offered, in order of preference.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Where the node's certificate chain and private key are (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The node's TLS server side: the acceptor its HTTP workers share, and the certificate behind
/// it.
pub struct Tls {
    acceptor: tokio_rustls::TlsAcceptor,
    resolver: Arc<Reloading>,
}

impl Tls {
    /// Reads the files and builds the server configuration; an error says which file and why.
    pub fn load(files: TlsFiles) -> Result<Self, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let loaded = Loaded::read(&files, &provider)?;
        let resolver =
            Arc::new(Reloading { files, provider: provider.clone(), current: RwLock::new(loaded) });
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS protocol versions: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        // Stateless session tickets (ChaCha20-Poly1305, keys rotated every 6 h): a client that
        // comes back resumes without a full handshake, however many clients there are (the
        // default, a stateful cache, remembers 256).
        config.ticketer =
            rustls::crypto::ring::Ticketer::new().map_err(|e| format!("TLS session tickets: {e}"))?;
        Ok(Self { acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)), resolver })
    }

    pub fn acceptor(&self) -> &tokio_rustls::TlsAcceptor {
        &self.acceptor
    }

    /// Reads the files again if they changed since the last read (or `force`): `Ok(true)` when
    /// a new certificate is in use, `Err` (the old one stays) when the files do not make one.
    pub fn reload(&self, force: bool) -> Result<bool, String> {
        self.resolver.reload(force)
    }

    /// Reloads on SIGHUP and whenever the files change, until the node stops; each outcome is
    /// logged.
    pub async fn watch(self: Arc<Self>) {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangup = signal(SignalKind::hangup()).expect("installing the SIGHUP handler");
        let mut poll = tokio::time::interval(RELOAD_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let forced = tokio::select! {
                _ = hangup.recv() => true,
                _ = poll.tick() => false,
            };
            let files = &self.resolver.files;
            match self.reload(forced) {
                Ok(true) => tracing::info!(cert = %files.cert.display(), "TLS certificate reloaded"),
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(error = %e, "TLS certificate not reloaded; the previous one stays in use")
                }
            }
        }
    }
}

/// The certificate in use, with the state of the files it was read from.
struct Loaded {
    key: Arc<CertifiedKey>,
    stamp: (Stamp, Stamp),
}

/// What tells a file changed: its modification time and size.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

impl Loaded {
    fn read(files: &TlsFiles, provider: &CryptoProvider) -> Result<Self, String> {
        let stamp = (stamp(&files.cert), stamp(&files.key));
        let read = |path: &Path, what: &str| {
            std::fs::read(path).map_err(|e| format!("reading the TLS {what} {}: {e}", path.display()))
        };
        let cert_pem = read(&files.cert, "certificate")?;
        let key_pem = read(&files.key, "key")?;
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("TLS certificate {}: {e}", files.cert.display()))?;
        if chain.is_empty() {
            return Err(format!("TLS certificate {}: no CERTIFICATE in the file", files.cert.display()));
        }
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| format!("TLS key {}: {e}", files.key.display()))?;
        let key = CertifiedKey::from_der(chain, key, provider).map_err(|e| {
            format!("TLS certificate {} and key {}: {e}", files.cert.display(), files.key.display())
        })?;
        Ok(Self { key: Arc::new(key), stamp })
    }
}

/// The certificate resolver: every handshake gets the certificate read last.
struct Reloading {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: RwLock<Loaded>,
}

impl std::fmt::Debug for Reloading {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading").field("files", &self.files).finish_non_exhaustive()
    }
}

impl Reloading {
    fn reload(&self, force: bool) -> Result<bool, String> {
        let now = (stamp(&self.files.cert), stamp(&self.files.key));
        if !force && now == self.current.read().expect("TLS certificate lock").stamp {
            return Ok(false);
        }
        match Loaded::read(&self.files, &self.provider) {
            Ok(loaded) => {
                *self.current.write().expect("TLS certificate lock") = loaded;
                Ok(true)
            }
            Err(e) => {
                // Not tried again until the files change again (or SIGHUP): one log line per
                // change, not one per poll.
                self.current.write().expect("TLS certificate lock").stamp = now;
                Err(e)
            }
        }
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().expect("TLS certificate lock").key.clone())
    }
}
