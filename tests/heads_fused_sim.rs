//! The fused heads (kernels/heads.cu heads_fused / heads_fused_f16: 1×1 conv, softmax, score threshold
//! and decoding in one kernel writing candidates) in the CPU simulation:
//! 1. the kernel's candidates (keys and decoded rows) against the CPU composition heads → softmax →
//!    threshold → decode (src/post/decode.rs), on random inputs, odd sizes, batch > 1, f32 and f16
//!    inputs, thresholds that keep none, some and all anchors, and many equal scores;
//! 2. the fused post-processing (ops::post::launch_fused) against src/post's on the CPU composition's
//!    raw outputs and against the unfused device post-processing, both NMS paths, top-k cuts;
//! 3. end to end on the goldens' images: an engine's detections with the fused heads equal those of the
//!    unfused device path and src/post run on the device's raw outputs, for mobilenetv1_0.25 and
//!    resnet50, f32 and f16; graph replay equals eager execution; the launches per pass.
//!
//! Equality is exact (f32 bits) throughout: the CPU composition sums the 1×1 conv in the kernel's order
//! (fused multiply-adds over the channels, then the bias: Rust's mul_add and the simulation's fmaf are
//! both the correctly rounded FMA) and the softmax and decoding are the same f32 operations. How far the
//! kernel's conv is from the reference's own summation order is kernels_sim's heads_match_reference.
#![cfg(feature = "cuda-sim")]

mod common;
mod rng;
use common::hooked::Hooked;
use common::load_case;
use retinaface::cuda::ops::heads::{CandidateOut, FusedHeadArgs, launch_fused};
use retinaface::cuda::ops::post::{self, NmsPath, PostBufs};
use retinaface::cuda::sim::SimRunner;
use retinaface::cuda::{GpuEngine, KernelRunner, KernelRunnerExt};
use retinaface::post::{PostOptions, RawOutput, anchors, decode, postprocess};
use retinaface::{BgrImage, Detection, Engine, Precision};
use rng::Rng;
use std::sync::{Arc, Mutex};

/// One pyramid level's head: input [n][fh][fw][c] (values exact in f16, so one input serves both
/// kernels), weights [c][32] as ops::heads::pack lays them out, bias [32].
struct Level {
    fh: usize,
    fw: usize,
    x: Vec<f32>,
    wt: Vec<f32>,
    bias: Vec<f32>,
}

/// Random heads for an n×h×w input with c channels. `ties`: every pixel is one of 5 pixels, so many
/// anchors share their scores (and differ in their priors).
fn random_heads(rng: &mut Rng, n: usize, h: usize, w: usize, c: usize, ties: bool) -> Vec<Level> {
    anchors::STEPS
        .iter()
        .map(|&s| {
            let (fh, fw) = (h.div_ceil(s), w.div_ceil(s));
            let len = n * fh * fw * c;
            let x = if ties {
                let palette: Vec<Vec<f32>> = (0..5).map(|_| rng.vec16(c, 2.0)).collect();
                (0..len / c).flat_map(|_| palette[rng.below(5)].clone()).collect()
            } else {
                rng.vec16(len, 2.0)
            };
            let wt = rng.vec(c * 32, 1.0 / (c as f32).sqrt());
            let bias = rng.vec(32, 1.0);
            Level { fh, fw, x, wt, bias }
        })
        .collect()
}

