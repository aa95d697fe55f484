//! Every CUDA kernel, run in the CPU simulation (kernels/sim/cuda_sim.h), against the CPU reference ops
//! of src/reference/ on random inputs. Outputs are poisoned with NaN before each launch; every element
//! a kernel owns must be written and every element it does not own must be left alone.
//!
//! Tolerances (normalised max error = max |gpu − cpu| / max(1, max |cpu|)):
//! - convolutions and heads: 1e-5 — f32 sums of up to ~600 products in a different order than the
//!   CPU's sgemm; the observed error is ~1e-7..1e-6.
//! - preprocess, max-pool, upsample-add, post-processing: exact (the same f32 operations).
#![cfg(feature = "cuda-sim")]

mod common;
mod rng;
use common::norm_err;
use retinaface::cuda::ops::{conv as conv_launcher, heads as heads_launcher};
use retinaface::cuda::params::*;
use retinaface::cuda::sim::SimRunner;
use retinaface::cuda::{
    DevBuf, KernelRunner, KernelRunnerExt, LaunchDims, device_postprocess, nchw_to_nhwc, nhwc_to_nchw,
};
use retinaface::model::graph::{Act, Conv};
use retinaface::post::{PostOptions, RawOutput, anchors, postprocess};
use retinaface::reference;
use rng::Rng;

#[allow(clippy::too_many_arguments)]
fn conv(
    name: &str,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    groups: usize,
    act: Act,
    off: usize,
    rng: &mut Rng,
) -> Conv {
    let fan = (cin / groups * k * k) as f32;
    Conv {
        out_channel_offset: off,
        weight: rng.vec(cout * cin / groups * k * k, 1.0 / fan.sqrt()),
        bias: rng.vec(cout, 0.5),
        ..Conv::with_values(name, [cin, cout, k, stride, groups], act, &mut || 0.0)
    }
}

/// Runs one conv in the simulation and the reference; returns the normalised error.
fn check_conv(c: &Conv, n: usize, h: usize, w: usize, out_ctot: usize, with_residual: bool, rng: &mut Rng) -> f32 {
    let mut r = SimRunner::new();
    let (oh, ow) =
        (reference::out_size(h, c.kernel, c.stride, c.pad), reference::out_size(w, c.kernel, c.stride, c.pad));
    let x = rng.vec(n * c.cin * h * w, 1.0);
    let res = with_residual.then(|| rng.vec(n * c.cout * oh * ow, 1.0));
    let mut want = vec![f32::NAN; n * out_ctot * oh * ow];
    reference::conv2d(c, &x, n, h, w, &mut want, out_ctot, res.as_deref());

    let xb = r.alloc_f32(&nchw_to_nhwc(&x, n, c.cin, h, w)).unwrap();
    let wb = r.alloc_f32(&conv_launcher::pack(c).unwrap()).unwrap();
    let bb = r.alloc_f32(&c.bias).unwrap();
    let rb = res.as_ref().map(|v| r.alloc_f32(&nchw_to_nhwc(v, n, c.cout, oh, ow)).unwrap());
    let yb = r.alloc(4 * n * oh * ow * out_ctot).unwrap();
    r.poison(yb).unwrap();
    // The executor's launcher: its kernel choice, grid and packing are what is tested.
    let a = conv_launcher::ConvArgs {
        x: xb.ptr,
        wt: wb.ptr,
        bias: bb.ptr,
        residual: rb.map_or(0, |b: DevBuf| b.ptr),
        y: yb.ptr,
        n,
        h,
        w,
        oh,
        ow,
        out_ctot,
    };
    conv_launcher::launch(&mut r, c, &a).unwrap();
    let got = nhwc_to_nchw(&r.download_f32(yb, n * oh * ow * out_ctot).unwrap(), n, oh, ow, out_ctot);
    // Channels outside [off, off + cout) belong to other convs: still poisoned.
    let range = c.out_channel_offset..c.out_channel_offset + c.cout;
    let (mut g, mut wv) = (Vec::new(), Vec::new());
    for b in 0..n {
        for ch in 0..out_ctot {
            let plane = (b * out_ctot + ch) * oh * ow..(b * out_ctot + ch + 1) * oh * ow;
            if range.contains(&ch) {
                g.extend_from_slice(&got[plane.clone()]);
                wv.extend_from_slice(&want[plane]);
            } else {
                assert!(
                    got[plane].iter().all(|v| v.is_nan()),
                    "{}: wrote channel {ch} outside its offset range",
                    c.name
                );
            }
        }
    }
    norm_err(&g, &wv)
}

