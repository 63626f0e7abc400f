//! ELF inspection: what kind of binary a file is, and the shared libraries (with the
//! dynamic loader) a set of binaries needs, resolved the way `ld.so` would on this host.

use goblin::elf::Elf;
use kimg_util::fs::IoError;
use std::collections::{BTreeSet, VecDeque};
use std::path::{Path, PathBuf};

/// Inspecting a binary or resolving its libraries failed.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    /// The file could not be read.
    #[error(transparent)]
    Io(#[from] IoError),
    /// The file is not a valid ELF file.
    #[error("{}: not a valid ELF file: {reason}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What goblin reported.
        reason: String,
    },
    /// The binary is an ELF file for another architecture than x86-64.
    #[error("{}: not an x86-64 ELF binary", path.display())]
    OtherArch {
        /// The file.
        path: PathBuf,
    },
    /// A needed library (or the interpreter) was not found in any search directory.
    #[error("library {library} needed by {} was not found", needed_by.display())]
    MissingLibrary {
        /// The DT_NEEDED name or interpreter path.
        library: String,
        /// The binary or library that needs it.
        needed_by: PathBuf,
    },
}

/// What kind of file a binary is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElfKind {
    /// x86-64 ELF with no interpreter and no needed libraries.
    Static,
    /// x86-64 ELF that needs the dynamic loader.
    Dynamic,
    /// Not an ELF file (script, text, ...).
    NotElf,
    /// ELF for another architecture or class.
    OtherArch,
}

const EM_X86_64: u16 = 62;

/// Classifies the file at `path`.
pub fn elf_kind(path: &Path) -> Result<ElfKind, ElfError> {
    let bytes = read(path)?;
    if !bytes.starts_with(b"\x7fELF") {
        return Ok(ElfKind::NotElf);
    }
    let header = Elf::parse_header(&bytes).map_err(|e| parse_error(path, e))?;
    if header.e_machine != EM_X86_64 || header.e_ident[4] != goblin::elf::header::ELFCLASS64 {
        return Ok(ElfKind::OtherArch);
    }
    let elf = Elf::parse(&bytes).map_err(|e| parse_error(path, e))?;
    Ok(if elf.interpreter.is_some() || !elf.libraries.is_empty() {
        ElfKind::Dynamic
    } else {
        ElfKind::Static
    })
}

/// Every shared library the `binaries` need, transitively, plus their interpreter:
/// sorted, deduplicated, as found (not canonicalized), without the binaries themselves.
/// Static binaries contribute nothing.
pub fn library_closure(binaries: &[PathBuf]) -> Result<Vec<PathBuf>, ElfError> {
    let dirs = system_dirs(Path::new("/etc/ld.so.conf"));
    closure_in(binaries, &dirs)
}

/// [`library_closure`] with `dirs` searched before the host's directories (as
/// LD_LIBRARY_PATH would be): libraries of packages unpacked but not installed.
pub fn library_closure_in(
    binaries: &[PathBuf],
    dirs: &[PathBuf],
) -> Result<Vec<PathBuf>, ElfError> {
    let mut all = dirs.to_vec();
    all.extend(system_dirs(Path::new("/etc/ld.so.conf")));
    closure_in(binaries, &all)
}

/// The library search directories after RUNPATH: ld.so.conf's, then the defaults.
fn system_dirs(ld_so_conf: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    read_ld_so_conf(ld_so_conf, &mut dirs, 0);
    for d in [
        "/lib/x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu",
        "/lib64",
        "/usr/lib64",
        "/lib",
        "/usr/lib",
    ] {
        dirs.push(PathBuf::from(d));
    }
    let mut seen = BTreeSet::new();
    dirs.retain(|d| seen.insert(d.clone()));
    dirs
}

/// Appends the directories named by an ld.so.conf file and its `include`s. A missing
/// or unreadable file adds nothing: ld.so itself treats it the same way.
fn read_ld_so_conf(path: &Path, dirs: &mut Vec<PathBuf>, depth: usize) {
    // Includes can loop; real configs nest one level.
    if depth > 8 {
        return;
    }
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    let base = path.parent().unwrap_or(Path::new("/"));
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if let Some(pattern) = line
            .strip_prefix("include")
            .filter(|r| r.starts_with([' ', '\t']))
        {
            for pattern in pattern.split_whitespace() {
                for file in glob(&base.join(pattern)) {
                    read_ld_so_conf(&file, dirs, depth + 1);
                }
            }
        } else if !line.starts_with("hwcap") {
            dirs.extend(
                line.split([' ', '\t', ',', ':'])
                    .filter(|d| !d.is_empty())
                    .map(PathBuf::from),
            );
        }
    }
}

