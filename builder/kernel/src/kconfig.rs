//! A small Kconfig reader: for a symbol Kconfig dropped, which `depends on` kept it out.
//!
//! Reads the tree from its top `Kconfig`, following `source` lines, and records for every
//! `config`/`menuconfig` entry its own `depends on` expressions plus those of the
//! enclosing `if`, `menu` and `choice` blocks. Only dependencies are read: `select`,
//! `default` and types are Kconfig's business (`make olddefconfig` already ran). The
//! files come from a kernel tree the user gave, so the reader never panics on odd input
//! and bounds its recursion.

use super::config::{ConfigValue, KernelConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `source` nesting deeper than this is treated as a loop and not followed.
const MAX_DEPTH: usize = 16;
/// No real tree has this many Kconfig files (6.1 has ~1,700).
const MAX_FILES: usize = 20_000;

/// Where a symbol is defined and what it depends on there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Definition {
    /// The Kconfig file, relative to the tree.
    pub file: PathBuf,
    /// 1-based line of the `config` line.
    pub line: usize,
    /// The `depends on` expressions in force: enclosing blocks first, then the entry's.
    pub depends: Vec<String>,
}

/// Every `config SYM` definition of a tree, by symbol name (without `CONFIG_`).
#[derive(Debug, Default)]
pub struct KconfigIndex {
    /// Definitions per symbol; a symbol may be defined in several places.
    pub defs: BTreeMap<String, Vec<Definition>>,
}

/// Why a symbol is off: one unmet dependency expression and the symbols in it that are
/// off in the config.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UnmetDependency {
    /// The expression, as written in Kconfig.
    pub expr: String,
    /// Where: `file:line` of the symbol's definition.
    pub at: String,
    /// Symbols in `expr` (with `CONFIG_` prefix) that are `n` or absent in the config.
    pub off: Vec<String>,
}

impl KconfigIndex {
    /// Reads the tree under `root`, starting at `root/Kconfig`, for architecture `arch`
    /// (`$(SRCARCH)` in source lines). Unreadable files are skipped: this is for
    /// explanations, not a gate.
    pub fn read(root: &Path, arch: &str) -> KconfigIndex {
        let mut reader = Reader {
            root,
            arch,
            index: KconfigIndex::default(),
            files: 0,
        };
        reader.file(Path::new("Kconfig"), &[], 0);
        reader.index
    }

    /// Parses one Kconfig text (for tests and fuzzing): `source` lines are ignored.
    pub fn parse_text(text: &str) -> KconfigIndex {
        let mut reader = Reader {
            root: Path::new(""),
            arch: "",
            index: KconfigIndex::default(),
            files: 0,
        };
        reader.text(Path::new("Kconfig"), text, &[], MAX_DEPTH);
        reader.index
    }

    /// The dependencies of `symbol` (with or without `CONFIG_`) that evaluate to `n` in
    /// `config`, across its definitions. Empty when Kconfig does not say (unknown symbol,
    /// or it is off for another reason such as a `select` or a choice).
    pub fn unmet(&self, symbol: &str, config: &KernelConfig) -> Vec<UnmetDependency> {
        let name = symbol.strip_prefix("CONFIG_").unwrap_or(symbol);
        let Some(defs) = self.defs.get(name) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for def in defs {
            for expr in &def.depends {
                let Some(parsed) = Expr::parse(expr) else {
                    continue;
                };
                if parsed.eval(config) == Tri::No {
                    let mut off = Vec::new();
                    parsed.symbols(&mut |s| {
                        let full = format!("CONFIG_{s}");
                        let is_off = matches!(config.get(&full), None | Some(ConfigValue::No));
                        if is_off && !off.contains(&full) {
                            off.push(full);
                        }
                    });
                    out.push(UnmetDependency {
                        expr: expr.clone(),
                        at: format!("{}:{}", def.file.display(), def.line),
                        off,
                    });
                }
            }
        }
        out
    }

    /// True when the tree defines `symbol` (with or without `CONFIG_`).
    pub fn defines(&self, symbol: &str) -> bool {
        self.defs
            .contains_key(symbol.strip_prefix("CONFIG_").unwrap_or(symbol))
    }
}

