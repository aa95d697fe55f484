//! The one graph executor over [`KernelRunner`]: the same code runs the network in the CPU simulation
//! (tests) and on the GPU. Weights are repacked for the NHWC kernels and uploaded once; every buffer a
//! frame needs is allocated once per (batch, height, width) and reused, so a steady stream of frames
//! allocates nothing. Post-processing runs on the device too; only detections come back.

use super::runner::{DevBuf, EventId, GraphId, KernelRunner, KernelRunnerExt};
use super::stages::{self, Marker, Stretch};
use crate::detection::Detection;
use crate::error::{Error, Result};
use crate::exec::{Activations, Backend, BenchMode, Executor, Precision, Timings, check_batch, check_specs};
use crate::graph::{DEFAULT_PLAN_CACHE_BYTES, Layout, Plan, PlanBuffers, PlanCache, PlanKey};
use crate::graph::{Graph, Op, TensorId};
use crate::image_io::{BgrImage, ResizeSpec};
use crate::post::{PostOptions, RawOutput, anchors};
use std::sync::Arc;

#[path = "engine_f16.rs"]
mod f16;
#[path = "pipeline.rs"]
mod pipeline;

/// A plan's device memory: the f32 arena the plan lays the tensors out in (NHWC), the input bytes,
/// the raw outputs and the post-processing buffers (made on the first `detect`).
struct GpuBufs {
    arena: DevBuf,
    input_u8: DevBuf,
    loc: DevBuf,
    conf: DevBuf,
    landm: DevBuf,
    post: Option<ops::post::PostBufs>,
    /// The captured forward pass of this plan (preprocess and every op), replayed on later passes;
    /// freed with the plan.
    graph: Option<GraphId>,
    /// The same without the heads (the detect path's, whose post-processing runs them fused).
    graph_no_heads: Option<GraphId>,
    /// The two above with the stage events of a timed bench pass recorded in them (raw heads, then
    /// without heads), so the graphs detection replays have no extra nodes.
    timed_graphs: [Option<GraphId>; 2],
    /// The f16 path's conv variants and split-K workspace (None in f32).
    f16: Option<f16::F16Bufs>,
    /// The captured post-processing of this plan and the settings it was captured for
    /// (`ops::post::PostPass::graph_key`); recaptured when they change, freed with the plan.
    /// The bool: whether it starts with the fused heads.
    post_graph: Option<((ops::post::PostGraphKey, bool), GraphId)>,
    /// Decoded images and resize tables of `detect_specs` (made on its first use, grown as needed).
    resize: Option<ops::resize::Staging>,
    /// The second input and post-processing slot of pipelined batches (made on its first use):
    /// swapped with the fields above while a batch of that slot is issued.
    spare: Option<Box<IoSlot>>,
    /// The batch `stage_input` left on the device, in a slot of its own (with its graphs), swapped
    /// in by `bench --input-on-device` passes.
    staged: Option<Box<IoSlot>>,
}

/// What a batch in flight owns until its detections are read: its input bytes and its
/// post-processing buffers (and the graphs captured over them). The arena and the raw outputs are
/// shared, as only the compute stream uses them, batch after batch.
struct IoSlot {
    input_u8: DevBuf,
    post: Option<ops::post::PostBufs>,
    graph: Option<GraphId>,
    graph_no_heads: Option<GraphId>,
    timed_graphs: [Option<GraphId>; 2],
    post_graph: Option<((ops::post::PostGraphKey, bool), GraphId)>,
}

impl GpuBufs {
    /// Exchanges the slot the pass code reads (the fields) with `other`.
    fn swap_slot(&mut self, other: &mut IoSlot) {
        std::mem::swap(&mut self.input_u8, &mut other.input_u8);
        std::mem::swap(&mut self.post, &mut other.post);
        std::mem::swap(&mut self.graph, &mut other.graph);
        std::mem::swap(&mut self.graph_no_heads, &mut other.graph_no_heads);
        std::mem::swap(&mut self.timed_graphs, &mut other.timed_graphs);
        std::mem::swap(&mut self.post_graph, &mut other.post_graph);
    }
}

impl GpuBufs {
    fn all(&self) -> Vec<DevBuf> {
        let mut v = vec![self.arena, self.input_u8, self.loc, self.conf, self.landm];
        if let Some(p) = &self.post {
            v.extend(p.all());
        }
        v.extend(self.f16.as_ref().and_then(|f| f.ws));
        if let Some(s) = &self.resize {
            v.extend(s.all());
        }
        for s in self.spare.iter().chain(&self.staged) {
            v.push(s.input_u8);
            if let Some(p) = &s.post {
                v.extend(p.all());
            }
        }
        v
    }
}

impl PlanBuffers for GpuBufs {
    fn bytes(&self) -> usize {
        self.all().iter().map(|b| b.bytes).sum()
    }
}

pub struct GpuEngine {
    runner: Box<dyn KernelRunner>,
    graph: Graph,
    /// Per op: the repacked weight and the bias of a conv (a pair's both convs side by side; a
    /// depthwise + pointwise op's depthwise conv; an inverted residual's expansion).
    weights: Vec<Option<(DevBuf, DevBuf)>>,
    /// Per op: a fused op's further convs' weights and biases, in `Op::convs` order after the first
    /// (a depthwise + pointwise op's pointwise conv; an inverted residual's depthwise and project).
    fused_rest: Vec<Vec<(DevBuf, DevBuf)>>,
    plans: PlanCache<GpuBufs>,
    last: Option<PlanKey>,
    /// Capture each plan's forward pass once and replay it (`--cuda-graph`, default on).
    cuda_graphs: bool,
    /// Events around a timed pass (made on first use).
    timer: Option<(EventId, EventId)>,
    precision: Precision,
    /// How the f16 path picks conv variants.
    tuning: f16::Tuning,
    /// The (n, h, w) of the batch `stage_input` uploaded for `bench --input-on-device` (its bytes
    /// are in its plan's `GpuBufs::staged`).
    staged: Option<(usize, usize, usize)>,
    /// Per slot, the events of pipelined batches: the upload done (copy stream), the pass done
    /// (compute stream), the last download done (copy stream). Made on first use.
    pipe_events: Option<[[EventId; 3]; 2]>,
    /// Test hook: a cross-stream wait the pipeline leaves out (to show the simulation catches it).
    skip_wait: Option<PipelineWait>,
    /// Detect with the heads fused into post-processing (threshold and decode in the heads kernel).
    fused_heads: bool,
    /// Per op of `graph`, the stage its time is booked to (`stages::fused_op_stages`).
    op_stage: Vec<crate::graph::Stage>,
    /// The events of timed bench passes (kept: the timed graphs record them).
    stage_events: stages::StageEvents,
    /// While a bench pass is timed: the event before its input is uploaded, then the forward pass's
    /// own events (see `stages::ForwardMarks`).
    stage_marks: Option<Vec<EventId>>,
    /// The host's time issuing the timed pass's input upload.
    host_preprocess: std::time::Duration,
}

/// How a forward pass ends: with the raw outputs (loc, conf, landmarks: `forward`, `--forward-only`,
/// the unfused detect path), or before the heads, which the detect path's post-processing runs fused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Heads {
    Raw,
    Fused,
}

/// The cross-stream waits of a pipelined batch (see [`GpuEngine::detect_stream`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PipelineWait {
    /// The compute stream waits for the batch's upload on the copy stream.
    ComputeAfterUpload,
    /// The copy stream waits for the batch's pass before downloading its detections.
    DownloadAfterCompute,
}

use super::ops::{self, dim};

