//! The MATLAB v5 reader of the WIDER FACE ground truth (compressed and plain elements, cells, structs).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = retinaface::widerface::mat::MatFile::parse_with_limit(data, "fuzz", 1 << 24);
});
