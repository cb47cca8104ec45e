//! The fraud lists on disk: `<state_dir>/fraud.json`, rewritten atomically after changes, so
//! manual entries and running automatic ones survive a restart (and a crash mid-write).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::Entry;
use crate::config::store::write_atomic;

pub const FILE: &str = "fraud.json";

#[derive(Serialize, Deserialize, Default)]
struct OnDisk {
    entries: Vec<Entry>,
}

/// Reads the lists; a missing file is an empty list, a damaged one an error that names it.
pub fn load(path: &Path) -> Result<Vec<Entry>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice::<OnDisk>(&bytes)
            .map(|d| d.entries)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

pub fn save(path: &Path, entries: Vec<Entry>) -> Result<(), String> {
    let text = serde_json::to_vec_pretty(&OnDisk { entries })
        .map_err(|e| format!("encoding the fraud lists: {e}"))?;
    write_atomic(path, &text, 0o600).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fraud::{Kind, Origin, Source};

    #[test]
    fn round_trips() {
        let dir = std::env::temp_dir().join(format!("portico-fraud-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(FILE);
        assert!(load(&p).unwrap().is_empty());
        let e = Entry {
            source: Source::of("2001:db8::1".parse().unwrap(), 64),
            kind: Kind::Black,
            origin: Origin::Manual,
            created_unix: 5,
            expires_unix: None,
            note: "n".into(),
        };
        save(&p, vec![e.clone()]).unwrap();
        assert_eq!(load(&p).unwrap(), vec![e]);
        std::fs::write(&p, b"{broken").unwrap();
        assert!(load(&p).unwrap_err().contains(FILE));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
