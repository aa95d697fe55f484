//! The whole CUDA pipeline (image bytes → raw outputs → detections, every stage in our kernels) run in
//! the CPU simulation on a golden case, against the reference goldens and the CPU engine.
//!
//! Tolerance: the CPU path's, 5e-5 normalised max error (max |a − b| / max(1, max |b|)) on every tap
//! and on loc / conf / landmarks; detections must agree in number and order, each value within the
//! same normalised 5e-5 (boxes and landmarks normalised by the image size they are measured in).
#![cfg(feature = "cuda-sim")]

mod common;

use common::{load_case, max_abs_diff};
use retinaface::Backend;
use retinaface::cuda::GpuEngine;
use retinaface::{BgrImage, Detection, Engine, PostOptions};
use std::time::Instant;

const TOL: f32 = 5e-5;

fn norm(a: &[f32], b: &[f32]) -> f32 {
    assert!(a.iter().all(|v| !v.is_nan()), "NaN in the device output");
    let (d, mag) = max_abs_diff(a, b);
    d / mag.max(1.0)
}

/// Matches each device detection to an unused reference detection whose score and geometry agree
/// within TOL. Order is compared too, except among scores equal within TOL, where a 1e-7 difference may
/// legitimately swap neighbours (the reference breaks exact ties by anchor index; near-ties follow
/// the rounding). Returns (max score error, max geometry error, reordered near-ties).
fn compare_detections(got: &[Detection], want: &[Detection], scale: f32, what: &str) -> (f32, f32, usize) {
    assert_eq!(got.len(), want.len(), "{what}: number of detections");
    let geo = |g: &Detection, w: &Detection| {
        g.bbox
            .iter()
            .zip(&w.bbox)
            .chain(g.landmarks.iter().zip(&w.landmarks))
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max)
            / scale
    };
    let (mut score_err, mut geo_err, mut swaps) = (0.0f32, 0.0f32, 0);
    let mut used = vec![false; want.len()];
    for (i, g) in got.iter().enumerate() {
        let j = (0..want.len())
            .filter(|&j| !used[j] && (want[j].score - g.score).abs() <= TOL && geo(g, &want[j]) <= TOL)
            .min_by_key(|&j| j.abs_diff(i))
            .unwrap_or_else(|| panic!("{what}: detection {i} {g:?} has no match (reference at {i}: {:?})", want[i]));
        used[j] = true;
        if j != i {
            swaps += 1;
        }
        score_err = score_err.max((want[j].score - g.score).abs());
        geo_err = geo_err.max(geo(g, &want[j]));
    }
    (score_err, geo_err, swaps)
}

#[test]
fn golden_mobilenet025_301x203_in_simulation() {
    let case = load_case("synthetic-mobilenetv1_0.25-seed1-301x203");
    let cpu = Engine::new(&case.weights, Some(case.network)).unwrap();
    let graph = cpu.graph().clone();
    let mut gpu = GpuEngine::new(&graph, Backend::CudaSim).unwrap();
    println!("device: {}", gpu.describe());

    let t0 = Instant::now();
    let raw = gpu.raw_outputs(&[&case.input]).unwrap().pop().unwrap();
    println!("forward in simulation: {:.2?}", t0.elapsed());
    let taps = graph.taps;
    for (stage, ids) in [("backbone", taps.backbone), ("fpn", taps.fpn), ("ssh", taps.ssh)] {
        for (l, &t) in ids.iter().enumerate() {
            let name = format!("{stage}.{l}");
            let got = gpu.tensor_nchw(t).unwrap();
            let e = norm(&got, &case.tensors[&name].1);
            println!("{name:<12} normalised max error {e:.2e}");
            assert!(e <= TOL, "{name}: {e}");
        }
    }
    for (name, got) in [("loc", &raw.loc), ("conf", &raw.conf), ("landmarks", &raw.landmarks)] {
        let e = norm(got, &case.tensors[name].1);
        println!("{name:<12} normalised max error {e:.2e}");
        assert!(e <= TOL, "{name}: {e}");
    }

    let t0 = Instant::now();
    let dets = gpu.detect(&[&case.input], &PostOptions::default()).unwrap().pop().unwrap();
    println!("detect in simulation: {:.2?}", t0.elapsed());
    let scale = case.input.width.max(case.input.height) as f32;
    let (s, g, swaps) = compare_detections(&dets, &case.detections, scale, "golden detections");
    println!(
        "{} detections; score max error {s:.2e}, box/landmark max error {g:.2e} (normalised by {scale}); {swaps} near-tie reorderings",
        dets.len()
    );
}

