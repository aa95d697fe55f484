//! Tests on a real GPU. Without one (no driver, no device or no NVRTC) each prints SKIP with the reason
//! and passes; RETINAFACE_REQUIRE_GPU=1 (tools/gpu-check.sh) makes a missing GPU a failure.
//!
//! Tolerance: the CPU path's 5e-5 normalised max error on loc / conf / landmarks for every golden
//! case; detections matched one to one within the same tolerance (order free only among scores equal
//! within it, see tests/pipeline_sim.rs).

/// Writes straight to the process's stderr: libtest captures `eprintln!` of passing tests, and a skip
/// must be visible in a plain `cargo test` run.
macro_rules! skip {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

mod common;

use common::{case_names, load_case, match_f16_faces, max_abs_diff};
use retinaface::Backend;
use retinaface::cuda::{self, GpuEngine};
use retinaface::{Detection, Engine, PostOptions};
use std::time::Instant;

const TOL: f32 = 5e-5;

fn gpu_or_skip(test: &str) -> bool {
    match cuda::gpu_status() {
        Ok(d) => {
            println!("{test}: running on {d}");
            true
        }
        Err(e) => {
            if std::env::var("RETINAFACE_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("RETINAFACE_REQUIRE_GPU=1 but {e}");
            }
            skip!("SKIP {test}: no GPU: {e}");
            false
        }
    }
}

fn matches(got: &[Detection], want: &[Detection], scale: f32) -> Result<usize, String> {
    if got.len() != want.len() {
        return Err(format!("{} detections, reference {}", got.len(), want.len()));
    }
    let geo = |g: &Detection, w: &Detection| {
        g.bbox
            .iter()
            .zip(&w.bbox)
            .chain(g.landmarks.iter().zip(&w.landmarks))
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max)
            / scale
    };
    let mut used = vec![false; want.len()];
    let mut swaps = 0;
    for (i, g) in got.iter().enumerate() {
        let j = (0..want.len())
            .filter(|&j| !used[j] && (want[j].score - g.score).abs() <= TOL && geo(g, &want[j]) <= TOL)
            .min_by_key(|&j| j.abs_diff(i))
            .ok_or_else(|| format!("detection {i} {g:?} has no match"))?;
        used[j] = true;
        swaps += usize::from(j != i);
    }
    Ok(swaps)
}

#[test]
fn no_gpu_is_an_error_not_a_panic() {
    // Whatever the machine: these return, they never panic.
    let status = cuda::gpu_status();
    let devices = cuda::gpu::devices();
    println!("gpu_status: {status:?}; devices: {devices:?}");
    if status.is_err() {
        let case = load_case("synthetic-mobilenetv1_0.25-seed1-301x203");
        let cpu = Engine::new(&case.weights, Some(case.network)).unwrap();
        assert!(GpuEngine::new(cpu.graph(), Backend::Cuda).is_err());
    }
}