/// The CPU composition of the heads: per pixel the 32 outputs (FMAs over the channels in order, then
/// the bias, as the kernel sums), the softmax of each anchor's logits, in the goldens' layout.
fn cpu_raw(levels: &[Level], n: usize, h: usize, w: usize, c: usize) -> Vec<RawOutput> {
    (0..n)
        .map(|b| {
            let mut raw = RawOutput { h, w, ..Default::default() };
            for lv in levels {
                for pix in 0..lv.fh * lv.fw {
                    let x = &lv.x[(b * lv.fh * lv.fw + pix) * c..][..c];
                    let v: Vec<f32> = (0..32)
                        .map(|k| x.iter().enumerate().fold(0.0f32, |acc, (ci, xv)| xv.mul_add(lv.wt[ci * 32 + k], acc)))
                        .zip(&lv.bias)
                        .map(|(acc, b)| acc + b)
                        .collect();
                    for j in 0..2 {
                        let (l0, l1) = (v[2 * j], v[2 * j + 1]);
                        let m = l0.max(l1);
                        let (e0, e1) = ((l0 - m).exp(), (l1 - m).exp());
                        let s = e0 + e1;
                        raw.conf.extend_from_slice(&[e0 / s, e1 / s]);
                        raw.loc.extend_from_slice(&v[4 + 4 * j..8 + 4 * j]);
                        raw.landmarks.extend_from_slice(&v[12 + 10 * j..22 + 10 * j]);
                    }
                }
            }
            raw
        })
        .collect()
}

/// The levels on the device: f32 NHWC, or f16 with the channels padded to 8 (the f16 plan's layout).
fn upload_levels(r: &mut SimRunner, levels: &[Level], n: usize, c: usize, f16: bool) -> [FusedHeadArgs; 3] {
    let cstride = if f16 { c.div_ceil(8) * 8 } else { c };
    let args: Vec<FusedHeadArgs> = levels
        .iter()
        .map(|lv| {
            let x = if f16 {
                let mut bits = vec![0u16; n * lv.fh * lv.fw * cstride];
                for (p, px) in lv.x.chunks(c).enumerate() {
                    for (ci, v) in px.iter().enumerate() {
                        bits[p * cstride + ci] = half::f16::from_f32(*v).to_bits();
                    }
                }
                let b = r.alloc(2 * bits.len()).unwrap();
                r.upload(b, 0, bytemuck::cast_slice(&bits)).unwrap();
                b
            } else {
                r.alloc_f32(&lv.x).unwrap()
            };
            FusedHeadArgs {
                x: x.ptr,
                wt: r.alloc_f32(&lv.wt).unwrap().ptr,
                bias: r.alloc_f32(&lv.bias).unwrap().ptr,
                n,
                h: lv.fh,
                w: lv.fw,
                c,
                cstride,
                f16,
            }
        })
        .collect();
    [args[0], args[1], args[2]]
}

/// The candidate key of a score over the threshold, as the post family sorts them.
fn key(score: f32, threshold: f32) -> u32 {
    if score > threshold { !score.to_bits() } else { u32::MAX }
}

