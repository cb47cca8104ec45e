//! Where the configuration comes from and where it is kept.
//!
//! `portico run --config FILE` uses FILE as the source of truth. Plain `portico` (what
//! `cargo run --release` starts) keeps its configuration in `./portico-state/portico.toml`,
//! writing the embedded default there on first start, so that later changes persist in the
//! state dir.

pub mod edit;
pub mod store;

use std::fs;
use std::path::{Path, PathBuf};

use portico_shared::config::{Config, ConfigError};

use crate::proxy::tls::{self, PairFile};
use crate::state;

/// The file the default run keeps its configuration in.
pub const DEFAULT_STATE_DIR: &str = "./portico-state";
pub const STATE_CONFIG_FILE: &str = "portico.toml";

/// The configuration and the file it was read from.
pub struct Loaded {
    pub config: Config,
    pub path: PathBuf,
}

pub fn load_file(path: &Path) -> Result<Config, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Config::from_toml(&text)
        .and_then(|c| check_files(&c).map(|()| c))
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn key_err(key: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_string(),
        problem: problem.into(),
    }
}

/// Checks what the text alone cannot tell, at load (`portico check`, `portico run`,
/// `SIGHUP`) and on every API change: that `log_level` is a filter `tracing` takes, and that
/// the TLS files of `[proxy.tls]` exist and belong together, so a TLS listener is never left
/// without a certificate, and that the CA files (`ca_file`, `client_ca_file`) hold usable
/// certificates. Without `proxy.tls.cert`/`key` a TLS listener uses the pair
/// generated in the state dir: it is checked when present, and must not be half there.
pub fn check_files(c: &Config) -> Result<(), ConfigError> {
    tracing_subscriber::EnvFilter::builder()
        .parse(&c.log_level)
        .map_err(|e| {
            key_err(
                "log_level",
                format!("\"{}\" is not a log filter: {e}", c.log_level),
            )
        })?;
    let t = &c.proxy.tls;
    match (&t.cert, &t.key) {
        (Some(cert), Some(key)) => {
            tls::load_certified_key(cert, key).map_err(|e| match e.file {
                PairFile::Cert => key_err("proxy.tls.cert", e.message),
                PairFile::Key => key_err("proxy.tls.key", e.message),
            })?;
        }
        _ if c.proxy.listen.iter().any(|(t, _)| t.is_tls()) || !c.turn.listen_tls.is_empty() => {
            let cert = c.state_dir.join(state::CERT_FILE);
            let key = c.state_dir.join(state::KEY_FILE);
            match (cert.exists(), key.exists()) {
                // Generated at start.
                (false, false) => {}
                (true, true) => {
                    tls::load_certified_key(&cert, &key).map_err(|e| {
                        key_err(
                            "proxy.tls",
                            format!("unset, and the generated pair in state_dir is unusable: {e}"),
                        )
                    })?;
                }
                _ => {
                    return Err(key_err(
                        "proxy.tls",
                        format!(
                            "unset, and state_dir holds only one of {} and {}; Portico generates \
                             the pair only when neither exists: set proxy.tls.cert and \
                             proxy.tls.key, or remove the one that is there",
                            cert.display(),
                            key.display()
                        ),
                    ));
                }
            }
        }
        _ => {}
    }
    if let Some(f) = &t.ca_file {
        tls::root_store(Some(f)).map_err(|e| {
            key_err(
                "proxy.tls.ca_file",
                e.trim_start_matches("proxy.tls.ca_file ").to_string(),
            )
        })?;
    }
    if let Some(f) = &t.client_ca_file {
        const KEY: &str = "proxy.tls.client_ca_file";
        tls::client_verifier(f).map_err(|e| {
            key_err(
                KEY,
                e.strip_prefix(KEY).unwrap_or(&e).trim_start().to_string(),
            )
        })?;
    }
    Ok(())
}