impl GpuEngine {
    /// Builds the executor for `graph` on `backend` (`Cuda`: the first GPU; `CudaSim`: the CPU
    /// simulation); uploads the weights.
    pub fn new(graph: &Graph, backend: Backend) -> Result<GpuEngine> {
        GpuEngine::with_precision(graph, backend, Precision::F32)
    }

    /// [`Self::new`] computing in `precision`. On a GPU the f16 path's conv variants are timed per
    /// shape and cached on disk ([`crate::cuda::tune`], mode `cached`); in the simulation the
    /// heuristic picks.
    pub fn with_precision(graph: &Graph, backend: Backend, precision: Precision) -> Result<GpuEngine> {
        let mut tuning = f16::Tuning::heuristic();
        let mut runner: Box<dyn KernelRunner> = match backend {
            Backend::CudaSim => {
                #[cfg(feature = "cuda-sim")]
                {
                    Box::new(super::sim::SimRunner::from_env()?)
                }
                #[cfg(not(feature = "cuda-sim"))]
                {
                    return Err(Error::Cuda("this build has no CUDA simulation (feature cuda-sim is off)".into()));
                }
            }
            Backend::Cpu | Backend::Auto => {
                return Err(Error::InvalidArgument(format!("backend {backend:?} does not run the CUDA kernels")));
            }
            Backend::Cuda => {
                let mut r = super::gpu::GpuRunner::new(0)?;
                r.load_all()?;
                if precision == Precision::F16 {
                    let cache = match super::tune::default_cache_path() {
                        Some(p) => super::tune::TuneCache::load(&p)?,
                        None => super::tune::TuneCache::default(),
                    };
                    let dev = Some(super::tune::device_key(r.info()));
                    tuning = f16::Tuning { mode: super::tune::TuneMode::Cached, dev, cache };
                }
                Box::new(r)
            }
        };
        runner.set_sync_each_launch(super::runner::sync_from_env()?);
        let mut g = GpuEngine::with_runner_precision(graph, runner, precision)?;
        g.tuning = tuning;
        Ok(g)
    }

    /// Builds the f32 executor over any runner.
    pub fn with_runner(graph: &Graph, runner: Box<dyn KernelRunner>) -> Result<GpuEngine> {
        GpuEngine::with_runner_precision(graph, runner, Precision::F32)
    }

    /// [`Self::with_runner`] computing in `precision`. f32 runs the graph with the fusions
    /// kernels/conv.cu has kernels for (`Fusions::CUDA_F32`); f16 with those kernels/conv_f16.cu has
    /// (`Fusions::CUDA_F16`; its conv variants by the heuristic until [`Self::set_tuning`]).
    pub fn with_runner_precision(
        graph: &Graph,
        runner: Box<dyn KernelRunner>,
        precision: Precision,
    ) -> Result<GpuEngine> {
        if precision == Precision::F16 {
            return GpuEngine::with_runner_f16_fused(graph, runner, crate::passes::Fusions::CUDA_F16);
        }
        GpuEngine::with_runner_fused(graph, runner, crate::passes::Fusions::CUDA_F32)
    }

    /// The f16 executor over any runner, running `graph` with the fusions of `fusions` applied (an
    /// op the f16 kernels cannot run is an error naming it).
    pub fn with_runner_f16_fused(
        graph: &Graph,
        mut runner: Box<dyn KernelRunner>,
        fusions: crate::passes::Fusions,
    ) -> Result<GpuEngine> {
        let original = graph;
        let graph = &crate::passes::fuse(graph, fusions);
        let (weights, fused_rest) = f16::upload_weights(runner.as_mut(), graph)?;
        GpuEngine::assemble(graph, runner, weights, fused_rest, Precision::F16).map(|e| e.with_op_stages(original))
    }

    /// The f32 executor over any runner, running `graph` with the fusions of `fusions` applied.
    pub fn with_runner_fused(
        graph: &Graph,
        mut runner: Box<dyn KernelRunner>,
        fusions: crate::passes::Fusions,
    ) -> Result<GpuEngine> {
        let original = graph;
        let graph = &crate::passes::fuse(graph, fusions);
        let mut weights = Vec::with_capacity(graph.ops.len());
        let mut fused_rest = vec![Vec::new(); graph.ops.len()];
        for (i, op) in graph.ops.iter().enumerate() {
            match op {
                Op::ConvPair { a, b } => {
                    let (w, bias) = ops::fused::pack_pair(a, b)?;
                    weights.push(Some((runner.alloc_f32(&w)?, runner.alloc_f32(&bias)?)));
                }
                Op::ConvUpsampleAdd { conv: c, .. } => {
                    weights.push(Some((runner.alloc_f32(&ops::conv::pack(c)?)?, runner.alloc_f32(&c.bias)?)));
                }
                Op::DwPw { dw, pw } => {
                    weights.push(Some((runner.alloc_f32(&ops::conv::pack(dw)?)?, runner.alloc_f32(&dw.bias)?)));
                    fused_rest[i] = vec![(runner.alloc_f32(&ops::conv::pack(pw)?)?, runner.alloc_f32(&pw.bias)?)];
                }
                Op::InvRes { ex, dw, pw } => {
                    weights.push(Some((runner.alloc_f32(&ops::conv::pack(ex)?)?, runner.alloc_f32(&ex.bias)?)));
                    for c in [dw, pw] {
                        fused_rest[i].push((runner.alloc_f32(&ops::conv::pack(c)?)?, runner.alloc_f32(&c.bias)?));
                    }
                }
                Op::Conv(c) | Op::Heads { conv: c, .. } => {
                    let w = runner.alloc_f32(&ops::conv::pack(c)?)?;
                    let b = runner.alloc_f32(&c.bias)?;
                    weights.push(Some((w, b)));
                }
                _ => weights.push(None),
            }
        }
        GpuEngine::assemble(graph, runner, weights, fused_rest, Precision::F32).map(|e| e.with_op_stages(original))
    }

    /// Books each op's time to the stage it ends in, from the graph before fusion.
    fn with_op_stages(mut self, original: &Graph) -> GpuEngine {
        self.op_stage = stages::fused_op_stages(original, &self.graph);
        self
    }

    fn assemble(
        graph: &Graph,
        runner: Box<dyn KernelRunner>,
        weights: Vec<Option<(DevBuf, DevBuf)>>,
        fused_rest: Vec<Vec<(DevBuf, DevBuf)>>,
        precision: Precision,
    ) -> Result<GpuEngine> {
        let heads = graph.ops.iter().filter(|op| matches!(op, Op::Heads { .. })).count();
        if heads != 3 {
            return Err(Error::Cuda(format!(
                "the graph has {heads} fused head ops, not 3: run passes::optimize before the CUDA executor"
            )));
        }
        Ok(GpuEngine {
            runner,
            graph: graph.clone(),
            weights,
            fused_rest,
            plans: PlanCache::without(
                DEFAULT_PLAN_CACHE_BYTES,
                if precision == Precision::F16 { Layout::F16 } else { Layout::F32 },
                absent_tensors(graph),
            ),
            last: None,
            cuda_graphs: true,
            timer: None,
            precision,
            tuning: f16::Tuning::heuristic(),
            staged: None,
            pipe_events: None,
            skip_wait: None,
            fused_heads: true,
            op_stage: graph.op_stages.clone(),
            stage_events: stages::StageEvents::default(),
            stage_marks: None,
            host_preprocess: std::time::Duration::ZERO,
        })
    }

    /// Whether forward passes are captured into one CUDA graph per plan and replayed. Off, or with
    /// every launch synchronised (`RETINAFACE_CUDA_SYNC=1`, which names a faulting kernel), each op
    /// is launched on its own.
    pub fn set_cuda_graphs(&mut self, on: bool) {
        self.cuda_graphs = on;
    }

