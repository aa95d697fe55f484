//! Each fused kernel (kernels/conv.cu: conv1x1_ex / conv3x3_ex, conv_dwpw, conv_invres), run in the CPU simulation
//! through its launcher, against the CPU executor's composition of the reference ops
//! (src/cpu/exec.rs), on random inputs at odd sizes and batch > 1. Each case is a small graph: the
//! CPU runs it unfused and fused (the composition must equal the ops it replaces, bit for bit), then
//! the kernel runs the fused op on the same inputs. Outputs are poisoned with NaN first, so every
//! element the kernel owns must be written and every other left alone.
//!
//! Tolerance (normalised max error = max |gpu − cpu| / max(1, max |cpu|)): 1e-5, as kernels_sim's
//! convolutions: f32 sums in another order than the CPU's; the upsample-add is the same f32 add.
//! conv_dwpw is also held bit for bit to the unfused device kernels (conv_depthwise + conv1x1), whose
//! sums it repeats in their order.
#![cfg(feature = "cuda-sim")]

mod common;
mod rng;
use common::hooked::counting_launches;
use common::norm_err;
use retinaface::cpu::exec::run_ops;
use retinaface::cuda::ops::conv::{self as conv_ops, pack};
use retinaface::cuda::ops::fused;
use retinaface::cuda::sim::SimRunner;
use retinaface::cuda::{DevBuf, GpuEngine, KernelRunner, KernelRunnerExt, nchw_to_nhwc, nhwc_to_nchw};
use retinaface::graph::{Act, Conv, Graph, Op, Plan, Stage, Taps, TensorId, TensorInfo};
use retinaface::network::Network;
use retinaface::passes::{Fusions, fuse};
use rng::Rng;
use std::sync::atomic::Ordering;

const TOL: f32 = 1e-5;

#[allow(clippy::too_many_arguments)]
fn conv(
    name: &str,
    (input, output, off): (TensorId, TensorId, usize),
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    groups: usize,
    act: Act,
    residual: Option<TensorId>,
    rng: &mut Rng,
) -> Conv {
    let fan = (cin / groups * k * k) as f32;
    Conv {
        input,
        output,
        out_channel_offset: off,
        weight: rng.vec(cout * cin / groups * k * k, 1.0 / fan.sqrt()),
        bias: rng.vec(cout, 0.5),
        residual,
        ..Conv::with_values(name, [cin, cout, k, stride, groups], act, &mut || 0.0)
    }
}

/// A graph of `ops` over tensors (channels, stride); tensor 0 is the input; every tensor is a tap.
fn graph(tensors: &[(usize, usize)], ops: Vec<Op>) -> Graph {
    let last = tensors.len() - 1;
    Graph {
        network: Network::MobileNetV1_025,
        tensors: tensors
            .iter()
            .enumerate()
            .map(|(i, &(channels, stride))| TensorInfo { name: format!("t{i}"), channels, stride })
            .collect(),
        op_stages: vec![Stage::Neck; ops.len()],
        ops,
        input: 0,
        taps: Taps { backbone: [last; 3], fpn: [last; 3], ssh: [last; 3], head: [last; 3] },
    }
}

/// Runs `g` on the CPU with every tensor kept; returns each tensor (NCHW) and the plan.
///
/// Without Winograd: the fused kernels are held to 1e-5 of the CPU's values, and F(4×4)'s own rounding
/// is of that order on these random 256-channel maps; the direct sums of the implicit GEMM are the
/// nearer oracle. (F(4×4) is held to the reference in the conv path tests, and through whole networks
/// in the goldens.) Set for the whole test binary, which holds only such comparisons.
fn cpu_run(g: &Graph, n: usize, h: usize, w: usize, input: &[f32]) -> (Vec<Vec<f32>>, Plan) {
    use retinaface::cpu::conv::{WinogradMode, set_winograd_mode};
    set_winograd_mode(Some(WinogradMode::Off));
    let plan = Plan::new(g, n, h, w, true).unwrap();
    let mut arena = vec![f32::NAN; plan.arena_elems];
    arena[plan.range(g.input)].copy_from_slice(input);
    run_ops(g, &plan, &mut arena).unwrap();
    ((0..g.tensors.len()).map(|t| arena[plan.range(t)].to_vec()).collect(), plan)
}

/// The unfused and fused graphs' CPU results; asserts the fusions of `fusions` made exactly one op
/// of the kind `is_fused`, removing `removed` ops, and the composition equals the unfused ops bit for
/// bit (every tensor, scratch included: the composition writes it as the unfused ops do).
fn cpu_both_with(
    g: &Graph,
    (n, h, w): (usize, usize, usize),
    (fusions, removed): (Fusions, usize),
    is_fused: fn(&Op) -> bool,
    rng: &mut Rng,
) -> (Graph, Vec<Vec<f32>>, Plan) {
    let f = fuse(g, fusions);
    assert_eq!(f.ops.iter().filter(|o| is_fused(o)).count(), 1, "the pass fused nothing: {:?}", f.ops.len());
    assert_eq!(f.ops.len(), g.ops.len() - removed);
    let input = rng.vec(n * g.tensors[0].channels * h * w, 1.0);
    let (base, _) = cpu_run(g, n, h, w, &input);
    let (fused, plan) = cpu_run(&f, n, h, w, &input);
    for (t, (a, b)) in base.iter().zip(&fused).enumerate() {
        let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()));
        assert!(same, "tensor {t}: the fused composition differs from the unfused ops");
    }
    (f, fused, plan)
}

/// [`cpu_both_with`] with every fusion, for a pattern that fuses two ops into one.
fn cpu_both(
    g: &Graph,
    size: (usize, usize, usize),
    is_fused: fn(&Op) -> bool,
    rng: &mut Rng,
) -> (Graph, Vec<Vec<f32>>, Plan) {
    cpu_both_with(g, size, (Fusions::ALL, 1), is_fused, rng)
}

/// An NCHW tensor uploaded as NHWC.
fn upload(r: &mut SimRunner, v: &[f32], (n, c, h, w): (usize, usize, usize, usize)) -> DevBuf {
    r.alloc_f32(&nchw_to_nhwc(v, n, c, h, w)).unwrap()
}

/// A poisoned NHWC output buffer.
fn out_buf(r: &mut SimRunner, elems: usize) -> DevBuf {
    let b = r.alloc(4 * elems).unwrap();
    r.poison(b).unwrap();
    b
}

/// The device's NHWC result as NCHW, compared with `want` on channels `range`; the others must still
/// be NaN.
fn check(
    r: &mut SimRunner,
    y: DevBuf,
    (n, c, h, w): (usize, usize, usize, usize),
    range: std::ops::Range<usize>,
    want: &[f32],
    what: &str,
) -> f32 {
    let got = nhwc_to_nchw(&r.download_f32(y, n * h * w * c).unwrap(), n, h, w, c);
    let (mut g, mut wv) = (Vec::new(), Vec::new());
    for b in 0..n {
        for ch in 0..c {
            let plane = (b * c + ch) * h * w..(b * c + ch + 1) * h * w;
            if range.contains(&ch) {
                g.extend_from_slice(&got[plane.clone()]);
                wv.extend_from_slice(&want[plane]);
            } else {
                assert!(got[plane].iter().all(|v| v.is_nan()), "{what}: wrote channel {ch} outside its range");
            }
        }
    }
    let e = norm_err(&g, &wv);
    println!("{what}: normalised max error {e:.2e}");
    assert!(e <= TOL, "{what}: {e}");
    e
}

