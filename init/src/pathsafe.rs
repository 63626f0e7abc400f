//! Where an archive entry may go: pure path logic of the overlay unpacker.
//!
//! Entry paths are normalised (a leading `/` and `.` components dropped, `..`
//! refused), then resolved against the tree being written the way the kernel would
//! inside a chroot of that tree: every symlink met on the way (one an earlier entry
//! made included) is followed through `lookup`. The result must stay out of
//! [`FORBIDDEN_TOP`] (/proc, /sys, /dev, /run, where the cdrom is mounted). Each
//! component of a resolved path was looked up and is not a symlink, so the
//! caller can create the entry at the resolved path without following anything.

use kimg_contract::cdrom::FORBIDDEN_TOP;
use std::collections::VecDeque;
use std::fmt;

/// Symlinks followed while resolving one path before it counts as a loop (as Linux).
pub const MAX_LINKS: usize = 40;

/// Why an entry is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The path has a `..` component.
    DotDot,
    /// Nothing left after normalising (the root itself).
    Empty,
    /// The path (after following symlinks) leads into a forbidden tree.
    Forbidden(String),
    /// Too many symlinks.
    Loop,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::DotDot => f.write_str("path has a '..' component"),
            Refusal::Empty => f.write_str("path names the root itself"),
            Refusal::Forbidden(top) => write!(f, "leads into /{top}, which overlays never touch"),
            Refusal::Loop => write!(f, "more than {MAX_LINKS} symlinks"),
        }
    }
}

/// A path as components relative to the root of the tree.
pub type Components = Vec<Vec<u8>>;

/// Answers "is this prefix a symlink, and to what?" for [`resolve`].
pub type Lookup<'a> = dyn FnMut(&[Vec<u8>]) -> Option<Vec<u8>> + 'a;

/// Splits an entry path into components: a leading `/` and `.` components go (as GNU
/// tar strips them), `..` is refused, an empty result is refused.
pub fn entry_components(path: &[u8]) -> Result<Components, Refusal> {
    let mut out = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(Refusal::DotDot),
            c => out.push(c.to_vec()),
        }
    }
    if out.is_empty() {
        return Err(Refusal::Empty);
    }
    Ok(out)
}

fn forbidden(top: &[u8]) -> Option<String> {
    FORBIDDEN_TOP
        .iter()
        .find(|f| f.as_bytes() == top)
        .map(|f| f.to_string())
}