/// Expands `*` and `?` in the last path component (all ld.so.conf includes use), in
/// sorted order like glob(3).
fn glob(pattern: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (
        pattern.parent(),
        pattern.file_name().and_then(|n| n.to_str()),
    ) else {
        return Vec::new();
    };
    if !name.contains(['*', '?']) {
        return if pattern.exists() {
            vec![pattern.to_path_buf()]
        } else {
            Vec::new()
        };
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| wildcard(name.as_bytes(), n.as_bytes()))
        })
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

/// Shell-style match of `*` and `?` (no brackets).
fn wildcard(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|i| wildcard(rest, &text[i..])),
        Some((b'?', rest)) => !text.is_empty() && wildcard(rest, &text[1..]),
        Some((c, rest)) => text.first() == Some(c) && wildcard(rest, &text[1..]),
    }
}

/// What ld.so needs to know about one object.
struct Needs {
    interpreter: Option<String>,
    needed: Vec<String>,
    /// DT_RUNPATH, `$ORIGIN` expanded.
    runpath: Vec<PathBuf>,
    /// DT_RPATH, `$ORIGIN` expanded; empty when there is a RUNPATH, which disables it.
    rpath: Vec<PathBuf>,
}

fn needs_of(path: &Path) -> Result<Option<Needs>, ElfError> {
    let bytes = read(path)?;
    if !bytes.starts_with(b"\x7fELF") {
        return Err(ElfError::Parse {
            path: path.to_path_buf(),
            reason: "no ELF magic".into(),
        });
    }
    let elf = Elf::parse(&bytes).map_err(|e| parse_error(path, e))?;
    if elf.header.e_machine != EM_X86_64 || !elf.is_64 {
        return Err(ElfError::OtherArch {
            path: path.to_path_buf(),
        });
    }
    if elf.interpreter.is_none() && elf.libraries.is_empty() {
        return Ok(None);
    }
    let origin = path.parent().unwrap_or(Path::new("."));
    let origin = origin.to_string_lossy();
    let expand = |paths: &[&str]| -> Vec<PathBuf> {
        paths
            .iter()
            .flat_map(|p| p.split(':'))
            .filter(|p| !p.is_empty())
            .map(|p| PathBuf::from(p.replace("${ORIGIN}", &origin).replace("$ORIGIN", &origin)))
            .collect()
    };
    let runpath = expand(&elf.runpaths);
    let rpath = if runpath.is_empty() {
        expand(&elf.rpaths)
    } else {
        Vec::new()
    };
    Ok(Some(Needs {
        interpreter: elf.interpreter.map(str::to_string),
        needed: elf.libraries.iter().map(|s| s.to_string()).collect(),
        runpath,
        rpath,
    }))
}

fn closure_in(binaries: &[PathBuf], system: &[PathBuf]) -> Result<Vec<PathBuf>, ElfError> {
    let mut found = BTreeSet::new();
    // Each queued object carries the RPATHs of the objects that loaded it: like ld.so,
    // an object without RUNPATH searches its own RPATH, then its loaders' RPATHs.
    let mut queue: VecDeque<(PathBuf, Vec<PathBuf>)> =
        binaries.iter().map(|b| (b.clone(), Vec::new())).collect();
    let mut seen: BTreeSet<PathBuf> = binaries.iter().cloned().collect();
    // File names of the interpreters: libc's DT_NEEDED `ld-linux-x86-64.so.2` is the
    // already-loaded interpreter (ld.so matches it by SONAME), not another copy from
    // the library path.
    let mut interpreters = BTreeSet::new();
    while let Some((object, inherited)) = queue.pop_front() {
        let Some(needs) = needs_of(&object)? else {
            continue;
        };
        let chain: Vec<PathBuf> = needs.rpath.iter().chain(&inherited).cloned().collect();
        let search = if needs.runpath.is_empty() {
            &chain
        } else {
            &needs.runpath
        };
        let missing = |library: &str| ElfError::MissingLibrary {
            library: library.to_string(),
            needed_by: object.clone(),
        };
        let mut libs = Vec::new();
        if let Some(interp) = &needs.interpreter {
            let p = PathBuf::from(interp);
            if !p.is_file() {
                return Err(missing(interp));
            }
            if let Some(name) = p.file_name() {
                interpreters.insert(name.to_os_string());
            }
            libs.push(p);
        }
        for name in &needs.needed {
            if interpreters.contains(std::ffi::OsStr::new(name)) {
                continue;
            }
            let lib = if name.contains('/') {
                Some(PathBuf::from(name)).filter(|p| p.is_file())
            } else {
                search
                    .iter()
                    .chain(system)
                    .map(|d| d.join(name))
                    .find(|p| is_x86_64_elf(p))
            };
            libs.push(lib.ok_or_else(|| missing(name))?);
        }
        for lib in libs {
            if seen.insert(lib.clone()) {
                found.insert(lib.clone());
                queue.push_back((lib, chain.clone()));
            }
        }
    }
    Ok(found.into_iter().collect())
}