/// FPN lateral 1×1 (`cin` → `c`) with the upsample-add of a coarser map (a stride-`s` 3×3 conv of
/// the same input) in its epilogue.
fn fpn_case((n, h, w): (usize, usize, usize), cin: usize, c: usize, s: usize, act: Act, seed: u64) {
    let mut rng = Rng(seed);
    // t0 input, t1 lateral, t2 coarse map.
    let lat = conv("lateral", (0, 1, 0), cin, c, 1, 1, 1, act, None, &mut rng);
    let coarse = conv("coarse", (0, 2, 0), cin, c, 3, s, 1, act, None, &mut rng);
    let g =
        graph(&[(cin, 1), (c, 1), (c, s)], vec![Op::Conv(lat), Op::Conv(coarse), Op::UpsampleAdd { src: 2, dst: 1 }]);
    let (f, t, plan) = cpu_both(&g, (n, h, w), |o| matches!(o, Op::ConvUpsampleAdd { .. }), &mut rng);
    let Some(Op::ConvUpsampleAdd { conv: lc, src }) = f.ops.last() else { panic!("the fused op runs last") };
    assert_eq!(*src, 2);
    let (_, uh, uw) = plan.shapes[2];
    let mut r = SimRunner::new();
    let x = upload(&mut r, &t[0], (n, cin, h, w));
    let up = upload(&mut r, &t[2], (n, c, uh, uw));
    let wt = r.alloc_f32(&pack(lc).unwrap()).unwrap();
    let bias = r.alloc_f32(&lc.bias).unwrap();
    let y = out_buf(&mut r, n * c * h * w);
    let sizes = fused::Sizes { n, h, w, oh: h, ow: w };
    fused::launch_upsample_add(&mut r, lc, sizes, (x.ptr, wt.ptr, bias.ptr, 0), (y.ptr, c), (up.ptr, uh, uw)).unwrap();
    let what = format!("fpn lateral {cin}->{c} + upsample {uh}x{uw}->{h}x{w}, batch {n}");
    check(&mut r, y, (n, c, h, w), 0..c, &t[1], &what);
}

#[test]
fn fpn_lateral_with_upsample_add_matches_its_composition() {
    fpn_case((2, 37, 23), 24, 40, 2, Act::Leaky(0.1), 1);
    fpn_case((3, 20, 13), 64, 64, 2, Act::Leaky(0.0), 2);
    fpn_case((2, 9, 31), 48, 72, 4, Act::Leaky(0.1), 3);
    fpn_case((1, 25, 25), 128, 256, 2, Act::Relu6, 4);
}

/// SSH's conv3X3 (`c` → c/2, ReLU, into the output at channel 0) and conv5X5_1 (`c` → c/4, leaky,
/// its own tensor) as one GEMM; conv5X5_2 fills the output's next quarter on the CPU only. `k` 1
/// with stride 2 is ResNet-50's downsample + conv1 shape.
fn pair_case(n: usize, h: usize, w: usize, c: usize, k: usize, stride: usize, seed: u64) {
    let mut rng = Rng(seed);
    let (ca, cb) = (c / 2, c / 4);
    let a = conv("conv3X3", (0, 1, 0), c, ca, k, stride, 1, Act::Leaky(0.0), None, &mut rng);
    let b = conv("conv5X5_1", (0, 2, 0), c, cb, k, stride, 1, Act::Leaky(0.1), None, &mut rng);
    let b2 = conv("conv5X5_2", (2, 1, ca), cb, c - ca, 3, 1, 1, Act::None, None, &mut rng);
    let g = graph(&[(c, 1), (c, stride), (cb, stride)], vec![Op::Conv(a), Op::Conv(b), Op::Conv(b2)]);
    let (f, t, plan) = cpu_both(&g, (n, h, w), |o| matches!(o, Op::ConvPair { .. }), &mut rng);
    let Some(Op::ConvPair { a, b }) = f.ops.first() else { panic!("the pair runs first") };
    let (_, oh, ow) = plan.shapes[1];
    let mut r = SimRunner::new();
    let x = upload(&mut r, &t[0], (n, c, h, w));
    let (wv, bv) = fused::pack_pair(a, b).unwrap();
    let (wt, bias) = (r.alloc_f32(&wv).unwrap(), r.alloc_f32(&bv).unwrap());
    let ya = out_buf(&mut r, n * c * oh * ow);
    let yb = out_buf(&mut r, n * cb * oh * ow);
    let sizes = fused::Sizes { n, h, w, oh, ow };
    fused::launch_pair(&mut r, (a, b), sizes, (x.ptr, wt.ptr, bias.ptr), (ya.ptr, c), (yb.ptr, cb)).unwrap();
    let what = format!("pair {k}x{k}/{stride} {c}->{ca}+{cb} at {h}x{w}, batch {n}");
    check(&mut r, ya, (n, c, oh, ow), 0..ca, &t[1], &format!("{what}, first"));
    check(&mut r, yb, (n, cb, oh, ow), 0..cb, &t[2], &format!("{what}, second"));
}

#[test]
fn conv_pair_matches_its_composition() {
    pair_case(2, 29, 17, 64, 3, 1, 11);
    pair_case(3, 11, 19, 40, 3, 1, 12);
    pair_case(2, 40, 40, 256, 3, 1, 13);
    pair_case(2, 15, 21, 64, 1, 1, 14);
    pair_case(2, 15, 21, 96, 1, 2, 15);
}

