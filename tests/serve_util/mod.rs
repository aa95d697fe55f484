//! Helpers for the server tests: start a server on 127.0.0.1 with free ports, and a minimal blocking
//! HTTP/1.1 client on raw sockets (raw so tests can also misbehave: trickle, lie, hang up).
#![allow(dead_code)]

use retinaface::serve::{Gate, ServeArgs, ServerHandle, TestHooks};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared")
}

pub fn real_weights() -> PathBuf {
    shared().join("weights/retinaface_mv1_0.25.pth")
}

fn args(flags: &[&str]) -> ServeArgs {
    let mut all: Vec<String> =
        ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"].iter().map(|s| s.to_string()).collect();
    if !flags.contains(&"--backend") {
        all.extend(["--backend".to_string(), "cpu".to_string()]);
    }
    if !flags.iter().any(|f| *f == "--weights" || *f == "--synthetic-seed") {
        all.push("--weights".into());
        all.push(real_weights().display().to_string());
    }
    all.extend(flags.iter().map(|s| s.to_string()));
    ServeArgs::parse_from_flags(all).expect("test flags parse")
}

/// A server with the real mobilenetv1_0.25 weights unless the flags name others.
pub fn start(flags: &[&str]) -> ServerHandle {
    ServerHandle::start(args(flags)).expect("server starts")
}

/// A server whose executor takes nothing until the gate opens.
pub fn start_gated(flags: &[&str], signals: bool) -> (ServerHandle, Arc<Gate>) {
    let gate = Gate::closed();
    let h = ServerHandle::start_with_hooks(args(flags), TestHooks { executor_gate: Some(gate.clone()) }, signals)
        .expect("server starts");
    (h, gate)
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The `error` field of a JSON error body.
    pub fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or_else(|| panic!("no error field in {}", self.text())).to_string()
    }
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    s.set_nodelay(true).expect("nodelay");
    s
}

/// Reads one response until the server closes the connection (requests say `Connection: close`).
pub fn read_response(s: &mut TcpStream) -> Resp {
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("read response");
    parse(&buf)
}

pub fn parse(buf: &[u8]) -> Resp {
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete response head in {:?}", String::from_utf8_lossy(buf)));
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok()).expect("status line");
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect();
    let body = buf[end + 4..].to_vec();
    let r = Resp { status, headers, body };
    assert!(r.header("transfer-encoding").is_none(), "chunked responses are not expected");
    if let Some(len) = r.header("content-length") {
        assert_eq!(len.parse::<usize>().ok(), Some(r.body.len()), "body length");
    }
    r
}

pub fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    let mut s = connect(addr);
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).expect("write head");
    // The server may answer (413) and close before taking a body it refused: ignore write errors.
    let _ = s.write_all(body);
    read_response(&mut s)
}

pub fn get(addr: SocketAddr, path: &str) -> Resp {
    request(addr, "GET", path, &[], b"")
}

pub fn post(addr: SocketAddr, path: &str, content_type: &str, body: &[u8]) -> Resp {
    request(addr, "POST", path, &[("Content-Type", content_type)], body)
}

pub fn detect(addr: SocketAddr, image: &[u8]) -> Resp {
    post(addr, "/v1/detect", "application/octet-stream", image)
}

/// One series' value from `/metrics` (the first line starting with `series`).
pub fn metric(addr: SocketAddr, series: &str) -> f64 {
    let r = get(addr, "/metrics");
    assert_eq!(r.status, 200);
    let text = r.text();
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(['{', ' ']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
}

pub fn failures(addr: SocketAddr, reason: &str) -> f64 {
    let r = get(addr, "/metrics");
    let key = format!("reason=\"{reason}\"}}");
    r.text()
        .lines()
        .find(|l| l.starts_with("nv_inference_request_failure{") && l.contains(&key))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no failure series for {reason}"))
}

/// Polls `cond` every 10 ms; panics with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn read_image(name: &str) -> Vec<u8> {
    std::fs::read(shared().join("images").join(name)).expect("shared image")
}

/// PNG bytes of a BGR image (lossless, so the server decodes exactly these pixels).
pub fn png_of(img: &retinaface::BgrImage) -> Vec<u8> {
    let rgb: Vec<u8> = img.data.chunks(3).flat_map(|p| [p[2], p[1], p[0]]).collect();
    let mut out = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut out),
        &rgb,
        img.width as u32,
        img.height as u32,
        image::ExtendedColorType::Rgb8,
    )
    .expect("encode png");
    out
}

