//! Kernel `.config` parsing and checking a config against kimg's requirement fragments.
//!
//! Full configs and fragments (`kernel-configs/*.config`) share the syntax:
//! `CONFIG_X=y|m|n|"string"|123|0x1f`, `# CONFIG_X is not set`, comments, blank lines.
//! One kimg extension, invisible to Kconfig and merge_config.sh: a `=y` line ending in
//! the comment [`BUILTIN_MARKER`] asks for built in only (a module is not enough).

use kimg_contract::Flavour;
use kimg_util::fs::IoError;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Parsing or reading a kernel config failed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read or decompressed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// A line is not valid config syntax.
    #[error("line {line}: {reason}: {text:?}")]
    Syntax {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: &'static str,
        /// The offending line.
        text: String,
    },
    /// The same symbol is set twice.
    #[error("{symbol} is set twice, on lines {first} and {second}")]
    Duplicate {
        /// The symbol, with its `CONFIG_` prefix.
        symbol: String,
        /// Line of the first setting.
        first: usize,
        /// Line of the second setting.
        second: usize,
    },
    /// A config file failed to parse; wraps the line error with the file name.
    #[error("{}: {source}", path.display())]
    InFile {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: Box<ConfigError>,
    },
}

/// The value of one config symbol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigValue {
    /// `=y`: built in.
    Yes,
    /// `=m`: built as a module.
    Module,
    /// `=n` or `# CONFIG_X is not set`.
    No,
    /// A quoted string, unescaped.
    Str(String),
    /// A decimal or `0x` hex number, as written.
    Number(String),
}

impl ConfigValue {
    /// The number's value, when this is a number that fits in an i128.
    fn numeric(&self) -> Option<i128> {
        let ConfigValue::Number(text) = self else {
            return None;
        };
        match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
            Some(hex) => i128::from_str_radix(hex, 16).ok(),
            None => text.parse().ok(),
        }
    }
}

impl fmt::Display for ConfigValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigValue::Yes => f.write_str("y"),
            ConfigValue::Module => f.write_str("m"),
            ConfigValue::No => f.write_str("n"),
            ConfigValue::Str(s) => write!(f, "{s:?}"),
            ConfigValue::Number(n) => f.write_str(n),
        }
    }
}

/// A parsed kernel config or fragment: symbol (with `CONFIG_` prefix) to value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelConfig {
    /// Every symbol mentioned, including `is not set` ones (as [`ConfigValue::No`]).
    pub symbols: BTreeMap<String, ConfigValue>,
    /// Symbols whose `=y` line carries [`BUILTIN_MARKER`]: a module does not satisfy them.
    pub builtin: BTreeSet<String>,
}

/// Trailing comment on a fragment's `CONFIG_X=y` line: "built in; a module is not
/// enough" (e.g. what must work before any module can be loaded).
pub const BUILTIN_MARKER: &str = "# kimg: builtin";