/// Depthwise 3×3 (stride `s`) + pointwise 1×1 (`c` → `cout`). With `expand`, MobileNetV2's depthwise
/// and project: a 1×1 expansion before (left unfused: the inverted-residual fusion is off here),
/// Relu6, and the shortcut when shapes allow.
fn dwpw_case((n, h, w): (usize, usize, usize), c: usize, cout: usize, s: usize, expand: Option<usize>, seed: u64) {
    let mut rng = Rng(seed);
    let (g, dw_in, res) = match expand {
        None => {
            let dw = conv("dw", (0, 1, 0), c, c, 3, s, c, Act::Leaky(0.1), None, &mut rng);
            let pw = conv("pw", (1, 2, 0), c, cout, 1, 1, 1, Act::Leaky(0.1), None, &mut rng);
            (graph(&[(c, 1), (c, s), (cout, s)], vec![Op::Conv(dw), Op::Conv(pw)]), 0, None)
        }
        Some(cin) => {
            let res = (s == 1 && cin == cout).then_some(0);
            let ex = conv("expand", (0, 1, 0), cin, c, 1, 1, 1, Act::Relu6, None, &mut rng);
            let dw = conv("dw", (1, 2, 0), c, c, 3, s, c, Act::Relu6, None, &mut rng);
            let pw = conv("project", (2, 3, 0), c, cout, 1, 1, 1, Act::None, res, &mut rng);
            let g = graph(&[(cin, 1), (c, 1), (c, s), (cout, s)], vec![Op::Conv(ex), Op::Conv(dw), Op::Conv(pw)]);
            (g, 1, res)
        }
    };
    let fusions = Fusions { inv_res: false, ..Fusions::ALL };
    let (f, t, plan) = cpu_both_with(&g, (n, h, w), (fusions, 1), |o| matches!(o, Op::DwPw { .. }), &mut rng);
    let Some(Op::DwPw { dw, pw }) = f.ops.last() else { panic!("the fused block runs last") };
    assert_eq!(dw.input, dw_in);
    let (_, ih, iw) = plan.shapes[dw.input];
    let (_, oh, ow) = plan.shapes[pw.output];
    let mut r = SimRunner::new();
    let x = upload(&mut r, &t[dw.input], (n, c, ih, iw));
    let residual = res.map(|t0| upload(&mut r, &t[t0], (n, cout, oh, ow)));
    let up = |r: &mut SimRunner, v: &[f32]| r.alloc_f32(v).unwrap();
    let (wdw, bdw, wpw, bpw) =
        (up(&mut r, &pack(dw).unwrap()), up(&mut r, &dw.bias), up(&mut r, &pack(pw).unwrap()), up(&mut r, &pw.bias));
    let y = out_buf(&mut r, n * cout * oh * ow);
    let bufs = fused::DwPwBufs {
        x: x.ptr,
        wdw: wdw.ptr,
        bdw: bdw.ptr,
        wpw: wpw.ptr,
        bpw: bpw.ptr,
        residual: residual.map_or(0, |b| b.ptr),
        y: y.ptr,
        out_ctot: cout,
    };
    fused::launch_dwpw(&mut r, dw, pw, fused::Sizes { n, h: ih, w: iw, oh, ow }, &bufs).unwrap();
    let what = format!(
        "dw{s}+pw {c}->{cout} at {ih}x{iw}, batch {n}{}",
        if expand.is_some() { format!(", inverted residual, shortcut {}", res.is_some()) } else { String::new() }
    );
    check(&mut r, y, (n, cout, oh, ow), 0..cout, &t[pw.output], &what);
    // The unfused kernels (conv_depthwise, then conv1x1 of its stored output): conv_dwpw makes each A
    // value with conv_depthwise's fmaf chain and runs conv1x1's K tiles in its order, so the two
    // agree bit for bit (a change to the fused kernel that moves any sum shows here, below TOL).
    let mid = out_buf(&mut r, n * c * oh * ow);
    let yu = out_buf(&mut r, n * cout * oh * ow);
    let args = |x: DevBuf, (wt, b): (DevBuf, DevBuf), residual: u64, y: DevBuf, (h, w): (usize, usize), ctot| {
        conv_ops::ConvArgs { x: x.ptr, wt: wt.ptr, bias: b.ptr, residual, y: y.ptr, n, h, w, oh, ow, out_ctot: ctot }
    };
    conv_ops::launch(&mut r, dw, &args(x, (wdw, bdw), 0, mid, (ih, iw), c)).unwrap();
    conv_ops::launch(&mut r, pw, &args(mid, (wpw, bpw), bufs.residual, yu, (oh, ow), cout)).unwrap();
    let (got, unfused) =
        (r.download_f32(y, n * cout * oh * ow).unwrap(), r.download_f32(yu, n * cout * oh * ow).unwrap());
    let same = got.iter().zip(&unfused).all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same, "{what}: conv_dwpw differs from conv_depthwise + conv1x1");
}

#[test]
fn depthwise_pointwise_matches_its_composition() {
    dwpw_case((2, 33, 21), 8, 16, 1, None, 21);
    dwpw_case((3, 17, 30), 16, 32, 2, None, 22);
    dwpw_case((2, 19, 13), 37, 70, 1, None, 23);
    dwpw_case((2, 20, 11), 64, 128, 2, None, 24);
    dwpw_case((1, 9, 9), 256, 256, 1, None, 25);
}

#[test]
fn mobilenetv2_depthwise_project_matches_its_composition() {
    dwpw_case((2, 23, 15), 144, 24, 1, Some(24), 31);
    dwpw_case((2, 23, 15), 96, 24, 2, Some(16), 32);
    dwpw_case((3, 12, 7), 57, 35, 1, Some(35), 33);
}

/// MobileNetV2's inverted residual: expand 1×1 (`cin` → `c`, Relu6), depthwise 3×3 stride `s`
/// (Relu6), project 1×1 (`c` → `cout`, no activation) with the shortcut when `s` is 1 and `cin` is
/// `cout` (or, with `act`, another activation everywhere, to test the kernel's codes).
fn invres_case((n, h, w): (usize, usize, usize), (cin, c, cout): (usize, usize, usize), s: usize, act: Act, seed: u64) {
    let mut rng = Rng(seed);
    let res = (s == 1 && cin == cout).then_some(0);
    let last = if act == Act::Relu6 { Act::None } else { act };
    let ex = conv("expand", (0, 1, 0), cin, c, 1, 1, 1, act, None, &mut rng);
    let dw = conv("dw", (1, 2, 0), c, c, 3, s, c, act, None, &mut rng);
    let pw = conv("project", (2, 3, 0), c, cout, 1, 1, 1, last, res, &mut rng);
    let g = graph(&[(cin, 1), (c, 1), (c, s), (cout, s)], vec![Op::Conv(ex), Op::Conv(dw), Op::Conv(pw)]);
    let (f, t, plan) =
        cpu_both_with(&g, (n, h, w), (Fusions::CUDA_F32, 2), |o| matches!(o, Op::InvRes { .. }), &mut rng);
    let Some(Op::InvRes { ex, dw, pw }) = f.ops.last() else { panic!("the fused block runs last") };
    assert_eq!(pw.residual, res);
    let (_, oh, ow) = plan.shapes[pw.output];
    let mut r = SimRunner::new();
    let x = upload(&mut r, &t[0], (n, cin, h, w));
    let residual = res.map(|t0| upload(&mut r, &t[t0], (n, cout, oh, ow)));
    let up = |r: &mut SimRunner, v: &[f32]| r.alloc_f32(v).unwrap();
    let (wex, bex) = (up(&mut r, &pack(ex).unwrap()), up(&mut r, &ex.bias));
    let (wdw, bdw) = (up(&mut r, &pack(dw).unwrap()), up(&mut r, &dw.bias));
    let (wpw, bpw) = (up(&mut r, &pack(pw).unwrap()), up(&mut r, &pw.bias));
    let y = out_buf(&mut r, n * cout * oh * ow);
    let bufs = fused::InvResBufs {
        x: x.ptr,
        wex: wex.ptr,
        bex: bex.ptr,
        wdw: wdw.ptr,
        bdw: bdw.ptr,
        wpw: wpw.ptr,
        bpw: bpw.ptr,
        residual: residual.map_or(0, |b| b.ptr),
        y: y.ptr,
        out_ctot: cout,
    };
    fused::launch_invres(&mut r, (ex, dw, pw), fused::Sizes { n, h, w, oh, ow }, &bufs).unwrap();
    let what = format!(
        "inverted residual {cin}->{c}->{cout}, dw stride {s}, at {h}x{w}, batch {n}, shortcut {}, {act:?}",
        res.is_some()
    );
    check(&mut r, y, (n, cout, oh, ow), 0..cout, &t[pw.output], &what);
}

