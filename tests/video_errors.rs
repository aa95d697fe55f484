//! `retinaface video` when things go wrong: each a clear message, no hang (every run is bounded), no
//! partial garbage on stdout.

mod video_util;
use retinaface::video::source::{Source, SourceSpec};
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use video_util::*;

fn video_cmd(source: &std::path::Path) -> std::process::Command {
    let mut c = bin();
    c.arg("video").arg(source).args(["--backend", "cpu", "--weights", &weights(), "--quiet"]);
    c
}

fn count_frames(ff: &std::path::Path, p: &std::path::Path) -> usize {
    let mut s = Source::open(ff, SourceSpec::parse(p.to_str().unwrap()).unwrap(), false).unwrap();
    let mut n = 0;
    while s.read_frame().unwrap().is_some() {
        n += 1;
    }
    n
}

#[test]
fn missing_ffmpeg_names_both_ways_to_give_one() {
    let dir = tempdir();
    let clip = dir.path().join("clip.mp4");
    std::fs::write(&clip, b"not decoded: ffmpeg is looked up first").unwrap();
    let (status, stdout, stderr) =
        run_bounded(video_cmd(&clip).env_remove("RETINAFACE_FFMPEG").env("PATH", dir.path()), 60);
    assert!(!status.success());
    assert!(stdout.is_empty());
    assert!(stderr.contains("RETINAFACE_FFMPEG") && stderr.contains("PATH"), "{stderr}");
    let (status, _, stderr) = run_bounded(video_cmd(&clip).env("RETINAFACE_FFMPEG", dir.path().join("nope")), 60);
    assert!(!status.success());
    assert!(stderr.contains("RETINAFACE_FFMPEG=") && stderr.contains("nope"), "{stderr}");
}

#[test]
fn unreadable_sources_are_named_with_ffmpegs_reason() {
    let Some(_) = ffmpeg() else { return };
    let dir = tempdir();
    let (status, stdout, stderr) = run_bounded(video_cmd(&dir.path().join("absent.mp4")).arg("--json"), 60);
    assert!(!status.success());
    assert!(stdout.is_empty());
    assert!(stderr.contains("absent.mp4: no such video file"), "{stderr}");

    let junk = dir.path().join("junk.mp4");
    std::fs::write(&junk, vec![0x5a; 10_000]).unwrap();
    let (status, stdout, stderr) = run_bounded(video_cmd(&junk).arg("--json"), 60);
    assert!(!status.success());
    assert!(stdout.is_empty());
    assert!(stderr.contains("junk.mp4") && stderr.contains("Invalid data"), "{stderr}");

    let (status, _, stderr) = run_bounded(bin().args(["video", "webcam:x", "--synthetic-seed", "1"]), 60);
    assert!(!status.success());
    assert!(stderr.contains("webcam:N"), "{stderr}");
}

#[test]
fn truncated_files_end_cleanly() {
    let Some(ff) = ffmpeg() else { return };
    let dir = tempdir();
    // MP4 writes its index last: cut, it cannot be opened at all.
    let clip = dir.path().join("clip.mp4");
    make_clip(&ff, &clip, 160, 120, 10, 5, false);
    let bytes = std::fs::read(&clip).unwrap();
    let cut = dir.path().join("cut.mp4");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let (status, stdout, stderr) = run_bounded(video_cmd(&cut).arg("--json"), 60);
    assert!(!status.success());
    assert!(stdout.is_empty());
    assert!(stderr.contains("cut.mp4") && stderr.contains("moov atom not found"), "{stderr}");

    // Matroska streams: cut, it gives the frames before the cut, each one whole.
    let mkv = dir.path().join("clip.mkv");
    let status = std::process::Command::new(&ff)
        .args(["-hide_banner", "-loglevel", "error", "-y", "-i"])
        .arg(&clip)
        .args(["-c", "copy"])
        .arg(&mkv)
        .status()
        .unwrap();
    assert!(status.success());
    let bytes = std::fs::read(&mkv).unwrap();
    let cut = dir.path().join("cut.mkv");
    std::fs::write(&cut, &bytes[..bytes.len() * 6 / 10]).unwrap();
    let out = dir.path().join("out.mp4");
    let (status, stdout, stderr) = run_bounded(video_cmd(&cut).arg("--json").arg("--out").arg(&out), 60);
    assert!(status.success(), "{stderr}");
    let frames = json_lines(&stdout);
    assert!((1..10).contains(&frames.len()), "{} frames of a cut 10-frame clip", frames.len());
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(f["frame"], i);
    }
    assert_eq!(count_frames(&ff, &out), frames.len());
}

#[test]
fn closed_pipes_stop_the_run() {
    let Some(ff) = ffmpeg() else { return };
    let dir = tempdir();
    let clip = dir.path().join("clip.mp4");
    make_clip(&ff, &clip, 160, 120, 300, 25, false);
    // The JSON reader goes away after one line (`| head -1`): the run stops quietly.
    let mut child = video_cmd(&clip).arg("--json").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["frame"], 0);
    drop(lines);
    let status = wait_bounded(&mut child, 60);
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // The output cannot be written: the error names it and quotes ffmpeg.
    let bad = dir.path().join("no-such-dir/out.mp4");
    let (status, _, stderr) = run_bounded(video_cmd(&clip).arg("--out").arg(&bad).args(["--max-frames", "3"]), 60);
    assert!(!status.success());
    assert!(stderr.contains("no-such-dir/out.mp4") && stderr.contains("No such file or directory"), "{stderr}");
}

#[test]
fn sigint_finalises_the_output_and_the_json() {
    let Some(ff) = ffmpeg() else { return };
    let dir = tempdir();
    let clip = dir.path().join("clip.mp4");
    make_clip(&ff, &clip, 160, 120, 400, 25, true);
    let out = dir.path().join("out.mp4");
    let mut child = video_cmd(&clip)
        .args(["--json", "--track"])
        .arg("--out")
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut text = String::new();
    for _ in 0..3 {
        stdout.read_line(&mut text).unwrap();
    }
    let kill = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    std::io::Read::read_to_string(&mut stdout, &mut text).unwrap();
    let status = wait_bounded(&mut child, 60);
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    let frames = json_lines(&text);
    assert!(frames.len() >= 3 && frames.len() < 400, "{} frames", frames.len());
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(f["frame"], i);
    }
    // Playable, and holding exactly the frames reported.
    assert_eq!(count_frames(&ff, &out), frames.len());
}
