//! Kernels from source: Debian's linux-source tree, a config assembled from a base and
//! fragments by the kernel's own Kconfig, and an out-of-tree build cached by config.
//!
//! The source tree is only read: every `make` runs with `O=<build dir>`, and
//! [`assemble`] checks afterwards that no `.config` or generated headers appeared in it.

use super::config::{self, ConfigError, ConfigMiss, ConfigValue, KernelConfig};
use super::kconfig::{KconfigIndex, UnmetDependency};
use super::{apt, deb, KernelError};
use kimg_util::cmd::{self, CmdError};
use kimg_util::fs::{IoError, PathContext};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The Debian package with the kernel source matching the cloud kernel's series.
pub const SOURCE_PACKAGE: &str = "linux-source-6.1";

/// Files an out-of-tree build must never create in the source tree.
const TREE_MARKERS: [&str; 3] = [".config", "include/config", "include/generated"];

/// Fetching, configuring or building a kernel from source failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A program (make, tar, apt-get) failed.
    #[error(transparent)]
    Cmd(#[from] CmdError),
    /// Downloading or unpacking the source package failed.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// Unpacking the source package failed.
    #[error(transparent)]
    Deb(#[from] deb::DebError),
    /// Reading or writing a file failed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// A config (base, fragment or result) did not parse.
    #[error("{name}: {source}")]
    Config {
        /// Which config.
        name: String,
        /// The parse error.
        source: ConfigError,
    },
    /// The directory is not a kernel source tree.
    #[error("{}: not a kernel source tree (no Makefile and Kconfig); `kimg kernel source` fetches one", path.display())]
    NotATree {
        /// The directory.
        path: PathBuf,
    },
    /// The source tree has build output in it; out-of-tree builds need a clean tree.
    #[error("{}: the source tree has {what} in it: run `make mrproper` there, or use a fresh tree", path.display())]
    Dirty {
        /// The tree.
        path: PathBuf,
        /// What was found.
        what: String,
    },
    /// The unpacked package does not hold what was expected.
    #[error("{}: {reason}", path.display())]
    Layout {
        /// Where.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Kconfig dropped fragment symbols, so the kernel would not be what was asked.
    #[error("the kernel's Kconfig dropped {} fragment symbol(s):\n  {}", dropped.len(), dropped.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
    Dropped {
        /// Each symbol that did not end as requested.
        dropped: Vec<Dropped>,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SourceError {
    let path = path.to_path_buf();
    move |source| SourceError::Io(IoError::new(path, source))
}

/// Downloads Debian's [`SOURCE_PACKAGE`] with apt-get into `<cache>/debs` and unpacks its
/// tarball once into `<cache>/sources/<sha256 of the .deb>/`; returns the tree.
pub fn fetch(cache: &Path, log: &dyn Fn(&str)) -> Result<PathBuf, SourceError> {
    let download = apt::download_package(cache, SOURCE_PACKAGE)?;
    let sources = cache.join("sources");
    let root = sources.join(&download.sha256);
    if !root.is_dir() {
        std::fs::create_dir_all(&sources).with_path(&sources)?;
        log(&format!(
            "unpacking {} (about 20 s)",
            download.deb.display()
        ));
        let t = Instant::now();
        // Unpack beside the final place and rename, so a half unpack never looks done.
        let tmp = kimg_util::fs::work_dir(&sources, ".unpack-")?;
        let deb_dir = tmp.path().join("deb");
        deb::unpack_data(&download.deb, &deb_dir)?;
        let usr_src = deb_dir.join("usr/src");
        let tarball = std::fs::read_dir(&usr_src)
            .with_path(&usr_src)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().ends_with(".tar.xz"))
            .ok_or_else(|| SourceError::Layout {
                path: usr_src.clone(),
                reason: "no linux-source-*.tar.xz in the package".into(),
            })?;
        let tree_dir = tmp.path().join("tree");
        std::fs::create_dir_all(&tree_dir).with_path(&tree_dir)?;
        cmd::run(
            cmd::command("tar")
                .arg("-xJf")
                .arg(&tarball)
                .arg("-C")
                .arg(&tree_dir),
        )?;
        std::fs::remove_dir_all(&deb_dir).with_path(&deb_dir)?;
        let tree_dir = tmp.keep();
        if let Err(e) = std::fs::rename(&tree_dir, &root) {
            let _ = std::fs::remove_dir_all(&tree_dir);
            if !root.is_dir() {
                return Err(io_err(&root)(e));
            }
        }
        log(&format!("unpacked in {:.1}s", t.elapsed().as_secs_f64()));
    }
    single_subdir(&root.join("tree"))
}

/// The one directory inside `dir` (a source tarball's top directory).
fn single_subdir(dir: &Path) -> Result<PathBuf, SourceError> {
    let dirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_path(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    match dirs.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(SourceError::Layout {
            path: dir.to_path_buf(),
            reason: format!("expected one source directory, found {}", dirs.len()),
        }),
    }
}

/// Where the config starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base {
    /// The architecture's `make defconfig`.
    Defconfig,
    /// A full config file (e.g. a distribution's /boot/config-*).
    File(PathBuf),
}

/// A named fragment.
#[derive(Debug, Clone)]
pub struct Fragment {
    /// File name, for messages.
    pub name: String,
    /// Its symbols.
    pub config: KernelConfig,
}

impl Fragment {
    /// kimg's embedded fragments for `flavour`: base, and k8s for Kubernetes.
    pub fn embedded(flavour: kimg_contract::Flavour) -> Result<Vec<Fragment>, SourceError> {
        config::builtin_fragments(flavour)
            .into_iter()
            .map(|(name, text)| {
                Ok(Fragment {
                    name: name.into(),
                    config: KernelConfig::parse(text).map_err(|source| SourceError::Config {
                        name: name.into(),
                        source,
                    })?,
                })
            })
            .collect()
    }

    /// Reads a fragment file.
    pub fn from_file(path: &Path) -> Result<Fragment, SourceError> {
        Ok(Fragment {
            name: path.display().to_string(),
            config: KernelConfig::from_file(path).map_err(|source| SourceError::Config {
                name: "fragment".into(),
                source,
            })?,
        })
    }
}

/// A fragment symbol that did not end as requested, and why, where Kconfig says.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Dropped {
    /// The symbol, with `CONFIG_`.
    pub symbol: String,
    /// What the fragments asked for.
    pub wanted: String,
    /// What Kconfig made of it (`n` when absent).
    pub found: String,
    /// False when no Kconfig file defines the symbol (misspelt, or gone in this version).
    pub defined: bool,
    /// Its `depends on` expressions that are off in the result.
    pub unmet: Vec<UnmetDependency>,
}

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: requested {}, got {}",
            self.symbol, self.wanted, self.found
        )?;
        if !self.defined {
            return f.write_str(" (no Kconfig file of this tree defines it)");
        }
        for u in &self.unmet {
            write!(f, "; depends on {} ({})", u.expr, u.at)?;
            if !u.off.is_empty() {
                write!(f, ", off: {}", u.off.join(", "))?;
            }
        }
        Ok(())
    }
}

