//! `kimg bench publish`: publishing and fetching figures (the publish issue).
//!
//! - publish: `kimg publish` (liblzma, multi-threaded, level 6) next to `xz -T0 -6`
//!   on the same image, in the same run: size ratio (goal <= 1.0) and time ratio
//!   (goal < 1.0);
//! - fetch: `kimg fetch` of the local `.xz` just published, throughput in MB/s of
//!   the archive and of the image, verification (sha256) included.

use super::BenchError;
use kimg_image::fetch::{self, FetchOptions};
use kimg_image::publish::{self, Codec, PublishOptions};
use kimg_util::cmd;
use kimg_util::fs::PathContext;
use serde::Serialize;
use std::fs::File;
use std::path::PathBuf;
use std::time::Instant;

/// Inputs of `kimg bench publish`.
#[derive(Debug, Clone)]
pub struct PublishBenchOptions {
    /// The image (with its manifest beside it).
    pub image: PathBuf,
    /// Scratch directory.
    pub scratch: PathBuf,
}

/// Results of one run.
#[derive(Debug, Serialize)]
pub struct PublishBenchReport {
    /// The image's size in bytes.
    pub image_bytes: u64,
    /// `kimg publish` archive size.
    pub kimg_bytes: u64,
    /// `kimg publish` wall seconds.
    pub kimg_secs: f64,
    /// `xz -T0 -6` archive size.
    pub xz_bytes: u64,
    /// `xz -T0 -6` wall seconds.
    pub xz_secs: f64,
    /// kimg size / xz size (goal <= 1.0).
    pub size_ratio: f64,
    /// kimg time / xz time (goal < 1.0).
    pub time_ratio: f64,
    /// `kimg fetch` of the local .xz, wall seconds (verify + decompress + cache).
    pub fetch_secs: f64,
    /// Archive MB/s of the fetch.
    pub fetch_archive_mb_s: f64,
    /// Image MB/s of the fetch.
    pub fetch_image_mb_s: f64,
}

/// Runs the benchmark.
pub fn run(
    opts: &PublishBenchOptions,
    log: &dyn Fn(&str),
) -> Result<PublishBenchReport, BenchError> {
    log("xz -T0 -6 ...");
    let xz_out = opts.scratch.join("xz.img.xz");
    let out = File::create(&xz_out).with_path(&xz_out)?;
    let t = Instant::now();
    cmd::run(
        cmd::command("xz")
            .args(["-T0", "-6", "-c"])
            .arg(&opts.image)
            .stdout(out),
    )?;
    let xz_secs = t.elapsed().as_secs_f64();
    let xz_bytes = std::fs::metadata(&xz_out).with_path(&xz_out)?.len();

    log("kimg publish ...");
    let p = publish::publish(
        &PublishOptions {
            image: opts.image.clone(),
            out_dir: opts.scratch.join("pub"),
            level: 6,
            threads: publish::default_threads(),
            codec: Codec::Xz,
        },
        &|_, _| {},
    )?;

    log("kimg fetch ...");
    let t = Instant::now();
    let got = fetch::fetch(
        &FetchOptions {
            src: p.archive.display().to_string(),
            sha256: None,
            name: Some("bench".into()),
            cache: opts.scratch.join("cache"),
        },
        &|_, _, _| {},
    )?;
    let fetch_secs = t.elapsed().as_secs_f64().max(1e-9);
    Ok(PublishBenchReport {
        image_bytes: p.input_size,
        kimg_bytes: p.output_size,
        kimg_secs: p.secs,
        xz_bytes,
        xz_secs,
        size_ratio: p.output_size as f64 / xz_bytes.max(1) as f64,
        time_ratio: p.secs / xz_secs.max(1e-9),
        fetch_secs,
        fetch_archive_mb_s: p.output_size as f64 / 1e6 / fetch_secs,
        fetch_image_mb_s: got.size as f64 / 1e6 / fetch_secs,
    })
}
