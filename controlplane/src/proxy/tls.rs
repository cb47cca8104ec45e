//! TLS for both sides of the proxy.
//!
//! Client side: one certificate for every service (the reference: the RP always presents its
//! own certificate), held by a resolver whose key pair can be swapped at any time. Handshakes
//! already done keep the key they used, so a reload drops no connection.
//!
//! Target side: certificates are verified against the system trust store plus
//! `[proxy.tls] ca_file`; a service with `verify_target_certificate = false` gets a verifier that
//! still checks the handshake signature (so the session is bound to the key the target showed)
//! but not the chain or the name.
//!
//! Check Certificate (a service's `check_certificate`): the SIPS and H.323/TLS listeners ask
//! clients for a certificate when `[proxy.tls] client_ca_file` is set. Asking is optional and
//! the handshake accepts any certificate whose key signs it ([`AskClient`]): a device
//! without one, or with one the trust list does not know, still connects, and is then
//! forwarded over TCP. After the handshake, [`check_client`] verifies the chain against the
//! trust list (webpki, client-auth usage) and reads the names the certificate carries.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
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

/// Like [`server_config`], asking the client for a certificate (optional) for Check
/// Certificate; `trust` is the verifier [`client_verifier`] made from the trust list.
pub fn server_config_asking(
    resolver: Arc<CertResolver>,
    trust: Arc<dyn ClientCertVerifier>,
) -> Result<Arc<ServerConfig>, String> {
    let mut c = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(Arc::new(AskClient(trust)))
        .with_cert_resolver(resolver);
    c.session_storage = rustls::server::ServerSessionMemoryCache::new(16 * 1024);
    if let Ok(t) = rustls::crypto::aws_lc_rs::Ticketer::new() {
        c.ticketer = t;
    }
    Ok(Arc::new(c))
}

/// The verifier of client certificates against `proxy.tls.client_ca_file` (only that file:
/// the system's web CAs do not vouch for phones).
pub fn client_verifier(ca_file: &Path) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let key = "proxy.tls.client_ca_file";
    let certs: Vec<_> = CertificateDer::pem_file_iter(ca_file)
        .map_err(|e| format!("{key} {}: {e}", ca_file.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{key} {}: {e}", ca_file.display()))?;
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!(
            "{key} {}: no usable CA certificate",
            ca_file.display()
        ));
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| format!("{key} {}: {e}", ca_file.display()))
}

