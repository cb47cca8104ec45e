//! TLS for both sides of the proxy.
//!
//! Client side: one certificate for every service (the reference: the RP always presents its
//! own certificate), held by a resolver whose key pair can be swapped at any time. Handshakes
//! already done keep the key they used, so a reload drops no connection.
//!
//! Target side: certificates are verified against the system trust store plus
//! `[proxy.tls] ca_file`; a service with `check_certificate = false` gets a verifier that
//! still checks the handshake signature (so the session is bound to the key the target showed)
//! but not the chain or the name.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

/// Where Debian (and most distributions) keep the system's trusted CAs as one PEM bundle.
pub const SYSTEM_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Which file of a certificate/key pair a loading error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairFile {
    Cert,
    Key,
}

/// Why a certificate/key pair cannot be used, and which file to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairError {
    pub file: PairFile,
    pub message: String,
}

impl std::fmt::Display for PairError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Reads a PEM chain and key and checks that they belong together: the key must be one
/// rustls can sign with, and its public key must be the one in the leaf certificate.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, PairError> {
    let cert_err = |m: String| PairError {
        file: PairFile::Cert,
        message: m,
    };
    let key_err = |m: String| PairError {
        file: PairFile::Key,
        message: m,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_err(format!("{}: {e}", cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(format!("{}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(cert_err(format!(
            "{}: no certificate in the file",
            cert.display()
        )));
    }
    let der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| key_err(format!("{}: {e}", key.display())))?;
    let signer = provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| key_err(format!("{}: {e}", key.display())))?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match().map_err(|e| {
        key_err(format!(
            "{} does not match the certificate in {}: {e}",
            key.display(),
            cert.display()
        ))
    })?;
    Ok(ck)
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

struct Loaded {
    cert: PathBuf,
    key: PathBuf,
    stamp: (Option<SystemTime>, Option<SystemTime>),
    key_pair: Arc<CertifiedKey>,
}

/// The proxy's certificate, swappable while connections run.
#[derive(Default)]
pub struct CertResolver {
    current: RwLock<Option<Loaded>>,
}

impl std::fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertResolver")
    }
}

impl CertResolver {
    /// Loads `cert`/`key` when they are new paths or their files changed since the last load.
    /// Returns `Ok(true)` when a new pair is in use. On error the old pair stays in use.
    pub fn refresh(&self, cert: &Path, key: &Path) -> Result<bool, String> {
        let stamp = (mtime(cert), mtime(key));
        {
            let cur = self.current.read().unwrap_or_else(|e| e.into_inner());
            if let Some(l) = cur.as_ref() {
                if l.cert == cert && l.key == key && l.stamp == stamp {
                    return Ok(false);
                }
            }
        }
        let loaded = load_certified_key(cert, key).map_err(|e| e.message);
        let mut cur = self.current.write().unwrap_or_else(|e| e.into_inner());
        match loaded {
            Ok(ck) => {
                *cur = Some(Loaded {
                    cert: cert.to_path_buf(),
                    key: key.to_path_buf(),
                    stamp,
                    key_pair: Arc::new(ck),
                });
                Ok(true)
            }
            Err(e) => {
                // Remember the stamp so a broken file is reported once, not every tick.
                if let Some(l) = cur.as_mut() {
                    l.cert = cert.to_path_buf();
                    l.key = key.to_path_buf();
                    l.stamp = stamp;
                }
                Err(e)
            }
        }
    }

    pub fn has_key(&self) -> bool {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|l| Arc::clone(&l.key_pair))
    }
}

