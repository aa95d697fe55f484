//! Runs of dense convolutions and max-pools (the ResNet backbones, stem to last block) executed in the
//! channel-blocked layout (NCHW16c, `cpu::blocked`) at the AVX-512 and AVX2 levels. In NCHW a 1x1
//! convolution's micro-tile writes each output channel a plane away and reads a plane per reduction
//! step, and ResNet-50's bottleneck 1x1s ran on the GEMM crate at 65–110 GFLOPS where the blocked 1x1
//! runs at 100–150 (`conv_shapes -- blocked`, Ice Lake Xeon, one thread); the direct path reads and
//! writes the layout with no transposes; Winograd's transforms take whole 16-channel vectors
//! (`winograd_blocked`). ResNet-18 and -34 (2% of their work in 1x1s) were left in NCHW while their
//! 3x3s on 80²–160² maps ran faster by Winograd there than on the blocked direct path; with Winograd
//! in the layout, `paired -- dense=off auto` measured them 1.32x / 1.45x (ResNet-18 / -34, one thread)
//! and 1.20x / 1.29x (two threads) with the run, at AVX2 1.23x / 1.32x and 1.18x / 1.25x.
//!
//! Memory: every channel count of such a run is a multiple of 16, so a tensor's blocked form has the
//! length of its NCHW one and takes its place in the plan's arena (the plan's live ranges hold for it
//! unchanged). A tensor read after the run (a backbone tap, the run's last output) keeps its blocked
//! form in a scratch slot of its own after the plan's tensors, where later ops of the run read it, and
//! is reordered into its NCHW range once it is made. The run's first op reads its input (the image)
//! in NCHW.
//!
//! Ops: a 1x1 stride-1 convolution on the blocked pointwise kernel (stride 2 on its input's even
//! pixels); the 3x3 stride-1 convolutions by Winograd's F(4×4) in the layout (`winograd_blocked`);
//! any other convolution (the 7x7 stem, 3x3 of stride 2) on `conv::conv_blocked` (the direct path
//! vectorised over output channels); a conv pair (ResNet-50's first downsample and conv1) as its two
//! convolutions; the max-pool on `blocked::max_pool3x3s2`. With the Winograd path switched off
//! (`set_winograd`), the 3x3 stride-1 convolutions Winograd wins on in NCHW run as NCHW islands
//! (`island_preferred`), the others on the direct path. Values: the same sums as the NCHW paths up to
//! summation order and F(4×4)'s rounding, within the tolerance of every conv path; tests run the
//! ResNet-50 goldens with the run on (its Winograd path on and off) and off at every level.

use super::blocked::{self, PointwiseWeights, Simd, blocked_len};
use super::conv::{self, ModeSwitch, PathMode, conv_blocked};
use super::winograd_blocked::{self, WinogradWeights};
use crate::error::{Error, Result};
use crate::graph::{Conv, Graph, Op, Plan, TensorId};
use std::ops::Range;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Ops in a run below which the reorders cost more than the blocked kernels save.
const MIN_OPS: usize = 4;

/// One run of ops the blocked layout computes.
pub(super) struct DenseRun {
    /// The run: `graph.ops[ops]`.
    pub(super) ops: Range<usize>,
    /// The tensors read after the run (each with a scratch slot for its blocked form).
    exports: Vec<TensorId>,
    /// Per op, per convolution: the packed 1x1 weights (`None` for other kernels), made on first use.
    packed: OnceLock<Vec<Vec<Option<PointwiseWeights>>>>,
    /// Per op, per convolution: its Winograd weights, made the first time `winograd_preferred` takes it
    /// (a switch may turn the path on after the run's first pass).
    winograd: Vec<Vec<OnceLock<Option<WinogradWeights>>>>,
}

/// The convolutions an op of a run computes, in order.
fn convs(op: &Op) -> Vec<&Conv> {
    match op {
        Op::Conv(c) | Op::ConvMaxPool { conv: c, .. } => vec![c],
        Op::ConvPair { a, b } => vec![a, b],
        _ => Vec::new(),
    }
}

