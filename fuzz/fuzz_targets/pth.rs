//! PyTorch checkpoints (zip and legacy formats, the restricted unpickler, tensor storage views).
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let _ = retinaface::weights::pth::parse_checkpoint(data, Path::new("fuzz.pth"));
});
