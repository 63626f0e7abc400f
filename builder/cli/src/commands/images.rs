//! `kimg images`: the image cache.

use kimg_image::fetch;
use std::process::ExitCode;

/// List the images `kimg fetch` put in the cache (use one with `kimg run --image NAME`).
#[derive(clap::Args)]
pub struct Args {
    /// Print the list as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `kimg images`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let images = fetch::list(&kimg_util::cache::cache_dir())?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&images)?);
        return Ok(ExitCode::SUCCESS);
    }
    if images.is_empty() {
        eprintln!("kimg images: the cache is empty; add one with `kimg fetch URL`");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<16} {:>10}  {:<16} {:<24} FETCHED (UTC)",
        "NAME", "SIZE", "SHA256", "KERNEL"
    );
    for i in images {
        println!(
            "{:<16} {:>9}M  {:<16} {:<24} {}",
            i.name,
            i.size >> 20,
            &i.sha256[..i.sha256.len().min(16)],
            i.kernel,
            fetch::utc_date(i.fetched)
        );
    }
    Ok(ExitCode::SUCCESS)
}
