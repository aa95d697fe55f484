//! The data path, top to bottom: image → tensor → backbone → FPN → SSH → heads → decode → NMS → detections.

use crate::cpu::{exec, ops};
use crate::detection::Detection;
use crate::error::{Error, Result};
use crate::image_io::{self, BgrImage, ResizeMode};
use crate::model::{self, Graph};
use crate::network::Network;
use crate::post::{self, PostOptions, RawOutput, anchors};
use crate::weights::{self, StateDictSource, WeightsSpec, synthetic::SyntheticSource};
use std::time::{Duration, Instant};

/// Detection settings: post-processing and the resize plan.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DetectOptions {
    pub post: PostOptions,
    pub resize: ResizeMode,
}

impl Default for DetectOptions {
    fn default() -> Self {
        DetectOptions { post: PostOptions::default(), resize: ResizeMode::Original }
    }
}

/// Time per stage of a batch, for `retinaface bench`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    pub preprocess: Duration,
    pub backbone: Duration,
    pub neck: Duration,
    pub heads: Duration,
    pub postprocess: Duration,
}

/// The network input size below which no face can be found is 1 pixel; above this many pixels
/// (per image) the forward pass is refused rather than exhausting memory.
pub const MAX_INPUT_PIXELS: usize = 64_000_000;

/// Which backend runs the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    Cpu,
    /// The first CUDA GPU; an error when there is none.
    Cuda,
    /// CUDA when a GPU and NVRTC are present, else the CPU.
    Auto,
    /// The CUDA kernels run in the CPU simulation (slow; for checking kernels without a GPU).
    CudaSim,
}

impl std::str::FromStr for BackendChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(BackendChoice::Cpu),
            "cuda" => Ok(BackendChoice::Cuda),
            "auto" => Ok(BackendChoice::Auto),
            "cuda-sim" => Ok(BackendChoice::CudaSim),
            other => Err(Error::InvalidArgument(format!("backend `{other}`: expected cpu, cuda, auto or cuda-sim"))),
        }
    }
}

/// The common size of a batch: equal sizes, at least one image, within the pixel bound.
pub(crate) fn check_batch(images: &[&BgrImage]) -> Result<(usize, usize)> {
    let first = images.first().ok_or_else(|| Error::InvalidArgument("empty batch".into()))?;
    let (h, w) = (first.height, first.width);
    if let Some(o) = images.iter().find(|i| i.height != h || i.width != w) {
        return Err(Error::InvalidArgument(format!("batch mixes image sizes {w}x{h} and {}x{}", o.width, o.height)));
    }
    if h == 0 || w == 0 || h * w > MAX_INPUT_PIXELS {
        return Err(Error::InvalidArgument(format!("network input {w}x{h} is outside 1..={MAX_INPUT_PIXELS} pixels")));
    }
    Ok((h, w))
}

/// Indices 0..n grouped by equal `key`, groups in order of first appearance, indices ascending.
fn groups<K: PartialEq>(n: usize, key: impl Fn(usize) -> K) -> Vec<Vec<usize>> {
    let mut groups: Vec<(K, Vec<usize>)> = Vec::new();
    for j in 0..n {
        let k = key(j);
        match groups.iter_mut().find(|(g, _)| *g == k) {
            Some((_, members)) => members.push(j),
            None => groups.push((k, vec![j])),
        }
    }
    groups.into_iter().map(|(_, members)| members).collect()
}

pub struct Engine {
    graph: Graph,
    /// The CUDA executor when a CUDA backend was chosen; the CPU runs the graph otherwise.
    gpu: Option<std::sync::Mutex<crate::cuda::GpuEngine>>,
    /// The CPU path's spare activation buffers, reused from frame to frame.
    pool: std::sync::Mutex<exec::BufferPool>,
}

impl Engine {
    /// Builds the network from a weights file or the synthetic recipe. `network` overrides what the
    /// file says or its shapes imply; a mismatch is an error that names both.
    pub fn new(spec: &WeightsSpec, network: Option<Network>) -> Result<Engine> {
        let graph = match spec {
            WeightsSpec::Synthetic { seed } => {
                let net = network
                    .ok_or_else(|| Error::InvalidArgument("synthetic weights need a network (--network)".into()))?;
                model::build(net, &mut SyntheticSource { seed: *seed })?
            }
            WeightsSpec::File(path) if weights::is_onnx(path)? => crate::onnx::import(path, network)?,
            WeightsSpec::File(path) => {
                let sd = weights::load(path)?;
                let inferred = weights::infer_network(&sd, path);
                let net = match (network, inferred) {
                    (Some(n), Ok(i)) if n != i => {
                        return Err(Error::InvalidArgument(format!(
                            "weights {} are for {i}, not for --network {n}",
                            path.display()
                        )));
                    }
                    (Some(n), _) => n,
                    (None, r) => r?,
                };
                let mut src = StateDictSource::new(&sd, net);
                let g = model::build(net, &mut src)?;
                src.check_all_used()?;
                g
            }
        };
        Ok(Engine { graph, gpu: None, pool: Default::default() })
    }