/// The outcome of [`assemble`].
#[derive(Debug, Clone)]
pub struct Assembled {
    /// The config as `make olddefconfig` wrote it.
    pub text: String,
    /// The same, parsed.
    pub config: KernelConfig,
    /// Fragment symbols that did not end as requested (empty when all survived).
    pub dropped: Vec<Dropped>,
}

/// Checks that `tree` is a kernel tree without build output in it.
fn check_tree(tree: &Path) -> Result<(), SourceError> {
    if !tree.join("Makefile").is_file() || !tree.join("Kconfig").is_file() {
        return Err(SourceError::NotATree {
            path: tree.to_path_buf(),
        });
    }
    if let Some(m) = TREE_MARKERS.iter().find(|m| tree.join(m).exists()) {
        return Err(SourceError::Dirty {
            path: tree.to_path_buf(),
            what: (*m).to_string(),
        });
    }
    Ok(())
}

fn make(tree: &Path, build_dir: &Path) -> Command {
    let mut c = cmd::command("make");
    c.arg("-s")
        .arg("-C")
        .arg(tree)
        .arg(format!("O={}", build_dir.display()));
    c
}

/// Base config, then the fragments in order (a later fragment wins), then the kernel's
/// `make olddefconfig` in `build_dir` (out of tree), then a check that every fragment
/// symbol ended as requested. Dropped symbols are returned, not an error: callers decide.
pub fn assemble(
    tree: &Path,
    base: &Base,
    fragments: &[Fragment],
    build_dir: &Path,
    log: &dyn Fn(&str),
) -> Result<Assembled, SourceError> {
    check_tree(tree)?;
    std::fs::create_dir_all(build_dir).with_path(build_dir)?;
    let base_config = match base {
        Base::Defconfig => {
            log("make defconfig");
            cmd::run(make(tree, build_dir).arg("defconfig"))?;
            let p = build_dir.join(".config");
            KernelConfig::from_file(&p)
        }
        Base::File(p) => KernelConfig::from_file(p),
    }
    .map_err(|source| SourceError::Config {
        name: "base config".into(),
        source,
    })?;
    let requested = KernelConfig::merge(fragments.iter().map(|f| &f.config));
    let merged = KernelConfig::merge([&base_config, &requested]);
    let kconfig = build_dir.join("kimg.config");
    std::fs::write(&kconfig, merged.to_text()).with_path(&kconfig)?;
    log("make olddefconfig");
    cmd::run(
        make(tree, build_dir)
            .arg(format!("KCONFIG_CONFIG={}", kconfig.display()))
            .arg("olddefconfig"),
    )?;
    // The out-of-tree promise, checked rather than assumed.
    check_tree(tree)?;
    let text = std::fs::read_to_string(&kconfig).with_path(&kconfig)?;
    let config = KernelConfig::parse(&text).map_err(|source| SourceError::Config {
        name: kconfig.display().to_string(),
        source,
    })?;
    let misses = config::check(&config, &requested);
    let dropped = if misses.is_empty() {
        Vec::new()
    } else {
        let index = KconfigIndex::read(tree, "x86");
        misses
            .into_iter()
            .map(|m| explain(m, &index, &config))
            .collect()
    };
    Ok(Assembled {
        text,
        config,
        dropped,
    })
}

