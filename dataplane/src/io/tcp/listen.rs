//! The stream listeners and the TLS configuration.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use mio::net::TcpListener;
use rustls::ServerConfig;
use socket2::{Domain, Protocol, Socket, Type};

/// A stream listener: plain (`turn.listen`, the socket index of its endpoint, so Binding
/// answers as from it) or TLS (`turn.listen_tls`).
pub struct Listener {
    pub(super) listener: TcpListener,
    pub(super) endpoint: Option<usize>,
    pub(super) tls: bool,
}

/// Binds a TCP listener per `turn.listen` address (their indices are the endpoints') and
/// per `turn.listen_tls` address.
pub fn bind_listeners(plain: &[SocketAddr], tls: &[SocketAddr]) -> Result<Vec<Listener>, String> {
    let mut out = Vec::new();
    for (i, a) in plain.iter().enumerate() {
        let l = tcp_listener(*a).map_err(|e| format!("turn.listen {a}: tcp bind: {e}"))?;
        out.push(Listener {
            listener: TcpListener::from_std(l),
            endpoint: Some(i),
            tls: false,
        });
    }
    for a in tls {
        let l = tcp_listener(*a).map_err(|e| format!("turn.listen_tls {a}: tcp bind: {e}"))?;
        out.push(Listener {
            listener: TcpListener::from_std(l),
            endpoint: None,
            tls: true,
        });
    }
    Ok(out)
}

fn tcp_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// Builds the TLS server configuration from a PEM chain and key (the proxy's pair).
pub fn load_tls(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in the file", cert.display()));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, der)
        .map_err(|e| format!("{} and {}: {e}", cert.display(), key.display()))?;
    Ok(Arc::new(config))
}
