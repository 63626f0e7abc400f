//! `kimg publish`: an image as `NAME.img.xz` (or `.img.zst`), its `.sha256` and `NAME.json`.
//!
//! The published image is the qcow2 exactly as `kimg build` wrote it: qcow2 stores
//! only allocated clusters, so the disk's unused space costs nothing before
//! compression, `xz -d` restores a file QEMU boots as is (`format=qcow2`), `kimg run`
//! layers over it unchanged, and its sha256 is the one reproducible builds compare.
//! Every output is written under a temporary name and renamed; the `.sha256` is
//! renamed last, so a run killed midway never leaves a checksummed (finished-looking)
//! archive behind.

use kimg_contract::manifest::Manifest;
use kimg_util::fs::{IoError, PathContext};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Errors of `kimg publish`.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// The image's manifest is missing or not a kimg manifest.
    #[error("{}: {why} (publish images made by `kimg build`, with NAME.json beside NAME.img)", path.display())]
    Manifest {
        /// The manifest path.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The encoder could not be set up.
    #[error("xz encoder: {0}")]
    Encoder(String),
}

/// How the image is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// xz (liblzma's multi-threaded encoder), `.img.xz`.
    Xz,
    /// zstd (multi-threaded), `.img.zst`.
    Zstd,
}

impl Codec {
    /// File suffix after `NAME`.
    pub fn suffix(self) -> &'static str {
        match self {
            Codec::Xz => ".img.xz",
            Codec::Zstd => ".img.zst",
        }
    }
}

/// Inputs of `kimg publish`.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// The qcow2 image (`NAME.img`, manifest `NAME.json` beside it).
    pub image: PathBuf,
    /// Output directory.
    pub out_dir: PathBuf,
    /// Compression level (xz 0-9, zstd 1-19).
    pub level: u32,
    /// Encoder threads.
    pub threads: u32,
    /// Codec.
    pub codec: Codec,
}

/// What `kimg publish` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Published {
    /// The compressed image.
    pub archive: PathBuf,
    /// Its `sha256sum` file.
    pub sha256_file: PathBuf,
    /// The manifest.
    pub manifest: PathBuf,
    /// sha256 of the compressed image.
    pub sha256: String,
    /// Bytes read (the qcow2).
    pub input_size: u64,
    /// Bytes written (the archive).
    pub output_size: u64,
    /// Wall time of the compression in seconds.
    pub secs: f64,
}

/// Default encoder threads: every core.
pub fn default_threads() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

/// The image's name: `out/hd.img` -> `hd`.
pub fn image_name(image: &Path) -> String {
    let file = image
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    file.strip_suffix(".img")
        .or_else(|| file.strip_suffix(".qcow2"))
        .unwrap_or(&file)
        .to_string()
}