/// Asks for a client certificate without requiring one, and accepts any whose key signs the
/// handshake: whether it is trusted is decided afterwards by [`check_client`], so that an
/// untrusted device is forwarded over TCP instead of failing the handshake.
#[derive(Debug)]
struct AskClient(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for AskClient {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// What a client's certificate says, for Check Certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientCert {
    /// It chains to the trust list and is valid now for client authentication.
    pub trusted: bool,
    /// Its subject CN and subjectAltName entries (DNS, e-mail, URI), lower case.
    pub names: Vec<String>,
}

impl ClientCert {
    /// Whether the certificate is trusted and one of its names is one of `registered` (the
    /// names a registration registers). Compared without case and without a `sip:`,
    /// `sips:` or `h323:` scheme.
    pub fn vouches_for(&self, registered: &[String]) -> bool {
        self.trusted
            && registered
                .iter()
                .map(|r| bare_name(r))
                .any(|r| !r.is_empty() && self.names.iter().any(|n| bare_name(n) == r))
    }
}

fn bare_name(n: &str) -> String {
    let n = n.trim().to_ascii_lowercase();
    for scheme in ["sip:", "sips:", "h323:"] {
        if let Some(rest) = n.strip_prefix(scheme) {
            return rest.to_string();
        }
    }
    n
}

/// Verifies the chain a client presented (leaf first) with `trust`; `None` when it presented
/// none.
pub fn check_client(
    trust: &dyn ClientCertVerifier,
    chain: Option<&[CertificateDer<'static>]>,
) -> Option<ClientCert> {
    let (leaf, intermediates) = chain?.split_first()?;
    let trusted = trust
        .verify_client_cert(leaf, intermediates, UnixTime::now())
        .is_ok();
    Some(ClientCert {
        trusted,
        names: cert_names(leaf).unwrap_or_default(),
    })
}

/// One DER element: (tag, contents, rest).
fn der(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = b.split_first()?;
    if tag & 0x1f == 0x1f {
        return None; // high tag numbers do not occur where we look
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |v, b| (v << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The subject's common names and the subjectAltName DNS names, e-mail addresses and URIs of
/// a DER certificate, lower case. `None` if it cannot be read.
pub fn cert_names(cert: &[u8]) -> Option<Vec<String>> {
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    const SAN: &[u8] = &[0x55, 0x1d, 0x11];
    let text = |v: &[u8]| std::str::from_utf8(v).ok().map(|s| s.to_ascii_lowercase());
    let (_, certificate, _) = der(cert)?;
    let (_, mut tbs, _) = der(certificate)?;
    let mut names = Vec::new();
    // [0] version, serial, signature, issuer, validity, subject, spki, then [1] [2] [3].
    let mut index = 0;
    while !tbs.is_empty() && names.len() < 64 {
        let (tag, body, rest) = der(tbs)?;
        tbs = rest;
        if tag == 0xa0 {
            continue; // version
        }
        index += 1;
        if index == 5 {
            // subject: SEQUENCE OF SET OF SEQUENCE { type, value }
            let mut rdns = body;
            while let Some((_, set, rest)) = der(rdns) {
                rdns = rest;
                let mut atvs = set;
                while let Some((_, atv, rest)) = der(atvs) {
                    atvs = rest;
                    if let Some((0x06, oid, value)) = der(atv) {
                        if oid == CN {
                            if let Some((_, v, _)) = der(value) {
                                names.extend(text(v));
                            }
                        }
                    }
                }
            }
        }
        if tag == 0xa3 {
            let (_, mut exts, _) = der(body)?;
            while let Some((_, ext, rest)) = der(exts) {
                exts = rest;
                let Some((0x06, oid, mut fields)) = der(ext) else {
                    continue;
                };
                if oid != SAN {
                    continue;
                }
                // critical BOOLEAN DEFAULT FALSE, then the OCTET STRING.
                while let Some((tag, v, rest)) = der(fields) {
                    fields = rest;
                    if tag != 0x04 {
                        continue;
                    }
                    let (_, mut general, _) = der(v)?;
                    while let Some((tag, v, rest)) = der(general) {
                        general = rest;
                        // rfc822Name [1], dNSName [2], uniformResourceIdentifier [6]
                        if matches!(tag, 0x81 | 0x82 | 0x86) {
                            names.extend(text(v));
                        }
                    }
                }
            }
        }
    }
    Some(names)
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

/// For `verify_target_certificate = false`: any certificate is accepted, but the handshake signature
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

    #[test]
    fn client_certificate_names() {
        let mut p = rcgen::CertificateParams::new(vec!["Phone.Example.com".to_string()]).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "Alice");
        p.subject_alt_names.push(rcgen::SanType::Rfc822Name(
            "alice@example.com".try_into().unwrap(),
        ));
        p.subject_alt_names.push(rcgen::SanType::URI(
            "sip:alice@example.com".try_into().unwrap(),
        ));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        let names = cert_names(cert.der()).unwrap();
        assert_eq!(
            names,
            [
                "alice",
                "phone.example.com",
                "alice@example.com",
                "sip:alice@example.com"
            ]
        );
        let c = ClientCert {
            trusted: true,
            names,
        };
        assert!(c.vouches_for(&["ALICE".into()]));
        assert!(c.vouches_for(&["h323:alice@example.com".into()]));
        assert!(!c.vouches_for(&["bob".into(), "".into()]));
        assert!(!ClientCert {
            trusted: false,
            ..c
        }
        .vouches_for(&["alice".into()]));
        // Garbage is no name, not a panic.
        assert_eq!(cert_names(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        for n in 0..cert.der().len() {
            let _ = cert_names(&cert.der()[..n]);
        }
    }

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