    /// Moves execution to `choice`; returns a line saying what runs (for `auto`, what was picked and why).
    pub fn set_backend(&mut self, choice: BackendChoice) -> Result<String> {
        use crate::cuda::{Backend, GpuEngine};
        let (backend, note) = match choice {
            BackendChoice::Cpu => {
                self.gpu = None;
                return Ok(format!("backend {}", crate::cpu::describe()));
            }
            BackendChoice::CudaSim => (Backend::Simulation, String::new()),
            BackendChoice::Cuda => {
                crate::cuda::gpu_status()?;
                (Backend::Cuda { ordinal: 0 }, String::new())
            }
            BackendChoice::Auto => match crate::cuda::gpu_status() {
                Ok(_) => (Backend::Cuda { ordinal: 0 }, "auto: ".to_string()),
                Err(e) => {
                    self.gpu = None;
                    return Ok(format!("backend auto: {}, no usable GPU: {e}", crate::cpu::describe()));
                }
            },
        };
        let gpu = GpuEngine::new(&self.graph, backend)?;
        let line = format!("backend {note}{}", gpu.describe());
        self.gpu = Some(std::sync::Mutex::new(gpu));
        Ok(line)
    }

    /// What runs the network: "cpu (2 threads, AVX-512 conv kernel)", "cuda:0 NVIDIA H200 (sm_90)", "simulation (...)".
    pub fn backend_description(&self) -> String {
        match self.gpu() {
            Some(Ok(g)) => g.describe(),
            Some(Err(e)) => e.to_string(),
            None => crate::cpu::describe(),
        }
    }

