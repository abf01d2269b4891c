//! TLS for every connection courier opens: the RabbitMQ broker (`amqps://`), the MQTT broker
//! (`mqtts://`) and the destinations (`https://`). Each of them takes the same `tls` table
//! ([`TlsConfig`]) and gets its `rustls::ClientConfig` from [`client_config`], so the three
//! transports verify servers and present client certificates the same way.
//!
//! The files are watched, not loaded once: at every TLS handshake (a new connection), courier
//! looks at the size, modification time and inode of the CA file and of the client certificate
//! and key. When one changed, it reads them again, so a certificate rotated on disk (by
//! cert-manager, a Vault agent, ...) is used from the next connection on, without a restart. A
//! change that does not load (a half-written file, a key that does not match the certificate yet)
//! is logged and the previous material stays in use until the files load again.
//!
//! The reading and parsing of the PEM files is here too; the configuration calls it when the file
//! is loaded, so bad material is a configuration error (`courier validate` finds it).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::config::TlsConfig;

/// The ALPN protocols of the destinations' HTTP client, as reqwest offers them: HTTP/2 when the
/// server picks it, HTTP/1.1 otherwise.
pub const HTTP_ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// TLS for a connection could not be set up at start-up (the system roots could not be loaded,
/// or the files changed since the configuration was checked): exit code 1.
#[derive(Debug, thiserror::Error)]
#[error("{key}: cannot set up TLS: {message}")]
pub struct TlsSetupError {
    key: String,
    message: String,
}

impl TlsSetupError {
    fn new(key: &str, message: impl Into<String>) -> TlsSetupError {
        TlsSetupError {
            key: key.to_string(),
            message: message.into(),
        }
    }
}

/// The `rustls::ClientConfig` of one connection setting.
///
/// - `key` names the setting in logs and errors (`rabbitmq.tls`, `destinations[0].tls`);
/// - `tls` is its `tls` table, if any;
/// - `verify` is false only for a destination with `tls_verify = false`: any server certificate
///   is accepted (the handshake signatures are still checked);
/// - `alpn` is offered as is ([`HTTP_ALPN`] for destinations, nothing for the brokers).
pub fn client_config(
    key: &str,
    tls: Option<&TlsConfig>,
    verify: bool,
    alpn: &[&[u8]],
) -> Result<ClientConfig, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = if !verify {
        Roots::Any
    } else {
        match tls.and_then(TlsConfig::ca_file) {
            Some(path) => {
                let ca_only = tls.is_some_and(TlsConfig::ca_only);
                let source = CaSource {
                    path: path.to_path_buf(),
                    ca_only,
                    provider: provider.clone(),
                };
                let watched = Watched::new(key, "CA file", vec![path.to_path_buf()], source)
                    .map_err(|e| TlsSetupError::new(key, e))?;
                Roots::Watched(watched)
            }
            None => Roots::Fixed(Arc::new(
                rustls_platform_verifier::Verifier::new(provider.clone())
                    .map_err(|e| TlsSetupError::new(key, e.to_string()))?,
            )),
        }
    };
    let verifier = Arc::new(Verifier {
        roots,
        server_name: tls.and_then(TlsConfig::server_name).cloned(),
        provider: provider.clone(),
    });
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError::new(key, e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match tls.and_then(TlsConfig::client_identity) {
        Some((cert, private)) => {
            let source = IdentitySource {
                cert: cert.to_path_buf(),
                key: private.to_path_buf(),
                provider,
            };
            let paths = vec![cert.to_path_buf(), private.to_path_buf()];
            let identity = Watched::new(key, "client certificate", paths, source)
                .map_err(|e| TlsSetupError::new(key, e))?;
            let mut config = builder.with_client_cert_resolver(Arc::new(Identity(identity)));
            // A resumed session does not present a certificate at all; without resumption,
            // every new connection presents the one on disk now.
            config.resumption = rustls::client::Resumption::disabled();
            config
        }
        None => builder.with_client_cert_resolver(Arc::new(NoIdentity {
            key: key.to_string(),
            warned: AtomicBool::new(false),
        })),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The name `server` is verified against: `tls.server_name` when set, `host` otherwise. Also what
/// the RabbitMQ source sends as SNI.
pub fn server_name<'a>(tls: Option<&'a TlsConfig>, host: &'a str) -> std::borrow::Cow<'a, str> {
    match tls.and_then(TlsConfig::server_name) {
        Some(name) => name.to_str(),
        None => std::borrow::Cow::Borrowed(host),
    }
}

/// Why a CA file or a client certificate and key could not be used. The configuration reports
/// it under the key the problem belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MaterialError {
    /// About the CA file or the client certificate file.
    Certificate(String),
    /// About the client key file.
    Key(String),
}

impl fmt::Display for MaterialError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaterialError::Certificate(m) | MaterialError::Key(m) => f.write_str(m),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// What is wrong with a PEM file, in words (the library prints the bytes of a bad line).
fn pem_problem(path: &Path, e: &pem::Error) -> String {
    let problem = match e {
        pem::Error::MissingSectionEnd { end_marker } => format!(
            "the {} section has no END line",
            String::from_utf8_lossy(end_marker)
        ),
        pem::Error::IllegalSectionStart { line } => {
            format!("bad section start {:?}", String::from_utf8_lossy(line))
        }
        pem::Error::Base64Decode(e) => format!("a section is not valid base64 ({e})"),
        other => other.to_string(),
    };
    format!("bad PEM in {}: {problem}", path.display())
}

/// Every certificate of a PEM file, in order; at least one.
fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_problem(path, &e))?;
    if certs.is_empty() {
        return Err(format!("no certificate in {}", path.display()));
    }
    Ok(certs)
}

