//! Kernel module index: names and dependencies read from each module's `.modinfo`,
//! the dependency closure of a set of wanted modules, and a generated `modules.dep`.
//!
//! Module files come from a package kimg did not build, so `.modinfo` parsing is a pure,
//! panic-free function ([`parse_modinfo`]) and ELF offsets are bounds-checked.

use kimg_util::fs::IoError;
use rayon::prelude::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Modules stage 1 loads: what reaches the root disk and the cdrom, and the agent's
/// port, on either transport (PCI on q35, MMIO on microvm). Their dependencies are
/// added from the kernel's `.modinfo`.
pub const STAGE1_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "virtio_scsi",
    "sr_mod",
    "isofs",
    "virtio_console",
];

/// Scanning modules or resolving dependencies failed.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    /// A file or directory could not be read.
    #[error(transparent)]
    Io(#[from] IoError),
    /// A module file is not a usable ELF object.
    #[error("{}: {reason}", path.display())]
    BadModule {
        /// The module file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Wanted modules (or their dependencies) are neither module files nor built in.
    #[error("unknown kernel modules (not in {} and not built in): {}", dir.display(), names.join(", "))]
    Unknown {
        /// The modules directory searched.
        dir: PathBuf,
        /// Every unknown name, sorted.
        names: Vec<String>,
    },
    /// Module dependencies form a cycle (depmod refuses these too).
    #[error("kernel module dependency cycle: {}", chain.join(" -> "))]
    Cycle {
        /// The modules on the cycle, first repeated at the end.
        chain: Vec<String>,
    },
}

/// Fields kimg uses from a module's `.modinfo` section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModInfo {
    /// `name=`, normalized (`-` to `_`); absent on old kernels.
    pub name: Option<String>,
    /// `depends=`, split on commas, normalized, empties dropped.
    pub depends: Vec<String>,
    /// Every `alias=` (device ids, `fs-overlay`, `nfnetlink-subsys-10`, ...), in order.
    pub aliases: Vec<String>,
}

/// Parses `.modinfo` content: NUL-separated `key=value` strings. Never panics; strings
/// without `=` and non-UTF-8 bytes are tolerated (lossily), the first `name=` and
/// `depends=` win.
pub fn parse_modinfo(bytes: &[u8]) -> ModInfo {
    let mut info = ModInfo::default();
    let mut seen_depends = false;
    for field in bytes.split(|&b| b == 0) {
        let Some(eq) = field.iter().position(|&b| b == b'=') else {
            continue;
        };
        let (key, value) = (&field[..eq], &field[eq + 1..]);
        let value = String::from_utf8_lossy(value);
        match key {
            b"name" if info.name.is_none() && !value.is_empty() => {
                info.name = Some(normalize(&value));
            }
            b"alias" if !value.is_empty() => info.aliases.push(value.into_owned()),
            b"depends" if !seen_depends => {
                seen_depends = true;
                info.depends = value
                    .split(',')
                    .map(str::trim)
                    .filter(|d| !d.is_empty())
                    .map(normalize)
                    .collect();
            }
            _ => {}
        }
    }
    info
}

/// Module names treat `-` and `_` alike; the kernel uses `_`.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// One loadable module file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Normalized module name (`virtio_pci`).
    pub name: String,
    /// Path relative to the modules directory (`kernel/drivers/virtio/virtio_pci.ko`).
    pub rel_path: PathBuf,
    /// Names of the modules it needs loaded first, sorted.
    pub depends: Vec<String>,
    /// Its aliases (what the kernel asks modprobe for when it wants this module).
    pub aliases: Vec<String>,
}

/// All modules of one kernel (`lib/modules/<version>`).
#[derive(Debug, Clone)]
pub struct ModuleIndex {
    /// The modules directory scanned.
    pub dir: PathBuf,
    /// Module files by name.
    pub modules: BTreeMap<String, Module>,
    /// Names of modules built into the kernel (`modules.builtin`).
    pub builtin: BTreeSet<String>,
}

/// Largest decompressed module accepted; the biggest real ones are a few MiB, so this
/// only stops decompression bombs.
const MAX_MODULE_BYTES: u64 = 256 << 20;

