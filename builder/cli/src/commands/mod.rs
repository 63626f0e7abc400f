//! One module per subcommand: its arguments and a `run` that calls the library.

pub mod apply;
pub mod bench;
pub mod build;
pub mod completions;
pub mod console;
pub mod consoles;
pub mod cp;
pub mod doctor;
pub mod exec;
pub mod fetch;
pub mod images;
pub mod kernel;
pub mod kubectl;
pub mod logs;
pub mod ls;
pub mod mkcdrom;
pub mod publish;
pub mod run;
pub mod scale;
pub mod shell;
pub mod snapshot;
pub mod status;
pub mod stop;
pub mod suspend;

use kimg_cluster::{RunEvent, Wait, WaitFor};
use std::time::Duration;

/// The static kimg-init this binary carries (build.rs builds it for musl); `kimg build`
/// writes it to the cache and uses it unless `--init` or `$KIMG_INIT` names another.
pub const KIMG_INIT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kimg-init"));

/// Exit code of a failed kimg command. (`kimg exec` exits with the command's code;
/// usage errors exit with clap's 2.)
pub const EXIT_FAILURE: u8 = 1;

/// Default cluster name, shared by every cluster subcommand.
pub const DEFAULT_CLUSTER: &str = "kimg";

/// The largest `--wait`, `--timeout` or `--grace` in seconds (a year): anything
/// larger means "forever" and would only overflow the clock arithmetic.
pub const MAX_SECS: u64 = 365 * 24 * 3600;

/// The value parser of a seconds option: 0..=[`MAX_SECS`].
pub fn secs() -> clap::builder::RangedU64ValueParser<u64> {
    clap::value_parser!(u64).range(..=MAX_SECS)
}

/// `--wait`'s value: none (`--wait`), `SECS`, `vms` or `vms:SECS`.
pub fn parse_wait(s: &str) -> Result<Wait, String> {
    let usage = || {
        format!("{s:?}: use --wait, --wait=SECS, --wait=vms or --wait=vms:SECS (SECS a number up to {MAX_SECS})")
    };
    let (what, secs) = match s.strip_prefix("vms") {
        Some("") => (WaitFor::Vms, None),
        Some(rest) => (
            WaitFor::Vms,
            Some(rest.strip_prefix(':').ok_or_else(usage)?),
        ),
        None if s.is_empty() => (WaitFor::Ready, None),
        None => (WaitFor::Ready, Some(s)),
    };
    let limit = secs
        .map(|n| {
            n.parse::<u64>()
                .ok()
                .filter(|n| *n <= MAX_SECS)
                .map(Duration::from_secs)
                .ok_or_else(usage)
        })
        .transpose()?;
    Ok(Wait { what, limit })
}

/// The long help of `--wait`; `vms` says whose agents it waits for.
pub fn wait_help(vms: &str) -> String {
    format!(
        "Wait until ready, at most SECS seconds in all:\n\
         --wait, --wait=SECS: {vms} report ready (or degraded), then on a Kubernetes image \
         its control plane on vm-001: the apiserver answers /readyz and the service account \
         `default` exists in namespace `default`, so that pods and deployments are taken at \
         once. SECS defaults to 120, 600 on a Kubernetes image.\n\
         --wait=vms, --wait=vms:SECS: {vms} report ready (or degraded), nothing more. SECS \
         defaults to 120."
    )
}

/// Up to this many VMs, a start prints a line per VM started and ready; above, a
/// progress line ([`RunEvent::Progress`]).
const LINES_PER_VM_UP_TO: usize = 20;