impl KernelConfig {
    /// Parses config text. A symbol set twice is an error naming both lines: in a
    /// fragment that is always a mistake, and a real `.config` never has one.
    pub fn parse(text: &str) -> Result<KernelConfig, ConfigError> {
        let mut symbols = BTreeMap::new();
        let mut builtin = BTreeSet::new();
        let mut lines_of: BTreeMap<String, usize> = BTreeMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let Some((symbol, value, marked)) = parse_line(raw, line)? else {
                continue;
            };
            if let Some(&first) = lines_of.get(&symbol) {
                return Err(ConfigError::Duplicate {
                    symbol,
                    first,
                    second: line,
                });
            }
            lines_of.insert(symbol.clone(), line);
            if marked {
                builtin.insert(symbol.clone());
            }
            symbols.insert(symbol, value);
        }
        Ok(KernelConfig { symbols, builtin })
    }

    /// Merges configs in order: a symbol set in a later one wins (with its marker, or
    /// none). Duplicates inside one config were already refused by [`KernelConfig::parse`].
    pub fn merge<'a>(parts: impl IntoIterator<Item = &'a KernelConfig>) -> KernelConfig {
        let mut out = KernelConfig::default();
        for part in parts {
            for (symbol, value) in &part.symbols {
                out.builtin.remove(symbol);
                out.symbols.insert(symbol.clone(), value.clone());
            }
            out.builtin.extend(part.builtin.iter().cloned());
        }
        out
    }

    /// Renders the config in `.config` syntax (`n` as `# CONFIG_X is not set`), without
    /// kimg's markers: what Kconfig reads.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for (symbol, value) in &self.symbols {
            match value {
                ConfigValue::No => out.push_str(&format!("# {symbol} is not set\n")),
                ConfigValue::Str(s) => {
                    let escaped = s.replace('\\', "\\\\").replace('"', "\\\"");
                    out.push_str(&format!("{symbol}=\"{escaped}\"\n"));
                }
                v => out.push_str(&format!("{symbol}={v}\n")),
            }
        }
        out
    }

    /// Reads and parses a config file, plain or gzip-compressed (`/proc/config.gz`).
    pub fn from_file(path: &Path) -> Result<KernelConfig, ConfigError> {
        let io_err = |source| ConfigError::Io(IoError::new(path.to_path_buf(), source));
        let bytes = std::fs::read(path).map_err(io_err)?;
        let text = if bytes.starts_with(&[0x1f, 0x8b]) {
            let mut s = String::new();
            flate2::read::GzDecoder::new(&bytes[..])
                .read_to_string(&mut s)
                .map_err(io_err)?;
            s
        } else {
            String::from_utf8(bytes)
                .map_err(|e| io_err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?
        };
        KernelConfig::parse(&text).map_err(|e| ConfigError::InFile {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    }

    /// The value of `symbol` (with `CONFIG_` prefix), if mentioned.
    pub fn get(&self, symbol: &str) -> Option<&ConfigValue> {
        self.symbols.get(symbol)
    }
}

/// Parses one line: `None` for blank lines and comments; else the symbol, its value and
/// whether the line carries [`BUILTIN_MARKER`].
fn parse_line(raw: &str, line: usize) -> Result<Option<(String, ConfigValue, bool)>, ConfigError> {
    let err = |reason| ConfigError::Syntax {
        line,
        reason,
        text: raw.to_string(),
    };
    let mut text = raw.trim();
    let mut marked = false;
    if let Some(head) = text.strip_suffix(BUILTIN_MARKER) {
        if !head.starts_with('#') {
            if head.trim_end().strip_suffix("=y").is_none() {
                return Err(err("`# kimg: builtin` only goes after =y"));
            }
            text = head.trim_end();
            marked = true;
        }
    }
    if let Some(comment) = text.strip_prefix('#') {
        // `# CONFIG_X is not set` is a value; any other comment is ignored.
        let comment = comment.trim();
        if let Some(symbol) = comment
            .strip_suffix(" is not set")
            .filter(|s| s.starts_with("CONFIG_"))
        {
            if !valid_symbol(symbol) {
                return Err(err("bad symbol name"));
            }
            return Ok(Some((symbol.to_string(), ConfigValue::No, false)));
        }
        return Ok(None);
    }
    if text.is_empty() {
        return Ok(None);
    }
    let (symbol, value) = text
        .split_once('=')
        .ok_or_else(|| err("expected CONFIG_X=value"))?;
    if !valid_symbol(symbol) {
        return Err(err("bad symbol name"));
    }
    let value = match value {
        "y" => ConfigValue::Yes,
        "m" => ConfigValue::Module,
        "n" => ConfigValue::No,
        v if v.starts_with('"') => ConfigValue::Str(unquote(v).ok_or_else(|| err("bad string"))?),
        v if is_number(v) => ConfigValue::Number(v.to_string()),
        _ => return Err(err("value must be y, m, n, a \"string\" or a number")),
    };
    Ok(Some((symbol.to_string(), value, marked)))
}

fn valid_symbol(s: &str) -> bool {
    s.strip_prefix("CONFIG_").is_some_and(|rest| {
        !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    })
}

fn is_number(v: &str) -> bool {
    if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        return !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit());
    }
    let digits = v.strip_prefix('-').unwrap_or(v);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// Unquotes a Kconfig string (`\"` and `\\` escapes); `None` unless it is exactly one
/// quoted string.
fn unquote(v: &str) -> Option<String> {
    let inner = v.strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '"' => return chars.next().is_none().then_some(out),
            c => out.push(c),
        }
    }
    None
}

/// What a fragment asks of a symbol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    /// Built in or module (fragment says `=y`).
    YesOrModule,
    /// Built in; a module is not enough (`=y` with [`BUILTIN_MARKER`]).
    BuiltIn,
    /// Module or built in (fragment says `=m`).
    ModuleOrYes,
    /// Absent or `n`.
    Off,
    /// Exactly this string or number.
    Exactly(ConfigValue),
}

impl fmt::Display for Want {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Want::YesOrModule => f.write_str("y or m"),
            Want::BuiltIn => f.write_str("y (built in, not m)"),
            Want::ModuleOrYes => f.write_str("m or y"),
            Want::Off => f.write_str("not set"),
            Want::Exactly(v) => write!(f, "{v}"),
        }
    }
}

