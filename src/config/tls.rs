//! The `tls` table that `[rabbitmq]`, `[mqtt]` and each `[[destinations]]` entry accept: a CA
//! file, a client certificate and key, and a verification name. The files are read and parsed
//! when the configuration is loaded, so bad material is a configuration error that names the key
//! and the file; [`crate::tls`] reads them again whenever they change on disk.

use std::fmt;
use std::path::{Path, PathBuf};

use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};

use super::expand::keyed;
use crate::tls::{read_ca_file, read_identity, MaterialError};

/// The `tls` table as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table with ca_file, ca_only, client_cert, client_key or server_name"
)]
struct TlsFile {
    /// PEM file of one or more CA certificates.
    #[serde(default)]
    ca_file: Option<PathBuf>,
    /// Trust only `ca_file`, not the system roots as well.
    #[serde(default)]
    ca_only: bool,
    /// PEM file of the client certificate (and its chain).
    #[serde(default)]
    client_cert: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    #[serde(default)]
    client_key: Option<PathBuf>,
    /// The name the server certificate must carry, instead of the URL's host.
    #[serde(default)]
    server_name: Option<String>,
}

/// TLS settings of one connection, checked: the files exist and hold what they should (the CA
/// certificates parse, the key is an RSA, ECDSA or Ed25519 key in PKCS#8, PKCS#1 or SEC1 form and
/// belongs to the certificate), and `server_name` is a DNS name or an IP address.
///
/// Two settings are equal when they name the same files and options; the destinations that share
/// them share an HTTP client.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "TlsFile")]
pub struct TlsConfig {
    written: TlsFile,
    server_name: Option<ServerName<'static>>,
}

impl TlsConfig {
    /// The CA file, if any.
    pub fn ca_file(&self) -> Option<&Path> {
        self.written.ca_file.as_deref()
    }

    /// Whether `ca_file` holds the only roots (otherwise they are added to the system's).
    pub fn ca_only(&self) -> bool {
        self.written.ca_only
    }

    /// The client certificate and key files, if set (always both or neither).
    pub fn client_identity(&self) -> Option<(&Path, &Path)> {
        Some((
            self.written.client_cert.as_deref()?,
            self.written.client_key.as_deref()?,
        ))
    }

    /// The name the server's certificate is verified against instead of the URL's host.
    pub fn server_name(&self) -> Option<&ServerName<'static>> {
        self.server_name.as_ref()
    }

    /// The keys (below `tls.`) that only matter when the server's certificate is verified.
    pub(super) fn verification_keys(&self) -> Vec<&'static str> {
        let w = &self.written;
        [
            w.ca_file.as_ref().map(|_| "tls.ca_file"),
            w.ca_only.then_some("tls.ca_only"),
            w.server_name.as_ref().map(|_| "tls.server_name"),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

fn check_path(key: &str, path: &Option<PathBuf>) -> Result<(), String> {
    match path {
        Some(p) if p.as_os_str().is_empty() => Err(keyed(key, "must not be empty")),
        _ => Ok(()),
    }
}

impl TryFrom<TlsFile> for TlsConfig {
    type Error = String;

    fn try_from(written: TlsFile) -> Result<TlsConfig, String> {
        check_path("ca_file", &written.ca_file)?;
        check_path("client_cert", &written.client_cert)?;
        check_path("client_key", &written.client_key)?;
        if written.ca_only && written.ca_file.is_none() {
            return Err(keyed(
                "ca_only",
                "needs ca_file: it says to trust that file's certificates only",
            ));
        }
        let server_name = match &written.server_name {
            Some(name) => Some(ServerName::try_from(name.clone()).map_err(|_| {
                keyed(
                    "server_name",
                    format!("{name:?} is not a DNS name or an IP address"),
                )
            })?),
            None => None,
        };
        if let Some(path) = &written.ca_file {
            read_ca_file(path).map_err(|e| keyed("ca_file", e))?;
        }
        match (&written.client_cert, &written.client_key) {
            (Some(cert), Some(key)) => {
                let provider = rustls::crypto::ring::default_provider();
                read_identity(cert, key, &provider).map_err(|e| match e {
                    MaterialError::Certificate(m) => keyed("client_cert", m),
                    MaterialError::Key(m) => keyed("client_key", m),
                })?;
            }
            (Some(_), None) => {
                return Err(keyed(
                    "client_key",
                    "is required with client_cert (the certificate's private key)",
                ))
            }
            (None, Some(_)) => {
                return Err(keyed(
                    "client_cert",
                    "is required with client_key (the key's certificate)",
                ))
            }
            (None, None) => {}
        }
        Ok(TlsConfig {
            written,
            server_name,
        })
    }
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.written, f)
    }
}

impl Serialize for TlsConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.written.serialize(s)
    }
}
