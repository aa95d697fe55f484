//! Fuzzing of the v2 request parser (JSON and the binary data extension) inside `cargo test`, without
//! instrumentation (the coverage-guided libFuzzer target is fuzz/fuzz_targets/v2.rs, run by
//! tools/fuzz.sh): seeded, structure-aware random mutation of the committed corpus
//! (tests/serve_util/fuzz_v2), guided by outcomes — a mutant whose result (accepted, or the kind of
//! error) was not seen before joins the corpus and is mutated further.
//!
//! Every input must give a 400 with a message or a request within its bounds; no panic, no 5xx, and
//! each parse bounded in time. Bounded in CI by `RETINAFACE_FUZZ_SECS` (default 8 s) and
//! reproducible with `RETINAFACE_FUZZ_SEED`.

mod rng;

use axum::body::Bytes;
use retinaface::serve::v2::{self, InferRequest};
use rng::Rng;
use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

/// One fuzz case: the body and the Inference-Header-Content-Length header, if any.
#[derive(Clone, Debug)]
struct Case {
    header: Option<Vec<u8>>,
    body: Vec<u8>,
}

fn corpus() -> Vec<Case> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/serve_util/fuzz_v2");
    let mut files: Vec<_> = std::fs::read_dir(&dir).expect("corpus dir").map(|e| e.expect("entry").path()).collect();
    files.sort();
    files
        .iter()
        .map(|p| {
            let bytes = std::fs::read(p).expect("corpus file");
            if p.extension().is_some_and(|e| e == "bin") {
                // The header value as 8 ASCII digits and a newline, then the body.
                Case { header: Some(bytes[..8].to_vec()), body: bytes[9..].to_vec() }
            } else {
                Case { header: None, body: bytes }
            }
        })
        .collect()
}

const TOKENS: &[&[u8]] = &[
    b"[",
    b"]",
    b"{",
    b"}",
    b"\"",
    b",",
    b":",
    b"null",
    b"true",
    b"0",
    b"-1",
    b"1e400",
    b"18446744073709551616",
    b"\"image\"",
    b"\"BYTES\"",
    b"\"shape\"",
    b"\"data\"",
    b"\"inputs\"",
    b"\"outputs\"",
    b"\"b64\"",
    b"\"id\"",
    b"\"parameters\"",
    b"\"binary_data_size\"",
    b"\"binary_data\"",
    b"\"binary_data_output\"",
    b"\\u0000",
    b"\\ud800",
    b"\xff\xfe",
    b"[[[[[[[[",
    b"]]]]]]]]",
    b"\"/9j/\"",
    b"{\"b64\":\"iVBORw0K\"}",
    b"4294967295",
];

fn mutate(rng: &mut Rng, c: &Case, pool: &[Case]) -> Case {
    let mut out = c.clone();
    for _ in 0..1 + rng.below(4) {
        let b = &mut out.body;
        let at = rng.below(b.len() + 1);
        match rng.below(10) {
            0 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
            1 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                b.splice(at..at, t.iter().copied());
            }
            2 if !b.is_empty() => {
                let end = (at + 1 + rng.below(16)).min(b.len());
                b.drain(at.min(end)..end);
            }
            3 if !b.is_empty() => {
                // Repeat a slice: long lists, deep nesting, big strings.
                let s = rng.below(b.len());
                let e = (s + 1 + rng.below(32)).min(b.len());
                let piece = b[s..e].to_vec();
                let times = 1 + rng.below(64);
                for _ in 0..times {
                    b.splice(at..at, piece.iter().copied());
                }
            }
            4 => b.truncate(at),
            5 => {
                // Splice with another corpus entry.
                let o = &pool[rng.below(pool.len())].body;
                let s = rng.below(o.len() + 1);
                b.truncate(at);
                b.extend_from_slice(&o[s..]);
            }
            6 => {
                // A number in the text replaced by an extreme one.
                if let Some(p) = b.iter().position(|x| x.is_ascii_digit()) {
                    let t = [&b"0"[..], b"-5", b"99999999999999999999", b"4294967296", b"1.5", b"256"][rng.below(6)];
                    b.splice(p..p + 1, t.iter().copied());
                }
            }
            7 => {
                let v = [0usize, 1, 3, 4, 8, 100, u32::MAX as usize][rng.below(7)];
                // Binary elements' length prefixes, or the header length.
                if let Some(h) = out.header.as_mut() {
                    if rng.below(2) == 0 {
                        *h = v.to_string().into_bytes();
                    } else if b.len() >= 4 {
                        let i = rng.below(b.len() - 3);
                        b[i..i + 4].copy_from_slice(&(v as u32).to_le_bytes());
                    }
                }
            }
            8 => out.header = if out.header.is_some() { None } else { Some(b.len().to_string().into_bytes()) },
            _ => b.push(rng.next() as u8),
        }
    }
    out
}

