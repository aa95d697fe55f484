//! The executor interface: what runs a graph on a device. The engine holds one `dyn Executor` and
//! every method of it runs there, so `set_backend` moves all of the work, not part of it.
//!
//! Layering: this module sits below the executors (src/cpu, src/cuda) and above the graph, the image
//! and the post-processing types it names; nothing here imports an executor.

use crate::detection::Detection;
use crate::error::{Error, Result};
use crate::graph::{Plan, TensorId};
use crate::image_io::{self, BgrImage, ResizeSpec};
use crate::post::{self, PostOptions, RawOutput, anchors};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Which backend runs the network; the one enum the engine, the CLI and `serve` parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    Cpu,
    /// The first CUDA GPU; an error when there is none.
    Cuda,
    /// CUDA when a GPU and NVRTC are present, else the CPU.
    Auto,
    /// The CUDA kernels run in the CPU simulation (slow; for checking kernels without a GPU).
    CudaSim,
}

impl std::str::FromStr for Backend {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        <Backend as clap::ValueEnum>::from_str(s, false)
            .map_err(|_| Error::InvalidArgument(format!("backend `{s}`: expected cpu, cuda, auto or cuda-sim")))
    }
}

/// A flag's `on` / `off` (`--cuda-graph on|off`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

impl Switch {
    pub fn is_on(self) -> bool {
        self == Switch::On
    }
}

/// The number format the CUDA executor computes in. The CPU always computes in f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    /// f32 activations and weights (the CPU reference's arithmetic, to rounding order).
    F32,
    /// f16 activations (NHWC, channels padded to 8) and weights on the tensor cores, f32 accumulation.
    F16,
}

impl Precision {
    /// The default for a backend that resolved to `real_gpu` (a GPU, not the simulation or the CPU):
    /// f16 on a GPU, f32 elsewhere.
    pub fn default_for(real_gpu: bool) -> Precision {
        if real_gpu { Precision::F16 } else { Precision::F32 }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        <Precision as clap::ValueEnum>::from_str(s, false)
            .map_err(|_| Error::InvalidArgument(format!("precision `{s}`: expected f32 or f16")))
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
    /// Time the device spent on the batch, from events on its stream (CUDA executor; zero elsewhere).
    pub device: Duration,
    /// Where the five stage times come from: the host's clock, or events on the device's stream
    /// (the CUDA executor's bench passes), where they add up to `device`.
    pub stage_clock: StageClock,
    /// With device stage times: the host's time putting the input where the device reads it (copying
    /// the batch into pinned staging memory and issuing the upload), which is host work.
    pub host_preprocess: Duration,
}

/// The clock of [`Timings`]' stage times.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StageClock {
    #[default]
    Host,
    Device,
}

impl StageClock {
    /// How `bench` names it.
    pub fn name(self) -> &'static str {
        match self {
            StageClock::Host => "host clock",
            StageClock::Device => "device events",
        }
    }
}

/// Above this many pixels (per image) the forward pass is refused rather than exhausting memory.
pub const MAX_INPUT_PIXELS: usize = 64_000_000;

