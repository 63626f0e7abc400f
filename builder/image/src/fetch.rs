//! `kimg fetch` and `kimg images`: verified, published images in the image cache.
//!
//! An image comes from a path or an http(s) URL, with its sha256 from `--sha256` or
//! the `.sha256` file beside it, and its manifest (`NAME.json`) beside it too.
//! Downloads go to `cache/downloads/*.part` and resume with a `Range` request when
//! the server honours it. The archive is hashed and decompressed in one pass into a
//! hidden directory under `cache/images/`, which is renamed to `cache/images/NAME/`
//! only when the digest matched: a mismatch leaves nothing in the cache.
//!
//! The `.sha256` file `kimg publish` writes covers the manifest too (a second
//! `sha256sum -c` line, `HEX  NAME.json`), checked before anything is downloaded; the
//! manifest's disk size then bounds the decompressed output, and the decoders run
//! with a memory limit, so an archive that is not what its manifest says costs at
//! most that much before its checksum is known. An old single-line `.sha256` (or
//! `--sha256`) covers the archive only: the fetch goes on with a note saying so.

use crate::publish::{parse_sha256_file, parse_sums};
use kimg_contract::manifest::Manifest;
use kimg_util::cache::cache_dir;
use kimg_util::fs::{IoError, PathContext};
use sha2::{Digest, Sha256};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Errors of `kimg fetch` and `kimg images`.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// An HTTP request failed.
    #[error("{url}: {why}")]
    Http {
        /// The URL.
        url: String,
        /// Why (and what to do).
        why: String,
    },
    /// The digest did not match.
    #[error("{src}: sha256 is {actual}, expected {expected}; nothing was cached (check the source and its .sha256)")]
    Mismatch {
        /// The source.
        src: String,
        /// Expected digest.
        expected: String,
        /// Digest of what was read.
        actual: String,
    },
    /// No checksum is known.
    #[error("{src}: no checksum: {why}; pass --sha256 HEX")]
    NoChecksum {
        /// The source.
        src: String,
        /// Why the `.sha256` beside it could not be used.
        why: String,
    },
    /// The archive decompresses to more than its manifest's disk can hold.
    #[error("{src}: the archive decompresses to more than {cap} bytes, the most its manifest's disk size allows; stopped there, nothing was cached (the archive is not the image its manifest describes)")]
    TooBig {
        /// The output being written.
        src: String,
        /// The bound.
        cap: u64,
    },
    /// The input is not what fetch accepts.
    #[error("{src}: {why}")]
    Bad {
        /// The source (or the name).
        src: String,
        /// What is wrong and what to do.
        why: String,
    },
}

/// Inputs of `kimg fetch`.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// A path or an http(s) URL of `NAME.img.xz` or `NAME.img.zst`.
    pub src: String,
    /// Expected sha256 of the archive; else read from `SRC.sha256`.
    pub sha256: Option<String>,
    /// Cache name; else `NAME` from SRC.
    pub name: Option<String>,
    /// The cache directory ([`cache_dir`] for the CLI).
    pub cache: PathBuf,
}

/// Progress of a fetch step: (`download` or `verify`, bytes done, total if known).
pub type Progress<'a> = &'a dyn Fn(&'static str, u64, Option<u64>);

/// What `kimg fetch` records beside a cached image (`fetch.json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FetchRecord {
    /// Where it came from.
    pub source: String,
    /// sha256 of the archive that was verified.
    pub sha256: String,
    /// When it was fetched (seconds since the epoch).
    pub fetched: u64,
}

/// One cached image, as `kimg images` lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CachedImage {
    /// Its name (`kimg run --image NAME`).
    pub name: String,
    /// The qcow2.
    pub path: PathBuf,
    /// Size of the qcow2 in bytes.
    pub size: u64,
    /// sha256 of the published archive it came from.
    pub sha256: String,
    /// Kernel version.
    pub kernel: String,
    /// When it was fetched (seconds since the epoch).
    pub fetched: u64,
    /// Where it came from.
    pub source: String,
    /// What the fetch could not check (e.g. an old `.sha256` without the manifest).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// Memory the xz decoder may use (threads are dropped to stay under it; an archive
