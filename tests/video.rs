//! `retinaface video` against the engine on the same frames: decoding (ffmpeg, passthrough timing) gives
//! the pixels ffmpeg writes as PNG, and each frame's detections equal `detect` on that PNG under the same
//! letterbox; the annotated output keeps frame count, timing and audio; --every, --max-frames, --batch,
//! --realtime, --track.

mod video_util;
use retinaface::video::letterbox;
use retinaface::video::source::{Source, SourceSpec};
use retinaface::{Detection, Engine, PostOptions, WeightsSpec, image_io};
use video_util::*;

fn video_cmd(clip: &std::path::Path) -> std::process::Command {
    let mut c = bin();
    c.arg("video").arg(clip).args(["--backend", "cpu", "--weights", &weights(), "--quiet"]);
    c
}

fn detections(v: &serde_json::Value) -> Vec<Detection> {
    serde_json::from_value(v["detections"].clone()).unwrap()
}

#[test]
fn decoded_frames_are_the_pixels_and_times_ffmpeg_gives() {
    let Some(ff) = ffmpeg() else { return };
    let dir = tempdir();
    let clip = dir.path().join("clip.mp4");
    make_clip(&ff, &clip, 201, 151, 5, 5, false);
    let pngs = extract_pngs(&ff, &clip, &dir.path().join("png"));
    let mut src = Source::open(&ff, SourceSpec::parse(clip.to_str().unwrap()).unwrap(), false).unwrap();
    assert_eq!((src.info.width, src.info.height, src.info.frame_rate), (201, 151, Some((5, 1))));
    let mut n = 0;
    while let Some(f) = src.read_frame().unwrap() {
        let png = image_io::load(&pngs[n], &Default::default()).unwrap();
        assert_eq!(f.index, n);
        assert!((f.time - n as f64 * 0.2).abs() < 1e-9, "frame {n} at {} s", f.time);
        assert!(f.image.data == png.data, "frame {n} differs from ffmpeg's PNG");
        n += 1;
    }
    assert_eq!(n, pngs.len());
    assert_eq!(n, 5);
}

#[test]
fn letterbox_detections_equal_detect_on_the_extracted_frames() {
    let Some(ff) = ffmpeg() else { return };
    let dir = tempdir();
    // Portrait and odd-sized, so the letterbox truncates the width and pads on the right.
    let clip = dir.path().join("clip.mp4");
    make_clip(&ff, &clip, 301, 401, 4, 5, false);
    let pngs = extract_pngs(&ff, &clip, &dir.path().join("png"));
    let (status, stdout, stderr) = run_bounded(video_cmd(&clip).args(["--json", "--batch", "3"]), 120);
    assert!(status.success(), "{stderr}");
    let frames = json_lines(&stdout);
    assert_eq!(frames.len(), pngs.len());

    let engine = Engine::new(&WeightsSpec::File(weights().into()), None).unwrap();
    // The reference video script's post-processing.
    let post =
        PostOptions { conf_threshold: 0.4, nms_threshold: 0.4, pre_nms_topk: Some(5000), post_nms_topk: Some(750) };
    let mut faces = 0;
    for (i, (f, png)) in frames.iter().zip(&pngs).enumerate() {
        let img = image_io::load(png, &Default::default()).unwrap();
        let g = letterbox::geometry(img.width, img.height, 640, 640).unwrap();
        assert_eq!((g.new_width, g.new_height), (480, 640), "int(640 / (401 / 301))");
        let (canvas, r) = letterbox::letterbox(&img, 640, 640).unwrap();
        let want = engine.detect_resized(&[&canvas], &[r], &post, None).unwrap().pop().unwrap();
        assert_eq!(f["frame"], i);
        assert_eq!((f["width"].as_u64(), f["height"].as_u64()), (Some(301), Some(401)));
        assert!((f["time"].as_f64().unwrap() - i as f64 * 0.2).abs() < 1e-9);
        assert_eq!(detections(f), want, "frame {i}");
        faces += want.iter().filter(|d| d.score >= 0.6).count();
    }
    assert!(faces >= 4, "the clip shows faces: {faces} found over {} frames", pngs.len());
}

