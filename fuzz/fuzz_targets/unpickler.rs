//! The pickle machine alone: the input is the state dict's pickle of the legacy checkpoint in
//! fuzz/corpus/pth/legacy.pth, framed by that file's other parts, so every input reaches the unpickler
//! instead of failing the zip or magic-number checks. Seed it with fuzz/corpus/unpickler.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;
use std::sync::OnceLock;

/// (everything before the state dict's pickle, everything after it).
fn frame() -> &'static (Vec<u8>, Vec<u8>) {
    static FRAME: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    FRAME.get_or_init(|| {
        let legacy = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/corpus/pth/legacy.pth")).expect("legacy.pth");
        // Magic, version and sys-info pickles, the state dict's pickle, then the storage keys: each
        // protocol-2 pickle starts with PROTO 2 right after the previous one's STOP.
        let starts: Vec<usize> =
            legacy.windows(3).enumerate().filter(|(_, w)| w == b".\x80\x02").map(|(i, _)| i + 1).collect();
        (legacy[..starts[2]].to_vec(), legacy[starts[3]..].to_vec())
    })
}

fuzz_target!(|pickle: &[u8]| {
    let (head, tail) = frame();
    let mut b = Vec::with_capacity(head.len() + pickle.len() + tail.len());
    b.extend_from_slice(head);
    b.extend_from_slice(pickle);
    b.extend_from_slice(tail);
    let _ = retinaface::weights::pth::parse_checkpoint(&b, Path::new("fuzz.pth"));
});