/// Whether a convolution writes a whole tensor of whole 16-channel blocks with a kernel of the run.
fn dense(graph: &Graph, c: &Conv) -> bool {
    c.groups == 1
        && c.cout.is_multiple_of(blocked::BLOCK)
        && c.out_channel_offset == 0
        && graph.tensors[c.output].channels == c.cout
}

/// Whether `op` can be in a run, reading (inputs and shortcuts) only tensors in `made` unless it is
/// the run's first op, whose input may come from outside (but not its shortcuts).
fn takes(graph: &Graph, op: &Op, made: &[TensorId], first: bool) -> bool {
    let inside = |t: &TensorId| made.contains(t);
    match op {
        Op::Conv(_) | Op::ConvPair { .. } => convs(op).iter().all(|c| {
            dense(graph, c)
                && ((first && c.residual.is_none()) || inside(&c.input))
                && c.residual.is_none_or(|r| inside(&r))
        }),
        Op::MaxPool { input, .. } => graph.tensors[*input].channels.is_multiple_of(blocked::BLOCK) && inside(input),
        // The conv's output is the pool's input: both whole blocks with `dense`.
        Op::ConvMaxPool { conv: c, .. } => dense(graph, c) && (first || inside(&c.input)),
        _ => false,
    }
}

/// The tensors `op` writes.
fn outputs(op: &Op) -> Vec<TensorId> {
    match op {
        Op::MaxPool { output, .. } => vec![*output],
        Op::ConvMaxPool { conv, output } => vec![*output, conv.output],
        _ => convs(op).iter().map(|c| c.output).collect(),
    }
}

/// The maximal runs of at least `MIN_OPS` consecutive ops the blocked layout takes, outside `taken`
/// (the ops of the depthwise runs).
pub(super) fn find(graph: &Graph, taken: &[Range<usize>]) -> Vec<DenseRun> {
    let mut runs = Vec::new();
    let mut i = 0;
    let free = |k: usize| !taken.iter().any(|r| r.contains(&k));
    while i < graph.ops.len() {
        let mut made: Vec<TensorId> = Vec::new();
        let start = i;
        while i < graph.ops.len() && free(i) && takes(graph, &graph.ops[i], &made, i == start) {
            made.extend(outputs(&graph.ops[i]));
            i += 1;
        }
        if i == start {
            i += 1;
            continue;
        }
        let ops = start..i;
        if ops.len() < MIN_OPS {
            continue;
        }
        let read_after = |t: TensorId| {
            graph.is_tap(t) || graph.ops.iter().enumerate().any(|(j, op)| !ops.contains(&j) && op.reads().contains(&t))
        };
        let exports = made.iter().copied().filter(|&t| read_after(t)).collect();
        let winograd = ops.clone().map(|k| convs(&graph.ops[k]).iter().map(|_| OnceLock::new()).collect()).collect();
        runs.push(DenseRun { ops, exports, packed: OnceLock::new(), winograd });
    }
    runs
}

/// A tensor's blocked floats in `plan` (its NCHW length: whole blocks).
fn len_of(plan: &Plan, t: TensorId) -> usize {
    let (c, h, w) = plan.shapes[t];
    blocked_len(plan.n, c, h * w)
}

/// Floats of blocked scratch `run` needs in `plan`: a slot per export, each from a 64-byte boundary,
/// then the largest `temp_len` of its ops.
pub(super) fn scratch_elems(graph: &Graph, run: &DenseRun, plan: &Plan) -> usize {
    let temp = run.ops.clone().flat_map(|k| convs(&graph.ops[k])).map(|c| temp_len(c, plan)).max().unwrap_or(0);
    run.exports.iter().map(|&t| len_of(plan, t).next_multiple_of(16)).sum::<usize>() + temp + 16
}

