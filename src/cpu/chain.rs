//! Runs of MobileNet backbone ops executed in the channel-blocked layout (`cpu::blocked`, NCHW16c) at
//! the AVX-512 and AVX2 levels: depthwise + pointwise pairs (MobileNetV1, MobileNetV2's first block), inverted
//! residuals (expansion, depthwise, projection with its shortcut) and 1×1 convolutions. The run's input
//! is reordered into the layout once (band by band, inside the first op's row buffer, when that op is a
//! depthwise + pointwise pair: the reordered map never goes to memory), every op runs on the blocked
//! kernels, and only the tensors read after the run (the backbone taps) are reordered back into the
//! plan's NCHW tensors. Where the pair reads the network's stem (MobileNetV1 x0.5 and x1.0, MobileNetV2)
//! the run starts at the stem and the pair computes the stem's rows into its ring with the direct path
//! (`FusedOp::from_stem`), so the stem's output (13 MB at 640x640 for x1.0) is neither written nor read
//! back; the profile books the stem's time to the pair. `cargo bench
//! --bench conv_shapes -- blocked` measures each blocked kernel against its NCHW path (1.1–3.6x on
//! these shapes, one thread, Ice Lake Xeon); the reorders are the price, paid once per run.
//!
//! The run's blocked activations live after the plan's tensors in the arena (`scratch`): `cur` holds
//! the op's input (and shortcut), `mid` its output, and after each op the two trade places; an op with
//! a depthwise step runs band by band (`cpu::bands`) in one slot of band buffers per thread, so its
//! expansion and depthwise output never take whole maps. Values: the same
//! operations as the NCHW paths up to summation order (the depthwise sums its taps in (ky, kx) order
//! and adds the bias after, the pointwise sums input channels in order), so the results agree with the
//! reference within the tolerances of every conv path; tests run the networks' goldens on this path
//! wherever the processor has AVX2 or AVX-512 (tests/goldens.rs: MobileNetV1 x0.25 and MobileNetV2 at
//! each level). Both levels' kernels give the same bits (`blocked::Simd`).

use super::bands::{self, FusedOp};
use super::blocked::{self, DepthwiseWeights, PointwiseWeights, Simd, blocked_len};
use crate::error::{Error, Result};
use crate::graph::{Conv, Graph, Op, Plan};
use std::ops::Range;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Ops in a run below which the reorders cost more than the blocked kernels save.
const MIN_OPS: usize = 3;
/// Depthwise channels below which a pair stays NCHW: 8 channels fill half of each 16-lane block
/// (the blocked depthwise runs x0.25's 8-channel layer at 0.63x of the NCHW kernel), and MobileNetV1
/// x0.25 runs even or a little faster starting the run at its 16-channel pair (`retinaface bench`,
/// one thread, four alternating rounds: minimum 25.7–25.9 against 25.8–27.3 ms).
const MIN_CHANNELS: usize = 16;

/// One run of ops the blocked layout computes.
pub(super) struct Chain {
    /// The ops the run executes: `graph.ops[ops]`, the stem (if any) then the blocked ops.
    pub(super) ops: Range<usize>,
    /// The ops in the blocked layout, each an op `steps` takes: `ops` without the stem.
    blocked: Range<usize>,
    /// Per blocked op: whether its output is read after the run (or is a tap), so it is written
    /// back to the plan's tensor.
    export: Vec<bool>,
    /// Per blocked op: the packed weights, made on the first run.
    packed: OnceLock<Vec<Packed>>,
}

impl Chain {
    /// The network's stem the run computes inside its first op (`stem_of`), if it does.
    fn stem<'g>(&self, graph: &'g Graph) -> Option<&'g Conv> {
        match &graph.ops[self.ops.start] {
            Op::Conv(c) if self.ops.start < self.blocked.start => Some(c),
            _ => None,
        }
    }
}

