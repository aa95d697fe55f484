//! Hostile requests against a server on 127.0.0.1: request bytes in flight across connections are
//! bounded, huge or deep JSON is refused without tying up the async runtime, and every error answer
//! (405, a path that is not UTF-8, a number as image data) is `{"error": ...}` JSON.

mod serve_util;

use serde_json::json;
use serve_util::*;
use std::io::Write;
use std::time::{Duration, Instant};

#[test]
fn request_bodies_in_flight_are_bounded_across_connections() {
    // The issue's attack scaled down: connections each holding a body one byte short of its length.
    let server = start(&["--max-body-bytes", "1M", "--max-body-bytes-in-flight", "4M"]);
    let a = server.addr();
    let mut holders = Vec::new();
    for _ in 0..4 {
        let mut s = connect(a);
        let head = "POST /v1/detect HTTP/1.1\r\nHost: t\r\nContent-Type: image/jpeg\r\nContent-Length: 1048576\r\n\r\n";
        s.write_all(head.as_bytes()).expect("head");
        s.write_all(&vec![0xFFu8; 1048575]).expect("body");
        holders.push(s);
    }
    // Once the server has reserved all four bodies, the next one is refused before it is read.
    wait_until(Duration::from_secs(20), "four bodies reserved", || {
        metric(a, "retinaface_body_bytes_in_flight") == (4 << 20) as f64
    });
    let r = request(a, "POST", "/v1/detect", &[("Content-Type", "image/jpeg")], &vec![0xFFu8; 1 << 20]);
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.error().contains("--max-body-bytes-in-flight"), "{}", r.error());
    let r = detect(a, &read_image("trio.jpg"));
    assert_eq!(r.status, 503, "small bodies too, while the budget is full: {}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    // Hung-up holders give their bytes back.
    drop(holders);
    wait_until(Duration::from_secs(10), "the budget freed", || metric(a, "retinaface_body_bytes_in_flight") == 0.0);
    assert_eq!(detect(a, &read_image("trio.jpg")).status, 200);
    server.shutdown().expect("shutdown");
}

#[test]
fn chunked_bodies_count_against_the_bytes_in_flight_too() {
    let server = start(&["--max-body-bytes", "1M", "--max-body-bytes-in-flight", "1M"]);
    let a = server.addr();
    // A chunked body reserves twice what has arrived (it is joined at the end): 600 KB do not fit.
    let mut s = connect(a);
    let head = "POST /v1/detect HTTP/1.1\r\nHost: t\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n";
    s.write_all(head.as_bytes()).expect("head");
    let chunk = vec![b'x'; 600_000];
    let _ = s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes());
    let _ = s.write_all(&chunk);
    let _ = s.write_all(b"\r\n0\r\n\r\n");
    let r = read_response(&mut s);
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.error().contains("in flight"), "{}", r.error());
    server.shutdown().expect("shutdown");
}

#[test]
fn huge_flat_json_is_refused_quickly_and_health_checks_do_not_wait() {
    let server = start(&[]);
    let a = server.addr();
    // 20 MiB of `[0,0,...]` as the image data (the issue's case 9).
    let mut body = br#"{"inputs":[{"name":"image","shape":[1],"datatype":"BYTES","data":["#.to_vec();
    while body.len() < 20 * 1024 * 1024 - 64 {
        body.extend_from_slice(b"0,");
    }
    body.extend_from_slice(b"0]}]}");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut worst = Duration::ZERO;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                assert_eq!(get(a, "/v2/health/live").status, 200);
                worst = worst.max(t.elapsed());
                std::thread::sleep(Duration::from_millis(5));
            }
            worst
        })
    };
    let t0 = Instant::now();
    let r = post(a, "/v2/models/retinaface/infer", "application/json", &body);
    let took = t0.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let worst = prober.join().expect("prober");
    eprintln!("20 MiB of [0,0,...]: answered in {took:?}; slowest health check meanwhile {worst:?}");
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.error().contains("elements, its shape says 1"), "{}", r.error());
    assert!(r.error().contains("element") && !r.error().contains("empty image"), "{}", r.error());
    assert!(took < Duration::from_secs(3), "20 MiB refused in {took:?}");
    assert!(worst < Duration::from_millis(500), "a health check waited {worst:?}");
    // Deep nesting: a clear 400, no stack overflow.
    let deep = format!("{}{}", "[".repeat(1_000_000), "]".repeat(1_000_000));
    let r = post(a, "/v2/models/retinaface/infer", "application/json", deep.as_bytes());
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.error().contains("nests deeper than"), "{}", r.error());
    server.shutdown().expect("shutdown");
}

#[test]
fn every_error_answer_is_json_and_names_the_problem() {
    let server = start(&[]);
    let a = server.addr();
    // A number as a data element is named as a number, not "empty image".
    let req = json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [12345]}]});
    let r = post(a, "/v2/models/retinaface/infer", "application/json", req.to_string().as_bytes());
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.error().contains("element 0 is a number"), "{}", r.error());
    // Wrong method: 405 with a JSON error (axum answers these with an empty body by default).
    for (method, path) in
        [("GET", "/v2/models/retinaface/infer"), ("POST", "/v2/health/live"), ("DELETE", "/v1/detect")]
    {
        let r = request(a, method, path, &[], b"");
        assert_eq!(r.status, 405, "{method} {path}");
        assert!(r.error().contains(&format!("method {method} is not allowed")), "{}", r.error());
        assert!(r.header("allow").is_some(), "405 keeps its Allow header");
    }
    // Path segments that are not UTF-8: a 400 with a JSON error.
    for path in ["/v2/models/%FF%FE/ready", "/v2/models/%C3%28/infer", "/v2/models/retinaface/versions/%FF"] {
        let method = if path.ends_with("infer") { "POST" } else { "GET" };
        let r = request(a, method, path, &[], b"{}");
        assert_eq!(r.status, 400, "{path}: {}", r.text());
        assert!(r.header("content-type").is_some_and(|c| c.starts_with("application/json")), "{path}");
        assert!(r.error().to_lowercase().contains("utf-8"), "{path}: {}", r.error());
    }
    server.shutdown().expect("shutdown");
}
