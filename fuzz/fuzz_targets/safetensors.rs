//! The engine's safetensors reader (header JSON, dtypes, offsets, values).
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let _ = retinaface::weights::safetensors_io::parse(data, Path::new("fuzz.safetensors"));
});