const CONV_TOL: f32 = 1e-5;

#[test]
fn conv_kernels_match_reference() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    // (conv, n, h, w, out_ctot, residual)
    let cases: Vec<(Conv, usize, usize, usize, usize, bool)> = vec![
        (conv("stem3x3s2", 3, 8, 3, 2, 1, Act::Leaky(0.1), 0, &mut rng), 2, 17, 13, 8, false),
        (conv("3x3s1-offset", 20, 10, 3, 1, 1, Act::Leaky(0.0), 5, &mut rng), 2, 9, 11, 24, false),
        (conv("3x3s2-70", 24, 70, 3, 2, 1, Act::Relu6, 0, &mut rng), 1, 15, 10, 70, false),
        (conv("3x3-residual", 16, 16, 3, 1, 1, Act::Leaky(0.0), 0, &mut rng), 2, 7, 9, 16, true),
        (conv("1x1", 37, 70, 1, 1, 1, Act::Relu6, 0, &mut rng), 2, 9, 7, 70, false),
        (conv("1x1-residual-none", 24, 24, 1, 1, 1, Act::None, 0, &mut rng), 2, 6, 5, 24, true),
        (conv("1x1s2", 16, 24, 1, 2, 1, Act::None, 0, &mut rng), 2, 11, 9, 24, false),
        (conv("1x1-offset", 64, 32, 1, 1, 1, Act::Leaky(0.1), 32, &mut rng), 1, 5, 8, 96, false),
        (conv("7x7s2-stem", 3, 16, 7, 2, 1, Act::Leaky(0.0), 0, &mut rng), 1, 23, 19, 16, false),
        (conv("dw3x3s1", 24, 24, 3, 1, 24, Act::Relu6, 0, &mut rng), 2, 9, 7, 24, true),
        (conv("dw3x3s2", 5, 5, 3, 2, 5, Act::Leaky(0.1), 0, &mut rng), 2, 13, 10, 5, false),
        (conv("dw3x3-offset", 8, 8, 3, 1, 8, Act::None, 4, &mut rng), 1, 6, 6, 16, false),
    ];
    for (c, n, h, w, ctot, res) in &cases {
        let c = Conv { residual: res.then_some(2), ..c.clone() };
        let e = check_conv(&c, *n, *h, *w, *ctot, *res, &mut rng);
        println!(
            "{:<20} n={n} {h}x{w} k={} s={} act={:?}: normalised max error {e:.2e}",
            c.name, c.kernel, c.stride, c.act
        );
        assert!(e <= CONV_TOL, "{}: error {e} > {CONV_TOL}", c.name);
    }
}

#[test]
fn preprocess_matches_reference() {
    let (n, h, w) = (2, 7, 5);
    let mut rng = Rng(7);
    let bytes: Vec<u8> = (0..n * h * w * 3).map(|_| (rng.next() >> 56) as u8).collect();
    let mut r = SimRunner::new();
    let src = r.alloc(bytes.len()).unwrap();
    r.upload(src, 0, &bytes).unwrap();
    let dst = r.alloc(4 * bytes.len()).unwrap();
    r.launch(
        "preprocess_bgr",
        LaunchDims::linear(bytes.len(), 256),
        &PreprocessParams { src: src.ptr, dst: dst.ptr, total: bytes.len() as i32, pad0: 0 },
    )
    .unwrap();
    let got = r.download_f32(dst, bytes.len()).unwrap();
    for b in 0..n {
        let mut want = vec![0.0; 3 * h * w];
        reference::preprocess(&bytes[b * h * w * 3..(b + 1) * h * w * 3], h, w, &mut want);
        let g = nhwc_to_nchw(&got[b * h * w * 3..(b + 1) * h * w * 3], 1, h, w, 3);
        assert_eq!(g, want);
    }
}

