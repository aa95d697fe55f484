//! Decoding, inference, drawing and encoding on their own threads, joined by bounded queues, so the
//! network never waits for ffmpeg and memory stays bounded. Files: every frame, in order (a full queue
//! blocks the decoder). `realtime`: a frame that finds the inference queue full is dropped and counted,
//! so latency stays bounded when inference falls behind a live source.
//!
//! On a CUDA backend the decoded frames go to the device as they are and are letterboxed (or resized)
//! there (`Engine::detect_specs` with [`letterbox::spec`]): the host does no pixel work after decoding.
//! Elsewhere the decoder thread letterboxes on the host.

use super::letterbox::{self, FrameResize};
use super::output::{self, Encoder};
use super::source::{Source, SourceSpec, ffmpeg_binary};
use super::tracker::Tracker;
use crate::detection::Detection;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::exec::Backend;
use crate::image_io::{BgrImage, ResizeSpec};
use crate::post::PostOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `retinaface video`'s settings; the defaults are the reference video script's.
#[derive(Clone, Debug)]
pub struct VideoOptions {
    pub resize: FrameResize,
    pub post: PostOptions,
    pub vis_threshold: f32,
    /// One JSON object per inferred frame on the JSON writer.
    pub json: bool,
    pub out: Option<PathBuf>,
    /// Frames per forward pass.
    pub batch: usize,
    /// Run the network on every Nth frame; the others are drawn with the last detections.
    pub every: usize,
    pub max_frames: Option<usize>,
    pub realtime: bool,
    pub track: bool,
    /// A progress line on stderr (files only).
    pub progress: bool,
    /// Letterbox on the host even on a CUDA backend (which otherwise resizes on the device); the
    /// detections are the same either way.
    pub host_resize: bool,
}

impl Default for VideoOptions {
    fn default() -> Self {
        VideoOptions {
            resize: FrameResize::default(),
            post: PostOptions {
                conf_threshold: 0.4,
                nms_threshold: 0.4,
                pre_nms_topk: Some(5000),
                post_nms_topk: Some(750),
            },
            vis_threshold: 0.6,
            json: false,
            out: None,
            batch: 1,
            every: 1,
            max_frames: None,
            realtime: false,
            track: false,
            progress: false,
            host_resize: false,
        }
    }
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    pub decoded: usize,
    pub inferred: usize,
    /// Frames dropped in `realtime` mode because inference was behind.
    pub dropped: usize,
    pub written: usize,
    pub seconds: f64,
    /// Wall time the inference stage spent in the network and post-processing: against `seconds`, how
    /// well decoding, drawing and encoding hide behind inference (1 = completely).
    pub infer_seconds: f64,
    /// Stopped by the `interrupt` flag (SIGINT) before the source ended.
    pub interrupted: bool,
    /// The JSON reader went away (a closed pipe); the run stopped early and quietly.
    pub json_closed: bool,
    pub codec: Option<&'static str>,
}

struct Item {
    index: usize,
    time: f64,
    image: BgrImage,
    /// How the frame becomes the network input, for frames the network runs on.
    input: Option<Input>,
    dets: Option<Vec<Detection>>,
}

/// A frame's network input: made on the host (with the factor its detections are divided by), or to
/// be made from the frame on the device by its spec.
enum Input {
    Host(BgrImage, f64),
    Device(ResizeSpec),
}

/// The first error any stage hit; the others stop when it is set.
#[derive(Default)]
struct Failure(Mutex<Option<Error>>, AtomicBool);

impl Failure {
    fn set(&self, e: Error) {
        if let Ok(mut f) = self.0.lock() {
            f.get_or_insert(e);
        }
        self.1.store(true, Ordering::SeqCst);
    }
    fn failed(&self) -> bool {
        self.1.load(Ordering::SeqCst)
    }
}