#[test]
fn fused_candidates_equal_the_cpu_composition() {
    let mut rng = Rng(41);
    // (n, h, w, c, ties): odd sizes (the last level of 13×21 is 1×1), batch 1 to 3, c not a multiple of 8.
    let cases = [(2, 37, 45, 24, false), (3, 13, 21, 13, false), (1, 64, 64, 40, true), (2, 29, 71, 16, true)];
    for (n, h, w, c, ties) in cases {
        let levels = random_heads(&mut rng, n, h, w, c, ties);
        let raws = cpu_raw(&levels, n, h, w, c);
        let a = anchors::num_anchors(h, w);
        let priors = anchors::priors(h, w);
        let resizes: Vec<f32> = (0..n).map(|b| [1.0, 0.5, 1.25][b % 3]).collect();
        for f16 in [false, true] {
            for threshold in [1.0f32, 0.5, 0.0] {
                let mut r = SimRunner::new();
                let args = upload_levels(&mut r, &levels, n, c, f16);
                let (keys, rows) = (r.alloc(4 * n * a).unwrap(), r.alloc(4 * n * a * 15).unwrap());
                r.poison(keys).unwrap();
                r.poison(rows).unwrap();
                let out = CandidateOut { keys: keys.ptr, rows: rows.ptr, resize: r.alloc_f32(&resizes).unwrap().ptr };
                launch_fused(&mut r, &args, h, w, &out, threshold).unwrap();
                let mut got_keys = vec![0u32; n * a];
                r.download(keys, 0, bytemuck::cast_slice_mut(&mut got_keys)).unwrap();
                let got_rows = r.download_f32(rows, n * a * 15).unwrap();
                let mut cands = 0;
                for (b, raw) in raws.iter().enumerate() {
                    for i in 0..a {
                        let what = format!("{n}x{h}x{w} c {c} f16 {f16} threshold {threshold}: image {b} anchor {i}");
                        let s = raw.conf[2 * i + 1];
                        assert_eq!(got_keys[b * a + i], key(s, threshold), "{what}: key");
                        if s <= threshold {
                            continue;
                        }
                        cands += 1;
                        let (wf, hf) = (w as f32, h as f32);
                        let bx = decode::decode_box(&priors[4 * i..], &raw.loc[4 * i..], wf, hf, resizes[b]);
                        let lm =
                            decode::decode_landmarks(&priors[4 * i..], &raw.landmarks[10 * i..], wf, hf, resizes[b]);
                        let want: Vec<u32> = bx.iter().chain(&[s]).chain(&lm).map(|v| v.to_bits()).collect();
                        let got: Vec<u32> = got_rows[(b * a + i) * 15..][..15].iter().map(|v| v.to_bits()).collect();
                        assert_eq!(got, want, "{what}: decoded row");
                    }
                }
                println!("{n}x{h}x{w} c {c} ties {ties} f16 {f16} threshold {threshold}: {cands} of {} anchors", n * a);
                // Thresholds that keep none, some and all anchors.
                match threshold {
                    1.0 => assert_eq!(cands, 0),
                    0.0 => assert_eq!(cands, n * a),
                    _ => assert!(cands > 0 && cands < n * a, "{cands} of {}", n * a),
                }
            }
        }
    }
}

/// Runs the device post-processing of one batch: fused from the levels, or unfused from raw outputs.
fn device_post(
    r: &mut SimRunner,
    levels: Option<&[FusedHeadArgs; 3]>,
    raws: &[RawOutput],
    opts: &PostOptions,
    resizes: &[f32],
    path: NmsPath,
) -> Vec<Vec<Detection>> {
    let (n, h, w) = (raws.len(), raws[0].h, raws[0].w);
    let mut slot: Option<PostBufs> = None;
    let Some(pass) = post::prepare(r, &mut slot, n, h, w, opts, resizes, path).unwrap() else {
        return vec![Vec::new(); n];
    };
    let pb = slot.as_ref().unwrap();
    match levels {
        Some(l) => post::launch_fused(r, pb, l, &pass).unwrap(),
        None => {
            let cat =
                |f: &dyn Fn(&RawOutput) -> &Vec<f32>| raws.iter().flat_map(|x| f(x).clone()).collect::<Vec<f32>>();
            let raw = [
                r.alloc_f32(&cat(&|x| &x.loc)).unwrap(),
                r.alloc_f32(&cat(&|x| &x.conf)).unwrap(),
                r.alloc_f32(&cat(&|x| &x.landmarks)).unwrap(),
            ];
            post::launch(r, pb, raw, &pass).unwrap();
        }
    }
    post::collect(r, pb, &pass).unwrap()
}

