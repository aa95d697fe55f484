//! The data path, top to bottom: image → tensor → backbone → FPN → SSH → heads → decode → NMS → detections.

use crate::cpu::CpuExecutor;
use crate::detection::Detection;
use crate::error::{Error, Result};
pub use crate::exec::{Activations, Backend, BenchMode, MAX_INPUT_PIXELS, Precision, StreamBatch, Timings};
use crate::exec::{Executor, check_batch, groups};
use crate::graph::{DEFAULT_PLAN_CACHE_BYTES, Plan};
use crate::image_io::{BgrImage, ResizeMode, ResizeSpec};
use crate::model::{self, Graph};
use crate::network::Network;
use crate::post::{PostOptions, RawOutput};
use crate::weights::{self, StateDictSource, WeightsSpec, synthetic::SyntheticSource};
use std::sync::Arc;

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

pub struct Engine {
    graph: Arc<Graph>,
    /// What runs every pass: the CPU until `set_backend` picks another.
    exec: Box<dyn Executor>,
    /// The byte bound of the executor's cached plans.
    plan_cache_bytes: usize,
    /// Whether the CUDA executor replays a captured graph per plan (default on).
    cuda_graphs: bool,
    /// What runs the network (`auto` resolved).
    backend: Backend,
    /// How a GPU's f16 executor picks conv variants (see [`crate::cuda::tune`]).
    tune: crate::cuda::tune::TuneMode,
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
        let graph = Arc::new(crate::passes::optimize(graph)?);
        let plan_cache_bytes = DEFAULT_PLAN_CACHE_BYTES;
        Ok(Engine {
            exec: Box::new(CpuExecutor::new(graph.clone(), plan_cache_bytes)),
            graph,
            plan_cache_bytes,
            cuda_graphs: true,
            backend: Backend::Cpu,
            tune: crate::cuda::tune::TuneMode::default(),
        })
    }

    /// Moves execution to `choice`; returns a line saying what runs (for `auto`, what was picked and why).
    /// The CUDA executor computes in its default precision: f16 on a GPU, f32 in the simulation.
    pub fn set_backend(&mut self, choice: Backend) -> Result<String> {
        self.set_backend_with(choice, None)
    }

    /// [`Self::set_backend`] computing in `precision` (None: f16 on a GPU, f32 elsewhere). The CPU
    /// computes in f32 only: f16 with `cpu` is an error, and `auto` falling back to the CPU says f32.
    pub fn set_backend_with(&mut self, choice: Backend, precision: Option<Precision>) -> Result<String> {
        use crate::cuda::{CudaExecutor, GpuEngine};
        if choice == Backend::Cpu && precision == Some(Precision::F16) {
            return Err(Error::InvalidArgument(
                "--precision f16 needs a CUDA backend (cuda, auto on a GPU, cuda-sim): the CPU computes in f32".into(),
            ));
        }
        let (backend, note) = match choice {
            Backend::Cpu => {
                self.exec = Box::new(CpuExecutor::new(self.graph.clone(), self.plan_cache_bytes));
                self.backend = Backend::Cpu;
                return Ok(format!("backend {}", self.exec.describe()));
            }
            Backend::CudaSim => (Backend::CudaSim, String::new()),
            Backend::Cuda => {
                crate::cuda::gpu_status()?;
                (Backend::Cuda, String::new())
            }
            Backend::Auto => match crate::cuda::gpu_status() {
                Ok(_) => (Backend::Cuda, "auto: ".to_string()),
                Err(e) => {
                    self.exec = Box::new(CpuExecutor::new(self.graph.clone(), self.plan_cache_bytes));
                    self.backend = Backend::Cpu;
                    return Ok(format!("backend auto: {}, precision f32, no usable GPU: {e}", self.exec.describe()));
                }
            },
        };
        let precision = precision.unwrap_or(Precision::default_for(backend == Backend::Cuda));
        let mut gpu = GpuEngine::with_precision(&self.graph, backend, precision)?;
        gpu.set_tune_mode(self.tune);
        gpu.set_plan_cache_bytes(self.plan_cache_bytes)?;
        gpu.set_cuda_graphs(self.cuda_graphs);
        self.exec = Box::new(CudaExecutor::new(gpu));
        self.backend = backend;
        Ok(format!("backend {note}{}", self.exec.describe()))
    }

    /// How the f16 executor on a GPU chooses each conv shape's kernel variant from the next
    /// `set_backend` on: `off` (the heuristic), `cached` (the default: timed once, cached on disk),
    /// `full` (re-timed, the cache rewritten). Without a GPU the heuristic always picks.
    pub fn set_tune_mode(&mut self, mode: crate::cuda::tune::TuneMode) {
        self.tune = mode;
    }

    /// What runs the network: "cpu (2 threads, AVX-512 conv kernel)", "cuda:0 NVIDIA H200 (sm_90)", "simulation (...)".
    pub fn backend_description(&self) -> String {
        self.exec.describe()
    }

    /// Bytes of activation memory the backend holds between passes.
    pub fn held_bytes(&self) -> usize {
        self.exec.held_bytes()
    }

    /// Bounds the memory of cached execution plans (one per input size and batch) to `bytes`; the
    /// least recently used are freed past it. The default is [`DEFAULT_PLAN_CACHE_BYTES`].
    pub fn set_plan_cache_bytes(&mut self, bytes: usize) -> Result<()> {
        self.plan_cache_bytes = bytes;
        self.exec.set_plan_cache_bytes(bytes)
    }

    /// Whether the CUDA backend captures each plan's forward pass into a CUDA graph and replays it
    /// (default on; `--cuda-graph off` launches every kernel on its own). No effect on the CPU.
    pub fn set_cuda_graphs(&mut self, on: bool) -> Result<()> {
        self.cuda_graphs = on;
        self.exec.set_cuda_graphs(on)
    }

    /// The backend that runs the network: `Cpu`, `Cuda` or `CudaSim` (never `Auto`).
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Ok while the backend's results can be trusted; after a sticky device fault, why not.
    pub fn healthy(&self) -> Result<()> {
        self.exec.healthy()
    }

    /// The execution plan of an n×3×h×w batch on the current backend.
    pub fn plan(&self, n: usize, h: usize, w: usize) -> Result<Arc<Plan>> {
        self.exec.plan(n, h, w)
    }

    pub fn network(&self) -> Network {
        self.graph.network
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Runs the network on same-sized images; returns the taps (all tensors with `keep_all`) and the
    /// raw outputs.
    pub fn run_graph(
        &self,
        images: &[&BgrImage],
        keep_all: bool,
        timings: Option<&mut Timings>,
    ) -> Result<Activations> {
        self.exec.run(images, keep_all, timings)
    }

    /// The raw head outputs of each image of a pass, in the goldens' layout.
    pub fn raw_outputs(&self, acts: &Activations) -> Vec<RawOutput> {
        acts.raw.clone()
    }

    /// Frees the cached plans' buffers, so that memory a large pass took goes back to the OS (the
    /// server calls this after large batches); the next pass allocates afresh.
    pub fn release_spare_buffers(&self) -> Result<()> {
        self.exec.release_plans()
    }

    /// Forward pass of same-sized network inputs.
    pub fn forward(&self, images: &[&BgrImage]) -> Result<Vec<RawOutput>> {
        self.forward_timed(images, None)
    }

    /// `forward`, adding per-stage times to `timings` (the GPU reports its whole pass as backbone).
    pub fn forward_timed(&self, images: &[&BgrImage], timings: Option<&mut Timings>) -> Result<Vec<RawOutput>> {
        self.exec.forward(images, timings)
    }

    /// Detections of same-sized network inputs, already resized; `scales[i]` is the factor image i was
    /// resized by, so its boxes come back in its original pixels. The batcher of `retinaface serve` and
    /// `detect_batch` both end here, on whichever backend runs the network.
    pub fn detect_resized(
        &self,
        images: &[&BgrImage],
        scales: &[f64],
        post: &PostOptions,
        timings: Option<&mut Timings>,
    ) -> Result<Vec<Vec<Detection>>> {
        if images.len() != scales.len() {
            return Err(Error::InvalidArgument(format!("{} images but {} resize factors", images.len(), scales.len())));
        }
        check_batch(images)?;
        self.exec.detect(images, scales, post, timings)
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
        timings: Option<&mut Timings>,
    ) -> Result<Vec<Vec<Detection>>> {
        opts.post.validate()?;
        let specs: Vec<ResizeSpec> =
            images.iter().map(|i| ResizeSpec::for_mode(opts.resize, i.width, i.height)).collect();
        let refs: Vec<&BgrImage> = images.iter().collect();
        self.detect_specs(&refs, &specs, &opts.post, timings)
    }

    /// Detections of decoded images of any sizes, image i made into a network input by `specs[i]`
    /// ([`ResizeSpec::for_mode`], or the video letterbox's `video::letterbox::spec`) and its boxes
    /// divided by the spec's scale. One batch per network input size; the backend resizes (the CUDA
    /// executor on the device, from one upload of each decoded image).
    pub fn detect_specs(
        &self,
        images: &[&BgrImage],
        specs: &[ResizeSpec],
        post: &PostOptions,
        mut timings: Option<&mut Timings>,
    ) -> Result<Vec<Vec<Detection>>> {
        if images.len() != specs.len() {
            return Err(Error::InvalidArgument(format!("{} images but {} resize specs", images.len(), specs.len())));
        }
        post.validate()?;
        let mut results: Vec<Vec<Detection>> = vec![Vec::new(); images.len()];
        for group in groups(images.len(), |j| (specs[j].canvas_w, specs[j].canvas_h)) {
            let batch: Vec<&BgrImage> = group.iter().map(|&j| images[j]).collect();
            let gs: Vec<ResizeSpec> = group.iter().map(|&j| specs[j]).collect();
            for (d, &j) in self.exec.detect_specs(&batch, &gs, post, timings.as_deref_mut())?.into_iter().zip(&group) {
                results[j] = d;
            }
        }
        Ok(results)
    }

    /// Detections of a stream of batches of already-resized network inputs (as
    /// [`Self::detect_resized`] on each), handed to `done` in order. On a CUDA backend two batches
    /// are in flight: the next is taken from `batches` (decoded, say) and uploaded while the current
    /// one runs, and its detections come back while the next runs.
    pub fn detect_stream<'a>(
        &self,
        batches: &mut dyn Iterator<Item = Result<StreamBatch<'a>>>,
        post: &PostOptions,
        done: &mut dyn FnMut(Vec<Vec<Detection>>) -> Result<()>,
    ) -> Result<()> {
        post.validate()?;
        self.exec.detect_stream(batches, post, done)
    }

    /// Uploads same-sized network inputs once to the backend's device for [`Self::bench_pass`] with
    /// `input_on_device` (`retinaface bench --input-on-device`); an error on the CPU.
    pub fn stage_input(&self, images: &[&BgrImage]) -> Result<()> {
        check_batch(images)?;
        self.exec.stage_input(images)
    }

    /// One timed pass of `retinaface bench` (see [`BenchMode`]).
    pub fn bench_pass(
        &self,
        images: &[&BgrImage],
        mode: BenchMode,
        post: &PostOptions,
        timings: Option<&mut Timings>,
    ) -> Result<()> {
        check_batch(images)?;
        self.exec.bench_pass(images, mode, post, timings)
    }
}
