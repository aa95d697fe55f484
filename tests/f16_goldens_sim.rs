//! The f16 CUDA executor (`--precision f16`: NHWC f16 activations with channels padded to 8, f16
//! weights, tensor-core convs with f32 accumulation) run in the CPU simulation.
//!
//! 1. Real weights (mobilenetv1_0.25, ../shared/weights) on the reference goldens: every reference
//!    face with score ≥ 0.5 is found at IoU ≥ 0.9 with its score within 0.05, and the median landmark
//!    error of the matched faces is ≤ 0.5 px (the bounds).
//!    MEASURED: trio (540x360, yakhyo weights, device post-processing): worst matched IoU 0.9990,
//!    worst score error 4.0e-5, landmark median 0.004 px; raw outputs' max abs error against the
//!    PyTorch goldens loc 1.4e-1, conf 3.2e-3, landmarks 1.7e-1 (over all anchors, background ones
//!    included; the faces' own outputs are far closer). crowd (1024x624, biubug6 weights, 48 faces,
//!    host post-processing): worst IoU 0.9957, score error 4.5e-3, landmark median 0.060 px; raw max
//!    abs error loc 5.7e-2 (of max 7.1), conf 5.3e-3, landmarks 8.4e-2 (of max 15.9). kids (1024x768,
//!    yakhyo; not run, it doubles the time): IoU 0.9992, score 1.4e-6, landmark median 0.015 px.
//! 2. Every synthetic network at a small size: f16 raw outputs against the f32 CPU engine's. The
//!    f16 storage of every activation rounds it to 11 significant bits (relative 2^-12 ≈ 2.4e-4 per
//!    rounding, growing through the depth of the network), so the bound is relative to the output's
//!    scale: max |f16 − f32| ≤ RAW_REL · max(1, max |f32|).
//!    MEASURED (batch 2 at 67x45, printed per network): worst normalised raw error 1.4e-3 (resnet50),
//!    worst tap 1.8e-3 (resnet18 / resnet34); mobilenetv1_0.25 4.1e-4 raw, 6.6e-4 taps. RAW_REL =
//!    5e-3 leaves 2.8× margin over the worst. The taps (backbone/FPN/SSH, converted to f32 NCHW,
//!    padded channels dropped) are checked with the same relative bound per tensor.
//! 3. Forty sizes through the f16 executor keep its held memory within the plan cache's bound.
//! 4. The GPU's tuning path (check each variant against the heuristic's output, time, cache) runs in
//!    the simulation under a stand-in device key, for every groups-1 conv and fused op (each fused
//!    op timed as its fused kernel, under its own key); a second engine reuses the cache without
//!    timing.
//! 5. A plan whose every conv and fused op runs another tile than the heuristic's (from the cache)
//!    gives the untuned plan's raw outputs and detections bit for bit on a golden image.
#![cfg(feature = "cuda-sim")]

mod common;

use common::{load_case, match_f16_faces, max_abs_diff};
use retinaface::cuda::GpuEngine;
use retinaface::graph::Op;
use retinaface::post::{anchors, postprocess};
use retinaface::{Backend, BgrImage, Engine, Network, PostOptions, Precision, WeightsSpec};
use std::time::Instant;

/// Normalised bound of f16 raw outputs and taps vs f32 (see the header for the measurement).
const RAW_REL: f32 = 5e-3;

#[test]
fn real_weights_find_every_golden_face_in_f16() {
    // Trio through the whole executor (device post-processing); crowd (the other checkpoint, 48
    // faces) through the network once, post-processed on the host, to keep the simulation near a
    // minute. kids (1024x768, yakhyo, 8 faces) passed too but doubles the time (header).
    for (name, on_device) in [("real-mv1_0.25-yakhyo-trio", true), ("real-mv1_0.25-biubug6-crowd", false)] {
        let case = load_case(name);
        let cpu = Engine::new(&case.weights, Some(case.network)).unwrap();
        let mut gpu = GpuEngine::with_precision(cpu.graph(), Backend::CudaSim, Precision::F16).unwrap();
        let t0 = Instant::now();
        let raw = gpu.raw_outputs(&[&case.input]).unwrap().pop().unwrap();
        let mut line =
            format!("{name} ({}x{}): f16 forward {:.1?};", case.input.width, case.input.height, t0.elapsed());
        for (k, v) in [("loc", &raw.loc), ("conf", &raw.conf), ("landmarks", &raw.landmarks)] {
            let (d, mag) = max_abs_diff(v, &case.tensors[k].1);
            line += &format!(" {k} max abs error {d:.1e} (of max {mag:.1})");
        }
        let dets = if on_device {
            gpu.detect(&[&case.input], &PostOptions::default()).unwrap().pop().unwrap()
        } else {
            let priors = anchors::priors(case.input.height, case.input.width);
            postprocess(&raw, &priors, 1.0, &PostOptions::default())
        };
        let (i, s, m) = match_f16_faces(name, &dets, &case.detections);
        println!("{line}; faces: worst IoU {i:.4}, worst score error {s:.1e}, landmark median {m:.3} px");
    }
}