/// The server side for one service type; `alpn` is offered as is (HTTPS: `http/1.1` only,
/// since the proxy speaks HTTP/1 to both sides).
pub fn server_config(
    resolver: Arc<CertResolver>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, String> {
    let mut c = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    c.session_storage = rustls::server::ServerSessionMemoryCache::new(16 * 1024);
    if let Ok(t) = rustls::crypto::aws_lc_rs::Ticketer::new() {
        c.ticketer = t;
    }
    Ok(Arc::new(c))
}

/// Trusted roots: the system bundle (if present) plus `ca_file`. Returns the store and how
/// many certificates it holds. A bad `ca_file` is an error; the system file is best effort.
pub fn root_store(ca_file: Option<&Path>) -> Result<(RootCertStore, usize), String> {
    let mut store = RootCertStore::empty();
    if let Ok(iter) = CertificateDer::pem_file_iter(SYSTEM_CA_FILE) {
        let certs: Vec<_> = iter.filter_map(Result::ok).collect();
        store.add_parsable_certificates(certs);
    }
    if let Some(f) = ca_file {
        let certs: Vec<_> = CertificateDer::pem_file_iter(f)
            .map_err(|e| format!("proxy.tls.ca_file {}: {e}", f.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("proxy.tls.ca_file {}: {e}", f.display()))?;
        let (added, _) = store.add_parsable_certificates(certs);
        if added == 0 {
            return Err(format!(
                "proxy.tls.ca_file {}: no usable CA certificate",
                f.display()
            ));
        }
    }
    let n = store.len();
    Ok((store, n))
}

/// Client configurations for targets: `(verifying, not verifying)`.
pub fn client_configs(
    roots: RootCertStore,
    alpn: &[&[u8]],
) -> Result<(Arc<ClientConfig>, Arc<ClientConfig>), String> {
    let p = provider();
    let mut verifying = ClientConfig::builder_with_provider(Arc::clone(&p))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    verifying.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let mut trusting = ClientConfig::builder_with_provider(Arc::clone(&p))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SignatureOnly(p)))
        .with_no_client_auth();
    trusting.alpn_protocols = verifying.alpn_protocols.clone();
    Ok((Arc::new(verifying), Arc::new(trusting)))
}

/// The name a target's certificate is checked against and sent as SNI.
pub fn server_name(name: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(name.to_string()).map_err(|e| format!("{name:?}: {e}"))
}

/// For `check_certificate = false`: any certificate is accepted, but the handshake signature
/// must still verify with the key in it.
#[derive(Debug)]
struct SignatureOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for SignatureOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, tag: &str) -> (PathBuf, PathBuf) {
        let ck = rcgen::generate_simple_self_signed(vec![format!("{tag}.test")]).unwrap();
        let c = dir.join(format!("{tag}.crt"));
        let k = dir.join(format!("{tag}.key"));
        std::fs::write(&c, ck.cert.pem()).unwrap();
        std::fs::write(&k, ck.key_pair.serialize_pem()).unwrap();
        (c, k)
    }

    #[test]
    fn reload_swaps_and_keeps_old_on_error() {
        let dir = std::env::temp_dir().join(format!("portico-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (c1, k1) = write_pair(&dir, "one");
        let (c2, k2) = write_pair(&dir, "two");
        let r = CertResolver::default();
        assert!(r.refresh(&c1, &k1).unwrap());
        assert!(
            !r.refresh(&c1, &k1).unwrap(),
            "unchanged files are not reloaded"
        );
        let first = r.current.read().unwrap().as_ref().unwrap().key_pair.clone();
        // Mismatched pair: refused, old one stays.
        let e = r.refresh(&c1, &k2).unwrap_err();
        assert!(e.contains("does not match"), "{e}");
        let e = load_certified_key(&c1, &k2).unwrap_err();
        assert_eq!(e.file, PairFile::Key);
        let e = load_certified_key(&dir.join("absent.crt"), &k1).unwrap_err();
        assert_eq!(e.file, PairFile::Cert);
        let e = load_certified_key(&c1, &dir.join("absent.key")).unwrap_err();
        assert_eq!(e.file, PairFile::Key);
        let still = r.current.read().unwrap().as_ref().unwrap().key_pair.clone();
        assert!(Arc::ptr_eq(&first, &still));
        assert!(r.refresh(&c2, &k2).unwrap());
        let now = r.current.read().unwrap().as_ref().unwrap().key_pair.clone();
        assert!(!Arc::ptr_eq(&first, &now));
        std::fs::write(&c2, "garbage").unwrap();
        assert!(r.refresh(&c2, &k2).is_err());
        assert!(r.has_key());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_ca_file_is_an_error() {
        let p = std::env::temp_dir().join(format!("portico-ca-{}.pem", std::process::id()));
        std::fs::write(&p, "nothing here").unwrap();
        assert!(root_store(Some(&p)).is_err());
        std::fs::remove_file(&p).unwrap();
    }
}