    pub fn cuda_graphs(&self) -> bool {
        self.cuda_graphs && !self.runner.sync_each_launch()
    }

    /// The error that left the device unusable, if one did (see [`KernelRunner::fault`]).
    pub fn fault(&self) -> Option<String> {
        self.runner.fault()
    }

    /// Runs `f`; with `timed`, also the device time of the work it queued (events around it).
    fn device_timed<T>(
        &mut self,
        timed: bool,
        f: impl FnOnce(&mut GpuEngine) -> Result<T>,
    ) -> Result<(T, std::time::Duration)> {
        if !timed {
            return Ok((f(self)?, std::time::Duration::ZERO));
        }
        self.start_device_timer()?;
        let v = f(self)?;
        Ok((v, self.stop_device_timer()?))
    }

    /// Records the start of a timed stretch of device work.
    pub fn start_device_timer(&mut self) -> Result<()> {
        let (a, _) = match self.timer {
            Some(t) => t,
            None => {
                let t = (self.runner.event_create()?, self.runner.event_create()?);
                self.timer = Some(t);
                t
            }
        };
        self.runner.event_record(a)
    }

    /// The device time since [`Self::start_device_timer`], from events on the stream: waits for the
    /// work queued so far.
    pub fn stop_device_timer(&mut self) -> Result<std::time::Duration> {
        let (a, b) = self.timer.ok_or_else(|| Error::Cuda("device timer stopped before it started".into()))?;
        self.runner.event_record(b)?;
        self.runner.event_synchronize(b)?;
        self.runner.event_elapsed(a, b)
    }

