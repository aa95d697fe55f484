//! `retinaface`: detect, forward, bench.

use clap::{Args, Parser, Subcommand};
use retinaface::exec::StageClock;
use retinaface::image_io::{self, DecodeLimits};
use retinaface::post::anchors;
use retinaface::weights::{Tensor, safetensors_io};
use retinaface::{
    Backend, BgrImage, DetectOptions, Engine, Error, Network, PostOptions, Precision, ResizeMode, Result, Timings,
    WeightsSpec,
};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "retinaface",
    version,
    about = "RetinaFace face detection, faithful to the reference PyTorch implementation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Detect faces in images.
    Detect(DetectArgs),
    /// Raw head outputs (loc, softmaxed conf, landmarks) of one input tensor, in the goldens' layout.
    Forward(ForwardArgs),
    /// Throughput, latency percentiles and per-stage times of the forward pass.
    Bench(BenchArgs),
    /// Every convolution shape of a network with each f16 variant: validated against the CPU
    /// reference, then timed on a GPU (or, in the simulation, bank conflicts and sectors per request),
    /// with SASS metrics and the variant the tuner keeps.
    BenchKernels(BenchKernelsArgs),
    /// HTTP inference server: KServe v2 / Triton protocol, /v1/detect, dynamic batching, metrics.
    Serve(retinaface::serve::ServeArgs),
    /// Write the network as ONNX with the reference export's interface (input `input`, outputs `loc`,
    /// `conf`, `landmarks`), BatchNorm folded, dynamic batch, height and width unless fixed.
    ExportOnnx(ExportOnnxArgs),
    /// Write the synthetic-weights recipe's state dict for a network as safetensors (reference layout).
    Synthetic(SyntheticArgs),
    /// Faces in a video file, stream (rtsp://, http://) or webcam (webcam:0), frame by frame, through ffmpeg.
    Video(VideoArgs),
    /// WIDER FACE validation: predict over the image tree, evaluate Easy / Medium / Hard AP.
    Widerface {
        #[command(subcommand)]
        command: WiderfaceCommand,
    },
}

#[derive(Args)]
struct SyntheticArgs {
    #[arg(long)]
    network: String,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long)]
    output: PathBuf,
}

#[derive(Args)]
struct ExportOnnxArgs {
    /// Weights: safetensors, a PyTorch checkpoint or an ONNX RetinaFace.
    #[arg(long, conflicts_with = "synthetic_seed")]
    weights: Option<PathBuf>,
    /// Use the synthetic-weights recipe with this seed instead of a file (needs --network).
    #[arg(long)]
    synthetic_seed: Option<u64>,
    /// Network; inferred from the weights when not given.
    #[arg(long)]
    network: Option<String>,
    /// The ONNX file to write.
    #[arg(long)]
    output: PathBuf,
    /// ONNX opset (13 to 21; the reference exports 16).
    #[arg(long, default_value_t = retinaface::onnx::export::DEFAULT_OPSET)]
    opset: i64,
    /// Fix the input height and width (HxW, e.g. 640x640) instead of leaving them dynamic.
    #[arg(long = "static")]
    static_size: Option<String>,
    /// Fix the batch size instead of leaving it dynamic.
    #[arg(long)]
    batch: Option<usize>,
}

#[derive(Subcommand)]
enum WiderfaceCommand {
    /// Detect over `DIR/<event>/<image>.jpg` and write `<out>/<event>/<image>.txt` (resumable).
    Predict(PredictArgs),
    /// Easy / Medium / Hard AP of a prediction tree against the four ground-truth .mat files.
    Eval(EvalArgs),
}