/// Floats a convolution of the run may need besides its tensors: its subsampled input (1x1 stride 2),
/// or NCHW copies of its input, output and shortcut (where the NCHW paths are faster, `island`).
fn temp_len(c: &Conv, plan: &Plan) -> usize {
    let ((ci, h, w), (co, oh, ow)) = (plan.shapes[c.input], plan.shapes[c.output]);
    let sub = if subsampled(c) { blocked_len(plan.n, ci, oh * ow) } else { 0 };
    let island = if may_island(c) { plan.n * (ci * h * w + 2 * co * oh * ow) } else { 0 };
    sub.max(island)
}

/// Whether a convolution is one the NCHW paths may run by Winograd (3x3 stride 1), so an island.
fn may_island(c: &Conv) -> bool {
    (c.kernel, c.stride, c.groups) == (3, 1, 1)
}

/// Whether a convolution is a 1x1 of stride 2 without padding: the blocked 1x1 kernel on its input's
/// even pixels, where the direct path would read one line per tap of a 16-channel block.
fn subsampled(c: &Conv) -> bool {
    (c.kernel, c.stride, c.pad, c.groups) == (1, 2, 0, 1)
}

/// Where a tensor of the run lives: its arena range, or its export's scratch slot.
#[derive(Clone, Debug)]
enum Loc {
    Arena(Range<usize>),
    Scratch(Range<usize>),
}

