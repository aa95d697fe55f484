//! Scheduling against a real server on 127.0.0.1: queue overflow gives exactly K immediate 503s,
//! queue timeouts never execute, abandoned requests are dropped before they run, the batcher waits
//! at most the queue delay and never mixes sizes.

mod serve_util;

use retinaface::image_io::{self, DecodeLimits};
use serve_util::*;
use std::io::Write;
use std::time::{Duration, Instant};

fn crop_png(w: usize, h: usize) -> Vec<u8> {
    let img = image_io::load(&shared().join("images/crowd.jpg"), &DecodeLimits::default()).expect("load");
    png_of(&img.crop(0, 0, w, h).expect("crop"))
}

#[test]
fn queue_overflow_gives_exactly_k_immediate_503s_and_q_successes() {
    // Triton's own check: workers blocked, queue capacity Q, Q+K requests → K rejected at once.
    const Q: usize = 4;
    const K: usize = 3;
    let (server, gate) = start_gated(&["--max-queue", "4", "--max-batch", "2", "--max-queue-delay-us", "0"], false);
    let a = server.addr();
    let img = crop_png(160, 120);
    let (tx, rx) = std::sync::mpsc::channel();
    let t0 = Instant::now();
    let clients: Vec<_> = (0..Q + K)
        .map(|_| {
            let (img, tx) = (img.clone(), tx.clone());
            std::thread::spawn(move || {
                let r = detect(a, &img);
                let _ =
                    tx.send((r.status, r.header("retry-after").map(str::to_string), r.error_or_empty(), t0.elapsed()));
            })
        })
        .collect();
    // With the executor still blocked, exactly K answers arrive, all 503.
    let mut early = Vec::new();
    for _ in 0..K {
        early.push(rx.recv_timeout(Duration::from_secs(10)).expect("an immediate 503"));
    }
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err(), "more than K answers while the workers were blocked");
    for (status, retry, err, _) in &early {
        assert_eq!(*status, 503);
        assert_eq!(retry.as_deref(), Some("1"));
        assert!(err.contains("overloaded"), "{err}");
    }
    assert_eq!(metric(a, "nv_inference_pending_request_count"), Q as f64);
    gate.open();
    let late: Vec<_> =
        (0..Q).map(|_| rx.recv_timeout(Duration::from_secs(20)).expect("a queued request's answer")).collect();
    assert!(late.iter().all(|(s, ..)| *s == 200), "{late:?}");
    for c in clients {
        c.join().expect("client");
    }
    assert_eq!(failures(a, "REJECTED"), K as f64);
    assert_eq!(metric(a, "nv_inference_request_success"), Q as f64);
    assert_eq!(metric(a, "nv_inference_count"), Q as f64);
    assert_eq!(metric(a, "nv_inference_pending_request_count"), 0.0);
    server.shutdown().expect("shutdown");
}

#[test]
fn a_request_that_times_out_in_the_queue_is_never_executed() {
    let (server, gate) = start_gated(&["--queue-timeout-ms", "300"], false);
    let a = server.addr();
    let img = crop_png(160, 120);
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let img = img.clone();
            std::thread::spawn(move || {
                let t0 = Instant::now();
                (detect(a, &img), t0.elapsed())
            })
        })
        .collect();
    for c in clients {
        let (r, took) = c.join().expect("client");
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(r.error().contains("timed out in the queue"), "{}", r.error());
        assert!(took >= Duration::from_millis(250) && took < Duration::from_secs(5), "took {took:?}");
    }
    assert_eq!(metric(a, "nv_inference_pending_request_count"), 0.0, "timed-out requests left the queue");
    gate.open();
    // Give the executor every chance to (wrongly) run them.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(metric(a, "nv_inference_exec_count"), 0.0);
    assert_eq!(metric(a, "nv_inference_count"), 0.0);
    assert_eq!(failures(a, "REJECTED"), 2.0);
    // A fresh request still runs.
    assert_eq!(detect(a, &img).status, 200);
    assert_eq!(metric(a, "nv_inference_count"), 1.0);
    server.shutdown().expect("shutdown");
}