/// that needs more even single-threaded is refused).
pub const XZ_MEMLIMIT: u64 = 1 << 30;
/// Largest zstd window accepted (2^27 = 128 MiB, zstd's own default for decoders).
pub const ZSTD_WINDOW_LOG_MAX: u32 = 27;

/// The most a qcow2 of a `disk_size`-byte disk can hold: the disk itself fully
/// allocated plus its metadata (L2 tables take 1/8192 of it and refcounts less;
/// 1/64 + 16 MiB is a generous bound).
pub fn max_image_size(disk_size: u64) -> u64 {
    disk_size
        .saturating_add(disk_size / 64)
        .saturating_add(16 << 20)
}

/// `cache/images`.
pub fn images_dir(cache: &Path) -> PathBuf {
    cache.join("images")
}

/// The qcow2 of cached image `name`.
pub fn cached_image_path(cache: &Path, name: &str) -> PathBuf {
    images_dir(cache).join(name).join(format!("{name}.img"))
}

/// `kimg run --image X`: X itself when it exists or looks like a path, else the cached
/// image named X when there is one, else X (whose error then names it).
pub fn resolve_image(arg: &Path) -> PathBuf {
    let s = arg.to_string_lossy();
    if arg.exists() || s.contains('/') || valid_name(&s).is_err() {
        return arg.to_path_buf();
    }
    let cached = cached_image_path(&cache_dir(), &s);
    if cached.is_file() {
        cached
    } else {
        arg.to_path_buf()
    }
}

fn valid_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not an image name: use letters, digits, '.', '_', '-' (--name NAME)"
        ))
    }
}

fn is_url(src: &str) -> bool {
    src.starts_with("http://") || src.starts_with("https://")
}

/// `.../hd.img.xz?x` -> (`hd`, `.../hd.json`).
fn split_src(src: &str) -> Result<(String, String), FetchError> {
    let base = src.split(['?', '#']).next().unwrap_or(src);
    let file = base.rsplit('/').next().unwrap_or(base);
    let stem = [".img.xz", ".img.zst", ".xz", ".zst"]
        .iter()
        .find_map(|suf| file.strip_suffix(suf))
        .ok_or_else(|| FetchError::Bad {
            src: src.into(),
            why: "expected NAME.img.xz or NAME.img.zst (what `kimg publish` writes)".into(),
        })?;
    let dir = &base[..base.len() - file.len()];
    Ok((stem.to_string(), format!("{dir}{stem}.json")))
}

pub(crate) fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(30))
        .timeout_read(Duration::from_secs(60))
        .build()
}

pub(crate) fn http_err(url: &str, e: ureq::Error) -> FetchError {
    let why = match e {
        ureq::Error::Status(code, r) => format!("HTTP {code} {}", r.status_text()),
        // ureq names the URL itself; it is said once, first.
        ureq::Error::Transport(t) => {
            let text = t.to_string();
            match text.strip_prefix(url).and_then(|t| t.strip_prefix(": ")) {
                Some(rest) => rest.to_string(),
                None => text,
            }
        }
    };
    FetchError::Http {
        url: url.into(),
        why,
    }
}

/// Reads a small text file from a path or URL.
fn read_text(src: &str) -> Result<String, FetchError> {
    if is_url(src) {
        let resp = agent().get(src).call().map_err(|e| http_err(src, e))?;
        let mut s = String::new();
        resp.into_reader()
            .take(1 << 20)
            .read_to_string(&mut s)
            .map_err(|e| FetchError::Http {
                url: src.into(),
                why: e.to_string(),
            })?;
        Ok(s)
    } else {
        Ok(fs::read_to_string(src).with_path(Path::new(src))?)
    }
}