#[test]
fn maxpool_matches_reference_exactly() {
    let mut rng = Rng(11);
    for &(n, c, h, w) in &[(2, 8, 9, 7), (1, 3, 10, 12), (2, 5, 1, 1), (1, 16, 2, 3)] {
        let (oh, ow) = (reference::out_size(h, 3, 2, 1), reference::out_size(w, 3, 2, 1));
        let x = rng.vec(n * c * h * w, 3.0);
        let mut want = vec![0.0; n * c * oh * ow];
        reference::max_pool_3x3s2(&x, n * c, h, w, &mut want);
        let mut r = SimRunner::new();
        let xb = r.alloc_f32(&nchw_to_nhwc(&x, n, c, h, w)).unwrap();
        let yb = r.alloc(4 * want.len()).unwrap();
        retinaface::cuda::ops::pool::launch(&mut r, xb.ptr, yb.ptr, n, h, w, c, oh, ow).unwrap();
        let got = nhwc_to_nchw(&r.download_f32(yb, want.len()).unwrap(), n, oh, ow, c);
        assert_eq!(norm_err(&got, &want), 0.0, "maxpool {n}x{c}x{h}x{w}");
    }
}

#[test]
fn upsample_add_matches_reference_exactly() {
    let mut rng = Rng(13);
    for &(n, c, sh, sw, dh, dw) in
        &[(2, 4, 5, 7, 9, 13), (1, 3, 3, 4, 6, 8), (2, 2, 1, 1, 2, 3), (1, 5, 7, 10, 13, 19), (1, 1, 13, 19, 26, 38)]
    {
        let src = rng.vec(n * c * sh * sw, 2.0);
        let dst = rng.vec(n * c * dh * dw, 2.0);
        let mut want = dst.clone();
        reference::upsample_nearest_add(&src, sh, sw, &mut want, dh, dw);
        let mut r = SimRunner::new();
        let sb = r.alloc_f32(&nchw_to_nhwc(&src, n, c, sh, sw)).unwrap();
        let db = r.alloc_f32(&nchw_to_nhwc(&dst, n, c, dh, dw)).unwrap();
        retinaface::cuda::ops::upsample::launch(&mut r, sb.ptr, db.ptr, n, (sh, sw), (dh, dw), c).unwrap();
        let got = nhwc_to_nchw(&r.download_f32(db, want.len()).unwrap(), n, dh, dw, c);
        assert_eq!(norm_err(&got, &want), 0.0, "upsample {sh}x{sw} -> {dh}x{dw}");
    }
}

#[test]
fn heads_match_reference() {
    let mut rng = Rng(17);
    // Two levels of an odd-sized 45×37 input, batch 2, c = 24: the second level writes after the first.
    let (n, ih, iw, c) = (2, 37, 45, 24);
    let a = anchors::num_anchors(ih, iw);
    let mut r = SimRunner::new();
    let loc = r.alloc(4 * n * a * 4).unwrap();
    let conf = r.alloc(4 * n * a * 2).unwrap();
    let landm = r.alloc(4 * n * a * 10).unwrap();
    let mut want_loc = vec![f32::NAN; n * a * 4];
    let mut want_conf = vec![f32::NAN; n * a * 2];
    let mut want_landm = vec![f32::NAN; n * a * 10];
    let mut base = 0;
    for (l, &step) in anchors::STEPS.iter().enumerate() {
        let (h, w) = (ih.div_ceil(step), iw.div_ceil(step));
        let mut head = conv("head", c, 32, 1, 1, 1, Act::None, 0, &mut rng);
        // Logits large enough that the softmax is not near 0.5 everywhere.
        head.bias.iter_mut().take(4).for_each(|b| *b *= 8.0);
        let x = rng.vec(n * c * h * w, 2.0);
        let mut h32 = vec![0.0; n * 32 * h * w];
        reference::conv2d(&head, &x, n, h, w, &mut h32, 32, None);
        for b in 0..n {
            let hw = h * w;
            let s = (b * a + base)..;
            let _ = s;
            reference::heads_to_anchors(
                &h32[b * 32 * hw..(b + 1) * 32 * hw],
                h,
                w,
                &mut want_loc[(b * a + base) * 4..(b * a + base + 2 * hw) * 4],
                &mut want_conf[(b * a + base) * 2..(b * a + base + 2 * hw) * 2],
                &mut want_landm[(b * a + base) * 10..(b * a + base + 2 * hw) * 10],
            );
        }
        let xb = r.alloc_f32(&nchw_to_nhwc(&x, n, c, h, w)).unwrap();
        let wb = r.alloc_f32(&heads_launcher::pack(&head).unwrap()).unwrap();
        let bb = r.alloc_f32(&head.bias).unwrap();
        let p = heads_launcher::HeadArgs {
            x: xb.ptr,
            wt: wb.ptr,
            bias: bb.ptr,
            loc: loc.ptr,
            conf: conf.ptr,
            landm: landm.ptr,
            n,
            h,
            w,
            c,
            anchor_base: base,
            num_anchors: a,
        };
        heads_launcher::launch(&mut r, &p).unwrap();
        base += 2 * h * w;
        println!("level {l}: {h}x{w}");
    }
    for (name, buf, want) in [("loc", loc, &want_loc), ("conf", conf, &want_conf), ("landmarks", landm, &want_landm)] {
        let got = r.download_f32(buf, want.len()).unwrap();
        let e = norm_err(&got, want);
        println!("heads {name}: normalised max error {e:.2e}");
        assert!(e <= CONV_TOL, "heads {name}: {e}");
    }
}

