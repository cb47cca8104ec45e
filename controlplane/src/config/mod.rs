//! Where the configuration comes from and where it is kept.
//!
//! `portico run --config FILE` uses FILE as the source of truth. Plain `portico` (what
//! `cargo run --release` starts) keeps its configuration in `./portico-state/portico.toml`,
//! writing the embedded default there on first start, so that later changes persist in the
//! state dir.

pub mod store;

use std::fs;
use std::path::{Path, PathBuf};

use portico_shared::config::Config;

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
    Config::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))
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
