//! The one graph executor over [`KernelRunner`]: the same code runs the network in the CPU simulation
//! (tests) and on the GPU. Weights are repacked for the NHWC kernels and uploaded once; every buffer a
//! frame needs is allocated once per (batch, height, width) and reused, so a steady stream of frames
//! allocates nothing. Post-processing runs on the device too; only detections come back.

use super::params::*;
use super::runner::{DevBuf, KernelRunner, KernelRunnerExt, LaunchDims};
use crate::detection::Detection;
use crate::error::{Error, Result};
use crate::exec::{Activations, Backend, BenchMode, Executor, Timings, check_batch, check_specs, groups};
use crate::graph::{DEFAULT_PLAN_CACHE_BYTES, Plan, PlanBuffers, PlanCache, PlanKey};
use crate::image_io::{BgrImage, ResizeSpec};
use crate::model::graph::{Graph, Op, TensorId};
use crate::post::{PostOptions, RawOutput, anchors};
use std::sync::Arc;

struct PostBufs {
    k: usize,
    max_out: usize,
    keys: DevBuf,
    count: DevBuf,
    order: DevBuf,
    kept: DevBuf,
    boxes: DevBuf,
    scores: DevBuf,
    lands: DevBuf,
    mask: DevBuf,
    dets: DevBuf,
    det_count: DevBuf,
}

impl PostBufs {
    fn all(&self) -> [DevBuf; 10] {
        [
            self.keys,
            self.count,
            self.order,
            self.kept,
            self.boxes,
            self.scores,
            self.lands,
            self.mask,
            self.dets,
            self.det_count,
        ]
    }
}

/// A plan's device memory: the f32 arena the plan lays the tensors out in (NHWC), the input bytes,
/// the raw outputs and the post-processing buffers (made on the first `detect`).
struct GpuBufs {
    arena: DevBuf,
    input_u8: DevBuf,
    loc: DevBuf,
    conf: DevBuf,
    landm: DevBuf,
    post: Option<PostBufs>,
    /// Decoded images and resize tables of `detect_specs` (made on its first use, grown as needed).
    resize: Option<ops::resize::Staging>,
}

