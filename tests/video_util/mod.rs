//! Helpers of the video tests: ffmpeg (RETINAFACE_FFMPEG or PATH), clips made from ../shared/images,
//! frames extracted as PNG, and bounded waits for the CLI.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

pub fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared")
}

pub fn weights() -> String {
    shared().join("weights/retinaface_mv1_0.25.pth").display().to_string()
}

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_retinaface"))
}

/// The ffmpeg the tests use, or None (the test is skipped) unless RETINAFACE_REQUIRE_FFMPEG=1 (CI),
/// where a missing ffmpeg fails.
pub fn ffmpeg() -> Option<PathBuf> {
    let found = retinaface::video::source::ffmpeg_binary();
    match found {
        Ok(p) => Some(p),
        Err(e) if std::env::var("RETINAFACE_REQUIRE_FFMPEG").is_ok_and(|v| v == "1") => {
            panic!("RETINAFACE_REQUIRE_FFMPEG=1 but {e}")
        }
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("retinaface-video-").tempdir().unwrap()
}

/// A clip of `frames` frames at `fps`, `w`x`h`, panning over trio.jpg (three faces) so every frame
/// differs; MPEG-4 part 2 (every ffmpeg build has it), AAC audio when `audio`.
pub fn make_clip(ffmpeg: &Path, out: &Path, w: usize, h: usize, frames: usize, fps: u32, audio: bool) {
    let mut cmd = Command::new(ffmpeg);
    cmd.args(["-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-loop", "1", "-framerate", &fps.to_string()]);
    cmd.arg("-i").arg(shared().join("images/trio.jpg"));
    if audio {
        cmd.args(["-f", "lavfi", "-i", "sine=frequency=440:duration=60"]);
    }
    cmd.args(["-vf", &format!("crop=400:300:x='40+min(t*10,30)':y=20,scale={w}:{h}")]);
    cmd.args(["-frames:v", &frames.to_string(), "-c:v", "mpeg4", "-q:v", "3"]);
    if audio {
        cmd.args(["-c:a", "aac", "-shortest"]);
    }
    let out_status = cmd.arg(out).status().unwrap();
    assert!(out_status.success(), "making the clip {}", out.display());
}

/// Every frame as PNG, decoded with the same passthrough timing (frame i -> dir/i.png, 1-based).
pub fn extract_pngs(ffmpeg: &Path, clip: &Path, dir: &Path) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    let status = Command::new(ffmpeg)
        .args(["-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-i"])
        .arg(clip)
        .args(["-map", "0:v:0", "-fps_mode", "passthrough"])
        .arg(dir.join("%04d.png"))
        .status()
        .unwrap();
    assert!(status.success());
    let mut pngs: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    pngs.sort();
    pngs
}

/// Waits for `child`, killing it and failing the test after `secs`: no test hangs.
pub fn wait_bounded(child: &mut Child, secs: u64) -> ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if t0.elapsed() > Duration::from_secs(secs) {
            let _ = child.kill();
            panic!("retinaface video did not finish within {secs} s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the CLI with a bound; (status, stdout, stderr).
pub fn run_bounded(cmd: &mut Command, secs: u64) -> (ExitStatus, String, String) {
    use std::io::Read;
    let mut child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).unwrap();
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).unwrap();
        s
    });
    let status = wait_bounded(&mut child, secs);
    (status, t_out.join().unwrap(), t_err.join().unwrap())
}

pub fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect()
}
