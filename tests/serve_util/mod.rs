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