#[test]
fn mobilenetv2_inverted_residual_matches_its_composition() {
    // Odd sizes (partial 8x8 tiles, windows past every edge), batch > 1, both strides, with and
    // without the shortcut, expanded channels not a multiple of 16, cin past one 64-channel chunk.
    invres_case((2, 23, 15), (24, 144, 24), 1, Act::Relu6, 41);
    invres_case((2, 23, 15), (16, 96, 24), 2, Act::Relu6, 42);
    invres_case((3, 12, 7), (35, 57, 35), 1, Act::Relu6, 43);
    invres_case((2, 9, 17), (35, 57, 21), 1, Act::Relu6, 44);
    invres_case((2, 17, 10), (96, 576, 160), 2, Act::Relu6, 45);
    invres_case((1, 5, 5), (160, 960, 160), 1, Act::Relu6, 46);
    invres_case((2, 8, 16), (40, 100, 56), 1, Act::Leaky(0.1), 47);
    invres_case((3, 1, 3), (8, 16, 8), 2, Act::Relu6, 48);
}

/// Half an f16 ulp at |v| (as tests/conv_f16_sim.rs).
fn half_ulp16(v: f64) -> f64 {
    let a = v.abs();
    if a < 2f64.powi(-14) { 2f64.powi(-25) } else { 2f64.powi(a.log2().floor() as i32 - 11) }
}