#[derive(Args)]
struct PredictArgs {
    /// The validation image tree (WIDER_val/images).
    #[arg(long)]
    images: PathBuf,
    /// Where the prediction files go.
    #[arg(long)]
    out: PathBuf,
    /// original (r = 1) or multiscale (the reference's 1600/2150 protocol).
    #[arg(long, default_value = "original")]
    resize: String,
    #[command(flatten)]
    weights: WeightsArgs,
    /// No progress line on stderr.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct EvalArgs {
    /// The prediction tree.
    #[arg(long)]
    pred: PathBuf,
    /// Directory with wider_face_val.mat and wider_{easy,medium,hard}_val.mat.
    #[arg(long)]
    gt: PathBuf,
    /// Print {"easy": .., "medium": .., "hard": ..} instead of the three lines.
    #[arg(long)]
    json: bool,
    /// Write the precision-recall curves as CSV.
    #[arg(long)]
    curves_csv: Option<PathBuf>,
    /// Write a PNG plot of the three precision-recall curves.
    #[arg(long)]
    curves_png: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct WeightsArgs {
    /// Weights: the engine's safetensors, a PyTorch checkpoint of either layout (read directly), or an
    /// ONNX RetinaFace (the reference's exports, ours).
    #[arg(long, conflicts_with = "synthetic_seed")]
    weights: Option<PathBuf>,
    /// Use the synthetic-weights recipe with this seed instead of a file (needs --network).
    #[arg(long)]
    synthetic_seed: Option<u64>,
    /// Network; inferred from the weights when not given.
    #[arg(long)]
    network: Option<String>,
    /// Backend: cpu, cuda, auto (CUDA when a GPU is present, else cpu) or cuda-sim (the CUDA kernels in
    /// the CPU simulation: slow, for checking kernels without a GPU).
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    backend: Backend,
    /// CUDA backends: capture each batch size's forward pass into a CUDA graph once and replay it
    /// (on), or launch every kernel on its own (off).
    #[arg(long, value_enum, default_value_t = retinaface::exec::Switch::On)]
    cuda_graph: retinaface::exec::Switch,
    /// Number format of the CUDA executor: f16 (tensor cores, f32 accumulation; the default on a GPU)
    /// or f32 (the default in cuda-sim). The CPU computes in f32 only.
    #[arg(long, value_enum)]
    precision: Option<Precision>,
    /// off | cached | full: how the f16 executor on a GPU picks each conv shape's kernel (timed and
    /// cached on disk with `cached`; see cuda::tune).
    #[arg(long, default_value = "cached")]
    tune: String,
}

impl WeightsArgs {
    fn engine(&self) -> Result<Engine> {
        let network = self.network.as_deref().map(str::parse::<Network>).transpose()?;
        let spec = match (&self.weights, self.synthetic_seed) {
            (Some(p), None) => WeightsSpec::File(p.clone()),
            (None, Some(seed)) => WeightsSpec::Synthetic { seed },
            _ => return Err(Error::InvalidArgument("give --weights PATH or --synthetic-seed S".into())),
        };
        let mut engine = Engine::new(&spec, network)?;
        engine.set_tune_mode(self.tune.parse()?);
        engine.set_cuda_graphs(self.cuda_graph.is_on())?;
        let line = engine.set_backend_with(self.backend, self.precision)?;
        eprintln!("{line}");
        Ok(engine)
    }
}

#[derive(Args)]
struct DetectArgs {
    /// JPEG or PNG files.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    #[command(flatten)]
    weights: WeightsArgs,
    #[arg(long, default_value_t = 0.02)]
    conf_threshold: f32,
    #[arg(long, default_value_t = 0.4)]
    nms_threshold: f32,
    #[arg(long, default_value_t = 5000)]
    pre_nms_topk: usize,
    #[arg(long, default_value_t = 750)]
    post_nms_topk: usize,
    /// Detections drawn and listed in the table have at least this score.
    #[arg(long, default_value_t = 0.6)]
    vis_threshold: f32,
    /// original (the reference's default), multiscale (WIDER FACE protocol) or long-side:N.
    #[arg(long, default_value = "original")]
    resize: String,
    /// One JSON object per image per line, with every detection the post-processing keeps.
    #[arg(long)]
    json: bool,
    /// Write each image with its detections drawn into this directory.
    #[arg(long)]
    save_image: Option<PathBuf>,
    /// Write each face scoring at least --vis-threshold as an aligned crop (ArcFace template, as
    /// insightface's norm_crop) into this directory: `<image stem>_face<i>.png`, best first.
    #[arg(long)]
    crops: Option<PathBuf>,
    /// The side of the aligned crops: a multiple of 112 or of 128.
    #[arg(long, default_value_t = 112)]
    crop_size: usize,
}

#[derive(Args)]
struct ForwardArgs {
    #[command(flatten)]
    weights: WeightsArgs,
    /// safetensors with `input_bgr_u8` [H, W, 3] u8.
    #[arg(long)]
    input: PathBuf,
    /// safetensors to write `loc` [A,4], `conf` [A,2], `landmarks` [A,10], `priors` [A,4] (f32).
    #[arg(long)]
    output: PathBuf,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    weights: WeightsArgs,
    /// Network input size WxH.
    #[arg(long, default_value = "640x640")]
    size: String,
    /// Batch sizes to sweep, comma-separated (e.g. 1,8,64,256): one row (one JSON line) each.
    #[arg(long, default_value = "1")]
    batch: String,
    /// Timed iterations per batch size (after one warm-up).
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Print one JSON object per batch size (one per line) instead of the table.
    #[arg(long)]
    json: bool,
    /// Time the network alone (raw loc / conf / landmarks, as a PyTorch or ONNX model returns them):
    /// no resize, decoding or NMS. On CUDA the raw outputs stay on the device (nothing is downloaded).
    #[arg(long)]
    forward_only: bool,
    /// Upload the batch once before timing and run every iteration from device memory: the device's
    /// part alone (CUDA and cuda-sim; an error on the CPU, which has no device memory).
    #[arg(long)]
    input_on_device: bool,
}

#[derive(Args)]
struct BenchKernelsArgs {
    #[arg(long)]
    network: String,
    /// Network input size WxH (as for `bench`).
    #[arg(long, default_value = "640x640")]
    size: String,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Kernel precision: f16 (the tensor-core variants; the f32 path has one kernel per shape).
    #[arg(long, default_value = "f16")]
    precision: String,
    /// cuda, cuda-sim, or auto (cuda when a GPU is present, else the simulation).
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Timed launches per variant on a GPU.
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// off | cached | full: how the kept variant is chosen (see cuda::tune).
    #[arg(long, default_value = "cached")]
    tune: String,
}

fn bench_kernels(a: BenchKernelsArgs) -> Result<()> {
    use retinaface::cuda::{bench_kernels as bk, tune};
    if a.precision != "f16" {
        return Err(Error::InvalidArgument(format!(
            "bench-kernels --precision `{}`: only f16 has variants to compare",
            a.precision
        )));
    }
    let network: Network = a.network.parse()?;
    let (w, h) = parse_size(&a.size)?;
    if a.batch == 0 {
        return Err(Error::InvalidArgument("--batch 0".into()));
    }
    let mode: tune::TuneMode = a.tune.parse()?;
    let layers = bk::layers(network, w, h, a.batch)?;
    let use_gpu = match a.backend.as_str() {
        "cuda" => true,
        "cuda-sim" => false,
        "auto" => retinaface::cuda::gpu_status().is_ok(),
        other => return Err(Error::InvalidArgument(format!("--backend `{other}`: expected cuda, cuda-sim or auto"))),
    };
    let (rows, device) = if use_gpu {
        let mut r = retinaface::cuda::gpu::GpuRunner::new(0)?;
        let key = bk::device_key(r.info());
        let mut cache = match tune::default_cache_path() {
            Some(p) => tune::TuneCache::load(&p)?,
            None => tune::TuneCache::default(),
        };
        let rows = bk::run(&mut r, Some(&key), &layers, a.iters, mode, &mut cache)?;
        cache.save()?;
        (rows, Some(key.name))
    } else {
        #[cfg(feature = "cuda-sim")]
        {
            let mut r = retinaface::cuda::sim::SimRunner::new();
            (bk::run(&mut r, None, &layers, 0, mode, &mut tune::TuneCache::default())?, None)
        }
        #[cfg(not(feature = "cuda-sim"))]
        return Err(Error::InvalidArgument("no GPU and this build has no simulation (feature cuda-sim)".into()));
    };
    emit(format!(
        "bench-kernels {} {w}x{h} batch {} f16 on {}",
        network.name(),
        a.batch,
        device.as_deref().unwrap_or("the CUDA simulation (metrics: bank conflicts, sectors/request, SASS)")
    ));
    emit(bk::format(&rows, device.as_deref()).trim_end());
    bk::check_rows(&rows)
}

/// Prints a line on stdout; a closed pipe (`| head`) ends the program quietly instead of panicking.
fn emit(line: impl std::fmt::Display) {
    use std::io::Write;
    if let Err(e) = writeln!(std::io::stdout().lock(), "{line}") {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(1);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Detect(a) => detect(a),
        Command::Forward(a) => forward(a),
        Command::Bench(a) => bench(a),
        Command::BenchKernels(a) => bench_kernels(a),
        Command::Synthetic(a) => synthetic(a),
        Command::ExportOnnx(a) => export_onnx(a),
        Command::Serve(a) => retinaface::serve::run(a),
        Command::Video(a) => video(a),
        Command::Widerface { command: WiderfaceCommand::Predict(a) } => widerface_predict(a),
        Command::Widerface { command: WiderfaceCommand::Eval(a) } => widerface_eval(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn detect(a: DetectArgs) -> Result<()> {
    let engine = a.weights.engine()?;
    let opts = DetectOptions {
        post: PostOptions {
            conf_threshold: a.conf_threshold,
            nms_threshold: a.nms_threshold,
            pre_nms_topk: Some(a.pre_nms_topk),
            post_nms_topk: Some(a.post_nms_topk),
        },
        resize: a.resize.parse::<ResizeMode>()?,
    };
    opts.post.validate()?;
    for dir in [&a.save_image, &a.crops].into_iter().flatten() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    if a.crops.is_some() {
        retinaface::align::template(a.crop_size)?;
    }
    let mut failed = 0;
    for path in &a.images {
        let result = image_io::load(path, &DecodeLimits::default()).and_then(|img| {
            let dets = engine.detect(&img, &opts)?;
            Ok((img, dets))
        });
        let (mut img, dets) = match result {
            Ok(x) => x,
            Err(e) => {
                eprintln!("error: {e}");
                failed += 1;
                continue;
            }
        };
        if a.json {
            let obj = serde_json::json!({"image": path, "width": img.width, "height": img.height, "detections": dets});
            emit(&obj);
        } else {
            let shown: Vec<_> = dets.iter().filter(|d| d.score >= a.vis_threshold).collect();
            emit(format!(
                "{} ({}x{}): {} faces with score >= {} ({} detections kept)",
                path.display(),
                img.width,
                img.height,
                shown.len(),
                a.vis_threshold,
                dets.len()
            ));
            emit(format!("  {:>6}  {:>8} {:>8} {:>8} {:>8}", "score", "x1", "y1", "x2", "y2"));
            for d in shown {
                emit(format!(
                    "  {:>6.3}  {:>8.1} {:>8.1} {:>8.1} {:>8.1}",
                    d.score, d.bbox[0], d.bbox[1], d.bbox[2], d.bbox[3]
                ));
            }
        }
        if let Some(dir) = &a.crops {
            let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into());
            for (i, d) in dets.iter().filter(|d| d.score >= a.vis_threshold).enumerate() {
                let crop = retinaface::align::norm_crop(&img, &d.landmarks, a.crop_size)?;
                let out = dir.join(format!("{stem}_face{i}.png"));
                retinaface::draw::save(&crop, &out)?;
            }
        }
        if let Some(dir) = &a.save_image {
            retinaface::draw::draw_detections(&mut img, &dets, a.vis_threshold);
            let name = path.file_name().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("image.png"));
            let out = dir.join(name);
            retinaface::draw::save(&img, &out)?;
            if !a.json {
                emit(format!("  saved {}", out.display()));
            }
        }
    }
    if failed > 0 {
        return Err(Error::InvalidArgument(format!("{failed} of {} images failed", a.images.len())));
    }
    Ok(())
}

fn forward(a: ForwardArgs) -> Result<()> {
    let engine = a.weights.engine()?;
    let bytes = std::fs::read(&a.input).map_err(|e| Error::io(&a.input, e))?;
    let bad = |msg: String| Error::InputFile { path: a.input.clone(), msg };
    let st =
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let t = st.tensor("input_bgr_u8").map_err(|_| bad("no tensor `input_bgr_u8`".into()))?;
    let shape = t.shape();
    if t.dtype() != safetensors::Dtype::U8 || shape.len() != 3 || shape[2] != 3 {
        return Err(bad(format!("`input_bgr_u8` must be u8 [H, W, 3], found {:?} {shape:?}", t.dtype())));
    }
    let img = BgrImage::new(shape[1], shape[0], t.data().to_vec())?;
    let raw = engine.forward(&[&img])?.pop().ok_or_else(|| bad("no output".into()))?;
    let a_n = raw.conf.len() / 2;
    let mut out = BTreeMap::new();
    out.insert("loc".to_string(), Tensor { shape: vec![a_n, 4], data: raw.loc });
    out.insert("conf".to_string(), Tensor { shape: vec![a_n, 2], data: raw.conf });
    out.insert("landmarks".to_string(), Tensor { shape: vec![a_n, 10], data: raw.landmarks });
    out.insert("priors".to_string(), Tensor { shape: vec![a_n, 4], data: anchors::priors(img.height, img.width) });
    safetensors_io::save(&out, Some(engine.network().name()), &a.output)
}

fn parse_size(s: &str) -> Result<(usize, usize)> {
    let bad = || Error::InvalidArgument(format!("size `{s}`: expected WxH, e.g. 640x640"));
    let (w, h) = s.split_once('x').ok_or_else(bad)?;
    let (w, h) = (w.parse::<usize>().map_err(|_| bad())?, h.parse::<usize>().map_err(|_| bad())?);
    if w == 0 || h == 0 {
        return Err(bad());
    }
    Ok((w, h))
}

/// `--batch 1,8,64`: each at least 1, no repeats.
fn parse_batches(s: &str) -> Result<Vec<usize>> {
    let bad = |why: &str| Error::InvalidArgument(format!("--batch `{s}`: {why} (expected sizes like 1,8,64,256)"));
    let mut out = Vec::new();
    for part in s.split(',') {
        let b = part.trim().parse::<usize>().map_err(|_| bad(&format!("`{}` is not a batch size", part.trim())))?;
        if b == 0 {
            return Err(bad("a batch holds at least one image"));
        }
        if out.contains(&b) {
            return Err(bad(&format!("{b} is listed twice")));
        }
        out.push(b);
    }
    Ok(out)
}

/// One batch size's measurements.
struct BenchRow {
    batch: usize,
    images_per_s: f64,
    /// Per batch, end to end on the host clock, sorted.
    latency_ms: Vec<f64>,
    stages: Timings,
    /// End to end with batches streamed (`Engine::detect_stream`: two in flight on a GPU), when the
    /// mode runs host images to detections.
    pipelined_images_per_s: Option<f64>,
}

fn bench(a: BenchArgs) -> Result<()> {
    let mut wa = a.weights.clone();
    if wa.weights.is_none() && wa.synthetic_seed.is_none() {
        wa.synthetic_seed = Some(1);
    }
    if wa.network.is_none() && wa.weights.is_none() {
        return Err(Error::InvalidArgument("bench with synthetic weights needs --network".into()));
    }
    let (w, h) = parse_size(&a.size)?;
    let batches = parse_batches(&a.batch)?;
    if a.iters == 0 {
        return Err(Error::InvalidArgument("--iters must be at least 1".into()));
    }
    let engine = wa.engine()?;
    // A deterministic textured frame: the work does not depend on pixel values, only on the size.
    let data: Vec<u8> = (0..w * h * 3).map(|i| ((i * 7919) % 251) as u8).collect();
    let img = BgrImage::new(w, h, data)?;
    let mode = retinaface::exec::BenchMode { input_on_device: a.input_on_device, forward_only: a.forward_only };
    let post = DetectOptions::default().post;
    let gmacs = engine.graph().macs(h, w) as f64 / 1e9;
    let what = match (a.forward_only, a.input_on_device) {
        (true, true) => "forward pass from device memory, outputs left on the device",
        (true, false) => "host images -> forward pass (raw outputs on the device where there is one)",
        (false, true) => "device memory -> detections on the host",
        (false, false) => "host images -> detections on the host",
    };
    if !a.json {
        emit(format!(
            "{} on {}, {w}x{h}, {} iterations per batch size, {gmacs:.2} GMAC/image; {what}",
            engine.network(),
            engine.backend_description(),
            a.iters
        ));
        emit(format!(
            "{:>6} {:>11} {:>9} {:>9} {:>9} {:>9} {:>10} | per batch, ms: {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} | {:>11} {}",
            "batch",
            "images/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "min ms",
            "device ms",
            "preproc",
            "backbone",
            "fpn+ssh",
            "heads",
            "post",
            "host prep",
            "pipelined/s",
            "stages from"
        ));
    }
    for &n in &batches {
        let batch = vec![img.clone(); n];
        let refs: Vec<&BgrImage> = batch.iter().collect();
        if a.input_on_device {
            engine.stage_input(&refs)?;
        }
        engine.bench_pass(&refs, mode, &post, None)?;
        let mut stages = Timings::default();
        let mut latency_ms = Vec::with_capacity(a.iters);
        let start = Instant::now();
        for _ in 0..a.iters {
            let t0 = Instant::now();
            engine.bench_pass(&refs, mode, &post, Some(&mut stages))?;
            latency_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        let images_per_s = (a.iters * n) as f64 / start.elapsed().as_secs_f64();
        latency_ms.sort_by(f64::total_cmp);
        let pipelined_images_per_s = if a.forward_only || a.input_on_device {
            None
        } else {
            Some(bench_stream(&engine, &refs, a.iters, &post)?)
        };
        let row = BenchRow { batch: n, images_per_s, latency_ms, stages, pipelined_images_per_s };
        emit_bench_row(&row, &a, &engine, (w, h), gmacs, what);
    }
    Ok(())
}

/// Images per second of `iters` copies of `batch` streamed through [`Engine::detect_stream`].
fn bench_stream(engine: &Engine, batch: &[&BgrImage], iters: usize, post: &PostOptions) -> Result<f64> {
    let scales = vec![1.0; batch.len()];
    let mut left = iters;
    let mut it = std::iter::from_fn(|| {
        (left > 0).then(|| {
            left -= 1;
            Ok(retinaface::exec::StreamBatch {
                images: batch.iter().map(|&i| std::borrow::Cow::Borrowed(i)).collect(),
                scales: scales.clone(),
            })
        })
    });
    let start = Instant::now();
    engine.detect_stream(&mut it, post, &mut |_| Ok(()))?;
    Ok((iters * batch.len()) as f64 / start.elapsed().as_secs_f64())
}

fn emit_bench_row(row: &BenchRow, a: &BenchArgs, engine: &Engine, (w, h): (usize, usize), gmacs: f64, what: &str) {
    let lat = &row.latency_ms;
    let pct = |p: f64| lat[((p / 100.0) * (lat.len() - 1) as f64).round() as usize];
    let t = &row.stages;
    let per = |d: std::time::Duration| d.as_secs_f64() * 1e3 / a.iters as f64;
    // Device time comes from CUDA events where the executor records them; zero means not measured.
    let device = (!t.device.is_zero()).then(|| per(t.device));
    // With device stage times, the host's part of preprocessing (issuing the upload) is reported apart.
    let host_preprocess = (t.stage_clock == StageClock::Device).then(|| per(t.host_preprocess));
    if a.json {
        let obj = serde_json::json!({
            "network": engine.network().name(), "backend": engine.backend_description(), "width": w, "height": h,
            "batch": row.batch, "iters": a.iters, "forward_only": a.forward_only, "input_on_device": a.input_on_device,
            "measures": what,
            "images_per_s": row.images_per_s,
            "pipelined_images_per_s": row.pipelined_images_per_s,
            "latency_ms": {"p50": pct(50.0), "p90": pct(90.0), "p99": pct(99.0), "min": lat[0]},
            "device_ms_per_batch": device,
            "stages_ms": {"preprocess": per(t.preprocess), "backbone": per(t.backbone), "fpn_ssh": per(t.neck), "heads": per(t.heads), "postprocess": per(t.postprocess)},
            "stages_source": t.stage_clock.name(),
            "host_preprocess_ms": host_preprocess,
            "gmacs_per_image": gmacs,
        });
        emit(&obj);
    } else {
        emit(format!(
            "{:>6} {:>11.2} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>10} | {:>22.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>9} | {:>11} {}",
            row.batch,
            row.images_per_s,
            pct(50.0),
            pct(90.0),
            pct(99.0),
            lat[0],
            device.map_or("n/a".to_string(), |d| format!("{d:.3}")),
            per(t.preprocess),
            per(t.backbone),
            per(t.neck),
            per(t.heads),
            per(t.postprocess),
            host_preprocess.map_or("n/a".to_string(), |d| format!("{d:.3}")),
            row.pipelined_images_per_s.map_or("n/a".to_string(), |v| format!("{v:.2}")),
            t.stage_clock.name()
        ));
    }
}

fn widerface_predict(a: PredictArgs) -> Result<()> {
    let resize = a.resize.parse::<ResizeMode>()?;
    if !matches!(resize, ResizeMode::Original | ResizeMode::MultiScale) {
        return Err(Error::InvalidArgument("WIDER FACE protocols are --resize original or multiscale".into()));
    }
    let engine = a.weights.engine()?;
    // The reference evaluation protocol: score > 0.02, NMS 0.4, no top-k cap.
    let opts = DetectOptions {
        post: PostOptions { conf_threshold: 0.02, nms_threshold: 0.4, pre_nms_topk: None, post_nms_topk: None },
        resize,
    };
    let limits = DecodeLimits::default();
    let summary = retinaface::widerface::run_predict_pipelined(
        &a.images,
        &a.out,
        |path: &std::path::Path| image_io::load(path, &limits),
        |_: &std::path::Path, img: BgrImage| engine.detect(&img, &opts),
        1,
        4,
        !a.quiet,
    )?;
    emit(format!(
        "{} images: {} predicted, {} already done, {} detections, {:.1} s",
        summary.total, summary.predicted, summary.skipped, summary.detections, summary.seconds
    ));
    Ok(())
}

fn widerface_eval(a: EvalArgs) -> Result<()> {
    let eval = retinaface::widerface::evaluate_dirs(&a.pred, &a.gt)?;
    if a.json {
        emit(serde_json::to_string(&eval.aps()).map_err(|e| Error::WiderFace(e.to_string()))?);
    } else {
        emit(retinaface::widerface::format_report(&eval.aps()).trim_end());
    }
    if let Some(p) = &a.curves_csv {
        retinaface::widerface::write_curves_csv(&eval, p)?;
    }
    if let Some(p) = &a.curves_png {
        retinaface::widerface::write_curves_png(&eval, p)?;
    }
    Ok(())
}

fn synthetic(a: SyntheticArgs) -> Result<()> {
    let network: Network = a.network.parse()?;
    let sd = retinaface::weights::synthetic::state_dict(network, a.seed);
    safetensors_io::save(&sd.tensors, Some(network.name()), &a.output)?;
    emit(format!("{}: {} tensors of {network}, seed {}", a.output.display(), sd.tensors.len(), a.seed));
    Ok(())
}

/// `retinaface video`: the defaults are the reference video script's (letterbox 640x640, confidence 0.4).
#[derive(Args)]
struct VideoArgs {
    /// A video file, a URL ffmpeg reads (rtsp://, http://) or webcam:N.
    source: String,
    #[command(flatten)]
    weights: WeightsArgs,
    /// letterbox:WxH (the reference video script), original or long-side:N.
    #[arg(long, default_value = "letterbox:640x640")]
    resize: String,
    #[arg(long, default_value_t = 0.4)]
    conf_threshold: f32,
    #[arg(long, default_value_t = 0.4)]
    nms_threshold: f32,
    #[arg(long, default_value_t = 5000)]
    pre_nms_topk: usize,
    #[arg(long, default_value_t = 750)]
    post_nms_topk: usize,
    /// Detections drawn (and tracked) have at least this score.
    #[arg(long, default_value_t = 0.6)]
    vis_threshold: f32,
    /// One JSON object per processed frame on stdout.
    #[arg(long)]
    json: bool,
    /// Write the annotated video here (H.264 when ffmpeg has it, else MPEG-4; audio copied).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Frames per forward pass.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Run the network on every Nth frame (the others are drawn with the last detections).
    #[arg(long, default_value_t = 1)]
    every: usize,
    /// Stop after this many frames.
    #[arg(long)]
    max_frames: Option<usize>,
    /// Live mode: drop frames (and count them) when inference falls behind; a file is read at its own rate.
    #[arg(long)]
    realtime: bool,
    /// Stable face ids across frames (SORT), in the JSON as "id" and drawn.
    #[arg(long)]
    track: bool,
    /// No progress line on stderr.
    #[arg(long)]
    quiet: bool,
}

fn video(a: VideoArgs) -> Result<()> {
    let opts = retinaface::video::VideoOptions {
        resize: a.resize.parse()?,
        post: PostOptions {
            conf_threshold: a.conf_threshold,
            nms_threshold: a.nms_threshold,
            pre_nms_topk: Some(a.pre_nms_topk),
            post_nms_topk: Some(a.post_nms_topk),
        },
        vis_threshold: a.vis_threshold,
        json: a.json,
        out: a.out.clone(),
        batch: a.batch,
        every: a.every,
        max_frames: a.max_frames,
        realtime: a.realtime,
        track: a.track,
        progress: !a.quiet,
        host_resize: false,
    };
    // Source and ffmpeg first: their mistakes should not wait for the weights to load.
    retinaface::video::source::SourceSpec::parse(&a.source)?;
    retinaface::video::source::ffmpeg_binary()?;
    let engine = a.weights.engine()?;
    let interrupt = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    retinaface::video::install_sigint(interrupt.clone())?;
    let s = retinaface::video::run(&engine, &a.source, &opts, &mut std::io::stdout(), &interrupt)?;
    if !a.quiet || s.interrupted || s.dropped > 0 {
        eprintln!(
            "{}: {} frames decoded, {} inferred, {} dropped, {} written{}, {:.1} s ({:.1} frames/s){}",
            a.source,
            s.decoded,
            s.inferred,
            s.dropped,
            s.written,
            s.codec.map(|c| format!(" ({c})")).unwrap_or_default(),
            s.seconds,
            s.decoded as f64 / s.seconds.max(1e-9),
            if s.interrupted { ", interrupted" } else { "" }
        );
    }
    Ok(())
}

fn export_onnx(a: ExportOnnxArgs) -> Result<()> {
    let network = a.network.as_deref().map(str::parse::<Network>).transpose()?;
    let spec = match (&a.weights, a.synthetic_seed) {
        (Some(p), None) => WeightsSpec::File(p.clone()),
        (None, Some(seed)) => WeightsSpec::Synthetic { seed },
        _ => return Err(Error::InvalidArgument("give --weights PATH or --synthetic-seed S".into())),
    };
    let static_hw = a
        .static_size
        .as_deref()
        // parse_size reads "AxB" as (A, B): here the first number is the height.
        .map(|s| {
            parse_size(s).map_err(|_| Error::InvalidArgument(format!("--static `{s}`: expected HxW, e.g. 480x640")))
        })
        .transpose()?;
    let engine = Engine::new(&spec, network)?;
    let opts = retinaface::onnx::ExportOptions { opset: a.opset, static_hw, batch: a.batch };
    let bytes = retinaface::onnx::write(engine.graph(), &opts, &a.output)?;
    let dim = |d: Option<usize>, name: &str| d.map(|v| v.to_string()).unwrap_or_else(|| name.to_string());
    emit(format!(
        "{}: {} as ONNX opset {}, input `input` [{}, 3, {}, {}], outputs loc, conf, landmarks ({bytes} bytes)",
        a.output.display(),
        engine.network(),
        a.opset,
        dim(a.batch, "N"),
        dim(static_hw.map(|s| s.0), "H"),
        dim(static_hw.map(|s| s.1), "W"),
    ));
    Ok(())
}
