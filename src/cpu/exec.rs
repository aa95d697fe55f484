//! The CPU executor: runs a graph's ops over one arena per plan ([`crate::graph::plan`]). Arenas are
//! cached with their plans in a cache bounded in bytes, so a steady stream of frames neither allocates
//! nor faults in fresh pages, and a stream of many sizes holds at most the budget.

use super::{chain, conv, dense_run, ops};
use crate::error::{Error, Result};
use crate::exec::{Activations, Executor, Timings, check_batch};
use crate::graph::{Conv, Graph, Op, Plan, PlanBuffers, PlanCache, PlanKey, Stage, TensorId};
use crate::image_io::BgrImage;
use crate::post::{RawOutput, anchors};
use crate::reference;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A plan's f32 arena; `None` while a pass has it out.
struct Arena {
    data: Option<Vec<f32>>,
    bytes: usize,
}

impl PlanBuffers for Arena {
    fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Floats an arena holds beyond its plan's and scratch's, so that it can start on a 64-byte boundary.
const ALIGN_SLACK: usize = 16;

/// The arena within its allocation from the first 64-byte boundary: the plan's offsets are multiples of
/// 64 floats, so every tensor starts on a cache line, and the blocked kernels' 16-float vectors never
/// straddle two (a large allocation starts 16 bytes into its pages).
fn aligned_arena(data: &mut [f32]) -> &mut [f32] {
    let at = data.as_ptr().align_offset(64).min(ALIGN_SLACK - 1);
    &mut data[at..]
}

/// CPU passes running now, in any executor of this process.
static ACTIVE_PASSES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Keeps the pool's other workers awake for the length of a pass: each runs a task that takes the
/// pass's work as it appears (`rayon::yield_now`) instead of going to sleep between and inside ops,
/// where every wake of a sleeping worker costs (on a 2-vCPU VM a ResNet-50 pass kept its two threads
/// 81% busy, with ~140 voluntary context switches a pass). Only while the pass is the process's only
/// one: a spinner inside another pass's wait would hold that pass until its own ends, so two passes
/// could hold each other. `RETINAFACE_KEEP_AWAKE=0` turns it off.
struct KeepAwake {
    running: Arc<std::sync::atomic::AtomicBool>,
}

impl KeepAwake {
    /// Registers a pass (until the guard drops) and wakes the pool's other workers for it.
    fn start() -> KeepAwake {
        use std::sync::atomic::Ordering::{Relaxed, SeqCst};
        let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let alone = ACTIVE_PASSES.fetch_add(1, SeqCst) == 0;
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let on = *ON.get_or_init(|| std::env::var_os("RETINAFACE_KEEP_AWAKE").is_none_or(|v| v != "0"));
        if let (true, true, Some(me)) = (on, alone, rayon::current_thread_index()) {
            for _ in 1..rayon::current_num_threads() {
                let running = running.clone();
                rayon::spawn(move || {
                    // Never on the pass's own worker (it would spin on a flag only it clears), and
                    // only while the pass is alone.
                    while rayon::current_thread_index() != Some(me)
                        && running.load(Relaxed)
                        && ACTIVE_PASSES.load(SeqCst) == 1
                    {
                        if rayon::yield_now() != Some(rayon::Yield::Executed) {
                            std::hint::spin_loop();
                        }
                    }
                });
            }
        }
        KeepAwake { running }
    }
}

impl Drop for KeepAwake {
    fn drop(&mut self) {
        self.running.store(false, std::sync::atomic::Ordering::Relaxed);
        ACTIVE_PASSES.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The CPU executor: the graph and the cached plans with their arenas.
pub struct CpuExecutor {
    graph: Arc<Graph>,
    plans: Mutex<PlanCache<Arena>>,
    /// The runs of ops the blocked layout computes at the AVX-512 and AVX2 levels.
    runs: BlockedRuns,
}

/// The runs of a graph's ops the blocked layout computes: depthwise runs (`chain`) and dense runs
/// (`dense_run`), never overlapping.
#[derive(Default)]
struct BlockedRuns {
    chains: Vec<chain::Chain>,
    dense: Vec<dense_run::DenseRun>,
}

impl CpuExecutor {
    /// The executor of `graph` with the CPU's fusions applied (each fused op runs as its composition).
    pub fn new(graph: Arc<Graph>, plan_cache_bytes: usize) -> CpuExecutor {
        let graph = Arc::new(crate::passes::fuse(&graph, crate::passes::Fusions::CPU));
        // Only a processor with AVX2 or AVX-512 can run them (the level may still be forced lower per pass).
        let runs = if super::blocked::Simd::supported().is_empty() {
            BlockedRuns::default()
        } else {
            let chains = chain::find(&graph);
            let taken: Vec<_> = chains.iter().map(|c| c.ops.clone()).collect();
            BlockedRuns { dense: dense_run::find(&graph, &taken), chains }
        };
        CpuExecutor { graph, plans: Mutex::new(PlanCache::new(plan_cache_bytes)), runs }
    }

    /// Floats an arena of `plan` holds after the plan's tensors: the blocked runs' scratch.
    fn scratch_elems(&self, plan: &Plan) -> usize {
        let chains = self.runs.chains.iter().map(|c| chain::scratch_elems(&self.graph, c, plan));
        chains.chain(self.runs.dense.iter().map(|r| dense_run::scratch_elems(&self.graph, r, plan))).max().unwrap_or(0)
    }

    /// The cache entry of a new plan: no arena yet, and the bytes its arena (scratch included) will take.
    fn entry(&self, plan: &Plan) -> Arena {
        Arena { data: None, bytes: plan.arena_bytes() + 4 * (ALIGN_SLACK + self.scratch_elems(plan)) }
    }

    fn cache(&self) -> Result<std::sync::MutexGuard<'_, PlanCache<Arena>>> {
        self.plans.lock().map_err(|_| Error::InvalidArgument("a previous CPU pass panicked".into()))
    }

    /// The plan of `key` and its arena (a fresh one when a concurrent pass has the cached one out).
    fn checkout(&self, key: PlanKey) -> Result<(Arc<Plan>, Vec<f32>)> {
        let mut cache = self.cache()?;
        // Evicted arenas are dropped: freed to the allocator.
        let alloc = |p: &Plan, _evicted| Ok(self.entry(p));
        let (plan, arena) = cache.get(&self.graph, key, alloc)?;
        let data =
            arena.data.take().unwrap_or_else(|| vec![0.0; ALIGN_SLACK + plan.arena_elems + self.scratch_elems(&plan)]);
        Ok((plan, data))
    }

    /// Gives an arena back to its plan's entry if that is still cached and empty; drops it otherwise.
    fn checkin(&self, key: PlanKey, data: Vec<f32>) {
        if let Ok(mut cache) = self.cache()
            && let Some(slot) = cache.buffers(key)
            && slot.data.is_none()
        {
            slot.data = Some(data);
        }
    }

    /// One pass: preprocessing and every op in the arena, then the raw outputs (and the taps, copied
    /// out, when `tensors` is asked for).
    fn pass(
        &self,
        images: &[&BgrImage],
        keep_all: bool,
        want_tensors: bool,
        timings: Option<&mut Timings>,
    ) -> Result<Activations> {
        let (h, w) = check_batch(images)?;
        let n = images.len();
        let key = (n, h, w, keep_all);
        let (plan, mut data) = self.checkout(key)?;
        let arena = aligned_arena(&mut data);
        // The whole pass on one of the pool's threads: every op's parallel loop then splits from a
        // worker (its tasks go on that worker's queue) instead of being injected from outside and waited
        // for on a futex, a hand-off per loop that cost 3–4% of a one-thread pass.
        let (pre, st) = rayon::scope(|_| {
            let t0 = Instant::now();
            let input = &mut arena[plan.range(self.graph.input)];
            for (img, dst) in images.iter().zip(input.chunks_mut(3 * h * w)) {
                ops::preprocess(&img.data, h, w, dst);
            }
            let pre = t0.elapsed();
            let _awake = KeepAwake::start();
            (pre, run(&self.graph, &plan, arena, &self.runs))
        });
        let raw = if st.is_ok() { raw_outputs(&self.graph, &plan, arena) } else { Vec::new() };
        let tensors = match (&st, want_tensors) {
            (Ok(_), true) => (0..self.graph.tensors.len())
                .map(|t| (keep_all || self.graph.is_tap(t)).then(|| arena[plan.range(t)].to_vec()))
                .collect(),
            _ => Vec::new(),
        };
        self.checkin(key, data);
        let st = st?;
        if let Some(t) = timings {
            t.preprocess += pre;
            t.backbone += st.backbone;
            t.neck += st.neck;
            t.heads += st.heads;
        }
        Ok(Activations { n, input_h: h, input_w: w, tensors, raw })
    }

    /// The plan this executor runs an n×3×h×w batch with (computed and cached on first use).
    pub fn plan(&self, n: usize, h: usize, w: usize) -> Result<Arc<Plan>> {
        let key = (n, h, w, false);
        let mut cache = self.cache()?;
        let alloc = |p: &Plan, _evicted| Ok(self.entry(p));
        Ok(cache.get(&self.graph, key, alloc)?.0)
    }
}

impl Executor for CpuExecutor {
    fn describe(&self) -> String {
        super::isa::describe()
    }

