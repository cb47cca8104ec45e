//! Replays of the committed fuzz inputs (`fuzz/corpus/TARGET/` and `fuzz/regressions/TARGET/`)
//! through the entry points the fuzz targets call, so a fixed crash stays fixed under a plain
//! `cargo test` (used by `dataplane/tests/fuzz_regressions.rs` and
//! `controlplane/tests/proxy/fuzz_regressions.rs`).

use std::fs;
use std::path::{Path, PathBuf};

/// The workspace's `fuzz/` directory.
pub fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Every file of `fuzz/{corpus,regressions}/TARGET`, in name order.
pub fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for kind in ["corpus", "regressions"] {
        let Ok(dir) = fs::read_dir(fuzz_dir().join(kind).join(target)) else {
            continue;
        };
        for e in dir.flatten() {
            let path = e.path();
            if path.is_file() {
                let data = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                out.push((path, data));
            }
        }
    }
    out.sort();
    out
}

/// Runs every input of `target` through `run` (at least five must exist: a missing corpus
/// is a failure, not a pass).
pub fn replay(target: &str, run: fn(&[u8])) {
    let inputs = inputs(target);
    assert!(
        inputs.len() >= 5,
        "only {} inputs for {target} under {}",
        inputs.len(),
        fuzz_dir().display()
    );
    for (path, data) in &inputs {
        // Shown only when the replay panics: which input it was.
        eprintln!("replaying {}", path.display());
        run(data);
    }
}
