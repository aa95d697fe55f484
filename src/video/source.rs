//! Frames from an ffmpeg subprocess: raw bgr24 on a pipe, passthrough timing (`-fps_mode passthrough`
//! decodes exactly the frames and pixels OpenCV's `VideoCapture` gives; ffmpeg's default frame-rate mode
//! duplicates and drops frames). Each frame's time comes from a `showinfo` filter on stderr, which also
//! carries the stream header (size, frame rate, audio) that is parsed before the first frame is read.

use crate::error::{Error, Result};
use crate::image_io::BgrImage;
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};

/// The ffmpeg binary: `RETINAFACE_FFMPEG` when set, else `ffmpeg` on PATH.
pub fn ffmpeg_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("RETINAFACE_FFMPEG") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(Error::Video(format!(
                "RETINAFACE_FFMPEG={} is not a file; point it at an ffmpeg binary (or unset it to use `ffmpeg` on PATH)",
                p.display()
            )))
        };
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("ffmpeg"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::Video(
                "ffmpeg not found: set RETINAFACE_FFMPEG to an ffmpeg binary or put `ffmpeg` on PATH \
                 (`pip install imageio-ffmpeg` ships a static one)"
                    .into(),
            )
        })
}

/// What SOURCE names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceSpec {
    File(PathBuf),
    /// Anything ffmpeg opens by URL: rtsp://, http://, udp://, ...
    Url(String),
    /// `webcam:N`: /dev/videoN through v4l2 (avfoundation device N on macOS).
    Webcam(u32),
}

impl SourceSpec {
    pub fn parse(s: &str) -> Result<SourceSpec> {
        if let Some(n) = s.strip_prefix("webcam:") {
            return n.parse().map(SourceSpec::Webcam).map_err(|_| {
                Error::InvalidArgument(format!("source `{s}`: expected webcam:N with N a device number"))
            });
        }
        if s.contains("://") {
            return Ok(SourceSpec::Url(s.to_string()));
        }
        let p = PathBuf::from(s);
        if !p.is_file() {
            return Err(Error::Video(format!("{s}: no such video file (sources are files, URLs or webcam:N)")));
        }
        Ok(SourceSpec::File(p))
    }

    /// Live sources run at their own pace: no frame count, no ETA, audio not copied.
    pub fn is_live(&self) -> bool {
        !matches!(self, SourceSpec::File(_))
    }

    pub fn name(&self) -> String {
        match self {
            SourceSpec::File(p) => p.display().to_string(),
            SourceSpec::Url(u) => u.clone(),
            SourceSpec::Webcam(n) => format!("webcam:{n}"),
        }
    }

    /// ffmpeg's input arguments (`[-f fmt] -i X`).
    pub fn input_args(&self) -> Vec<String> {
        match self {
            SourceSpec::File(p) => vec!["-i".into(), p.display().to_string()],
            SourceSpec::Url(u) => vec!["-i".into(), u.clone()],
            SourceSpec::Webcam(n) if cfg!(target_os = "macos") => {
                vec!["-f".into(), "avfoundation".into(), "-i".into(), format!("{n}")]
            }
            SourceSpec::Webcam(n) => vec!["-f".into(), "v4l2".into(), "-i".into(), format!("/dev/video{n}")],
        }
    }
}

/// The decoded stream as ffmpeg reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamInfo {
    pub width: usize,
    pub height: usize,
    /// The video stream's frame rate as a fraction (numerator, denominator), when known.
    pub frame_rate: Option<(u64, u64)>,
    /// The container's duration in seconds, when known (files).
    pub duration: Option<f64>,
    pub has_audio: bool,
}

impl StreamInfo {
    pub fn fps(&self) -> Option<f64> {
        self.frame_rate.map(|(n, d)| n as f64 / d as f64)
    }
}

/// One decoded frame.
pub struct Frame {
    pub index: usize,
    /// Presentation time in seconds.
    pub time: f64,
    pub image: BgrImage,
}

