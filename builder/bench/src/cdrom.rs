//! `kimg bench cdrom`: the overlay cdrom issue's figures, side by side in one run.
//!
//! - mkcdrom: `kimg mkcdrom` vs `xorriso -as mkisofs -R` writing a cdrom of the same
//!   archives (about 200 MB; median wall time of each, ratio; goal: kimg faster);
//! - unpack: kimg-init's unpacking of every overlay at boot vs busybox tar extracting
//!   the same archives from the same cdrom as the first thing in a second, fresh VM
//!   of the same image booted with `kimg.cdrom=off` (goal: kimg-init faster). Both
//!   are then the first big write of a fresh VM: under TCG a guest page touched for
//!   the first time costs a host page fault, so busybox run afterwards in the VM
//!   kimg-init just filled (page cache dropped) is faster than either; that figure
//!   is printed too.

use super::{median, step, BenchError};
use kimg_cluster::accel::AccelChoice;
use kimg_cluster::{self as cluster, RunOptions, Wait};
use kimg_image::overlay::{self, Overlay, Source};
use serde::Serialize;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Options of `kimg bench cdrom`.
#[derive(Debug, Clone)]
pub struct CdromBenchOptions {
    /// Image to boot (from `kimg build`).
    pub image: PathBuf,
    /// Size of the overlay set in MB.
    pub mb: u64,
    /// Runs of each ISO writer, and of each unpacking VM.
    pub runs: usize,
    /// Accelerator for the VM.
    pub accel: AccelChoice,
    /// Scratch directory.
    pub scratch: PathBuf,
}

/// The figures.
#[derive(Debug, Serialize)]
pub struct CdromBenchReport {
    /// Bytes of the overlay archives.
    pub overlay_bytes: u64,
    /// `kimg mkcdrom` wall seconds, each run.
    pub kimg_mkcdrom_secs: Vec<f64>,
    /// `xorriso -as mkisofs -R` wall seconds, each run.
    pub xorriso_secs: Vec<f64>,
    /// Median xorriso / median kimg (> 1: kimg faster).
    pub mkcdrom_speedup: f64,
    /// kimg-init's unpack seconds at boot (sum over overlays; median of runs).
    pub kimg_init_unpack_secs: f64,
    /// busybox tar's seconds for the same archives, first thing in a fresh VM
    /// (median of runs).
    pub busybox_tar_secs: f64,
    /// busybox tar's seconds in kimg-init's VM afterwards, page cache dropped
    /// (median of runs).
    pub busybox_tar_same_vm_secs: f64,
    /// busybox (fresh VM) / kimg-init (> 1: kimg-init faster).
    pub unpack_speedup: f64,
}

/// Archives of the benchmark: 4 plain tars of many files of mixed sizes.
fn make_overlays(dir: &Path, mb: u64) -> Result<Vec<PathBuf>, BenchError> {
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let per = mb * 1_000_000 / 4;
    let mut out = Vec::new();
    for k in 0..4 {
        let path = dir.join(format!("bench{k}.tar"));
        let f = fs::File::create(&path).map_err(step("create archive"))?;
        let mut b = tar::Builder::new(std::io::BufWriter::new(f));
        let mut written = 0u64;
        let mut i = 0;
        while written < per {
            // Sizes from 1 KiB to 1 MiB; half the content compressible text.
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let size = 1024 + (seed % (1 << 20)) as usize;
            let mut data = vec![0u8; size];
            let mut s = seed;
            for chunk in data.chunks_mut(8) {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let bytes = s.to_le_bytes();
                chunk.copy_from_slice(&bytes[..chunk.len()]);
            }
            let mut h = tar::Header::new_gnu();
            h.set_size(size as u64);
            h.set_mode(0o644);
            h.set_mtime(1_700_000_000);
            let name = format!("srv/bench{k}/d{:03}/f{i:05}", i % 50);
            b.append_data(&mut h, &name, &data[..])
                .map_err(step("write archive"))?;
            written += size as u64;
            i += 1;
        }
        b.into_inner()
            .and_then(|mut w| w.flush())
            .map_err(step("finish archive"))?;
        out.push(path);
    }
    Ok(out)
}