/// Reads the manifest beside `image` (`NAME.img` -> `NAME.json`).
pub fn read_manifest(image: &Path) -> Result<Manifest, PublishError> {
    let path = image.with_extension("json");
    let text = fs::read_to_string(&path).map_err(|e| PublishError::Manifest {
        path: path.clone(),
        why: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| PublishError::Manifest {
        path,
        why: e.to_string(),
    })
}

/// A writer that hashes and counts what passes through it.
struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
    count: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Compresses `input` into `out` with `codec`; `progress` gets the bytes read so far.
/// Returns the sha256 and size of what was written.
pub fn compress(
    input: &Path,
    out: &Path,
    codec: Codec,
    level: u32,
    threads: u32,
    progress: &dyn Fn(u64),
) -> Result<(String, u64), PublishError> {
    let mut src = File::open(input).with_path(input)?;
    let file = File::create(out).with_path(out)?;
    let sink = HashingWriter {
        inner: BufWriter::with_capacity(1 << 20, file),
        hash: Sha256::new(),
        count: 0,
    };
    let threads = threads.max(1);
    let size = src.metadata().with_path(input)?.len();
    let sink = match codec {
        Codec::Xz => {
            let stream = liblzma::stream::MtStreamBuilder::new()
                .preset(level.min(9))
                .threads(threads)
                .block_size(xz_block_size(size))
                .check(liblzma::stream::Check::Crc64)
                .encoder()
                .map_err(|e| PublishError::Encoder(e.to_string()))?;
            let mut enc = liblzma::write::XzEncoder::new_stream(sink, stream);
            pump(&mut src, &mut enc, input, out, progress)?;
            enc.finish().with_path(out)?
        }
        Codec::Zstd => {
            let mut enc = zstd::Encoder::new(sink, level.clamp(1, 19) as i32)
                .and_then(|mut e| {
                    e.multithread(threads)?;
                    e.include_checksum(true)?;
                    Ok(e)
                })
                .with_path(out)?;
            pump(&mut src, &mut enc, input, out, progress)?;
            enc.finish().with_path(out)?
        }
    };
    let HashingWriter {
        inner, hash, count, ..
    } = sink;
    let file = inner
        .into_inner()
        .map_err(|e| PublishError::Io(IoError::new(out.to_path_buf(), e.into_error())))?;
    file.sync_all().with_path(out)?;
    Ok((hex::encode(hash.finalize()), count))
}

/// xz block size for an input of `size` bytes: half of it in whole MiB, between xz's
/// own 24 MiB (3 x the 8 MiB dictionary of -6) and 256 MiB. Fewer, larger blocks than
/// `xz -T0` compress a little better, and on the 2-core machines kimg targets two
/// blocks keep both cores busy to the end where xz's 24 MiB blocks leave one idle in
/// the last round. It depends on the size only, so the archive is the same whatever
/// the thread count (reproducible bytes). Memory: about two blocks per thread.
pub fn xz_block_size(size: u64) -> u64 {
    const MIB: u64 = 1 << 20;
    size.div_ceil(2).div_ceil(MIB).clamp(24, 256) * MIB
}

fn pump(
    src: &mut File,
    dst: &mut dyn Write,
    input: &Path,
    out: &Path,
    progress: &dyn Fn(u64),
) -> Result<(), PublishError> {
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = src.read(&mut buf).with_path(input)?;
        if n == 0 {
            return Ok(());
        }
        dst.write_all(&buf[..n]).with_path(out)?;
        done += n as u64;
        progress(done);
    }
}

/// Publishes `opts.image`; `progress(done, total)` follows the input bytes.
pub fn publish(
    opts: &PublishOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<Published, PublishError> {
    let manifest = read_manifest(&opts.image)?;
    let total = fs::metadata(&opts.image).with_path(&opts.image)?.len();
    let name = image_name(&opts.image);
    fs::create_dir_all(&opts.out_dir).with_path(&opts.out_dir)?;
    // Hidden temporaries in the output directory: same filesystem, so rename is atomic;
    // dropped (removed) on any error.
    let tmp = kimg_util::fs::work_dir(&opts.out_dir, &format!(".{name}.publish-"))?;
    let file_name = format!("{name}{}", opts.codec.suffix());
    let archive_tmp = tmp.path().join(&file_name);
    let t = Instant::now();
    let (digest, output_size) = compress(
        &opts.image,
        &archive_tmp,
        opts.codec,
        opts.level,
        opts.threads,
        &|done| progress(done, total),
    )?;
    let secs = t.elapsed().as_secs_f64();

    let json_tmp = tmp.path().join(format!("{name}.json"));
    let json = serde_json::to_string_pretty(&manifest).unwrap_or_default() + "\n";
    fs::write(&json_tmp, &json).with_path(&json_tmp)?;
    let sum_tmp = tmp.path().join(format!("{file_name}.sha256"));
    // The checksum file vouches for the manifest too (it feeds every VM's kernel
    // command line): one `sha256sum -c` line each.
    let sums = format!(
        "{digest}  {file_name}\n{}  {name}.json\n",
        kimg_util::hash::sha256(json.as_bytes())
    );
    fs::write(&sum_tmp, sums).with_path(&sum_tmp)?;

    let archive = opts.out_dir.join(&file_name);
    let sha256_file = opts.out_dir.join(format!("{file_name}.sha256"));
    let manifest_path = opts.out_dir.join(format!("{name}.json"));
    // An old checksum must not vouch for the new archive while it is being renamed.
    match fs::remove_file(&sha256_file) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(IoError::new(&sha256_file, e).into())
        }
        _ => {}
    }
    fs::rename(&json_tmp, &manifest_path).with_path(&manifest_path)?;
    fs::rename(&archive_tmp, &archive).with_path(&archive)?;
    fs::rename(&sum_tmp, &sha256_file).with_path(&sha256_file)?;
    Ok(Published {
        archive,
        sha256_file,
        manifest: manifest_path,
        sha256: digest,
        input_size: total,
        output_size,
        secs,
    })
}