    pub fn describe(&self) -> String {
        match self.precision {
            Precision::F32 => self.runner.describe(),
            Precision::F16 => format!("{}, f16", self.runner.describe()),
        }
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// How the f16 path chooses conv variants from now on (plans already made keep theirs): `dev`
    /// None is the heuristic; with a device key the supported variants of each shape run on this
    /// engine's runner, are checked against the heuristic's output and timed (the simulation times
    /// meaninglessly but runs every step), and the fastest is kept in `cache`, saved to its file.
    pub fn set_tuning(
        &mut self,
        mode: super::tune::TuneMode,
        dev: Option<super::tune::DeviceKey>,
        cache: super::tune::TuneCache,
    ) {
        self.tuning = f16::Tuning { mode, dev, cache };
    }

    /// Changes only the tuning mode (the device and cache stay; `off` is the heuristic).
    pub fn set_tune_mode(&mut self, mode: super::tune::TuneMode) {
        self.tuning.mode = mode;
    }

    /// The tuning cache's choices so far.
    pub fn tune_cache(&self) -> &super::tune::TuneCache {
        &self.tuning.cache
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Whether `t` is a fused op's scratch, which the device keeps in shared memory and never writes.
    pub fn never_written(&self, t: TensorId) -> bool {
        self.graph.ops.iter().any(|op| match op {
            Op::DwPw { dw, .. } => dw.output == t,
            Op::InvRes { ex, dw, .. } => ex.output == t || dw.output == t,
            _ => false,
        })
    }

    /// Bytes of activation and post-processing memory the plans hold on the device.
    pub fn held_bytes(&self) -> usize {
        self.plans.held_bytes()
    }

    /// Bounds the device memory of cached plans; frees the least recently used past it.
    pub fn set_plan_cache_bytes(&mut self, bytes: usize) -> Result<()> {
        for b in self.plans.set_budget(bytes) {
            free_all(self.runner.as_mut(), b)?;
        }
        Ok(())
    }

    /// Frees every cached plan's device buffers.
    pub fn release_plans(&mut self) -> Result<()> {
        for b in self.plans.clear() {
            free_all(self.runner.as_mut(), b)?;
        }
        Ok(())
    }

    /// The plan of `key` and its device buffers, allocated (after freeing evicted plans) on first use.
    fn plan(&mut self, key: PlanKey) -> Result<(Arc<Plan>, &mut GpuBufs)> {
        let r = &mut self.runner;
        let (graph, weights, tuning) = (&self.graph, (&self.weights[..], &self.fused_rest[..]), &mut self.tuning);
        let f16 = self.precision == Precision::F16;
        self.plans.get(&self.graph, key, |plan, evicted| {
            for b in evicted {
                free_all(r.as_mut(), b)?;
            }
            let (n, h, w) = (plan.n, plan.h, plan.w);
            let a = anchors::num_anchors(h, w);
            let arena = r.alloc(plan.arena_bytes())?;
            Ok(GpuBufs {
                f16: if f16 { Some(f16::prepare(r.as_mut(), graph, plan, arena, weights, tuning)?) } else { None },
                arena,
                input_u8: r.alloc(n * h * w * 3)?,
                loc: r.alloc(4 * n * a * 4)?,
                conf: r.alloc(4 * n * a * 2)?,
                landm: r.alloc(4 * n * a * 10)?,
                post: None,
                graph: None,
                graph_no_heads: None,
                timed_graphs: [None; 2],
                post_graph: None,
                resize: None,
                spare: None,
                staged: None,
            })
        })
    }

    /// The plan an n×3×h×w batch runs with (computed and cached, with its buffers, on first use).
    pub fn plan_for(&mut self, n: usize, h: usize, w: usize) -> Result<Arc<Plan>> {
        Ok(self.plan((n, h, w, false))?.0)
    }

    /// [`Self::forward_input`] of network-input sized images from the host.
    fn forward(&mut self, images: &[&BgrImage], keep_all: bool) -> Result<(Arc<Plan>, [DevBuf; 3])> {
        self.forward_input(BatchInput::Host(images), keep_all, Heads::Raw)
    }

    /// Runs preprocessing, the network and the heads; leaves loc/conf/landm on the device.
    /// With `keep_all` every tensor stays readable (by [`Self::tensor_nchw`]) after the pass.
    /// The batch goes up in one staged copy (or is resized on the device, or is already in the input
    /// buffer of the slot swapped in); the launches are a graph captured on the slot's first pass and
    /// replayed after (or launched one by one with graphs off).
    /// `heads`: whether the pass ends with the raw heads or leaves them to [`Self::post_pass`].
    fn forward_input(
        &mut self,
        input: BatchInput<'_>,
        keep_all: bool,
        heads: Heads,
    ) -> Result<(Arc<Plan>, [DevBuf; 3])> {
        if self.precision == Precision::F16 {
            return match input {
                BatchInput::Host(images) => self.forward_f16(images, keep_all, heads),
                _ => Err(Error::InvalidArgument(
                    "the device resize and a batch staged on the device run in f32 only (--precision f32)".into(),
                )),
            };
        }
        let (n, h, w) = input.shape()?;
        if let BatchInput::Staged(..) = input
            && self.staged != Some((n, h, w))
        {
            return Err(Error::InvalidArgument(format!("no {n}x{w}x{h} batch is staged on the device")));
        }
        dim(n * h * w * 3, "batch elements")?;
        let key = (n, h, w, keep_all);
        let use_graph = self.cuda_graphs();
        let marks = self.stage_marks.clone();
        let (plan, bufs) = self.plan(key)?;
        let graph = match (&marks, heads) {
            (Some(_), _) => bufs.timed_graphs[heads as usize],
            (None, Heads::Raw) => bufs.graph,
            (None, Heads::Fused) => bufs.graph_no_heads,
        };
        let (input_u8, loc, conf, landm) = (bufs.input_u8, bufs.loc, bufs.conf, bufs.landm);
        self.last = Some(key);
        let (forward_marks, host0) = match marks.as_deref() {
            Some([start, rest @ ..]) => {
                self.runner.event_record(*start)?;
                (Some(rest), std::time::Instant::now())
            }
            _ => (None, std::time::Instant::now()),
        };
        // The bytes the pass starts from, in the input buffer of the slot in use: uploaded now,
        // resized now, or put there before (a staged batch, a pipelined upload).
        match input {
            BatchInput::Host(images) => {
                let parts: Vec<&[u8]> = images.iter().map(|i| i.data.as_slice()).collect();
                self.runner.upload_staged(input_u8, 0, &parts)?;
            }
            BatchInput::Resize(images, specs) => {
                let mut staging = self.plans.buffers(key).and_then(|b| b.resize.take());
                let res = ops::resize::run(self.runner.as_mut(), &mut staging, images, specs, input_u8);
                if let Some(b) = self.plans.buffers(key) {
                    b.resize = staging;
                }
                res?;
            }
            BatchInput::Staged(..) | BatchInput::Uploaded(..) => {}
        }
        if forward_marks.is_some() {
            self.host_preprocess += host0.elapsed();
        }
        if !use_graph {
            self.launch_forward(&plan, key, input_u8, heads, forward_marks)?;
            return Ok((plan, [loc, conf, landm]));
        }
        let id = match graph {
            Some(id) => id,
            None => {
                self.runner.begin_capture()?;
                let launched = self.launch_forward(&plan, key, input_u8, heads, forward_marks);
                // End the capture whatever happened, so the stream is usable again.
                let captured = self.runner.end_capture();
                let id = match (launched, captured) {
                    (Ok(()), Ok(id)) => id,
                    (Err(e), Ok(id)) => {
                        self.runner.free_graph(id)?;
                        return Err(e);
                    }
                    (Err(e), Err(_)) | (Ok(()), Err(e)) => return Err(e),
                };
                let bufs = self.plans.buffers(key).ok_or_else(|| Error::Cuda("the pass's plan was evicted".into()))?;
                *match (&marks, heads) {
                    (Some(_), _) => &mut bufs.timed_graphs[heads as usize],
                    (None, Heads::Raw) => &mut bufs.graph,
                    (None, Heads::Fused) => &mut bufs.graph_no_heads,
                } = Some(id);
                id
            }
        };
        self.runner.replay(id)?;
        Ok((plan, [loc, conf, landm]))
    }

    /// Every launch of a forward pass over `key`'s buffers: preprocessing of the bytes in `input_u8`,
    /// each op, the heads (with `Heads::Raw`). Nothing else (no copy, allocation or synchronisation), so
    /// it can be captured. With `marks` (a timed bench pass), the forward pass's stage events too.
    fn launch_forward(
        &mut self,
        plan: &Plan,
        key: PlanKey,
        input_u8: DevBuf,
        heads: Heads,
        marks: Option<&[EventId]>,
    ) -> Result<()> {
        let (n, h, w, _) = key;
        let mut marker = match marks {
            Some(ev) => Marker::new(ev, self.forward_marks(heads))?,
            None => Marker::off(),
        };
        let bufs = self.plans.buffers(key).ok_or_else(|| Error::Cuda("the pass's plan was evicted".into()))?;
        let (arena, loc, conf, landm) = (bufs.arena, bufs.loc, bufs.conf, bufs.landm);
        let r = &mut self.runner;
        if r.is_simulation() {
            // Every intermediate starts as NaN, so an element a kernel forgot to write poisons the outputs.
            for b in [arena, loc, conf, landm] {
                r.poison(b)?;
            }
        }
        let per = h * w * 3;
        let g = &self.graph;
        let buf = |t: TensorId| DevBuf { ptr: arena.at(4 * plan.offsets[t]), bytes: 4 * plan.elems(t) };
        let total = n * per;
        let input = buf(g.input);
        ops::preprocess::launch(r.as_mut(), input_u8.ptr, input.ptr, total)?;
        let dims = |t: TensorId| plan.shapes[t];
        let mut anchor_base = [0usize; 3];
        for l in 1..3 {
            let (_, fh, fw) = dims(g.taps.head[l - 1]);
            anchor_base[l] = anchor_base[l - 1] + 2 * fh * fw;
        }
        for (i, op) in g.ops.iter().enumerate() {
            marker.before(r.as_mut(), i)?;
            match op {
                Op::Conv(c) | Op::Heads { conv: c, .. } => {
                    let (ic, ih, iw) = dims(c.input);
                    let (oc, oh, ow) = dims(c.output);
                    let expect = |s: usize| (s + 2 * c.pad - c.kernel) / c.stride + 1;
                    if ic != c.cin || expect(ih) != oh || expect(iw) != ow || c.out_channel_offset + c.cout > oc {
                        return Err(Error::Cuda(format!("conv {}: tensor shapes do not match the op", c.name)));
                    }
                    let (wb, bb) =
                        self.weights[i].ok_or_else(|| Error::Cuda(format!("conv {} has no weights", c.name)))?;
                    let x = buf(c.input);
                    if let Op::Heads { level: l, .. } = *op {
                        if heads == Heads::Fused {
                            continue;
                        }
                        let a = ops::heads::HeadArgs {
                            x: x.ptr,
                            wt: wb.ptr,
                            bias: bb.ptr,
                            loc: loc.ptr,
                            conf: conf.ptr,
                            landm: landm.ptr,
                            n,
                            h: oh,
                            w: ow,
                            c: c.cin,
                            anchor_base: anchor_base[l],
                            num_anchors: anchors::num_anchors(h, w),
                        };
                        ops::heads::launch(r.as_mut(), &a)?;
                        continue;
                    }
                    let a = ops::conv::ConvArgs {
                        x: x.ptr,
                        wt: wb.ptr,
                        bias: bb.ptr,
                        residual: c.residual.map_or(0, |t| buf(t).ptr),
                        y: buf(c.output).ptr,
                        n,
                        h: ih,
                        w: iw,
                        oh,
                        ow,
                        out_ctot: oc,
                    };
                    ops::conv::launch(r.as_mut(), c, &a)?;
                }
                Op::MaxPool { input, output } => {
                    let (ic, ih, iw) = dims(*input);
                    let (_, oh, ow) = dims(*output);
                    ops::pool::launch(r.as_mut(), buf(*input).ptr, buf(*output).ptr, n, ih, iw, ic, oh, ow)?;
                }
                Op::UpsampleAdd { src, dst } => {
                    let (sc, sh, sw) = dims(*src);
                    let (dc, dh, dw) = dims(*dst);
                    if sc != dc {
                        return Err(Error::Cuda("upsample-add of tensors with different channel counts".into()));
                    }
                    ops::upsample::launch(r.as_mut(), buf(*src).ptr, buf(*dst).ptr, n, (sh, sw), (dh, dw), dc)?;
                }
                // Fusions::CUDA_F32 leaves it out: no kernel pools a conv's rows yet.
                Op::ConvMaxPool { conv, .. } => {
                    return Err(Error::Cuda(format!("conv {} + max-pool: no fused CUDA kernel", conv.name)));
                }
                Op::ConvUpsampleAdd { .. } | Op::ConvPair { .. } | Op::DwPw { .. } | Op::InvRes { .. } => {
                    let wts: Vec<_> = self.weights[i].into_iter().chain(self.fused_rest[i].iter().copied()).collect();
                    launch_fused(r.as_mut(), op, &wts, n, &|t| (buf(t).ptr, dims(t)))?;
                }
            }
        }
        marker.end(r.as_mut())
    }

    /// Where a forward pass ending as `heads` records its stage events.
    pub(super) fn forward_marks(&self, heads: Heads) -> stages::ForwardMarks {
        let runs = |i: usize| heads == Heads::Raw || !matches!(self.graph.ops[i], Op::Heads { .. });
        stages::forward_marks(&self.op_stage, runs)
    }

    /// The raw head outputs of each image (loc, softmaxed conf, landmarks) in the goldens' layout.
    pub fn raw_outputs(&mut self, images: &[&BgrImage]) -> Result<Vec<RawOutput>> {
        self.raw_outputs_keeping(images, false)
    }

    /// [`Self::raw_outputs`], keeping every tensor readable with `keep_all`.
    pub fn raw_outputs_keeping(&mut self, images: &[&BgrImage], keep_all: bool) -> Result<Vec<RawOutput>> {
        let (plan, [lb, cb, mb]) = self.forward(images, keep_all)?;
        let (n, h, w) = (plan.n, plan.h, plan.w);
        let a = anchors::num_anchors(h, w);
        // Three copies into pinned memory queued behind the pass, one wait for all of them.
        let queued = [(lb, n * a * 4), (cb, n * a * 2), (mb, n * a * 10)]
            .map(|(buf, len)| self.runner.download_async(buf, 0, 4 * len).map(|rb| (rb, len)));
        self.runner.synchronize()?;
        let mut out = Vec::with_capacity(3);
        for q in queued {
            let (rb, len) = q?;
            let mut v = vec![0.0f32; len];
            self.runner.read_back(rb, bytemuck::cast_slice_mut(&mut v))?;
            out.push(v);
        }
        let (landm, conf, loc) = (out.pop(), out.pop(), out.pop());
        let none = || Error::Cuda("a raw output was not downloaded".into());
        let (loc, conf, landm) = (loc.ok_or_else(none)?, conf.ok_or_else(none)?, landm.ok_or_else(none)?);
        if self.runner.is_simulation() {
            for (name, v) in [("loc", &loc), ("conf", &conf), ("landmarks", &landm)] {
                if let Some(i) = v.iter().position(|x| x.is_nan()) {
                    return Err(Error::Cuda(format!(
                        "simulation: {name}[{i}] is NaN: an element was never written (or read unwritten memory)"
                    )));
                }
            }
        }
        Ok((0..n)
            .map(|b| RawOutput {
                h,
                w,
                loc: loc[b * a * 4..(b + 1) * a * 4].to_vec(),
                conf: conf[b * a * 2..(b + 1) * a * 2].to_vec(),
                landmarks: landm[b * a * 10..(b + 1) * a * 10].to_vec(),
            })
            .collect())
    }

    /// A tensor of the last forward pass, converted to NCHW [n, c, h, w] (for tests and debugging).
    /// The taps are kept to the end of a pass; other tensors' arena space may have been reused.
    pub fn tensor_nchw(&mut self, t: TensorId) -> Result<Vec<f32>> {
        let key = self.last.ok_or_else(|| Error::InvalidArgument("no forward pass has run".into()))?;
        let (plan, bufs) =
            self.plans.peek(key).ok_or_else(|| Error::InvalidArgument("the last pass's plan was evicted".into()))?;
        if t >= plan.shapes.len()
            || self.graph.taps.head.contains(&t)
            || !(plan.keep_all || self.graph.is_tap(t))
            || self.never_written(t)
        {
            return Err(Error::InvalidArgument(format!("tensor {t} is not kept on the device")));
        }
        if plan.layout == Layout::F16 {
            let (plan, arena) = (plan.clone(), bufs.arena);
            return f16::tensor_nchw(self.runner.as_mut(), &plan, arena, t);
        }
        let (c, th, tw) = plan.shapes[t];
        let n = plan.n;
        let (arena, offset) = (bufs.arena, 4 * plan.offsets[t]);
        let mut nhwc = vec![0.0f32; n * th * tw * c];
        self.runner.download(arena, offset, bytemuck::cast_slice_mut(&mut nhwc))?;
        Ok(nhwc_to_nchw(&nhwc, n, th, tw, c))
    }

    /// Detections of each image (network-input sized, boxes in its pixels), best first.
    pub fn detect(&mut self, images: &[&BgrImage], post: &PostOptions) -> Result<Vec<Vec<Detection>>> {
        self.detect_scaled(images, post, &vec![1.0; images.len()])
    }

    /// Like [`Self::detect`] for images that were resized before the network, image i by `resizes[i]`:
    /// its boxes and landmarks are divided by it, as the reference does. One device pass for the batch.
    pub fn detect_scaled(
        &mut self,
        images: &[&BgrImage],
        post: &PostOptions,
        resizes: &[f32],
    ) -> Result<Vec<Vec<Detection>>> {
        post.validate()?;
        let (h, w) = check_batch(images)?;
        if resizes.len() != images.len() {
            return Err(Error::InvalidArgument(format!(
                "{} resize factors for a batch of {} images",
                resizes.len(),
                images.len()
            )));
        }
        let heads = self.detect_heads();
        let (plan, raw) = self.forward_input(BatchInput::Host(images), false, heads)?;
        let (n, key) = (plan.n, (plan.n, h, w, false));
        debug_assert_eq!(n, images.len());
        self.post_pass(key, raw, post, resizes, heads)
    }

    /// The device post-processing of the pass that just ran on plan `key` (raw outputs `raw`, or, with
    /// `Heads::Fused`, the heads' inputs in the plan's arena): the resize factors uploaded, then the
    /// launches (a graph per plan and post settings, captured on first use and replayed, when graphs
    /// are on), then the detections downloaded.
    fn post_pass(
        &mut self,
        key: PlanKey,
        raw: [DevBuf; 3],
        post: &PostOptions,
        resizes: &[f32],
        heads: Heads,
    ) -> Result<Vec<Vec<Detection>>> {
        let Some(pass) = self.post_launch(key, raw, post, resizes, heads)? else {
            return Ok(vec![Vec::new(); key.0]);
        };
        let bufs = self.plans.buffers(key).ok_or_else(|| Error::Cuda("the pass's plan was evicted".into()))?;
        let pb = bufs.post.as_ref().ok_or_else(|| Error::Cuda("post buffers vanished".into()))?;
        ops::post::collect(self.runner.as_mut(), pb, &pass)
    }

    /// The queued part of [`Self::post_pass`]: the factors uploaded and the launches (or the graph
    /// replayed), nothing waited for. None: nothing can be kept.
    fn post_launch(
        &mut self,
        key: PlanKey,
        raw: [DevBuf; 3],
        post: &PostOptions,
        resizes: &[f32],
        heads: Heads,
    ) -> Result<Option<ops::post::PostPass>> {
        let (n, h, w, _) = key;
        let use_graph = self.cuda_graphs();
        let fused = match heads {
            Heads::Fused => Some(self.fused_head_args(key)?),
            Heads::Raw => None,
        };
        let launch = |r: &mut dyn KernelRunner, pb: &ops::post::PostBufs, pass: &ops::post::PostPass| match &fused {
            Some(levels) => ops::post::launch_fused(r, pb, levels, pass),
            None => ops::post::launch(r, pb, raw, pass),
        };
        let r = self.runner.as_mut();
        let bufs = self.plans.buffers(key).ok_or_else(|| Error::Cuda("the pass's plan was evicted".into()))?;
        let path = ops::post::NmsPath::Auto;
        let Some(pass) = ops::post::prepare(r, &mut bufs.post, n, h, w, post, resizes, path)? else {
            return Ok(None);
        };
        let pb = bufs.post.as_ref().ok_or_else(|| Error::Cuda("post buffers vanished".into()))?;
        if !use_graph {
            launch(r, pb, &pass)?;
            return Ok(Some(pass));
        }
        let gkey = (pass.graph_key(), fused.is_some());
        let id = match bufs.post_graph {
            Some((k, id)) if k == gkey => id,
            old => {
                if let Some((_, id)) = old {
                    bufs.post_graph = None;
                    r.free_graph(id)?;
                }
                r.begin_capture()?;
                let launched = launch(r, pb, &pass);
                // End the capture whatever happened, so the stream is usable again.
                let id = match (launched, r.end_capture()) {
                    (Ok(()), Ok(id)) => id,
                    (Err(e), Ok(id)) => {
                        r.free_graph(id)?;
                        return Err(e);
                    }
                    (Err(e), Err(_)) | (Ok(()), Err(e)) => return Err(e),
                };
                bufs.post_graph = Some((gkey, id));
                id
            }
        };
        r.replay(id)?;
        Ok(Some(pass))
    }
}

/// Where a pass's input comes from.
#[derive(Clone, Copy)]
enum BatchInput<'a> {
    /// Network-input sized images on the host, uploaded as they are.
    Host(&'a [&'a BgrImage]),
    /// Decoded images of any sizes and their specs (one canvas): each uploaded once, resized on the device.
    Resize(&'a [&'a BgrImage], &'a [ResizeSpec]),
    /// The batch `stage_input` left on the device, its slot swapped in: (n, h, w).
    Staged(usize, usize, usize),
    /// Already in the plan's input buffer (queued there by a pipelined upload): (n, h, w).
    Uploaded(usize, usize, usize),
}