fn assert_same(got: &[Vec<Detection>], want: &[Vec<Detection>], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: images");
    for (b, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{what}: image {b}: number of detections");
        for (i, (x, y)) in g.iter().zip(w).enumerate() {
            let bits = |d: &Detection| {
                d.bbox.iter().chain(&[d.score]).chain(&d.landmarks).map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            assert_eq!(bits(x), bits(y), "{what}: image {b} detection {i}");
        }
    }
}

#[test]
fn fused_post_processing_equals_the_cpu_and_the_unfused_device_path() {
    let mut rng = Rng(43);
    let default = PostOptions::default();
    let uncapped =
        |t: f32| PostOptions { conf_threshold: t, nms_threshold: 0.4, pre_nms_topk: None, post_nms_topk: None };
    let cut =
        PostOptions { conf_threshold: 0.3, nms_threshold: 0.3, pre_nms_topk: Some(1000), post_nms_topk: Some(40) };
    // (n, h, w, c, ties, f16, options, NMS path): thousands of candidates, ties, both NMS paths (the
    // tiled one past NMS_TILE candidates), top-k cuts, a threshold that keeps nothing.
    let cases = [
        (2, 203, 301, 24, false, false, default, NmsPath::Auto),
        (2, 203, 301, 16, true, false, uncapped(0.0), NmsPath::Tiled),
        (1, 203, 301, 16, true, true, cut, NmsPath::Bitmask),
        (3, 77, 61, 13, true, true, uncapped(0.2), NmsPath::Auto),
        (3, 13, 21, 13, false, false, uncapped(1.0), NmsPath::Auto),
    ];
    for (n, h, w, c, ties, f16, opts, path) in cases {
        let what = format!("{n}x{h}x{w} c {c} ties {ties} f16 {f16} {opts:?} {path:?}");
        let levels = random_heads(&mut rng, n, h, w, c, ties);
        let raws = cpu_raw(&levels, n, h, w, c);
        let resizes: Vec<f32> = (0..n).map(|b| [1.0, 0.75, 2.0][b % 3]).collect();
        let priors = anchors::priors(h, w);
        let want: Vec<Vec<Detection>> =
            raws.iter().zip(&resizes).map(|(raw, &f)| postprocess(raw, &priors, f, &opts)).collect();
        let mut r = SimRunner::new();
        let args = upload_levels(&mut r, &levels, n, c, f16);
        let fused = device_post(&mut r, Some(&args), &raws, &opts, &resizes, path);
        let unfused = device_post(&mut r, None, &raws, &opts, &resizes, path);
        let cands: Vec<usize> =
            raws.iter().map(|raw| raw.conf.chunks(2).filter(|p| p[1] > opts.conf_threshold).count()).collect();
        let dets: Vec<usize> = want.iter().map(|d| d.len()).collect();
        // Candidates whose score another candidate of the image has too.
        let tied: usize = raws
            .iter()
            .map(|raw| {
                let s: Vec<u32> =
                    raw.conf.chunks(2).map(|p| p[1]).filter(|&v| v > opts.conf_threshold).map(f32::to_bits).collect();
                s.len() - s.iter().collect::<std::collections::HashSet<_>>().len()
            })
            .sum();
        println!("{what}: candidates {cands:?} ({tied} tied), detections {dets:?}");
        assert!(!ties || opts.conf_threshold == 1.0 || tied > 100, "{what}: {tied} ties");
        assert_same(&fused, &want, &format!("{what}: fused vs CPU"));
        assert_same(&unfused, &want, &format!("{what}: unfused vs CPU"));
        if opts.conf_threshold < 1.0 {
            assert!(dets.iter().all(|&d| d > 0), "{what}: a case with detections");
        }
    }
}

/// A second image of the case's size (the input flipped), so batches hold two different images.
fn flipped(img: &BgrImage) -> BgrImage {
    let (w, h) = (img.width, img.height);
    let mut data = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in (0..w).rev() {
            data.extend_from_slice(&img.data[(y * w + x) * 3..][..3]);
        }
    }
    BgrImage::new(w, h, data).unwrap()
}

/// An engine over the simulation recording its launches.
fn engine(case: &common::Case, precision: Precision) -> (GpuEngine, Arc<Mutex<Vec<String>>>) {
    let cpu = Engine::new(&case.weights, Some(case.network)).unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let seen = log.clone();
    let runner = Box::new(Hooked::new(SimRunner::new()).on_launch(move |k| seen.lock().unwrap().push(k.to_string())));
    (GpuEngine::with_runner_precision(cpu.graph(), runner, precision).unwrap(), log)
}

