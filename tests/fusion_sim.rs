//! Each fused kernel (kernels/conv.cu: conv1x1_ex / conv3x3_ex, conv_dwpw), run in the CPU simulation
//! through its launcher, against the CPU executor's composition of the reference ops
//! (src/cpu/exec.rs), on random inputs at odd sizes and batch > 1. Each case is a small graph: the
//! CPU runs it unfused and fused (the composition must equal the ops it replaces, bit for bit), then
//! the kernel runs the fused op on the same inputs. Outputs are poisoned with NaN first, so every
//! element the kernel owns must be written and every other left alone.
//!
//! Tolerance (normalised max error = max |gpu − cpu| / max(1, max |cpu|)): 1e-5, as kernels_sim's
//! convolutions: f32 sums in another order than the CPU's; the upsample-add is the same f32 add.
#![cfg(feature = "cuda-sim")]

mod common;
mod rng;
use common::norm_err;
use retinaface::cpu::exec::run_ops;
use retinaface::cuda::ops::{conv::pack, fused};
use retinaface::cuda::runner::{EventId, GraphId, Readback};
use retinaface::cuda::sim::SimRunner;
use retinaface::cuda::{DevBuf, GpuEngine, KernelRunner, KernelRunnerExt, LaunchDims, nchw_to_nhwc, nhwc_to_nchw};
use retinaface::graph::{Act, Conv, Graph, Op, Plan, Stage, Taps, TensorId, TensorInfo};
use retinaface::network::Network;
use retinaface::passes::{Fusions, fuse};
use rng::Rng;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

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
        name: name.into(),
        input,
        output,
        out_channel_offset: off,
        cin,
        cout,
        kernel: k,
        stride,
        pad: k / 2,
        groups,
        weight: rng.vec(cout * cin / groups * k * k, 1.0 / fan.sqrt()),
        bias: rng.vec(cout, 0.5),
        residual,
        act,
        packed: Default::default(),
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
fn cpu_run(g: &Graph, n: usize, h: usize, w: usize, input: &[f32]) -> (Vec<Vec<f32>>, Plan) {
    let plan = Plan::new(g, n, h, w, true).unwrap();
    let mut arena = vec![f32::NAN; plan.arena_elems];
    arena[plan.range(g.input)].copy_from_slice(input);
    run_ops(g, &plan, &mut arena).unwrap();
    ((0..g.tensors.len()).map(|t| arena[plan.range(t)].to_vec()).collect(), plan)
}

/// The unfused and fused graphs' CPU results; asserts the fusion made exactly `fused` ops of the kind
/// `is_fused` and the composition equals the unfused ops bit for bit (every tensor but `scratch`,
/// which only the composition writes).
fn cpu_both(
    g: &Graph,
    (n, h, w): (usize, usize, usize),
    is_fused: fn(&Op) -> bool,
    rng: &mut Rng,
) -> (Graph, Vec<Vec<f32>>, Plan) {
    let f = fuse(g, Fusions::ALL);
    assert_eq!(f.ops.iter().filter(|o| is_fused(o)).count(), 1, "the pass fused nothing: {:?}", f.ops.len());
    assert_eq!(f.ops.len(), g.ops.len() - 1);
    let input = rng.vec(n * g.tensors[0].channels * h * w, 1.0);
    let (base, _) = cpu_run(g, n, h, w, &input);
    let (fused, plan) = cpu_run(&f, n, h, w, &input);
    for (t, (a, b)) in base.iter().zip(&fused).enumerate() {
        let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()));
        assert!(same, "tensor {t}: the fused composition differs from the unfused ops");
    }
    (f, fused, plan)
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

/// Depthwise 3×3 (stride `s`) + pointwise 1×1 (`c` → `cout`). With `expand`, MobileNetV2's inverted
/// residual: a 1×1 expansion (run unfused) before, Relu6, and the shortcut when shapes allow.
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
    let (f, t, plan) = cpu_both(&g, (n, h, w), |o| matches!(o, Op::DwPw { .. }), &mut rng);
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