impl BatchInput<'_> {
    /// (n, h, w) of the network input.
    fn shape(&self) -> Result<(usize, usize, usize)> {
        match *self {
            BatchInput::Host(images) => {
                let (h, w) = check_batch(images)?;
                Ok((images.len(), h, w))
            }
            BatchInput::Resize(images, specs) => {
                let (h, w) = check_specs(images, specs)?;
                Ok((images.len(), h, w))
            }
            BatchInput::Staged(n, h, w) | BatchInput::Uploaded(n, h, w) => Ok((n, h, w)),
        }
    }
}

impl GpuEngine {
    /// Detections of decoded images resized on the device by `specs` (one canvas size), image i's
    /// boxes divided by its `specs[i].scale` (as [`Self::detect_scaled`]). One pass for the batch.
    pub fn detect_specs(
        &mut self,
        images: &[&BgrImage],
        specs: &[ResizeSpec],
        post: &PostOptions,
    ) -> Result<Vec<Vec<Detection>>> {
        post.validate()?;
        let (h, w) = check_specs(images, specs)?;
        let resizes: Vec<f32> = specs.iter().map(|s| s.scale as f32).collect();
        if self.precision == Precision::F16 {
            // The resize kernel writes the f32 path's u8 input; the f16 pass resizes on the host.
            let inputs =
                images.iter().zip(specs).map(|(i, s)| crate::image_io::apply_spec(i, s)).collect::<Result<Vec<_>>>()?;
            let refs: Vec<&BgrImage> = inputs.iter().map(|c| c.as_ref()).collect();
            return self.detect_scaled(&refs, post, &resizes);
        }
        let heads = self.detect_heads();
        let (plan, raw) = self.forward_input(BatchInput::Resize(images, specs), false, heads)?;
        self.post_pass((plan.n, h, w, false), raw, post, &resizes, heads)
    }