#[test]
fn a_request_whose_client_went_away_is_dropped_before_it_runs() {
    let (server, gate) = start_gated(&[], false);
    let a = server.addr();
    let img = crop_png(160, 120);
    let mut s = connect(a);
    s.write_all(format!("POST /v1/detect HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n", img.len()).as_bytes())
        .expect("head");
    s.write_all(&img).expect("body");
    wait_until(Duration::from_secs(10), "the request queued", || {
        metric(a, "nv_inference_pending_request_count") == 1.0
    });
    drop(s);
    // The queue slot is freed just before the failure is counted: wait for both.
    wait_until(Duration::from_secs(10), "the abandoned request withdrawn and counted", || {
        metric(a, "nv_inference_pending_request_count") == 0.0 && failures(a, "CANCELED") == 1.0
    });
    gate.open();
    assert_eq!(detect(a, &img).status, 200);
    assert_eq!(metric(a, "nv_inference_count"), 1.0, "only the live request ran");
    server.shutdown().expect("shutdown");
}

#[test]
fn the_batcher_waits_for_company_at_most_the_queue_delay() {
    let img = crop_png(160, 120);
    // Batching on: two requests sent together share one execution within the 400 ms window.
    let server = start(&["--max-batch", "4", "--max-queue-delay-us", "400000"]);
    let a = server.addr();
    let t0 = Instant::now();
    let two: Vec<_> = (0..2)
        .map(|_| {
            let img = img.clone();
            std::thread::spawn(move || detect(a, &img).status)
        })
        .collect();
    for c in two {
        assert_eq!(c.join().expect("client"), 200);
    }
    let took = t0.elapsed();
    assert_eq!(metric(a, "nv_inference_exec_count"), 1.0, "one batch of two");
    assert_eq!(metric(a, "nv_inference_count"), 2.0);
    assert!(took >= Duration::from_millis(350), "a batch short of max waits for the delay ({took:?})");
    // A lone request is not held longer than the delay (plus the forward pass).
    let t0 = Instant::now();
    assert_eq!(detect(a, &img).status, 200);
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    server.shutdown().expect("shutdown");

    // --max-batch 1 disables batching: the same two requests run separately, with no wait.
    let server = start(&["--max-batch", "1", "--max-queue-delay-us", "400000"]);
    let a = server.addr();
    let two: Vec<_> = (0..2)
        .map(|_| {
            let img = img.clone();
            std::thread::spawn(move || detect(a, &img).status)
        })
        .collect();
    for c in two {
        assert_eq!(c.join().expect("client"), 200);
    }
    assert_eq!(metric(a, "nv_inference_exec_count"), 2.0);
    server.shutdown().expect("shutdown");
}

#[test]
fn sizes_are_batched_in_their_own_buckets() {
    let (server, gate) = start_gated(&["--max-batch", "8", "--max-queue-delay-us", "0"], false);
    let a = server.addr();
    let imgs = [crop_png(160, 120), crop_png(200, 100), crop_png(160, 120), crop_png(200, 100)];
    let clients: Vec<_> = imgs.iter().cloned().map(|img| std::thread::spawn(move || detect(a, &img))).collect();
    wait_until(Duration::from_secs(10), "four queued", || metric(a, "nv_inference_pending_request_count") == 4.0);
    // Pending counts admission; make sure all four are decoded and in their buckets too.
    std::thread::sleep(Duration::from_millis(300));
    gate.open();
    for (c, img) in clients.into_iter().zip(&imgs) {
        let r = c.join().expect("client");
        assert_eq!(r.status, 200, "{}", r.text());
        let dec = image_io::decode(img, "x", &DecodeLimits::default()).expect("decode");
        assert_eq!(r.json()["width"].as_u64(), Some(dec.width as u64));
    }
    assert_eq!(metric(a, "nv_inference_exec_count"), 2.0, "one batch per size");
    assert_eq!(metric(a, "nv_inference_count"), 4.0);
    server.shutdown().expect("shutdown");
}