impl ModuleIndex {
    /// Scans every `*.ko`, `*.ko.xz` and `*.ko.zst` below `modules_dir` (in parallel)
    /// and reads `modules.builtin` when present.
    pub fn scan(modules_dir: &Path) -> Result<ModuleIndex, ModuleError> {
        let mut files = Vec::new();
        find_modules(modules_dir, &mut files)?;
        files.sort();
        let parsed: Vec<Module> = files
            .par_iter()
            .map(|path| read_module(modules_dir, path))
            .collect::<Result<_, _>>()?;
        let mut modules = BTreeMap::new();
        for m in parsed {
            // Two files with one name: keep the first path in sorted order, so the
            // result does not depend on directory listing order.
            modules.entry(m.name.clone()).or_insert(m);
        }
        let builtin_path = modules_dir.join("modules.builtin");
        let builtin = match std::fs::read_to_string(&builtin_path) {
            Ok(text) => text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .filter_map(|l| module_name_of(Path::new(l)))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
            Err(source) => return Err(ModuleError::Io(IoError::new(builtin_path, source))),
        };
        Ok(ModuleIndex {
            dir: modules_dir.to_path_buf(),
            modules,
            builtin,
        })
    }

    /// The content of a `modules.alias` in depmod's format (`alias PATTERN NAME`), so
    /// that the kernel's on-demand requests (`nfnetlink-subsys-10`, `fs-overlay`,
    /// `net-pf-*`) resolve through busybox modprobe. Sorted by module, then alias.
    pub fn modules_alias(&self) -> String {
        let mut out = String::from("# Aliases extracted from modules themselves.\n");
        for m in self.modules.values() {
            for a in &m.aliases {
                out.push_str(&format!("alias {a} {}\n", m.name));
            }
        }
        out
    }

    /// The module file named `name` (`-` and `_` alike).
    pub fn get(&self, name: &str) -> Option<&Module> {
        self.modules.get(&normalize(name))
    }

    /// True when `name` is built into the kernel.
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&normalize(name))
    }

    /// The wanted modules and everything they depend on, each after all of its
    /// dependencies (the order to load them in). Built-in modules are skipped; unknown
    /// names are an error listing all of them.
    pub fn closure(&self, wanted: &[&str]) -> Result<Vec<&Module>, ModuleError> {
        let mut walk = Walk::new(self);
        for name in wanted {
            walk.visit(&normalize(name))?;
        }
        if !walk.unknown.is_empty() {
            return Err(ModuleError::Unknown {
                dir: self.dir.clone(),
                names: walk.unknown.into_iter().collect(),
            });
        }
        Ok(walk.out)
    }

    /// A `modules.dep` as depmod writes it: one line per module file, sorted by path,
    /// `path: dep dep ...` listing the full transitive closure in reverse load order
    /// (modprobe, busybox's included, loads the last one first). Unknown dependencies
    /// and cycles are left out of a line rather than failing the whole file.
    pub fn modules_dep(&self) -> String {
        let mut lines: Vec<(String, String)> = self
            .modules
            .values()
            .map(|m| {
                let mut walk = Walk::new(self);
                // Errors here are cycles; what was collected before is still useful.
                let _ = walk.visit(&m.name);
                let deps: Vec<String> = walk
                    .out
                    .iter()
                    .rev()
                    .filter(|d| d.name != m.name)
                    .map(|d| path_text(&d.rel_path))
                    .collect();
                (path_text(&m.rel_path), deps.join(" "))
            })
            .collect();
        lines.sort();
        let mut out = String::new();
        for (path, deps) in lines {
            out.push_str(&path);
            out.push(':');
            if !deps.is_empty() {
                out.push(' ');
                out.push_str(&deps);
            }
            out.push('\n');
        }
        out
    }
}

fn path_text(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mark {
    InProgress,
    Done,
}

/// Depth-first post-order walk over module dependencies.
struct Walk<'a> {
    index: &'a ModuleIndex,
    marks: HashMap<String, Mark>,
    stack: Vec<String>,
    out: Vec<&'a Module>,
    unknown: BTreeSet<String>,
}

impl<'a> Walk<'a> {
    fn new(index: &'a ModuleIndex) -> Self {
        Walk {
            index,
            marks: HashMap::new(),
            stack: Vec::new(),
            out: Vec::new(),
            unknown: BTreeSet::new(),
        }
    }