struct Reader<'a> {
    root: &'a Path,
    arch: &'a str,
    index: KconfigIndex,
    files: usize,
}

/// A block that adds dependencies to the entries inside it.
enum Frame {
    If(String),
    Menu(Vec<String>),
    Choice(Vec<String>),
}

/// The entry whose attributes the following lines belong to.
enum Current {
    Config(String, usize, Vec<String>),
    Menu,
    Choice,
    Other,
}

impl Reader<'_> {
    fn file(&mut self, rel: &Path, inherited: &[String], depth: usize) {
        if depth > MAX_DEPTH || self.files >= MAX_FILES {
            return;
        }
        self.files += 1;
        let Ok(text) = std::fs::read_to_string(self.root.join(rel)) else {
            return;
        };
        self.text(rel, &text, inherited, depth);
    }

    fn text(&mut self, rel: &Path, text: &str, inherited: &[String], depth: usize) {
        let mut frames: Vec<Frame> = Vec::new();
        let mut current = Current::Other;
        let lines = logical_lines(text);
        let mut i = 0;
        while i < lines.len() {
            let (line_no, line) = (lines[i].0, lines[i].1.as_str());
            i += 1;
            let trimmed = line.trim();
            let (keyword, rest) = split_keyword(trimmed);
            match keyword {
                "help" | "---help---" => {
                    // Help text: skip every following line indented deeper than the
                    // first help line (blank lines included).
                    let mut help_indent = None;
                    while i < lines.len() {
                        let l = &lines[i].1;
                        if l.trim().is_empty() {
                            i += 1;
                            continue;
                        }
                        let ind = indent(l);
                        let min = *help_indent.get_or_insert(ind);
                        if ind < min || ind == 0 {
                            break;
                        }
                        i += 1;
                    }
                    continue;
                }
                "config" | "menuconfig" => {
                    self.finish(rel, &mut current, &frames, inherited);
                    let name = rest.trim();
                    current = if valid_name(name) {
                        Current::Config(name.to_string(), line_no, Vec::new())
                    } else {
                        Current::Other
                    };
                }
                "depends" => {
                    let Some(expr) = rest.trim().strip_prefix("on") else {
                        continue;
                    };
                    let expr = expr.trim().to_string();
                    if expr.is_empty() {
                        continue;
                    }
                    match (&mut current, frames.last_mut()) {
                        (Current::Config(_, _, deps), _) => deps.push(expr),
                        (Current::Menu, Some(Frame::Menu(deps)))
                        | (Current::Choice, Some(Frame::Choice(deps))) => deps.push(expr),
                        _ => {}
                    }
                }
                "menu" => {
                    self.finish(rel, &mut current, &frames, inherited);
                    frames.push(Frame::Menu(Vec::new()));
                    current = Current::Menu;
                }
                "choice" => {
                    self.finish(rel, &mut current, &frames, inherited);
                    frames.push(Frame::Choice(Vec::new()));
                    current = Current::Choice;
                }
                "if" => {
                    self.finish(rel, &mut current, &frames, inherited);
                    frames.push(Frame::If(rest.trim().to_string()));
                }
                "endmenu" | "endchoice" | "endif" => {
                    self.finish(rel, &mut current, &frames, inherited);
                    frames.pop();
                }
                "source" | "rsource" | "osource" | "orsource" => {
                    self.finish(rel, &mut current, &frames, inherited);
                    let Some(path) = unquote(rest.trim()) else {
                        continue;
                    };
                    let path = path.replace("$(SRCARCH)", self.arch);
                    if path.contains("$(") || self.root.as_os_str().is_empty() {
                        continue;
                    }
                    let target = if keyword.starts_with('r') || keyword.starts_with("or") {
                        rel.parent().unwrap_or(Path::new("")).join(path)
                    } else {
                        PathBuf::from(path)
                    };
                    let deps = in_force(&frames, inherited);
                    self.file(&target, &deps, depth + 1);
                }
                "comment" | "mainmenu" => {
                    self.finish(rel, &mut current, &frames, inherited);
                }
                _ => {}
            }
        }
        self.finish(rel, &mut current, &frames, inherited);
    }

    /// Records the entry being read, if it is a config entry.
    fn finish(
        &mut self,
        rel: &Path,
        current: &mut Current,
        frames: &[Frame],
        inherited: &[String],
    ) {
        if let Current::Config(name, line, own) = std::mem::replace(current, Current::Other) {
            let mut depends = in_force(frames, inherited);
            depends.extend(own);
            self.index.defs.entry(name).or_default().push(Definition {
                file: rel.to_path_buf(),
                line,
                depends,
            });
        }
    }
}