/// Resolves `comps` against the tree. `lookup(prefix)` returns the target of the
/// symlink at `prefix` (components from the root), or `None` when it is not a
/// symlink (or does not exist). With `follow_last` a symlink in the last place is
/// followed too. `..` in link targets goes up, never above the root. A path that
/// enters a forbidden tree at any point is refused, even if it would leave again.
pub fn resolve(
    comps: &[Vec<u8>],
    follow_last: bool,
    lookup: &mut Lookup<'_>,
) -> Result<Components, Refusal> {
    let mut done: Components = Vec::new();
    let mut todo: VecDeque<Vec<u8>> = comps.iter().cloned().collect();
    let mut links = 0;
    while let Some(c) = todo.pop_front() {
        match c.as_slice() {
            b"" | b"." => continue,
            b".." => {
                done.pop();
                continue;
            }
            _ => {}
        }
        done.push(c);
        if done.len() == 1 {
            if let Some(top) = forbidden(&done[0]) {
                return Err(Refusal::Forbidden(top));
            }
        }
        let last = todo.is_empty();
        if last && !follow_last {
            break;
        }
        if let Some(target) = lookup(&done) {
            links += 1;
            if links > MAX_LINKS {
                return Err(Refusal::Loop);
            }
            done.pop();
            if target.first() == Some(&b'/') {
                done.clear();
            }
            for t in target.split(|&b| b == b'/').rev() {
                todo.push_front(t.to_vec());
            }
        }
    }
    if done.is_empty() {
        return Err(Refusal::Empty);
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn c(p: &str) -> Components {
        entry_components(p.as_bytes()).unwrap()
    }

    fn links(pairs: &[(&str, &str)]) -> HashMap<Components, Vec<u8>> {
        pairs
            .iter()
            .map(|(l, t)| (c(l), t.as_bytes().to_vec()))
            .collect()
    }

    fn res(tree: &HashMap<Components, Vec<u8>>, p: &str, follow: bool) -> Result<String, Refusal> {
        resolve(&c(p), follow, &mut |pre| tree.get(pre).cloned()).map(|v| {
            v.iter()
                .map(|x| String::from_utf8_lossy(x).into_owned())
                .collect::<Vec<_>>()
                .join("/")
        })
    }

    #[test]
    fn entry_paths_are_normalised_or_refused() {
        assert_eq!(c("/etc//./x"), c("etc/x"));
        assert_eq!(entry_components(b"../etc"), Err(Refusal::DotDot));
        assert_eq!(entry_components(b"a/../../b"), Err(Refusal::DotDot));
        assert_eq!(entry_components(b"./"), Err(Refusal::Empty));
        assert_eq!(entry_components(b"/"), Err(Refusal::Empty));
    }

    #[test]
    fn forbidden_trees_directly_and_through_symlinks() {
        let t = links(&[
            ("p", "/proc"),
            ("disk", "/dev/vda"),
            ("rel", "../../../dev"),
            ("usr/x", "../../run/kimg/cdrom"),
            ("bin", "usr/bin"),
            ("var/run", "/run"),
            ("loop", "loop"),
            ("a", "b"),
            ("b", "a"),
        ]);
        let forb = |p: &str| Err(Refusal::Forbidden(p.into()));
        assert_eq!(res(&t, "dev/vda", false), forb("dev"));
        assert_eq!(res(&t, "proc/sysrq-trigger", false), forb("proc"));
        assert_eq!(res(&t, "p/sysrq-trigger", false), forb("proc"));
        assert_eq!(res(&t, "disk", true), forb("dev"));
        assert_eq!(res(&t, "rel/vda", false), forb("dev"));
        assert_eq!(res(&t, "usr/x/f", false), forb("run"));
        assert_eq!(res(&t, "var/run/f", false), forb("run"));
        assert_eq!(res(&t, "sys", true), forb("sys"));
        assert_eq!(res(&t, "loop/x", false), Err(Refusal::Loop));
        assert_eq!(res(&t, "a/x", false), Err(Refusal::Loop));
        // The symlink itself may be replaced (last component not followed).
        assert_eq!(res(&t, "disk", false).unwrap(), "disk");
        assert_eq!(res(&t, "bin/sh", false).unwrap(), "usr/bin/sh");
        assert_eq!(res(&t, "bin", true).unwrap(), "usr/bin");
        assert_eq!(res(&t, "etc/runlevel", false).unwrap(), "etc/runlevel");
    }

    /// Randomised: whatever symlinks exist and whatever the entry path, a resolved
    /// path never starts in a forbidden tree, never has `.`/`..`/empty components,
    /// and every proper prefix of it is not a symlink.
    #[test]
    fn randomised_paths_and_links_never_escape() {
        let words: &[&str] = &[
            "a", "b", "dev", "proc", "run", "sys", "etc", "..", ".", "", "/", "x", "vda",
        ];
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut rnd = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for _ in 0..20_000 {
            let path = |rnd: &mut dyn FnMut(usize) -> usize| {
                let n = 1 + rnd(5);
                let mut s = String::new();
                if rnd(3) == 0 {
                    s.push('/');
                }
                for i in 0..n {
                    if i > 0 {
                        s.push('/');
                    }
                    s.push_str(words[rnd(words.len())]);
                }
                s
            };
            let mut tree = HashMap::new();
            for _ in 0..rnd(6) {
                let l = path(&mut rnd);
                let t = path(&mut rnd);
                if let Ok(lc) = entry_components(l.as_bytes()) {
                    tree.insert(lc, t.into_bytes());
                }
            }
            let p = path(&mut rnd);
            let Ok(comps) = entry_components(p.as_bytes()) else {
                assert!(p.split('/').any(|w| w == "..") || p.trim_matches(['/', '.']).is_empty());
                continue;
            };
            let follow = rnd(2) == 0;
            if let Ok(r) = resolve(&comps, follow, &mut |pre| tree.get(pre).cloned()) {
                assert!(forbidden(&r[0]).is_none(), "{p} -> {r:?} via {tree:?}");
                for x in &r {
                    assert!(!matches!(x.as_slice(), b"" | b"." | b".."), "{r:?}");
                }
                for i in 1..r.len() {
                    assert!(
                        !tree.contains_key(&r[..i]),
                        "{p}: prefix of {r:?} is a link"
                    );
                }
                if follow {
                    assert!(!tree.contains_key(&r), "{p}: {r:?} is a link");
                }
            }
        }
    }
}