/// Downloads `url` to `part`, resuming from its current length when the server
/// answers a `Range` request with 206.
pub(crate) fn download(url: &str, part: &Path, progress: Progress) -> Result<(), FetchError> {
    let have = fs::metadata(part).map_or(0, |m| m.len());
    let mut req = agent().get(url);
    if have > 0 {
        req = req.set("Range", &format!("bytes={have}-"));
    }
    let resp = match req.call() {
        Ok(r) => r,
        // The part is already whole (or the file shrank): start over.
        Err(ureq::Error::Status(416, _)) => {
            fs::remove_file(part).with_path(part)?;
            return download(url, part, progress);
        }
        Err(e) => return Err(http_err(url, e)),
    };
    let resumed = resp.status() == 206
        && resp
            .header("Content-Range")
            .is_some_and(|r| r.starts_with(&format!("bytes {have}-")));
    let start = if resumed { have } else { 0 };
    let total = resp
        .header("Content-Length")
        .and_then(|l| l.parse::<u64>().ok())
        .map(|l| l + start);
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .append(resumed)
        .truncate(!resumed)
        .open(part)
        .with_path(part)?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut body = resp.into_reader();
    let mut buf = vec![0u8; 1 << 16];
    let mut done = start;
    progress("download", done, total);
    loop {
        let n = body.read(&mut buf).map_err(|e| FetchError::Http {
            url: url.into(),
            why: format!(
                "{e} after {done} bytes; run the same command again to resume from {}",
                part.display()
            ),
        })?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).with_path(part)?;
        done += n as u64;
        progress("download", done, total);
    }
    out.flush().with_path(part)?;
    if let Some(t) = total.filter(|&t| t != done) {
        return Err(FetchError::Http {
            url: url.into(),
            why: format!(
                "got {done} of {t} bytes; run the same command again to resume from {}",
                part.display()
            ),
        });
    }
    Ok(())
}