/// Dependencies from enclosing blocks and the sourcing files.
fn in_force(frames: &[Frame], inherited: &[String]) -> Vec<String> {
    let mut deps = inherited.to_vec();
    for f in frames {
        match f {
            Frame::If(e) if !e.is_empty() => deps.push(e.clone()),
            Frame::Menu(d) | Frame::Choice(d) => deps.extend(d.iter().cloned()),
            _ => {}
        }
    }
    deps
}

/// Lines with `\` continuations joined and `#` comments (outside quotes) removed, each
/// with its 1-based starting line number.
fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let (start, mut acc) = pending.take().unwrap_or((i + 1, String::new()));
        if let Some(head) = raw.strip_suffix('\\') {
            acc.push_str(head);
            acc.push(' ');
            pending = Some((start, acc));
            continue;
        }
        acc.push_str(raw);
        out.push((start, strip_comment(&acc)));
    }
    if let Some((start, acc)) = pending {
        out.push((start, strip_comment(&acc)));
    }
    out
}

fn strip_comment(line: &str) -> String {
    let mut quote = None;
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') => return line[..i].to_string(),
            _ => {}
        }
    }
    line.to_string()
}

/// Indentation width, a tab counting to the next multiple of 8.
fn indent(line: &str) -> usize {
    let mut w = 0;
    for c in line.chars() {
        match c {
            ' ' => w += 1,
            '\t' => w = (w / 8 + 1) * 8,
            _ => break,
        }
    }
    w
}

