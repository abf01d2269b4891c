//! Certificates for TLS tests, made with rcgen on the spot: a CA, server certificates for the
//! receiver or a broker, and client certificates, written as PEM files where courier reads them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SignatureAlgorithm,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A certificate authority of a test.
pub struct TestCa {
    /// The CA certificate, as PEM.
    pub cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate issued by a [`TestCa`], with its private key.
pub struct Issued {
    /// The certificate, as PEM.
    pub cert_pem: String,
    /// The private key, as PKCS#8 PEM.
    pub key_pem: String,
    cert_der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl TestCa {
    /// A CA named `name` with an ECDSA P-256 key.
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        TestCa {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// The CA certificate.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    /// A server certificate for `names` (DNS names or IP addresses), ECDSA P-256.
    pub fn server(&self, names: &[&str]) -> Issued {
        self.issue(names, "server", ExtendedKeyUsagePurpose::ServerAuth, None)
    }

    /// A client certificate with the common name `name`, ECDSA P-256.
    pub fn client(&self, name: &str) -> Issued {
        self.issue(&[], name, ExtendedKeyUsagePurpose::ClientAuth, None)
    }

    /// A client certificate with the common name `name` and a key of algorithm `alg` (such as
    /// `rcgen::PKCS_ED25519`).
    pub fn client_with(&self, name: &str, alg: &'static SignatureAlgorithm) -> Issued {
        self.issue(&[], name, ExtendedKeyUsagePurpose::ClientAuth, Some(alg))
    }

    fn issue(
        &self,
        names: &[&str],
        common_name: &str,
        usage: ExtendedKeyUsagePurpose,
        alg: Option<&'static SignatureAlgorithm>,
    ) -> Issued {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("certificate parameters");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        let key = match alg {
            Some(alg) => KeyPair::generate_for(alg),
            None => KeyPair::generate(),
        }
        .expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }

    /// Writes the CA certificate to `dir/<name>`; returns the path.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        write_file(&dir.join(name), &self.cert_pem)
    }
}

impl Issued {
    /// The certificate.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    /// The private key.
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// Writes `dir/<name>.pem` and `dir/<name>.key`; returns both paths.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        (
            write_file(&dir.join(format!("{name}.pem")), &self.cert_pem),
            write_file(&dir.join(format!("{name}.key")), &self.key_pem),
        )
    }

    /// Replaces the files at `cert` and `key` the way cert-manager or a Vault agent does: each
    /// written aside and renamed over the old one.
    pub fn replace(&self, cert: &Path, key: &Path) {
        for (path, text) in [(cert, &self.cert_pem), (key, &self.key_pem)] {
            let aside = path.with_extension("new");
            write_file(&aside, text);
            std::fs::rename(&aside, path).expect("rename over the old file");
        }
    }
}

fn write_file(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path.to_path_buf()
}

/// A server TLS configuration with `server`'s certificate that, unless `client_roots` is empty,
/// requires a client certificate issued by one of them.
pub fn server_config(
    server: &Issued,
    client_roots: &[CertificateDer<'static>],
) -> rustls::ServerConfig {
    crate::install_crypto_provider();
    let builder = rustls::ServerConfig::builder();
    let builder = match client_roots {
        [] => builder.with_no_client_auth(),
        roots_der => {
            let mut roots = rustls::RootCertStore::empty();
            for root in roots_der {
                roots.add(root.clone()).expect("client CA");
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        }
    };
    builder
        .with_single_cert(vec![server.cert_der()], server.key_der())
        .expect("server TLS config")
}