/// `out` as a mutable slice and `ins` as shared ones, from the arena and the scratch; an overlap of the
/// output with an input is an error, not aliasing.
fn views<'a, const K: usize>(
    arena: &'a mut [f32],
    scratch: &'a mut [f32],
    out: &Loc,
    ins: [&Loc; K],
) -> Result<(&'a mut [f32], [&'a [f32]; K])> {
    let (with_out, other, r) = match out {
        Loc::Arena(r) => (arena, &*scratch, r.clone()),
        Loc::Scratch(r) => (scratch, &*arena, r.clone()),
    };
    if r.end > with_out.len() {
        return Err(Error::Graph(format!("blocked run: output {r:?} past its buffer ({})", with_out.len())));
    }
    let (lo, rest) = with_out.split_at_mut(r.start);
    let (o, hi) = rest.split_at_mut(r.len());
    let (lo, hi): (&'a [f32], &'a [f32]) = (lo, hi);
    let same_buffer = |l: &Loc| matches!((l, out), (Loc::Arena(_), Loc::Arena(_)) | (Loc::Scratch(_), Loc::Scratch(_)));
    let mut res: [&'a [f32]; K] = [&[]; K];
    for (l, slot) in ins.into_iter().zip(res.iter_mut()) {
        let (Loc::Arena(q) | Loc::Scratch(q)) = l.clone();
        *slot = if !same_buffer(l) {
            other.get(q.clone()).ok_or_else(|| Error::Graph(format!("blocked run: input {q:?} past its buffer")))?
        } else if q.end <= r.start {
            &lo[q]
        } else if q.start >= r.end && q.end - r.end <= hi.len() {
            &hi[q.start - r.end..q.end - r.end]
        } else {
            return Err(Error::Graph(format!("blocked run: input {q:?} overlaps the output {r:?}")));
        };
    }
    Ok((o, res))
}

/// `set_enabled`'s choice, else `RETINAFACE_CPU_DENSE_RUN` (`0` off, else on).
static ENABLED: ModeSwitch = ModeSwitch::new("RETINAFACE_CPU_DENSE_RUN");

/// An on/off switch's setting as the `ModeSwitch` both of this module's switches are (on: `Force`).
fn mode_of(on: Option<bool>) -> Option<PathMode> {
    on.map(|on| if on { PathMode::Force } else { PathMode::Off })
}

/// Turns the dense runs on or off for the whole process (`None`: back to the environment's), so a test
/// or a benchmark can run both ways in one process.
pub fn set_enabled(on: Option<bool>) {
    ENABLED.set(mode_of(on))
}

/// Whether the dense runs are on (`set_enabled`, else `RETINAFACE_CPU_DENSE_RUN=0` turns them off; read
/// once); the blocked layout's own switch (`chain::enabled`) applies too.
pub(super) fn enabled() -> bool {
    ENABLED.get() != PathMode::Off
}

/// Output pixels above which, at AVX-512, a convolution the NCHW paths would run by Winograd runs on
/// the blocked direct path instead: on ResNet's 160² and 80² maps the direct path is within ~10% of
/// Winograd (`conv_shapes -- direct_co`: 141 against 144 GFLOPS at 160², 145 against 162 at 80²) and
/// the island's reorders of 3–6 MB tensors cost more (per op in the network, one thread: 64 channels at
/// 160² 16.1–16.8 ms on the NCHW paths, 17.7–20.8 ms as islands); on 40² Winograd's lead (184 against
/// 148) pays for them. On the Sapphire Rapids-class VM (where NCHW Winograd leads the direct path by
/// 25–30% in `conv_shapes -- direct_co` at 160² and 80²), `paired -- auto island=25600` still measured
/// ResNet-50 1.003 / 1.008 (one / two threads) and `island=6400` 0.986 / 1.009: the reorders eat the lead.
const ISLAND_MAX_PIXELS: usize = 40 * 40;

/// `set_island_max_pixels`'s value, or 0: `ISLAND_MAX_PIXELS` applies.
static ISLAND_MAX: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Overrides `ISLAND_MAX_PIXELS` for the whole process (`None`: back to it), so a benchmark can set the
/// threshold against the measured rule pass by pass (benches/paired.rs `island=PIXELS`).
pub fn set_island_max_pixels(pixels: Option<usize>) {
    ISLAND_MAX.store(pixels.map_or(0, |p| p.max(1)), std::sync::atomic::Ordering::Relaxed);
}

fn island_max_pixels() -> usize {
    match ISLAND_MAX.load(std::sync::atomic::Ordering::Relaxed) {
        0 => ISLAND_MAX_PIXELS,
        p => p,
    }
}

/// Whether a convolution of the run is better computed as an island (`island`) than on the blocked
/// direct path: where the NCHW paths would not take the direct path themselves (Winograd's 3x3 stride
/// 1), on maps up to `ISLAND_MAX_PIXELS` at AVX-512 and on any map at AVX2, where the direct path runs
/// at 58–81 GFLOPS against Winograd's 90–120 (the same benchmark under the AVX2 shim).
fn island_preferred(c: &Conv, (h, w): (usize, usize), (oh, ow): (usize, usize), level: super::isa::Isa) -> bool {
    may_island(c)
        && !conv::prefers_direct(c, h, w, level)
        && (level != super::isa::Isa::Avx512 || oh * ow <= island_max_pixels())
}

/// A convolution of the run on the NCHW paths (`conv::conv2d`, Winograd where it wins): its blocked
/// input (or the run's NCHW input) and shortcut reordered into NCHW copies in `temp`, the result back
/// into the blocked `out`. The reorders move each tensor once more through the caches, less than the
/// NCHW path saves where `island_preferred` says so.
#[allow(clippy::too_many_arguments)]
fn island(
    simd: Simd,
    c: &Conv,
    x: &[f32],
    input_blocked: bool,
    plan: &Plan,
    out: &mut [f32],
    residual: Option<&[f32]>,
    temp: &mut [f32],
) -> Result<()> {
    let n = plan.n;
    let ((ci, h, w), (co, oh, ow)) = (plan.shapes[c.input], plan.shapes[c.output]);
    let (in_len, out_len) = (n * ci * h * w, n * co * oh * ow);
    if temp.len() < in_len + 2 * out_len {
        return Err(Error::Graph(format!("blocked run: {} floats of scratch for island {}", temp.len(), c.name)));
    }
    let (x_nchw, rest) = temp.split_at_mut(in_len);
    let (o_nchw, rest) = rest.split_at_mut(out_len);
    let x_nchw: &[f32] = if input_blocked {
        blocked::from_blocked(simd, x, n, ci, h * w, x_nchw);
        x_nchw
    } else {
        x
    };
    let res_nchw = match residual {
        Some(r) => {
            let dst = &mut rest[..out_len];
            blocked::from_blocked(simd, r, n, co, oh * ow, dst);
            Some(&*dst)
        }
        None => None,
    };
    conv::conv2d(c, x_nchw, n, h, w, o_nchw, co, res_nchw);
    blocked::to_blocked(simd, o_nchw, n, co, oh * ow, out);
    Ok(())
}

/// The run's 3x3 stride-2 max-pool of tensor `input` (at `src`) into `dst`.
fn max_pool(
    simd: Simd,
    plan: &Plan,
    input: TensorId,
    arena: &mut [f32],
    scratch: &mut [f32],
    src: &Loc,
    dst: &Loc,
) -> Result<()> {
    let (c, h, w) = plan.shapes[input];
    let (o, [x]) = views(arena, scratch, dst, [src])?;
    blocked::max_pool3x3s2(simd, x, plan.n, c, (h, w), o);
    Ok(())
}

/// `set_winograd`'s choice, else `RETINAFACE_CPU_BLOCKED_WINOGRAD` (`0` off, else on).
static WINOGRAD: ModeSwitch = ModeSwitch::new("RETINAFACE_CPU_BLOCKED_WINOGRAD");

/// Turns the run's Winograd path on or off for the whole process (`None`: back to the environment's),
/// so a test or a benchmark can run both ways in one process; off, its convolutions run on the direct
/// path or as NCHW islands (`island_preferred`).
pub fn set_winograd(on: Option<bool>) {
    WINOGRAD.set(mode_of(on))
}

/// Whether a convolution of the run (not its first op, which reads NCHW) runs by Winograd in the
/// blocked layout: every one `winograd_blocked` handles, unless switched off.
/// Per op in ResNet-50 (one thread, AVX-512, Sapphire Rapids-class VM) it beat the direct path and the
/// NCHW islands on every map (64 channels at 160² 5.2–5.8 against 9.8 ms, 128 at 80² 4.8–5.2 against
/// 9.6, 256 at 40² 4.0–4.8 against 7.7 as islands, 512 at 20² 6.5–6.8 against 10.1); whole passes,
/// `paired -- bwino=off auto`: 1.126 / 1.085 (one / two threads), at AVX2 (hide_avx512.so) 1.081 /
/// 1.060.
fn winograd_preferred(c: &Conv) -> bool {
    WINOGRAD.get() != PathMode::Off && winograd_blocked::handles(c)
}

/// Blocked runs executed by this process so far, for tests that must know the path was taken.
static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many dense blocked runs this process has executed.
pub fn runs_taken() -> usize {
    RUNS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Runs `run` with the kernels of `simd` in `arena` (the plan's tensors; the first op's input in place
/// in NCHW) with `scratch` for the exports' blocked forms, writing each export's NCHW tensor; returns
/// each op's time.
pub(super) fn execute(
    simd: Simd,
    graph: &Graph,
    run: &DenseRun,
    plan: &Plan,
    arena: &mut [f32],
    scratch: &mut [f32],
) -> Result<Vec<Duration>> {
    let n = plan.n;
    // The exports' slots, from the scratch's first 64-byte boundary.
    let base = scratch.as_ptr().align_offset(64).min(15);
    let mut slots = Vec::with_capacity(run.exports.len());
    let mut at = base;
    for &t in &run.exports {
        slots.push((t, at..at + len_of(plan, t)));
        at += len_of(plan, t).next_multiple_of(16);
    }
    if at > scratch.len() {
        return Err(Error::Graph(format!("blocked run: {} floats of scratch for {at}", scratch.len())));
    }
    let (scratch, temp) = scratch.split_at_mut(at);
    let temp_at = temp.as_ptr().align_offset(64).min(15);
    let temp = &mut temp[temp_at..];
    let loc = |t: TensorId| match slots.iter().find(|(e, _)| *e == t) {
        Some((_, r)) => Loc::Scratch(r.clone()),
        None => Loc::Arena(plan.range(t)),
    };
    for k in run.ops.clone() {
        for t in outputs(&graph.ops[k]) {
            if plan.range(t).len() != len_of(plan, t) {
                return Err(Error::Graph(format!("blocked run: tensor {t} is not whole 16-channel blocks")));
            }
        }
    }
    // 1x1 stride-2 convolutions run the 1x1 kernel with the weights of their stride-1 twin.
    let packed = run.packed.get_or_init(|| {
        let pack =
            |c: &Conv| PointwiseWeights::new(&if subsampled(c) { Conv { stride: 1, ..c.clone() } } else { c.clone() });
        run.ops.clone().map(|k| convs(&graph.ops[k]).into_iter().map(pack).collect()).collect()
    });
    let level = super::isa::isa();
    RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut times = Vec::with_capacity(run.ops.len());
    for ((k, packs), wino) in run.ops.clone().zip(packed).zip(&run.winograd) {
        let start = Instant::now();
        let first = k == run.ops.start;
        match &graph.ops[k] {
            // The stem and its max-pool (the run's first op, reading the image): pooled as its rows are
            // computed where the level fuses them, else the conv into the run's slot for its output.
            Op::ConvMaxPool { conv: c, output } => {
                let (_, h, w) = plan.shapes[c.input];
                let src = if first { Loc::Arena(plan.range(c.input)) } else { loc(c.input) };
                if let Some(kernel) = conv::max_pool_kernel(c, h, w, level) {
                    let (o, [x]) = views(arena, scratch, &loc(*output), [&src])?;
                    conv::conv_max_pool_blocked(kernel, c, x, !first, n, (h, w), o);
                } else {
                    let (o, [x]) = views(arena, scratch, &loc(c.output), [&src])?;
                    conv_blocked(simd, c, x, !first, n, (h, w), o, None);
                    max_pool(simd, plan, c.output, arena, scratch, &loc(c.output), &loc(*output))?;
                }
            }
            Op::MaxPool { input, output } => max_pool(simd, plan, *input, arena, scratch, &loc(*input), &loc(*output))?,
            op => {
                for ((c, pw), wino) in convs(op).into_iter().zip(packs).zip(wino) {
                    let (_, h, w) = plan.shapes[c.input];
                    let (_, oh, ow) = plan.shapes[c.output];
                    let src = if first { Loc::Arena(plan.range(c.input)) } else { loc(c.input) };
                    let out = loc(c.output);
                    let res = c.residual.map(loc);
                    let (o, [x, r]) = views(arena, scratch, &out, [&src, res.as_ref().unwrap_or(&src)])?;
                    let r = res.is_some().then_some(r);
                    match pw {
                        Some(pw) if !first && subsampled(c) => {
                            let (ci, _, _) = plan.shapes[c.input];
                            let sub = &mut temp[..blocked_len(n, ci, oh * ow)];
                            blocked::subsample2(x, n, ci, (h, w), sub);
                            blocked::pointwise(simd, pw, sub, n, oh * ow, o, r);
                        }
                        Some(pw) if !first => blocked::pointwise(simd, pw, x, n, oh * ow, o, r),
                        _ if !first && winograd_preferred(c) => match wino.get_or_init(|| WinogradWeights::new(c)) {
                            Some(ww) => winograd_blocked::conv3x3(simd, ww, x, n, (h, w), o, r),
                            None => return Err(Error::Graph(format!("blocked run: {} is no 3x3 stride 1", c.name))),
                        },
                        _ if island_preferred(c, (h, w), (oh, ow), level) => {
                            island(simd, c, x, !first, plan, o, r, temp)?
                        }
                        _ => conv_blocked(simd, c, x, !first, n, (h, w), o, r),
                    }
                }
            }
        }
        // Exports are reordered into their NCHW tensors as soon as they are made.
        for t in outputs(&graph.ops[k]) {
            if let Some((_, r)) = slots.iter().find(|(e, _)| *e == t) {
                let (c, h, w) = plan.shapes[t];
                blocked::from_blocked(simd, &scratch[r.clone()], n, c, h * w, &mut arena[plan.range(t)]);
            }
        }
        times.push(start.elapsed());
    }
    Ok(times)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::Network;

    fn graph_of(net: Network) -> Graph {
        let built = crate::model::build(net, &mut crate::weights::synthetic::SyntheticSource { seed: 1 }).unwrap();
        crate::passes::fuse(&built, crate::passes::Fusions::CPU)
    }

    /// One run in ResNet-50, from the stem through the last block (and the FPN lateral 1x1 that reads
    /// the last tap), its exports exactly the tensors read after it (the three backbone taps among
    /// them); none in the MobileNets, whose backbones are depthwise runs.
    #[test]
    fn runs_are_the_resnet_backbones() {
        for net in [Network::ResNet18, Network::ResNet34, Network::ResNet50] {
            let graph = graph_of(net);
            let runs = find(&graph, &[]);
            assert_eq!(runs.len(), 1, "{net:?}");
            let run = &runs[0];
            assert_eq!(run.ops.start, 0, "{net:?}: the run starts at the stem");
            assert!(matches!(&graph.ops[0], Op::ConvMaxPool { .. }), "{net:?}: the stem takes its max-pool");
            let made: Vec<TensorId> = run.ops.clone().flat_map(|k| outputs(&graph.ops[k])).collect();
            for &t in &graph.taps.backbone {
                assert!(made.contains(&t) && run.exports.contains(&t), "{net:?}: tap {t} made and exported");
            }
            for &t in &made {
                let read_after = graph.ops[run.ops.end..].iter().any(|op| op.reads().contains(&t));
                assert_eq!(run.exports.contains(&t), read_after || graph.is_tap(t), "{net:?}: tensor {t}");
            }
            // The op after the run is not one it could take.
            assert!(!takes(&graph, &graph.ops[run.ops.end], &made, false), "{net:?}: the run is maximal");
        }
        for net in [Network::MobileNetV1_025, Network::MobileNetV1, Network::MobileNetV2] {
            let graph = graph_of(net);
            let taken: Vec<_> = super::super::chain::find(&graph).iter().map(|c| c.ops.clone()).collect();
            assert!(find(&graph, &taken).is_empty(), "{net:?}");
        }
    }

    /// The ResNets' stem and max-pool fused (`Op::ConvMaxPool` on the direct path: blocked in the dense
    /// run, NCHW with the run off) and as their composition (`set_pool_mode(Off)`) give the same bits:
    /// the same sums, pooled before the epilogue or after it. Odd and even map sizes.
    #[test]
    fn the_fused_stem_and_max_pool_give_the_composition_s_bits() {
        use crate::cpu::conv::{PathMode, pools_taken, set_conv_pool_mode};
        use crate::exec::Executor;
        use crate::image_io::BgrImage;
        let _switches = super::super::BLOCKED_SWITCHES.lock().unwrap_or_else(|e| e.into_inner());
        for net in [Network::ResNet18, Network::ResNet50] {
            let built = crate::model::build(net, &mut crate::weights::synthetic::SyntheticSource { seed: 5 }).unwrap();
            let ex = super::super::CpuExecutor::new(std::sync::Arc::new(built), 1 << 30);
            for ((w, h), dense) in [(83, 69), (64, 48), (1, 1)].into_iter().flat_map(|s| [(s, true), (s, false)]) {
                set_enabled(Some(dense));
                let img =
                    BgrImage::new(w, h, (0..w * h * 3).map(|k| ((k * 29 + k / 3 * 5) % 253) as u8).collect()).unwrap();
                let before = pools_taken();
                set_conv_pool_mode(Some(PathMode::Force));
                let fused = ex.forward(&[&img], None).unwrap();
                let taken = pools_taken() > before;
                set_conv_pool_mode(Some(PathMode::Off));
                let composed = ex.forward(&[&img], None).unwrap();
                set_conv_pool_mode(None);
                set_enabled(None);
                assert!(
                    taken || Simd::of(crate::cpu::isa()).is_none(),
                    "{net:?} {w}x{h} dense {dense}: the fused path was not taken"
                );
                for (what, d) in super::super::raw_differences(&fused[0], &composed[0]) {
                    assert_eq!(d, 0.0, "{net:?} {w}x{h} dense {dense} {what}: fused and composed differ by {d}");
                }
            }
        }
    }

    /// A batch of two different images through ResNet-18 and -50 with the dense run on and off:
    /// the raw outputs agree within the goldens' tolerance, image by image, and the run was taken.
    #[test]
    fn a_batch_runs_the_same_with_and_without_the_dense_run() {
        use crate::exec::Executor;
        use crate::image_io::BgrImage;
        if Simd::supported().is_empty() {
            eprintln!("no AVX2 or AVX-512 on this machine: the dense run is not taken");
            return;
        }
        let image = |seed: usize| {
            let data = (0..83 * 69 * 3).map(|k| ((k * 31 + seed * 97 + k / 3 * 7) % 251) as u8).collect();
            BgrImage::new(83, 69, data).unwrap()
        };
        let _switches = super::super::BLOCKED_SWITCHES.lock().unwrap_or_else(|e| e.into_inner());
        let (a, b) = (image(1), image(2));
        for net in [Network::ResNet18, Network::ResNet50] {
            let built = crate::model::build(net, &mut crate::weights::synthetic::SyntheticSource { seed: 3 }).unwrap();
            let ex = super::super::CpuExecutor::new(std::sync::Arc::new(built), 1 << 30);
            let (before, wino_before) = (runs_taken(), winograd_blocked::convs_taken());
            let mut outs = Vec::new();
            for on in [true, false] {
                set_enabled(Some(on));
                outs.push(ex.forward(&[&a, &b], None).unwrap());
            }
            // The run with its 3x3s on the direct path and as islands instead.
            set_enabled(Some(true));
            set_winograd(Some(false));
            outs.push(ex.forward(&[&a, &b], None).unwrap());
            set_winograd(None);
            set_enabled(None);
            if super::super::chain::enabled(crate::cpu::isa()).is_some() {
                assert!(runs_taken() > before, "{net:?}: the dense run was taken");
                assert!(winograd_blocked::convs_taken() > wino_before, "{net:?}: its Winograd path was taken");
            }
            for other in [1, 2] {
                for (img, (on, off)) in outs[0].iter().zip(&outs[other]).enumerate() {
                    for (what, d) in super::super::raw_differences(on, off) {
                        assert!(d <= 1e-4, "{net:?} image {img} {what}: blocked and way {other} differ by {d}");
                    }
                }
            }
            let d = super::super::max_abs_diff(&outs[0][0].conf, &outs[0][1].conf);
            assert!(d > 1e-3, "{net:?}: the two images give different outputs");
            // Maps that shrink to one pixel (and below the max-pool's and the downsamples' windows).
            for (w, h) in [(1, 1), (7, 5), (33, 17)] {
                let img = BgrImage::new(w, h, (0..w * h * 3).map(|k| (k * 13 % 256) as u8).collect()).unwrap();
                let mut outs = Vec::new();
                for on in [true, false] {
                    set_enabled(Some(on));
                    outs.push(ex.forward(&[&img], None).unwrap());
                }
                set_enabled(None);
                for (what, d) in super::super::raw_differences(&outs[0][0], &outs[1][0]) {
                    assert!(d <= 1e-4, "{net:?} {w}x{h} {what}: blocked and NCHW differ by {d}");
                }
            }
        }
    }
}
