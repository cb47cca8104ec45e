//! Compiles the kernel fast path (src/fastpath/bpf/relay.bpf.c) with clang when clang and the
//! libbpf headers are there. Without them the dataplane is built without the fast path
//! (`cfg(portico_fastpath)` unset) and says why, in one line, when `turn.fast_path` asks for it.

use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCE: &str = "src/fastpath/bpf/relay.bpf.c";
const HELPERS: &str = "/usr/include/bpf/bpf_helpers.h";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(portico_fastpath)");
    println!("cargo:rerun-if-changed={SOURCE}");
    println!("cargo:rerun-if-changed={HELPERS}");
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rerun-if-env-changed=PORTICO_BUILD_NO_FASTPATH");
    match compile() {
        Ok(object) => {
            println!("cargo:rustc-cfg=portico_fastpath");
            println!("cargo:rustc-env=PORTICO_FASTPATH_OBJ={}", object.display());
        }
        Err(why) => {
            println!("cargo:warning=building without the kernel fast path: {why}");
            println!("cargo:rustc-env=PORTICO_FASTPATH_MISSING={why}");
        }
    }
}

fn compile() -> Result<PathBuf, String> {
    if std::env::var_os("PORTICO_BUILD_NO_FASTPATH").is_some() {
        return Err("the build was told not to (PORTICO_BUILD_NO_FASTPATH)".into());
    }
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return Err("not a Linux target".into());
    }
    if !Path::new(HELPERS).exists() {
        return Err(format!(
            "the libbpf headers ({HELPERS}, Debian package libbpf-dev) were missing at build time"
        ));
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let object = out.join("relay.bpf.o");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    // <asm/types.h> lives in the multiarch include directory of the build machine.
    let arch = match std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => "x86_64-linux-gnu",
        Ok("aarch64") => "aarch64-linux-gnu",
        Ok(other) => return Err(format!("no multiarch include directory known for {other}")),
        Err(e) => return Err(e.to_string()),
    };
    let output = Command::new(&clang)
        .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"])
        .arg(format!("-I/usr/include/{arch}"))
        .args(["-c", SOURCE, "-o"])
        .arg(&object)
        .output()
        .map_err(|e| format!("{clang} (Debian package clang) could not run: {e}"))?;
    if !output.status.success() {
        let err = String::from_utf8_lossy(&output.stderr);
        let first = err.lines().next().unwrap_or("no message");
        return Err(format!("{clang} failed on {SOURCE}: {first}"));
    }
    Ok(object)
}