impl Resp {
    /// The `error` field, or "" when the body is not a JSON error (for collecting mixed answers).
    pub fn error_or_empty(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_default()
    }
}

/// `retinaface serve` as a child process on 127.0.0.1 (its memory and descriptors are its own),
/// with every stderr line forwarded to `logs`. `wrap` runs it through `sh -c` with a prefix (e.g.
/// `ulimit -n 64;`) when not empty.
pub struct Child {
    pub proc: std::process::Child,
    pub addr: SocketAddr,
    pub logs: std::sync::mpsc::Receiver<String>,
}

pub fn spawn_server(flags: &[&str], wrap: &str) -> Child {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let bin = env!("CARGO_BIN_EXE_retinaface");
    let mut args: Vec<String> =
        ["serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"].iter().map(|s| s.to_string()).collect();
    if !flags.contains(&"--backend") {
        args.extend(["--backend".to_string(), "cpu".to_string()]);
    }
    if !flags.iter().any(|f| *f == "--weights" || *f == "--synthetic-seed") {
        args.push("--weights".into());
        args.push(real_weights().display().to_string());
    }
    args.extend(flags.iter().map(|s| s.to_string()));
    let mut cmd = if wrap.is_empty() {
        let mut c = Command::new(bin);
        c.args(&args);
        c
    } else {
        let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
        let mut c = Command::new("sh");
        c.arg("-c").arg(format!("{wrap} exec '{bin}' {}", quoted.join(" ")));
        c
    };
    let mut proc = cmd.stderr(Stdio::piped()).stdout(Stdio::null()).spawn().expect("start retinaface serve");
    let stderr = proc.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let addr: SocketAddr = loop {
        let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("server start log line");
        if let Some(rest) = line.split("serving addr=").nth(1) {
            break rest.split_whitespace().next().expect("address").parse().expect("socket address");
        }
    };
    Child { proc, addr, logs: rx }
}

impl Child {
    /// A field of /proc/PID/status in bytes (VmRSS, VmHWM).
    pub fn status_bytes(&self, field: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.proc.id())).expect("proc status");
        s.lines()
            .find_map(|l| l.strip_prefix(field).and_then(|r| r.strip_prefix(':')))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or_else(|| panic!("no {field} in /proc status"))
    }

    /// Sends SIGTERM and waits (at most `timeout`) for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let st =
            std::process::Command::new("kill").args(["-TERM", &self.proc.id().to_string()]).status().expect("kill");
        assert!(st.success());
        self.wait(timeout)
    }

    pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.proc.try_wait().expect("wait") {
                return s;
            }
            if t0.elapsed() > timeout {
                let _ = self.proc.kill();
                panic!("server did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.proc.kill();
        let _ = self.proc.wait();
    }
}

/// A v2 request body with the binary data extension: (JSON header length, body) for `images` as one
/// BYTES input of shape [n], each element length-prefixed.
pub fn v2_binary(images: &[Vec<u8>]) -> (usize, Vec<u8>) {
    let mut data = Vec::new();
    for img in images {
        data.extend_from_slice(&(img.len() as u32).to_le_bytes());
        data.extend_from_slice(img);
    }
    let head = serde_json::json!({"inputs": [{"name": "image", "shape": [images.len()], "datatype": "BYTES",
        "parameters": {"binary_data_size": data.len()}}]})
    .to_string();
    let mut body = head.clone().into_bytes();
    body.extend_from_slice(&data);
    (head.len(), body)
}

pub fn post_v2_binary(addr: SocketAddr, images: &[Vec<u8>]) -> Resp {
    let (hlen, body) = v2_binary(images);
    let hlen = hlen.to_string();
    request(
        addr,
        "POST",
        "/v2/models/retinaface/infer",
        &[("Content-Type", "application/octet-stream"), ("Inference-Header-Content-Length", &hlen)],
        &body,
    )
}

/// PNG's CRC-32 of a chunk's type and data.
pub fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

/// Appends one PNG chunk (length, type, data, CRC) to `out`.
pub fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32(&body).to_be_bytes());
}

/// A PNG decompression bomb: `w`x`h` 8-bit RGB, all black, a few tens of KB for 4096x4096.
pub fn png_bomb(w: u32, h: u32) -> Vec<u8> {
    use flate2::write::ZlibEncoder;
    let mut z = ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    let row = vec![0u8; 1 + 3 * w as usize];
    for _ in 0..h {
        z.write_all(&row).expect("deflate");
    }
    let idat = z.finish().expect("deflate");
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    png_chunk(&mut out, b"IDAT", &idat);
    png_chunk(&mut out, b"IEND", &[]);
    out
}