/// True for a readable x86-64 ELF file: ld.so skips same-named libraries of other
/// architectures (e.g. 32-bit ones in /usr/lib32) and keeps searching.
fn is_x86_64_elf(path: &Path) -> bool {
    use std::io::Read;
    // Only the header is needed here; the library is parsed fully once it is queued.
    let mut header = [0u8; 20];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .is_ok()
        && header.starts_with(b"\x7fELF")
        && header[4] == goblin::elf::header::ELFCLASS64
        && header[5] == goblin::elf::header::ELFDATA2LSB
        && u16::from_le_bytes([header[18], header[19]]) == EM_X86_64
}

fn read(path: &Path) -> Result<Vec<u8>, ElfError> {
    std::fs::read(path).map_err(|source| ElfError::Io(IoError::new(path.to_path_buf(), source)))
}

fn parse_error(path: &Path, e: goblin::error::Error) -> ElfError {
    ElfError::Parse {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kimg_util::cmd;
    use std::process::Command;

    fn ls() -> PathBuf {
        ["/usr/bin/ls", "/bin/ls"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .unwrap()
    }

    #[test]
    fn ls_needs_libc_and_loader() {
        assert_eq!(elf_kind(&ls()).unwrap(), ElfKind::Dynamic);
        let libs = library_closure(&[ls()]).unwrap();
        eprintln!("{libs:?}");
        // The interpreter once, by its PT_INTERP path, not again as libc's DT_NEEDED.
        let loaders = libs.iter().filter(|p| p.ends_with("ld-linux-x86-64.so.2"));
        assert_eq!(loaders.count(), 1, "{libs:?}");
        assert!(libs.iter().any(|p| p.ends_with("libc.so.6")), "{libs:?}");
        assert!(
            libs.iter()
                .any(|p| p.to_string_lossy().contains("ld-linux-x86-64.so.2")),
            "{libs:?}"
        );
        assert!(!libs.contains(&ls()));
        let mut sorted = libs.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, libs);
    }

    #[test]
    fn static_binary_needs_nothing() {
        let busybox = Path::new("/bin/busybox");
        if !busybox.exists() || elf_kind(busybox).unwrap() != ElfKind::Static {
            eprintln!("skipping: no static /bin/busybox (apt-get install busybox-static)");
            return;
        }
        assert!(library_closure(&[busybox.to_path_buf()])
            .unwrap()
            .is_empty());
    }

    #[test]
    fn kinds_of_non_elf() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("script");
        std::fs::write(&text, "#!/bin/sh\necho hi\n").unwrap();
        assert_eq!(elf_kind(&text).unwrap(), ElfKind::NotElf);
        let err = library_closure(&[text]).unwrap_err();
        assert!(matches!(err, ElfError::Parse { .. }), "{err}");
        let mut other = std::fs::read(ls()).unwrap();
        other[18] = 183; // EM_AARCH64
        other[19] = 0;
        let other_path = dir.path().join("arm");
        std::fs::write(&other_path, other).unwrap();
        assert_eq!(elf_kind(&other_path).unwrap(), ElfKind::OtherArch);
        assert!(elf_kind(&dir.path().join("missing")).is_err());
        std::fs::write(dir.path().join("trunc"), b"\x7fELF\x02").unwrap();
        assert!(elf_kind(&dir.path().join("trunc")).is_err());
    }

    #[test]
    fn runpath_origin_and_missing_library() {
        if !cmd::exists("gcc") {
            eprintln!("skipping: gcc not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("lib")).unwrap();
        std::fs::write(d.join("foo.c"), "int foo(void) { return 1; }\n").unwrap();
        std::fs::write(
            d.join("main.c"),
            "int foo(void); int main(void) { return foo(); }\n",
        )
        .unwrap();
        cmd::run(
            Command::new("gcc")
                .args(["-shared", "-fPIC", "-o", "lib/libfoo.so", "foo.c"])
                .current_dir(d),
        )
        .unwrap();
        cmd::run(
            Command::new("gcc")
                .args([
                    "-o",
                    "x",
                    "main.c",
                    "-Llib",
                    "-lfoo",
                    "-Wl,-rpath,$ORIGIN/lib",
                ])
                .current_dir(d),
        )
        .unwrap();
        let x = d.join("x");
        let libs = library_closure(std::slice::from_ref(&x)).unwrap();
        assert!(libs.contains(&d.join("lib/libfoo.so")), "{libs:?}");
        assert!(libs.iter().any(|p| p.ends_with("libc.so.6")), "{libs:?}");

        std::fs::remove_file(d.join("lib/libfoo.so")).unwrap();
        let err = library_closure(std::slice::from_ref(&x)).unwrap_err();
        match &err {
            ElfError::MissingLibrary { library, needed_by } => {
                assert_eq!(library, "libfoo.so");
                assert_eq!(needed_by, &x);
            }
            other => panic!("{other}"),
        }
        assert!(err.to_string().contains("libfoo.so"), "{err}");
    }

    #[test]
    fn rpath_is_inherited_by_libraries() {
        if !cmd::exists("gcc") {
            eprintln!("skipping: gcc not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("lib")).unwrap();
        std::fs::write(d.join("foo.c"), "int foo(void) { return 1; }\n").unwrap();
        std::fs::write(
            d.join("bar.c"),
            "int foo(void); int bar(void) { return foo(); }\n",
        )
        .unwrap();
        std::fs::write(
            d.join("main.c"),
            "int bar(void); int main(void) { return bar(); }\n",
        )
        .unwrap();
        let gcc = |args: &[&str]| {
            cmd::run(Command::new("gcc").args(args).current_dir(d)).unwrap();
        };
        gcc(&["-shared", "-fPIC", "-o", "lib/libfoo.so", "foo.c"]);
        // libbar has no RPATH of its own: libfoo is found through the executable's.
        gcc(&[
            "-shared",
            "-fPIC",
            "-o",
            "lib/libbar.so",
            "bar.c",
            "-Llib",
            "-lfoo",
        ]);
        let old_dtags = "-Wl,--disable-new-dtags,-rpath,$ORIGIN/lib";
        gcc(&[
            "-o",
            "x",
            "main.c",
            "-Llib",
            "-lbar",
            "-Wl,-rpath-link,lib",
            old_dtags,
        ]);
        let libs = library_closure(&[d.join("x")]).unwrap();
        assert!(libs.contains(&d.join("lib/libfoo.so")), "{libs:?}");
        assert!(libs.contains(&d.join("lib/libbar.so")), "{libs:?}");
        // With RUNPATH instead, ld.so would not search it for libbar's needs.
        gcc(&[
            "-o",
            "y",
            "main.c",
            "-Llib",
            "-lbar",
            "-Wl,-rpath-link,lib",
            "-Wl,--enable-new-dtags,-rpath,$ORIGIN/lib",
        ]);
        let err = library_closure(&[d.join("y")]).unwrap_err();
        assert!(
            matches!(&err, ElfError::MissingLibrary { library, needed_by }
                if library == "libfoo.so" && needed_by == &d.join("lib/libbar.so")),
            "{err}"
        );
    }

    #[test]
    fn ld_so_conf_with_includes() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("conf.d")).unwrap();
        std::fs::write(d.join("conf.d/b.conf"), "/opt/b # comment\n").unwrap();
        std::fs::write(d.join("conf.d/a.conf"), "/opt/a\n# only a comment\n").unwrap();
        std::fs::write(d.join("conf.d/skip.txt"), "/opt/skip\n").unwrap();
        std::fs::write(d.join("loop.conf"), "include loop.conf\n/opt/loop\n").unwrap();
        std::fs::write(
            d.join("ld.so.conf"),
            "include conf.d/*.conf\n/usr/local/lib\ninclude loop.conf\n",
        )
        .unwrap();
        let dirs = system_dirs(&d.join("ld.so.conf"));
        let dirs: Vec<String> = dirs.iter().map(|p| p.display().to_string()).collect();
        assert_eq!(
            dirs[..5],
            [
                "/opt/a",
                "/opt/b",
                "/usr/local/lib",
                "/opt/loop",
                "/lib/x86_64-linux-gnu"
            ]
        );
        assert!(dirs.ends_with(&["/lib".to_string(), "/usr/lib".to_string()]));
        assert!(wildcard(b"*.conf", b"x.conf") && !wildcard(b"*.conf", b"x.con"));
        assert!(wildcard(b"a?c", b"abc") && !wildcard(b"a?c", b"ac"));
    }
}