/// The certificates of a CA file, each checked to be usable as a trust anchor.
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = read_certificates(path)?;
    for (i, cert) in certs.iter().enumerate() {
        RootCertStore::empty().add(cert.clone()).map_err(|_| {
            format!(
                "certificate {} in {} is not a valid X.509 certificate",
                i + 1,
                path.display()
            )
        })?;
    }
    Ok(certs)
}

/// A client certificate chain and its private key (RSA, ECDSA or Ed25519; PKCS#8, PKCS#1 or
/// SEC1), checked to belong together.
pub fn read_identity(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, MaterialError> {
    let chain = read_certificates(cert).map_err(MaterialError::Certificate)?;
    let bytes = read(key).map_err(MaterialError::Key)?;
    let private = match PrivateKeyDer::from_pem_slice(&bytes) {
        Ok(k) => k,
        Err(pem::Error::NoItemsFound) => {
            return Err(MaterialError::Key(format!(
                "no private key in {}",
                key.display()
            )))
        }
        Err(e) => return Err(MaterialError::Key(pem_problem(key, &e))),
    };
    let signing = provider
        .key_provider
        .load_private_key(private)
        .map_err(|_| {
            MaterialError::Key(format!(
                "the private key in {} is not an RSA, ECDSA (P-256, P-384) or Ed25519 key",
                key.display()
            ))
        })?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(MaterialError::Key(format!(
                "the private key in {} does not belong to the certificate in {}",
                key.display(),
                cert.display()
            )))
        }
        Err(_) => {
            return Err(MaterialError::Certificate(format!(
                "the first certificate in {} is not a valid X.509 version 3 certificate",
                cert.display()
            )))
        }
    }
    Ok(Arc::new(certified))
}

/// What identifies a version of a file cheaply: its size, modification time and inode (a
/// Kubernetes secret volume swaps a symbolic link to a new file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    let meta = std::fs::metadata(path)?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Ok(Stamp {
        len: meta.len(),
        modified: meta.modified().ok(),
        inode,
    })
}

/// How a watched value is made from its files.
trait Source: Send + Sync {
    type Value: Clone + Send;
    fn load(&self) -> Result<Self::Value, String>;
}

/// A value made from files, made again when a handshake finds that one of the files changed.
struct Watched<S: Source> {
    key: String,
    what: &'static str,
    paths: Vec<PathBuf>,
    source: S,
    state: Mutex<WatchState<S::Value>>,
}

struct WatchState<T> {
    /// The files the value was made from.
    stamps: Vec<Stamp>,
    value: T,
    /// The files as they were when loading them last failed: not tried again until they change.
    failed: Option<Vec<Stamp>>,
}

