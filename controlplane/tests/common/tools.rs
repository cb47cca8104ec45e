//! Third-party STUN clients, run the way a person would run them, with a time limit (none of
//! them has one of its own). A missing tool fails the test: interop is only proven by
//! running it.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The full path of `name` on PATH, or a test failure that says how to get it.
pub fn require(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "`{name}` is not installed (Debian package `{package}`); scripts/test.sh installs it, \
         or run: apt-get install {package}"
    );
}

/// What a tool printed (stdout then stderr) and how it ended.
pub struct Run {
    pub text: String,
    pub code: Option<i32>,
    pub timed_out: bool,
}

/// Runs `program args` under coreutils `timeout`, which kills it after `limit`.
pub fn run(program: &PathBuf, args: &[String], limit: Duration) -> Run {
    let out = Command::new("timeout")
        .arg("-k")
        .arg("2")
        .arg(format!("{}", limit.as_secs().max(1)))
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {} under timeout: {e}", program.display()));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    let code = out.status.code();
    Run {
        text,
        code,
        // timeout(1) exits 124 when it had to stop the command.
        timed_out: code == Some(124),
    }
}