    /// The network input bytes of the last pass ([n][h][w][3] u8, after any device resize), for tests.
    pub fn last_input_u8(&mut self) -> Result<Vec<u8>> {
        let key = self.last.ok_or_else(|| Error::InvalidArgument("no forward pass has run".into()))?;
        let (plan, bufs) =
            self.plans.peek(key).ok_or_else(|| Error::InvalidArgument("the last pass's plan was evicted".into()))?;
        let (len, src) = (plan.n * plan.h * plan.w * 3, bufs.input_u8);
        let mut v = vec![0u8; len];
        self.runner.download(src, 0, &mut v)?;
        Ok(v)
    }

    /// Uploads network-input sized images once, for [`Self::bench_pass`] with `input_on_device`:
    /// into a slot of their plan's, so that their passes replay graphs captured over it.
    pub fn stage_input(&mut self, images: &[&BgrImage]) -> Result<()> {
        let (h, w) = check_batch(images)?;
        let n = images.len();
        if let Some((sn, sh, sw)) = self.staged.take()
            && let Some(old) = self.plans.buffers((sn, sh, sw, false)).and_then(|b| b.staged.take())
        {
            free_slot(self.runner.as_mut(), *old)?;
        }
        let key = (n, h, w, false);
        self.plan(key)?;
        let buf = self.runner.alloc(n * h * w * 3)?;
        let slot = Box::new(IoSlot {
            input_u8: buf,
            post: None,
            graph: None,
            graph_no_heads: None,
            timed_graphs: [None; 2],
            post_graph: None,
        });
        match self.plans.buffers(key) {
            Some(b) => b.staged = Some(slot),
            None => return free_slot(self.runner.as_mut(), *slot),
        }
        for (i, img) in images.iter().enumerate() {
            self.runner.upload(buf, i * h * w * 3, &img.data)?;
        }
        self.staged = Some((n, h, w));
        Ok(())
    }

    /// The detections of the batch [`Self::stage_input`] left on the device (resize factors 1),
    /// through its slot's graphs.
    pub fn detect_staged(&mut self, post: &PostOptions) -> Result<Vec<Vec<Detection>>> {
        post.validate()?;
        let (n, h, w) = self.staged.ok_or_else(|| Error::InvalidArgument("no batch is staged".into()))?;
        let key = (n, h, w, false);
        let mut slot = self.swap_in(key, pipeline::Slot::Staged)?;
        let heads = self.detect_heads();
        let res = self
            .forward_input(BatchInput::Staged(n, h, w), false, heads)
            .and_then(|(_, raw)| self.post_pass(key, raw, post, &vec![1.0; n], heads));
        self.swap_out(key, pipeline::Slot::Staged, &mut slot)?;
        res
    }

    /// One pass of `retinaface bench`: from the staged input or the host images; `forward_only` leaves
    /// the raw outputs on the device (nothing is downloaded), otherwise the device post-processing runs
    /// and only detections come back. With `timings`, device times from events on the compute stream
    /// (see [`stages`]): per stage, and in all from before the input's upload to the detections on the
    /// host (or the end of the forward pass); the host's time issuing the upload apart.
    pub fn bench_pass(
        &mut self,
        images: &[&BgrImage],
        mode: BenchMode,
        post: &PostOptions,
        timings: Option<&mut Timings>,
    ) -> Result<()> {
        let input = match (mode.input_on_device, self.staged) {
            (true, Some((n, h, w))) => BatchInput::Staged(n, h, w),
            (true, None) => return Err(Error::InvalidArgument("--input-on-device: no batch is staged".into())),
            (false, _) => BatchInput::Host(images),
        };
        let (n, h, w) = input.shape()?;
        if !mode.forward_only {
            post.validate()?;
        }
        let key = (n, h, w, false);
        let heads = if mode.forward_only { Heads::Raw } else { self.detect_heads() };
        // The event before the upload, the forward pass's own, and one after the detections are read.
        let timed = if timings.is_some() {
            let mut stretches = self.forward_marks(heads).stretches;
            let forward_events = 1 + stretches.len();
            if !mode.forward_only {
                stretches.push(Stretch::Postprocess);
            }
            let events = self.stage_events.first(self.runner.as_mut(), stretches.len() + 1)?;
            Some((events, stretches, forward_events))
        } else {
            None
        };
        self.host_preprocess = std::time::Duration::ZERO;
        // A staged batch's slot is swapped in for the pass, so the graphs captured over it replay.
        let staged = mode.input_on_device;
        let mut slot = if staged { self.swap_in(key, pipeline::Slot::Staged)? } else { None };
        let res = (|| {
            self.stage_marks = timed.as_ref().map(|(ev, _, forward)| ev[..*forward].to_vec());
            let forward = self.forward_input(input, false, heads);
            self.stage_marks = None;
            let (_, raw) = forward?;
            if mode.forward_only {
                return self.runner.synchronize();
            }
            self.post_pass(key, raw, post, &vec![1.0; n], heads)?;
            match timed.as_ref().and_then(|(ev, _, _)| ev.last()) {
                Some(&end) => self.runner.event_record(end),
                None => Ok(()),
            }
        })();
        if staged {
            self.swap_out(key, pipeline::Slot::Staged, &mut slot)?;
        }
        res?;
        if let (Some(t), Some((events, stretches, _))) = (timings, timed) {
            let last = *events.last().ok_or_else(|| Error::Cuda("a timed pass without events".into()))?;
            self.runner.event_synchronize(last)?;
            stages::book(self.runner.as_mut(), &events, &stretches, t)?;
            t.host_preprocess += self.host_preprocess;
        }
        Ok(())
    }
}

