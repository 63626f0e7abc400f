//! `kimg kernel`: check a kernel config, assemble one from fragments, build a kernel
//! from source, fetch Debian's source tree.

use anyhow::Context;
use kimg_contract::Flavour;
use kimg_kernel::config::{self, KernelConfig};
use kimg_kernel::source::{self, Base, Fragment};
use std::path::PathBuf;
use std::process::ExitCode;

/// Kernel configs and kernels from source.
///
/// kimg keeps small requirement fragments (kernel-configs/base.config, k8s.config;
/// embedded in kimg) instead of whole .config files, and proves what came out:
///
///   kimg kernel check --config /boot/config-$(uname -r) --k8s
///   kimg kernel source                       # Debian's linux-source tree, cached
///   kimg kernel config --source DIR --k8s --out k8s.config
///   kimg kernel build --source DIR --k8s     # bzImage + modules, cached by config
///   kimg build --kernel-source DIR --k8s     # an image with that kernel
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    #[command(subcommand)]
    command: Sub,
}

#[derive(clap::Subcommand)]
enum Sub {
    Check(CheckArgs),
    Config(ConfigArgs),
    Build(BuildArgs),
    Source(SourceArgs),
}

/// Check a kernel config against kimg's fragments.
///
/// Reads /boot/config-*, /proc/config.gz or a .config. Lists every symbol that is missing or has the wrong value and exits 1 if
/// there is any. `=y` in a fragment accepts y or m, unless its line ends in
/// `# kimg: builtin` (then only y).
#[derive(clap::Args)]
struct CheckArgs {
    /// The config to check (plain or gzip).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Also check the Kubernetes fragment (k8s.config).
    #[arg(long)]
    k8s: bool,
    /// Also check these fragment files, in this order.
    #[arg(long, value_name = "FILE")]
    fragment: Vec<PathBuf>,
    /// Print the misses as JSON.
    #[arg(long)]
    json: bool,
}

/// Assemble a kernel config with the kernel's own Kconfig, and verify it.
///
/// The base config, then
/// base.config (and k8s.config), then each --fragment in order (a later one wins),
/// then `make olddefconfig` in a scratch build directory (the source tree is not
/// written to). Then every fragment symbol is checked: one that Kconfig dropped is
/// listed with what was asked, what came out and the `depends on` that is off; the
/// exit code is then 1 and OUT is not written.
#[derive(clap::Args)]
struct ConfigArgs {
    #[command(flatten)]
    assemble: AssembleArgs,
    /// Where to write the config.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Print the dropped symbols as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct AssembleArgs {
    /// The kernel source tree (`kimg kernel source` fetches Debian's).
    #[arg(long, value_name = "DIR")]
    source: PathBuf,
    /// Add the Kubernetes fragment (k8s.config) after base.config.
    #[arg(long)]
    k8s: bool,
    /// Start from `defconfig` or from a full config FILE.
    #[arg(long, value_name = "defconfig|FILE", default_value = "defconfig")]
    base: String,
    /// More fragment files, applied after kimg's in this order.
    #[arg(long, value_name = "FILE")]
    fragment: Vec<PathBuf>,
}

impl AssembleArgs {
    fn base(&self) -> Base {
        if self.base == "defconfig" {
            Base::Defconfig
        } else {
            Base::File(PathBuf::from(&self.base))
        }
    }

    fn fragments(&self) -> anyhow::Result<Vec<Fragment>> {
        let mut v = Fragment::embedded(flavour(self.k8s))?;
        for f in &self.fragment {
            v.push(Fragment::from_file(f)?);
        }
        Ok(v)
    }
}