/// Parses a `sha256sum` line (`HEX  NAME` or `HEX *NAME`) or a bare digest: the
/// first digest of the text.
pub fn parse_sha256_file(text: &str) -> Option<String> {
    let first = text.split_whitespace().next()?;
    hex_digest(first)
}

fn hex_digest(word: &str) -> Option<String> {
    let hex = word.to_ascii_lowercase();
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
}

/// Parses a `sha256sum` file into (digest, file name) per line; a bare digest has
/// an empty name. Lines that are not checksums are skipped.
pub fn parse_sums(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim_end_matches('\r');
            let (hex, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            let name = rest.trim_start_matches(' ').trim_start_matches('*');
            Some((hex_digest(hex)?, name.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kimg_util::cmd;
    use std::process::Command;

    fn fake_image(dir: &Path) -> PathBuf {
        let img = dir.join("hd.img");
        // Compressible but not trivial content, with a long zero run like a disk.
        let mut data = Vec::new();
        for i in 0u32..200_000 {
            data.extend_from_slice(&(i % 977).to_le_bytes());
        }
        data.resize(data.len() + (4 << 20), 0);
        fs::write(&img, &data).unwrap();
        let m = r#"{"format":1,"kimg_version":"0","flavour":"base","kernel":{"version":"k","cmdline":"c","esp_kernel":"a","esp_initrd":"b","config_sha256":""},"disk_size":1,"partitions":[],"components":[]}"#;
        fs::write(dir.join("hd.json"), m).unwrap();
        img
    }

    #[test]
    fn publish_xz_is_valid_and_checksummed_and_leaves_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let img = fake_image(dir.path());
        let out = dir.path().join("pub");
        for (codec, tool) in [(Codec::Xz, "xz"), (Codec::Zstd, "zstd")] {
            let p = publish(
                &PublishOptions {
                    image: img.clone(),
                    out_dir: out.clone(),
                    level: 3,
                    threads: 2,
                    codec,
                },
                &|_, _| {},
            )
            .unwrap();
            // The trusted tools agree: integrity, content and checksum.
            cmd::run(Command::new(tool).arg("-t").arg(&p.archive)).unwrap();
            let back = Command::new(tool)
                .arg("-dc")
                .arg(&p.archive)
                .output()
                .unwrap();
            assert!(back.stdout == fs::read(&img).unwrap(), "{tool} round trip");
            cmd::run(
                Command::new("sha256sum")
                    .arg("-c")
                    .arg(p.sha256_file.file_name().unwrap())
                    .current_dir(&out),
            )
            .unwrap();
            let m: Manifest =
                serde_json::from_str(&fs::read_to_string(&p.manifest).unwrap()).unwrap();
            assert_eq!(m.kernel.version, "k");
        }
        let names: Vec<String> = fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
        assert_eq!(names.len(), 5, "{names:?}");
    }

    #[test]
    fn missing_manifest_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("x.img");
        fs::write(&img, b"x").unwrap();
        let e = read_manifest(&img).unwrap_err().to_string();
        assert!(e.contains("x.json"), "{e}");
    }

    #[test]
    fn xz_blocks_depend_on_size_only() {
        assert_eq!(xz_block_size(0), 24 << 20);
        assert_eq!(xz_block_size(116 << 20), 58 << 20);
        assert_eq!(xz_block_size(4 << 30), 256 << 20);
    }

    #[test]
    fn sha256_files_and_names() {
        let h = "AB".repeat(32);
        assert_eq!(
            parse_sha256_file(&format!("{h}  hd.img.xz\n")),
            Some(h.to_ascii_lowercase())
        );
        assert_eq!(parse_sha256_file("abc  x"), None);
        let two = format!("{h}  hd.img.xz\n{}  hd.json\n", "b".repeat(64));
        assert_eq!(
            parse_sums(&two),
            [
                (h.to_ascii_lowercase(), "hd.img.xz".to_string()),
                ("b".repeat(64), "hd.json".to_string())
            ]
        );
        assert_eq!(parse_sums(&h), [(h.to_ascii_lowercase(), String::new())]);
        assert_eq!(parse_sha256_file(""), None);
        assert_eq!(image_name(Path::new("out/hd.img")), "hd");
        assert_eq!(image_name(Path::new("k8s.qcow2")), "k8s");
    }
}