    /// Appends `name`'s dependencies, then `name`, to `out`. Recursion depth is bounded
    /// by the number of modules, since an in-progress module is never entered again.
    fn visit(&mut self, name: &str) -> Result<(), ModuleError> {
        match self.marks.get(name) {
            Some(Mark::Done) => return Ok(()),
            Some(Mark::InProgress) => {
                let start = self.stack.iter().position(|s| s == name).unwrap_or(0);
                let mut chain = self.stack[start..].to_vec();
                chain.push(name.to_string());
                return Err(ModuleError::Cycle { chain });
            }
            None => {}
        }
        let index = self.index;
        let Some(module) = index.modules.get(name) else {
            if !index.builtin.contains(name) {
                self.unknown.insert(name.to_string());
            }
            self.marks.insert(name.to_string(), Mark::Done);
            return Ok(());
        };
        self.marks.insert(name.to_string(), Mark::InProgress);
        self.stack.push(name.to_string());
        for dep in &module.depends {
            self.visit(dep)?;
        }
        self.stack.pop();
        self.marks.insert(name.to_string(), Mark::Done);
        self.out.push(module);
        Ok(())
    }
}

/// Collects module files below `dir`; symlinks (such as `build` and `source`) are not
/// followed.
fn find_modules(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), ModuleError> {
    let io_err = |source| ModuleError::Io(IoError::new(dir.to_path_buf(), source));
    for entry in std::fs::read_dir(dir).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        let ty = entry.file_type().map_err(io_err)?;
        let path = entry.path();
        if ty.is_dir() {
            find_modules(&path, out)?;
        } else if ty.is_file() && module_name_of(&path).is_some() {
            out.push(path);
        }
    }
    Ok(())
}

/// `virtio-pci.ko.xz` -> `virtio_pci`; `None` when not a module file name.
fn module_name_of(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = [".ko", ".ko.xz", ".ko.zst"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))?;
    (!stem.is_empty()).then(|| normalize(stem))
}

fn read_module(modules_dir: &Path, path: &Path) -> Result<Module, ModuleError> {
    let bad = |reason: String| ModuleError::BadModule {
        path: path.to_path_buf(),
        reason,
    };
    let raw = std::fs::read(path)
        .map_err(|source| ModuleError::Io(IoError::new(path.to_path_buf(), source)))?;
    let name = path.to_string_lossy();
    let bytes = if name.ends_with(".xz") {
        decompress(liblzma::read::XzDecoder::new(&raw[..])).map_err(|e| bad(format!("xz: {e}")))?
    } else if name.ends_with(".zst") {
        let decoder = zstd::Decoder::new(&raw[..]).map_err(|e| bad(format!("zstd: {e}")))?;
        decompress(decoder).map_err(|e| bad(format!("zstd: {e}")))?
    } else {
        raw
    };
    let modinfo = elf_section(&bytes, ".modinfo")
        .map_err(bad)?
        .ok_or_else(|| bad("no .modinfo section".into()))?;
    let info = parse_modinfo(modinfo);
    let fallback = module_name_of(path).unwrap_or_default();
    let mut depends = info.depends;
    depends.sort();
    depends.dedup();
    Ok(Module {
        name: info.name.unwrap_or(fallback),
        rel_path: path.strip_prefix(modules_dir).unwrap_or(path).to_path_buf(),
        depends,
        aliases: info.aliases,
    })
}

fn decompress(r: impl Read) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    r.take(MAX_MODULE_BYTES).read_to_end(&mut out)?;
    Ok(out)
}

/// The content of the ELF section called `wanted`, reading only the header, the
/// section headers and the section name table (a full goblin parse would also decode
/// every relocation, which a `.ko` has thousands of).
pub fn elf_section<'a>(bytes: &'a [u8], wanted: &str) -> Result<Option<&'a [u8]>, String> {
    use goblin::container::Ctx;
    use goblin::elf::{Elf, SectionHeader};
    let header = Elf::parse_header(bytes).map_err(|e| format!("not an ELF file: {e}"))?;
    let ctx = Ctx::new(
        header.container().map_err(|e| e.to_string())?,
        header.endianness().map_err(|e| e.to_string())?,
    );
    let shoff = usize::try_from(header.e_shoff).map_err(|e| e.to_string())?;
    let sections = SectionHeader::parse(bytes, shoff, usize::from(header.e_shnum), ctx)
        .map_err(|e| format!("section headers: {e}"))?;
    let strtab = sections
        .get(usize::from(header.e_shstrndx))
        .ok_or("section name table index out of range")?;
    let names = section_bytes(bytes, strtab).ok_or("section name table out of bounds")?;
    for sh in &sections {
        let name = names
            .get(sh.sh_name..)
            .and_then(|rest| rest.split(|&b| b == 0).next());
        if name == Some(wanted.as_bytes()) {
            return section_bytes(bytes, sh)
                .map(Some)
                .ok_or_else(|| format!("section {wanted} out of bounds"));
        }
    }
    Ok(None)
}