fn explain(m: ConfigMiss, index: &KconfigIndex, config: &KernelConfig) -> Dropped {
    Dropped {
        defined: index.defines(&m.symbol),
        unmet: index.unmet(&m.symbol, config),
        wanted: m.wanted.to_string(),
        found: match &m.found {
            None | Some(ConfigValue::No) => "n".into(),
            Some(v) => v.to_string(),
        },
        symbol: m.symbol,
    }
}

/// A kernel built from source, laid out like an unpacked kernel package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    /// `make kernelrelease`.
    pub release: String,
    /// `<dir>/boot/vmlinuz-<release>` (the bzImage).
    pub vmlinuz: PathBuf,
    /// `<dir>/boot/config-<release>`.
    pub config: PathBuf,
    /// `<dir>/lib/modules/<release>` (holds modules.builtin even without modules).
    pub modules_dir: PathBuf,
    /// True when the cache already had it.
    pub cached: bool,
    /// Number of compiler invocations seen (0 when cached).
    pub compiled: usize,
}

/// Builds `assembled` from `tree` into `<cache>/kernel-builds/<key>/`, where the key
/// hashes the kernel version and the config; an earlier build with the same key is
/// reused. `log` gets progress lines.
pub fn build(
    tree: &Path,
    assembled: &Assembled,
    jobs: usize,
    cache: &Path,
    log: &dyn Fn(&str),
) -> Result<Built, SourceError> {
    check_tree(tree)?;
    let version = cmd::run_stdout(
        cmd::command("make")
            .arg("-s")
            .arg("-C")
            .arg(tree)
            .arg("kernelversion"),
    )?
    .trim()
    .to_string();
    let key = kimg_util::hash::sha256(format!("{version}\n{}", assembled.text).as_bytes());
    let builds = cache.join("kernel-builds");
    let done = builds.join(&key[..16]);
    if let Ok(b) = find_built(&done) {
        log(&format!(
            "kernel {} cached in {}",
            b.release,
            done.display()
        ));
        return Ok(Built { cached: true, ..b });
    }
    let build_dir = builds.join(format!(".build-{}", &key[..16]));
    std::fs::create_dir_all(&build_dir).with_path(&build_dir)?;
    let dot_config = build_dir.join(".config");
    // An unchanged .config keeps its mtime, so an interrupted build resumes where it was.
    if std::fs::read_to_string(&dot_config).ok().as_deref() != Some(assembled.text.as_str()) {
        std::fs::write(&dot_config, &assembled.text).with_path(&dot_config)?;
    }
    cmd::run(make(tree, &build_dir).arg("olddefconfig"))?;
    let modules = assembled.config.get("CONFIG_MODULES") == Some(&ConfigValue::Yes);
    let mut targets = vec!["bzImage"];
    if modules {
        targets.push("modules");
    }
    log(&format!(
        "make -j{jobs} {} (kernel {version}, in {})",
        targets.join(" "),
        build_dir.display()
    ));
    let start = Instant::now();
    let mut compiled = 0usize;
    let mut c = cmd::command("make");
    c.arg("-C")
        .arg(tree)
        .arg(format!("O={}", build_dir.display()))
        .arg(format!("-j{}", jobs.max(1)))
        .args(&targets);
    cmd::run_lines(&mut c, &mut |line| {
        if let Some(file) = line.trim_start().strip_prefix("CC ") {
            compiled += 1;
            if compiled.is_multiple_of(250) {
                log(&format!(
                    "{compiled} files compiled, {:.0}s: {}",
                    start.elapsed().as_secs_f64(),
                    file.trim()
                ));
            }
        }
    })?;
    log(&format!(
        "compiled {compiled} files in {:.0}s",
        start.elapsed().as_secs_f64()
    ));
    let release = cmd::run_stdout(make(tree, &build_dir).arg("kernelrelease"))?
        .trim()
        .to_string();
    if release.is_empty() || release.contains('/') {
        return Err(SourceError::Layout {
            path: build_dir,
            reason: format!("bad kernelrelease {release:?}"),
        });
    }
    std::fs::create_dir_all(&builds).with_path(&builds)?;
    let stage = kimg_util::fs::work_dir(&builds, ".stage-")?;
    let boot = stage.path().join("boot");
    std::fs::create_dir_all(&boot).with_path(&boot)?;
    let bz = build_dir.join("arch/x86/boot/bzImage");
    let vmlinuz = boot.join(format!("vmlinuz-{release}"));
    std::fs::copy(&bz, &vmlinuz).with_path(&bz)?;
    let cfg = boot.join(format!("config-{release}"));
    std::fs::write(&cfg, &assembled.text).with_path(&cfg)?;
    if modules {
        log("make modules_install");
        let mut c = make(tree, &build_dir);
        c.arg(format!("INSTALL_MOD_PATH={}", stage.path().display()))
            .arg("INSTALL_MOD_STRIP=1");
        if !cmd::exists("depmod") {
            // kimg reads module dependencies itself; depmod's files are optional.
            c.arg("DEPMOD=true");
        }
        cmd::run(c.arg("modules_install"))?;
    }
    let mods = stage.path().join("lib/modules").join(&release);
    std::fs::create_dir_all(&mods).with_path(&mods)?;
    let builtin = mods.join("modules.builtin");
    if !builtin.exists() {
        let src = build_dir.join("modules.builtin");
        let text = std::fs::read_to_string(&src).unwrap_or_default();
        std::fs::write(&builtin, text).with_path(&builtin)?;
    }
    // The tree's build symlink would point into the build dir, which is removed.
    let _ = std::fs::remove_file(mods.join("build"));
    let _ = std::fs::remove_file(mods.join("source"));
    let stage = stage.keep();
    if let Err(e) = std::fs::rename(&stage, &done) {
        let _ = std::fs::remove_dir_all(&stage);
        if !done.is_dir() {
            return Err(io_err(&done)(e));
        }
    }
    // The object tree is ~1-2 GB; the installed kernel is all kimg needs.
    let _ = std::fs::remove_dir_all(&build_dir);
    let b = find_built(&done)?;
    log(&format!("kernel {} in {}", b.release, b.vmlinuz.display()));
    Ok(Built {
        cached: false,
        compiled,
        ..b
    })
}