    fn run(&self, images: &[&BgrImage], keep_all: bool, timings: Option<&mut Timings>) -> Result<Activations> {
        self.pass(images, keep_all, true, timings)
    }

    fn forward(&self, images: &[&BgrImage], timings: Option<&mut Timings>) -> Result<Vec<RawOutput>> {
        Ok(self.pass(images, false, false, timings)?.raw)
    }

    fn plan(&self, n: usize, h: usize, w: usize) -> Result<Arc<Plan>> {
        CpuExecutor::plan(self, n, h, w)
    }

    fn held_bytes(&self) -> usize {
        self.cache().map(|c| c.held_bytes()).unwrap_or(0)
    }

    fn set_plan_cache_bytes(&self, bytes: usize) -> Result<()> {
        drop(self.cache()?.set_budget(bytes));
        Ok(())
    }

    fn release_plans(&self) -> Result<()> {
        drop(self.cache()?.clear());
        Ok(())
    }
}

/// The raw head outputs of each image in the goldens' layout, from the head taps.
fn raw_outputs(graph: &Graph, plan: &Plan, arena: &[f32]) -> Vec<RawOutput> {
    let (n, h, w) = (plan.n, plan.h, plan.w);
    let a = anchors::num_anchors(h, w);
    (0..n)
        .map(|b| {
            let mut raw =
                RawOutput { h, w, loc: vec![0.0; a * 4], conf: vec![0.0; a * 2], landmarks: vec![0.0; a * 10] };
            let mut base = 0;
            for t in graph.taps.head {
                let (c, th, tw) = plan.shapes[t];
                let per_image = c * th * tw;
                let head = &arena[plan.range(t)][b * per_image..(b + 1) * per_image];
                let n = 2 * th * tw;
                reference::heads_to_anchors(
                    head,
                    th,
                    tw,
                    &mut raw.loc[base * 4..(base + n) * 4],
                    &mut raw.conf[base * 2..(base + n) * 2],
                    &mut raw.landmarks[base * 10..(base + n) * 10],
                );
                base += n;
            }
            raw
        })
        .collect()
}

/// The output of an op as a mutable slice and its inputs as shared ones, all in one arena. The plan
/// never overlaps an op's output with its inputs; a violation is an error, not aliasing.
fn views<'a, const K: usize>(
    arena: &'a mut [f32],
    out: Range<usize>,
    ins: [Range<usize>; K],
) -> Result<(&'a mut [f32], [&'a [f32]; K])> {
    let (lo, rest) = arena.split_at_mut(out.start);
    let (o, hi) = rest.split_at_mut(out.len());
    let (lo, hi): (&'a [f32], &'a [f32]) = (lo, hi);
    let mut res: [&'a [f32]; K] = [&[]; K];
    for (r, slot) in ins.into_iter().zip(res.iter_mut()) {
        *slot = if r.end <= out.start {
            &lo[r]
        } else if r.start >= out.end {
            &hi[r.start - out.end..r.end - out.end]
        } else {
            return Err(Error::Graph(format!("plan overlaps an op's input {r:?} with its output {out:?}")));
        };
    }
    Ok((o, res))
}

/// An op's output view, its input view and its residual view, if any.
type ConvViews<'a> = (&'a mut [f32], &'a [f32], Option<&'a [f32]>);