#[test]
fn original_size_detections_equal_the_detect_command() {
    let Some(ff) = ffmpeg() else { return };
    let dir = tempdir();
    let clip = dir.path().join("clip.mp4");
    make_clip(&ff, &clip, 320, 240, 3, 5, false);
    let pngs = extract_pngs(&ff, &clip, &dir.path().join("png"));
    let (status, stdout, stderr) =
        run_bounded(video_cmd(&clip).args(["--json", "--resize", "original", "--conf-threshold", "0.02"]), 120);
    assert!(status.success(), "{stderr}");
    let frames = json_lines(&stdout);
    let (status, det_out, stderr) =
        run_bounded(bin().args(["detect", "--backend", "cpu", "--json", "--weights", &weights()]).args(&pngs), 120);
    assert!(status.success(), "{stderr}");
    let images = json_lines(&det_out);
    assert_eq!(frames.len(), 3);
    assert_eq!(images.len(), 3);
    for (f, d) in frames.iter().zip(&images) {
        assert!(!d["detections"].as_array().unwrap().is_empty());
        assert_eq!(f["detections"], d["detections"]);
    }
}

#[test]
fn annotated_output_keeps_frame_count_timing_and_audio() {
    let Some(ff) = ffmpeg() else { return };
    let dir = tempdir();
    let clip = dir.path().join("clip.mp4");
    make_clip(&ff, &clip, 320, 240, 8, 10, true);
    let out = dir.path().join("out.mp4");
    let (status, _, stderr) = run_bounded(video_cmd(&clip).arg("--out").arg(&out).arg("--track"), 120);
    assert!(status.success(), "{stderr}");

    let open = |p: &std::path::Path| Source::open(&ff, SourceSpec::parse(p.to_str().unwrap()).unwrap(), false).unwrap();
    let (mut a, mut b) = (open(&clip), open(&out));
    assert!(a.info.has_audio && b.info.has_audio, "audio copied");
    assert_eq!((b.info.width, b.info.height, b.info.frame_rate), (320, 240, Some((10, 1))));
    // Drawn pixels differ from the source by far more than the encoder's loss.
    let changed = |a: &retinaface::BgrImage, b: &retinaface::BgrImage| {
        a.data
            .chunks(3)
            .zip(b.data.chunks(3))
            .filter(|(p, q)| p.iter().zip(*q).any(|(x, y)| x.abs_diff(*y) > 80))
            .count()
    };
    let mut n = 0;
    while let Some(fa) = a.read_frame().unwrap() {
        let fb = b.read_frame().unwrap().unwrap_or_else(|| panic!("output ends at frame {n}"));
        assert_eq!(fa.time, fb.time, "frame {n} time");
        let c = changed(&fa.image, &fb.image);
        assert!(c > 200, "frame {n}: boxes drawn ({c} pixels changed)");
        n += 1;
    }
    assert!(b.read_frame().unwrap().is_none(), "output has extra frames");
    assert_eq!(n, 8);
}

#[test]
fn every_max_frames_and_batch() {
    let Some(ff) = ffmpeg() else { return };
    let dir = tempdir();
    let clip = dir.path().join("clip.mp4");
    make_clip(&ff, &clip, 160, 120, 9, 5, false);
    let out = dir.path().join("out.mp4");
    let args = ["--json", "--every", "2", "--max-frames", "7", "--batch", "2"];
    let (status, stdout, stderr) = run_bounded(video_cmd(&clip).args(args).arg("--out").arg(&out), 120);
    assert!(status.success(), "{stderr}");
    let idx: Vec<u64> = json_lines(&stdout).iter().map(|f| f["frame"].as_u64().unwrap()).collect();
    assert_eq!(idx, vec![0, 2, 4, 6]);
    let mut o = Source::open(&ff, SourceSpec::parse(out.to_str().unwrap()).unwrap(), false).unwrap();
    let mut n = 0;
    while o.read_frame().unwrap().is_some() {
        n += 1;
    }
    assert_eq!(n, 7, "every decoded frame is written, inferred or not");
}

