//! `retinaface video` on a CUDA backend letterboxes (or resizes) the decoded frames on the device; in
//! the simulation its detections equal those of the same engine fed frames letterboxed on the host,
//! frame for frame, bit for bit. Needs ffmpeg (RETINAFACE_FFMPEG, see tests/video.rs).
#![cfg(feature = "cuda-sim")]

mod video_util;
use retinaface::video::{FrameResize, VideoOptions};
use retinaface::{Backend, Engine, PostOptions, ResizeMode, WeightsSpec};
use std::sync::atomic::AtomicBool;
use video_util::*;

fn run_video(
    engine: &Engine,
    clip: &std::path::Path,
    resize: FrameResize,
    host_resize: bool,
) -> Vec<serde_json::Value> {
    let opts = VideoOptions {
        resize,
        // Low enough that the small canvases still give detections to compare.
        post: PostOptions { conf_threshold: 0.05, ..VideoOptions::default().post },
        json: true,
        batch: 2,
        host_resize,
        ..VideoOptions::default()
    };
    let mut out = Vec::new();
    let summary =
        retinaface::video::run(engine, clip.to_str().unwrap(), &opts, &mut out, &AtomicBool::new(false)).unwrap();
    assert_eq!(summary.inferred, 3);
    json_lines(&String::from_utf8(out).unwrap())
}

#[test]
fn device_letterbox_detections_equal_the_host_letterbox_in_simulation() {
    let Some(ff) = ffmpeg() else { return };
    let dir = tempdir();
    // Portrait and odd-sized: the letterbox truncates the width and pads on the right.
    let clip = dir.path().join("clip.mp4");
    make_clip(&ff, &clip, 301, 401, 3, 5, false);
    let mut engine = Engine::new(&WeightsSpec::File(weights().into()), None).unwrap();
    engine.set_backend(Backend::CudaSim).unwrap();
    let mut found = 0;
    for resize in [
        FrameResize::Letterbox { width: 160, height: 160 },
        FrameResize::Letterbox { width: 224, height: 128 },
        FrameResize::Mode(ResizeMode::LongSide(150)),
    ] {
        let device = run_video(&engine, &clip, resize, false);
        let host = run_video(&engine, &clip, resize, true);
        assert_eq!(device.len(), 3);
        assert_eq!(device, host, "{resize:?}");
        found += device.iter().map(|f| f["detections"].as_array().unwrap().len()).sum::<usize>();
    }
    assert!(found >= 6, "the clip shows faces: {found} detections");
}
