//! Container images imported at build time: a private containerd on the build host
//! (the same Debian binary the image carries, so the same store format) imports
//! the image tarballs into the image's own `/var/lib/containerd`, in the k8s.io
//! namespace and unpacked for the overlayfs snapshotter, which the nodes' CRI uses.
//! A node then boots with its images in place: importing agnhost (33 MB) at boot
//! took ~30 s of guest CPU on every node under TCG, all nodes at once.
//!
//! containerd mounts while it unpacks, so this needs root; other builds leave the
//! tarballs in [`IMAGES_DIR`](super::IMAGES_DIR) for the boot-time import.

use super::K8sError;
use kimg_util::cmd;
use kimg_util::fs::{IoError, PathContext};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// containerd's root in the guest (rootfs/k8s.toml's `root`), below which the
/// image's files keep the owners their layers give them.
pub const CONTAINERD_ROOT: &str = "/var/lib/containerd";
/// The manifest's path for an image imported at build time: `containerd:k8s.io/NAME`
/// (like `esp:/...`, a place that is not a file of the root filesystem).
pub const COMPONENT_PREFIX: &str = "containerd:k8s.io/";

/// How long containerd may take to open its socket, or to exit once told.
const DAEMON_WAIT: Duration = Duration::from_secs(30);

/// Why images cannot be imported at build time here, if they cannot.
pub fn unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root (containerd mounts while it unpacks)".into());
    }
    ["containerd", "ctr"]
        .iter()
        .find(|p| !cmd::exists(p))
        .map(|p| format!("no {p} on this host"))
}

/// A containerd of our own, killed when dropped whatever happened.
struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Starts containerd with its root at `root` and its state, socket and log in
    /// `work`; returns once it answers on its socket.
    fn start(root: &Path, work: &Path) -> Result<Daemon, K8sError> {
        let state = work.join("state");
        let socket = work.join("containerd.sock");
        let config = work.join("config.toml");
        // Only what an import needs: no CRI (it would set up networking and
        // serve kubelets), no /opt plugin (it writes to the host's /opt).
        let text = format!(
            "version = 2\nroot = {root:?}\nstate = {state:?}\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\", \"io.containerd.internal.v1.opt\", \
             \"io.containerd.snapshotter.v1.btrfs\", \"io.containerd.snapshotter.v1.zfs\", \
             \"io.containerd.snapshotter.v1.devmapper\", \"io.containerd.snapshotter.v1.aufs\"]\n\
             [grpc]\n  address = {socket:?}\n[ttrpc]\n  address = \"{}.ttrpc\"\n",
            socket.display()
        );
        fs::write(&config, text).with_path(&config)?;
        let log = work.join("containerd.log");
        let log_file = fs::File::create(&log).with_path(&log)?;
        let mut command = cmd::command("containerd");
        command
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().with_path(&log)?)
            .stderr(log_file);
        let child = command
            .spawn()
            .map_err(|e| K8sError::Preload(cmd::spawn_error(&command, e).to_string()))?;
        let mut daemon = Daemon { child, socket };
        let t = Instant::now();
        loop {
            if daemon
                .ctr()
                .arg("version")
                .output()
                .is_ok_and(|o| o.status.success())
            {
                return Ok(daemon);
            }
            if let Ok(Some(status)) = daemon.child.try_wait() {
                return Err(K8sError::Preload(format!(
                    "containerd exited ({status}) at start: {}",
                    tail(&log)
                )));
            }
            if t.elapsed() > DAEMON_WAIT {
                return Err(K8sError::Preload(format!(
                    "containerd did not answer within {DAEMON_WAIT:?}: {}",
                    tail(&log)
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn ctr(&self) -> Command {
        let mut c = cmd::command("ctr");
        c.arg("--address").arg(&self.socket).args(["-n", "k8s.io"]);
        c
    }

    /// Stops containerd with SIGTERM so its databases are closed cleanly.
    fn stop(mut self) -> Result<(), K8sError> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let t = Instant::now();
        while t.elapsed() < DAEMON_WAIT {
            if let Ok(Some(_)) = self.child.try_wait() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(K8sError::Preload(format!(
            "containerd did not exit within {DAEMON_WAIT:?} of SIGTERM"
        )))
    }
}

/// The last lines of containerd's log, for an error.
fn tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

/// Imports `tarballs` (name, file) into the containerd store at `root` (the staging
/// tree's [`CONTAINERD_ROOT`]); `work` holds containerd's state and socket (a
/// unix socket path must stay short).
pub fn import(tarballs: &[(String, PathBuf)], root: &Path) -> Result<(), K8sError> {
    fs::create_dir_all(root).with_path(root)?;
    let work = tempfile::Builder::new()
        .prefix("kimg-ctrd-")
        .tempdir()
        .map_err(|e| IoError::new(std::env::temp_dir(), e))?;
    let daemon = Daemon::start(root, work.path())?;
    for (_, file) in tarballs {
        let o = daemon
            .ctr()
            .args(["images", "import", "--snapshotter", "overlayfs"])
            .arg(file)
            .output()
            .map_err(|e| IoError::new(file, e))?;
        if !o.status.success() {
            return Err(K8sError::Image {
                path: file.clone(),
                why: format!(
                    "containerd refused it: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
            });
        }
    }
    daemon.stop()
}
