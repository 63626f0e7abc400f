//! Fuzzes the overlay unpacker with arbitrary archive bytes (plain, or behind a gzip,
//! xz or zstd magic), on both paths: streamed (hash unknown) and sendfile (hash known).
//! Whatever the archive says, nothing may appear outside the root it is unpacked onto,
//! and the unpacker must return (kimg-init never panics).
#![no_main]

use kimg_init::unpack;

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(t) = tempfile::tempdir() else { return };
    let root = t.path().join("root");
    let beside = t.path().join("beside");
    for d in [&root, &beside] {
        std::fs::create_dir(d).unwrap();
    }
    let archive = t.path().join("a.tar");
    std::fs::write(&archive, data).unwrap();
    for known in [None, Some(("00", data.len() as u64))] {
        let _ = unpack::unpack_file(&archive, &root, &mut |_| {}, known);
        assert_eq!(
            std::fs::read_dir(&beside).unwrap().count(),
            0,
            "wrote beside the root"
        );
        let mut names: Vec<_> = std::fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["a.tar", "beside", "root"], "wrote next to the root");
        assert!(!Path::new("/tmp/kimg-fuzz-escape").exists());
    }
});