impl GpuBufs {
    fn all(&self) -> Vec<DevBuf> {
        let mut v = vec![self.arena, self.input_u8, self.loc, self.conf, self.landm];
        if let Some(p) = &self.post {
            v.extend(p.all());
        }
        if let Some(s) = &self.resize {
            v.extend(s.all());
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
    /// Per op: the repacked weight and the bias of a conv.
    weights: Vec<Option<(DevBuf, DevBuf)>>,
    plans: PlanCache<GpuBufs>,
    last: Option<PlanKey>,
    /// The batch `stage_input` uploaded for `bench --input-on-device`: its (n, h, w) and bytes.
    staged: Option<(usize, usize, usize, DevBuf)>,
}

use super::ops::{self, dim};

impl GpuEngine {
    /// Builds the executor for `graph` on `backend` (`Cuda`: the first GPU; `CudaSim`: the CPU
    /// simulation); uploads the weights.
    pub fn new(graph: &Graph, backend: Backend) -> Result<GpuEngine> {
        let runner: Box<dyn KernelRunner> = match backend {
            Backend::CudaSim => {
                #[cfg(feature = "cuda-sim")]
                {
                    Box::new(super::sim::SimRunner::new())
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
                Box::new(r)
            }
        };
        GpuEngine::with_runner(graph, runner)
    }

    /// Builds the executor over any runner.
    pub fn with_runner(graph: &Graph, mut runner: Box<dyn KernelRunner>) -> Result<GpuEngine> {
        let mut weights = Vec::with_capacity(graph.ops.len());
        let mut heads = 0;
        for op in &graph.ops {
            match op {
                Op::Conv(c) | Op::Heads { conv: c, .. } => {
                    heads += usize::from(matches!(op, Op::Heads { .. }));
                    let w = runner.alloc_f32(&ops::conv::pack(c)?)?;
                    let b = runner.alloc_f32(&c.bias)?;
                    weights.push(Some((w, b)));
                }
                _ => weights.push(None),
            }
        }
        if heads != 3 {
            return Err(Error::Cuda(format!(
                "the graph has {heads} fused head ops, not 3: run passes::optimize before the CUDA executor"
            )));
        }
        Ok(GpuEngine {
            runner,
            graph: graph.clone(),
            weights,
            plans: PlanCache::new(DEFAULT_PLAN_CACHE_BYTES),
            last: None,
            staged: None,
        })
    }

    pub fn describe(&self) -> String {
        self.runner.describe()
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
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
        self.plans.get(&self.graph, key, |plan, evicted| {
            for b in evicted {
                free_all(r.as_mut(), b)?;
            }
            let (n, h, w) = (plan.n, plan.h, plan.w);
            let a = anchors::num_anchors(h, w);
            Ok(GpuBufs {
                arena: r.alloc(plan.arena_bytes())?,
                input_u8: r.alloc(n * h * w * 3)?,
                loc: r.alloc(4 * n * a * 4)?,
                conf: r.alloc(4 * n * a * 2)?,
                landm: r.alloc(4 * n * a * 10)?,
                post: None,
                resize: None,
            })
        })
    }

    /// The plan an n×3×h×w batch runs with (computed and cached, with its buffers, on first use).
    pub fn plan_for(&mut self, n: usize, h: usize, w: usize) -> Result<Arc<Plan>> {
        Ok(self.plan((n, h, w, false))?.0)
    }

    /// [`Self::forward_input`] of network-input sized images from the host.
    fn forward(&mut self, images: &[&BgrImage], keep_all: bool) -> Result<(Arc<Plan>, [DevBuf; 3])> {
        self.forward_input(BatchInput::Host(images), keep_all)
    }

    /// Runs preprocessing, the network and the heads; leaves loc/conf/landm on the device.
    /// With `keep_all` every tensor stays readable (by [`Self::tensor_nchw`]) after the pass.
    fn forward_input(&mut self, input: BatchInput<'_>, keep_all: bool) -> Result<(Arc<Plan>, [DevBuf; 3])> {
        let (n, h, w) = input.shape()?;
        if let BatchInput::Staged(..) = input
            && self.staged.is_none_or(|(sn, sh, sw, _)| (sn, sh, sw) != (n, h, w))
        {
            return Err(Error::InvalidArgument(format!("no {n}x{w}x{h} batch is staged on the device")));
        }
        dim(n * h * w * 3, "batch elements")?;
        let key = (n, h, w, keep_all);
        let (plan, bufs) = self.plan(key)?;
        let (arena, mut input_u8, loc, conf, landm) = (bufs.arena, bufs.input_u8, bufs.loc, bufs.conf, bufs.landm);
        self.last = Some(key);
        let r = &mut self.runner;
        if r.is_simulation() {
            // Every intermediate starts as NaN, so an element a kernel forgot to write poisons the outputs.
            for b in [arena, loc, conf, landm] {
                r.poison(b)?;
            }
        }
        let per = h * w * 3;
        match input {
            BatchInput::Host(images) => {
                for (i, img) in images.iter().enumerate() {
                    r.upload(input_u8, i * per, &img.data)?;
                }
            }
            BatchInput::Resize(images, specs) => {
                let mut staging = self.plans.buffers(key).and_then(|b| b.resize.take());
                let res = ops::resize::run(r.as_mut(), &mut staging, images, specs, input_u8);
                if let Some(b) = self.plans.buffers(key) {
                    b.resize = staging;
                }
                res?;
            }
            BatchInput::Staged(..) => {
                if let Some((.., b)) = self.staged {
                    input_u8 = b;
                }
            }
        }
        let g = &self.graph;
        let buf = |t: TensorId| DevBuf { ptr: arena.at(4 * plan.offsets[t]), bytes: 4 * plan.elems(t) };
        let total = n * per;
        let input = buf(g.input);
        r.launch(
            "preprocess_bgr",
            LaunchDims::linear(total, 256),
            &PreprocessParams { src: input_u8.ptr, dst: input.ptr, total: dim(total, "input")?, pad0: 0 },
        )?;
        let dims = |t: TensorId| plan.shapes[t];
        let mut anchor_base = [0usize; 3];
        for l in 1..3 {
            let (_, fh, fw) = dims(g.taps.head[l - 1]);
            anchor_base[l] = anchor_base[l - 1] + 2 * fh * fw;
        }
        for (i, op) in g.ops.iter().enumerate() {
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
            }
        }
        Ok((plan, [loc, conf, landm]))
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
        let loc = self.runner.download_f32(lb, n * a * 4)?;
        let conf = self.runner.download_f32(cb, n * a * 2)?;
        let landm = self.runner.download_f32(mb, n * a * 10)?;
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
        if t >= plan.shapes.len() || self.graph.taps.head.contains(&t) || !(plan.keep_all || self.graph.is_tap(t)) {
            return Err(Error::InvalidArgument(format!("tensor {t} is not kept on the device")));
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
        self.detect_scaled(images, post, 1.0)
    }

    /// Like [`Self::detect`] for images that were resized by `resize` before the network: boxes and
    /// landmarks are divided by it, as the reference does.
    pub fn detect_scaled(
        &mut self,
        images: &[&BgrImage],
        post: &PostOptions,
        resize: f32,
    ) -> Result<Vec<Vec<Detection>>> {
        post.validate()?;
        let (h, w) = check_batch(images)?;
        post_sizes(h, w, post)?;
        let (plan, raw) = self.forward(images, false)?;
        let (n, key) = (plan.n, (plan.n, h, w, false));
        let bufs = self.plans.buffers(key).ok_or_else(|| Error::Cuda("the pass's plan was evicted".into()))?;
        run_post(self.runner.as_mut(), &mut bufs.post, raw, n, h, w, post, resize)
    }
}

/// Where a pass's input comes from.
#[derive(Clone, Copy)]
enum BatchInput<'a> {
    /// Network-input sized images on the host, uploaded as they are.
    Host(&'a [&'a BgrImage]),
    /// Decoded images of any sizes and their specs (one canvas): each uploaded once, resized on the device.
    Resize(&'a [&'a BgrImage], &'a [ResizeSpec]),
    /// The batch `stage_input` left on the device: (n, h, w).
    Staged(usize, usize, usize),
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
            BatchInput::Staged(n, h, w) => Ok((n, h, w)),
        }
    }
}