fn image(w: usize, h: usize, seed: usize) -> BgrImage {
    let data = (0..w * h * 3).map(|k| ((k * 37 + k / 3 * 11 + seed * 101) % 251) as u8).collect();
    BgrImage::new(w, h, data).unwrap()
}

fn norm(a: &[f32], b: &[f32]) -> f32 {
    assert!(a.iter().all(|v| v.is_finite()), "non-finite value in the f16 output");
    let (d, mag) = max_abs_diff(a, b);
    d / mag.max(1.0)
}

/// Every network, batch 2 at 67x45 (odd sizes: edge tiles, padding, ceil strides): f16 raw outputs
/// and taps against the f32 CPU engine within RAW_REL of their scale.
#[test]
fn every_network_f16_matches_f32_within_the_measured_bound() {
    let (w, h) = (67, 45);
    let imgs = [image(w, h, 1), image(w, h, 2)];
    let batch: Vec<&BgrImage> = imgs.iter().collect();
    let mut failures = Vec::new();
    for net in Network::ALL {
        let cpu = Engine::new(&WeightsSpec::Synthetic { seed: 1 }, Some(net)).unwrap();
        let acts = cpu.run_graph(&batch, false, None).unwrap();
        let mut gpu = GpuEngine::with_precision(cpu.graph(), Backend::CudaSim, Precision::F16).unwrap();
        let t0 = Instant::now();
        let raw = gpu.raw_outputs(&batch).unwrap();
        let mut line = format!("{net}: {:.1?}", t0.elapsed());
        let mut worst = 0.0f32;
        for (b, (g, c)) in raw.iter().zip(&acts.raw).enumerate() {
            for (k, x, y) in
                [("loc", &g.loc, &c.loc), ("conf", &g.conf, &c.conf), ("landmarks", &g.landmarks, &c.landmarks)]
            {
                let e = norm(x, y);
                worst = worst.max(e);
                if e > RAW_REL {
                    failures.push(format!("{net} image {b} {k}: normalised error {e:.2e}"));
                }
            }
        }
        line += &format!(" raw {worst:.1e}");
        let taps = cpu.graph().taps;
        let mut worst_tap = 0.0f32;
        for (stage, ids) in [("backbone", taps.backbone), ("fpn", taps.fpn), ("ssh", taps.ssh)] {
            for (l, &t) in ids.iter().enumerate() {
                let e = norm(&gpu.tensor_nchw(t).unwrap(), acts.get(t).unwrap());
                worst_tap = worst_tap.max(e);
                if e > RAW_REL {
                    failures.push(format!("{net} {stage}.{l}: normalised error {e:.2e}"));
                }
            }
        }
        println!("{line}, taps {worst_tap:.1e}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The f16 executor's plans pad every tensor's channels to 8 and store halves: its arena is smaller
/// than the f32 one; forty sizes keep the held memory within the cache's bound.
#[test]
fn f16_executor_memory_is_bounded_over_40_sizes() {
    let cpu = Engine::new(&WeightsSpec::Synthetic { seed: 1 }, Some(Network::MobileNetV1_025)).unwrap();
    let mut gpu = GpuEngine::with_precision(cpu.graph(), Backend::CudaSim, Precision::F16).unwrap();
    let mut f32e = GpuEngine::new(cpu.graph(), Backend::CudaSim).unwrap();
    let size = |i: usize| (24 + 3 * i, 16 + 2 * i);
    let (bw, bh) = size(39);
    let largest = gpu.plan_for(1, bh, bw).unwrap();
    assert!(largest.arena_bytes() < f32e.plan_for(1, bh, bw).unwrap().arena_bytes());
    let budget = 3 * largest.arena_bytes();
    gpu.set_plan_cache_bytes(budget).unwrap();
    let (mut unbounded, mut peak) = (0usize, 0usize);
    for i in 0..40 {
        let (w, h) = size(i);
        let raw = gpu.raw_outputs(&[&image(w, h, i)]).unwrap();
        assert_eq!((raw[0].w, raw[0].h), (w, h));
        let arena = gpu.plan_for(1, h, w).unwrap().arena_bytes();
        unbounded += arena;
        let held = gpu.held_bytes();
        assert!(held <= budget + 2 * arena, "size {w}x{h}: holds {held} B, budget {budget} B");
        peak = peak.max(held);
    }
    println!("f16: peak held {peak} B over 40 sizes; budget {budget} B; unbounded {unbounded} B");
    assert!(unbounded > 3 * budget, "sizes too alike to exercise eviction");
}

/// The GPU's tuning path, run in the simulation under a stand-in device key: every groups-1 conv
/// and fused op shape's supported variants are checked against the heuristic's output and timed (a
/// fused op as its fused kernel), the choices are saved to the cache file under one key per shape,
/// the outputs agree with the heuristic engine's (within RAW_REL: the simulation's timings are
/// wall-clock, so a split-K variant may win somewhere), and an engine reading that cache in `cached`
/// mode times nothing (the file is not rewritten).
#[test]
fn tuning_times_every_shape_and_the_cache_is_reused() {
    use retinaface::cuda::tune::{DeviceKey, TuneCache, TuneMode};
    let cpu = Engine::new(&WeightsSpec::Synthetic { seed: 1 }, Some(Network::MobileNetV1_025)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tune.json");
    let dev = DeviceKey { name: "simulated".into(), compute_capability: (9, 0), driver: 0, sms: 132 };
    let img = image(33, 21, 3);
    let mut tuned = GpuEngine::with_precision(cpu.graph(), Backend::CudaSim, Precision::F16).unwrap();
    tuned.set_tuning(TuneMode::Full, Some(dev.clone()), TuneCache::load(&path).unwrap());
    let got = tuned.raw_outputs(&[&img]).unwrap().pop().unwrap();
    let saved = TuneCache::load(&path).unwrap();
    assert!(saved.entries.len() >= 5, "{} shapes tuned", saved.entries.len());
    assert!(saved.entries.values().all(|c| c.source == "timed" && c.micros.is_some()));
    // Every op with a variant, the fused ones included, was timed under its own key, and the key is
    // in the saved cache with the variant the plan runs.
    let choices = tuned.f16_choices(1, img.height, img.width).unwrap();
    let (mut fused, mut seen) = (0, std::collections::BTreeSet::new());
    for (op, c) in tuned.graph().ops.iter().zip(&choices) {
        let is_fused = matches!(op, Op::DwPw { .. } | Op::ConvPair { .. } | Op::ConvUpsampleAdd { .. });
        let is_gemm = matches!(op, Op::Conv(c) if c.groups == 1);
        assert_eq!(c.is_some(), is_fused || is_gemm, "{op:?}: variant {c:?}");
        let Some((v, key)) = c else { continue };
        let (key, choice) = key.as_ref().unwrap_or_else(|| panic!("{op:?}: no tuning key"));
        // A shape is timed on its first op; its later ops (the same key) take that choice.
        let first = seen.insert(key.clone());
        let source = if first { "timed" } else { "cache" };
        assert_eq!((choice.source.as_str(), choice.variant.as_str()), (source, v.name), "{key}");
        assert_eq!(saved.entries.get(key).map(|c| c.variant.as_str()), Some(v.name), "{key} not saved");
        fused += is_fused as usize;
    }
    let kinds = ["|dwpw ", "|pair ", "|upsample-add "].map(|k| saved.entries.keys().filter(|e| e.contains(k)).count());
    assert!(fused >= 10 && kinds.iter().all(|&k| k > 0), "{fused} fused ops; keys per kind {kinds:?}");
    let mut plain = GpuEngine::with_precision(cpu.graph(), Backend::CudaSim, Precision::F16).unwrap();
    let want = plain.raw_outputs(&[&img]).unwrap().pop().unwrap();
    for (k, x, y) in
        [("loc", &got.loc, &want.loc), ("conf", &got.conf, &want.conf), ("landmarks", &got.landmarks, &want.landmarks)]
    {
        let e = norm(x, y);
        assert!(e <= RAW_REL, "{k}: tuned vs heuristic variants differ by {e}");
    }
    let bytes = std::fs::read(&path).unwrap();
    let mut cached = GpuEngine::with_precision(cpu.graph(), Backend::CudaSim, Precision::F16).unwrap();
    cached.set_tuning(TuneMode::Cached, Some(dev), TuneCache::load(&path).unwrap());
    cached.raw_outputs(&[&img]).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "cached mode re-timed and rewrote the cache");
    println!(
        "{} shapes tuned in the simulation ({fused} fused ops; dw+pw, pair, upsample-add keys: {kinds:?})",
        saved.entries.len()
    );
}

/// A tuned plan on a golden image: every op's key (computed with tuning off, nothing timed) gets a
/// cached choice of another tile than the heuristic's that sums in the same order (any other
/// non-split tile; a split-K choice keeps its own), so every fused op and conv runs a different
/// kernel than the untuned plan; the raw outputs and the detections must equal the untuned
/// plan's bit for bit. (A split-K choice, which the tuner may make on a GPU, sums in another order:
/// its bound is fusion_sim's `variants_vs_heuristic`.)
#[test]
fn a_tuned_plan_detects_as_the_untuned_one_on_a_golden_image() {
    use retinaface::cuda::conv_f16::VARIANTS;
    use retinaface::cuda::tune::{Choice, DeviceKey, TuneCache, TuneMode};
    let case = load_case("real-mv1_0.25-yakhyo-trio");
    let cpu = Engine::new(&case.weights, Some(case.network)).unwrap();
    let (w, h) = (case.input.width, case.input.height);
    let dev = DeviceKey { name: "simulated".into(), compute_capability: (9, 0), driver: 0, sms: 132 };
    let mut keyed = GpuEngine::with_precision(cpu.graph(), Backend::CudaSim, Precision::F16).unwrap();
    keyed.set_tuning(TuneMode::Off, Some(dev.clone()), TuneCache::default());
    let plain_tiles: Vec<_> = VARIANTS.iter().filter(|v| v.split_k == 1).collect();
    let mut cache = TuneCache::default();
    let mut want_variants = Vec::new();
    for (i, c) in keyed.f16_choices(1, h, w).unwrap().into_iter().enumerate() {
        let Some((v, key)) = c else {
            want_variants.push(None);
            continue;
        };
        let (key, choice) = key.unwrap();
        assert_eq!(choice.source, "heuristic");
        let other = if v.split_k == 1 {
            let at = plain_tiles.iter().position(|t| *t == v).unwrap();
            plain_tiles[(at + 1 + i % (plain_tiles.len() - 1)) % plain_tiles.len()]
        } else {
            v
        };
        // Ops of one shape share a key, so the first one's tile stands for all.
        let e = cache.entries.entry(key);
        let c = e.or_insert(Choice { variant: other.name.into(), micros: Some(1.0), source: "timed".into() });
        want_variants.push(Some(VARIANTS.iter().find(|v| v.name == c.variant).unwrap().name));
    }
    let mut tuned = GpuEngine::with_precision(cpu.graph(), Backend::CudaSim, Precision::F16).unwrap();
    tuned.set_tuning(TuneMode::Cached, Some(dev), cache);
    let got: Vec<_> = tuned.f16_choices(1, h, w).unwrap().into_iter().map(|c| c.map(|(v, _)| v.name)).collect();
    assert_eq!(got, want_variants, "the executor does not run the cached choices");
    // Ops on another tile than the heuristic's: every kind of fused op among them.
    let heuristic = keyed.f16_choices(1, h, w).unwrap();
    let moved: Vec<&Op> = (tuned.graph().ops.iter().zip(&got).zip(&heuristic))
        .filter(|((_, g), hc)| *g != &hc.as_ref().map(|(v, _)| v.name))
        .map(|((op, _), _)| op)
        .collect();
    let kinds = [
        moved.iter().filter(|o| matches!(o, Op::DwPw { .. })).count(),
        moved.iter().filter(|o| matches!(o, Op::ConvPair { .. })).count(),
        moved.iter().filter(|o| matches!(o, Op::ConvUpsampleAdd { .. })).count(),
    ];
    assert!(kinds.iter().all(|&k| k > 0), "fused ops on another tile (dw+pw, pair, upsample-add): {kinds:?}");
    let moved = moved.len();
    let mut plain = GpuEngine::with_precision(cpu.graph(), Backend::CudaSim, Precision::F16).unwrap();
    let opts = PostOptions::default();
    let (raw_t, raw_p) = (tuned.raw_outputs(&[&case.input]).unwrap(), plain.raw_outputs(&[&case.input]).unwrap());
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for (k, a, b) in [
        ("loc", &raw_t[0].loc, &raw_p[0].loc),
        ("conf", &raw_t[0].conf, &raw_p[0].conf),
        ("landmarks", &raw_t[0].landmarks, &raw_p[0].landmarks),
    ] {
        assert!(bits(a) == bits(b), "{k}: the tuned plan's raw outputs differ from the untuned plan's");
    }
    let (dt, dp) = (tuned.detect(&[&case.input], &opts).unwrap(), plain.detect(&[&case.input], &opts).unwrap());
    assert!(!dp[0].is_empty());
    assert_eq!(dt, dp, "the tuned plan's detections differ");
    println!(
        "trio: {moved} ops on another tile than the heuristic's (fused: dw+pw, pair, upsample-add {kinds:?}), {} detections equal",
        dp[0].len()
    );
}