/// A batch of two different images of one size: each image's outputs equal the CPU engine's.
#[test]
fn batch_of_two_matches_cpu_engine_in_simulation() {
    let case = load_case("synthetic-mobilenetv1_0.25-seed1-301x203");
    let cpu = Engine::new(&case.weights, Some(case.network)).unwrap();
    // The second image: the first mirrored left-right, so the two differ everywhere.
    let (w, h) = (case.input.width, case.input.height);
    let mut flipped = vec![0u8; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            let (s, d) = ((y * w + x) * 3, (y * w + (w - 1 - x)) * 3);
            flipped[d..d + 3].copy_from_slice(&case.input.data[s..s + 3]);
        }
    }
    let second = BgrImage::new(w, h, flipped).unwrap();
    let batch = [&case.input, &second];
    let want = cpu.forward(&batch).unwrap();
    let mut gpu = GpuEngine::new(cpu.graph(), Backend::CudaSim).unwrap();
    let got = gpu.raw_outputs(&batch).unwrap();
    for (b, (g, w)) in got.iter().zip(&want).enumerate() {
        for (name, x, y) in
            [("loc", &g.loc, &w.loc), ("conf", &g.conf, &w.conf), ("landmarks", &g.landmarks, &w.landmarks)]
        {
            let e = norm(x, y);
            println!("image {b} {name:<10} normalised max error vs CPU engine {e:.2e}");
            assert!(e <= TOL, "image {b} {name}: {e}");
        }
    }
    let opts = retinaface::DetectOptions::default();
    let want_dets = cpu.detect_batch(&[case.input.clone(), second.clone()], &opts, None).unwrap();
    let got_dets = gpu.detect(&batch, &opts.post).unwrap();
    for b in 0..2 {
        let (s, g, swaps) = compare_detections(&got_dets[b], &want_dets[b], w.max(h) as f32, &format!("image {b}"));
        println!(
            "image {b}: {} detections; score max error {s:.2e}, geometry {g:.2e}; {swaps} near-tie reorderings",
            got_dets[b].len()
        );
    }
}

/// Every network through the simulated CUDA pipeline: the seven synthetic golden cases at the odd size
/// 301x203 (stems, depthwise, Relu6 and residual epilogues, max-pool, every FPN/SSH/head shape), raw
/// outputs against the reference within the CPU path's raw tolerance, 1e-4 absolute.
#[test]
fn every_network_in_simulation_matches_the_goldens() {
    let mut failures = Vec::new();
    for net in retinaface::Network::ALL {
        let case = load_case(&format!("synthetic-{}-seed1-301x203", net.name()));
        let cpu = Engine::new(&case.weights, Some(case.network)).unwrap();
        let mut gpu = GpuEngine::new(cpu.graph(), Backend::CudaSim).unwrap();
        let t0 = Instant::now();
        let raw = gpu.raw_outputs(&[&case.input]).unwrap().pop().unwrap();
        let mut line = format!("{net}: {:.1?}", t0.elapsed());
        for (k, v) in [("loc", &raw.loc), ("conf", &raw.conf), ("landmarks", &raw.landmarks)] {
            let (d, _) = max_abs_diff(v, &case.tensors[k].1);
            line += &format!(" {k} {d:.1e}");
            if d > 1e-4 {
                failures.push(format!("{net}: {k} max abs error {d:e}"));
            }
        }
        println!("{line}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
