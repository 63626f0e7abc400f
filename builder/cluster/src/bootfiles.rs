//! The kernel and initramfs of a direct boot, read out of the image's ESP once and
//! kept in the cache under the manifest's sha256s.

use crate::error::ClusterError;
use kimg_contract::manifest::Manifest;
use kimg_util::fs::{IoError, PathContext};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The kernel and initramfs for direct boot, read out of the image's ESP once and
/// kept in the cache under their sha256s from the manifest (reading the ESP costs
/// about a quarter of a second, every `kimg run`). An image whose manifest lacks the
/// digests gets them extracted into the cluster dir instead.
pub fn boot_files(
    image: &Path,
    manifest: &Manifest,
    dir: &Path,
) -> Result<Vec<PathBuf>, ClusterError> {
    let esp = [
        manifest.kernel.esp_kernel.as_str(),
        manifest.kernel.esp_initrd.as_str(),
    ];
    let digest = |name: &str| manifest.component(name).map(|c| c.sha256.clone());
    let (Some(k), Some(i)) = (digest("kernel"), digest("initramfs")) else {
        let boot = dir.join("boot");
        return Ok(kimg_formats::disk::extract_esp_files(image, &esp, &boot)?);
    };
    let short = |h: &str| h.chars().take(16).collect::<String>();
    let cached =
        kimg_util::cache::cache_dir()
            .join("boot")
            .join(format!("{}-{}", short(&k), short(&i)));
    let names: Vec<PathBuf> = esp
        .iter()
        .map(|p| cached.join(Path::new(p).file_name().unwrap_or_default()))
        .collect();
    if names.iter().all(|n| n.is_file()) {
        return Ok(names);
    }
    let parent = cached.parent().unwrap_or(dir);
    fs::create_dir_all(parent).with_path(parent)?;
    let tmp = kimg_util::fs::work_dir(parent, ".boot-")?;
    let got = kimg_formats::disk::extract_esp_files(image, &esp, tmp.path())?;
    for (file, want) in got.iter().zip([&k, &i]) {
        let (sha, _) = kimg_util::hash::file_sha256(file).with_path(file)?;
        if &sha != want {
            return Err(ClusterError::Image {
                path: image.to_path_buf(),
                why: format!(
                    "{} on its ESP does not match the manifest's sha256",
                    file.display()
                ),
            });
        }
    }
    // Another kimg may have won the race: its copy is as good as ours.
    if fs::rename(tmp.path(), &cached).is_err() && !names.iter().all(|n| n.is_file()) {
        return Err(IoError::new(
            cached,
            io::Error::other("could not place the extracted boot files"),
        )
        .into());
    }
    Ok(names)
}
