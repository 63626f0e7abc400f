//! `kimg publish`: arguments, progress bar and summary.

use kimg_image::publish::{self, Codec, PublishOptions};
use std::path::PathBuf;
use std::process::ExitCode;

/// Publish an image: NAME.img.xz, NAME.img.xz.sha256 (sha256sum format) and NAME.json.
///
/// The archive holds the qcow2 exactly as `kimg build` wrote it (unused disk space is
/// not stored at all), so `xz -d < hd.img.xz > hd.img` gives a file that QEMU boots
/// and `kimg run --image` uses. Users check it with `sha256sum -c hd.img.xz.sha256`
/// or let `kimg fetch URL` do it. Everything is written under temporary names first;
/// the .sha256 appears last, so an interrupted publish never looks finished.
#[derive(clap::Args)]
pub struct Args {
    /// The image built by `kimg build` (its NAME.json must be beside it).
    #[arg(default_value = "out/hd.img")]
    image: PathBuf,
    /// Output directory.
    #[arg(long, default_value = "out/publish")]
    out: PathBuf,
    /// Compression level: xz 0-9 (default 6), zstd 1-19 (default 19).
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=19))]
    level: Option<u32>,
    /// Compression threads (default: every core).
    #[arg(long)]
    threads: Option<u32>,
    /// Write NAME.img.zst (zstd) instead of NAME.img.xz.
    #[arg(long)]
    zstd: bool,
    /// Print what was written as JSON.
    #[arg(long)]
    json: bool,
}

/// A byte progress bar with throughput on stderr (hidden when stderr is no terminal).
pub fn bar(total: Option<u64>, what: &str) -> indicatif::ProgressBar {
    let pb = match total {
        Some(t) => indicatif::ProgressBar::new(t),
        None => indicatif::ProgressBar::no_length(),
    };
    let template = format!(
        "{what:<8} {{bar:30}} {{bytes}}/{{total_bytes}} {{binary_bytes_per_sec}} eta {{eta}}"
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(&template) {
        pb.set_style(style);
    }
    pb
}

/// Runs `kimg publish`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let codec = if a.zstd { Codec::Zstd } else { Codec::Xz };
    let level = a.level.unwrap_or(match codec {
        Codec::Xz => 6,
        Codec::Zstd => 19,
    });
    if codec == Codec::Xz && level > 9 {
        anyhow::bail!("--level {level}: xz levels are 0-9 (zstd's go to 19 with --zstd)");
    }
    let pb = bar(None, "publish");
    let set = std::sync::Once::new();
    let p = publish::publish(
        &PublishOptions {
            image: a.image.clone(),
            out_dir: a.out,
            level,
            threads: a.threads.unwrap_or_else(publish::default_threads),
            codec,
        },
        &|done, total| {
            set.call_once(|| pb.set_length(total));
            pb.set_position(done);
        },
    )?;
    pb.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
    } else {
        eprintln!(
            "kimg publish: {} ({} -> {} bytes, {:.1} MB/s)\n  {}\n  {}",
            p.archive.display(),
            p.input_size,
            p.output_size,
            p.input_size as f64 / 1e6 / p.secs.max(1e-9),
            p.sha256_file.display(),
            p.manifest.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
