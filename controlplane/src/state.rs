//! The state directory: the admin token and the generated TLS certificate.
//!
//! Both are created on first start and kept, so a restart keeps the token an operator
//! already copied and the certificate clients already pinned. The certificate pair is
//! generated only when neither `cert.pem` nor `key.pem` exists, and each file is created
//! exclusively: a file Portico did not create (an operator's key kept in the state dir and
//! named in `proxy.tls.key`) is never replaced.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::config::store::{create_exclusive, write_atomic};

pub const TOKEN_FILE: &str = "admin.token";
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";

pub struct State {
    pub dir: PathBuf,
    pub token: String,
    pub token_path: PathBuf,
    /// The token was generated on this start (first start, or the file was missing).
    pub token_created: bool,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

pub fn prepare(dir: &Path) -> Result<State, String> {
    fs::create_dir_all(dir).map_err(|e| format!("state_dir {}: {e}", dir.display()))?;
    // The directory holds the token and a private key: owner only.
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    let token_path = dir.join(TOKEN_FILE);
    let (token, token_created) = match fs::read_to_string(&token_path) {
        Ok(t) if valid_token(t.trim()) => (t.trim().to_string(), false),
        _ => {
            let t = new_token()?;
            write_atomic(&token_path, format!("{t}\n").as_bytes(), 0o600)
                .map_err(|e| format!("{}: {e}", token_path.display()))?;
            (t, true)
        }
    };
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    let there = |p: &Path| fs::symlink_metadata(p).is_ok();
    match (there(&cert_path), there(&key_path)) {
        (false, false) => generate_pair(&cert_path, &key_path)?,
        (true, true) => {}
        _ => tracing::warn!(
            "{} and {}: only one of them exists, so no certificate is generated (Portico \
             never replaces a file it did not create); a TLS listener needs proxy.tls.cert \
             and proxy.tls.key",
            cert_path.display(),
            key_path.display()
        ),
    }
    Ok(State {
        dir: dir.to_path_buf(),
        token,
        token_path,
        token_created,
        cert_path,
        key_path,
    })
}

/// Writes a fresh self-signed pair, key first. If either file appears meanwhile, nothing of
/// someone else's is touched, and a key written here without its certificate is removed.
fn generate_pair(cert_path: &Path, key_path: &Path) -> Result<(), String> {
    let (cert, key) = self_signed()?;
    let created = create_exclusive(key_path, key.as_bytes(), 0o600)
        .map_err(|e| format!("{}: {e}", key_path.display()))?;
    if !created {
        return Ok(());
    }
    match create_exclusive(cert_path, cert.as_bytes(), 0o644) {
        Ok(true) => {
            tracing::info!(certificate = %cert_path.display(), "generated a self-signed certificate");
            Ok(())
        }
        Ok(false) => {
            let _ = fs::remove_file(key_path);
            Ok(())
        }
        Err(e) => {
            let _ = fs::remove_file(key_path);
            Err(format!("{}: {e}", cert_path.display()))
        }
    }
}

fn valid_token(t: &str) -> bool {
    t.len() >= 32 && t.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// 256 random bits from the system CSPRNG, as hex.
fn new_token() -> Result<String, String> {
    use aws_lc_rs::rand::{SecureRandom, SystemRandom};
    let mut b = [0u8; 32];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| "the system random generator failed".to_string())?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn self_signed() -> Result<(String, String), String> {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "portico".into());
    let names = vec![host, "localhost".to_string()];
    let ck = rcgen::generate_simple_self_signed(names)
        .map_err(|e| format!("generating a self-signed certificate: {e}"))?;
    Ok((ck.cert.pem(), ck.key_pair.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_once_and_keeps() {
        let dir = std::env::temp_dir().join(format!("portico-state-{}", std::process::id()));
        let a = prepare(&dir).unwrap();
        assert!(valid_token(&a.token));
        assert!(a.token_created);
        let mode = fs::metadata(&a.token_path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let cert = fs::read_to_string(&a.cert_path).unwrap();
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
        let b = prepare(&dir).unwrap();
        assert_eq!(a.token, b.token);
        assert!(!b.token_created);
        assert_eq!(cert, fs::read_to_string(&b.cert_path).unwrap());
        // The generated pair belongs together.
        crate::proxy::tls::load_certified_key(&a.cert_path, &a.key_path).unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    /// An operator's key kept as `state_dir/key.pem` (its certificate elsewhere) must survive
    /// a start: no certificate is generated over or beside it.
    #[test]
    fn a_file_portico_did_not_create_is_never_replaced() {
        for present in [KEY_FILE, CERT_FILE] {
            let dir = std::env::temp_dir().join(format!(
                "portico-state-keep-{present}-{}",
                std::process::id()
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            let mine = b"-----BEGIN PRIVATE KEY-----\noperator's own\n-----END PRIVATE KEY-----\n";
            fs::write(dir.join(present), mine).unwrap();
            let s = prepare(&dir).unwrap();
            assert_eq!(
                fs::read(dir.join(present)).unwrap(),
                mine,
                "{present} replaced"
            );
            let other = if present == KEY_FILE {
                &s.cert_path
            } else {
                &s.key_path
            };
            assert!(!other.exists(), "half a pair generated beside {present}");
            fs::remove_dir_all(&dir).unwrap();
        }
    }
}