#[test]
fn track_ids_stay_with_their_faces() {
    let Some(ff) = ffmpeg() else { return };
    let dir = tempdir();
    let clip = dir.path().join("clip.mp4");
    make_clip(&ff, &clip, 400, 300, 6, 5, false);
    let (status, stdout, stderr) = run_bounded(video_cmd(&clip).args(["--json", "--track"]), 120);
    assert!(status.success(), "{stderr}");
    let frames = json_lines(&stdout);
    // Each face's id, keyed by its left-to-right order (the faces pan together, without crossing).
    let ids = |f: &serde_json::Value| -> Vec<u64> {
        let mut v: Vec<(f64, u64)> = f["detections"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["score"].as_f64().unwrap() >= 0.6)
            .map(|d| (d["box"][0].as_f64().unwrap(), d["id"].as_u64().expect("shown faces have ids")))
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v.into_iter().map(|x| x.1).collect()
    };
    let first = ids(&frames[0]);
    assert_eq!(first.len(), 3, "trio.jpg: three faces");
    for f in &frames {
        assert_eq!(ids(f), first, "frame {}", f["frame"]);
        for d in f["detections"].as_array().unwrap() {
            assert_eq!(d["id"].is_null(), d["score"].as_f64().unwrap() < 0.6);
        }
    }
}

#[test]
fn realtime_drops_frames_instead_of_falling_behind() {
    let Some(ff) = ffmpeg() else { return };
    let dir = tempdir();
    // 1000 frames/s read at their own rate: no backend runs a 640x640 forward pass per millisecond.
    let clip = dir.path().join("clip.mp4");
    make_clip(&ff, &clip, 160, 120, 60, 1000, false);
    let (status, stdout, stderr) = run_bounded(video_cmd(&clip).args(["--json", "--realtime"]), 120);
    assert!(status.success(), "{stderr}");
    let idx: Vec<u64> = json_lines(&stdout).iter().map(|f| f["frame"].as_u64().unwrap()).collect();
    assert!(idx.windows(2).all(|w| w[0] < w[1]), "in order");
    let line = stderr.lines().find(|l| l.contains("dropped")).unwrap_or_else(|| panic!("no summary: {stderr}"));
    let num = |word: &str| -> usize {
        let i = line.find(word).unwrap();
        line[..i].split_whitespace().last().unwrap().trim_start_matches(',').parse().unwrap()
    };
    let (decoded, inferred, dropped) = (num(" frames decoded"), num(" inferred"), num(" dropped"));
    assert_eq!(decoded, 60);
    assert_eq!(inferred, idx.len());
    assert_eq!(inferred + dropped, decoded, "{line}");
    assert!(dropped > 0, "{line}");
}

#[test]
fn files_show_progress_and_a_summary() {
    let Some(ff) = ffmpeg() else { return };
    let dir = tempdir();
    let clip = dir.path().join("clip.mp4");
    make_clip(&ff, &clip, 160, 120, 5, 5, false);
    let mut cmd = bin();
    cmd.arg("video").arg(&clip).args(["--backend", "cpu", "--weights", &weights()]);
    let (status, stdout, stderr) = run_bounded(&mut cmd, 60);
    assert!(status.success(), "{stderr}");
    assert!(stdout.is_empty(), "no --json, no stdout");
    // The last progress line: every frame of the clip's known length, its rate and the ETA.
    assert!(stderr.contains("frame 5/5") && stderr.contains("frames/s  ETA 0 s"), "{stderr}");
    assert!(stderr.contains("5 frames decoded, 5 inferred, 0 dropped, 0 written"), "{stderr}");
}