/// Raw outputs of an h×w input with random boxes and scores; `levels` quantises the scores so that
/// many are exactly equal (ties).
fn random_raw(rng: &mut Rng, h: usize, w: usize, levels: Option<u32>) -> RawOutput {
    let a = anchors::num_anchors(h, w);
    let mut conf = Vec::with_capacity(2 * a);
    for _ in 0..a {
        let mut s = rng.uniform();
        if let Some(q) = levels {
            s = (s * q as f32).floor() / q as f32;
        }
        conf.extend_from_slice(&[1.0 - s, s]);
    }
    RawOutput { h, w, loc: rng.vec(4 * a, 1.5), conf, landmarks: rng.vec(10 * a, 2.0) }
}

fn assert_same_detections(got: &[retinaface::Detection], want: &[retinaface::Detection], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: number of detections");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g, w, "{what}: detection {i}");
    }
}

#[test]
fn postprocess_matches_reference_exactly() {
    let mut rng = Rng(19);
    let mut r = SimRunner::new();
    // (h, w, score levels, options): thousands of candidates; ties; top-k cuts; a resize factor.
    let cases: Vec<(usize, usize, Option<u32>, PostOptions, f32)> = vec![
        (203, 301, None, PostOptions::default(), 1.0),
        (320, 320, Some(16), PostOptions::default(), 1.0),
        (
            320,
            320,
            Some(4),
            PostOptions { conf_threshold: 0.3, nms_threshold: 0.3, pre_nms_topk: Some(1000), post_nms_topk: Some(40) },
            0.5,
        ),
        (
            77,
            61,
            Some(8),
            PostOptions { conf_threshold: 0.0, nms_threshold: 0.7, pre_nms_topk: None, post_nms_topk: None },
            1.0,
        ),
    ];
    for (h, w, levels, opts, resize) in cases {
        let raws: Vec<RawOutput> = (0..2).map(|_| random_raw(&mut rng, h, w, levels)).collect();
        let priors = anchors::priors(h, w);
        let got = device_postprocess(&mut r, &raws, &opts, resize).unwrap();
        for (b, raw) in raws.iter().enumerate() {
            let want = postprocess(raw, &priors, resize, &opts);
            let cands = raw.conf.chunks(2).filter(|c| c[1] > opts.conf_threshold).count();
            println!("{h}x{w} levels {levels:?} image {b}: {cands} candidates, {} detections", want.len());
            assert_same_detections(&got[b], &want, &format!("{h}x{w} image {b}"));
        }
    }
}

#[test]
fn simulation_reports_kernel_misuse() {
    let mut r = SimRunner::new();
    // A parameter struct of the wrong size is refused before anything runs.
    let bad = [0u8; 12];
    let e = r.launch_raw("maxpool3x3s2", LaunchDims::linear(1, 32), &bad).unwrap_err();
    assert!(e.to_string().contains("parameter struct"), "{e}");
    let e = r.launch_raw("no_such_kernel", LaunchDims::linear(1, 32), &bad).unwrap_err();
    assert!(e.to_string().contains("no simulated kernel"), "{e}");
    let e = r
        .launch("maxpool3x3s2", LaunchDims { grid: [1, 1, 1], block: [2048, 1, 1] }, &PoolParams::default())
        .unwrap_err();
    assert!(e.to_string().contains("block"), "{e}");
}