/// [`assemble`] (in a scratch build dir) then [`build`]: the whole "kernel from this
/// tree with these fragments" step; dropped symbols are an error.
pub fn assemble_and_build(
    tree: &Path,
    base: &Base,
    fragments: &[Fragment],
    jobs: usize,
    cache: &Path,
    log: &dyn Fn(&str),
) -> Result<Built, SourceError> {
    let scratch = tempfile::Builder::new()
        .prefix("kimg-kconfig-")
        .tempdir()
        .with_path(std::env::temp_dir())?;
    let assembled = assemble(tree, base, fragments, scratch.path(), log)?;
    if !assembled.dropped.is_empty() {
        return Err(SourceError::Dropped {
            dropped: assembled.dropped,
        });
    }
    build(tree, &assembled, jobs, cache, log)
}

/// The number of CPUs, the default for `-j`.
pub fn default_jobs() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// A finished build directory: `boot/vmlinuz-R`, `boot/config-R`, `lib/modules/R`.
fn find_built(dir: &Path) -> Result<Built, SourceError> {
    let boot = dir.join("boot");
    let release = std::fs::read_dir(&boot)
        .with_path(&boot)?
        .filter_map(Result::ok)
        .find_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .map(str::to_string)
        })
        .ok_or_else(|| SourceError::Layout {
            path: boot.clone(),
            reason: "no vmlinuz-*".into(),
        })?;
    let modules_dir = dir.join("lib/modules").join(&release);
    if !modules_dir.is_dir() {
        return Err(SourceError::Layout {
            path: modules_dir,
            reason: "missing".into(),
        });
    }
    Ok(Built {
        vmlinuz: boot.join(format!("vmlinuz-{release}")),
        config: boot.join(format!("config-{release}")),
        modules_dir,
        release,
        cached: true,
        compiled: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_symbols_read_well() {
        let d = Dropped {
            symbol: "CONFIG_IP_VS_RR".into(),
            wanted: "m or y".into(),
            found: "n".into(),
            defined: true,
            unmet: vec![UnmetDependency {
                expr: "IP_VS".into(),
                at: "net/netfilter/ipvs/Kconfig:230".into(),
                off: vec!["CONFIG_IP_VS".into()],
            }],
        };
        assert_eq!(
            d.to_string(),
            "CONFIG_IP_VS_RR: requested m or y, got n; depends on IP_VS \
             (net/netfilter/ipvs/Kconfig:230), off: CONFIG_IP_VS"
        );
        let d = Dropped {
            defined: false,
            unmet: vec![],
            ..d
        };
        assert!(d
            .to_string()
            .ends_with("(no Kconfig file of this tree defines it)"));
    }

    #[test]
    fn not_a_tree_and_dirty_tree_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let msg = check_tree(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("kimg kernel source"), "{msg}");
        std::fs::write(dir.path().join("Makefile"), "").unwrap();
        std::fs::write(dir.path().join("Kconfig"), "").unwrap();
        check_tree(dir.path()).unwrap();
        std::fs::write(dir.path().join(".config"), "").unwrap();
        let msg = check_tree(dir.path()).unwrap_err().to_string();
        assert!(
            msg.contains("make mrproper") && msg.contains(".config"),
            "{msg}"
        );
    }

    /// Against Debian's real linux-source tree (fetched into kimg's cache once, ~20 s
    /// to unpack): base + k8s on defconfig all survive Kconfig, the tree stays clean,
    /// and a symbol whose dependency is off is reported with that dependency.
    #[test]
    fn real_tree_assemble() {
        for p in ["apt-get", "make", "gcc", "flex", "bison"] {
            if !cmd::exists(p) {
                eprintln!("skipping: {p} not installed (scripts/setup-host)");
                return;
            }
        }
        let t = Instant::now();
        let tree = fetch(&kimg_util::cache::cache_dir(), &|l| eprintln!("{l}")).unwrap();
        eprintln!("source tree {} ready in {:?}", tree.display(), t.elapsed());
        let work = tempfile::tempdir().unwrap();

        let t = Instant::now();
        let fragments = Fragment::embedded(kimg_contract::Flavour::K8s).unwrap();
        let a = assemble(
            &tree,
            &Base::Defconfig,
            &fragments,
            &work.path().join("a"),
            &|_| {},
        )
        .unwrap();
        eprintln!("defconfig + base + k8s assembled in {:?}", t.elapsed());
        assert!(a.dropped.is_empty(), "{:#?}", a.dropped);
        for f in &fragments {
            assert!(config::check(&a.config, &f.config).is_empty(), "{}", f.name);
        }
        // defconfig alone has no IPVS; the fragments turned it on.
        assert_eq!(a.config.get("CONFIG_IP_VS_RR"), Some(&ConfigValue::Module));
        for m in TREE_MARKERS {
            assert!(!tree.join(m).exists(), "{m} appeared in the source tree");
        }

        // A later fragment switches IP_VS off again (last wins across fragments); the
        // scheduler then cannot stay: reported with the `if IP_VS` it sits under.
        let off = Fragment {
            name: "off.config".into(),
            config: KernelConfig::parse(
                "# CONFIG_IP_VS is not set\nCONFIG_KIMG_NO_SUCH_SYMBOL=y\n",
            )
            .unwrap(),
        };
        let mut with_off = fragments.clone();
        with_off.push(off);
        let b = assemble(
            &tree,
            &Base::Defconfig,
            &with_off,
            &work.path().join("b"),
            &|_| {},
        )
        .unwrap();
        let text: Vec<String> = b.dropped.iter().map(ToString::to_string).collect();
        eprintln!("{text:#?}");
        let rr = b
            .dropped
            .iter()
            .find(|d| d.symbol == "CONFIG_IP_VS_RR")
            .unwrap_or_else(|| panic!("{text:#?}"));
        assert_eq!((rr.wanted.as_str(), rr.found.as_str()), ("m or y", "n"));
        assert!(
            rr.unmet
                .iter()
                .any(|u| u.expr == "IP_VS" && u.off == ["CONFIG_IP_VS"]),
            "{rr:#?}"
        );
        let unknown = b
            .dropped
            .iter()
            .find(|d| d.symbol == "CONFIG_KIMG_NO_SUCH_SYMBOL")
            .unwrap();
        assert!(!unknown.defined);
        // CONFIG_IP_VS itself was asked off by the last fragment and is off: not dropped.
        assert!(!b.dropped.iter().any(|d| d.symbol == "CONFIG_IP_VS"));
        for m in TREE_MARKERS {
            assert!(!tree.join(m).exists(), "{m} appeared in the source tree");
        }
    }

    /// The full kernel build (tens of minutes on 2 cores): opt-in with
    /// `cargo test --release -p kimg -- --ignored full_kernel_build`. Builds into a
    /// scratch cache, then checks the cache hit and the installed layout.
    #[test]
    #[ignore]
    fn full_kernel_build() {
        let tree = fetch(&kimg_util::cache::cache_dir(), &|l| eprintln!("{l}")).unwrap();
        let cache = tempfile::tempdir().unwrap();
        let fragments = Fragment::embedded(kimg_contract::Flavour::K8s).unwrap();
        let log = |l: &str| eprintln!("{l}");
        let b = assemble_and_build(
            &tree,
            &Base::Defconfig,
            &fragments,
            default_jobs(),
            cache.path(),
            &log,
        )
        .unwrap();
        assert!(!b.cached && b.compiled > 1000);
        let bz = std::fs::read(&b.vmlinuz).unwrap();
        // bzImage: "HdrS" boot protocol magic at 0x202, and a PE "MZ" for the EFI stub.
        assert_eq!(&bz[0x202..0x206], b"HdrS");
        assert_eq!(&bz[..2], b"MZ");
        let builtin = std::fs::read_to_string(b.modules_dir.join("modules.builtin")).unwrap();
        assert!(
            builtin.contains("virtio_blk.ko"),
            "stage 1 needs are built in"
        );
        let index = crate::modules::ModuleIndex::scan(&b.modules_dir).unwrap();
        assert!(index
            .closure(crate::modules::STAGE1_MODULES)
            .unwrap()
            .is_empty());
        assert!(index.get("ip_vs_rr").is_some(), "k8s modules are modules");
        let again =
            assemble_and_build(&tree, &Base::Defconfig, &fragments, 1, cache.path(), &log).unwrap();
        assert!(again.cached);
        assert_eq!(again.vmlinuz, b.vmlinuz);
    }
}