/// Runs the benchmark; `log` gets one line per measurement.
pub fn run(opts: &CdromBenchOptions, log: &dyn Fn(&str)) -> Result<CdromBenchReport, BenchError> {
    let src = opts.scratch.join("overlays");
    fs::create_dir_all(&src).map_err(step("scratch dir"))?;
    log(&format!("making {} MB of overlay archives", opts.mb));
    let archives = make_overlays(&src, opts.mb)?;
    let overlay_bytes = archives
        .iter()
        .map(|a| fs::metadata(a).map_or(0, |m| m.len()))
        .sum();
    let ovs: Vec<Overlay> = archives
        .iter()
        .map(|a| Overlay {
            name: a
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            source: Source::Archive(a.clone(), ".tar"),
            requires: vec![],
        })
        .collect();
    // xorriso gets a directory holding the same files under the same names.
    let xdir = opts.scratch.join("xorriso-in");
    fs::create_dir_all(&xdir).map_err(step("scratch dir"))?;
    for (i, (ov, a)) in ovs.iter().zip(&archives).enumerate() {
        fs::hard_link(a, xdir.join(overlay::cdrom_name(i, ov))).map_err(step("link archive"))?;
    }
    let kimg_iso = opts.scratch.join("kimg.iso");
    let x_iso = opts.scratch.join("xorriso.iso");
    let (mut k_secs, mut x_secs) = (Vec::new(), Vec::new());
    // One warm-up of each (page cache), then alternate.
    for i in 0..=opts.runs {
        let t = Instant::now();
        overlay::mkcdrom(&kimg_iso, &ovs).map_err(step("kimg mkcdrom"))?;
        let k = t.elapsed().as_secs_f64();
        let t = Instant::now();
        kimg_util::cmd::run(
            kimg_util::cmd::command("xorriso")
                .args(["-as", "mkisofs", "-R", "-V", "kimg", "-quiet", "-o"])
                .arg(&x_iso)
                .arg(&xdir),
        )
        .map_err(step("xorriso"))?;
        let x = t.elapsed().as_secs_f64();
        if i > 0 {
            log(&format!("mkcdrom run {i}: kimg {k:.3}s, xorriso {x:.3}s"));
            k_secs.push(k);
            x_secs.push(x);
        }
    }
    let mkcdrom_speedup = median(&x_secs) / median(&k_secs).max(1e-9);

    log("unpacking: kimg-init at boot in one VM, busybox tar first thing in another");
    let runtime = opts.scratch.join("rt");
    std::env::set_var("KIMG_RUNTIME_DIR", &runtime);
    let ro = RunOptions {
        name: "bench-cdrom".into(),
        image: opts.image.clone(),
        nodes: 1,
        mem_mb: Some(1024),
        cpus: Some(1),
        accel: opts.accel,
        wait: Some(Wait::vms(Duration::from_secs(900))),
        cdrom: Some(kimg_iso.clone()),
        ..RunOptions::default()
    };
    let fresh = RunOptions {
        name: "bench-cdrom-bb".into(),
        append: format!("{}=off", kimg_contract::cmdline::KEY_CDROM),
        ..ro.clone()
    };
    let (mut kimg_init, mut bb_same, mut bb_fresh) = (Vec::new(), Vec::new(), Vec::new());
    // Alternate the two VMs, one at a time, so host load hits both alike.
    for i in 1..=opts.runs {
        let a = in_guest(&ro, &ovs);
        let _ = cluster::stop(&ro.name, Duration::from_secs(20));
        let (k, same) = a?;
        let b = busybox_first(&fresh);
        let _ = cluster::stop(&fresh.name, Duration::from_secs(20));
        let bb = b?;
        log(&format!(
            "unpack run {i}: kimg-init {k:.2}s, busybox tar in a fresh VM {bb:.2}s \
             (after kimg-init in its VM {same:.2}s)"
        ));
        kimg_init.push(k);
        bb_same.push(same);
        bb_fresh.push(bb);
    }
    let (kimg_init_unpack_secs, busybox_tar_secs, busybox_tar_same_vm_secs) =
        (median(&kimg_init), median(&bb_fresh), median(&bb_same));
    Ok(CdromBenchReport {
        overlay_bytes,
        kimg_mkcdrom_secs: k_secs,
        xorriso_secs: x_secs,
        mkcdrom_speedup,
        kimg_init_unpack_secs,
        busybox_tar_secs,
        busybox_tar_same_vm_secs,
        unpack_speedup: busybox_tar_secs / kimg_init_unpack_secs.max(1e-9),
    })
}