enum Event {
    Header(StreamInfo),
    Time(f64),
}

/// Lines of ffmpeg's stderr worth quoting in an error (not the per-frame showinfo lines).
type Tail = Arc<Mutex<VecDeque<String>>>;

/// A running decoder. Dropping it ends the subprocess.
pub struct Source {
    pub spec: SourceSpec,
    pub info: StreamInfo,
    child: Child,
    stdout: ChildStdout,
    events: Receiver<Event>,
    pending_times: VecDeque<f64>,
    tail: Tail,
    next_index: usize,
    done: bool,
}

impl Source {
    /// Starts ffmpeg on `spec` and waits for the stream header. `native_rate` reads a file at its own
    /// frame rate (`-re`), as a live source would deliver it.
    pub fn open(ffmpeg: &Path, spec: SourceSpec, native_rate: bool) -> Result<Source> {
        let mut cmd = Command::new(ffmpeg);
        cmd.args(["-hide_banner", "-nostdin", "-loglevel", "info"]);
        if native_rate {
            cmd.arg("-re");
        }
        cmd.args(spec.input_args());
        cmd.args(["-map", "0:v:0", "-vf", "showinfo", "-fps_mode", "passthrough", "-f", "rawvideo"]);
        cmd.args(["-pix_fmt", "bgr24", "pipe:1"]);
        // Its own process group: a terminal's Ctrl-C reaches only us, and we end the decoder ourselves.
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        let mut child = cmd.spawn().map_err(|e| {
            Error::Video(format!("cannot run ffmpeg {}: {e} (set RETINAFACE_FFMPEG)", ffmpeg.display()))
        })?;
        let (stdout, stderr) = match (child.stdout.take(), child.stderr.take()) {
            (Some(o), Some(e)) => (o, e),
            _ => return Err(Error::Video("ffmpeg started without its pipes".into())),
        };
        let tail: Tail = Arc::default();
        let (tx, events) = channel();
        let t = tail.clone();
        std::thread::spawn(move || parse_stderr(stderr, tx, t));
        let mut pending_times = VecDeque::new();
        let info = loop {
            match events.recv() {
                Ok(Event::Header(info)) => break info,
                Ok(Event::Time(t)) => pending_times.push_back(t),
                Err(_) => {
                    let status = child.wait().ok();
                    return Err(failure(&spec.name(), status, &tail, "no video stream could be decoded"));
                }
            }
        };
        Ok(Source { spec, info, child, stdout, events, pending_times, tail, next_index: 0, done: false })
    }

