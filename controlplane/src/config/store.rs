//! Crash-safe file writes: a reader (or a restart after `kill -9`) sees either the old file
//! or the new one, never a mix.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes `data` to `path` atomically: temp file in the same directory, fsync, rename over
/// the target, fsync of the directory so the rename itself survives a power cut.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Creates `path` with `data`, never replacing anything: the content goes to a temp file first,
/// which is then hard-linked to `path` (`link(2)` fails when `path` exists, even as a dangling
/// symlink), so `path` appears complete or not at all. Returns `Ok(false)`, writing nothing,
/// when `path` already exists.
pub fn create_exclusive(path: &Path, data: &[u8], mode: u32) -> io::Result<bool> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        match fs::hard_link(&tmp, path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(e),
        }
        File::open(dir)?.sync_all()?;
        Ok(true)
    })();
    let _ = fs::remove_file(&tmp);
    result
}

/// Removes temp files that a writer killed between create and rename left beside `path`
/// (`.NAME.tmp-PID` of a process that no longer exists). They never replace the real file,
/// but would pile up over crashes.
pub fn remove_stale_temps(path: &Path) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Some(name) = path.file_name() else {
        return;
    };
    let prefix = format!(".{}.tmp-", name.to_string_lossy());
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(pid) = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let gone = pid > 0
            && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
                == Err(nix::errno::Errno::ESRCH);
        if gone && fs::remove_file(e.path()).is_ok() {
            tracing::info!(file = %e.path().display(), "removed a temp file left by a killed writer");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_content_and_sets_mode() {
        let dir = std::env::temp_dir().join(format!("portico-store-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.toml");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn exclusive_creation_never_replaces() {
        let dir = std::env::temp_dir().join(format!("portico-excl-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("key.pem");
        assert!(create_exclusive(&p, b"first", 0o600).unwrap());
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!create_exclusive(&p, b"second", 0o600).unwrap());
        assert_eq!(fs::read(&p).unwrap(), b"first");
        // A dangling symlink is something there too: not followed, not replaced.
        let link = dir.join("cert.pem");
        std::os::unix::fs::symlink(dir.join("nowhere"), &link).unwrap();
        assert!(!create_exclusive(&link, b"x", 0o644).unwrap());
        assert!(!dir.join("nowhere").exists());
        let leftovers = fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .count();
        assert_eq!(leftovers, 0);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stale_temps_of_dead_writers_are_removed() {
        let dir = std::env::temp_dir().join(format!("portico-stale-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("portico.toml");
        write_atomic(&p, b"x", 0o600).unwrap();
        // A pid above the kernel's maximum cannot be running.
        let dead = dir.join(".portico.toml.tmp-2147483647");
        let mine = dir.join(format!(".portico.toml.tmp-{}", std::process::id()));
        let other = dir.join(".other.toml.tmp-2147483647");
        for f in [&dead, &mine, &other] {
            fs::write(f, b"partial").unwrap();
        }
        remove_stale_temps(&p);
        assert!(!dead.exists());
        assert!(mine.exists(), "a live writer's temp file stays");
        assert!(other.exists(), "another file's temp file stays");
        assert_eq!(fs::read(&p).unwrap(), b"x");
        fs::remove_dir_all(&dir).unwrap();
    }
}