/// Runs `source` through the engine. JSON lines go to `json_out`; `interrupt` (set by a SIGINT handler)
/// ends the run cleanly: the output file finalised, the JSON complete up to the last processed frame.
pub fn run(
    engine: &Engine,
    source: &str,
    opts: &VideoOptions,
    json_out: &mut (dyn Write + Send),
    interrupt: &AtomicBool,
) -> Result<Summary> {
    if opts.batch == 0 || opts.every == 0 || opts.max_frames == Some(0) {
        return Err(Error::InvalidArgument("--batch, --every and --max-frames must be at least 1".into()));
    }
    opts.post.validate()?;
    let spec = SourceSpec::parse(source)?;
    let ffmpeg = ffmpeg_binary()?;
    let live = spec.is_live();
    let mut src = Source::open(&ffmpeg, spec.clone(), opts.realtime && !live)?;
    let info = src.info.clone();
    if let FrameResize::Letterbox { width, height } = opts.resize {
        letterbox::geometry(info.width, info.height, width, height)?;
    }
    let mut encoder = match &opts.out {
        Some(path) => {
            let rate = info.frame_rate.filter(|&(n, d)| n > 0 && d > 0).unwrap_or((25, 1));
            let audio = (info.has_audio && !live).then_some(&spec);
            let span = opts.max_frames.map(|m| m as f64 * rate.1 as f64 / rate.0 as f64);
            Some(Encoder::open(&ffmpeg, path, info.width, info.height, rate, audio, span)?)
        }
        None => None,
    };
    let codec = encoder.as_ref().map(|e| e.codec);
    let total = (!live).then(|| info.duration.zip(info.fps()).map(|(d, f)| (d * f).round() as usize)).flatten();
    let total = match (total, opts.max_frames) {
        (Some(t), Some(m)) => Some(t.min(m)),
        (t, m) => t.or(m.filter(|_| !live)),
    };

    let failed = Failure::default();
    let dropped_count = AtomicUsize::new(0);
    let infer_busy = Mutex::new(Duration::ZERO);
    let (failure, dropped) = (&failed, &dropped_count);
    let halt = &|| interrupt.load(Ordering::SeqCst) || failure.failed();
    let cap = 2 * opts.batch.max(2);
    let (to_infer, infer_rx) = sync_channel::<Item>(cap);
    let (to_draw, draw_rx) = sync_channel::<Item>(cap);
    let (to_encode, encode_rx) = sync_channel::<BgrImage>(cap);
    let start = Instant::now();

    let mut summary = std::thread::scope(|s| {
        let src = &mut src;
        let device = !opts.host_resize && matches!(engine.backend(), Backend::Cuda | Backend::CudaSim);
        let decoder = s.spawn(move || decode_stage(src, opts, device, to_infer, halt, failure, dropped));
        let busy = &infer_busy;
        s.spawn(move || infer_stage(engine, opts, infer_rx, to_draw, failure, busy));
        let encoder_thread = encoder.as_mut().map(|enc| s.spawn(move || encode_stage(enc, encode_rx, failure)));
        let drawn =
            draw_stage(opts, draw_rx, encoder_thread.is_some().then_some(to_encode), json_out, total, live, start);
        let decoded = decoder.join().unwrap_or(0);
        let written = encoder_thread.map(|t| t.join().unwrap_or(0)).unwrap_or(0);
        match drawn {
            Ok((inferred, json_closed)) => Summary { decoded, inferred, written, json_closed, ..Summary::default() },
            Err(e) => {
                failure.set(e);
                Summary::default()
            }
        }
    });
    drop(src);
    if let Some(Err(e)) = encoder.map(Encoder::finish) {
        failure.set(e);
    }
    if let Some(e) = failed.0.into_inner().ok().flatten() {
        return Err(e);
    }
    summary.dropped = dropped_count.load(Ordering::SeqCst);
    summary.seconds = start.elapsed().as_secs_f64();
    summary.infer_seconds = infer_busy.into_inner().map(|d| d.as_secs_f64()).unwrap_or(0.0);
    summary.interrupted = interrupt.load(Ordering::SeqCst);
    summary.codec = codec;
    Ok(summary)
}