    /// The next frame, or None at the end of the stream. A stream that ends inside a frame, or an ffmpeg
    /// that exits with an error, is an error naming the source and quoting ffmpeg.
    pub fn read_frame(&mut self) -> Result<Option<Frame>> {
        if self.done {
            return Ok(None);
        }
        let n = self.info.width * self.info.height * 3;
        let mut data = vec![0u8; n];
        let mut got = 0;
        while got < n {
            match self.stdout.read(&mut data[got..]) {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::Video(format!("{}: reading decoded frames: {e}", self.spec.name()))),
            }
        }
        if got < n {
            self.done = true;
            let status = self.child.wait().ok();
            if got > 0 {
                return Err(failure(
                    &self.spec.name(),
                    status,
                    &self.tail,
                    &format!("the stream ended inside frame {} ({got} of {n} bytes)", self.next_index),
                ));
            }
            if status.is_some_and(|s| !s.success()) {
                return Err(failure(&self.spec.name(), status, &self.tail, "decoding failed"));
            }
            return Ok(None);
        }
        let time = match self.pending_times.pop_front() {
            Some(t) => t,
            None => loop {
                match self.events.recv() {
                    Ok(Event::Time(t)) => break t,
                    Ok(Event::Header(_)) => continue,
                    // No timing line (ffmpeg gone): the nominal rate.
                    Err(_) => break self.next_index as f64 / self.info.fps().unwrap_or(25.0),
                }
            },
        };
        let index = self.next_index;
        self.next_index += 1;
        Ok(Some(Frame { index, time, image: BgrImage::new(self.info.width, self.info.height, data)? }))
    }

    /// ffmpeg's own words about the stream so far (warnings of a damaged file).
    pub fn stderr_tail(&self) -> Vec<String> {
        self.tail.lock().map(|t| t.iter().cloned().collect()).unwrap_or_default()
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

pub(crate) fn failure(name: &str, status: Option<std::process::ExitStatus>, tail: &Tail, what: &str) -> Error {
    let lines: Vec<String> = tail.lock().map(|t| t.iter().cloned().collect()).unwrap_or_default();
    let status = status.map(|s| format!(" (ffmpeg {s})")).unwrap_or_default();
    let quoted = if lines.is_empty() { String::new() } else { format!(": {}", lines.join(" | ")) };
    Error::Video(format!("{name}: {what}{status}{quoted}"))
}

/// Keeps the last lines of a child's stderr that are not per-frame noise.
pub(crate) fn remember(tail: &Tail, line: &str) {
    if let Ok(mut t) = tail.lock() {
        if t.len() == 6 {
            t.pop_front();
        }
        t.push_back(line.trim().to_string());
    }
}

fn parse_stderr(stderr: impl Read, tx: Sender<Event>, tail: Tail) {
    let mut reader = BufReader::new(stderr);
    let mut buf = Vec::new();
    let (mut in_output, mut sent_header) = (false, false);
    let mut header = StreamInfo { width: 0, height: 0, frame_rate: None, duration: None, has_audio: false };
    let mut stream_fps = None;
    loop {
        buf.clear();
        // ffmpeg ends progress lines with \r; either ends a line here.
        match read_line_cr(&mut reader, &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end();
        if line.contains("Parsed_showinfo") {
            if let Some(t) = field(line, "pts_time:").and_then(|v| v.parse::<f64>().ok()) {
                if line.contains(" n:") && tx.send(Event::Time(t)).is_err() {
                    return;
                }
            } else if let Some(r) = field(line, "frame_rate:").and_then(parse_ratio)
                && line.contains("config in")
            {
                header.frame_rate = Some(r);
            }
            continue;
        }
        if sent_header {
            if !line.trim().is_empty() {
                remember(&tail, line);
            }
            continue;
        }
        let t = line.trim_start();
        if let Some(d) = t.strip_prefix("Duration: ") {
            header.duration = parse_duration(d.split(',').next().unwrap_or(""));
        } else if t.starts_with("Output #0") {
            in_output = true;
        } else if t.starts_with("Stream #") && t.contains(": Audio:") && !in_output {
            header.has_audio = true;
        } else if t.starts_with("Stream #") && t.contains(": Video:") {
            if !in_output {
                stream_fps = t.split(", ").find_map(|p| p.strip_suffix(" fps")).and_then(|v| v.parse::<f64>().ok());
            } else if let Some((w, h)) = t.split([' ', ',']).find_map(parse_size) {
                (header.width, header.height) = (w, h);
                if header.frame_rate.is_none_or(|(n, d)| n == 0 || d == 0) {
                    // A webcam's or stream's filter may not know its rate; the stream line's is close.
                    header.frame_rate = stream_fps.filter(|f| *f > 0.0).map(|f| ((f * 1000.0).round() as u64, 1000));
                }
                sent_header = true;
                if tx.send(Event::Header(header.clone())).is_err() {
                    return;
                }
            }
        } else if !t.is_empty() && !t.starts_with("Stream") && !line.starts_with(' ') {
            remember(&tail, line);
        }
    }
}

fn read_line_cr(r: &mut impl BufRead, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut n = 0;
    loop {
        let avail = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if avail.is_empty() {
            return Ok(n);
        }
        if let Some(i) = avail.iter().position(|&b| b == b'\n' || b == b'\r') {
            buf.extend_from_slice(&avail[..i]);
            r.consume(i + 1);
            return Ok(n + i + 1);
        }
        let k = avail.len();
        buf.extend_from_slice(avail);
        r.consume(k);
        n += k;
    }
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let i = line.find(key)? + key.len();
    line[i..].split_whitespace().next().map(|v| v.trim_end_matches(','))
}

fn parse_ratio(s: &str) -> Option<(u64, u64)> {
    let (n, d) = s.split_once('/')?;
    Some((n.parse().ok()?, d.parse().ok()?))
}

/// `WxH` with both sides decimal and non-zero (not the codec tag `0x18524742`).
fn parse_size(tok: &str) -> Option<(usize, usize)> {
    let (w, h) = tok.split_once('x')?;
    let (w, h) = (w.parse::<usize>().ok()?, h.parse::<usize>().ok()?);
    (w > 0 && h > 0 && !tok.starts_with('0')).then_some((w, h))
}

fn parse_duration(s: &str) -> Option<f64> {
    let mut parts = s.trim().split(':');
    let (h, m, sec) = (parts.next()?, parts.next()?, parts.next()?);
    Some(h.parse::<f64>().ok()? * 3600.0 + m.parse::<f64>().ok()? * 60.0 + sec.parse::<f64>().ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_times_come_from_ffmpeg_stderr() {
        let log = "Input #0, mov,mp4, from 'a.mp4':\n  Duration: 00:01:02.50, start: 0.000000, bitrate: 286 kb/s\n\
  Stream #0:0[0x1](und): Video: h264 (avc1 / 0x31637661), yuv420p, 1280x720 [SAR 1:1 DAR 16:9], 29.97 fps, 29.97 tbr, 30k tbn\n\
  Stream #0:1[0x2](und): Audio: aac (LC), 44100 Hz, mono\n\
[Parsed_showinfo_0 @ 0x1] config in time_base: 1/30000, frame_rate: 30000/1001\n\
[Parsed_showinfo_0 @ 0x1] n:   0 pts:      0 pts_time:0       duration: 1001\n\
Output #0, rawvideo, to 'pipe:1':\n\
  Stream #0:0(und): Video: rawvideo (BGR[24] / 0x18524742), bgr24(pc), 1280x720 [SAR 1:1 DAR 16:9], q=2-31\n\
[Parsed_showinfo_0 @ 0x1] n:   1 pts:   1001 pts_time:0.0333667 duration: 1001\r\
[h264 @ 0x2] error while decoding MB 3 4\n";
        let (tx, rx) = channel();
        let tail: Tail = Arc::default();
        parse_stderr(log.as_bytes(), tx, tail.clone());
        let events: Vec<Event> = rx.iter().collect();
        assert!(matches!(events[0], Event::Time(t) if t == 0.0));
        let Event::Header(h) = &events[1] else { panic!("header second") };
        assert_eq!((h.width, h.height, h.frame_rate, h.has_audio), (1280, 720, Some((30000, 1001)), true));
        assert_eq!(h.duration, Some(62.5));
        assert!(matches!(events[2], Event::Time(t) if t == 0.0333667));
        assert_eq!(tail.lock().unwrap().back().unwrap(), "[h264 @ 0x2] error while decoding MB 3 4");
    }

    #[test]
    fn sources() {
        assert_eq!(SourceSpec::parse("webcam:2").unwrap(), SourceSpec::Webcam(2));
        assert_eq!(SourceSpec::parse("rtsp://cam/1").unwrap(), SourceSpec::Url("rtsp://cam/1".into()));
        assert!(SourceSpec::parse("webcam:x").is_err());
        let e = SourceSpec::parse("/no/such/clip.mp4").unwrap_err().to_string();
        assert!(e.contains("/no/such/clip.mp4"), "{e}");
    }
}
