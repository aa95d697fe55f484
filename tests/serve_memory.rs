//! `--max-memory`: requests are admitted by what their images will cost, counted from the headers
//! before decoding (503 when they do not fit now, 413 when they never could), the server's resident
//! memory stays under its budget with PNG decompression bombs, and falls back after large batches.
//! The server runs as a child process so its memory is measured alone (/proc/PID/status).

mod serve_util;

use retinaface::serve::memory::{self, ForwardModel};
use retinaface::{Engine, WeightsSpec};
use serve_util::*;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// What the server estimates for one all-black 8-bit RGB PNG of w×h at original size.
fn png_cost(model: &ForwardModel, w: u32, h: u32) -> u64 {
    let p = retinaface::image_io::probe(&png_bomb(w, h), "bomb.png").expect("probe");
    memory::decode_bytes(&p, retinaface::image_io::ResizeMode::Original) + model.bytes(h as usize, w as usize)
}

#[test]
fn png_bombs_are_admitted_by_header_size_and_memory_falls_back() {
    let engine = Engine::new(&WeightsSpec::File(real_weights()), None).expect("engine");
    let model = ForwardModel::new(engine.graph());
    drop(engine);
    // Bombs that fit one request at a time: 1280x1280, two per request. The budget holds one
    // such request and a half, so a second one at the same time is refused.
    let (w, h) = (1280u32, 1280u32);
    let per_request = 2 * png_cost(&model, w, h);
    let budget = per_request * 3 / 2;
    let budget_flag = budget.to_string();
    let mut server = spawn_server(&["--max-memory", &budget_flag, "--max-batch", "8", "--max-queue", "64"], "");
    let a = server.addr;
    // Warm up at a small size, so the baseline holds the weights and the runtime.
    assert_eq!(detect(a, &read_image("trio.jpg")).status, 200);
    let base = server.status_bytes("VmRSS");

    // The issue's attack: one ~400 KB request of eight 4096x4096 PNG bombs. It can never fit in
    // the budget: 413 at once, before anything is decoded.
    let bomb = png_bomb(4096, 4096);
    assert!(bomb.len() < 100_000, "a bomb is small: {} bytes", bomb.len());
    let eight = vec![bomb; 8];
    let t0 = Instant::now();
    let r = post_v2_binary(a, &eight);
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.error().contains("--max-memory"), "{}", r.error());
    assert!(t0.elapsed() < Duration::from_secs(5), "refused at once, took {:?}", t0.elapsed());
    let hwm = server.status_bytes("VmHWM");
    assert!(hwm < base + 64 * MIB, "nothing decoded: peak {} MiB over a {} MiB baseline", hwm / MIB, base / MIB);

    // One such request alone: what it really takes stays within its estimate.
    let bomb = png_bomb(w, h);
    assert_eq!(post_v2_binary(a, &[bomb.clone(), bomb.clone()]).status, 200);
    let used = server.status_bytes("VmHWM") - base;
    assert!(used <= per_request, "a request took {} MiB, over its estimate of {} MiB", used / MIB, per_request / MIB);

    // Four clients at once; each request is admitted only when its estimate fits (else 503 at once).
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let two = vec![bomb.clone(), bomb.clone()];
            std::thread::spawn(move || {
                // Each client retries after a 503 until two of its requests are served.
                let (mut answers, t0) = (Vec::new(), Instant::now());
                while answers.iter().filter(|(s, _)| *s == 200).count() < 2 && t0.elapsed() < Duration::from_secs(120) {
                    let r = post_v2_binary(a, &two);
                    if r.status == 503 {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    answers.push((r.status, r.error_or_empty()));
                }
                answers
            })
        })
        .collect();
    let answers: Vec<(u16, String)> = clients.into_iter().flat_map(|c| c.join().expect("client")).collect();
    let ok = answers.iter().filter(|(s, _)| *s == 200).count();
    let busy = answers.iter().filter(|(s, _)| *s == 503).count();
    for (status, err) in &answers {
        assert!(*status == 200 || (*status == 503 && err.contains("--max-memory")), "{status}: {err}");
    }
    assert_eq!(ok, 8, "every client was served in the end");
    assert!(busy >= 1, "only one such request fits at a time: the others were refused at once");
    let hwm = server.status_bytes("VmHWM");
    assert!(
        hwm < base + budget + 128 * MIB,
        "peak {} MiB is over the {} MiB baseline plus the {} MiB budget",
        hwm / MIB,
        base / MIB,
        budget / MIB
    );
    // After a large batch the executor drops the engine's spare buffers and trims the heap, just
    // after it answers: give it a moment.
    let mut after = server.status_bytes("VmRSS");
    let t0 = Instant::now();
    while after >= base + 96 * MIB && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
        after = server.status_bytes("VmRSS");
    }
    // Settled (not a dip between two allocations).
    std::thread::sleep(Duration::from_millis(500));
    after = server.status_bytes("VmRSS");
    assert!(
        after < base + 96 * MIB,
        "resident memory fell back: {} MiB after, {} MiB baseline, {} MiB peak",
        after / MIB,
        base / MIB,
        hwm / MIB
    );
    eprintln!(
        "budget {} MiB ({} MiB a request, {} MiB used alone); baseline {} MiB, peak {} MiB, after {} MiB; {ok} of {} requests served",
        budget / MIB,
        per_request / MIB,
        used / MIB,
        base / MIB,
        hwm / MIB,
        after / MIB,
        answers.len()
    );
    let st = server.terminate(Duration::from_secs(30));
    assert!(st.success(), "{st:?}");
}

#[test]
fn default_budget_refuses_the_issue_request_on_a_machine_it_does_not_fit() {
    // The issue's request (8 PNG bombs of 4096x4096) against the default --max-memory, half of what the
    // machine offers. This VM has 24 GB, where the request fits the default and is served within it; a
    // machine of 8 GB (told through RETINAFACE_MACHINE_MEMORY, as a container whose cgroup files do not
    // show its limit) must refuse it from the headers alone, with 413 and without decoding.
    let engine = Engine::new(&WeightsSpec::File(real_weights()), None).expect("engine");
    let model = ForwardModel::new(engine.graph());
    let cost = 8 * png_cost(&model, 4096, 4096);
    assert!(cost > 4 << 30, "the 8-bomb request is estimated at {} MiB", cost / MIB);
    let server = spawn_server(&[], "export RETINAFACE_MACHINE_MEMORY=8G;");
    let r = post_v2_binary(server.addr, &vec![png_bomb(4096, 4096); 8]);
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(server.status_bytes("VmHWM") < 512 * MIB);
}

#[test]
fn a_bad_machine_memory_override_is_named() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_retinaface"))
        .args(["serve", "--synthetic-seed", "1", "--network", "mobilenetv1_0.25", "--port", "0"])
        .env("RETINAFACE_MACHINE_MEMORY", "lots")
        .output()
        .expect("run serve");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("RETINAFACE_MACHINE_MEMORY=`lots`"), "{err}");
}