impl GpuEngine {
    /// Whether detection runs the heads fused with the threshold and decoding (default on): the
    /// forward pass stops before the heads and post-processing starts with `heads_fused`. Off, it
    /// runs the raw heads and post-processing from the raw outputs (the same detections, bit for bit).
    pub fn set_fused_heads(&mut self, on: bool) {
        self.fused_heads = on;
    }

    pub fn fused_heads(&self) -> bool {
        self.fused_heads
    }

    pub(super) fn detect_heads(&self) -> Heads {
        if self.fused_heads { Heads::Fused } else { Heads::Raw }
    }

    /// The three levels' fused heads launch arguments on plan `key`: their inputs (the SSH taps, kept
    /// to the end of the pass) in the plan's arena, f32 or f16 as the plan's layout, and their weights.
    fn fused_head_args(&self, key: PlanKey) -> Result<[ops::heads::FusedHeadArgs; 3]> {
        let (plan, bufs) = self.plans.peek(key).ok_or_else(|| Error::Cuda("the pass's plan was evicted".into()))?;
        let f16 = plan.layout == Layout::F16;
        let mut levels = [None; 3];
        for (i, op) in self.graph.ops.iter().enumerate() {
            let Op::Heads { level, conv: c } = op else { continue };
            let (ic, ih, iw) = plan.shapes[c.input];
            let (_, oh, ow) = plan.shapes[c.output];
            if c.kernel != 1 || c.stride != 1 || c.pad != 0 || ic != c.cin || (ih, iw) != (oh, ow) || c.cout != 32 {
                return Err(Error::Cuda(format!("head {}: not a 1x1 conv from {ic} channels to 32", c.name)));
            }
            let (wb, bb) = self.weights[i].ok_or_else(|| Error::Cuda(format!("head {} has no weights", c.name)))?;
            let slot = levels
                .get_mut(*level)
                .ok_or_else(|| Error::Cuda(format!("head {} is on level {level} of 3", c.name)))?;
            *slot = Some(ops::heads::FusedHeadArgs {
                x: bufs.arena.at(if f16 { 2 } else { 4 } * plan.offsets[c.input]),
                wt: wb.ptr,
                bias: bb.ptr,
                n: plan.n,
                h: ih,
                w: iw,
                c: c.cin,
                cstride: if f16 { plan.stored_channels(c.input) } else { c.cin },
                f16,
            });
        }
        let level = |l: usize| levels[l].ok_or_else(|| Error::Cuda(format!("the graph has no head on level {l}")));
        Ok([level(0)?, level(1)?, level(2)?])
    }
}

/// The CUDA executor: a [`GpuEngine`] behind a lock, as one device runs one pass at a time.
pub struct CudaExecutor(std::sync::Mutex<GpuEngine>);

impl CudaExecutor {
    pub fn new(gpu: GpuEngine) -> CudaExecutor {
        CudaExecutor(std::sync::Mutex::new(gpu))
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, GpuEngine>> {
        self.0.lock().map_err(|_| Error::Cuda("a previous GPU call panicked".into()))
    }
}

impl Executor for CudaExecutor {
    fn describe(&self) -> String {
        match self.lock() {
            Ok(g) => g.describe(),
            Err(e) => e.to_string(),
        }
    }

    fn run(&self, images: &[&BgrImage], keep_all: bool, timings: Option<&mut Timings>) -> Result<Activations> {
        let mut g = self.lock()?;
        let t0 = std::time::Instant::now();
        let (raw, device) = g.device_timed(timings.is_some(), |g| g.raw_outputs_keeping(images, keep_all))?;
        let (h, w) = check_batch(images)?;
        let taps = g.graph.taps;
        let mut tensors = vec![None; g.graph.tensors.len()];
        for (t, slot) in tensors.iter_mut().enumerate() {
            // The head tensors never exist on the device: the heads kernel writes the raw outputs.
            if (keep_all || g.graph.is_tap(t)) && !taps.head.contains(&t) && !g.never_written(t) {
                *slot = Some(g.tensor_nchw(t)?);
            }
        }
        if let Some(t) = timings {
            t.backbone += t0.elapsed();
            t.device += device;
        }
        Ok(Activations { n: images.len(), input_h: h, input_w: w, tensors, raw })
    }

    fn forward(&self, images: &[&BgrImage], timings: Option<&mut Timings>) -> Result<Vec<RawOutput>> {
        let t0 = std::time::Instant::now();
        let (raw, device) = self.lock()?.device_timed(timings.is_some(), |g| g.raw_outputs(images))?;
        if let Some(t) = timings {
            t.backbone += t0.elapsed();
            t.device += device;
        }
        Ok(raw)
    }

    fn detect(
        &self,
        images: &[&BgrImage],
        scales: &[f64],
        post: &PostOptions,
        timings: Option<&mut Timings>,
    ) -> Result<Vec<Vec<Detection>>> {
        let t0 = std::time::Instant::now();
        let mut g = self.lock()?;
        // One pass for the batch: the device reads each image's factor from an array.
        let resizes: Vec<f32> = scales.iter().map(|&s| s as f32).collect();
        let (results, device) = g.device_timed(timings.is_some(), |g| g.detect_scaled(images, post, &resizes))?;
        if let Some(t) = timings {
            t.backbone += t0.elapsed();
            t.device += device;
        }
        Ok(results)
    }

    fn detect_specs(
        &self,
        images: &[&BgrImage],
        specs: &[ResizeSpec],
        post: &PostOptions,
        timings: Option<&mut Timings>,
    ) -> Result<Vec<Vec<Detection>>> {
        check_specs(images, specs)?;
        let t0 = std::time::Instant::now();
        let mut g = self.lock()?;
        // One pass for the batch: the device reads each image's factor from an array.
        let (results, device) = g.device_timed(timings.is_some(), |g| g.detect_specs(images, specs, post))?;
        if let Some(t) = timings {
            t.backbone += t0.elapsed();
            t.device += device;
        }
        Ok(results)
    }

    fn stage_input(&self, images: &[&BgrImage]) -> Result<()> {
        self.lock()?.stage_input(images)
    }

    fn bench_pass(
        &self,
        images: &[&BgrImage],
        mode: BenchMode,
        post: &PostOptions,
        timings: Option<&mut Timings>,
    ) -> Result<()> {
        self.lock()?.bench_pass(images, mode, post, timings)
    }

    fn detect_stream<'a>(
        &self,
        batches: &mut dyn Iterator<Item = Result<crate::exec::StreamBatch<'a>>>,
        post: &PostOptions,
        done: &mut dyn FnMut(Vec<Vec<Detection>>) -> Result<()>,
    ) -> Result<()> {
        self.lock()?.detect_stream(batches, post, done)
    }

