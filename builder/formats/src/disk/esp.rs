//! The EFI system partition: FAT32 built in memory with `fatfs`, and reading files back.

use super::DiskError;
use fatfs::{FatType, FileSystem, FormatVolumeOptions, FsOptions};
use kimg_util::fs::IoError;
use std::fs::{File, OpenOptions};
use std::io::{self, Cursor};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

/// FAT volume label of the ESP (11 bytes, space padded).
pub const VOLUME_LABEL: [u8; 11] = *b"KIMG-ESP   ";

/// Builds a FAT32 volume of `size` bytes holding `files` (ESP path -> host file).
///
/// The volume is built in memory (`size` bytes) because fatfs does many small
/// writes (512-byte clusters at 64 MiB); the caller writes only the non-zero parts.
pub fn build(
    files: &[(String, PathBuf)],
    size: u64,
    volume_id: u32,
    mtime: u64,
) -> Result<Vec<u8>, DiskError> {
    let fat_err = |esp_path: &str| {
        let esp_path = esp_path.to_string();
        move |source| DiskError::Fat { esp_path, source }
    };
    let len = usize::try_from(size)
        .map_err(|_| DiskError::Spec(format!("ESP size {size} does not fit in memory")))?;
    let mut disk = Cursor::new(vec![0u8; len]);
    let opts = FormatVolumeOptions::new()
        .fat_type(FatType::Fat32)
        .volume_id(volume_id)
        .volume_label(VOLUME_LABEL);
    fatfs::format_volume(&mut disk, opts).map_err(fat_err("(format)"))?;
    disk.set_position(0);
    {
        let fs = FileSystem::new(&mut disk, FsOptions::new().time_provider(fixed_time(mtime)))
            .map_err(fat_err("(mount)"))?;
        for (esp_path, host) in files {
            let root = fs.root_dir();
            let comps = esp_components(esp_path)?;
            for i in 1..comps.len() {
                root.create_dir(&comps[..i].join("/"))
                    .map_err(fat_err(esp_path))?;
            }
            let mut src = File::open(host)
                .map_err(|source| DiskError::Io(IoError::new(host.clone(), source)))?;
            let mut dst = root.create_file(esp_path).map_err(fat_err(esp_path))?;
            // create_file opens an existing file as is: a repeated path is replaced.
            dst.truncate().map_err(fat_err(esp_path))?;
            io::copy(&mut src, &mut dst).map_err(fat_err(esp_path))?;
        }
        fs.unmount().map_err(fat_err("(unmount)"))?;
    }
    let mut img = disk.into_inner();
    super::fatfix::fix(&mut img);
    Ok(img)
}

/// Splits an ESP path (`a/b/c`) into its components; rejects empty, `.` and `..` parts.
pub fn esp_components(esp_path: &str) -> Result<Vec<&str>, DiskError> {
    let comps: Vec<&str> = esp_path.split('/').collect();
    if comps
        .iter()
        .any(|c| c.is_empty() || *c == "." || *c == "..")
    {
        return Err(DiskError::Spec(format!(
            "ESP path {esp_path:?} must be relative, without empty, `.` or `..` parts"
        )));
    }
    Ok(comps)
}

/// Copies `esp_paths` out of the FAT volume in `esp_raw` to `dest_dir/<file name>`.
pub fn read_files(
    esp_raw: &Path,
    image: &Path,
    esp_paths: &[&str],
    dest_dir: &Path,
) -> Result<Vec<PathBuf>, DiskError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DiskError::Io(IoError::new(path, source))
    };
    // fatfs wants a writable device even to read; this is a private temp copy.
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open(esp_raw)
        .map_err(io_err(esp_raw))?;
    let fs = FileSystem::new(dev, FsOptions::new()).map_err(|source| DiskError::Fat {
        esp_path: "(mount)".into(),
        source,
    })?;
    let root = fs.root_dir();
    let mut out = Vec::new();
    for esp_path in esp_paths {
        let name = esp_components(esp_path)?
            .last()
            .copied()
            .unwrap_or(esp_path);
        let mut src = root.open_file(esp_path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                DiskError::MissingEspFile {
                    image: image.to_path_buf(),
                    path: esp_path.to_string(),
                }
            } else {
                DiskError::Fat {
                    esp_path: esp_path.to_string(),
                    source,
                }
            }
        })?;
        let dest = dest_dir.join(name);
        let mut dst = File::create(&dest).map_err(io_err(&dest))?;
        io::copy(&mut src, &mut dst).map_err(io_err(&dest))?;
        out.push(dest);
    }
    Ok(out)
}