fn section_bytes<'a>(bytes: &'a [u8], sh: &goblin::elf::SectionHeader) -> Option<&'a [u8]> {
    let start = usize::try_from(sh.sh_offset).ok()?;
    let len = usize::try_from(sh.sh_size).ok()?;
    bytes.get(start..start.checked_add(len)?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal little-endian ELF64 relocatable with one `.modinfo` section.
    pub(crate) fn elf_with_modinfo(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.modinfo\0.shstrtab\0";
        let data_off = 64u64;
        let str_off = data_off + modinfo.len() as u64;
        let sh_off = (str_off + shstrtab.len() as u64).next_multiple_of(8);
        let mut out = Vec::new();
        out.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        out.extend_from_slice(&1u16.to_le_bytes()); // ET_REL
        out.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes()); // entry
        out.extend_from_slice(&0u64.to_le_bytes()); // phoff
        out.extend_from_slice(&sh_off.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes()); // flags
        for v in [64u16, 0, 0, 64, 3, 2] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(modinfo);
        out.extend_from_slice(shstrtab);
        out.resize(sh_off as usize, 0);
        let mut sh = |name: u32, ty: u32, off: u64, size: u64| {
            out.extend_from_slice(&name.to_le_bytes());
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&[0u8; 16]); // flags, addr
            out.extend_from_slice(&off.to_le_bytes());
            out.extend_from_slice(&size.to_le_bytes());
            out.extend_from_slice(&[0u8; 8]); // link, info
            out.extend_from_slice(&1u64.to_le_bytes());
            out.extend_from_slice(&0u64.to_le_bytes());
        };
        sh(0, 0, 0, 0);
        sh(1, 1, data_off, modinfo.len() as u64);
        sh(10, 3, str_off, shstrtab.len() as u64);
        out
    }

    fn module_bytes(name: &str, depends: &str) -> Vec<u8> {
        elf_with_modinfo(
            format!("license=GPL\0depends={depends}\0retpoline=Y\0name={name}\0vermagic=6.1\0")
                .as_bytes(),
        )
    }

    #[test]
    fn aliases_are_collected_and_written_in_depmod_format() {
        let info = parse_modinfo(
            b"alias=nfnetlink-subsys-10\0name=nf_tables\0alias=nft-expr-x\0depends=nfnetlink\0",
        );
        assert_eq!(info.aliases, ["nfnetlink-subsys-10", "nft-expr-x"]);
        let m = Module {
            name: "nf_tables".into(),
            rel_path: "kernel/net/netfilter/nf_tables.ko".into(),
            depends: info.depends,
            aliases: info.aliases,
        };
        let index = ModuleIndex {
            dir: PathBuf::new(),
            modules: [(m.name.clone(), m)].into(),
            builtin: BTreeSet::new(),
        };
        assert_eq!(
            index.modules_alias(),
            "# Aliases extracted from modules themselves.\nalias nfnetlink-subsys-10 nf_tables\nalias nft-expr-x nf_tables\n"
        );
    }

    #[test]
    fn modinfo_fields() {
        let info = parse_modinfo(b"alias=x\0depends=virtio,virtio-ring,\0name=virtio-pci\0\0");
        assert_eq!(info.name.as_deref(), Some("virtio_pci"));
        assert_eq!(info.depends, ["virtio", "virtio_ring"]);
        assert_eq!(parse_modinfo(b"depends=\0"), ModInfo::default());
        assert_eq!(parse_modinfo(b""), ModInfo::default());
        assert_eq!(parse_modinfo(b"name=a\0name=b\0"), parse_modinfo(b"name=a"));
        assert_eq!(
            parse_modinfo(b"noequals\0=\0name=\0\xff\xfe=1"),
            ModInfo::default()
        );
        let odd = parse_modinfo(b"name=\xffx\0depends=,,a,,\0");
        assert_eq!(odd.name.as_deref(), Some("\u{fffd}x"));
        assert_eq!(odd.depends, ["a"]);
    }

    #[test]
    fn elf_section_handles_garbage() {
        let elf = module_bytes("a", "");
        assert!(elf_section(&elf, ".modinfo").unwrap().is_some());
        assert_eq!(elf_section(&elf, ".text").unwrap(), None);
        for cut in [0, 10, 64, 80, elf.len() - 1] {
            assert!(elf_section(&elf[..cut], ".modinfo").is_err(), "cut {cut}");
        }
        let mut bad = elf.clone();
        // Point .modinfo past the end of the file.
        let sh1 = bad.len() - 2 * 64;
        bad[sh1 + 24..sh1 + 32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(elf_section(&bad, ".modinfo").is_err());
        assert!(elf_section(b"hello", ".modinfo").is_err());
    }

    /// Writes a fake modules directory: name -> (file name, depends), and built-ins.
    fn fake_tree(dir: &Path, mods: &[(&str, &str, &str)], builtin: &[&str]) {
        for (file, name, deps) in mods {
            let path = dir.join("kernel/drivers").join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let elf = module_bytes(name, deps);
            let bytes = if file.ends_with(".xz") {
                let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
                std::io::Write::write_all(&mut e, &elf).unwrap();
                e.finish().unwrap()
            } else if file.ends_with(".zst") {
                zstd::encode_all(&elf[..], 1).unwrap()
            } else {
                elf
            };
            std::fs::write(path, bytes).unwrap();
        }
        let builtin: String = builtin
            .iter()
            .map(|b| format!("kernel/fs/{b}.ko\n"))
            .collect();
        std::fs::write(dir.join("modules.builtin"), builtin).unwrap();
    }

    fn names(ms: &[&Module]) -> Vec<String> {
        ms.iter().map(|m| m.name.clone()).collect()
    }

    #[test]
    fn closure_orders_dependencies_first() {
        let dir = tempfile::tempdir().unwrap();
        fake_tree(
            dir.path(),
            &[
                ("virtio/virtio.ko", "virtio", ""),
                ("virtio/virtio_ring.ko.xz", "virtio_ring", "virtio"),
                (
                    "virtio/virtio_pci.ko.zst",
                    "virtio_pci",
                    "virtio_ring,virtio,ext4",
                ),
                ("block/virtio-blk.ko", "virtio_blk", "virtio_ring,virtio"),
                ("scsi/sr_mod.ko", "sr_mod", "cdrom"),
                ("cdrom/cdrom.ko", "cdrom", ""),
                ("misc/unnamed-mod.ko", "", ""),
            ],
            &["ext4", "crc32c_generic"],
        );
        let index = ModuleIndex::scan(dir.path()).unwrap();
        assert_eq!(index.modules.len(), 7);
        assert!(index.get("unnamed-mod").is_some());
        assert!(index.is_builtin("ext4"));
        let got = index
            .closure(&["virtio-pci", "sr_mod", "ext4", "virtio_blk"])
            .unwrap();
        assert_eq!(
            names(&got),
            [
                "virtio",
                "virtio_ring",
                "virtio_pci",
                "cdrom",
                "sr_mod",
                "virtio_blk"
            ]
        );
        assert_eq!(
            got[2].rel_path,
            Path::new("kernel/drivers/virtio/virtio_pci.ko.zst")
        );
        let err = index
            .closure(&["nope", "virtio", "also-missing"])
            .unwrap_err();
        assert!(
            matches!(&err, ModuleError::Unknown { names, .. } if names == &["also_missing", "nope"]),
            "{err}"
        );

        let dep = index.modules_dep();
        assert!(dep.contains(
            "kernel/drivers/virtio/virtio_pci.ko.zst: kernel/drivers/virtio/virtio_ring.ko.xz kernel/drivers/virtio/virtio.ko\n"
        ), "{dep}");
        assert!(dep.contains("kernel/drivers/virtio/virtio.ko:\n"), "{dep}");
        assert!(
            dep.starts_with("kernel/drivers/block/virtio-blk.ko: "),
            "{dep}"
        );
        assert_eq!(dep.lines().count(), 7);
    }

    #[test]
    fn cycles_are_errors_not_hangs() {
        let dir = tempfile::tempdir().unwrap();
        fake_tree(
            dir.path(),
            &[("a.ko", "a", "b"), ("b.ko", "b", "c"), ("c.ko", "c", "a")],
            &[],
        );
        let index = ModuleIndex::scan(dir.path()).unwrap();
        let err = index.closure(&["a"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel module dependency cycle: a -> b -> c -> a"
        );
        assert_eq!(index.modules_dep().lines().count(), 3);
    }

    #[test]
    fn bad_module_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.ko"), b"not elf").unwrap();
        let err = ModuleIndex::scan(dir.path()).unwrap_err();
        assert!(err.to_string().contains("x.ko"), "{err}");
        std::fs::write(dir.path().join("x.ko"), b"").unwrap();
        std::fs::rename(dir.path().join("x.ko"), dir.path().join("x.ko.xz")).unwrap();
        assert!(ModuleIndex::scan(dir.path()).is_err());
    }
}