/// The network input of a frame: its spec for the device's resize (`device`), else made here.
fn frame_input(img: &BgrImage, resize: FrameResize, device: bool) -> Result<Input> {
    if !device {
        let (im, f) = letterbox::prepare(img, resize)?;
        return Ok(Input::Host(im, f));
    }
    Ok(Input::Device(match resize {
        FrameResize::Letterbox { width, height } => letterbox::spec(img.width, img.height, width, height)?,
        FrameResize::Mode(m) => ResizeSpec::for_mode(m, img.width, img.height),
    }))
}

fn decode_stage(
    src: &mut Source,
    opts: &VideoOptions,
    device: bool,
    tx: SyncSender<Item>,
    halt: &dyn Fn() -> bool,
    failure: &Failure,
    dropped: &AtomicUsize,
) -> usize {
    let mut decoded = 0;
    while !halt() && opts.max_frames.is_none_or(|m| decoded < m) {
        let frame = match src.read_frame() {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                failure.set(e);
                break;
            }
        };
        decoded += 1;
        let input = if frame.index % opts.every == 0 {
            match frame_input(&frame.image, opts.resize, device) {
                Ok(x) => Some(x),
                Err(e) => {
                    failure.set(e);
                    break;
                }
            }
        } else {
            None
        };
        let item = Item { index: frame.index, time: frame.time, image: frame.image, input, dets: None };
        if opts.realtime {
            match tx.try_send(item) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    dropped.fetch_add(1, Ordering::SeqCst);
                }
                Err(TrySendError::Disconnected(_)) => break,
            }
        } else if tx.send(item).is_err() {
            break;
        }
    }
    decoded
}

fn infer_stage(
    engine: &Engine,
    opts: &VideoOptions,
    rx: Receiver<Item>,
    tx: SyncSender<Item>,
    failure: &Failure,
    busy: &Mutex<Duration>,
) {
    while let Ok(first) = rx.recv() {
        let mut items = vec![first];
        let wanted = |items: &[Item]| items.iter().filter(|i| i.input.is_some()).count() < opts.batch;
        while wanted(&items) {
            // A live source never waits to fill a batch: it takes what is already queued.
            let next = if opts.realtime { rx.try_recv().ok() } else { rx.recv().ok() };
            match next {
                Some(i) => items.push(i),
                None => break,
            }
        }
        let mut inputs: Vec<&BgrImage> = Vec::new();
        let (mut scales, mut frames, mut specs) = (Vec::new(), Vec::new(), Vec::new());
        for it in &items {
            match &it.input {
                Some(Input::Host(im, f)) => {
                    inputs.push(im);
                    scales.push(*f);
                }
                Some(Input::Device(spec)) => {
                    frames.push(&it.image);
                    specs.push(*spec);
                }
                None => {}
            }
        }
        if !inputs.is_empty() || !frames.is_empty() {
            let t0 = Instant::now();
            // One kind per run: every frame is made into its input on the host, or every one on the
            // device.
            let result = if frames.is_empty() {
                engine.detect_resized(&inputs, &scales, &opts.post, None)
            } else {
                engine.detect_specs(&frames, &specs, &opts.post, None)
            };
            if let Ok(mut b) = busy.lock() {
                *b += t0.elapsed();
            }
            match result {
                Ok(dets) => {
                    let mut dets = dets.into_iter();
                    for it in items.iter_mut().filter(|i| i.input.is_some()) {
                        it.dets = dets.next();
                        it.input = None;
                    }
                }
                Err(e) => {
                    failure.set(e);
                    return;
                }
            }
        }
        for it in items {
            if tx.send(it).is_err() {
                return;
            }
        }
    }
}