fn split_keyword(line: &str) -> (&str, &str) {
    match line.find(|c: char| c.is_whitespace()) {
        Some(i) => (&line[..i], &line[i..]),
        None => (line, ""),
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn unquote(s: &str) -> Option<&str> {
    s.strip_prefix('"')?.strip_suffix('"')
}

/// Kconfig's tristate logic: n < m < y.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Tri {
    No,
    Mod,
    Yes,
}

/// A parsed dependency expression.
#[derive(Debug, Clone, PartialEq)]
enum Expr {
    /// A symbol or constant (`y`, `m`, `n`, a quoted string, a number).
    Atom(String),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    /// `a = b`, `a != b`, `a < b`, ...
    Cmp(String, &'static str, String),
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Atom(String),
    Op(&'static str),
}

fn tokenize(s: &str) -> Option<Vec<Tok>> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let two = s.get(i..i + 2).unwrap_or("");
        if c.is_ascii_whitespace() {
            i += 1;
        } else if let Some(op) = ["&&", "||", "!=", "<=", ">="]
            .into_iter()
            .find(|o| *o == two)
        {
            out.push(Tok::Op(op));
            i += 2;
        } else if let Some(op) = ["!", "(", ")", "=", "<", ">"]
            .into_iter()
            .find(|o| o.as_bytes()[0] == c)
        {
            out.push(Tok::Op(op));
            i += 1;
        } else if c == b'"' || c == b'\'' {
            let end = s[i + 1..].find(c as char)? + i + 1;
            out.push(Tok::Atom(s[i..=end].to_string()));
            i = end + 1;
        } else if c.is_ascii_alphanumeric() || c == b'_' || c == b'-' || c == b'$' {
            let start = i;
            while i < b.len()
                && (b[i].is_ascii_alphanumeric() || matches!(b[i], b'_' | b'-' | b'$' | b'.'))
            {
                i += 1;
            }
            out.push(Tok::Atom(s[start..i].to_string()));
        } else {
            return None;
        }
    }
    Some(out)
}

impl Expr {
    /// Parses a dependency expression; `None` when it is not valid Kconfig.
    fn parse(s: &str) -> Option<Expr> {
        let toks = tokenize(s)?;
        let mut p = Parser {
            toks,
            pos: 0,
            depth: 0,
        };
        let e = p.or()?;
        (p.pos == p.toks.len()).then_some(e)
    }

    fn eval(&self, config: &KernelConfig) -> Tri {
        match self {
            Expr::Atom(a) => tri_of(&value_of(a, config)),
            Expr::Not(e) => match e.eval(config) {
                Tri::No => Tri::Yes,
                Tri::Mod => Tri::Mod,
                Tri::Yes => Tri::No,
            },
            Expr::And(a, b) => a.eval(config).min(b.eval(config)),
            Expr::Or(a, b) => a.eval(config).max(b.eval(config)),
            Expr::Cmp(a, op, b) => {
                let (x, y) = (value_of(a, config), value_of(b, config));
                let ord = match (x.parse::<i128>(), y.parse::<i128>()) {
                    (Ok(x), Ok(y)) => x.cmp(&y),
                    _ => x.cmp(&y),
                };
                let holds = match *op {
                    "=" => ord.is_eq(),
                    "!=" => ord.is_ne(),
                    "<" => ord.is_lt(),
                    "<=" => ord.is_le(),
                    ">" => ord.is_gt(),
                    _ => ord.is_ge(),
                };
                if holds {
                    Tri::Yes
                } else {
                    Tri::No
                }
            }
        }
    }

    /// Calls `f` with every symbol name (not constants) in the expression.
    fn symbols(&self, f: &mut dyn FnMut(&str)) {
        match self {
            Expr::Atom(a) if is_symbol(a) => f(a),
            Expr::Atom(_) => {}
            Expr::Not(e) => e.symbols(f),
            Expr::And(a, b) | Expr::Or(a, b) => {
                a.symbols(f);
                b.symbols(f);
            }
            Expr::Cmp(a, _, b) => {
                for s in [a, b] {
                    if is_symbol(s) {
                        f(s);
                    }
                }
            }
        }
    }
}

fn is_symbol(a: &str) -> bool {
    !matches!(a, "y" | "m" | "n")
        && !a.starts_with(['"', '\''])
        && !a.bytes().all(|b| b.is_ascii_digit())
        && valid_name(a)
}

/// A symbol's or constant's value as text: `y`/`m`/`n` for tristates (unset is `n`).
fn value_of(atom: &str, config: &KernelConfig) -> String {
    if let Some(inner) = atom
        .strip_prefix('"')
        .and_then(|a| a.strip_suffix('"'))
        .or_else(|| atom.strip_prefix('\'').and_then(|a| a.strip_suffix('\'')))
    {
        return inner.to_string();
    }
    if !is_symbol(atom) {
        return atom.to_string();
    }
    match config.get(&format!("CONFIG_{atom}")) {
        None | Some(ConfigValue::No) => "n".into(),
        Some(ConfigValue::Str(s)) => s.clone(),
        Some(v) => v.to_string(),
    }
}

fn tri_of(v: &str) -> Tri {
    match v {
        "y" => Tri::Yes,
        "m" => Tri::Mod,
        _ => Tri::No,
    }
}

/// Recursive descent: `or := and ('||' and)*`, `and := unary ('&&' unary)*`,
/// `unary := '!' unary | '(' or ')' | atom [cmp atom]`.
struct Parser {
    toks: Vec<Tok>,
    pos: usize,
    depth: usize,
}

impl Parser {
    fn peek_op(&self) -> Option<&'static str> {
        match self.toks.get(self.pos) {
            Some(Tok::Op(o)) => Some(o),
            _ => None,
        }
    }

    fn or(&mut self) -> Option<Expr> {
        let mut e = self.and()?;
        while self.peek_op() == Some("||") {
            self.pos += 1;
            e = Expr::Or(Box::new(e), Box::new(self.and()?));
        }
        Some(e)
    }

    fn and(&mut self) -> Option<Expr> {
        let mut e = self.unary()?;
        while self.peek_op() == Some("&&") {
            self.pos += 1;
            e = Expr::And(Box::new(e), Box::new(self.unary()?));
        }
        Some(e)
    }

    fn unary(&mut self) -> Option<Expr> {
        // Untrusted input: "((((..." must not overflow the stack.
        self.depth += 1;
        if self.depth > 200 {
            return None;
        }
        let e = match self.toks.get(self.pos)?.clone() {
            Tok::Op("!") => {
                self.pos += 1;
                Expr::Not(Box::new(self.unary()?))
            }
            Tok::Op("(") => {
                self.pos += 1;
                let e = self.or()?;
                if self.peek_op() != Some(")") {
                    return None;
                }
                self.pos += 1;
                e
            }
            Tok::Atom(a) => {
                self.pos += 1;
                match self.peek_op() {
                    Some(op @ ("=" | "!=" | "<" | "<=" | ">" | ">=")) => {
                        self.pos += 1;
                        let Some(Tok::Atom(b)) = self.toks.get(self.pos).cloned() else {
                            return None;
                        };
                        self.pos += 1;
                        Expr::Cmp(a, op, b)
                    }
                    _ => Expr::Atom(a),
                }
            }
            Tok::Op(_) => return None,
        };
        self.depth -= 1;
        Some(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> KernelConfig {
        KernelConfig::parse(text).unwrap()
    }

    const TEXT: &str = "\
menuconfig IP_VS
\ttristate \"IP virtual server support\"
\tdepends on INET && NETFILTER
\thelp
\t  config NOT_A_SYMBOL
\t  depends on NOT_A_DEPENDENCY

\t  More help.

if IP_VS

config IP_VS_RR # round robin
\ttristate \"round-robin scheduling\"
\tdepends on NETFILTER_ADVANCED || \\
\t\t   EXPERT

endif # IP_VS

menu \"Things\"
\tdepends on THINGS

choice
\tprompt \"pick\"
\tdepends on PICKER != n

config PICK_A
\tbool \"a\"

endchoice

config X86_SIZE
\tint
\tdepends on (FOO=\"bar\" || NR > 4) && !BAZ
endmenu
";

    #[test]
    fn reads_config_blocks_with_enclosing_dependencies() {
        let idx = KconfigIndex::parse_text(TEXT);
        assert!(!idx.defines("NOT_A_SYMBOL"), "help text is skipped");
        let d = &idx.defs["IP_VS"][0];
        assert_eq!(
            (d.line, d.depends.clone()),
            (1, vec!["INET && NETFILTER ".trim().to_string()])
        );
        let rr = &idx.defs["IP_VS_RR"][0];
        assert_eq!(rr.line, 12);
        assert_eq!(rr.depends.len(), 2);
        assert_eq!(rr.depends[0].trim(), "IP_VS");
        assert!(rr.depends[1].contains("NETFILTER_ADVANCED") && rr.depends[1].contains("EXPERT"));
        let pick = &idx.defs["PICK_A"][0];
        let pick_deps: Vec<&str> = pick.depends.iter().map(|s| s.trim()).collect();
        assert_eq!(pick_deps, ["THINGS", "PICKER != n"]);
        let size: Vec<&str> = idx.defs["X86_SIZE"][0]
            .depends
            .iter()
            .map(|s| s.trim())
            .collect();
        assert_eq!(size, ["THINGS", "(FOO=\"bar\" || NR > 4) && !BAZ"]);
    }

    #[test]
    fn unmet_names_the_off_symbols() {
        let idx = KconfigIndex::parse_text(TEXT);
        let c = cfg("CONFIG_INET=y\nCONFIG_NETFILTER=y\n# CONFIG_IP_VS is not set\n");
        let u = idx.unmet("CONFIG_IP_VS_RR", &c);
        assert_eq!(u.len(), 2, "{u:?}");
        assert_eq!(u[0].expr.trim(), "IP_VS");
        assert_eq!(u[0].off, ["CONFIG_IP_VS"]);
        assert_eq!(u[0].at, "Kconfig:12");
        assert_eq!(u[1].off, ["CONFIG_NETFILTER_ADVANCED", "CONFIG_EXPERT"]);
        let c = cfg("CONFIG_IP_VS=m\nCONFIG_EXPERT=y\n");
        assert!(idx.unmet("CONFIG_IP_VS_RR", &c).is_empty());
        assert!(idx.unmet("CONFIG_UNKNOWN", &c).is_empty());

        let c = cfg("CONFIG_THINGS=y\nCONFIG_FOO=\"bar\"\n");
        assert!(idx.unmet("X86_SIZE", &c).is_empty());
        let c = cfg("CONFIG_THINGS=y\nCONFIG_FOO=\"baz\"\nCONFIG_NR=5\nCONFIG_BAZ=y\n");
        let u = idx.unmet("X86_SIZE", &c);
        assert_eq!(u.len(), 1);
        // FOO and NR are set; only the off symbols are named.
        assert!(u[0].off.is_empty(), "{u:?}");
        let c = cfg("CONFIG_THINGS=y\nCONFIG_NR=3\n");
        assert_eq!(
            idx.unmet("X86_SIZE", &c)[0].off,
            ["CONFIG_FOO", "CONFIG_BAZ"]
        );
    }

    #[test]
    fn expressions() {
        let c = cfg("CONFIG_A=y\nCONFIG_B=m\nCONFIG_N=10\nCONFIG_S=\"x\"\n");
        for (e, want) in [
            ("A", Tri::Yes),
            ("B", Tri::Mod),
            ("C", Tri::No),
            ("A && B", Tri::Mod),
            ("C || B", Tri::Mod),
            ("!B", Tri::Mod),
            ("!C && (A || C)", Tri::Yes),
            ("N > 9 && N <= 10", Tri::Yes),
            ("N >= 11", Tri::No),
            ("S = \"x\"", Tri::Yes),
            ("S != 'x'", Tri::No),
            ("B = m", Tri::Yes),
            ("y", Tri::Yes),
            ("64BIT", Tri::No),
        ] {
            assert_eq!(Expr::parse(e).map(|x| x.eval(&c)), Some(want), "{e}");
        }
        for bad in [
            "", "A &&", "(A", "A)", "&& A", "A = ", "\"open", "A ~ B", "A B",
        ] {
            assert_eq!(Expr::parse(bad), None, "{bad:?}");
        }
    }

    /// A tiny deterministic PRNG (xorshift), so the randomized tests need no crate and
    /// replay the same inputs every run.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
            xs[(self.next() % xs.len() as u64) as usize]
        }
    }

    /// Randomized inputs built from Kconfig's own pieces plus junk: the reader and the
    /// expression parser must never panic or hang, and whatever parses must evaluate.
    #[test]
    fn fuzz_reader_and_expressions() {
        let pieces = [
            "config ",
            "menuconfig ",
            "depends on ",
            "if ",
            "endif",
            "menu \"m\"",
            "endmenu",
            "choice",
            "endchoice",
            "help",
            "  text",
            "\t",
            "\\",
            "\n",
            "#",
            "\"",
            "'",
            "(",
            ")",
            "&&",
            "||",
            "!",
            "=",
            "!=",
            "<",
            ">=",
            "A",
            "B_1",
            "y",
            "m",
            "n",
            "42",
            "source ",
            "\"x/Kconfig\"",
            " ",
            "\u{e9}",
            "\0",
            "$(SRCARCH)",
            "---help---",
        ];
        let c = cfg("CONFIG_A=y\nCONFIG_B_1=m\n");
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..3000 {
            let n = (rng.next() % 60) as usize;
            let text: String = (0..n).map(|_| rng.pick(&pieces)).collect();
            let idx = KconfigIndex::parse_text(&text);
            for sym in idx.defs.keys() {
                let _ = idx.unmet(sym, &c);
            }
            if let Some(e) = Expr::parse(&text) {
                let _ = e.eval(&c);
            }
            // Raw bytes too (lossy UTF-8).
            let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            let raw = String::from_utf8_lossy(&bytes);
            let _ = KconfigIndex::parse_text(&raw);
            let _ = Expr::parse(&raw);
        }
        // Deep nesting is refused, not a stack overflow.
        let deep = format!("{}A{}", "(".repeat(100_000), ")".repeat(100_000));
        assert_eq!(Expr::parse(&deep), None);
        let nots = format!("{}A", "!".repeat(100_000));
        assert_eq!(Expr::parse(&nots), None);
    }
}
