//! Fuzzes the unpacker's path and link handling: random entry paths against a random
//! set of symlinks must never resolve into a forbidden tree, through a symlink, or to
//! a path with `.`, `..` or empty components.
#![no_main]

use kimg_init::pathsafe;

use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;

fuzz_target!(|data: &[u8]| {
    // Input: NUL-separated fields; the first is the entry path, then (link, target)
    // pairs; a first byte that is odd follows the last component.
    let Some((&flag, rest)) = data.split_first() else {
        return;
    };
    let mut fields = rest.split(|&b| b == 0);
    let Some(path) = fields.next() else { return };
    let mut links: HashMap<pathsafe::Components, Vec<u8>> = HashMap::new();
    while let (Some(l), Some(t)) = (fields.next(), fields.next()) {
        if let Ok(lc) = pathsafe::entry_components(l) {
            links.insert(lc, t.to_vec());
        }
    }
    let Ok(comps) = pathsafe::entry_components(path) else {
        return;
    };
    let follow = flag & 1 == 1;
    if let Ok(r) = pathsafe::resolve(&comps, follow, &mut |pre| links.get(pre).cloned()) {
        let top = String::from_utf8_lossy(&r[0]);
        assert!(!kimg_contract::cdrom::FORBIDDEN_TOP.contains(&top.as_ref()));
        for c in &r {
            assert!(!matches!(c.as_slice(), b"" | b"." | b".."));
            assert!(!c.contains(&b'/'));
        }
        for i in 1..r.len() {
            assert!(!links.contains_key(&r[..i]));
        }
        if follow {
            assert!(!links.contains_key(&r));
        }
    }
});