/// `set_enabled`'s choice (1 on, 2 off), or 0: `RETINAFACE_CPU_BLOCKED` applies (`0` off, else on).
static ENABLED: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Turns the blocked runs on or off for the whole process (`None`: back to the environment's), so a
/// test or a benchmark can run both ways on one machine in one process.
pub fn set_enabled(on: Option<bool>) {
    let code = match on {
        None => 0,
        Some(true) => 1,
        Some(false) => 2,
    };
    ENABLED.store(code, std::sync::atomic::Ordering::Relaxed);
}

/// The kernels the blocked runs take at `level`: its `Simd` set (AVX-512 or AVX2) unless the runs are
/// turned off (`set_enabled`, else `RETINAFACE_CPU_BLOCKED=0`, read once), so that the NCHW paths can
/// be timed against them; `None` at a level without blocked kernels.
pub(super) fn enabled(level: super::isa::Isa) -> Option<Simd> {
    static ENV: OnceLock<bool> = OnceLock::new();
    let on = match ENABLED.load(std::sync::atomic::Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => *ENV.get_or_init(|| std::env::var("RETINAFACE_CPU_BLOCKED").map_or(true, |v| v != "0")),
    };
    Simd::at(level).filter(|_| on)
}

/// The convolutions of an op the blocked kernels compute, in order: (expansion, depthwise,
/// projection) with the first two optional.
type Steps<'a> = (Option<&'a Conv>, Option<&'a Conv>, &'a Conv);

/// The tensor an op of these steps reads (and whose shape its shortcut has).
fn input_of<'a>((ex, dw, pw): Steps<'a>) -> &'a Conv {
    ex.or(dw).unwrap_or(pw)
}

/// `op`'s steps, if it is a kind a run takes.
fn steps(op: &Op) -> Option<Steps<'_>> {
    match op {
        Op::DwPw { dw, pw } => Some((None, Some(dw), pw)),
        Op::InvRes { ex, dw, pw } => Some((Some(ex), Some(dw), pw)),
        Op::Conv(c) if c.kernel == 1 => Some((None, None, c)),
        _ => None,
    }
}

/// Whether the blocked kernels compute `op`, writing whole tensors: each step a kernel's shape, the
/// only shortcut the projection's (the op's own input), from `MIN_CHANNELS` input channels.
fn blockable(graph: &Graph, op: &Op) -> bool {
    let Some(st @ (ex, dw, pw)) = steps(op) else { return false };
    let whole = |c: &Conv| c.out_channel_offset == 0 && graph.tensors[c.output].channels == c.cout;
    let input = input_of(st);
    input.cin >= MIN_CHANNELS
        && ex.is_none_or(|c| PointwiseWeights::new(c).is_some() && c.residual.is_none() && whole(c))
        && dw.is_none_or(|c| DepthwiseWeights::new(c).is_some() && c.residual.is_none() && whole(c))
        && PointwiseWeights::new(pw).is_some()
        && pw.residual.is_none_or(|r| r == input.input)
        && whole(pw)
}