/// Counts launches; otherwise the simulation.
struct Counting(SimRunner, Arc<AtomicUsize>);

impl KernelRunner for Counting {
    fn describe(&self) -> String {
        self.0.describe()
    }
    fn is_simulation(&self) -> bool {
        self.0.is_simulation()
    }
    fn alloc(&mut self, bytes: usize) -> retinaface::Result<DevBuf> {
        self.0.alloc(bytes)
    }
    fn free(&mut self, buf: DevBuf) -> retinaface::Result<()> {
        self.0.free(buf)
    }
    fn upload(&mut self, dst: DevBuf, offset: usize, src: &[u8]) -> retinaface::Result<()> {
        self.0.upload(dst, offset, src)
    }
    fn download(&mut self, src: DevBuf, offset: usize, dst: &mut [u8]) -> retinaface::Result<()> {
        self.0.download(src, offset, dst)
    }
    fn memset(&mut self, buf: DevBuf, value: u8) -> retinaface::Result<()> {
        self.0.memset(buf, value)
    }
    fn poison(&mut self, buf: DevBuf) -> retinaface::Result<()> {
        self.0.poison(buf)
    }
    fn launch_raw(&mut self, kernel: &str, dims: LaunchDims, params: &[u8]) -> retinaface::Result<()> {
        self.1.fetch_add(1, Ordering::Relaxed);
        self.0.launch_raw(kernel, dims, params)
    }
    fn synchronize(&mut self) -> retinaface::Result<()> {
        self.0.synchronize()
    }
    fn upload_staged(&mut self, dst: DevBuf, offset: usize, parts: &[&[u8]]) -> retinaface::Result<()> {
        self.0.upload_staged(dst, offset, parts)
    }
    fn download_async(&mut self, src: DevBuf, offset: usize, len: usize) -> retinaface::Result<Readback> {
        self.0.download_async(src, offset, len)
    }
    fn read_back(&mut self, rb: Readback, dst: &mut [u8]) -> retinaface::Result<()> {
        self.0.read_back(rb, dst)
    }
    fn event_create(&mut self) -> retinaface::Result<EventId> {
        self.0.event_create()
    }
    fn event_record(&mut self, e: EventId) -> retinaface::Result<()> {
        self.0.event_record(e)
    }
    fn event_synchronize(&mut self, e: EventId) -> retinaface::Result<()> {
        self.0.event_synchronize(e)
    }
    fn event_elapsed(&mut self, start: EventId, end: EventId) -> retinaface::Result<std::time::Duration> {
        self.0.event_elapsed(start, end)
    }
    fn event_destroy(&mut self, e: EventId) -> retinaface::Result<()> {
        self.0.event_destroy(e)
    }
    // Launches are counted as they are issued: a captured pass counts when captured, not on replay.
    fn begin_capture(&mut self) -> retinaface::Result<()> {
        self.0.begin_capture()
    }
    fn end_capture(&mut self) -> retinaface::Result<GraphId> {
        self.0.end_capture()
    }
    fn replay(&mut self, g: GraphId) -> retinaface::Result<()> {
        self.0.replay(g)
    }
    fn free_graph(&mut self, g: GraphId) -> retinaface::Result<()> {
        self.0.free_graph(g)
    }
    fn set_sync_each_launch(&mut self, on: bool) {
        self.0.set_sync_each_launch(on)
    }
    fn sync_each_launch(&self) -> bool {
        self.0.sync_each_launch()
    }
    fn fault(&self) -> Option<String> {
        self.0.fault()
    }
}

/// Every network's forward pass with and without the fusions: the same raw outputs (1e-5 of the
/// unfused kernels') and one launch fewer per op fused away, printed per network (mobilenetv1_0.25
/// 53 -> 32, resnet50 80 -> 71).
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
            let count = Arc::new(AtomicUsize::new(0));
            let runner = Box::new(Counting(SimRunner::new(), count.clone()));
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
