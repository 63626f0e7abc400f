//! Fuzzes what kimg-init reads off a cdrom before trusting it: the volume descriptor's
//! application-use field and the index file. Neither may panic; a parsed index
//! written back must parse to the same entries.
#![no_main]

use kimg_contract::cdrom::{index_text, parse_app_use, parse_index};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(h) = parse_app_use(data) {
        assert_eq!(h.len(), 64);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(entries) = parse_index(text) {
            assert_eq!(parse_index(&index_text(&entries)), Ok(entries));
        }
    }
});