/// Loads FILE, or the state dir's file (created from the embedded default when missing).
pub fn load(config_file: Option<&Path>) -> Result<Loaded, String> {
    if let Some(p) = config_file {
        return Ok(Loaded {
            config: load_file(p)?,
            path: p.to_path_buf(),
        });
    }
    let path = Path::new(DEFAULT_STATE_DIR).join(STATE_CONFIG_FILE);
    if path.exists() {
        return Ok(Loaded {
            config: load_file(&path)?,
            path,
        });
    }
    let config = Config::default();
    fs::create_dir_all(DEFAULT_STATE_DIR).map_err(|e| format!("{DEFAULT_STATE_DIR}: {e}"))?;
    let text = format!(
        "# Written by portico on first start from its embedded defaults.\n\
         # Every key is documented in portico.example.toml.\n{}",
        config.to_toml()
    );
    store::write_atomic(&path, text.as_bytes(), 0o600)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Loaded { config, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &Path, tag: &str) -> (PathBuf, PathBuf) {
        let ck = rcgen::generate_simple_self_signed(vec![format!("{tag}.test")]).unwrap();
        let c = dir.join(format!("{tag}.crt"));
        let k = dir.join(format!("{tag}.key"));
        fs::write(&c, ck.cert.pem()).unwrap();
        fs::write(&k, ck.key_pair.serialize_pem()).unwrap();
        (c, k)
    }

    fn with_tls(dir: &Path, cert: &Path, key: &Path) -> Config {
        Config::from_toml(&format!(
            "state_dir = \"{}\"\n[proxy.listen]\nhttps = \"127.0.0.1:8443\"\n[proxy.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            dir.join("state").display(),
            cert.display(),
            key.display()
        ))
        .unwrap()
    }

    #[test]
    fn tls_files_are_checked_naming_the_key() {
        let dir = std::env::temp_dir().join(format!("portico-check-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let (c1, k1) = pair(&dir, "one");
        let (_, k2) = pair(&dir, "two");
        check_files(&with_tls(&dir, &c1, &k1)).unwrap();
        let e = check_files(&with_tls(&dir, &dir.join("absent.crt"), &k1)).unwrap_err();
        assert_eq!(e.key, "proxy.tls.cert", "{e}");
        let e = check_files(&with_tls(&dir, &c1, &dir.join("absent.key"))).unwrap_err();
        assert_eq!(e.key, "proxy.tls.key", "{e}");
        let e = check_files(&with_tls(&dir, &c1, &k2)).unwrap_err();
        assert_eq!(e.key, "proxy.tls.key", "{e}");
        assert!(e.problem.contains("does not match"), "{e}");
        let e = check_files(&with_tls(&dir, &k1, &k1)).unwrap_err();
        assert_eq!(e.key, "proxy.tls.cert", "a key is not a certificate: {e}");

        let mut c = with_tls(&dir, &c1, &k1);
        c.proxy.tls.ca_file = Some(k1.clone());
        assert_eq!(check_files(&c).unwrap_err().key, "proxy.tls.ca_file");
        // The trust list for Check Certificate: missing, or no certificate in it.
        let mut c = with_tls(&dir, &c1, &k1);
        c.proxy.tls.client_ca_file = Some(dir.join("absent-ca.pem"));
        let e = check_files(&c).unwrap_err();
        assert_eq!(e.key, "proxy.tls.client_ca_file", "{e}");
        assert!(e.problem.contains("absent-ca.pem"), "{e}");
        c.proxy.tls.client_ca_file = Some(k1.clone());
        let e = check_files(&c).unwrap_err();
        assert_eq!(e.key, "proxy.tls.client_ca_file", "{e}");
        assert!(e.problem.contains("no usable CA certificate"), "{e}");
        c.proxy.tls.client_ca_file = Some(c1.clone());
        check_files(&c).unwrap();

        // Unset: the generated pair, absent (made at start), whole, or half there.
        let mut c = with_tls(&dir, &c1, &k1);
        c.proxy.tls.cert = None;
        c.proxy.tls.key = None;
        check_files(&c).unwrap();
        fs::create_dir_all(&c.state_dir).unwrap();
        fs::copy(&k2, c.state_dir.join(state::KEY_FILE)).unwrap();
        let e = check_files(&c).unwrap_err();
        assert_eq!(e.key, "proxy.tls", "{e}");
        fs::copy(&c1, c.state_dir.join(state::CERT_FILE)).unwrap();
        let e = check_files(&c).unwrap_err();
        assert!(e.problem.contains("does not match"), "{e}");
        fs::copy(&k1, c.state_dir.join(state::KEY_FILE)).unwrap();
        check_files(&c).unwrap();
        // Without a TLS listener the generated pair is not needed.
        fs::remove_file(c.state_dir.join(state::CERT_FILE)).unwrap();
        c.proxy.listen.https = None;
        check_files(&c).unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn load_refuses_a_bad_log_level_and_a_missing_certificate() {
        let dir = std::env::temp_dir().join(format!("portico-load-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("p.toml");
        for (text, key) in [
            ("log_level = \"verbose\"\n", "log_level: "),
            ("log_level = \"nonsense=,,\"\n", "log_level: "),
            (
                "[proxy.tls]\ncert = \"/nonexistent/c.pem\"\nkey = \"/nonexistent/k.pem\"\n",
                "proxy.tls.cert: ",
            ),
        ] {
            fs::write(&f, text).unwrap();
            let e = load_file(&f).unwrap_err();
            assert!(
                e.starts_with(&format!("{}: {key}", f.display())),
                "{text}: {e}"
            );
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
