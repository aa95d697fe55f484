//! `retinaface serve` as a user runs it: the binary on 127.0.0.1, every shared image posted to
//! /v1/detect answered exactly as `retinaface detect --json` answers, and SIGTERM ends it with exit 0.

mod serve_util;

use serve_util::*;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn serve_binary_answers_like_detect_json_and_exits_cleanly_on_sigterm() {
    let bin = env!("CARGO_BIN_EXE_retinaface");
    let weights = real_weights();
    let mut child = Command::new(bin)
        .args(["serve", "--backend", "cpu", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--weights"])
        .arg(&weights)
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start retinaface serve");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
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

    for name in ["crowd.jpg", "kids.jpg", "trio.jpg"] {
        let path = shared().join("images").join(name);
        let served = detect(addr, &read_image(name));
        assert_eq!(served.status, 200, "{name}: {}", served.text());
        let out = Command::new(bin)
            .args(["detect", "--json", "--backend", "cpu", "--weights"])
            .arg(&weights)
            .arg(&path)
            .output()
            .expect("detect");
        assert!(out.status.success());
        let cli: serde_json::Value = serde_json::from_slice(&out.stdout).expect("detect --json");
        let srv = served.json();
        assert_eq!(srv["width"], cli["width"], "{name}");
        assert_eq!(srv["height"], cli["height"], "{name}");
        assert_eq!(srv["detections"], cli["detections"], "{name}: detections differ");
        assert!(!cli["detections"].as_array().expect("array").is_empty());
    }

    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(status.success());
    let t0 = Instant::now();
    let code = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "server did not stop after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(code.success(), "exit status after SIGTERM: {code:?}");
}