/// The progress lines of starting `total` VMs (`kimg run`, `run --from`, `resume`,
/// `scaleout`; 0 when not known up front) on stderr, as `kimg CMD: ...`: a line per
/// VM up to [`LINES_PER_VM_UP_TO`] VMs, else a progress line (rewritten in place on a
/// terminal, else one per 10 VMs). `started` says what happened to a VM's QEMU
/// ("started", "restored"), `name` is the cluster's. Nothing when `quiet`.
pub fn start_progress<'a>(
    cmd: &'a str,
    name: &'a str,
    started: &'a str,
    total: usize,
    quiet: bool,
) -> impl Fn(RunEvent) + Sync + 'a {
    use std::io::IsTerminal;
    let big = total > LINES_PER_VM_UP_TO;
    let tty = std::io::stderr().is_terminal();
    // The progress line shown last (an unchanged one is not printed again).
    let last = std::sync::Mutex::new(String::new());
    move |ev| {
        if quiet {
            return;
        }
        match ev {
            RunEvent::Replaced => {
                eprintln!("kimg {cmd}: stopped the running cluster {name:?} first")
            }
            RunEvent::Accel(acc, m) => eprintln!(
                "kimg {cmd}: accelerator {}, machine {}",
                acc.as_str(),
                m.as_str()
            ),
            RunEvent::Ksm(kimg_cluster::ksm::KsmOutcome::TurnedOn) => eprintln!(
                "kimg {cmd}: turned on KSM (/sys/kernel/mm/ksm/run): the VMs share their identical pages; the stop that leaves no QEMU running turns it off"
            ),
            RunEvent::Ksm(kimg_cluster::ksm::KsmOutcome::Unavailable(why)) => eprintln!(
                "kimg {cmd}: KSM not turned on ({why}): each VM holds its own copy of identical pages"
            ),
            RunEvent::Ksm(kimg_cluster::ksm::KsmOutcome::AlreadyOn) => {}
            RunEvent::Started(vm) if !big => eprintln!("kimg {cmd}: {vm} {started}"),
            RunEvent::Ready(vm, st, t) if !big => eprintln!(
                "kimg {cmd}: {vm} {} after {:.2}s",
                serde_json::to_string(&st)
                    .unwrap_or_default()
                    .trim_matches('"'),
                t.as_secs_f64()
            ),
            RunEvent::Started(_) | RunEvent::Ready(..) => {}
            RunEvent::Waiting(vm, what) => eprintln!("kimg {cmd}: {vm} {what}"),
            RunEvent::Passed(vm, what, t) => {
                eprintln!("kimg {cmd}: {vm} {what} after {:.2}s", t.as_secs_f64())
            }
            RunEvent::Progress {
                started: up,
                booted,
                total,
            } if big => {
                let line = format!("kimg {cmd}: {up}/{total} started, {booted} booted");
                let Ok(mut last) = last.lock() else {
                    return;
                };
                let step = (up + booted) % 10 == 0 || booted == total;
                if *last != line && (tty || step) {
                    if tty {
                        eprint!("\r{line}");
                        if booted == total {
                            eprintln!();
                        }
                    } else {
                        eprintln!("{line}");
                    }
                    *last = line;
                }
            }
            RunEvent::Progress { .. } => {}
        }
    }
}

/// This terminal in raw mode (`kimg console`, `kimg shell`): keys go to the VM as
/// typed. Restores the saved mode when dropped, on errors too; stdin that is no
/// terminal is left alone (bytes pass through as they are).
pub struct RawMode(Option<nix::sys::termios::Termios>);

impl RawMode {
    /// Puts stdin's terminal into raw mode, if stdin is one.
    pub fn enter() -> RawMode {
        use nix::sys::termios::{self, SetArg};
        let stdin = std::io::stdin();
        let Ok(saved) = termios::tcgetattr(&stdin) else {
            return RawMode(None);
        };
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        let _ = termios::tcsetattr(&stdin, SetArg::TCSANOW, &raw);
        RawMode(Some(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let mode = nix::sys::termios::SetArg::TCSANOW;
            let _ = nix::sys::termios::tcsetattr(std::io::stdin(), mode, saved);
        }
    }
}

/// Parses sizes like `2G`, `512M`, `1073741824`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (s, 1u64),
        Some((i, _)) => {
            let mult = match s[i..]
                .to_ascii_uppercase()
                .trim_end_matches("IB")
                .trim_end_matches('B')
            {
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(format!("{s:?}: use a number with K, M, G or T (e.g. 2G)")),
            };
            (&s[..i], mult)
        }
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?}: use a number with K, M, G or T (e.g. 2G)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_for_the_cluster_or_the_vms_alone_with_or_without_seconds() {
        let ready = |limit| Wait {
            what: WaitFor::Ready,
            limit,
        };
        let vms = |limit| Wait {
            what: WaitFor::Vms,
            limit,
        };
        let secs = |n| Some(Duration::from_secs(n));
        assert_eq!(parse_wait(""), Ok(ready(None)));
        assert_eq!(parse_wait("600"), Ok(ready(secs(600))));
        assert_eq!(parse_wait("0"), Ok(ready(secs(0))));
        assert_eq!(parse_wait("vms"), Ok(vms(None)));
        assert_eq!(parse_wait("vms:30"), Ok(vms(secs(30))));
        let max = MAX_SECS.to_string();
        assert_eq!(parse_wait(&max), Ok(ready(secs(MAX_SECS))));
        let over = (MAX_SECS + 1).to_string();
        for bad in [
            "vms:", "vms30", "vms:x", "vm", "VMS", "ready", "-1", "1.5", "30s", &over,
        ] {
            let e = parse_wait(bad).unwrap_err();
            assert!(e.contains("--wait=vms:SECS"), "{bad}: {e}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("2X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