impl<S: Source> Watched<S> {
    /// Loads the value now; fails when the files do not load.
    fn new(key: &str, what: &'static str, paths: Vec<PathBuf>, source: S) -> Result<Self, String> {
        let stamps = paths
            .iter()
            .map(|p| stamp(p).map_err(|e| format!("cannot read {}: {e}", p.display())))
            .collect::<Result<Vec<_>, _>>()?;
        let value = source.load()?;
        Ok(Watched {
            key: key.to_string(),
            what,
            paths,
            source,
            state: Mutex::new(WatchState {
                stamps,
                value,
                failed: None,
            }),
        })
    }

    /// The value for a new handshake: made again first if a file changed since.
    fn current(&self) -> S::Value {
        let stamps: Option<Vec<Stamp>> = self.paths.iter().map(|p| stamp(p).ok()).collect();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // A file that cannot be looked at (being replaced right now) keeps what is loaded.
        if let Some(stamps) = stamps {
            if stamps != state.stamps && state.failed.as_ref() != Some(&stamps) {
                match self.source.load() {
                    Ok(value) => {
                        tracing::info!(key = %self.key, files = ?self.paths, "{} changed on disk; reloaded", self.what);
                        state.value = value;
                        state.stamps = stamps;
                        state.failed = None;
                    }
                    Err(error) => {
                        tracing::warn!(key = %self.key, %error, "{} changed on disk but cannot be used; keeping the previous one until the files load", self.what);
                        state.failed = Some(stamps);
                    }
                }
            }
        }
        state.value.clone()
    }
}

impl<S: Source> fmt::Debug for Watched<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watched")
            .field("what", &self.what)
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

/// The verifier of a CA file: the file's certificates added to the system roots, or alone with
/// `ca_only = true`.
struct CaSource {
    path: PathBuf,
    ca_only: bool,
    provider: Arc<CryptoProvider>,
}

impl Source for CaSource {
    type Value = Arc<dyn ServerCertVerifier>;

    fn load(&self) -> Result<Self::Value, String> {
        let certs = read_ca_file(&self.path)?;
        if self.ca_only {
            let mut roots = RootCertStore::empty();
            for cert in certs {
                roots.add(cert).map_err(|e| e.to_string())?;
            }
            let verifier =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                    .build()
                    .map_err(|e| e.to_string())?;
            Ok(verifier)
        } else {
            let verifier = rustls_platform_verifier::Verifier::new_with_extra_roots(
                certs,
                self.provider.clone(),
            )
            .map_err(|e| e.to_string())?;
            Ok(Arc::new(verifier))
        }
    }
}

/// A client certificate and key.
struct IdentitySource {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
}

impl Source for IdentitySource {
    type Value = Arc<CertifiedKey>;

    fn load(&self) -> Result<Self::Value, String> {
        read_identity(&self.cert, &self.key, &self.provider).map_err(|e| e.to_string())
    }
}

/// Hands rustls the client certificate on disk when a server asks for one.
#[derive(Debug)]
struct Identity(Watched<IdentitySource>);

impl ResolvesClientCert for Identity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// No client certificate configured. A server that asks for one gets none; the first time, this
/// says so in the log, since a server that requires one then refuses the connection in a way
/// that reads, on this side, like any lost connection (TLS 1.3 finishes the handshake before the
/// server looks at the client's certificate).
#[derive(Debug)]
struct NoIdentity {
    key: String,
    warned: AtomicBool,
}

impl ResolvesClientCert for NoIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(key = %self.key, "the server asked for a client certificate and none is configured (tls.client_cert, tls.client_key); a server that requires one refuses the connection");
        }
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}

/// Where the roots of a verification come from.
#[derive(Debug)]
enum Roots {
    /// The system roots, loaded at start-up.
    Fixed(Arc<dyn ServerCertVerifier>),
    /// A CA file, read again when it changes.
    Watched(Watched<CaSource>),
    /// `tls_verify = false`: any certificate.
    Any,
}

