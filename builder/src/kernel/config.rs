//! Kernel `.config` parsing and checking a config against kimg's requirement fragments.
//!
//! Full configs and fragments (`kernel-configs/*.config`) share the syntax:
//! `CONFIG_X=y|m|n|"string"|123|0x1f`, `# CONFIG_X is not set`, comments, blank lines.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Parsing or reading a kernel config failed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read or decompressed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
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
}

impl KernelConfig {
    /// Parses config text. A symbol set twice is an error naming both lines: in a
    /// fragment that is always a mistake, and a real `.config` never has one.
    pub fn parse(text: &str) -> Result<KernelConfig, ConfigError> {
        let mut symbols = BTreeMap::new();
        let mut lines_of: BTreeMap<String, usize> = BTreeMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let Some((symbol, value)) = parse_line(raw, line)? else {
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
            symbols.insert(symbol, value);
        }
        Ok(KernelConfig { symbols })
    }

    /// Reads and parses a config file, plain or gzip-compressed (`/proc/config.gz`).
    pub fn from_file(path: &Path) -> Result<KernelConfig, ConfigError> {
        let io_err = |source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        };
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

/// Parses one line: `None` for blank lines and comments.
fn parse_line(raw: &str, line: usize) -> Result<Option<(String, ConfigValue)>, ConfigError> {
    let err = |reason| ConfigError::Syntax {
        line,
        reason,
        text: raw.to_string(),
    };
    let text = raw.trim();
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
            return Ok(Some((symbol.to_string(), ConfigValue::No)));
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
    Ok(Some((symbol.to_string(), value)))
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
    // A later marker comment will ask for "built in, a module is not enough": add a
    // `BuiltIn` variant here and map it in `want_of`.
    YesOrModule,
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
            Want::ModuleOrYes => f.write_str("m or y"),
            Want::Off => f.write_str("not set"),
            Want::Exactly(v) => write!(f, "{v}"),
        }
    }
}

fn want_of(value: &ConfigValue) -> Want {
    match value {
        ConfigValue::Yes => Want::YesOrModule,
        ConfigValue::Module => Want::ModuleOrYes,
        ConfigValue::No => Want::Off,
        v => Want::Exactly(v.clone()),
    }
}

impl Want {
    fn satisfied_by(&self, found: Option<&ConfigValue>) -> bool {
        match (self, found) {
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
            let wanted = want_of(value);
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
        let base = KernelConfig::parse(base_fragment()).unwrap();
        let misses = check(&config, &base);
        assert!(misses.is_empty(), "{misses:#?}");
    }
}
