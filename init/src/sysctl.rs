//! Kernel parameters from `/etc/sysctl.d/*.conf` (the format of sysctl.conf(5)),
//! applied after the stage-2 modules are loaded (bridge-nf-call-* need br_netfilter).

use std::path::{Path, PathBuf};

/// Where sysctl files come from (the image or any overlay).
pub const SYSCTL_DIR: &str = "/etc/sysctl.d";
/// Root of the kernel parameters.
const PROC_SYS: &str = "/proc/sys";

/// Parses one sysctl file: `key = value` lines; `#` and `;` start comments.
/// Malformed lines come back as errors with their line numbers.
pub fn parse(text: &str) -> (Vec<(String, String)>, Vec<String>) {
    let mut settings = Vec::new();
    let mut errors = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        match line.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() && !k.contains("..") && !k.contains('/') => {
                settings.push((k.trim().to_string(), v.trim().to_string()))
            }
            _ => errors.push(format!(
                "line {}: expected key = value, got {line:?}",
                n + 1
            )),
        }
    }
    (settings, errors)
}

/// The /proc/sys file of a dotted key.
pub fn proc_path(key: &str) -> PathBuf {
    Path::new(PROC_SYS).join(key.replace('.', "/"))
}

/// Applies every `*.conf` of the directory in name order; returns problems.
pub fn apply_dir(dir: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return problems;
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "conf"))
        .collect();
    files.sort();
    for f in files {
        let text = match std::fs::read_to_string(&f) {
            Ok(t) => t,
            Err(e) => {
                problems.push(format!("{}: {e}", f.display()));
                continue;
            }
        };
        let (settings, errors) = parse(&text);
        problems.extend(errors.into_iter().map(|e| format!("{}: {e}", f.display())));
        for (k, v) in settings {
            if let Err(e) = std::fs::write(proc_path(&k), &v) {
                problems.push(format!("{}: {k} = {v}: {e}", f.display()));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keys_values_and_reports_bad_lines() {
        let (s, e) = parse("# c\n; c\nnet.ipv4.ip_forward = 1\nkernel.x=a b\n\nbogus\n../x = 1\n");
        assert_eq!(
            s,
            [
                ("net.ipv4.ip_forward".into(), "1".into()),
                ("kernel.x".into(), "a b".into())
            ]
        );
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].starts_with("line 6"), "{e:?}");
        assert_eq!(
            proc_path("net.ipv4.ip_forward"),
            Path::new("/proc/sys/net/ipv4/ip_forward")
        );
    }
}
