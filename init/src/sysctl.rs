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
            Some((k, v)) => match check_key(k.trim()) {
                Ok(()) => settings.push((k.trim().to_string(), v.trim().to_string())),
                Err(why) => errors.push(format!("line {}: key {:?}: {why}", n + 1, k.trim())),
            },
            None => errors.push(format!(
                "line {}: expected key = value, got {line:?}",
                n + 1
            )),
        }
    }
    (settings, errors)
}

/// Why `key` cannot name a file under /proc/sys, if it cannot. Each dot-separated
/// component must be non-empty and free of `/`, NUL and blanks: an empty one would
/// make an absolute path (`.dev.vda` -> `/dev/vda`, which `join` puts outside
/// /proc/sys) or a `//`, and a `/` would smuggle in `..` or a second separator.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("empty key".into());
    }
    if let Some(c) = key
        .chars()
        .find(|c| *c == '/' || *c == '\0' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "{c:?} is not allowed in a key (dot-separated names under {PROC_SYS})"
        ));
    }
    if key.split('.').any(str::is_empty) {
        return Err(format!(
            "empty component (a leading, trailing or doubled dot); keys are dot-separated names under {PROC_SYS}"
        ));
    }
    Ok(())
}

/// The /proc/sys file of a dotted key, or why the key names none (see [`check_key`]).
pub fn proc_path(key: &str) -> Result<PathBuf, String> {
    check_key(key)?;
    Ok(Path::new(PROC_SYS).join(key.replace('.', "/")))
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
            let written =
                proc_path(&k).and_then(|p| std::fs::write(p, &v).map_err(|e| e.to_string()));
            if let Err(e) = written {
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
            proc_path("net.ipv4.ip_forward").unwrap(),
            Path::new("/proc/sys/net/ipv4/ip_forward")
        );
    }

    /// Issue 15, defect 10: `.dev.vda` became `/dev/vda` (an absolute path that
    /// `join` put in place of /proc/sys). Every key that is not plain dot-separated
    /// names is refused with its line, and no path outside /proc/sys comes out.
    #[test]
    fn keys_that_leave_proc_sys_are_refused() {
        let bad = [
            ".dev.vda",
            "dev.vda.",
            "net..ipv4",
            "...",
            "net/../../dev/vda",
            "/dev/vda",
            "net.ipv4 .x",
            "a.\0b",
        ];
        for key in bad {
            assert!(proc_path(key).is_err(), "{key:?}");
            let (s, e) = parse(&format!("{key} = 1\n"));
            assert!(s.is_empty(), "{key:?}: {s:?}");
            assert_eq!(e.len(), 1, "{key:?}: {e:?}");
            assert!(e[0].starts_with("line 1: key"), "{e:?}");
        }
        let (_, e) = parse(".dev.vda = pwned");
        assert!(e[0].contains("empty component"), "{e:?}");
        for key in [
            "kernel.pid_max",
            "net.ipv4.conf.eth0.forwarding",
            "a-b_c.d:e",
        ] {
            let p = proc_path(key).unwrap();
            assert!(
                p.starts_with(PROC_SYS) && p.components().count() > 3,
                "{p:?}"
            );
            assert!(!p.components().any(|c| c.as_os_str() == ".."), "{p:?}");
        }
    }
}