/// The result's kind: the error text without the numbers and quoted names in it.
fn outcome(r: &Result<InferRequest, retinaface::serve::http::ApiError>) -> String {
    match r {
        Ok(req) => format!("ok {} images {} outputs", req.images.len().min(3), req.outputs.len()),
        // Text outside `quoted` or "quoted" names and serde's positions, letters only.
        Err(e) => e
            .msg
            .split(['`', '"'])
            .step_by(2)
            .flat_map(|part| part.split(" at line").next())
            .flat_map(|part| part.chars())
            .filter(|c| c.is_ascii_alphabetic() || *c == ' ')
            .take(60)
            .collect(),
    }
}

#[test]
fn v2_parser_survives_seeded_mutation() {
    let secs: u64 = std::env::var("RETINAFACE_FUZZ_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(8);
    let seed: u64 = std::env::var("RETINAFACE_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5EED_0010);
    let max_batch = 8;
    let mut pool = corpus();
    assert!(pool.len() >= 6);
    // The corpus itself parses as intended: the valid entries are accepted.
    let accepted = pool
        .iter()
        .filter(|c| v2::parse_infer(&Bytes::from(c.body.clone()), c.header.as_deref(), max_batch).is_ok())
        .count();
    assert!(accepted >= 4, "valid corpus entries parse: {accepted}");
    let mut rng = Rng(seed | 1);
    let mut seen = HashSet::new();
    let (t0, mut runs, mut slowest) = (Instant::now(), 0u64, Duration::ZERO);
    while t0.elapsed() < Duration::from_secs(secs) {
        let parent = pool[rng.below(pool.len())].clone();
        let case = mutate(&mut rng, &parent, &pool);
        let body = Bytes::from(case.body.clone());
        let t = Instant::now();
        let r = std::panic::catch_unwind(|| v2::parse_infer(&body, case.header.as_deref(), max_batch));
        slowest = slowest.max(t.elapsed());
        let r = r.unwrap_or_else(|_| panic!("parser panicked (seed {seed}, run {runs}) on {case:?}"));
        match &r {
            Ok(req) => {
                assert!(!req.images.is_empty() && req.images.len() <= max_batch, "{case:?}");
                assert!(req.outputs.len() <= v2::OUTPUTS.len(), "{case:?}");
                let total: usize = req.images.iter().map(|i| i.len()).sum();
                assert!(total <= case.body.len(), "images are within the body: {case:?}");
            }
            Err(e) => {
                assert_eq!(e.status.as_u16(), 400, "{}: {case:?}", e.msg);
                assert!(!e.msg.is_empty());
            }
        }
        if seen.insert(outcome(&r)) && pool.len() < 512 && case.body.len() < 1 << 16 {
            pool.push(case);
        }
        runs += 1;
    }
    eprintln!(
        "v2 parser fuzz: {runs} runs in {:.1} s (seed {seed}), {} distinct outcomes, corpus {}, slowest parse {:?}",
        t0.elapsed().as_secs_f64(),
        seen.len(),
        pool.len(),
        slowest
    );
    assert!(runs > 1000, "the fuzzer ran: {runs}");
    assert!(seen.len() >= 20, "mutation reached many outcomes: {seen:?}");
    assert!(slowest < Duration::from_millis(500), "each parse is bounded: {slowest:?}");
}