/// Tracking, JSON, drawing, progress. Returns (frames inferred, whether the JSON reader went away).
fn draw_stage(
    opts: &VideoOptions,
    rx: Receiver<Item>,
    to_encode: Option<SyncSender<BgrImage>>,
    json_out: &mut (dyn Write + Send),
    total: Option<usize>,
    live: bool,
    start: Instant,
) -> Result<(usize, bool)> {
    let mut tracker = Tracker::default();
    let (mut last, mut last_ids): (Vec<Detection>, Option<Vec<Option<u64>>>) = (Vec::new(), None);
    let (mut inferred, mut processed, mut json_closed) = (0, 0usize, false);
    let mut last_progress = Instant::now();
    for mut it in rx {
        processed += 1;
        if let Some(dets) = it.dets.take() {
            inferred += 1;
            last_ids = opts.track.then(|| {
                let shown: Vec<usize> = (0..dets.len()).filter(|&i| dets[i].score >= opts.vis_threshold).collect();
                let boxes: Vec<[f32; 4]> = shown.iter().map(|&i| dets[i].bbox).collect();
                let mut ids = vec![None; dets.len()];
                for (&i, id) in shown.iter().zip(tracker.update(&boxes)) {
                    ids[i] = Some(id);
                }
                ids
            });
            last = dets;
            if opts.json && !json_closed {
                let obj = output::frame_json(it.index, it.time, &it.image, &last, last_ids.as_deref());
                match writeln!(json_out, "{obj}").and_then(|_| json_out.flush()) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                        json_closed = true;
                        if to_encode.is_none() {
                            // Nobody is listening and nothing is being written: stop now.
                            return Ok((inferred, true));
                        }
                    }
                    Err(e) => return Err(Error::Video(format!("writing JSON: {e}"))),
                }
            }
        }
        if let Some(tx) = &to_encode {
            output::draw_frame(&mut it.image, &last, last_ids.as_deref(), opts.vis_threshold);
            if tx.send(it.image).is_err() {
                break;
            }
        }
        if opts.progress && !live && last_progress.elapsed() >= Duration::from_millis(500) {
            last_progress = Instant::now();
            eprint!("\r{}", progress_line(processed, total, start.elapsed().as_secs_f64()));
        }
    }
    if opts.progress && !live && processed > 0 {
        eprintln!("\r{}", progress_line(processed, total, start.elapsed().as_secs_f64()));
    }
    Ok((inferred, json_closed))
}

fn progress_line(done: usize, total: Option<usize>, secs: f64) -> String {
    let fps = done as f64 / secs.max(1e-9);
    match total {
        Some(t) if t >= done => {
            let eta = (t - done) as f64 / fps.max(1e-9);
            format!("frame {done}/{t}  {fps:.1} frames/s  ETA {eta:.0} s   ")
        }
        _ => format!("frame {done}  {fps:.1} frames/s   "),
    }
}

fn encode_stage(enc: &mut Encoder, rx: Receiver<BgrImage>, failure: &Failure) -> usize {
    let mut written = 0;
    for img in rx {
        if let Err(e) = enc.write(&img) {
            failure.set(e);
            break;
        }
        written += 1;
    }
    written
}

/// Sets `flag` on SIGINT instead of ending the process, so a run can finish its files.
pub fn install_sigint(flag: Arc<AtomicBool>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| Error::Video(format!("cannot start the signal handler: {e}")))?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        rt.block_on(async move {
            let mut sig = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()) {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            while sig.recv().await.is_some() {
                if flag.swap(true, Ordering::SeqCst) {
                    // A second Ctrl-C: the user wants out now.
                    std::process::exit(130);
                }
                eprintln!("\ninterrupted: finishing the frames in flight (Ctrl-C again to quit at once)");
            }
        })
    });
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Error::Video(format!("cannot catch SIGINT: {e}"))),
        Err(_) => Err(Error::Video("cannot catch SIGINT: the handler thread ended".into())),
    }
}