/// The goldens' images through an engine: detections with the fused heads equal src/post's on the
/// device's raw outputs (f32 bits), and, for mobilenetv1_0.25 (a batch of two, two post settings), the
/// unfused device path's too. ResNet-50 runs one image with the default settings, the fused path only:
/// its passes take minutes in the simulation, and the unfused device post-processing equals src/post
/// bit for bit already (tests/post_sim.rs, and the mobilenetv1_0.25 case here).
#[test]
fn golden_images_detect_the_same_fused_and_unfused() {
    let opts = [
        PostOptions::default(),
        PostOptions { conf_threshold: 0.5, nms_threshold: 0.4, pre_nms_topk: None, post_nms_topk: None },
    ];
    for (name, full) in
        [("synthetic-mobilenetv1_0.25-seed1-301x203", true), ("synthetic-resnet50-seed1-301x203", false)]
    {
        let case = load_case(name);
        let other = flipped(&case.input);
        let (images, resizes, opts): (Vec<&BgrImage>, Vec<f32>, &[PostOptions]) = if full {
            (vec![&case.input, &other], vec![1.0, 0.5], &opts)
        } else {
            (vec![&case.input], vec![0.5], &opts[..1])
        };
        for precision in [Precision::F32, Precision::F16] {
            let what = format!("{name} {precision:?}");
            let t0 = std::time::Instant::now();
            let (mut g, log) = engine(&case, precision);
            let raws = g.raw_outputs(&images).unwrap();
            let priors = anchors::priors(raws[0].h, raws[0].w);
            for opt in opts {
                let want: Vec<Vec<Detection>> =
                    raws.iter().zip(&resizes).map(|(raw, &f)| postprocess(raw, &priors, f, opt)).collect();
                let counts: Vec<usize> = want.iter().map(|d| d.len()).collect();
                println!("{what} {opt:?}: detections {counts:?}");
                assert!(counts.iter().all(|&c| c > 0), "{what}: nothing detected");
                g.set_fused_heads(true);
                log.lock().unwrap().clear();
                let fused = g.detect_scaled(&images, opt, &resizes).unwrap();
                let launched = std::mem::take(&mut *log.lock().unwrap());
                assert!(launched.iter().any(|k| k.starts_with("heads_fused")), "{what}: {launched:?}");
                assert!(!launched.iter().any(|k| k.starts_with("heads_level")), "{what}: {launched:?}");
                assert_same(&fused, &want, &format!("{what}: fused vs src/post on the raw outputs"));
                if full {
                    g.set_fused_heads(false);
                    let unfused = g.detect_scaled(&images, opt, &resizes).unwrap();
                    let launched = std::mem::take(&mut *log.lock().unwrap());
                    assert!(!launched.iter().any(|k| k.starts_with("heads_fused")), "{what}: {launched:?}");
                    assert_same(&unfused, &want, &format!("{what}: unfused vs src/post on the raw outputs"));
                }
            }
            println!("{what}: {:.1} s in the simulation", t0.elapsed().as_secs_f64());
        }
    }
}