/// The tuner's candidates for a fused op (every variant `tune::supported_fused` allows on sm_90) against
/// the heuristic's output, as the f16 executor runs them when tuned: bit for bit where both split K
/// alike (every tile shape sums an output over the same k-tiles in the same order through the same
/// m16n8k16 MMAs; only the tile's extent differs), and for split-K (the partial sums of each K range
/// added in z order: another association of the f32 sum) within one f16 ulp plus 1e-5 of the
/// output's scale (a flip of the final rounding, or of a result far smaller than its terms).
/// Returns (identical, bounded) candidate counts and how many elements the bounded ones moved.
fn variants_vs_heuristic(
    shape: retinaface::cuda::conv_f16::ConvShape,
    fused: retinaface::cuda::tune::Fused,
    outs: &[(&'static retinaface::cuda::conv_f16::Variant, Vec<u16>)],
    what: &str,
) -> (usize, usize, usize) {
    use retinaface::cuda::{conv_f16, tune};
    let h = conv_f16::heuristic(&shape, conv_f16::DEFAULT_SMS);
    let reference = &outs.iter().find(|(v, _)| *v == h).unwrap_or_else(|| panic!("{what}: no {}", h.name)).1;
    let f = |b: u16| half::f16::from_bits(b).to_f32() as f64;
    let scale = reference.iter().fold(1.0f64, |m, &b| m.max(f(b).abs()));
    let (mut same, mut bounded, mut moved) = (0, 0, 0);
    for (v, got) in outs.iter().filter(|(v, _)| tune::supported_fused(v, &shape, fused, 90)) {
        if shape.splits(v) == shape.splits(h) {
            assert!(got == reference, "{what}: {} differs from the heuristic's {}", v.name, h.name);
            same += 1;
            continue;
        }
        for (i, (&a, &b)) in got.iter().zip(reference).enumerate() {
            let (a, b) = (f(a), f(b));
            let ulp = 2f64.powi((a.abs().max(b.abs()).max(2f64.powi(-14))).log2().floor() as i32 - 10);
            assert!((a - b).abs() <= ulp + 1e-5 * scale, "{what}: {} element {i}: {a} vs {b} ({})", v.name, h.name);
            moved += (a != b) as usize;
        }
        bounded += 1;
    }
    assert!(same >= 2, "{what}: fewer than two candidates sum like the heuristic");
    (same, bounded, moved)
}

/// f16 depthwise 3×3 (stride `s`) + pointwise 1×1 (`c` → `cout`) through conv_dwpw_f16, every
/// variant, against (1) the unfused f16 kernels (conv_dw_f16, then conv_f16 with the same variant):
/// bit for bit, as the fused kernel feeds the GEMM the very f16 values conv_dw_f16 stores; (2) the
/// CPU composition, step by step with conv_f16_sim's bound |gpu − ref| ≤ ½ulp_f16(ref) +
/// 1e-5·max(1, max |ref|): the depthwise output (f16, as the fused kernel makes it in shared memory
/// and conv_dw_f16 stores it) against `reference::conv2d` of the depthwise conv, and the fused
/// output against `reference::conv2d` of the pointwise conv of that f16 intermediate. (The reference
/// sums in f64, the kernels in f32: an intermediate that lands on the other side of an f16 rounding
/// boundary is within its own bound but moves the output by a weight times an ulp, so the pointwise
/// reference takes the device's intermediate rather than its own rounding.)
#[allow(clippy::too_many_arguments)]
fn dwpw_f16_case(
    (n, h, w): (usize, usize, usize),
    c: usize,
    cout: usize,
    s: usize,
    (act_dw, act_pw): (Act, Act),
    residual: bool,
    seed: u64,
) {
    use retinaface::cuda::conv_f16::{self, VARIANTS};
    use retinaface::cuda::ops::fused_f16;
    use retinaface::cuda::params::{ConvF16Params, act_code};
    use retinaface::reference;
    let mut rng = Rng(seed);
    let mk = |name: &str, cin, cout, k, stride, groups, act, rng: &mut Rng| {
        let fan = (cin / groups * k * k) as f32;
        Conv {
            weight: rng.vec16(cout * cin / groups * k * k, 1.0 / fan.sqrt()),
            bias: rng.vec16(cout, 0.5),
            ..Conv::with_values(name, [cin, cout, k, stride, groups], act, &mut || 0.0)
        }
    };
    let dw = mk("dw", c, c, 3, s, c, act_dw, &mut rng);
    let pw = mk("pw", c, cout, 1, 1, 1, act_pw, &mut rng);
    let (oh, ow) = (reference::out_size(h, 3, s, 1), reference::out_size(w, 3, s, 1));
    let x = rng.vec16(n * c * h * w, 1.0);
    let res = residual.then(|| rng.vec16(n * cout * oh * ow, 1.0));
    let mut mid_ref = vec![f32::NAN; n * c * oh * ow];
    reference::conv2d(&dw, &x, n, h, w, &mut mid_ref, c, None);
    let mid_ref = nchw_to_nhwc(&mid_ref, n, c, oh, ow);

    let (cp, coutp) = (conv_f16::pad8(c), conv_f16::pad8(cout));
    let mut r = SimRunner::new();
    let up = |r: &mut SimRunner, bytes: &[u8]| {
        let b = r.alloc(bytes.len()).unwrap();
        r.upload(b, 0, bytes).unwrap();
        b
    };
    let xb = up(&mut r, bytemuck::cast_slice(&conv_f16::nchw_to_nhwc_f16(&x, n, c, h, w, cp)));
    let (wdw, bdw) = conv_f16::pack_depthwise(&dw).unwrap();
    let (wpw, bpw) = conv_f16::pack_weights(&pw).unwrap();
    let (wdw, bdw) = (up(&mut r, bytemuck::cast_slice(&wdw)), up(&mut r, bytemuck::cast_slice(&bdw)));
    let (wpw, bpw) = (up(&mut r, bytemuck::cast_slice(&wpw)), up(&mut r, bytemuck::cast_slice(&bpw)));
    let rb =
        res.as_ref().map(|v| up(&mut r, bytemuck::cast_slice(&conv_f16::nchw_to_nhwc_f16(v, n, cout, oh, ow, coutp))));
    let pixels = n * oh * ow;
    let (yf, yu, mb) =
        (r.alloc(pixels * coutp * 2).unwrap(), r.alloc(pixels * coutp * 2).unwrap(), r.alloc(pixels * cp * 2).unwrap());
    let (act, slope) = act_code(act_pw);
    let (act_d, slope_d) = act_code(act_dw);
    // The fused launch's parameters: the pointwise conv's, with the depthwise input's geometry.
    let pf = ConvF16Params {
        x: xb.ptr,
        wt: wpw.ptr,
        bias: bpw.ptr,
        residual: rb.map_or(0, |b| b.ptr),
        y: yf.ptr,
        n: n as i32,
        h: h as i32,
        w: w as i32,
        cin: cp as i32,
        oh: oh as i32,
        ow: ow as i32,
        cout: coutp as i32,
        k: 1,
        stride: s as i32,
        pad: 1,
        out_ctot: coutp as i32,
        out_coff: 0,
        act,
        slope,
        ..Default::default()
    };
    let pd = ConvF16Params {
        x: xb.ptr,
        wt: wdw.ptr,
        bias: bdw.ptr,
        residual: 0,
        y: mb.ptr,
        cout: cp as i32,
        k: 3,
        out_ctot: cp as i32,
        act: act_d,
        slope: slope_d,
        ..pf
    };
    let pu = ConvF16Params { x: mb.ptr, y: yu.ptr, h: oh as i32, w: ow as i32, stride: 1, pad: 0, ..pf };
    let part = fused_f16::DepthwisePart { wdw: wdw.ptr, bdw: bdw.ptr, k: 3, act: act_dw };
    let bound = |got: &[f32], want: &[f32], (cs, ct): (usize, usize), what: &str| {
        let mag = want.iter().fold(1.0f32, |m, v| m.max(v.abs())) as f64;
        let mut worst = 0.0f64;
        for px in 0..pixels {
            for ch in 0..cs {
                let g = got[px * cs + ch] as f64;
                if ch >= ct {
                    assert_eq!(g, 0.0, "{what}: padded channel {ch} not zero");
                    continue;
                }
                let wv = want[px * ct + ch] as f64;
                worst = worst.max((g - wv).abs() / (half_ulp16(wv) + 1e-5 * mag));
            }
        }
        assert!(worst <= 1.0, "{what}: {worst} of the bound");
        worst
    };
    let down = |r: &mut SimRunner, b: DevBuf, len: usize| {
        let mut raw = vec![0u16; len];
        r.download(b, 0, bytemuck::cast_slice_mut(&mut raw)).unwrap();
        raw
    };
    r.memset(mb, 0xff).unwrap();
    conv_f16::launch_depthwise(&mut r, "dw", &pd).unwrap();
    let mid: Vec<f32> = conv_f16::f32_from_f16_bits(&down(&mut r, mb, pixels * cp));
    let what = format!("f16 dw{s}+pw {c}->{cout} at {h}x{w}, batch {n}, residual {residual}");
    let e_dw = bound(&mid, &mid_ref, (cp, c), &format!("{what}: depthwise"));
    // The intermediate as the reference takes it: NCHW, padded channels dropped.
    let mid_nchw: Vec<f32> =
        nhwc_to_nchw(&mid, n, oh, ow, cp).chunks(cp * oh * ow).flat_map(|img| img[..c * oh * ow].to_vec()).collect();
    let mut want = vec![f32::NAN; n * cout * oh * ow];
    reference::conv2d(&pw, &mid_nchw, n, oh, ow, &mut want, cout, res.as_deref());
    let want = nchw_to_nhwc(&want, n, cout, oh, ow);
    let shape = pu.shape();
    let mut outs = Vec::new();
    for v in VARIANTS {
        let need = shape.workspace_bytes(v);
        let ws = (need > 0).then(|| {
            let b = r.alloc(need).unwrap();
            r.poison(b).unwrap();
            b
        });
        for y in [yf, yu] {
            r.memset(y, 0xff).unwrap();
        }
        fused_f16::launch_dwpw(&mut r, v, "pw", &pf, &part, ws).unwrap_or_else(|e| panic!("{}: {e}", v.name));
        conv_f16::launch(&mut r, v, "pw", &pu, ws).unwrap();
        let (got, unfused) = (down(&mut r, yf, pixels * coutp), down(&mut r, yu, pixels * coutp));
        let what = format!("{what}, {}", v.name);
        assert!(got == unfused, "{what}: the fused kernel differs from conv_dw_f16 + {}", v.kernel);
        let e = bound(&conv_f16::f32_from_f16_bits(&got), &want, (coutp, cout), &what);
        println!(
            "{what}: worst error {e_dw:.2} (depthwise), {e:.2} (pointwise) of the bound; bit-identical to the unfused kernels"
        );
        outs.push((v, got));
        if let Some(b) = ws {
            r.free(b).unwrap();
        }
    }
    let fused = retinaface::cuda::tune::Fused::DwPw { k: 3, stride: s, pad: 1, h, w };
    let (same, bounded, moved) = variants_vs_heuristic(shape, fused, &outs, &what);
    println!(
        "{what}: {same} candidates bit-identical to the heuristic's, {bounded} split-K within one ulp ({moved} elements moved)"
    );
}

#[test]
fn f16_depthwise_pointwise_matches_its_composition() {
    let relu = Act::Leaky(0.0);
    dwpw_f16_case((2, 17, 13), 24, 40, 1, (Act::Leaky(0.1), Act::Leaky(0.1)), false, 51);
    dwpw_f16_case((3, 11, 9), 20, 20, 2, (relu, relu), false, 52);
    dwpw_f16_case((2, 9, 7), 32, 32, 1, (Act::Relu6, Act::None), true, 53);
    dwpw_f16_case((1, 5, 6), 256, 136, 1, (Act::Relu6, Act::None), false, 54);
}

/// f16 NHWC bits of an NCHW f32 tensor, channels padded to 8, uploaded.
fn up_f16(r: &mut SimRunner, v: &[f32], (n, c, h, w): (usize, usize, usize, usize)) -> DevBuf {
    let bits = retinaface::cuda::conv_f16::nchw_to_nhwc_f16(v, n, c, h, w, retinaface::cuda::conv_f16::pad8(c));
    let b = r.alloc(2 * bits.len()).unwrap();
    r.upload(b, 0, bytemuck::cast_slice(&bits)).unwrap();
    b
}

fn up_bytes(r: &mut SimRunner, bytes: &[u8]) -> DevBuf {
    let b = r.alloc(bytes.len()).unwrap();
    r.upload(b, 0, bytes).unwrap();
    b
}

fn down_u16(r: &mut SimRunner, b: DevBuf, len: usize) -> Vec<u16> {
    let mut raw = vec![0u16; len];
    r.download(b, 0, bytemuck::cast_slice_mut(&mut raw)).unwrap();
    raw
}

/// conv_f16_sim's bound on `got` (NHWC f16 bits, `cs` stored channels) against `want` (NHWC f32,
/// `ct` channels): |got − want| ≤ ½ulp_f16(want) + 1e-5·max(1, max |want|); padded channels zero.
/// Returns the worst fraction of the bound.
fn f16_bound(got: &[u16], want: &[f32], (cs, ct): (usize, usize), what: &str) -> f64 {
    let mag = want.iter().fold(1.0f32, |m, v| m.max(v.abs())) as f64;
    let mut worst = 0.0f64;
    for (px, row) in got.chunks(cs).enumerate() {
        for (ch, &bits) in row.iter().enumerate() {
            let g = half::f16::from_bits(bits).to_f32() as f64;
            if ch >= ct {
                assert_eq!(g, 0.0, "{what}: padded channel {ch} not zero");
                continue;
            }
            let wv = want[px * ct + ch] as f64;
            worst = worst.max((g - wv).abs() / (half_ulp16(wv) + 1e-5 * mag));
        }
    }
    assert!(worst <= 1.0, "{what}: {worst} of the bound");
    worst
}

/// A conv for the f16 cases: f16-exact weights and bias.
fn conv16(name: &str, (cin, cout, k, stride): (usize, usize, usize, usize), act: Act, rng: &mut Rng) -> Conv {
    let fan = (cin * k * k) as f32;
    Conv {
        weight: rng.vec16(cout * cin * k * k, 1.0 / fan.sqrt()),
        bias: rng.vec16(cout, 0.5),
        ..Conv::with_values(name, [cin, cout, k, stride, 1], act, &mut || 0.0)
    }
}

/// The f16 launch parameters of `c` on NHWC f16 buffers with `cin`/`cout` padded to 8.
fn params16(
    c: &Conv,
    (n, h, w): (usize, usize, usize),
    (x, wt, bias, y): (u64, u64, u64, u64),
) -> retinaface::cuda::params::ConvF16Params {
    use retinaface::cuda::conv_f16::pad8;
    let (act, slope) = retinaface::cuda::params::act_code(c.act);
    let o = |s: usize| retinaface::reference::out_size(s, c.kernel, c.stride, c.pad) as i32;
    retinaface::cuda::params::ConvF16Params {
        x,
        wt,
        bias,
        residual: 0,
        y,
        n: n as i32,
        h: h as i32,
        w: w as i32,
        cin: pad8(c.cin) as i32,
        oh: o(h),
        ow: o(w),
        cout: pad8(c.cout) as i32,
        k: c.kernel as i32,
        stride: c.stride as i32,
        pad: c.pad as i32,
        out_ctot: pad8(c.cout) as i32,
        out_coff: 0,
        act,
        slope,
        ..Default::default()
    }
}

/// SSH's pair on f16 through conv_ex_f16 (conv3X3 `c` → ca, ReLU, and conv5X5_1 `c` → cb, leaky, as
/// one GEMM over both padded widths), every variant: bit for bit the unfused conv_f16 launches of
/// the same variant (a pair's GEMM sums each output in the same order), and each destination
/// within conv_f16_sim's bound of `reference::conv2d` of its conv.
fn pair_f16_case(
    (n, h, w): (usize, usize, usize),
    c: usize,
    (ca, cb): (usize, usize),
    (k, s): (usize, usize),
    seed: u64,
) {
    use retinaface::cuda::conv_f16::{self, VARIANTS, pad8};
    use retinaface::cuda::ops::fused_f16;
    let mut rng = Rng(seed);
    let a = conv16("conv3X3", (c, ca, k, s), Act::Leaky(0.0), &mut rng);
    let b = conv16("conv5X5_1", (c, cb, k, s), Act::Leaky(0.1), &mut rng);
    let x = rng.vec16(n * c * h * w, 1.0);
    let (oh, ow) = (retinaface::reference::out_size(h, k, s, k / 2), retinaface::reference::out_size(w, k, s, k / 2));
    let refc = |cv: &Conv| {
        let mut y = vec![f32::NAN; n * cv.cout * oh * ow];
        retinaface::reference::conv2d(cv, &x, n, h, w, &mut y, cv.cout, None);
        nchw_to_nhwc(&y, n, cv.cout, oh, ow)
    };
    let (want_a, want_b) = (refc(&a), refc(&b));
    let mut r = SimRunner::new();
    let xb = up_f16(&mut r, &x, (n, c, h, w));
    let (wv, bv) = fused_f16::pack_pair(&a, &b).unwrap();
    let (wp, bp) = (up_bytes(&mut r, bytemuck::cast_slice(&wv)), up_bytes(&mut r, bytemuck::cast_slice(&bv)));
    let sep = |r: &mut SimRunner, cv: &Conv| {
        let (w16, b16) = conv_f16::pack_weights(cv).unwrap();
        (up_bytes(r, bytemuck::cast_slice(&w16)), up_bytes(r, bytemuck::cast_slice(&b16)))
    };
    let ((wa, ba), (wb, bb)) = (sep(&mut r, &a), sep(&mut r, &b));
    let (pa, pb) = (pad8(ca), pad8(cb));
    let pixels = n * oh * ow;
    let bufs: Vec<DevBuf> = [pa, pb, pa, pb].iter().map(|&cc| r.alloc(2 * pixels * cc).unwrap()).collect();
    let (ya, yb, ua, ub) = (bufs[0], bufs[1], bufs[2], bufs[3]);
    let what0 = format!("f16 pair {k}x{k}/{s} {c}->{ca}+{cb} at {h}x{w}, batch {n}");
    let pf = params16(&a, (n, h, w), (xb.ptr, wp.ptr, bp.ptr, ya.ptr));
    let pf = retinaface::cuda::params::ConvF16Params { cout: (pa + pb) as i32, ..pf };
    let e = fused_f16::ExPart {
        split: pa,
        y2: yb.ptr,
        out_ctot2: pb,
        out_coff2: 0,
        act2: Some(b.act),
        ..Default::default()
    };
    let (mut worst_a, mut worst_b) = (0.0f64, 0.0f64);
    let mut outs = Vec::new();
    for v in VARIANTS {
        let need = pf.shape().workspace_bytes(v).max(params16(&a, (n, h, w), (0, 0, 0, 0)).shape().workspace_bytes(v));
        let ws = (need > 0).then(|| r.alloc(need).unwrap());
        for &bf in &bufs {
            r.memset(bf, 0xff).unwrap();
        }
        fused_f16::launch_ex(&mut r, v, "pair", &pf, &e, ws).unwrap_or_else(|err| panic!("{}: {err}", v.name));
        conv_f16::launch(&mut r, v, "a", &params16(&a, (n, h, w), (xb.ptr, wa.ptr, ba.ptr, ua.ptr)), ws).unwrap();
        conv_f16::launch(&mut r, v, "b", &params16(&b, (n, h, w), (xb.ptr, wb.ptr, bb.ptr, ub.ptr)), ws).unwrap();
        let what = format!("{what0}, {}", v.name);
        let (ga, gb) = (down_u16(&mut r, ya, pixels * pa), down_u16(&mut r, yb, pixels * pb));
        assert!(ga == down_u16(&mut r, ua, pixels * pa), "{what}: first conv differs from the unfused launch");
        assert!(gb == down_u16(&mut r, ub, pixels * pb), "{what}: second conv differs from the unfused launch");
        worst_a = worst_a.max(f16_bound(&ga, &want_a, (pa, ca), &format!("{what}, first")));
        worst_b = worst_b.max(f16_bound(&gb, &want_b, (pb, cb), &format!("{what}, second")));
        outs.push((v, [ga, gb].concat()));
        if let Some(b) = ws {
            r.free(b).unwrap();
        }
    }
    let fused = retinaface::cuda::tune::Fused::Pair { split: pa };
    let (same, bounded, moved) = variants_vs_heuristic(pf.shape(), fused, &outs, &what0);
    println!(
        "{what0}: every variant bit-identical to the unfused convs; worst {worst_a:.2} / {worst_b:.2} of the bound; \
         {same} candidates bit-identical to the heuristic's, {bounded} split-K within one ulp ({moved} elements moved)"
    );
}

#[test]
fn f16_conv_pair_matches_its_composition() {
    pair_f16_case((2, 13, 9), 64, (32, 16), (3, 1), 61);
    pair_f16_case((3, 7, 11), 40, (20, 12), (3, 1), 62);
    pair_f16_case((2, 9, 9), 96, (48, 24), (1, 2), 63);
}

/// The FPN lateral 1×1 (`cin` → `c`) with the upsample-add of a coarser f16 map (stride `s`) in
/// conv_ex_f16's epilogue, every variant: bit for bit the unfused conv_f16 launch followed by
/// upsample_nearest_add_f16; the conv step (the unfused conv's output) within conv_f16_sim's bound
/// of `reference::conv2d`, and the add step exactly f16(conv + up[nearest]) summed in f32 (the
/// reference's upsample-add on f16 values, rounded once).
fn fpn_f16_case((n, h, w): (usize, usize, usize), cin: usize, c: usize, s: usize, act: Act, seed: u64) {
    use retinaface::cuda::conv_f16::{self, VARIANTS, pad8};
    use retinaface::cuda::ops::{fused_f16, net_f16};
    let mut rng = Rng(seed);
    let lat = conv16("lateral", (cin, c, 1, 1), act, &mut rng);
    let (uh, uw) = (h.div_ceil(s), w.div_ceil(s));
    let x = rng.vec16(n * cin * h * w, 1.0);
    let upm = rng.vec16(n * c * uh * uw, 2.0);
    let mut want_conv = vec![f32::NAN; n * c * h * w];
    retinaface::reference::conv2d(&lat, &x, n, h, w, &mut want_conv, c, None);
    let want_conv = nchw_to_nhwc(&want_conv, n, c, h, w);
    let mut r = SimRunner::new();
    let xb = up_f16(&mut r, &x, (n, cin, h, w));
    let ub = up_f16(&mut r, &upm, (n, c, uh, uw));
    let (w16, b16) = conv_f16::pack_weights(&lat).unwrap();
    let (wt, bias) = (up_bytes(&mut r, bytemuck::cast_slice(&w16)), up_bytes(&mut r, bytemuck::cast_slice(&b16)));
    let cp = pad8(c);
    let pixels = n * h * w;
    let (yf, yu) = (r.alloc(2 * pixels * cp).unwrap(), r.alloc(2 * pixels * cp).unwrap());
    let what0 = format!("f16 fpn lateral {cin}->{c} + upsample {uh}x{uw}->{h}x{w}, batch {n}");
    // The upsampled map's f16 values as NCHW f32, for the host's add.
    let up16: Vec<f32> = upm.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
    let mut worst = 0.0f64;
    let mut outs = Vec::new();
    let shape = params16(&lat, (n, h, w), (0, 0, 0, 0)).shape();
    for v in VARIANTS {
        let p = params16(&lat, (n, h, w), (xb.ptr, wt.ptr, bias.ptr, yf.ptr));
        let need = p.shape().workspace_bytes(v);
        let ws = (need > 0).then(|| r.alloc(need).unwrap());
        for b in [yf, yu] {
            r.memset(b, 0xff).unwrap();
        }
        let e = fused_f16::ExPart { split: cp, up: ub.ptr, uh, uw, ..Default::default() };
        fused_f16::launch_ex(&mut r, v, "lateral", &p, &e, ws).unwrap_or_else(|err| panic!("{}: {err}", v.name));
        let pu = retinaface::cuda::params::ConvF16Params { y: yu.ptr, ..p };
        conv_f16::launch(&mut r, v, "lateral", &pu, ws).unwrap();
        let conv_only = down_u16(&mut r, yu, pixels * cp);
        net_f16::upsample_add(&mut r, ub.ptr, yu.ptr, n, (uh, uw), (h, w), cp).unwrap();
        let what = format!("{what0}, {}", v.name);
        let got = down_u16(&mut r, yf, pixels * cp);
        assert!(got == down_u16(&mut r, yu, pixels * cp), "{what}: differs from conv_f16 + upsample_nearest_add_f16");
        worst = worst.max(f16_bound(&conv_only, &want_conv, (cp, c), &format!("{what}, conv step")));
        // The add step: the reference's upsample-add of the map onto the device's f16 conv output,
        // then one rounding.
        let conv_nchw: Vec<f32> = nhwc_to_nchw(&conv_f16::f32_from_f16_bits(&conv_only), n, h, w, cp)
            .chunks(cp * h * w)
            .flat_map(|img| img[..c * h * w].to_vec())
            .collect();
        let mut sum = conv_nchw;
        retinaface::reference::upsample_nearest_add(&up16, uh, uw, &mut sum, h, w);
        let sum = nchw_to_nhwc(&sum, n, c, h, w);
        for (px, row) in got.chunks(cp).enumerate() {
            for ch in 0..c {
                let want = half::f16::from_f32(sum[px * c + ch]).to_bits();
                assert_eq!(row[ch], want, "{what}: pixel {px} channel {ch}: not f16(conv + up)");
            }
        }
        // The output is f16(conv step + up) exactly (above), so variants agree where their conv
        // steps do: those are compared with the heuristic's.
        outs.push((v, conv_only));
        if let Some(b) = ws {
            r.free(b).unwrap();
        }
    }
    let fused = retinaface::cuda::tune::Fused::UpsampleAdd { uh, uw };
    let (same, bounded, moved) = variants_vs_heuristic(shape, fused, &outs, &what0);
    println!(
        "{what0}: every variant bit-identical to the unfused pair and exactly f16(conv + up); conv step {worst:.2} of the bound; \
         {same} candidates' conv steps bit-identical to the heuristic's, {bounded} split-K within one ulp ({moved} elements moved)"
    );
}

#[test]
fn f16_fpn_lateral_with_upsample_add_matches_its_composition() {
    fpn_f16_case((2, 13, 9), 24, 40, 2, Act::Leaky(0.1), 71);
    fpn_f16_case((3, 10, 7), 64, 64, 2, Act::Leaky(0.0), 72);
    fpn_f16_case((2, 9, 15), 48, 20, 4, Act::Relu6, 73);
    // K deep enough (8 k-tiles) for the tuner's split-K candidate.
    fpn_f16_case((1, 6, 5), 256, 24, 2, Act::Leaky(0.1), 74);
}

/// Every network's forward pass with and without the fusions: the same raw outputs (1e-5 of the
/// unfused kernels') and one launch fewer per op fused away, printed per network (mobilenetv1_0.25
/// 53 -> 32, mobilenetv2 -> 37 with the inverted residuals, resnet50 80 -> 71).
#[test]
fn every_network_runs_fused_with_fewer_launches() {
    let img = {
        let mut rng = Rng(7);
        let (w, h) = (45, 37);
        retinaface::BgrImage::new(w, h, (0..w * h * 3).map(|_| rng.below(256) as u8).collect()).unwrap()
    };
    let mut lines = Vec::new();
    for net in Network::ALL {
        let g = retinaface::Engine::new(&retinaface::WeightsSpec::Synthetic { seed: 1 }, Some(net)).unwrap();
        let run = |fusions| {
            let (runner, count) = counting_launches(SimRunner::new());
            let runner = Box::new(runner);
            let mut e = GpuEngine::with_runner_fused(g.graph(), runner, fusions).unwrap();
            let raw = e.raw_outputs(&[&img, &img]).unwrap();
            (count.load(Ordering::Relaxed), raw)
        };
        let (before, want) = run(Fusions::NONE);
        let (after, got) = run(Fusions::CUDA_F32);
        for (a, b) in got.iter().zip(&want) {
            for (name, x, y) in
                [("loc", &a.loc, &b.loc), ("conf", &a.conf, &b.conf), ("landmarks", &a.landmarks, &b.landmarks)]
            {
                let e = norm_err(x, y);
                assert!(e <= TOL, "{net} {name}: fused vs unfused {e}");
            }
        }
        lines.push(format!("{net}: {before} -> {after} launches per forward pass"));
        // One launch saved per op the fusions remove.
        let removed = g.graph().ops.len() - fuse(g.graph(), Fusions::CUDA_F32).ops.len();
        assert!(removed > 0 && before - after == removed, "{net}: {before} -> {after}, {removed} ops fused away");
    }
    println!("{}", lines.join("\n"));
}

/// The f16 executor with and without its fusions, per network, with launches counted. Depthwise +
/// pointwise alone gives the unfused raw outputs bit for bit (the fused kernel feeds each GEMM the
/// f16 values the unfused pair stores, and the variant is chosen for the same shape). All of
/// `Fusions::CUDA_F16` (pairs and FPN too) stays within f16_goldens_sim's RAW_REL of the unfused
/// f16 outputs: each fused kernel is bit-identical to the unfused kernels of its own variant (the
/// kernel tests above), but a pair's GEMM over both convs' channels gets its own tile from the
/// heuristic, and tiles of different widths round some outputs differently in the simulation
/// (measured: mobilenetv1_0.25 and mobilenetv2 still identical, resnet18 ≤ 1e-4 abs in loc at
/// 45x37). One launch fewer per op fused away.
#[test]
fn f16_networks_run_fused_with_fewer_launches() {
    const RAW_REL: f32 = 5e-3;
    let img = {
        let mut rng = Rng(9);
        let (w, h) = (45, 37);
        retinaface::BgrImage::new(w, h, (0..w * h * 3).map(|_| rng.below(256) as u8).collect()).unwrap()
    };
    let mut lines = Vec::new();
    for net in [Network::MobileNetV1_025, Network::MobileNetV2, Network::ResNet18] {
        let g = retinaface::Engine::new(&retinaface::WeightsSpec::Synthetic { seed: 1 }, Some(net)).unwrap();
        let run = |fusions| {
            let (runner, count) = counting_launches(SimRunner::new());
            let runner = Box::new(runner);
            let mut e = GpuEngine::with_runner_f16_fused(g.graph(), runner, fusions).unwrap();
            let raw = e.raw_outputs(&[&img, &img]).unwrap();
            (count.load(Ordering::Relaxed), raw)
        };
        let outputs = |raw: &[retinaface::RawOutput]| -> Vec<Vec<f32>> {
            raw.iter().flat_map(|r| [r.loc.clone(), r.conf.clone(), r.landmarks.clone()]).collect()
        };
        let (before, want) = run(Fusions::NONE);
        let want = outputs(&want);
        let (_, dwpw) = run(Fusions { dw_pw: true, ..Fusions::NONE });
        for (x, y) in outputs(&dwpw).iter().zip(&want) {
            let same = x.len() == y.len() && x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(same, "{net}: f16 with depthwise + pointwise fused differs from unfused");
        }
        let (after, got) = run(Fusions::CUDA_F16);
        let err = outputs(&got).iter().zip(&want).map(|(x, y)| norm_err(x, y)).fold(0.0f32, f32::max);
        assert!(err <= RAW_REL, "{net}: f16 fused vs unfused {err}");
        lines.push(format!(
            "{net} f16: {before} -> {after} launches per forward pass; raw outputs {err:.1e} of unfused"
        ));
        let removed = g.graph().ops.len() - fuse(g.graph(), Fusions::CUDA_F16).ops.len();
        assert!(removed > 0 && before - after == removed, "{net}: {before} -> {after}, {removed} ops fused away");
    }
    println!("{}", lines.join("\n"));
}