/// The views of an op that reads `input` (and `residual`, if any) and writes `output`.
fn conv_views<'a>(
    arena: &'a mut [f32],
    plan: &Plan,
    input: TensorId,
    output: TensorId,
    residual: Option<TensorId>,
) -> Result<ConvViews<'a>> {
    let out = plan.range(output);
    match residual {
        Some(r) => {
            let (o, [x, res]) = views(arena, out, [plan.range(input), plan.range(r)])?;
            Ok((o, x, Some(res)))
        }
        None => {
            let (o, [x]) = views(arena, out, [plan.range(input)])?;
            Ok((o, x, None))
        }
    }
}

/// Two output views and one input view of `arena`, all disjoint (an overlap is an error, as in `views`).
fn pair_views<'a>(
    arena: &'a mut [f32],
    out_a: Range<usize>,
    out_b: Range<usize>,
    input: Range<usize>,
) -> Result<(&'a mut [f32], &'a mut [f32], &'a [f32])> {
    let mut ranges = [(out_a.clone(), 0), (out_b.clone(), 1), (input.clone(), 2)];
    ranges.sort_by_key(|(r, _)| r.start);
    if ranges.windows(2).any(|p| p[0].0.end > p[1].0.start) || ranges[2].0.end > arena.len() {
        return Err(Error::Graph(format!(
            "plan overlaps a conv pair's outputs {out_a:?}, {out_b:?} and input {input:?} (arena {})",
            arena.len()
        )));
    }
    let mut slots: [Option<&'a mut [f32]>; 3] = [None, None, None];
    let (mut rest, mut base) = (arena, 0);
    for (r, slot) in ranges {
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(r.start - base);
        let (piece, tail) = tail.split_at_mut(r.len());
        slots[slot] = Some(piece);
        (rest, base) = (tail, r.end);
    }
    match slots {
        [Some(a), Some(b), Some(x)] => Ok((a, b, x)),
        _ => Err(Error::Graph("conv pair views: a range was not assigned".into())),
    }
}

/// A conv pair: one GEMM over both weight sets (`conv::conv2d_pair`); both outputs are tensors of the
/// plan either way.
fn pair_op(a: &Conv, b: &Conv, plan: &Plan, arena: &mut [f32]) -> Result<()> {
    let (_, ih, iw) = plan.shapes[a.input];
    let ((oc_a, _, _), (oc_b, _, _)) = (plan.shapes[a.output], plan.shapes[b.output]);
    let (o_a, o_b, x) = pair_views(arena, plan.range(a.output), plan.range(b.output), plan.range(a.input))?;
    conv::conv2d_pair(a, b, x, plan.n, ih, iw, o_a, oc_a, o_b, oc_b);
    Ok(())
}

/// One conv of `plan` in `arena` (the reference `ops::conv2d`).
fn conv_op(c: &Conv, plan: &Plan, arena: &mut [f32]) -> Result<()> {
    let (_, ih, iw) = plan.shapes[c.input];
    let (oc, _, _) = plan.shapes[c.output];
    let (o, x, res) = conv_views(arena, plan, c.input, c.output, c.residual)?;
    conv::conv2d(c, x, plan.n, ih, iw, o, oc, res);
    Ok(())
}

/// The 3×3 stride-2 max-pool of `input` into `output`.
fn max_pool_op(input: TensorId, output: TensorId, plan: &Plan, arena: &mut [f32]) -> Result<()> {
    let (ic, ih, iw) = plan.shapes[input];
    let (o, [x]) = views(arena, plan.range(output), [plan.range(input)])?;
    ops::max_pool_3x3s2(x, plan.n * ic, ih, iw, o);
    Ok(())
}

/// A conv and the max-pool of its output: fused on the direct path where the level has it there (the
/// conv's output never written), the composition otherwise, and where the plan keeps every tensor.
fn conv_max_pool_op(c: &Conv, output: TensorId, plan: &Plan, arena: &mut [f32]) -> Result<()> {
    let (_, ih, iw) = plan.shapes[c.input];
    let kernel = conv::max_pool_kernel(c, ih, iw, super::isa::isa()).filter(|_| !plan.keep_all);
    let Some(kernel) = kernel else {
        conv_op(c, plan, arena)?;
        return max_pool_op(c.output, output, plan, arena);
    };
    let (o, [x]) = views(arena, plan.range(output), [plan.range(c.input)])?;
    conv::conv_max_pool(kernel, c, x, plan.n, ih, iw, o);
    Ok(())
}

/// A depthwise + pointwise pair: fused per row band where the level has a kernel for it and that is the
/// faster way, so the depthwise output never leaves the cache; the composition otherwise, and where the
/// plan keeps every tensor (the depthwise output is then one the caller asked for).
fn dwpw_op(dw: &Conv, pw: &Conv, plan: &Plan, arena: &mut [f32]) -> Result<()> {
    let level = super::isa::isa();
    let (_, ih, iw) = plan.shapes[dw.input];
    if plan.keep_all || !conv::dwpw::fuses(dw, pw, level) || !conv::dwpw::preferred(dw, pw, ih, iw, level) {
        conv_op(dw, plan, arena)?;
        return conv_op(pw, plan, arena);
    }
    let (oc, _, _) = plan.shapes[pw.output];
    let (o, x, res) = conv_views(arena, plan, dw.input, pw.output, pw.residual)?;
    conv::dwpw::conv(level, dw, pw, x, plan.n, ih, iw, o, oc, res);
    Ok(())
}

/// An inverted residual: expansion, depthwise and projection fused per row band where the level has a
/// kernel for it and that is the faster way, so neither the expanded nor the depthwise tensor leaves the
/// cache; else the expansion, then the depthwise + pointwise pair as `dwpw_op` runs it.
fn invres_op(ex: &Conv, dw: &Conv, pw: &Conv, plan: &Plan, arena: &mut [f32]) -> Result<()> {
    let level = super::isa::isa();
    let (_, ih, iw) = plan.shapes[ex.input];
    let fused = conv::dwpw::fuses_invres(ex, dw, pw, level) && conv::dwpw::preferred_invres(ex);
    if plan.keep_all || !fused {
        conv_op(ex, plan, arena)?;
        return dwpw_op(dw, pw, plan, arena);
    }
    let (oc, _, _) = plan.shapes[pw.output];
    let (o, x, res) = conv_views(arena, plan, ex.input, pw.output, pw.residual)?;
    conv::dwpw::invres(level, ex, dw, pw, x, plan.n, ih, iw, o, oc, res);
    Ok(())
}

/// `dst += nearest(src)` of `plan` in `arena`.
fn upsample_add_op(src: TensorId, dst: TensorId, plan: &Plan, arena: &mut [f32]) -> Result<()> {
    let (_, sh, sw) = plan.shapes[src];
    let (_, dh, dw) = plan.shapes[dst];
    let (d, [s]) = views(arena, plan.range(dst), [plan.range(src)])?;
    ops::upsample_nearest_add(s, sh, sw, d, dh, dw);
    Ok(())
}

/// Runs every op of `graph` in `arena` laid out by `plan` (the input already in place), as a pass
/// does: for tests that run a fused op's CPU composition on a graph of their own.
pub fn run_ops(graph: &Graph, plan: &Plan, arena: &mut [f32]) -> Result<()> {
    if arena.len() < plan.arena_elems || plan.shapes.len() != graph.tensors.len() {
        return Err(Error::InvalidArgument(format!(
            "an arena of {} elements for a plan of {} ({} tensors) over a graph of {} tensors",
            arena.len(),
            plan.arena_elems,
            plan.shapes.len(),
            graph.tensors.len()
        )));
    }
    run(graph, plan, arena, &BlockedRuns::default()).map(|_| ())
}

/// CPU time of the whole process so far (every thread), for `RETINAFACE_PROFILE=cpu`.
fn process_cpu_seconds() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given; the clock id is a constant the kernel knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// An op as `RETINAFACE_PROFILE` lists it.
fn describe(op: &Op) -> String {
    match op {
        Op::Conv(c) => {
            format!("conv {} {}x{} s{} g{} {}->{}", c.name, c.kernel, c.kernel, c.stride, c.groups, c.cin, c.cout)
        }
        Op::Heads { conv: c, level } => format!("heads {level} {} {}->{}", c.name, c.cin, c.cout),
        Op::MaxPool { .. } => "maxpool".to_string(),
        Op::ConvMaxPool { conv: c, .. } => {
            format!("conv+maxpool {} {}x{} s{} {}->{}", c.name, c.kernel, c.kernel, c.stride, c.cin, c.cout)
        }
        Op::UpsampleAdd { .. } => "upsample+add".to_string(),
        Op::ConvUpsampleAdd { conv: c, .. } => format!("conv+upsample-add {} {}->{}", c.name, c.cin, c.cout),
        Op::ConvPair { a, b } => format!("conv pair {} + {}", a.name, b.name),
        Op::DwPw { dw, pw } => format!("depthwise+pointwise {} + {}", dw.name, pw.name),
        Op::InvRes { ex, .. } => format!("inverted residual {}", ex.name),
    }
}

/// Time spent per stage of the graph.
#[derive(Clone, Copy, Debug, Default)]
struct StageTimes {
    backbone: Duration,
    neck: Duration,
    heads: Duration,
}

impl StageTimes {
    fn add(&mut self, stage: Stage, dt: Duration) {
        match stage {
            Stage::Backbone => self.backbone += dt,
            Stage::Neck => self.neck += dt,
            Stage::Heads => self.heads += dt,
        }
    }
}

/// Runs every op of `graph` in `arena` laid out by `plan`; the input is already in place. Every op
/// overwrites all of its output (SSH's three branches cover all channels), so an arena's stale values
/// from an earlier pass never show. The `chains` run in the blocked layout where the level allows, with
/// the arena's floats after the plan's tensors as their scratch.
fn run(graph: &Graph, plan: &Plan, arena: &mut [f32], runs: &BlockedRuns) -> Result<StageTimes> {
    let n = plan.n;
    let mut times = StageTimes::default();
    // RETINAFACE_PROFILE=1 prints each op's wall time (slowest first) after the pass, for tuning;
    // RETINAFACE_PROFILE=cpu prints the process's CPU time per op instead, which other tenants of a
    // shared machine disturb far less (with RAYON_NUM_THREADS=1 it is the op's work alone).
    let profile_var = std::env::var_os("RETINAFACE_PROFILE");
    let cpu_clock = profile_var.as_deref().is_some_and(|v| v == "cpu");
    let profile = cpu_clock || profile_var.is_some_and(|v| v == "1");
    let mut op_times: Vec<(f64, String)> = Vec::new();
    let blocked = chain::enabled(super::isa::isa()).filter(|_| !plan.keep_all && arena.len() > plan.arena_elems);
    let (arena, scratch) = arena.split_at_mut(plan.arena_elems.min(arena.len()));
    let mut i = 0;
    while i < graph.ops.len() {
        // A blocked run starting here: its ops' times, each booked as the op's.
        let dense = runs.dense.iter().find(|r| r.ops.start == i).zip(blocked.filter(|_| dense_run::enabled()));
        let chain = runs.chains.iter().find(|c| c.ops.start == i).zip(blocked);
        let ran = match (dense, chain) {
            (Some((dr, simd)), _) => Some((dr.ops.clone(), dense_run::execute(simd, graph, dr, plan, arena, scratch)?)),
            (None, Some((ch, simd))) => Some((ch.ops.clone(), chain::run(simd, graph, ch, plan, arena, scratch)?)),
            (None, None) => None,
        };
        if let Some((ops, dts)) = ran {
            for (k, dt) in ops.clone().zip(dts) {
                if profile {
                    op_times.push((dt.as_secs_f64() * 1e3, format!("blocked {}", describe(&graph.ops[k]))));
                }
                times.add(graph.op_stages[k], dt);
            }
            i = ops.end;
            continue;
        }
        let op = &graph.ops[i];
        let start = Instant::now();
        let cpu_start = if cpu_clock { process_cpu_seconds() } else { 0.0 };
        match op {
            // The heads' reference composition: the conv here, the split into anchors in raw_outputs.
            Op::Conv(c) | Op::Heads { conv: c, .. } => conv_op(c, plan, arena)?,
            // The fused ops' compositions of the reference ops: each equals the ops it replaced.
            Op::ConvUpsampleAdd { conv, src } => {
                conv_op(conv, plan, arena)?;
                upsample_add_op(*src, conv.output, plan, arena)?;
            }
            Op::ConvPair { a, b } => pair_op(a, b, plan, arena)?,
            Op::DwPw { dw, pw } => dwpw_op(dw, pw, plan, arena)?,
            Op::InvRes { ex, dw, pw } => invres_op(ex, dw, pw, plan, arena)?,
            Op::MaxPool { input, output } => max_pool_op(*input, *output, plan, arena)?,
            Op::ConvMaxPool { conv, output } => conv_max_pool_op(conv, *output, plan, arena)?,
            Op::UpsampleAdd { src, dst } => upsample_add_op(*src, *dst, plan, arena)?,
        }
        let dt = start.elapsed();
        if profile {
            let what = describe(op);
            let secs = if cpu_clock { process_cpu_seconds() - cpu_start } else { dt.as_secs_f64() };
            op_times.push((secs * 1e3, what));
        }
        times.add(graph.op_stages[i], dt);
        i += 1;
    }
    if profile {
        op_times.sort_by(|a, b| b.0.total_cmp(&a.0));
        let total: f64 = op_times.iter().map(|t| t.0).sum();
        let clock = if cpu_clock { " of process CPU time" } else { "" };
        eprintln!("profile: {} ops, {total:.2} ms{clock} at {n}x3x{}x{}", op_times.len(), plan.h, plan.w);
        // Every op, so runs can be compared op by op (`RETINAFACE_PROFILE_TOP=N` keeps the slowest N).
        let top = std::env::var("RETINAFACE_PROFILE_TOP").ok().and_then(|v| v.parse().ok()).unwrap_or(usize::MAX);
        for (ms, what) in op_times.iter().take(top) {
            eprintln!("  {ms:8.2} ms  {:5.1}%  {what}", ms / total * 100.0);
        }
    }
    Ok(times)
}