#[test]
fn fused_graph_replay_equals_eager_and_saves_launches() {
    let case = load_case("synthetic-mobilenetv1_0.25-seed1-301x203");
    let other = flipped(&case.input);
    let images = [&case.input, &other];
    let opt = PostOptions::default();
    let strict = PostOptions { conf_threshold: 0.6, ..opt };
    // Eager, launch by launch: the reference for the replays.
    let (mut eager, _) = engine(&case, Precision::F32);
    eager.set_cuda_graphs(false);
    let want_a = eager.detect_scaled(&images, &opt, &[1.0, 0.5]).unwrap();
    let want_b = eager.detect_scaled(&images, &opt, &[2.0, 1.0]).unwrap();
    let want_c = eager.detect_scaled(&images, &strict, &[1.0, 1.0]).unwrap();
    assert_ne!(want_a, want_b, "other resize factors must give other boxes");
    assert_ne!(want_a.iter().map(Vec::len).sum::<usize>(), want_c.iter().map(Vec::len).sum::<usize>());
    let (mut g, log) = engine(&case, Precision::F32);
    assert!(g.cuda_graphs() && g.fused_heads());
    // Captured on the first pass; replayed with new resize factors (read from the device); recaptured
    // for a new threshold (a kernel parameter of the fused heads).
    let got_a = g.detect_scaled(&images, &opt, &[1.0, 0.5]).unwrap();
    let captured = std::mem::take(&mut *log.lock().unwrap());
    let got_b = g.detect_scaled(&images, &opt, &[2.0, 1.0]).unwrap();
    assert!(log.lock().unwrap().is_empty(), "a replay launched {:?}", log.lock().unwrap());
    let got_c = g.detect_scaled(&images, &strict, &[1.0, 1.0]).unwrap();
    assert_same(&got_a, &want_a, "first pass (captured)");
    assert_same(&got_b, &want_b, "replay with new resize factors");
    assert_same(&got_c, &want_c, "recaptured for a new threshold");
    // The launches of one detect pass, fused and unfused (2610 anchors, all candidates: the tiled NMS).
    g.set_fused_heads(false);
    g.set_cuda_graphs(false);
    log.lock().unwrap().clear();
    g.detect_scaled(&images, &opt, &[1.0, 0.5]).unwrap();
    let unfused = std::mem::take(&mut *log.lock().unwrap());
    let post_of = |l: &[String]| l.iter().position(|k| k.starts_with("radix") || k.starts_with("heads_fused")).unwrap();
    let (pu, pf) = (post_of(&unfused), post_of(&captured));
    println!(
        "mobilenetv1_0.25 detect pass: unfused {} launches ({} forward incl. heads + {} post), fused {} ({} forward + {} post incl. heads)",
        unfused.len(),
        pu,
        unfused.len() - pu,
        captured.len(),
        pf,
        captured.len() - pf
    );
    // The three head launches leave the forward pass for one in post-processing, and the compaction
    // pass (3 launches) is gone.
    assert_eq!(pu - pf, 3, "forward: {unfused:?} vs {captured:?}");
    assert_eq!(captured.iter().filter(|k| k.starts_with("heads_fused")).count(), 1);
    assert_eq!(unfused.len() - captured.len(), 5, "{unfused:?} vs {captured:?}");
    assert_eq!(captured.iter().filter(|k| k.starts_with("radix")).count(), 12);
    assert!(!captured.iter().any(|k| k == "decode_sorted"));
}

#[test]
fn fused_heads_refuse_maps_that_do_not_match_the_priors() {
    let mut rng = Rng(5);
    let (n, h, w, c) = (1, 37, 45, 8);
    let levels = random_heads(&mut rng, n, h, w, c, false);
    let mut r = SimRunner::new();
    let mut args = upload_levels(&mut r, &levels, n, c, false);
    let a = anchors::num_anchors(h, w);
    let out = CandidateOut {
        keys: r.alloc(4 * a).unwrap().ptr,
        rows: r.alloc(60 * a).unwrap().ptr,
        resize: r.alloc_f32(&[1.0]).unwrap().ptr,
    };
    args[1].w += 1;
    let e = launch_fused(&mut r, &args, h, w, &out, 0.5).unwrap_err().to_string();
    assert!(e.contains("level 1") && e.contains("4x3"), "{e}");
    args[1].w -= 1;
    args[2].cstride = c - 1;
    let e = launch_fused(&mut r, &args, h, w, &out, 0.5).unwrap_err().to_string();
    assert!(e.contains("level 2") && e.contains("channels"), "{e}");
}