/// fatfs stamps entries through a `'static` provider; this one returns a fixed time.
#[derive(Debug)]
struct FixedTime(fatfs::DateTime);

impl fatfs::TimeProvider for FixedTime {
    fn get_current_date(&self) -> fatfs::Date {
        self.0.date
    }
    fn get_current_date_time(&self) -> fatfs::DateTime {
        self.0
    }
}

/// A `'static` provider for `mtime`: leaked once per distinct value, so repeated
/// builds in one process do not leak more.
fn fixed_time(mtime: u64) -> &'static FixedTime {
    static CACHE: Mutex<Vec<(u64, &'static FixedTime)>> = Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((_, p)) = cache.iter().find(|(t, _)| *t == mtime) {
        return p;
    }
    let p: &'static FixedTime = Box::leak(Box::new(FixedTime(dos_date_time(mtime))));
    cache.push((mtime, p));
    p
}

/// Unix time to a FAT date and time (UTC), clamped to FAT's 1980..=2107 range.
fn dos_date_time(unix: u64) -> fatfs::DateTime {
    let (year, month, day, h, m, sec) =
        kimg_util::civil::civil(i64::try_from(unix).unwrap_or(i64::MAX / 2));
    let secs = u64::from(h) * 3600 + u64::from(m) * 60 + u64::from(sec);
    let (date, time) = if year < 1980 {
        ((1980, 1, 1), (0, 0, 0))
    } else if year > 2107 {
        ((2107, 12, 31), (23, 59, 58))
    } else {
        ((year, month, day), (secs / 3600, secs / 60 % 60, secs % 60))
    };
    // All values are range-checked above, so the narrowing casts cannot truncate.
    fatfs::DateTime {
        date: fatfs::Date {
            year: date.0 as u16,
            month: date.1 as u16,
            day: date.2 as u16,
        },
        time: fatfs::Time {
            hour: time.0 as u16,
            min: time.1 as u16,
            sec: time.2 as u16,
            millis: 0,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dos_time_conversion() {
        let t = dos_date_time(1_700_000_000); // 2023-11-14 22:13:20 UTC
        assert_eq!((t.date.year, t.date.month, t.date.day), (2023, 11, 14));
        assert_eq!((t.time.hour, t.time.min, t.time.sec), (22, 13, 20));
        let t = dos_date_time(951_782_400); // 2000-02-29 00:00:00
        assert_eq!((t.date.year, t.date.month, t.date.day), (2000, 2, 29));
        assert_eq!(dos_date_time(0).date.year, 1980);
        assert!(std::ptr::eq(fixed_time(5), fixed_time(5)));
    }

    #[test]
    fn fat32_round_trip_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("k");
        std::fs::write(&host, b"kernel").unwrap();
        let files = vec![("a/b/vmlinuz".to_string(), host.clone())];
        let img = build(&files, 64 << 20, 0x1234_abcd, 1_700_000_000).unwrap();
        let fs = FileSystem::new(Cursor::new(img.clone()), FsOptions::new()).unwrap();
        assert_eq!(fs.fat_type(), FatType::Fat32);
        assert_eq!(fs.volume_id(), 0x1234_abcd);
        assert_eq!(fs.volume_label(), "KIMG-ESP");
        drop(fs);
        let raw = dir.path().join("esp.raw");
        std::fs::write(&raw, &img).unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let got = read_files(&raw, &raw, &["a/b/vmlinuz"], &out).unwrap();
        assert_eq!(std::fs::read(&got[0]).unwrap(), b"kernel");
        let err = read_files(&raw, &raw, &["nope"], &out).unwrap_err();
        assert!(matches!(err, DiskError::MissingEspFile { .. }), "{err}");
        assert!(build(&[("../x".into(), host)], 64 << 20, 1, 0).is_err());
    }
}