/// A reader that hashes and counts what passes through it.
struct HashingReader<R> {
    inner: R,
    hash: Sha256,
    count: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Hashes `archive` while decompressing it (xz or zstd, by magic) to `out`, at most
/// `cap` bytes of output (it stops at the first byte past it); returns the archive's
/// sha256.
pub fn verify_decompress(
    archive: &Path,
    out: &Path,
    cap: u64,
    progress: Progress,
) -> Result<String, FetchError> {
    let mut file = File::open(archive).with_path(archive)?;
    let total = file.metadata().with_path(archive)?.len();
    let mut magic = [0u8; 6];
    let n = file.read(&mut magic).with_path(archive)?;
    let reader = HashingReader {
        inner: io::Cursor::new(magic[..n].to_vec()).chain(file),
        hash: Sha256::new(),
        count: 0,
    };
    let dst = File::create(out).with_path(out)?;
    let mut dst = BufWriter::with_capacity(1 << 20, dst);
    let bad = |why: String| FetchError::Bad {
        src: archive.display().to_string(),
        why,
    };
    let mut reader = if magic == [0xfd, b'7', b'z', b'X', b'Z', 0] {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let stream = liblzma::stream::MtStreamBuilder::new()
            .threads(threads)
            .memlimit_threading(XZ_MEMLIMIT)
            .memlimit_stop(XZ_MEMLIMIT)
            .decoder()
            .map_err(|e| bad(format!("xz decoder: {e}")))?;
        let mut dec = liblzma::read::XzDecoder::new_stream(reader, stream);
        copy(
            &mut dec,
            |d| d.get_ref().count,
            &mut dst,
            (out, cap),
            total,
            progress,
        )
        .map_err(|e| e.unwrap_or_else(|e| bad(format!("corrupt xz data: {e}"))))?;
        dec.into_inner()
    } else if magic[..4] == [0x28, 0xb5, 0x2f, 0xfd] {
        let mut dec = zstd::Decoder::new(reader)
            .and_then(|mut d| {
                d.window_log_max(ZSTD_WINDOW_LOG_MAX)?;
                Ok(d)
            })
            .map_err(|e| bad(format!("zstd decoder: {e}")))?;
        copy(
            &mut dec,
            |d| d.get_ref().get_ref().count,
            &mut dst,
            (out, cap),
            total,
            progress,
        )
        .map_err(|e| e.unwrap_or_else(|e| bad(format!("corrupt zstd data: {e}"))))?;
        dec.finish().into_inner()
    } else {
        return Err(bad("neither xz nor zstd data".into()));
    };
    // Whatever follows the compressed stream is part of the file's digest too.
    io::copy(&mut reader, &mut io::sink()).with_path(archive)?;
    progress("verify", reader.count, Some(total));
    let inner = dst
        .into_inner()
        .map_err(|e| FetchError::Io(IoError::new(out.to_path_buf(), e.into_error())))?;
    inner.sync_all().with_path(out)?;
    Ok(hex::encode(reader.hash.finalize()))
}

/// Decompresses `dec` into `dst` (the file `out`, at most `cap` bytes), reporting the
/// compressed bytes `count` says were consumed. Errors: `Ok(e)` writing or too
/// much output, `Err(e)` reading (corrupt data).
fn copy<D: Read>(
    dec: &mut D,
    count: impl Fn(&D) -> u64,
    dst: &mut impl Write,
    (out, cap): (&Path, u64),
    total: u64,
    progress: Progress,
) -> Result<(), Result<FetchError, io::Error>> {
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0u64;
    loop {
        let n = dec.read(&mut buf).map_err(Err)?;
        if n == 0 {
            return Ok(());
        }
        written += n as u64;
        if written > cap {
            return Err(Ok(FetchError::TooBig {
                src: out.display().to_string(),
                cap,
            }));
        }
        dst.write_all(&buf[..n])
            .map_err(|e| Ok(IoError::new(out, e).into()))?;
        progress("verify", count(dec), Some(total));
    }
}

/// Fetches, verifies and caches an image; returns its cache entry.
pub fn fetch(opts: &FetchOptions, progress: Progress) -> Result<CachedImage, FetchError> {
    let src = opts.src.as_str();
    let (stem, manifest_src) = split_src(src)?;
    let name = opts.name.clone().unwrap_or(stem);
    valid_name(&name).map_err(|why| FetchError::Bad {
        src: src.into(),
        why,
    })?;
    let mut notes = Vec::new();
    let archive_file = src.split(['?', '#']).next().unwrap_or(src);
    let archive_file = archive_file.rsplit('/').next().unwrap_or(archive_file);
    let manifest_file = manifest_src.rsplit('/').next().unwrap_or(&manifest_src);
    let (expected, manifest_sum) = match &opts.sha256 {
        Some(h) => {
            let hex = parse_sha256_file(h).ok_or_else(|| FetchError::Bad {
                src: src.into(),
                why: format!("--sha256 {h:?} is not 64 hex digits"),
            })?;
            notes.push(format!(
                "--sha256 covers the archive only: {manifest_file} was not verified"
            ));
            (hex, None)
        }
        None => {
            let sum_src = format!("{src}.sha256");
            let text = read_text(&sum_src).map_err(|e| FetchError::NoChecksum {
                src: src.into(),
                why: e.to_string(),
            })?;
            expected_sums(&text, archive_file, manifest_file, &sum_src, &mut notes).ok_or_else(
                || FetchError::NoChecksum {
                    src: src.into(),
                    why: format!("{sum_src} holds no sha256 of {archive_file}"),
                },
            )?
        }
    };
    let manifest_text = read_text(&manifest_src).map_err(|e| FetchError::Bad {
        src: src.into(),
        why: format!("its manifest: {e} (publish with `kimg publish`, which writes NAME.json)"),
    })?;
    if let Some(want) = manifest_sum {
        let got = kimg_util::hash::sha256(manifest_text.as_bytes());
        if got != want {
            return Err(FetchError::Mismatch {
                src: manifest_src,
                expected: want,
                actual: got,
            });
        }
    }
    let manifest: Manifest = serde_json::from_str(&manifest_text).map_err(|e| FetchError::Bad {
        src: manifest_src.clone(),
        why: format!("not a kimg manifest: {e}"),
    })?;

    let images = images_dir(&opts.cache);
    fs::create_dir_all(&images).with_path(&images)?;
    let (archive, part) = if is_url(src) {
        let downloads = opts.cache.join("downloads");
        fs::create_dir_all(&downloads).with_path(&downloads)?;
        let key = &kimg_util::hash::sha256(src.as_bytes())[..16];
        let part = downloads.join(format!("{key}-{name}.part"));
        download(src, &part, progress)?;
        (part.clone(), Some(part))
    } else {
        (PathBuf::from(src), None)
    };

    // Locked while it lives; a killed fetch's (and a killed swap's `.old-`) is
    // removed by the next fetch.
    kimg_util::fs::clean_stale(&images, ".old-", kimg_util::fs::STALE_AFTER);
    let tmp = kimg_util::fs::work_dir(&images, ".fetch-")?;
    let img_tmp = tmp.path().join(format!("{name}.img"));
    let cap = max_image_size(manifest.disk_size);
    let result = verify_decompress(&archive, &img_tmp, cap, progress);
    let remove_part = || {
        if let Some(p) = &part {
            let _ = fs::remove_file(p);
        }
    };
    let actual = match result {
        Ok(a) => a,
        Err(e) => {
            // A corrupt download cannot be resumed into a good one.
            remove_part();
            return Err(e);
        }
    };
    if actual != expected {
        remove_part();
        return Err(FetchError::Mismatch {
            src: src.into(),
            expected,
            actual,
        });
    }
    let record = FetchRecord {
        source: src.into(),
        sha256: actual,
        fetched: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let json = tmp.path().join(format!("{name}.json"));
    fs::write(&json, manifest_text).with_path(&json)?;
    let rec = tmp.path().join("fetch.json");
    let text = serde_json::to_string_pretty(&record).unwrap_or_default() + "\n";
    fs::write(&rec, text).with_path(&rec)?;

    let dest = images.join(&name);
    if dest.exists() {
        // Move the old entry aside first: a directory cannot be renamed over a full one.
        let old = kimg_util::fs::work_dir(&images, ".old-")?;
        let aside = old.path().join(&name);
        fs::rename(&dest, &aside).with_path(&dest)?;
    }
    let kept = tmp.keep();
    fs::rename(&kept, &dest).map_err(|e| {
        let _ = fs::remove_dir_all(&kept);
        IoError::new(&dest, e)
    })?;
    remove_part();
    let size = fs::metadata(dest.join(format!("{name}.img"))).map_or(0, |m| m.len());
    Ok(CachedImage {
        path: dest.join(format!("{name}.img")),
        name,
        size,
        sha256: record.sha256,
        kernel: manifest.kernel.version,
        fetched: record.fetched,
        source: record.source,
        notes,
    })
}

/// The archive's and the manifest's digests out of a `.sha256` file's text: the
/// lines naming them, or (an old single-line file, or one naming neither) its first
/// digest for the archive and none for the manifest, with a note.
fn expected_sums(
    text: &str,
    archive_file: &str,
    manifest_file: &str,
    sum_src: &str,
    notes: &mut Vec<String>,
) -> Option<(String, Option<String>)> {
    let sums = parse_sums(text);
    let of = |file: &str| sums.iter().find(|(_, n)| n == file).map(|(h, _)| h.clone());
    let manifest = of(manifest_file);
    if manifest.is_none() {
        notes.push(format!(
            "{sum_src} has no line for {manifest_file} (published before kimg checksummed \
             manifests): the manifest was not verified; publish again to cover it"
        ));
    }
    let archive = of(archive_file).or_else(|| sums.first().map(|(h, _)| h.clone()))?;
    Some((archive, manifest))
}

/// Every image in the cache, sorted by name (entries that are not whole are skipped).
pub fn list(cache: &Path) -> Result<Vec<CachedImage>, FetchError> {
    let dir = images_dir(cache);
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(IoError::new(&dir, e).into()),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.with_path(&dir)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let d = entry.path();
        let img = d.join(format!("{name}.img"));
        let Ok(meta) = fs::metadata(&img) else {
            continue;
        };
        let rec: Option<FetchRecord> = fs::read_to_string(d.join("fetch.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let manifest: Option<Manifest> = fs::read_to_string(d.join(format!("{name}.json")))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let (Some(rec), Some(manifest)) = (rec, manifest) else {
            continue;
        };
        out.push(CachedImage {
            name,
            path: img,
            size: meta.len(),
            sha256: rec.sha256,
            kernel: manifest.kernel.version,
            fetched: rec.fetched,
            source: rec.source,
            notes: Vec::new(),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// `YYYY-MM-DD HH:MM` (UTC) of a Unix time.
pub fn utc_date(secs: u64) -> String {
    let (y, m, d, hh, mm, _) = kimg_util::civil::civil(i64::try_from(secs).unwrap_or(i64::MAX));
    format!("{y:04}-{m:02}-{d:02} {hh:02}:{mm:02}")
}

#[cfg(test)]
mod tests;