/// Verifies a server's certificate against the roots in force, and against `server_name`
/// instead of the name the connection was opened with when it is set.
#[derive(Debug)]
struct Verifier {
    roots: Roots,
    server_name: Option<ServerName<'static>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name = self.server_name.as_ref().unwrap_or(server_name);
        let inner = match &self.roots {
            Roots::Any => return Ok(ServerCertVerified::assertion()),
            Roots::Fixed(verifier) => verifier.clone(),
            Roots::Watched(watched) => watched.current(),
        };
        inner.verify_server_cert(end_entity, intermediates, name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use courier_testkit::TestCa;

    use super::*;

    fn identity(dir: &Path) -> (Watched<IdentitySource>, PathBuf, PathBuf) {
        let (cert, key) = (dir.join("c.pem"), dir.join("c.key"));
        let source = IdentitySource {
            cert: cert.clone(),
            key: key.clone(),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        };
        let watched = Watched::new(
            "t.tls",
            "client certificate",
            vec![cert.clone(), key.clone()],
            source,
        )
        .expect("loads");
        (watched, cert, key)
    }

    /// Writes `text` next to `path` and renames it over, as certificate managers do.
    fn swap(path: &Path, text: &str) {
        let aside = path.with_extension("new");
        std::fs::write(&aside, text).expect("write");
        std::fs::rename(&aside, path).expect("rename");
    }

    #[test]
    fn a_half_done_rotation_keeps_the_previous_identity_until_the_pair_matches() {
        let dir = tempfile::tempdir().expect("dir");
        let ca = TestCa::new("t");
        let (first, second) = (ca.client("first"), ca.client("second"));
        first.write(dir.path(), "c");
        let (watched, cert, key) = identity(dir.path());
        assert_eq!(watched.current().cert[0], first.cert_der());
        // The certificate is new, the key not yet: the pair does not load, the old one stays.
        swap(&cert, &second.cert_pem);
        assert_eq!(watched.current().cert[0], first.cert_der());
        assert_eq!(
            watched.current().cert[0],
            first.cert_der(),
            "not retried until a file changes"
        );
        swap(&key, &second.key_pem);
        assert_eq!(watched.current().cert[0], second.cert_der());
        // A file that is gone for a moment keeps what is loaded.
        std::fs::remove_file(&key).expect("remove");
        assert_eq!(watched.current().cert[0], second.cert_der());
    }

    #[test]
    fn a_changed_ca_file_changes_what_is_trusted() {
        let dir = tempfile::tempdir().expect("dir");
        let (old_ca, new_ca) = (TestCa::new("old"), TestCa::new("new"));
        let path = old_ca.write(dir.path(), "ca.pem");
        let source = CaSource {
            path: path.clone(),
            ca_only: true,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        };
        let watched = Watched::new("t.tls", "CA file", vec![path.clone()], source).expect("loads");
        let name = ServerName::try_from("127.0.0.1").expect("name");
        let server = new_ca.server(&["127.0.0.1"]);
        let verify = |w: &Watched<CaSource>| {
            w.current()
                .verify_server_cert(&server.cert_der(), &[], &name, &[], UnixTime::now())
                .is_ok()
        };
        assert!(!verify(&watched), "the new CA is not trusted yet");
        swap(&path, &new_ca.cert_pem);
        assert!(verify(&watched));
    }

    #[test]
    fn server_name_replaces_the_name_the_certificate_is_checked_for() {
        let dir = tempfile::tempdir().expect("dir");
        let ca = TestCa::new("ca");
        let path = ca.write(dir.path(), "ca.pem");
        let server = ca.server(&["broker.internal"]);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = |server_name: Option<&str>| {
            let source = CaSource {
                path: path.clone(),
                ca_only: true,
                provider: provider.clone(),
            };
            Verifier {
                roots: Roots::Watched(
                    Watched::new("t.tls", "CA file", vec![path.clone()], source).expect("loads"),
                ),
                server_name: server_name
                    .map(|n| ServerName::try_from(n.to_string()).expect("name")),
                provider: provider.clone(),
            }
        };
        // Reached by IP address, as a broker often is.
        let by_ip = ServerName::try_from("10.0.0.7").expect("name");
        let verify = |v: &Verifier| {
            v.verify_server_cert(&server.cert_der(), &[], &by_ip, &[], UnixTime::now())
        };
        assert!(verify(&verifier(None)).is_err());
        assert!(verify(&verifier(Some("broker.internal"))).is_ok());
        assert!(verify(&verifier(Some("other.internal"))).is_err());
    }
}