/// The common size of a batch: equal sizes, at least one image, within the pixel bound.
pub fn check_batch(images: &[&BgrImage]) -> Result<(usize, usize)> {
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

/// The tensors of one forward pass that an executor hands back: the taps (every tensor with
/// `keep_all`), each [n, c, h, w], and the raw head outputs of each image.
pub struct Activations {
    pub n: usize,
    pub input_h: usize,
    pub input_w: usize,
    pub tensors: Vec<Option<Vec<f32>>>,
    pub raw: Vec<RawOutput>,
}

impl Activations {
    pub fn get(&self, t: TensorId) -> Option<&[f32]> {
        self.tensors.get(t).and_then(|v| v.as_deref())
    }
}

/// Runs the network on one device. Implementations: the CPU ([`crate::cpu::CpuExecutor`]) and the CUDA
/// kernels over a runner ([`crate::cuda::CudaExecutor`]: a GPU, or the CPU simulation).
pub trait Executor: Send + Sync {
    /// What runs: "cpu (2 threads, AVX-512 conv kernel)", "cuda:0 NVIDIA H200 (sm_90)", "simulation ...".
    fn describe(&self) -> String;

    /// Runs same-sized images; returns the taps (all tensors with `keep_all`) and the raw outputs.
    fn run(&self, images: &[&BgrImage], keep_all: bool, timings: Option<&mut Timings>) -> Result<Activations>;

    /// The raw head outputs of same-sized images in the goldens' layout.
    fn forward(&self, images: &[&BgrImage], timings: Option<&mut Timings>) -> Result<Vec<RawOutput>> {
        Ok(self.run(images, false, timings)?.raw)
    }

    /// Detections of same-sized images; image i was resized by `scales[i]`, its boxes come back in its
    /// original pixels.
    fn detect(
        &self,
        images: &[&BgrImage],
        scales: &[f64],
        post: &PostOptions,
        mut timings: Option<&mut Timings>,
    ) -> Result<Vec<Vec<Detection>>> {
        let raws = self.forward(images, timings.as_deref_mut())?;
        let t1 = Instant::now();
        let priors = anchors::priors(images[0].height, images[0].width);
        let dets = raws.iter().zip(scales).map(|(raw, &r)| post::postprocess(raw, &priors, r as f32, post)).collect();
        if let Some(t) = timings {
            t.postprocess += t1.elapsed();
        }
        Ok(dets)
    }

    /// Detections of images of any sizes, each made into a network input by its spec (one canvas size
    /// for all) and its boxes divided by the spec's scale. The default resizes on the host; the CUDA
    /// executor uploads each decoded image once and resizes on the device.
    fn detect_specs(
        &self,
        images: &[&BgrImage],
        specs: &[ResizeSpec],
        post: &PostOptions,
        mut timings: Option<&mut Timings>,
    ) -> Result<Vec<Vec<Detection>>> {
        check_specs(images, specs)?;
        let t0 = Instant::now();
        let inputs = images.iter().zip(specs).map(|(i, s)| image_io::apply_spec(i, s)).collect::<Result<Vec<_>>>()?;
        if let Some(t) = timings.as_deref_mut() {
            t.preprocess += t0.elapsed();
        }
        let refs: Vec<&BgrImage> = inputs.iter().map(|c| c.as_ref()).collect();
        let scales: Vec<f64> = specs.iter().map(|s| s.scale).collect();
        self.detect(&refs, &scales, post, timings)
    }

    /// Uploads a batch once to the device, where [`Executor::bench_pass`] with `input_on_device` finds
    /// it (`retinaface bench --input-on-device`). Executors without device memory refuse.
    fn stage_input(&self, _images: &[&BgrImage]) -> Result<()> {
        Err(Error::InvalidArgument(format!(
            "--input-on-device: the {} executor has no device memory to keep inputs in (use --backend cuda or cuda-sim)",
            self.describe()
        )))
    }

    /// One timed pass of `retinaface bench`: the network alone (`forward_only`: raw outputs, on the
    /// device where there is one) or with post-processing, from host images or from the staged input.
    fn bench_pass(
        &self,
        images: &[&BgrImage],
        mode: BenchMode,
        post: &PostOptions,
        timings: Option<&mut Timings>,
    ) -> Result<()> {
        if mode.input_on_device {
            return Err(Error::InvalidArgument(format!(
                "--input-on-device: the {} executor cannot run from a staged input",
                self.describe()
            )));
        }
        if mode.forward_only {
            return self.forward(images, timings).map(|_| ());
        }
        self.detect(images, &vec![1.0; images.len()], post, timings).map(|_| ())
    }

    /// Detections of a stream of batches, handed to `done` batch by batch in order; equal to
    /// [`Executor::detect`] on each. The CUDA executor keeps two batches in flight (the next one
    /// taken from `batches` and uploaded while the current one runs); the default runs them in turn.
    fn detect_stream<'a>(
        &self,
        batches: &mut dyn Iterator<Item = Result<StreamBatch<'a>>>,
        post: &PostOptions,
        done: &mut dyn FnMut(Vec<Vec<Detection>>) -> Result<()>,
    ) -> Result<()> {
        for b in batches {
            let b = b?;
            let refs: Vec<&BgrImage> = b.images.iter().map(|c| c.as_ref()).collect();
            done(self.detect(&refs, &b.scales, post, None)?)?;
        }
        Ok(())
    }

    /// The plan an n×3×h×w batch runs with: computed by [`Plan::new`] for every executor alike and
    /// cached with this executor's buffers for it.
    fn plan(&self, n: usize, h: usize, w: usize) -> Result<Arc<Plan>>;

    /// Bytes of activation memory the executor holds between passes (its cached plans' buffers).
    fn held_bytes(&self) -> usize;

    /// Bounds the bytes of cached plans' buffers; plans over it are evicted and their buffers freed.
    fn set_plan_cache_bytes(&self, bytes: usize) -> Result<()>;

    /// Evicts every cached plan and frees its buffers (the server, after a large batch, so resident
    /// memory falls back); the next pass plans and allocates afresh.
    fn release_plans(&self) -> Result<()>;

    /// Ok while results can be trusted; the reason otherwise (a sticky device fault). A server
    /// stops taking work and exits once its executor is unhealthy.
    fn healthy(&self) -> Result<()> {
        Ok(())
    }

    /// Whether the CUDA executor captures and replays graphs (ignored by executors without any).
    fn set_cuda_graphs(&self, _on: bool) -> Result<()> {
        Ok(())
    }
}

