//! `kimg mkcdrom`: write an overlay cdrom.

use anyhow::Context;
use kimg_image::overlay;
use std::path::PathBuf;
use std::process::ExitCode;

/// Write an ISO9660 cdrom (Rock Ridge, label `kimg`) holding overlays as
/// `NN-NAME.tar[.zst]` files, which kimg-init unpacks onto / at boot in name order.
///
/// An OVERLAY is a name looked up on the search path (--ovlpath dirs, then
/// $KIMG_OVLPATH, then kimg's built-in overlays/): a folder with overlay.toml
/// (`description`, `requires = [..]`) and a root/ tree, or a folder with an executable
/// `tar` script (xcluster style: it writes the archive to the file named by its
/// argument). Or a path to a ready archive: .tar, .tar.gz, .tar.xz, .tar.zst.
/// Or `deb:PKG[,PKG...]`: Debian packages from this host's apt (`apt-get download`,
/// sha256-checked, cached in ~/.cache/kimg) with the shared libraries the image lacks;
/// their maintainer scripts are not run. Overlays come in command-line order, each
/// `requires` before its dependants. With SOURCE_DATE_EPOCH set, the same inputs give
/// the same bytes.
///
///   kimg mkcdrom --out /tmp/c.iso test ./extra.tar.zst deb:tcpdump,iperf3
#[derive(clap::Args)]
pub struct Args {
    /// The ISO to write (replaced atomically; nothing is left on failure).
    #[arg(long)]
    pub out: PathBuf,
    /// Extra overlay directories, searched first (repeatable).
    #[arg(long = "ovlpath", value_name = "DIR")]
    pub ovlpath: Vec<PathBuf>,
    /// Print the cdrom's files as JSON.
    #[arg(long)]
    pub json: bool,
    /// Overlay names, archive paths or deb:PKG[,PKG...].
    #[arg(required = true)]
    pub overlays: Vec<String>,
}

/// Runs `kimg mkcdrom`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let path = overlay::search_path(&a.ovlpath).context("kimg mkcdrom")?;
    let ovs = overlay::resolve(&a.overlays, &path).context("kimg mkcdrom")?;
    let img = overlay::mkcdrom(&a.out, &ovs)
        .with_context(|| format!("kimg mkcdrom --out {}", a.out.display()))?;
    if a.json {
        let files: Vec<_> = img
            .entries
            .iter()
            .map(|e| serde_json::json!({"name": e.name, "size": e.size, "sha256": e.sha256}))
            .collect();
        let v = serde_json::json!({"out": a.out, "sha256": img.sha256, "size": img.size, "files": files});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for e in &img.entries {
            eprintln!("kimg mkcdrom: {} ({} bytes)", e.name, e.size);
        }
        eprintln!(
            "kimg mkcdrom: wrote {} ({} bytes); boot it with `kimg run --cdrom {}`",
            a.out.display(),
            img.size,
            a.out.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