    fn plan(&self, n: usize, h: usize, w: usize) -> Result<Arc<Plan>> {
        self.lock()?.plan_for(n, h, w)
    }

    fn held_bytes(&self) -> usize {
        self.lock().map(|g| g.held_bytes()).unwrap_or(0)
    }

    fn set_plan_cache_bytes(&self, bytes: usize) -> Result<()> {
        self.lock()?.set_plan_cache_bytes(bytes)
    }

    fn release_plans(&self) -> Result<()> {
        self.lock()?.release_plans()
    }

    fn healthy(&self) -> Result<()> {
        match self.lock()?.fault() {
            None => Ok(()),
            Some(f) => Err(Error::Cuda(format!("the device is unusable: {f}"))),
        }
    }

    fn set_cuda_graphs(&self, on: bool) -> Result<()> {
        self.lock()?.set_cuda_graphs(on);
        Ok(())
    }
}

/// Launches a fused op: `wts` are its uploaded weights and biases, one per conv of `Op::convs` (a
/// pair's both as one; see `GpuEngine::with_runner_fused`), `at` gives a tensor's device address and
/// (channels, height, width).
fn launch_fused(
    r: &mut dyn KernelRunner,
    op: &Op,
    wts: &[(DevBuf, DevBuf)],
    n: usize,
    at: &dyn Fn(TensorId) -> (u64, (usize, usize, usize)),
) -> Result<()> {
    use ops::fused::{DwPwBufs, InvResBufs, Sizes};
    let first = op.convs().first().map_or("?".to_string(), |c| c.name.clone());
    let missing = || Error::Cuda(format!("fused op at {first} has no weights"));
    let (wt, bias) = *wts.first().ok_or_else(missing)?;
    for c in op.convs() {
        let (ic, ih, iw) = at(c.input).1;
        let (oc, oh, ow) = at(c.output).1;
        let expect = |s: usize| (s + 2 * c.pad - c.kernel) / c.stride + 1;
        if ic != c.cin || expect(ih) != oh || expect(iw) != ow || c.out_channel_offset + c.cout > oc {
            return Err(Error::Cuda(format!("conv {}: tensor shapes do not match the op", c.name)));
        }
    }
    let sizes = |c: &crate::graph::Conv| {
        let (_, h, w) = at(c.input).1;
        let (_, oh, ow) = at(c.output).1;
        Sizes { n, h, w, oh, ow }
    };
    let res = |c: &crate::graph::Conv| c.residual.map_or(0, |t| at(t).0);
    match op {
        Op::ConvUpsampleAdd { conv: c, src } => {
            let (up, (uc, uh, uw)) = at(*src);
            let (y, (oc, _, _)) = at(c.output);
            if uc != c.cout {
                return Err(Error::Cuda(format!(
                    "conv {}: the upsampled map has {uc} channels, not {}",
                    c.name, c.cout
                )));
            }
            ops::fused::launch_upsample_add(
                r,
                c,
                sizes(c),
                (at(c.input).0, wt.ptr, bias.ptr, res(c)),
                (y, oc),
                (up, uh, uw),
            )
        }
        Op::ConvPair { a, b } => {
            let ((ya, (ca, ..)), (yb, (cb, ..))) = (at(a.output), at(b.output));
            ops::fused::launch_pair(r, (a, b), sizes(a), (at(a.input).0, wt.ptr, bias.ptr), (ya, ca), (yb, cb))
        }
        Op::DwPw { dw, pw } => {
            let (wpw, bpw) = *wts.get(1).ok_or_else(missing)?;
            let (y, (oc, _, _)) = at(pw.output);
            let bufs = DwPwBufs {
                x: at(dw.input).0,
                wdw: wt.ptr,
                bdw: bias.ptr,
                wpw: wpw.ptr,
                bpw: bpw.ptr,
                residual: res(pw),
                y,
                out_ctot: oc,
            };
            ops::fused::launch_dwpw(r, dw, pw, sizes(dw), &bufs)
        }
        Op::InvRes { ex, dw, pw } => {
            let ((wdw, bdw), (wpw, bpw)) = (*wts.get(1).ok_or_else(missing)?, *wts.get(2).ok_or_else(missing)?);
            let (y, (oc, _, _)) = at(pw.output);
            let bufs = InvResBufs {
                x: at(ex.input).0,
                wex: wt.ptr,
                bex: bias.ptr,
                wdw: wdw.ptr,
                bdw: bdw.ptr,
                wpw: wpw.ptr,
                bpw: bpw.ptr,
                residual: res(pw),
                y,
                out_ctot: oc,
            };
            let (_, h, w) = at(ex.input).1;
            let (_, oh, ow) = at(pw.output).1;
            ops::fused::launch_invres(r, (ex, dw, pw), Sizes { n, h, w, oh, ow }, &bufs)
        }
        _ => Err(Error::Cuda(format!("op at {first} is not a fused op"))),
    }
}

/// The tensors the CUDA executors never store, so their plans give them no arena space: the
/// depthwise output of a depthwise + pointwise op (its kernel keeps it in shared memory) and the head
/// maps (the heads kernels write the decoded raw outputs instead).
pub fn absent_tensors(graph: &Graph) -> Vec<TensorId> {
    let fused = graph.ops.iter().flat_map(|op| match op {
        Op::DwPw { dw, .. } => vec![dw.output],
        // The expanded and depthwise tiles live in shared memory only.
        Op::InvRes { ex, dw, .. } => vec![ex.output, dw.output],
        _ => Vec::new(),
    });
    graph.taps.head.iter().copied().chain(fused).collect()
}

/// Frees a slot's graphs and buffers.
fn free_slot(r: &mut dyn KernelRunner, s: IoSlot) -> Result<()> {
    let timed = s.timed_graphs.into_iter().flatten();
    for g in s.graph.into_iter().chain(s.graph_no_heads).chain(timed).chain(s.post_graph.map(|(_, g)| g)) {
        r.free_graph(g)?;
    }
    r.free(s.input_u8)?;
    for b in s.post.iter().flat_map(|p| p.all()) {
        r.free(b)?;
    }
    Ok(())
}

/// Frees a plan's device buffers.
fn free_all(r: &mut dyn KernelRunner, bufs: GpuBufs) -> Result<()> {
    let slots = bufs.spare.iter().chain(&bufs.staged);
    let slot_graphs: Vec<GraphId> = slots
        .flat_map(|s| {
            s.graph
                .into_iter()
                .chain(s.graph_no_heads)
                .chain(s.timed_graphs.into_iter().flatten())
                .chain(s.post_graph.map(|(_, g)| g))
        })
        .collect();
    let own = bufs.graph.into_iter().chain(bufs.graph_no_heads).chain(bufs.timed_graphs.into_iter().flatten());
    let own = own.chain(bufs.post_graph.map(|(_, g)| g));
    for g in own.chain(slot_graphs) {
        r.free_graph(g)?;
    }
    for b in bufs.all() {
        r.free(b)?;
    }
    Ok(())
}

/// [n, h, w, c] → [n, c, h, w].
pub fn nhwc_to_nchw(x: &[f32], n: usize, h: usize, w: usize, c: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    for b in 0..n {
        for y in 0..h {
            for xx in 0..w {
                for ch in 0..c {
                    out[((b * c + ch) * h + y) * w + xx] = x[((b * h + y) * w + xx) * c + ch];
                }
            }
        }
    }
    out
}

/// [n, c, h, w] → [n, h, w, c].
pub fn nchw_to_nhwc(x: &[f32], n: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    for b in 0..n {
        for ch in 0..c {
            for y in 0..h {
                for xx in 0..w {
                    out[((b * h + y) * w + xx) * c + ch] = x[((b * c + ch) * h + y) * w + xx];
                }
            }
        }
    }
    out
}