fn want_of(value: &ConfigValue, builtin: bool) -> Want {
    match value {
        ConfigValue::Yes if builtin => Want::BuiltIn,
        ConfigValue::Yes => Want::YesOrModule,
        ConfigValue::Module => Want::ModuleOrYes,
        ConfigValue::No => Want::Off,
        v => Want::Exactly(v.clone()),
    }
}

impl Want {
    fn satisfied_by(&self, found: Option<&ConfigValue>) -> bool {
        match (self, found) {
            (Want::BuiltIn, Some(ConfigValue::Yes)) => true,
            (
                Want::YesOrModule | Want::ModuleOrYes,
                Some(ConfigValue::Yes | ConfigValue::Module),
            ) => true,
            (Want::Off, None | Some(ConfigValue::No)) => true,
            (Want::Exactly(want), Some(found)) => {
                want == found || (want.numeric().is_some() && want.numeric() == found.numeric())
            }
            _ => false,
        }
    }
}

/// One fragment requirement the config does not meet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigMiss {
    /// The symbol, with its `CONFIG_` prefix.
    pub symbol: String,
    /// What the fragment asks for.
    pub wanted: Want,
    /// What the config has; `None` when the symbol is absent.
    pub found: Option<ConfigValue>,
}

impl fmt::Display for ConfigMiss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: want {}, found ", self.symbol, self.wanted)?;
        match &self.found {
            None | Some(ConfigValue::No) => f.write_str("not set"),
            Some(v) => write!(f, "{v}"),
        }
    }
}

/// Every requirement of `fragment` that `config` does not meet, in symbol order.
pub fn check(config: &KernelConfig, fragment: &KernelConfig) -> Vec<ConfigMiss> {
    fragment
        .symbols
        .iter()
        .filter_map(|(symbol, value)| {
            let wanted = want_of(value, fragment.builtin.contains(symbol));
            let found = config.get(symbol);
            (!wanted.satisfied_by(found)).then(|| ConfigMiss {
                symbol: symbol.clone(),
                wanted,
                found: found.cloned(),
            })
        })
        .collect()
}

/// kimg's base requirements (`kernel-configs/base.config`), embedded in the binary.
pub fn base_fragment() -> &'static str {
    include_str!("../../../kernel-configs/base.config")
}

/// kimg's Kubernetes node requirements (`kernel-configs/k8s.config`), on top of
/// [`base_fragment`]; embedded in the binary.
pub fn k8s_fragment() -> &'static str {
    include_str!("../../../kernel-configs/k8s.config")
}