/// Build a kernel from source (bzImage + modules, cached).
///
/// Assembles the config as `kimg kernel config` does (any
/// dropped symbol stops here), then `make bzImage modules` out of tree and
/// `modules_install`. The result is cached in kimg's cache by (kernel version, config
/// hash): a second run with the same inputs returns at once. Prints where the kernel is.
#[derive(clap::Args)]
struct BuildArgs {
    #[command(flatten)]
    assemble: AssembleArgs,
    /// Parallel compile jobs [default: number of CPUs].
    #[arg(short = 'j', long, value_name = "N")]
    jobs: Option<usize>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// Fetch Debian's kernel source tree into kimg's cache.
///
/// apt-get download linux-source-6.1 (~140 MB), unpacked once (~1.5 GB, ~20 s);
/// prints the tree's path.
#[derive(clap::Args)]
struct SourceArgs {}

/// Runs `kimg kernel`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    match a.command {
        Sub::Check(a) => check(a),
        Sub::Config(a) => config_cmd(a),
        Sub::Build(a) => build(a),
        Sub::Source(_) => {
            let tree = source::fetch(&kimg_util::cache::cache_dir(), &log)?;
            println!("{}", tree.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn log(line: &str) {
    eprintln!("kimg kernel: {line}");
}

fn check(a: CheckArgs) -> anyhow::Result<ExitCode> {
    let cfg = KernelConfig::from_file(&a.config)?;
    let mut fragments: Vec<(String, KernelConfig)> = Vec::new();
    for (name, text) in config::builtin_fragments(flavour(a.k8s)) {
        fragments.push((name.into(), KernelConfig::parse(text)?));
    }
    for f in &a.fragment {
        fragments.push((f.display().to_string(), KernelConfig::from_file(f)?));
    }
    let mut report = Vec::new();
    let mut total = 0;
    for (name, frag) in &fragments {
        let misses = config::check(&cfg, frag);
        total += misses.len();
        report.push(serde_json::json!({
            "fragment": name,
            "symbols": frag.symbols.len(),
            "misses": misses.iter().map(|m| serde_json::json!({
                "symbol": m.symbol,
                "wanted": m.wanted.to_string(),
                "found": m.found.as_ref().map(ToString::to_string),
            })).collect::<Vec<_>>(),
        }));
        if !a.json {
            if misses.is_empty() {
                println!("{name}: all {} symbols ok", frag.symbols.len());
            } else {
                println!(
                    "{name}: {} of {} symbols missing or wrong:",
                    misses.len(),
                    frag.symbols.len()
                );
                for m in &misses {
                    println!("  {m}");
                }
            }
        }
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "config": a.config,
                "ok": total == 0,
                "fragments": report,
            }))?
        );
    }
    Ok(if total == 0 {
        ExitCode::SUCCESS
    } else {
        if !a.json {
            eprintln!(
                "kimg: {} does not meet kimg's requirements ({total} miss(es)); build a kernel with `kimg kernel build`",
                a.config.display()
            );
        }
        ExitCode::from(super::EXIT_FAILURE)
    })
}

fn config_cmd(a: ConfigArgs) -> anyhow::Result<ExitCode> {
    let scratch = tempfile::Builder::new().prefix("kimg-kconfig-").tempdir()?;
    let assembled = source::assemble(
        &a.assemble.source,
        &a.assemble.base(),
        &a.assemble.fragments()?,
        scratch.path(),
        &log,
    )?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "out": (assembled.dropped.is_empty()).then_some(&a.out),
                "dropped": assembled.dropped,
            }))?
        );
    }
    if !assembled.dropped.is_empty() {
        if !a.json {
            eprintln!(
                "kimg: {} fragment symbol(s) did not survive `make olddefconfig`; {} not written:",
                assembled.dropped.len(),
                a.out.display()
            );
            for d in &assembled.dropped {
                eprintln!("  {d}");
            }
        }
        return Ok(ExitCode::from(super::EXIT_FAILURE));
    }
    kimg_util::fs::write_atomic(&a.out, assembled.text.as_bytes())?;
    if !a.json {
        println!(
            "{} ({} symbols; every fragment symbol as requested)",
            a.out.display(),
            assembled.config.symbols.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn build(a: BuildArgs) -> anyhow::Result<ExitCode> {
    let built = source::assemble_and_build(
        &a.assemble.source,
        &a.assemble.base(),
        &a.assemble.fragments()?,
        a.jobs.unwrap_or_else(source::default_jobs),
        &kimg_util::cache::cache_dir(),
        &log,
    )
    .context("kimg kernel build failed")?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "release": built.release,
                "kernel": built.vmlinuz,
                "modules": built.modules_dir,
                "config": built.config,
                "cached": built.cached,
            }))?
        );
    } else {
        println!("kernel   {}", built.vmlinuz.display());
        println!("modules  {}", built.modules_dir.display());
        println!("config   {}", built.config.display());
        println!(
            "use it:  kimg build --kernel {} --modules {}",
            built.vmlinuz.display(),
            built.modules_dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The flavour `--k8s` selects.
pub fn flavour(k8s: bool) -> Flavour {
    if k8s {
        Flavour::K8s
    } else {
        Flavour::Base
    }
}