impl GpuEngine {
    /// Detections of decoded images resized on the device by `specs` (one canvas size), boxes divided
    /// by `scale` (one factor for the batch, as [`Self::detect_scaled`]).
    pub fn detect_specs(
        &mut self,
        images: &[&BgrImage],
        specs: &[ResizeSpec],
        post: &PostOptions,
        scale: f32,
    ) -> Result<Vec<Vec<Detection>>> {
        post.validate()?;
        let (h, w) = check_specs(images, specs)?;
        post_sizes(h, w, post)?;
        let (plan, raw) = self.forward_input(BatchInput::Resize(images, specs), false)?;
        let n = plan.n;
        let bufs =
            self.plans.buffers((n, h, w, false)).ok_or_else(|| Error::Cuda("the pass's plan was evicted".into()))?;
        run_post(self.runner.as_mut(), &mut bufs.post, raw, n, h, w, post, scale)
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

    /// Uploads network-input sized images once, for [`Self::bench_pass`] with `input_on_device`.
    pub fn stage_input(&mut self, images: &[&BgrImage]) -> Result<()> {
        let (h, w) = check_batch(images)?;
        let n = images.len();
        if let Some((.., old)) = self.staged.take() {
            self.runner.free(old)?;
        }
        let buf = self.runner.alloc(n * h * w * 3)?;
        for (i, img) in images.iter().enumerate() {
            self.runner.upload(buf, i * h * w * 3, &img.data)?;
        }
        self.staged = Some((n, h, w, buf));
        Ok(())
    }

    /// One pass of `retinaface bench`: from the staged input or the host images; `forward_only` leaves
    /// the raw outputs on the device (nothing is downloaded), otherwise the device post-processing runs
    /// and only detections come back. Host clocks around a synchronisation: forward as backbone, the
    /// post-processing as postprocess.
    pub fn bench_pass(
        &mut self,
        images: &[&BgrImage],
        mode: BenchMode,
        post: &PostOptions,
        timings: Option<&mut Timings>,
    ) -> Result<()> {
        let t0 = std::time::Instant::now();
        let input = match (mode.input_on_device, self.staged) {
            (true, Some((n, h, w, _))) => BatchInput::Staged(n, h, w),
            (true, None) => return Err(Error::InvalidArgument("--input-on-device: no batch is staged".into())),
            (false, _) => BatchInput::Host(images),
        };
        let (n, h, w) = input.shape()?;
        if !mode.forward_only {
            post.validate()?;
            post_sizes(h, w, post)?;
        }
        let (_, raw) = self.forward_input(input, false)?;
        self.runner.synchronize()?;
        let t1 = std::time::Instant::now();
        if !mode.forward_only {
            let bufs = self
                .plans
                .buffers((n, h, w, false))
                .ok_or_else(|| Error::Cuda("the pass's plan was evicted".into()))?;
            run_post(self.runner.as_mut(), &mut bufs.post, raw, n, h, w, post, 1.0)?;
        }
        if let Some(t) = timings {
            t.backbone += t1 - t0;
            if !mode.forward_only {
                t.postprocess += t1.elapsed();
            }
        }
        Ok(())
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
        let raw = g.raw_outputs_keeping(images, keep_all)?;
        let (h, w) = check_batch(images)?;
        let taps = g.graph.taps;
        let mut tensors = vec![None; g.graph.tensors.len()];
        for (t, slot) in tensors.iter_mut().enumerate() {
            // The head tensors never exist on the device: the heads kernel writes the raw outputs.
            if (keep_all || g.graph.is_tap(t)) && !taps.head.contains(&t) {
                *slot = Some(g.tensor_nchw(t)?);
            }
        }
        if let Some(t) = timings {
            t.backbone += t0.elapsed();
        }
        Ok(Activations { n: images.len(), input_h: h, input_w: w, tensors, raw })
    }

    fn forward(&self, images: &[&BgrImage], timings: Option<&mut Timings>) -> Result<Vec<RawOutput>> {
        let t0 = std::time::Instant::now();
        let raw = self.lock()?.raw_outputs(images)?;
        if let Some(t) = timings {
            t.backbone += t0.elapsed();
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
        // The device post-processing takes one factor per call: one call per distinct factor.
        let mut results = vec![Vec::new(); images.len()];
        for group in groups(images.len(), |j| scales[j]) {
            let batch: Vec<&BgrImage> = group.iter().map(|&j| images[j]).collect();
            for (d, &j) in g.detect_scaled(&batch, post, scales[group[0]] as f32)?.into_iter().zip(&group) {
                results[j] = d;
            }
        }
        if let Some(t) = timings {
            t.backbone += t0.elapsed();
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
        let mut results = vec![Vec::new(); images.len()];
        for group in groups(images.len(), |j| specs[j].scale) {
            let batch: Vec<&BgrImage> = group.iter().map(|&j| images[j]).collect();
            let gs: Vec<ResizeSpec> = group.iter().map(|&j| specs[j]).collect();
            for (d, &j) in g.detect_specs(&batch, &gs, post, specs[group[0]].scale as f32)?.into_iter().zip(&group) {
                results[j] = d;
            }
        }
        if let Some(t) = timings {
            t.backbone += t0.elapsed();
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
}

/// Frees a plan's device buffers.
fn free_all(r: &mut dyn KernelRunner, bufs: GpuBufs) -> Result<()> {
    for b in bufs.all() {
        r.free(b)?;
    }
    Ok(())
}

/// (anchors, candidates k, detections kept) for an h×w input; an error past the device NMS's limit.
fn post_sizes(h: usize, w: usize, post: &PostOptions) -> Result<(usize, usize, usize)> {
    let a = anchors::num_anchors(h, w);
    let k = a.min(post.pre_nms_topk.unwrap_or(a));
    if k > NMS_MAX_CANDIDATES {
        return Err(Error::InvalidArgument(format!(
            "the CUDA NMS takes at most {NMS_MAX_CANDIDATES} candidates per image; this input has {a} anchors: set pre_nms_topk (the default is 5000)"
        )));
    }
    Ok((a, k, k.min(post.post_nms_topk.unwrap_or(k))))
}

/// Post-processing of raw outputs already on the device ([loc, conf, landm], each [n][A][d]):
/// threshold, top-k, decode, NMS, compaction; downloads only the detections.
#[allow(clippy::too_many_arguments)]
fn run_post(
    r: &mut dyn KernelRunner,
    slot: &mut Option<PostBufs>,
    raw: [DevBuf; 3],
    n: usize,
    h: usize,
    w: usize,
    post: &PostOptions,
    resize: f32,
) -> Result<Vec<Vec<Detection>>> {
    post.validate()?;
    if !(resize.is_finite() && resize > 0.0) {
        return Err(Error::InvalidArgument(format!("resize factor {resize} is not a positive number")));
    }
    let (a, k, max_out) = post_sizes(h, w, post)?;
    if k == 0 || max_out == 0 {
        return Ok(vec![Vec::new(); n]);
    }
    let words = k.div_ceil(64);
    let [loc, conf, landm] = raw;
    if slot.as_ref().is_none_or(|p| p.k != k || p.max_out != max_out) {
        if let Some(old) = slot.take() {
            for b in old.all() {
                r.free(b)?;
            }
        }
        *slot = Some(PostBufs {
            k,
            max_out,
            keys: r.alloc(8 * n * a)?,
            count: r.alloc(4 * n)?,
            order: r.alloc(4 * n * k)?,
            kept: r.alloc(4 * n)?,
            boxes: r.alloc(4 * n * k * 4)?,
            scores: r.alloc(4 * n * k)?,
            lands: r.alloc(4 * n * k * 10)?,
            mask: r.alloc(8 * n * k * words)?,
            dets: r.alloc(4 * n * max_out * 15)?,
            det_count: r.alloc(4 * n)?,
        });
    }
    let pb = slot.as_ref().ok_or_else(|| Error::Cuda("post buffers vanished".into()))?;
    if r.is_simulation() {
        for b in pb.all() {
            r.poison(b)?;
        }
    }
    r.memset(pb.count, 0)?;
    let (ni, ai, ki, wi) = (dim(n, "batch")?, dim(a, "anchors")?, dim(k, "candidates")?, dim(words, "words")?);
    let per_image =
        |blocks: usize, threads: u32| LaunchDims { grid: [blocks.max(1) as u32, n as u32, 1], block: [threads, 1, 1] };
    r.launch(
        "select_candidates",
        per_image(a.div_ceil(256), 256),
        &SelectParams {
            conf: conf.ptr,
            keys: pb.keys.ptr,
            count: pb.count.ptr,
            n: ni,
            num_anchors: ai,
            threshold: post.conf_threshold,
            pad0: 0,
        },
    )?;
    r.launch(
        "topk_rank",
        per_image(a.div_ceil(256), 256),
        &TopkParams {
            keys: pb.keys.ptr,
            count: pb.count.ptr,
            order: pb.order.ptr,
            kept: pb.kept.ptr,
            n: ni,
            num_anchors: ai,
            k: ki,
            pad0: 0,
        },
    )?;
    r.launch(
        "decode_sorted",
        per_image(k.div_ceil(128), 128),
        &DecodeParams {
            order: pb.order.ptr,
            kept: pb.kept.ptr,
            loc: loc.ptr,
            conf: conf.ptr,
            landm: landm.ptr,
            boxes: pb.boxes.ptr,
            scores: pb.scores.ptr,
            lands: pb.lands.ptr,
            n: ni,
            num_anchors: ai,
            k: ki,
            img_h: dim(h, "height")?,
            img_w: dim(w, "width")?,
            resize,
        },
    )?;
    r.launch(
        "nms_mask",
        LaunchDims { grid: [words as u32, words as u32, n as u32], block: [64, 1, 1] },
        &NmsMaskParams {
            boxes: pb.boxes.ptr,
            kept: pb.kept.ptr,
            mask: pb.mask.ptr,
            n: ni,
            k: ki,
            words: wi,
            threshold: post.nms_threshold,
        },
    )?;
    r.launch(
        "nms_reduce",
        LaunchDims { grid: [n as u32, 1, 1], block: [128, 1, 1] },
        &NmsReduceParams {
            mask: pb.mask.ptr,
            kept: pb.kept.ptr,
            boxes: pb.boxes.ptr,
            scores: pb.scores.ptr,
            lands: pb.lands.ptr,
            dets: pb.dets.ptr,
            det_count: pb.det_count.ptr,
            n: ni,
            k: ki,
            words: wi,
            max_out: dim(max_out, "post_nms_topk")?,
        },
    )?;
    let counts = r.download_i32(pb.det_count, n)?;
    let dets = r.download_f32(pb.dets, n * max_out * 15)?;
    let mut out = Vec::with_capacity(n);
    for (b, &c) in counts.iter().enumerate() {
        let c = usize::try_from(c)
            .ok()
            .filter(|&c| c <= max_out)
            .ok_or_else(|| Error::Cuda(format!("device returned {c} detections for image {b}")))?;
        let mut v = Vec::with_capacity(c);
        for d in dets[b * max_out * 15..][..c * 15].chunks_exact(15) {
            if r.is_simulation() && d.iter().any(|x| x.is_nan()) {
                return Err(Error::Cuda(format!("simulation: a detection of image {b} holds NaN (unwritten element)")));
            }
            let mut landmarks = [0.0f32; 10];
            landmarks.copy_from_slice(&d[5..15]);
            v.push(Detection { bbox: [d[0], d[1], d[2], d[3]], score: d[4], landmarks });
        }
        out.push(v);
    }
    Ok(out)
}

/// The device post-processing on raw outputs from the host (all of one size), for tests and for
/// callers that run the network elsewhere. Allocates per call.
pub fn device_postprocess(
    r: &mut dyn KernelRunner,
    raws: &[RawOutput],
    post: &PostOptions,
    resize: f32,
) -> Result<Vec<Vec<Detection>>> {
    let first = raws.first().ok_or_else(|| Error::InvalidArgument("no raw outputs".into()))?;
    let (h, w) = (first.h, first.w);
    let a = anchors::num_anchors(h, w);
    if raws
        .iter()
        .any(|x| x.h != h || x.w != w || x.loc.len() != a * 4 || x.conf.len() != a * 2 || x.landmarks.len() != a * 10)
    {
        return Err(Error::InvalidArgument("raw outputs of different sizes, or not matching their h×w".into()));
    }
    let n = raws.len();
    let cat =
        |f: &dyn Fn(&RawOutput) -> &Vec<f32>| raws.iter().flat_map(|x| f(x).iter().copied()).collect::<Vec<f32>>();
    let loc = r.alloc_f32(&cat(&|x| &x.loc))?;
    let conf = r.alloc_f32(&cat(&|x| &x.conf))?;
    let landm = r.alloc_f32(&cat(&|x| &x.landmarks))?;
    let mut slot = None;
    let res = run_post(r, &mut slot, [loc, conf, landm], n, h, w, post, resize);
    let mut bufs = vec![loc, conf, landm];
    if let Some(pb) = slot {
        bufs.extend(pb.all());
    }
    for b in bufs {
        r.free(b)?;
    }
    res
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
