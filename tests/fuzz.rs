//! Structured random-mutation fuzzing of every file loader and parser inside `cargo test`, without
//! instrumentation (the coverage-guided libFuzzer targets are in fuzz/, run by tools/fuzz.sh): image decoding (JPEG
//! through libjpeg, PNG) and probing, PyTorch checkpoints (zip and legacy), the pickle machine alone,
//! safetensors, and the MAT reader. Each target mutates its committed seed corpus (fuzz/corpus, written
//! by tools/make_fuzz_corpus.py) with a seeded generator — bit flips, byte sets, interesting integers
//! written over 1, 2, 4 or 8 bytes in either byte order, insertions, deletions, duplications, splices of
//! two seeds, truncations — for RETINAFACE_FUZZ_SECS seconds (default 8) and reports its execution
//! count. No input may panic (caught, saved to target/fuzz-crashes, and the test fails), abort (the test
//! process dies), or allocate past the address-space cap set on this test process.

mod rng;
use retinaface::image_io::{self, DecodeLimits};
use retinaface::weights::{pth, safetensors_io};
use retinaface::widerface::mat::MatFile;
use rng::Rng;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The whole test process's address space: the decoders run with limits far below it.
const CAP_BYTES: u64 = 3 << 30;

fn cap_memory() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let lim = libc::rlimit { rlim_cur: CAP_BYTES, rlim_max: CAP_BYTES };
        // SAFETY: plain syscall on a valid struct.
        let rc = unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) };
        assert_eq!(rc, 0, "setrlimit");
    });
}

const INTERESTING: [u64; 14] =
    [0, 1, 2, 0x7f, 0x80, 0xff, 0x7fff, 0xffff, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, 1 << 31, 1 << 62, u64::MAX];

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut d = seeds[rng.below(seeds.len())].clone();
    for _ in 0..1 + rng.below(4) {
        let len = d.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                d[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                d[i] = rng.next() as u8;
            }
            2 if len > 0 => {
                let width = [1, 2, 4, 8][rng.below(4)];
                let v = INTERESTING[rng.below(INTERESTING.len())];
                let bytes = if rng.below(2) == 0 { v.to_le_bytes() } else { v.to_be_bytes() };
                let at = rng.below(len);
                let src = if rng.below(2) == 0 { &bytes[..width] } else { &bytes[8 - width..] };
                for (k, b) in src.iter().enumerate() {
                    if at + k < len {
                        d[at + k] = *b;
                    }
                }
            }
            3 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let fill: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                d.splice(at..at, fill);
            }
            4 if len > 1 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(64));
                d.drain(at..at + n);
            }
            5 if len > 1 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(256));
                let chunk = d[at..at + n].to_vec();
                let to = rng.below(len + 1);
                d.splice(to..to, chunk);
            }
            6 => {
                let other = &seeds[rng.below(seeds.len())];
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                d.truncate(cut);
                d.extend_from_slice(&other[from..]);
            }
            7 if len > 0 => d.truncate(rng.below(len)),
            _ => {
                if let Some(i) = (len > 0).then(|| rng.below(len)) {
                    d[i] = d[i].wrapping_add(1 + rng.below(3) as u8);
                }
            }
        }
    }
    d
}

/// The valid seeds of a target: the `regress_*` files beside them are inputs the libFuzzer targets found
/// (errors by design; src/image_io.rs tests them), kept as seeds for tools/fuzz.sh.
fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("regress_")))
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

fn secs() -> u64 {
    std::env::var("RETINAFACE_FUZZ_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(8)
}

/// Runs `f` on mutations of `seeds` for the configured time; `f` returns whether the input was accepted.
fn fuzz(target: &str, seeds: &[Vec<u8>], f: impl Fn(&[u8]) -> bool) {
    cap_memory();
    let seed = 0x5eed ^ target.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
    let mut rng = Rng(seed | 1);
    let deadline = Instant::now() + Duration::from_secs(secs());
    let (mut execs, mut accepted) = (0u64, 0u64);
    let start = Instant::now();
    while Instant::now() < deadline {
        let input = mutate(&mut rng, seeds);
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&input))) {
            Ok(ok) => accepted += ok as u64,
            Err(_) => {
                let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-crashes");
                std::fs::create_dir_all(&dir).unwrap();
                let path = dir.join(format!("{target}-{execs}"));
                std::fs::write(&path, &input).unwrap();
                panic!("fuzz {target}: input {execs} panicked; saved to {}", path.display());
            }
        }
        execs += 1;
    }
    let s = start.elapsed().as_secs_f64();
    println!("fuzz {target}: {execs} executions in {s:.1} s ({:.0}/s), {accepted} accepted", execs as f64 / s);
    assert!(execs > 0);
}

fn limits() -> DecodeLimits {
    DecodeLimits { max_pixels: 1 << 22, max_dimension: 8192 }
}

#[test]
fn fuzz_image_decoding() {
    let seeds = corpus("image");
    for s in &seeds {
        image_io::decode(s, "seed", &limits()).unwrap();
    }
    fuzz("image", &seeds, |b| {
        let probed = image_io::probe(b, "fuzz").is_ok();
        let decoded = image_io::decode(b, "fuzz", &limits()).is_ok();
        probed && decoded
    });
}

#[test]
fn fuzz_pth_checkpoints() {
    let seeds = corpus("pth");
    for s in &seeds {
        let sd = pth::parse_checkpoint(s, Path::new("seed.pth")).unwrap();
        assert_eq!(sd.tensors.len(), 3);
    }
    fuzz("pth", &seeds, |b| pth::parse_checkpoint(b, Path::new("fuzz.pth")).is_ok());
}

/// The pickle machine alone: mutated state-dict pickles framed as the legacy format's fourth pickle,
/// so every mutation reaches the unpickler instead of failing the zip or magic-number checks.
#[test]
fn fuzz_unpickler() {
    let legacy = corpus("pth").into_iter().find(|s| !s.starts_with(b"PK")).unwrap();
    // The legacy file: magic, version, sys info pickles, then the state dict's pickle; split after the
    // third STOP of a protocol-2 pickle that is followed by another PROTO.
    let starts: Vec<usize> =
        legacy.windows(3).enumerate().filter(|(_, w)| w == b".\x80\x02").map(|(i, _)| i + 1).collect();
    let (head, sd_start) = (&legacy[..starts[2]], starts[2]);
    let sd_end = starts[3];
    let pickles = vec![legacy[sd_start..sd_end].to_vec()];
    let keys = legacy[sd_end..].to_vec();
    fuzz("unpickler", &pickles, |p| {
        let mut b = head.to_vec();
        b.extend_from_slice(p);
        b.extend_from_slice(&keys);
        pth::parse_checkpoint(&b, Path::new("fuzz.pth")).is_ok()
    });
}

#[test]
fn fuzz_safetensors() {
    let seeds = corpus("safetensors");
    for s in &seeds {
        safetensors_io::parse(s, Path::new("seed.safetensors")).unwrap();
    }
    fuzz("safetensors", &seeds, |b| safetensors_io::parse(b, Path::new("fuzz.safetensors")).is_ok());
}

#[test]
fn fuzz_mat_reader() {
    let seeds = corpus("mat");
    for s in &seeds {
        MatFile::parse(s, "seed").unwrap();
    }
    fuzz("mat", &seeds, |b| MatFile::parse_with_limit(b, "fuzz", 1 << 24).is_ok());
}
