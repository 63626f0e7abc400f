//! Build script: puts the static kimg-init into OUT_DIR so the kimg binary carries it
//! (`include_bytes!` in `src/commands/mod.rs`), and `cargo install --path builder/cli`
//! gives a kimg that needs no checkout.
//!
//! By default a nested cargo builds kimg-init (`-p kimg-init --profile init --target
//! x86_64-unknown-linux-musl`) into the outer build's target directory: the same
//! `target/x86_64-unknown-linux-musl/init/kimg-init` a developer builds by hand, so it is
//! never built twice, and a no-op when fresh. The nested cargo locks that profile's
//! directories only, never the outer build's. `KIMG_EMBED_INIT=FILE` embeds a
//! kimg-init built elsewhere instead (packagers, a host without the musl target).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const MUSL: &str = "x86_64-unknown-linux-musl";

fn main() {
    if let Err(e) = run() {
        eprintln!("error: kimg's build script: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env_var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env_var("OUT_DIR")?);
    let workspace = manifest_dir.join("../..");
    println!("cargo:rerun-if-env-changed=KIMG_EMBED_INIT");
    let init = match env::var_os("KIMG_EMBED_INIT").filter(|v| !v.is_empty()) {
        Some(file) => {
            let file = PathBuf::from(file);
            println!("cargo:rerun-if-changed={}", file.display());
            file
        }
        None => {
            // Rebuilt when kimg-init's sources, its contract or the lock file change.
            for p in [
                "init/src",
                "init/Cargo.toml",
                "contract/src",
                "contract/Cargo.toml",
                "Cargo.toml",
                "Cargo.lock",
            ] {
                println!("cargo:rerun-if-changed={}", workspace.join(p).display());
            }
            build_init(&workspace, &target_dir(&out_dir))?
        }
    };
    let bytes = fs::read(&init).map_err(|e| format!("cannot read {}: {e}", init.display()))?;
    check_static(&bytes).map_err(|why| format!("{}: {why}", init.display()))?;
    let dest = out_dir.join("kimg-init");
    // Rewritten only when it changed: its mtime decides whether kimg is recompiled.
    if fs::read(&dest).ok().as_deref() != Some(&bytes[..]) {
        fs::write(&dest, &bytes).map_err(|e| format!("cannot write {}: {e}", dest.display()))?;
    }
    Ok(())
}

fn env_var(name: &str) -> Result<String, String> {
    env::var(name).map_err(|_| format!("${name} is not set (run through cargo)"))
}

/// The outer build's target directory: `$CARGO_TARGET_DIR`, else the ancestor of
/// OUT_DIR that cargo marked with CACHEDIR.TAG, else a directory in OUT_DIR.
fn target_dir(out_dir: &Path) -> PathBuf {
    if let Some(d) = env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    out_dir
        .ancestors()
        .find(|d| d.join("CACHEDIR.TAG").is_file())
        .map_or_else(|| out_dir.join("target"), Path::to_path_buf)
}

/// Builds kimg-init with a nested cargo; returns the binary.
fn build_init(workspace: &Path, target_dir: &Path) -> Result<PathBuf, String> {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .args(["-p", "kimg-init", "--profile", "init", "--target", MUSL])
        .arg("--target-dir")
        .arg(target_dir);
    // What the outer cargo sets for its own compiles must not leak into kimg-init's:
    // host RUSTFLAGS, and clippy's wrapper (it would rebuild kimg-init under clippy).
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "CLIPPY_ARGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
    ] {
        cmd.env_remove(var);
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot start {}: {e}", cargo.to_string_lossy()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!(
            "building kimg-init for {MUSL} failed ({}):\n{}\n\
             install the target with `rustup target add {MUSL}` (scripts/setup-host does), \
             or give a static kimg-init with KIMG_EMBED_INIT=FILE",
            out.status,
            tail.join("\n")
        ));
    }
    Ok(target_dir.join(MUSL).join("init/kimg-init"))
}

/// An x86-64 ELF executable without an interpreter (PT_INTERP): it runs as PID 1
/// before any library exists.
fn check_static(elf: &[u8]) -> Result<(), String> {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        })
    };
    // ELF magic, 64-bit, little endian, machine x86-64 (62).
    if elf.get(0..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) || u16_at(18) != Some(62) {
        return Err("not an x86-64 ELF".into());
    }
    let phoff = u64_at(32).ok_or("truncated ELF header")? as usize;
    let phentsize = usize::from(u16_at(54).ok_or("truncated ELF header")?);
    let phnum = usize::from(u16_at(56).ok_or("truncated ELF header")?);
    for i in 0..phnum {
        const PT_INTERP: u32 = 3;
        if u32_at(phoff + i * phentsize) == Some(PT_INTERP) {
            return Err("dynamically linked (has an interpreter); kimg-init must be static".into());
        }
    }
    Ok(())
}