    fn gpu(&self) -> Option<Result<std::sync::MutexGuard<'_, crate::cuda::GpuEngine>>> {
        self.gpu.as_ref().map(|m| m.lock().map_err(|_| Error::Cuda("a previous GPU call panicked".into())))
    }

    pub fn network(&self) -> Network {
        self.graph.network
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Runs the network on same-sized images; returns the activations (all of them with `keep_all`).
    pub fn run_graph(
        &self,
        images: &[&BgrImage],
        keep_all: bool,
        timings: Option<&mut Timings>,
    ) -> Result<exec::Activations> {
        let (h, w) = check_batch(images)?;
        let t0 = Instant::now();
        // Concurrent passes each take the spare buffers there are and give theirs back after.
        let mut pool = std::mem::take(
            &mut *self.pool.lock().map_err(|_| Error::InvalidArgument("a previous pass panicked".into()))?,
        );
        let mut input = pool.take(images.len() * 3 * h * w);
        for (img, dst) in images.iter().zip(input.chunks_mut(3 * h * w)) {
            ops::preprocess(&img.data, h, w, dst);
        }
        let pre = t0.elapsed();
        let mut st = exec::StageTimes::default();
        let acts = exec::run(&self.graph, input, images.len(), h, w, keep_all, Some(&mut st), &mut pool);
        if let Ok(mut p) = self.pool.lock() {
            p.merge(pool);
        }
        if let Some(t) = timings {
            t.preprocess += pre;
            t.backbone += st.backbone;
            t.neck += st.neck;
            t.heads += st.heads;
        }
        Ok(acts)
    }

    /// The raw head outputs of each image in the goldens' layout.
    pub fn raw_outputs(&self, acts: &exec::Activations) -> Vec<RawOutput> {
        let (h, w) = (acts.input_h, acts.input_w);
        let a = anchors::num_anchors(h, w);
        (0..acts.n)
            .map(|b| {
                let mut raw =
                    RawOutput { h, w, loc: vec![0.0; a * 4], conf: vec![0.0; a * 2], landmarks: vec![0.0; a * 10] };
                let mut base = 0;
                for t in self.graph.taps.head {
                    let info = &self.graph.tensors[t];
                    let (th, tw) = (info.height(h), info.width(w));
                    let per_image = info.channels * th * tw;
                    let head = &acts.get(t).unwrap_or(&[])[b * per_image..(b + 1) * per_image];
                    let n = 2 * th * tw;
                    ops::heads_to_anchors(
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

    /// Returns a pass's remaining buffers to the pool for the next frame.
    pub fn recycle(&self, acts: exec::Activations) {
        if let Ok(mut p) = self.pool.lock() {
            for v in acts.tensors.into_iter().flatten() {
                p.give(v);
            }
        }
    }

    /// Drops the CPU path's spare buffers, so that memory a large pass took goes back to the OS
    /// (the server calls this after large batches); the next pass allocates afresh.
    pub fn release_spare_buffers(&self) {
        if let Ok(mut p) = self.pool.lock() {
            *p = exec::BufferPool::default();
        }
    }

    /// Forward pass of same-sized network inputs.
    pub fn forward(&self, images: &[&BgrImage]) -> Result<Vec<RawOutput>> {
        self.forward_timed(images, None)
    }

    /// `forward`, adding the CPU path's per-stage times to `timings` (the GPU reports none by stage).
    pub fn forward_timed(&self, images: &[&BgrImage], timings: Option<&mut Timings>) -> Result<Vec<RawOutput>> {
        if let Some(gpu) = self.gpu() {
            check_batch(images)?;
            return gpu?.raw_outputs(images);
        }
        let acts = self.run_graph(images, false, timings)?;
        let raws = self.raw_outputs(&acts);
        self.recycle(acts);
        Ok(raws)
    }

    /// Detections of same-sized network inputs, already resized; `scales[i]` is the factor image i was
    /// resized by, so its boxes come back in its original pixels. The batcher of `retinaface serve` and
    /// `detect_batch` both end here, on whichever backend runs the network.
    pub fn detect_resized(
        &self,
        images: &[&BgrImage],
        scales: &[f64],
        post: &PostOptions,
        mut timings: Option<&mut Timings>,
    ) -> Result<Vec<Vec<Detection>>> {
        if images.len() != scales.len() {
            return Err(Error::InvalidArgument(format!("{} images but {} resize factors", images.len(), scales.len())));
        }
        if let Some(gpu) = self.gpu() {
            let mut gpu = gpu?;
            let t1 = Instant::now();
            // The device post-processing takes one factor per call: one call per distinct factor.
            let mut results = vec![Vec::new(); images.len()];
            for group in groups(images.len(), |j| scales[j]) {
                let batch: Vec<&BgrImage> = group.iter().map(|&j| images[j]).collect();
                for (d, &j) in gpu.detect_scaled(&batch, post, scales[group[0]] as f32)?.into_iter().zip(&group) {
                    results[j] = d;
                }
            }
            if let Some(t) = timings.as_deref_mut() {
                t.backbone += t1.elapsed();
            }
            return Ok(results);
        }
        let raws = self.forward_timed(images, timings.as_deref_mut())?;
        let t1 = Instant::now();
        let priors = anchors::priors(images[0].height, images[0].width);
        let dets = raws.iter().zip(scales).map(|(raw, &r)| post::postprocess(raw, &priors, r as f32, post)).collect();
        if let Some(t) = timings {
            t.postprocess += t1.elapsed();
        }
        Ok(dets)
    }

    /// Detections of one image, best first, in its own pixels.
    pub fn detect(&self, img: &BgrImage, opts: &DetectOptions) -> Result<Vec<Detection>> {
        Ok(self.detect_batch(std::slice::from_ref(img), opts, None)?.pop().unwrap_or_default())
    }

    /// Detections of each image. Images are resized by `opts.resize`, then run in batches of equal size.
    pub fn detect_batch(
        &self,
        images: &[BgrImage],
        opts: &DetectOptions,
        mut timings: Option<&mut Timings>,
    ) -> Result<Vec<Vec<Detection>>> {
        opts.post.validate()?;
        let t0 = Instant::now();
        let prepared: Vec<(std::borrow::Cow<'_, BgrImage>, f64)> =
            images.iter().map(|i| image_io::apply_resize(i, opts.resize)).collect();
        if let Some(t) = timings.as_deref_mut() {
            t.preprocess += t0.elapsed();
        }
        let mut results: Vec<Vec<Detection>> = vec![Vec::new(); images.len()];
        // One batch per network input size (resized images of different originals can share one).
        for group in groups(prepared.len(), |j| (prepared[j].0.width, prepared[j].0.height)) {
            let batch: Vec<&BgrImage> = group.iter().map(|&j| prepared[j].0.as_ref()).collect();
            let scales: Vec<f64> = group.iter().map(|&j| prepared[j].1).collect();
            for (d, &j) in
                self.detect_resized(&batch, &scales, &opts.post, timings.as_deref_mut())?.into_iter().zip(&group)
            {
                results[j] = d;
            }
        }
        Ok(results)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn groups_keep_first_appearance_order() {
        let keys = [3, 1, 3, 2, 1, 3];
        assert_eq!(super::groups(keys.len(), |j| keys[j]), vec![vec![0, 2, 5], vec![1, 4], vec![3]]);
        assert!(super::groups(0, |j| j).is_empty());
    }
}
