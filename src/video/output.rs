//! The annotated video: frames drawn as `detect --save-image` draws them (plus track ids), encoded by an
//! ffmpeg subprocess fed raw bgr24 frames, H.264 when that ffmpeg has libx264, else MPEG-4 part 2; the
//! source's audio copied. The output runs at the source's frame rate, one output frame per input frame.

use super::source::{SourceSpec, remember};
use crate::detection::Detection;
use crate::draw;
use crate::error::{Error, Result};
use crate::image_io::BgrImage;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};

const ID_BGR: [u8; 3] = [0, 255, 255];

/// Draws the detections with score ≥ `vis_threshold` and, when tracking, each one's id under its box.
pub fn draw_frame(img: &mut BgrImage, dets: &[Detection], ids: Option<&[Option<u64>]>, vis_threshold: f32) {
    draw::draw_detections(img, dets, vis_threshold);
    let Some(ids) = ids else { return };
    let t = ((img.width.max(img.height) as f32 / 500.0).round() as i64).max(1);
    for (d, id) in dets.iter().zip(ids) {
        if let (Some(id), true) = (id, d.score >= vis_threshold) {
            let (x, y) = (d.bbox[0].round() as i64, d.bbox[3].round() as i64 + t + 1);
            draw::draw_text(img, &id.to_string(), x, y, 2 * t, ID_BGR);
        }
    }
}

/// One frame's JSON object: `detect --json`'s detections, with `"id"` added when tracking.
pub fn frame_json(
    index: usize,
    time: f64,
    img: &BgrImage,
    dets: &[Detection],
    ids: Option<&[Option<u64>]>,
) -> serde_json::Value {
    let mut list = serde_json::to_value(dets).unwrap_or_default();
    if let (Some(ids), Some(arr)) = (ids, list.as_array_mut()) {
        for (d, id) in arr.iter_mut().zip(ids) {
            if let Some(o) = d.as_object_mut() {
                o.insert("id".into(), serde_json::json!(id));
            }
        }
    }
    serde_json::json!({"frame": index, "time": time, "width": img.width, "height": img.height, "detections": list})
}

/// Whether this ffmpeg can encode H.264 (libx264).
pub fn has_h264(ffmpeg: &Path) -> bool {
    Command::new(ffmpeg)
        .args(["-hide_banner", "-encoders"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(" libx264 "))
}

pub struct Encoder {
    path: PathBuf,
    child: Child,
    stdin: Option<ChildStdin>,
    tail: Arc<Mutex<std::collections::VecDeque<String>>>,
    stderr_thread: Option<std::thread::JoinHandle<()>>,
    pub codec: &'static str,
}

impl Encoder {
    /// Starts the encoder for `width`×`height` frames at `rate` (numerator, denominator) frames/s; audio
    /// is copied from `audio_from` (a file with an audio stream), its first `max_seconds` when given.
    pub fn open(
        ffmpeg: &Path,
        path: &Path,
        width: usize,
        height: usize,
        rate: (u64, u64),
        audio_from: Option<&SourceSpec>,
        max_seconds: Option<f64>,
    ) -> Result<Encoder> {
        let codec = if has_h264(ffmpeg) { "libx264" } else { "mpeg4" };
        let mut cmd = Command::new(ffmpeg);
        cmd.args(["-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "bgr24"]);
        cmd.args(["-video_size", &format!("{width}x{height}"), "-framerate", &format!("{}/{}", rate.0, rate.1)]);
        cmd.args(["-i", "pipe:0"]);
        if let Some(src) = audio_from {
            // Not -shortest: an audio track a little shorter than the video would cut frames. A run
            // limited to some frames gets the audio of that span.
            if let Some(t) = max_seconds {
                cmd.args(["-t", &format!("{t:.6}")]);
            }
            cmd.args(src.input_args());
            cmd.args(["-map", "0:v:0", "-map", "1:a?", "-c:a", "copy"]);
        }
        // 4:2:0 needs even sides: an odd frame gets one black column or row rather than being resampled.
        if width % 2 == 1 || height % 2 == 1 {
            cmd.args(["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2"]);
        }
        match codec {
            "libx264" => cmd.args(["-c:v", "libx264", "-preset", "veryfast", "-crf", "18"]),
            _ => cmd.args(["-c:v", "mpeg4", "-q:v", "2"]),
        };
        cmd.args(["-pix_fmt", "yuv420p", "-fps_mode", "passthrough"]).arg(path);
        // Its own process group: a Ctrl-C on the terminal reaches us, and we finalise the file.
        cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped()).process_group(0);
        let mut child =
            cmd.spawn().map_err(|e| Error::Video(format!("cannot run ffmpeg {} to encode: {e}", ffmpeg.display())))?;
        let stdin = child.stdin.take();
        let tail: Arc<Mutex<std::collections::VecDeque<String>>> = Arc::default();
        let stderr_thread = child.stderr.take().map(|e| {
            let t = tail.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(e).lines().map_while(|l| l.ok()) {
                    remember(&t, &line);
                }
            })
        });
        Ok(Encoder { path: path.to_path_buf(), child, stdin, tail, stderr_thread, codec })
    }

    pub fn write(&mut self, img: &BgrImage) -> Result<()> {
        let Some(stdin) = self.stdin.as_mut() else {
            return Err(Error::Video(format!("{}: encoder already closed", self.path.display())));
        };
        if let Err(e) = stdin.write_all(&img.data) {
            // The encoder is gone: its own message says why.
            self.stdin = None;
            let status = self.child.wait().ok();
            self.join_stderr();
            let what = format!("encoder stopped ({e})");
            return Err(super::source::failure(&self.path.display().to_string(), status, &self.tail, &what));
        }
        Ok(())
    }

    /// Closes the input and waits for ffmpeg to write the file's trailer.
    pub fn finish(mut self) -> Result<()> {
        drop(self.stdin.take());
        let status = self.child.wait().map_err(|e| Error::io(&self.path, e))?;
        self.join_stderr();
        if !status.success() {
            return Err(super::source::failure(
                &self.path.display().to_string(),
                Some(status),
                &self.tail,
                "encoding failed",
            ));
        }
        Ok(())
    }

    fn join_stderr(&mut self) {
        if let Some(t) = self.stderr_thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Encoder {
    fn drop(&mut self) {
        // An encoder dropped on an error path still gets its input closed, so it finalises what it has.
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}