#[test]
fn every_golden_case_on_gpu() {
    if !gpu_or_skip("every_golden_case_on_gpu") {
        return;
    }
    let mut failures = Vec::new();
    for name in case_names() {
        let case = load_case(&name);
        let cpu = Engine::new(&case.weights, Some(case.network)).unwrap();
        let mut gpu = GpuEngine::new(cpu.graph(), Backend::Cuda).unwrap();
        let raw = gpu.raw_outputs(&[&case.input]).unwrap().pop().unwrap();
        let mut worst = 0.0f32;
        for (t, got) in [("loc", &raw.loc), ("conf", &raw.conf), ("landmarks", &raw.landmarks)] {
            let (d, mag) = max_abs_diff(got, &case.tensors[t].1);
            let e = d / mag.max(1.0);
            worst = worst.max(e);
            if e > TOL {
                failures.push(format!("{name} {t}: {e:.2e}"));
            }
        }
        let dets = gpu.detect(&[&case.input], &PostOptions::default()).unwrap().pop().unwrap();
        let scale = case.input.width.max(case.input.height) as f32;
        match matches(&dets, &case.detections, scale) {
            Ok(s) => {
                println!("{name:<45} raw max error {worst:.2e}, {} detections ({s} near-tie reorderings)", dets.len())
            }
            Err(e) => failures.push(format!("{name} detections: {e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The real checkpoints' goldens in f16 on the tensor cores, through the whole device path: every
/// reference face with score >= 0.5 found at IoU >= 0.9, score within 0.05, landmark median <= 0.5 px
/// (the bounds tests/f16_goldens_sim.rs checks in the simulation).
#[test]
fn real_weights_f16_goldens_on_gpu() {
    if !gpu_or_skip("real_weights_f16_goldens_on_gpu") {
        return;
    }
    let mut cases = 0;
    for name in case_names().into_iter().filter(|n| n.starts_with("real-")) {
        let case = load_case(&name);
        let cpu = Engine::new(&case.weights, Some(case.network)).unwrap();
        let mut gpu = GpuEngine::with_precision(cpu.graph(), Backend::Cuda, retinaface::Precision::F16).unwrap();
        let dets = gpu.detect(&[&case.input], &PostOptions::default()).unwrap().pop().unwrap();
        let (i, s, m) = match_f16_faces(&name, &dets, &case.detections);
        println!("{name:<45} f16: worst IoU {i:.4}, worst score error {s:.1e}, landmark median {m:.3} px");
        cases += 1;
    }
    assert!(cases > 0, "no real-weights golden case");
}

#[test]
fn throughput_on_gpu() {
    if !gpu_or_skip("throughput_on_gpu") {
        return;
    }
    let case = load_case("real-mv1_0.25-yakhyo-kids");
    let cpu = Engine::new(&case.weights, Some(case.network)).unwrap();
    let mut gpu = GpuEngine::new(cpu.graph(), Backend::Cuda).unwrap();
    for batch in [1usize, 8] {
        let imgs: Vec<_> = (0..batch).map(|_| &case.input).collect();
        gpu.detect(&imgs, &PostOptions::default()).unwrap();
        let iters = 20;
        let t0 = Instant::now();
        for _ in 0..iters {
            gpu.detect(&imgs, &PostOptions::default()).unwrap();
        }
        let dt = t0.elapsed().as_secs_f64() / iters as f64;
        println!(
            "THROUGHPUT {} {}x{} batch {batch}: {:.2} ms per batch, {:.1} images/s (f32, upload + network + post + download)",
            case.network,
            case.input.width,
            case.input.height,
            dt * 1e3,
            batch as f64 / dt
        );
    }
}

/// Per-stage device times of a bench pass on the GPU: the events recorded into the captured graph
/// (record nodes) are timed like eager ones, and the stages add up to the device total within the
/// events' resolution (about 0.5 µs each), eagerly and replayed, forward-only and with post-processing.
#[test]
fn stage_times_on_gpu() {
    if !gpu_or_skip("stage_times_on_gpu") {
        return;
    }
    let case = load_case("real-mv1_0.25-yakhyo-kids");
    let cpu = Engine::new(&case.weights, Some(case.network)).unwrap();
    let imgs = [&case.input, &case.input];
    let post = PostOptions::default();
    for graphs in [true, false] {
        let mut gpu = GpuEngine::new(cpu.graph(), Backend::Cuda).unwrap();
        gpu.set_cuda_graphs(graphs);
        let want = gpu.detect(&imgs, &post).unwrap();
        for forward_only in [false, true] {
            let mode = retinaface::exec::BenchMode { input_on_device: false, forward_only };
            let mut t = retinaface::Timings::default();
            for _ in 0..3 {
                gpu.bench_pass(&imgs, mode, &post, Some(&mut t)).unwrap();
            }
            assert_eq!(t.stage_clock, retinaface::exec::StageClock::Device);
            let sum = t.preprocess + t.backbone + t.neck + t.heads + t.postprocess;
            let slack = std::time::Duration::from_micros(3 * 6);
            assert!(sum.abs_diff(t.device) <= slack, "graphs {graphs}: stages {sum:?}, device {:?}", t.device);
            assert!(!t.backbone.is_zero() && !t.neck.is_zero(), "graphs {graphs}: {t:?}");
            println!("STAGES graphs {graphs} forward_only {forward_only}: {t:?}");
        }
        assert_eq!(gpu.detect(&imgs, &post).unwrap(), want, "graphs {graphs}: detection after timed passes");
    }
}
