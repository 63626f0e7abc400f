//! `kimg fetch`: arguments, progress bars and summary.

use kimg_image::fetch::{self, FetchOptions};
use std::cell::RefCell;
use std::process::ExitCode;

/// Fetch a published image into the image cache, verified.
///
/// SRC is a path or an http(s) URL of NAME.img.xz or NAME.img.zst (from `kimg
/// publish`); NAME.json must be beside it. The sha256 comes from --sha256 or from
/// SRC.sha256; a mismatch is an error and caches nothing. An interrupted download
/// resumes where it stopped when run again (if the server supports ranges). Then
/// `kimg images` lists what is cached and `kimg run --image NAME` boots it.
#[derive(clap::Args)]
pub struct Args {
    /// Path or http(s) URL of NAME.img.xz / NAME.img.zst.
    src: String,
    /// Expected sha256 of SRC (default: read SRC.sha256).
    #[arg(long, value_name = "HEX")]
    sha256: Option<String>,
    /// Name in the cache (default: NAME from SRC).
    #[arg(long)]
    name: Option<String>,
    /// Print the cached image as JSON.
    #[arg(long)]
    json: bool,
}

/// One progress bar per step (`download`, `verify`) of a download, each finished
/// when the next starts; hidden when stderr is no terminal.
#[derive(Default)]
pub struct StepBars(RefCell<Option<(&'static str, indicatif::ProgressBar)>>);

impl StepBars {
    /// Shows `done` of `total` bytes for `step`.
    pub fn update(&self, step: &'static str, done: u64, total: Option<u64>) {
        let mut b = self.0.borrow_mut();
        if b.as_ref().map(|(s, _)| *s) != Some(step) {
            if let Some((_, old)) = b.take() {
                old.finish();
            }
            *b = Some((step, super::publish::bar(total, step)));
        }
        if let Some((_, pb)) = b.as_ref() {
            pb.set_position(done);
        }
    }

    /// Finishes the last bar.
    pub fn finish(&self) {
        if let Some((_, pb)) = self.0.borrow_mut().take() {
            pb.finish();
        }
    }
}

/// Runs `kimg fetch`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let bars = StepBars::default();
    let got = fetch::fetch(
        &FetchOptions {
            src: a.src,
            sha256: a.sha256,
            name: a.name,
            cache: kimg_util::cache::cache_dir(),
        },
        &|step, done, total| bars.update(step, done, total),
    )?;
    bars.finish();
    for note in &got.notes {
        eprintln!("kimg fetch: note: {note}");
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&got)?);
    } else {
        eprintln!(
            "kimg fetch: {} verified (sha256 {}), cached as {:?}: {}\n  boot it: kimg run --image {}",
            got.source,
            got.sha256,
            got.name,
            got.path.display(),
            got.name
        );
    }
    Ok(ExitCode::SUCCESS)
}