/// The maximal runs of at least `MIN_OPS` consecutive blockable ops, each reading the previous one's
/// output.
pub(super) fn find(graph: &Graph) -> Vec<Chain> {
    let mut chains = Vec::new();
    let mut i = 0;
    while i < graph.ops.len() {
        if !blockable(graph, &graph.ops[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i + 1 < graph.ops.len()
            && blockable(graph, &graph.ops[i + 1])
            && graph.ops[i + 1].reads().first() == Some(&graph.ops[i].output())
        {
            i += 1;
        }
        let ops = start..i + 1;
        i += 1;
        if ops.len() < MIN_OPS {
            continue;
        }
        let export = ops
            .clone()
            .map(|k| {
                let t = graph.ops[k].output();
                k + 1 == ops.end
                    || graph.is_tap(t)
                    || graph.ops.iter().enumerate().any(|(j, op)| !ops.contains(&j) && op.reads().contains(&t))
            })
            .collect();
        let first = if stem_of(graph, ops.start) { ops.start - 1 } else { ops.start };
        chains.push(Chain { ops: first..ops.end, blocked: ops, export, packed: OnceLock::new() });
    }
    chains
}

/// Whether the op before op `k` (a run's first) is a stem the run computes inside op k: a dense
/// convolution (groups 1, no shortcut, whole output) whose output only op k reads, op k a depthwise
/// step of its channels and a projection without a shortcut (`FusedOp::from_stem`: the stem's rows
/// are computed into the pair's ring, band by band, and its output never goes to memory).
fn stem_of(graph: &Graph, k: usize) -> bool {
    let (Some(Op::Conv(c)), Some(Op::DwPw { dw, pw })) = (k.checked_sub(1).map(|j| &graph.ops[j]), graph.ops.get(k))
    else {
        return false;
    };
    let read_elsewhere = graph.ops.iter().enumerate().any(|(j, op)| j != k && op.reads().contains(&c.output));
    c.groups == 1
        && c.residual.is_none()
        && c.out_channel_offset == 0
        && graph.tensors[c.output].channels == c.cout
        && dw.input == c.output
        && dw.cin == c.cout
        && pw.residual.is_none()
        && !graph.is_tap(c.output)
        && !read_elsewhere
}

/// The steps of op `k` (only called on ops `find` accepted).
fn steps_of(graph: &Graph, k: usize) -> Result<Steps<'_>> {
    steps(&graph.ops[k]).ok_or_else(|| Error::Graph(format!("blocked run: op {k} is not a kind the run takes")))
}

/// One op's packed weights.
struct Packed {
    ex: Option<PointwiseWeights>,
    dw: Option<DepthwiseWeights>,
    pw: PointwiseWeights,
}

impl Packed {
    fn new((ex, dw, pw): Steps) -> Option<Packed> {
        Some(Packed {
            ex: match ex {
                Some(c) => Some(PointwiseWeights::new(c)?),
                None => None,
            },
            dw: match dw {
                Some(c) => Some(DepthwiseWeights::new(c)?),
                None => None,
            },
            pw: PointwiseWeights::new(pw)?,
        })
    }
}

/// Blocked runs executed by this process so far, for tests that must know the path was taken.
static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many blocked runs this process has executed.
pub fn runs_taken() -> usize {
    RUNS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether op `k` of `chain` (of these steps) reads the run's input in NCHW: the first blocked op when
/// it is a depthwise step and its projection with no shortcut (`FusedOp::from_nchw` reorders its input
/// band by band, `FusedOp::from_stem` computes it from the stem's); any other first op reads the
/// input reordered whole.
fn reads_nchw(chain: &Chain, k: usize, steps: Steps) -> bool {
    k == chain.blocked.start && matches!(steps, (None, Some(_), pw) if pw.residual.is_none())
}

/// The plan's sizes of the run: the longest blocked input or output of an op (`cur` and `mid`), and
/// the floats of one slot's band buffers.
fn buffer_lens(graph: &Graph, chain: &Chain, plan: &Plan) -> (usize, usize) {
    let blen = |t: usize| {
        let (c, h, w) = plan.shapes[t];
        blocked_len(plan.n, c, h * w)
    };
    let (mut big, mut slot) = (0, 0);
    for k in chain.blocked.clone() {
        if let Ok(st @ (ex, dw, pw)) = steps_of(graph, k) {
            big = big.max(blen(input_of(st).input)).max(blen(pw.output));
            if let Some(dw) = dw {
                let (_, h, w) = plan.shapes[dw.input];
                let ring = ex.is_some() || reads_nchw(chain, k, st);
                slot = slot.max(bands::slot_floats(dw.cin, dw.stride, ring, (h, w)));
            }
        }
    }
    (big, slot)
}

/// Floats of blocked scratch for buffers of these lengths (`cur` and `mid`, one slot's) with `slots`
/// slots, each buffer from a 64-byte boundary.
fn scratch_for((big, slot): (usize, usize), slots: usize) -> usize {
    2 * big + slots * slot + 48
}

/// Floats of blocked scratch `chain` needs in `plan`: a slot of band buffers per thread of the pool.
pub(super) fn scratch_elems(graph: &Graph, chain: &Chain, plan: &Plan) -> usize {
    scratch_for(buffer_lens(graph, chain, plan), rayon::current_num_threads())
}

/// `len` floats of `buf` from a 64-byte boundary, and the rest after them.
fn take_aligned(buf: &mut [f32], len: usize) -> (&mut [f32], &mut [f32]) {
    let at = buf.as_ptr().align_offset(64).min(16);
    buf[at..].split_at_mut(len)
}

/// Runs `chain` with the kernels of `simd` (the plan's input tensor of its first op in place in
/// `arena`) with `scratch` for the blocked buffers, writing back the tensors read after it; returns
/// each op's time.
pub(super) fn run(
    simd: Simd,
    graph: &Graph,
    chain: &Chain,
    plan: &Plan,
    arena: &mut [f32],
    scratch: &mut [f32],
) -> Result<Vec<Duration>> {
    let (big, slot) = buffer_lens(graph, chain, plan);
    // As many slots as the pool has threads, or as the scratch (sized when the plan was made) holds.
    let slots =
        rayon::current_num_threads().min(scratch.len().saturating_sub(scratch_for((big, slot), 0)) / slot.max(1));
    if slots == 0 {
        return Err(Error::Graph(format!(
            "blocked run: {} floats of scratch for {}",
            scratch.len(),
            scratch_for((big, slot), 1)
        )));
    }
    let packed = chain.packed.get_or_init(|| {
        chain.blocked.clone().filter_map(|k| steps_of(graph, k).ok()).filter_map(Packed::new).collect()
    });
    if packed.len() != chain.blocked.len() {
        return Err(Error::Graph("blocked run: an op's weights could not be packed".into()));
    }
    let n = plan.n;
    let (mut cur, rest) = take_aligned(scratch, big);
    let (mut mid, rest) = take_aligned(rest, big);
    let (band_bufs, _) = take_aligned(rest, slots * slot);
    let dims = |t: usize| {
        let (c, h, w) = plan.shapes[t];
        (c, h, w, blocked_len(n, c, h * w))
    };
    RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut times = Vec::with_capacity(chain.ops.len());
    let stem = chain.stem(graph);
    if stem.is_some() {
        // The stem's time is booked to the op that computes its rows.
        times.push(Duration::ZERO);
    }
    let t0 = Instant::now();
    let first_steps = steps_of(graph, chain.blocked.start)?;
    // The tensor the run reads: the stem's input, else its first blocked op's.
    let first = stem.map_or(input_of(first_steps).input, |c| c.input);
    let first_reads_nchw = reads_nchw(chain, chain.blocked.start, first_steps);
    if !first_reads_nchw {
        let (c0, h0, w0, len0) = dims(first);
        blocked::to_blocked(simd, &arena[plan.range(first)], n, c0, h0 * w0, &mut cur[..len0]);
    }
    let mut reorder = t0.elapsed();
    for ((k, p), &export) in chain.blocked.clone().zip(packed).zip(&chain.export) {
        let start = Instant::now();
        let st @ (ex, dw, pw) = steps_of(graph, k)?;
        let (ic, ih, iw, in_len) = dims(input_of(st).input);
        let (oc, oh, ow, out_len) = dims(pw.output);
        let nchw = first_reads_nchw && k == chain.blocked.start;
        let (src, out) =
            if nchw { (&arena[plan.range(first)], &mut mid[..out_len]) } else { (&cur[..in_len], &mut mid[..out_len]) };
        match (dw.zip(p.dw.as_ref()), ex.is_some() == p.ex.is_some()) {
            (Some((_, dww)), true) => {
                let (op, want_in) = match (nchw, stem) {
                    (true, Some(c)) => {
                        let (sc, sh, sw) = plan.shapes[c.input];
                        let op = FusedOp::from_stem(simd, c, dww, &p.pw, n, (sh, sw)).ok_or_else(|| {
                            Error::Graph(format!("blocked run: the stem {} does not run on the direct path", c.name))
                        })?;
                        (op, (sc, sh, sw))
                    }
                    (true, None) => (FusedOp::from_nchw(dww, &p.pw, n, (ih, iw)), (ic, ih, iw)),
                    (false, _) => (FusedOp::new(p.ex.as_ref(), dww, &p.pw, n, (ih, iw)), (ic, ih, iw)),
                };
                if op.input != want_in || op.output != (oc, oh, ow) || op.slot_floats() > slot {
                    return Err(Error::Graph(format!("blocked run: op {k}'s packed weights do not fit its maps")));
                }
                op.run(simd, src, out, pw.residual.is_some(), &mut band_bufs[..slots * slot], slot);
            }
            (None, true) if ex.is_none() => {
                // A 1x1 convolution: the whole map at once, its shortcut (if any) the op's input.
                blocked::pointwise(simd, &p.pw, src, n, oh * ow, out, pw.residual.map(|_| src));
            }
            _ => return Err(Error::Graph(format!("blocked run: op {k}'s steps and packed weights differ"))),
        }
        std::mem::swap(&mut cur, &mut mid);
        if export {
            blocked::from_blocked(simd, &cur[..out_len], n, oc, oh * ow, &mut arena[plan.range(pw.output)]);
        }
        // The reorder into the layout is booked to the run's first op.
        times.push(start.elapsed() + std::mem::take(&mut reorder));
    }
    Ok(times)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::Network;

    /// One run per MobileNet: every backbone op from 16 channels on (MobileNetV1's depthwise +
    /// pointwise pairs; MobileNetV2's first pair, its inverted residuals and its last 1x1) and the FPN
    /// lateral 1x1 that reads the last tap, written back exactly where a later op reads the output or
    /// it is a tap, with the stem computed inside the first pair where the pair reads it (not x0.25,
    /// whose run starts after its 8-channel pair); the ResNets have none.
    #[test]
    fn runs_are_the_mobilenet_backbones() {
        let graph_of = |net| {
            let built = crate::model::build(net, &mut crate::weights::synthetic::SyntheticSource { seed: 1 }).unwrap();
            crate::passes::fuse(&built, crate::passes::Fusions::CPU)
        };
        // (network, blocked ops in the run, whether the run computes the stem)
        for (net, want_ops, want_stem) in [
            (Network::MobileNetV1_025, 13, false),
            (Network::MobileNetV1_050, 14, true),
            (Network::MobileNetV1, 14, true),
            (Network::MobileNetV2, 19, true),
        ] {
            let graph = graph_of(net);
            let chains = find(&graph);
            assert_eq!(chains.len(), 1, "{net:?}");
            let ch = &chains[0];
            println!("{net:?}: ops {:?}: {:?}", ch.ops, ch.ops.clone().map(|k| graph.op_stages[k]).collect::<Vec<_>>());
            assert_eq!(ch.blocked.len(), want_ops, "{net:?}");
            assert_eq!(ch.blocked.end, ch.ops.end, "{net:?}");
            match ch.stem(&graph) {
                Some(c) => {
                    assert!(want_stem, "{net:?}: no stem expected");
                    assert_eq!((ch.ops.start + 1, c.input), (ch.blocked.start, graph.input), "{net:?}: the stem");
                }
                None => assert!(!want_stem && ch.ops == ch.blocked, "{net:?}: the stem is in the run"),
            }
            for (k, &export) in ch.blocked.clone().zip(&ch.export) {
                let t = graph.ops[k].output();
                let read_later = graph.ops[ch.ops.end..].iter().any(|op| op.reads().contains(&t));
                assert_eq!(export, graph.is_tap(t) || read_later || k + 1 == ch.ops.end, "{net:?} op {k}");
                assert!(blockable(&graph, &graph.ops[k]), "{net:?} op {k}");
            }
            // The three backbone taps are inside the run and written back.
            let taps = ch.blocked.clone().filter(|&k| graph.taps.backbone.contains(&graph.ops[k].output())).count();
            assert_eq!(taps, 3, "{net:?}: the three backbone taps");
        }
        for net in [Network::ResNet18, Network::ResNet34, Network::ResNet50] {
            assert!(find(&graph_of(net)).is_empty(), "{net:?}");
        }
    }

    /// A batch of two different images through MobileNetV2 (inverted residuals with shortcuts, a
    /// stride-2 depthwise, padded 24-channel blocks, the taps written back) and MobileNetV1 x0.25 with
    /// the blocked run on and off: the raw outputs agree within the goldens' tolerance, image by image.
    #[test]
    fn a_batch_runs_the_same_with_and_without_the_blocked_run() {
        use crate::exec::Executor;
        use crate::image_io::BgrImage;
        if Simd::supported().is_empty() {
            eprintln!("no AVX2 or AVX-512 on this machine: the blocked run is not taken");
            return;
        }
        let image = |seed: usize| {
            let data = (0..97 * 75 * 3).map(|k| ((k * 37 + seed * 101 + k / 3 * 11) % 251) as u8).collect();
            BgrImage::new(97, 75, data).unwrap()
        };
        let _switches = super::super::BLOCKED_SWITCHES.lock().unwrap_or_else(|e| e.into_inner());
        let (a, b) = (image(1), image(2));
        for net in [Network::MobileNetV2, Network::MobileNetV1_025] {
            let built = crate::model::build(net, &mut crate::weights::synthetic::SyntheticSource { seed: 3 }).unwrap();
            let ex = super::super::CpuExecutor::new(std::sync::Arc::new(built), 1 << 30);
            let before = runs_taken();
            let mut outs = Vec::new();
            for on in [true, false] {
                set_enabled(Some(on));
                outs.push(ex.forward(&[&a, &b], None).unwrap());
            }
            set_enabled(None);
            // The run must have been taken at least once where this process's level has blocked
            // kernels (AVX-512 or AVX2).
            if enabled(crate::cpu::isa()).is_some() {
                assert!(runs_taken() > before, "{net:?}: the blocked run was taken");
            }
            for (img, (on, off)) in outs[0].iter().zip(&outs[1]).enumerate() {
                for (what, d) in super::super::raw_differences(on, off) {
                    assert!(d <= 1e-4, "{net:?} image {img} {what}: blocked and NCHW differ by {d}");
                }
            }
            let d = super::super::max_abs_diff(&outs[0][0].conf, &outs[0][1].conf);
            assert!(d > 1e-3, "{net:?}: the two images give different outputs");
        }
    }
}