/// A shell line timing busybox tar over `files` into /bb (uptime before and after).
fn busybox_script(files: &[String]) -> String {
    format!(
        "mkdir -p /bb && cd /bb && a=$(cut -d' ' -f1 /proc/uptime) && \
         for f in {}; do busybox tar -xf $f || exit 1; done && \
         b=$(cut -d' ' -f1 /proc/uptime) && echo $a $b",
        files.join(" ")
    )
}

/// Runs `script` on vm-001 and reads the two uptimes it prints: their difference.
fn timed(name: &str, script: String) -> Result<f64, BenchError> {
    let argv = vec!["sh".to_string(), "-c".to_string(), script];
    let vm = "vm-001".parse().map_err(step("vm name"))?;
    let r = cluster::exec(name, vm, argv, Some(Duration::from_secs(900)))
        .map_err(step("busybox tar"))?;
    if r.exit_code != 0 {
        return Err(step("busybox tar")(format!(
            "exit {}: {}",
            r.exit_code, r.stderr
        )));
    }
    let v: Vec<f64> = r
        .stdout
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    match v.as_slice() {
        [a, b] => Ok(b - a),
        _ => Err(step("busybox tar")(format!("odd output {:?}", r.stdout))),
    }
}

/// Boots `ro` (its cdrom left alone by kimg-init), mounts the cdrom and times busybox
/// tar over its overlays.
fn busybox_first(ro: &RunOptions) -> Result<f64, BenchError> {
    cluster::run(ro, &|_| {}).map_err(step("kimg run"))?;
    let mnt = "/mnt/cd";
    let mount = format!(
        "mkdir -p {mnt} && for i in $(seq 100); do [ -b /dev/sr0 ] && break; sleep 0.1; done && \
         mount -t iso9660 -o ro /dev/sr0 {mnt} && [ ! -e {applied} ] && ",
        applied = kimg_contract::cdrom::APPLIED_FILE
    );
    let files = vec![format!("{mnt}/[0-9]*")];
    timed(&ro.name, mount + &busybox_script(&files))
}

fn in_guest(ro: &RunOptions, ovs: &[Overlay]) -> Result<(f64, f64), BenchError> {
    cluster::run(ro, &|_| {}).map_err(step("kimg run"))?;
    let (_, vms) = cluster::status(&ro.name).map_err(step("kimg status"))?;
    let st = vms
        .first()
        .and_then(|v| v.agent.clone())
        .ok_or_else(|| step("kimg status")("the VM did not answer"))?;
    if st.overlays.len() != ovs.len() || st.overlays.iter().any(|o| o.result != "ok") {
        return Err(step("kimg-init unpack")(format!("{:?}", st.overlays)));
    }
    let kimg_secs: f64 = st.overlays.iter().map(|o| o.secs).sum();
    let names: Vec<String> = st
        .overlays
        .iter()
        .map(|o| format!("{}/{}", kimg_contract::cdrom::MOUNT_POINT, o.name))
        .collect();
    let drop = "sync; echo 3 > /proc/sys/vm/drop_caches; ".to_string();
    let bb = timed(&ro.name, drop + &busybox_script(&names))?;
    Ok((kimg_secs, bb))
}
