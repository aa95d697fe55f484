//! `retinaface video` throughput at 1280x720 (the reference's 640x640 letterbox) and how well its stages
//! overlap. Three measurements on the same frames, alternated over rounds so a noisy machine's slow
//! spells fall on all of them:
//!   inference alone — the network and post-processing on the letterboxed canvases, already in memory,
//!                     one after another (what the pipeline's inference thread does);
//!   decode+infer    — the pipeline from the file (ffmpeg decoding, letterbox, inference), no output;
//!   full            — also drawing, --track and the H.264 (or MPEG-4) encode to a file.
//! and, for each pipeline run, the inference stage's busy fraction (time inside the network and
//! post-processing / wall time): the overlap measure that holds on a shared machine too, where the
//! scheduler's per-thread shares make a many-threaded pipeline and a lone loop hard to compare.
//!
//!   cargo bench --bench video_pipeline -- [--backend cpu|cuda] [--frames 150] [--rounds 3] [--batch 1]
//!
//! ffmpeg: RETINAFACE_FFMPEG or PATH. Weights: ../shared/weights/retinaface_mv1_0.25.pth.

use retinaface::video::source::{Source, SourceSpec, ffmpeg_binary};
use retinaface::video::{VideoOptions, letterbox};
use retinaface::{Backend, BgrImage, Engine, WeightsSpec};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.into())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> retinaface::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let backend: Backend = arg(&args, "--backend", "cpu").parse()?;
    let frames: usize = arg(&args, "--frames", "150").parse().unwrap_or(150);
    let rounds: usize = arg(&args, "--rounds", "3").parse().unwrap_or(3);
    let batch: usize = arg(&args, "--batch", "1").parse().unwrap_or(1);
    let ff = ffmpeg_binary()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared");
    let dir = std::env::temp_dir().join(format!("retinaface-video-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| retinaface::Error::io(&dir, e))?;
    let clip = dir.join("clip.mp4");
    // 1280x720 H.264 (MPEG-4 when the ffmpeg lacks libx264) at 30 frames/s with AAC audio: trio.jpg
    // (three faces) scaled up and panning.
    let codec = if retinaface::video::output::has_h264(&ff) { "libx264" } else { "mpeg4" };
    let ok = Command::new(&ff)
        .args(["-hide_banner", "-loglevel", "error", "-y", "-loop", "1", "-framerate", "30", "-i"])
        .arg(root.join("images/trio.jpg"))
        .args(["-f", "lavfi", "-i", "sine=frequency=440:duration=60"])
        .args(["-vf", "scale=1440:960,crop=1280:720:x='min(t*20,160)':y=120", "-frames:v", &frames.to_string()])
        .args(["-c:v", codec, "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest"])
        .arg(&clip)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "making the 1280x720 clip");

    let mut engine = Engine::new(&WeightsSpec::File(root.join("weights/retinaface_mv1_0.25.pth")), None)?;
    let line = engine.set_backend(backend)?;
    let base = VideoOptions { batch, ..VideoOptions::default() };
    // The letterboxed canvases, decoded once.
    let mut src = Source::open(&ff, SourceSpec::parse(clip.to_str().unwrap_or_default())?, false)?;
    let mut canvases: Vec<(BgrImage, f64)> = Vec::new();
    while let Some(f) = src.read_frame()? {
        canvases.push(letterbox::letterbox(&f.image, 640, 640)?);
    }
    drop(src);
    let n = canvases.len();
    println!("{line}; {n} frames of 1280x720, letterbox 640x640, batch {batch}, {} cores", num_cpus());
    let never = AtomicBool::new(false);
    let (mut alone, mut decode, mut full) = (Vec::new(), Vec::new(), Vec::new());
    let (mut busy_d, mut busy_f) = (Vec::new(), Vec::new());
    for r in 1..=rounds {
        // On its own thread, as the pipeline's inference stage runs.
        let a = std::thread::scope(|s| {
            s.spawn(|| -> retinaface::Result<f64> {
                let t0 = Instant::now();
                for chunk in canvases.chunks(batch) {
                    let imgs: Vec<&BgrImage> = chunk.iter().map(|c| &c.0).collect();
                    let scales: Vec<f64> = chunk.iter().map(|c| c.1).collect();
                    engine.detect_resized(&imgs, &scales, &base.post, None)?;
                }
                Ok(n as f64 / t0.elapsed().as_secs_f64())
            })
            .join()
            .unwrap_or(Ok(0.0))
        })?;
        let s =
            retinaface::video::run(&engine, clip.to_str().unwrap_or_default(), &base, &mut std::io::sink(), &never)?;
        let d = s.decoded as f64 / s.seconds;
        let db = s.infer_seconds / s.seconds;
        let opts = VideoOptions { out: Some(dir.join("out.mp4")), track: true, ..base.clone() };
        let s =
            retinaface::video::run(&engine, clip.to_str().unwrap_or_default(), &opts, &mut std::io::sink(), &never)?;
        let f = s.written as f64 / s.seconds;
        let fb = s.infer_seconds / s.seconds;
        println!(
            "round {r}: inference alone {a:.1} frames/s | decode+infer {d:.1} (inference busy {:.0}%) | full ({}) {f:.1} (inference busy {:.0}%)",
            100.0 * db,
            s.codec.unwrap_or("?"),
            100.0 * fb
        );
        busy_d.push(db);
        busy_f.push(fb);
        alone.push(a);
        decode.push(d);
        full.push(f);
    }
    let (a, d, f) = (median(alone), median(decode), median(full));
    println!(
        "median: inference alone {a:.1} frames/s | decode+infer {d:.1} ({:.0}%, inference busy {:.0}%) | full {f:.1} ({:.0}%, inference busy {:.0}%)",
        100.0 * d / a,
        100.0 * median(busy_d),
        100.0 * f / a,
        100.0 * median(busy_f)
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