/// One batch of [`Executor::detect_stream`]: same-sized network inputs (borrowed or owned: the
/// executor is done with them once the batch is issued) and the factor each was resized by.
pub struct StreamBatch<'a> {
    pub images: Vec<std::borrow::Cow<'a, BgrImage>>,
    pub scales: Vec<f64>,
}

/// What a pass of `retinaface bench` times.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BenchMode {
    /// The input was uploaded once by [`Executor::stage_input`]: only the device's part is timed.
    pub input_on_device: bool,
    /// The network alone; its raw outputs are not post-processed (nor downloaded, on a device).
    pub forward_only: bool,
}

/// One spec per image, all with one canvas within [`MAX_INPUT_PIXELS`], each possible for its image.
pub fn check_specs(images: &[&BgrImage], specs: &[ResizeSpec]) -> Result<(usize, usize)> {
    if images.len() != specs.len() || images.is_empty() {
        return Err(Error::InvalidArgument(format!("{} images but {} resize specs", images.len(), specs.len())));
    }
    let (w, h) = (specs[0].canvas_w, specs[0].canvas_h);
    for (img, s) in images.iter().zip(specs) {
        s.check(img.width, img.height)?;
        if (s.canvas_w, s.canvas_h) != (w, h) {
            return Err(Error::InvalidArgument(format!(
                "batch mixes network input sizes {w}x{h} and {}x{}",
                s.canvas_w, s.canvas_h
            )));
        }
    }
    if h * w > MAX_INPUT_PIXELS {
        return Err(Error::InvalidArgument(format!("network input {w}x{h} is outside 1..={MAX_INPUT_PIXELS} pixels")));
    }
    Ok((h, w))
}

/// Indices 0..n grouped by equal `key`, groups in order of first appearance, indices ascending.
pub fn groups<K: PartialEq>(n: usize, key: impl Fn(usize) -> K) -> Vec<Vec<usize>> {
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

#[cfg(test)]
mod tests {
    #[test]
    fn groups_keep_first_appearance_order() {
        let keys = [3, 1, 3, 2, 1, 3];
        assert_eq!(super::groups(keys.len(), |j| keys[j]), vec![vec![0, 2, 5], vec![1, 4], vec![3]]);
        assert!(super::groups(0, |j| j).is_empty());
    }

    #[test]
    fn backend_parses_its_names_and_names_a_bad_one() {
        use super::Backend;
        assert_eq!("cuda-sim".parse::<Backend>().unwrap(), Backend::CudaSim);
        assert_eq!("cpu".parse::<Backend>().unwrap(), Backend::Cpu);
        assert!("tpu".parse::<Backend>().unwrap_err().to_string().contains("backend `tpu`"));
    }

    #[test]
    fn precision_parses_its_names_and_defaults_to_f16_only_on_a_gpu() {
        use super::Precision;
        assert_eq!("f16".parse::<Precision>().unwrap(), Precision::F16);
        assert_eq!("f32".parse::<Precision>().unwrap(), Precision::F32);
        assert!("bf16".parse::<Precision>().unwrap_err().to_string().contains("precision `bf16`"));
        assert_eq!((Precision::default_for(true), Precision::default_for(false)), (Precision::F16, Precision::F32));
    }
}