/// The embedded fragments a flavour's kernel must satisfy: base, then k8s for the
/// Kubernetes flavour, each with its name.
pub fn builtin_fragments(flavour: Flavour) -> Vec<(&'static str, &'static str)> {
    let mut v = vec![("base.config", base_fragment())];
    if flavour == Flavour::K8s {
        v.push(("k8s.config", k8s_fragment()));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_value_kind() {
        let c = KernelConfig::parse(
            "# comment\n\nCONFIG_A=y\nCONFIG_B=m\nCONFIG_C=n\n# CONFIG_D is not set\n\
             CONFIG_E=\"a b # not a comment \\\"q\\\" \\\\\"\nCONFIG_F=123\nCONFIG_G=0x1f\n\
             CONFIG_H=-1\nCONFIG_I=\"\"\n  # indented comment\n",
        )
        .unwrap();
        assert_eq!(c.get("CONFIG_A"), Some(&ConfigValue::Yes));
        assert_eq!(c.get("CONFIG_B"), Some(&ConfigValue::Module));
        assert_eq!(c.get("CONFIG_C"), Some(&ConfigValue::No));
        assert_eq!(c.get("CONFIG_D"), Some(&ConfigValue::No));
        assert_eq!(
            c.get("CONFIG_E"),
            Some(&ConfigValue::Str("a b # not a comment \"q\" \\".into()))
        );
        assert_eq!(c.get("CONFIG_F"), Some(&ConfigValue::Number("123".into())));
        assert_eq!(c.get("CONFIG_G"), Some(&ConfigValue::Number("0x1f".into())));
        assert_eq!(c.get("CONFIG_H"), Some(&ConfigValue::Number("-1".into())));
        assert_eq!(c.get("CONFIG_I"), Some(&ConfigValue::Str(String::new())));
        assert_eq!(c.symbols.len(), 9);
    }

    #[test]
    fn syntax_errors_carry_line_numbers() {
        for (text, line) in [
            ("CONFIG_A=y\nCONFIG_B\n", 2),
            ("CONFIG_A=yes\n", 1),
            ("\n\nFOO=y\n", 3),
            ("CONFIG_A=\"unterminated\n", 1),
            ("CONFIG_A=\"x\" trailing\n", 1),
            ("CONFIG_A=0x\n", 1),
            ("CONFIG_=y\n", 1),
            ("# CONFIG_A-B is not set\n", 1),
        ] {
            match KernelConfig::parse(text) {
                Err(ConfigError::Syntax { line: l, .. }) => assert_eq!(l, line, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn duplicates_are_an_error_naming_both_lines() {
        let err = KernelConfig::parse("CONFIG_A=y\n# x\nCONFIG_B=m\n# CONFIG_A is not set\n")
            .unwrap_err();
        assert_eq!(err.to_string(), "CONFIG_A is set twice, on lines 1 and 4");
    }

    fn miss(config: &str, fragment: &str) -> Vec<String> {
        check(
            &KernelConfig::parse(config).unwrap(),
            &KernelConfig::parse(fragment).unwrap(),
        )
        .iter()
        .map(ToString::to_string)
        .collect()
    }

    #[test]
    fn check_rules() {
        assert!(miss("CONFIG_A=y\nCONFIG_B=m\n", "CONFIG_A=y\nCONFIG_B=y\n").is_empty());
        assert!(miss("CONFIG_A=y\nCONFIG_B=m\n", "CONFIG_A=m\nCONFIG_B=m\n").is_empty());
        assert!(miss("CONFIG_A=n\n", "# CONFIG_A is not set\nCONFIG_B=n\n").is_empty());
        assert!(miss(
            "CONFIG_S=\"a b\"\nCONFIG_N=0x10\n",
            "CONFIG_S=\"a b\"\nCONFIG_N=16\n"
        )
        .is_empty());
        assert_eq!(
            miss(
                "# CONFIG_VIRTIO_BLK is not set\n",
                "CONFIG_VIRTIO_BLK=y\nCONFIG_X=m\n"
            ),
            [
                "CONFIG_VIRTIO_BLK: want y or m, found not set",
                "CONFIG_X: want m or y, found not set"
            ]
        );
        assert_eq!(
            miss(
                "CONFIG_A=m\nCONFIG_S=\"x\"\nCONFIG_N=1\n",
                "CONFIG_A=n\nCONFIG_S=\"y\"\nCONFIG_N=2\n"
            ),
            [
                "CONFIG_A: want not set, found m",
                "CONFIG_N: want 2, found 1",
                "CONFIG_S: want \"y\", found \"x\""
            ]
        );
    }

    #[test]
    fn base_fragment_parses_and_only_asks_for_y_or_m() {
        let base = KernelConfig::parse(base_fragment()).unwrap();
        assert!(base.symbols.len() > 40);
        assert!(base
            .symbols
            .values()
            .all(|v| matches!(v, ConfigValue::Yes | ConfigValue::Module)));
    }

    #[test]
    fn gzip_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.gz");
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut e, b"CONFIG_A=y\n").unwrap();
        std::fs::write(&p, e.finish().unwrap()).unwrap();
        let c = KernelConfig::from_file(&p).unwrap();
        assert_eq!(c.get("CONFIG_A"), Some(&ConfigValue::Yes));
        std::fs::write(&p, "CONFIG_A=y\nbad\n").unwrap();
        let msg = KernelConfig::from_file(&p).unwrap_err().to_string();
        assert!(msg.contains("config.gz") && msg.contains("line 2"), "{msg}");
    }

    /// Checks base.config against a real Debian cloud kernel config, when one is around
    /// (developer machines); CI covers the same through the apt-get end-to-end test.
    #[test]
    fn base_fragment_matches_debian_cloud_config() {
        let path = Path::new("/tmp/k/x/boot/config-6.1.0-56-cloud-amd64");
        if !path.exists() {
            eprintln!("skipping: {} not present", path.display());
            return;
        }
        let config = KernelConfig::from_file(path).unwrap();
        for (name, text) in builtin_fragments(kimg_contract::Flavour::K8s) {
            let misses = check(&config, &KernelConfig::parse(text).unwrap());
            assert!(misses.is_empty(), "{name}: {misses:#?}");
        }
    }

    #[test]
    fn builtin_marker_asks_for_y_only() {
        let f = KernelConfig::parse(
            "CONFIG_A=y # kimg: builtin\nCONFIG_B=y\n# CONFIG_C is not set # kimg: builtin\n",
        )
        .unwrap();
        assert_eq!(f.get("CONFIG_A"), Some(&ConfigValue::Yes));
        assert!(f.builtin.contains("CONFIG_A") && !f.builtin.contains("CONFIG_B"));
        // A comment line that happens to end with the marker stays a comment.
        assert_eq!(f.get("CONFIG_C"), None);
        let c = KernelConfig::parse("CONFIG_A=m\nCONFIG_B=m\n").unwrap();
        let misses: Vec<String> = check(&c, &f).iter().map(ToString::to_string).collect();
        assert_eq!(misses, ["CONFIG_A: want y (built in, not m), found m"]);
        let c = KernelConfig::parse("CONFIG_A=y\nCONFIG_B=m\n").unwrap();
        assert!(check(&c, &f).is_empty());
        for bad in [
            "CONFIG_A=m # kimg: builtin\n",
            "CONFIG_A=\"x\" # kimg: builtin\n",
        ] {
            let err = KernelConfig::parse(bad).unwrap_err().to_string();
            assert!(err.contains("only goes after =y"), "{err}");
        }
    }

    #[test]
    fn merge_last_wins_across_fragments() {
        let a = KernelConfig::parse(
            "CONFIG_A=y # kimg: builtin\nCONFIG_B=m\nCONFIG_S=\"one\"\nCONFIG_K=y\n",
        )
        .unwrap();
        let b =
            KernelConfig::parse("# CONFIG_B is not set\nCONFIG_A=y\nCONFIG_S=\"two\"\n").unwrap();
        let c = KernelConfig::parse("CONFIG_N=0x10\nCONFIG_B=y # kimg: builtin\n").unwrap();
        let m = KernelConfig::merge([&a, &b, &c]);
        assert_eq!(m.get("CONFIG_A"), Some(&ConfigValue::Yes));
        // b re-set A without the marker: the later fragment decides.
        assert!(!m.builtin.contains("CONFIG_A"));
        assert!(m.builtin.contains("CONFIG_B"));
        assert_eq!(m.get("CONFIG_B"), Some(&ConfigValue::Yes));
        assert_eq!(m.get("CONFIG_S"), Some(&ConfigValue::Str("two".into())));
        assert_eq!(m.get("CONFIG_K"), Some(&ConfigValue::Yes));
        assert_eq!(m.get("CONFIG_N"), Some(&ConfigValue::Number("0x10".into())));
        let m2 = KernelConfig::merge([&b, &a]);
        assert_eq!(m2.get("CONFIG_B"), Some(&ConfigValue::Module));
        assert_eq!(m2.get("CONFIG_S"), Some(&ConfigValue::Str("one".into())));
    }

    #[test]
    fn to_text_round_trips() {
        let c = KernelConfig::parse(
            "CONFIG_A=y\nCONFIG_B=m\n# CONFIG_C is not set\nCONFIG_S=\"q\\\"b\\\\s # x\"\n\
             CONFIG_N=-3\nCONFIG_H=0xff\nCONFIG_E=\"\"\n",
        )
        .unwrap();
        let text = c.to_text();
        assert!(text.contains("# CONFIG_C is not set\n"), "{text}");
        let mut again = KernelConfig::parse(&text).unwrap();
        again.builtin = c.builtin.clone();
        assert_eq!(again, c);
    }

    #[test]
    fn k8s_fragment_parses_and_only_asks_for_y_or_m() {
        for (name, text) in builtin_fragments(kimg_contract::Flavour::K8s) {
            let f = KernelConfig::parse(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(
                f.symbols
                    .values()
                    .all(|v| matches!(v, ConfigValue::Yes | ConfigValue::Module)),
                "{name}"
            );
        }
        let k8s = KernelConfig::parse(k8s_fragment()).unwrap();
        for sym in [
            "CONFIG_NF_CT_NETLINK",
            "CONFIG_IP_NF_IPTABLES",
            "CONFIG_IP6_NF_IPTABLES",
            "CONFIG_IP_SET",
            "CONFIG_NETFILTER_XT_SET",
            "CONFIG_IP_NF_MATCH_RPFILTER",
            "CONFIG_IP_NF_TARGET_REJECT",
            "CONFIG_NET_IPIP",
            "CONFIG_BLK_DEV_RBD",
            "CONFIG_OVERLAY_FS",
            "CONFIG_BRIDGE_NETFILTER",
            "CONFIG_IP_VS_RR",
        ] {
            assert!(k8s.get(sym).is_some(), "{sym}");
        }
    }
}
