//! What `kimg build` leaves in the initramfs and on the root for kimg-init to find at
//! boot: the stage-1 marker and the `modules.load` lists (path and format).

/// Present only in the initramfs: tells kimg-init to run stage 1.
pub const STAGE1_MARKER: &str = "/etc/kimg/initramfs";

/// What starts every line kimg-init logs (kernel log and console).
pub const LOG_PREFIX: &str = "kimg-init: ";

/// The start of the first line kimg-init logs on the root (after [`LOG_PREFIX`]):
/// where stage 1 ended, for `kimg bench boot`'s breakdown.
pub const STAGE2_BANNER: &str = "stage 2 (root filesystem)";

/// The modules kimg-init loads in this stage (one in the initramfs, one on the root):
/// `.ko` paths relative to `/lib/modules/<uname -r>/`, one per line, dependencies
/// first.
pub const MODULES_LOAD: &str = "/etc/kimg/modules.load";

/// `path` without its leading `/`: where it goes in a staging tree or a cpio archive.
pub fn in_tree(path: &str) -> &str {
    path.trim_start_matches('/')
}

/// The text of a modules.load list.
pub fn modules_load_text<S: AsRef<str>>(paths: impl IntoIterator<Item = S>) -> String {
    let mut text = String::new();
    for p in paths {
        text.push_str(p.as_ref());
        text.push('\n');
    }
    text
}

/// The module paths of a modules.load text, in order; blank lines and `#` comments
/// skipped.
pub fn parse_modules_load(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_load_round_trips() {
        let paths = ["kernel/a.ko", "kernel/drivers/b.ko.xz"];
        assert_eq!(parse_modules_load(&modules_load_text(paths)), paths);
        assert_eq!(parse_modules_load("# c\n\n x.ko \n"), ["x.ko"]);
        assert!(parse_modules_load("").is_empty());
    }

    #[test]
    fn tree_paths_are_relative() {
        assert_eq!(in_tree(STAGE1_MARKER), "etc/kimg/initramfs");
        assert_eq!(in_tree(MODULES_LOAD), "etc/kimg/modules.load");
    }
}
