//! The server's protocol against a real server on 127.0.0.1 with the real mobilenetv1_0.25 weights:
//! answers equal to the library's (as `retinaface detect --json`), KServe v2 JSON and binary
//! requests, metadata and health routes, batching that does not change answers.

mod serve_util;

use base64::Engine as _;
use retinaface::image_io::{self, DecodeLimits};
use retinaface::{DetectOptions, Detection, Engine, WeightsSpec};
use serde_json::{Value, json};
use serve_util::*;
use std::time::Duration;

fn engine() -> Engine {
    Engine::new(&WeightsSpec::File(real_weights()), None).expect("engine")
}

/// What `retinaface detect --json` prints for one image, built from the library directly: name,
/// size and detections (compared as f32, as they were computed; JSON text holds the shortest f32 form).
fn expected(engine: &Engine, name: &str, bytes: &[u8]) -> (Value, Vec<Detection>) {
    let img = image_io::decode(bytes, name, &DecodeLimits::default()).expect("decode");
    let dets = engine.detect(&img, &DetectOptions::default()).expect("detect");
    (json!({"image": name, "width": img.width, "height": img.height}), dets)
}

fn detections(v: &Value) -> Vec<Detection> {
    serde_json::from_value(v["detections"].clone()).expect("detections parse")
}

/// Splits a `/v1/detect` answer into its header fields and its detections.
fn split(mut v: Value) -> (Value, Vec<Detection>) {
    let d = detections(&v);
    v.as_object_mut().expect("object").remove("detections");
    (v, d)
}

#[test]
fn v1_detect_matches_the_library_on_every_shared_image() {
    let server = start(&[]);
    let engine = engine();
    let mut names: Vec<String> = std::fs::read_dir(shared().join("images"))
        .expect("images dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(names.len() >= 3, "expected the shared images, found {names:?}");
    for name in &names {
        let bytes = read_image(name);
        let r = request(
            server.addr(),
            "POST",
            &format!("/v1/detect?image={name}"),
            &[("Content-Type", "image/jpeg")],
            &bytes,
        );
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        let want = expected(&engine, name, &bytes);
        assert!(!want.1.is_empty(), "{name}: the real weights find faces");
        let got = split(r.json());
        assert_eq!(got.0, want.0, "{name}");
        assert!(got.1 == want.1, "{name}: detections differ from the library's");
    }
    // trio.jpg carries an EXIF orientation: the reported size is the rotated one.
    let trio = request(server.addr(), "POST", "/v1/detect", &[], &read_image("trio.jpg")).json();
    assert_eq!((trio["width"].as_u64(), trio["height"].as_u64()), (Some(540), Some(360)));
    assert_eq!(trio["image"], "request");
    server.shutdown().expect("shutdown");
}

/// Decodes a v2 response (JSON, or the binary data extension) into name → (shape, f32 values).
fn outputs(r: &Resp) -> std::collections::BTreeMap<String, (Vec<u64>, Vec<f64>)> {
    let (head, mut bin): (Value, &[u8]) = match r.header("inference-header-content-length") {
        Some(n) => {
            let n: usize = n.parse().expect("header length");
            (serde_json::from_slice(&r.body[..n]).expect("json header"), &r.body[n..])
        }
        None => (r.json(), &[]),
    };
    let mut out = std::collections::BTreeMap::new();
    for o in head["outputs"].as_array().expect("outputs") {
        let shape: Vec<u64> = o["shape"].as_array().expect("shape").iter().map(|d| d.as_u64().expect("dim")).collect();
        let vals: Vec<f64> = match o["parameters"]["binary_data_size"].as_u64() {
            Some(sz) => {
                let (now, rest) = bin.split_at(sz as usize);
                bin = rest;
                let int = o["datatype"] == "INT32";
                now.chunks(4)
                    .map(|c| {
                        if int {
                            i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64
                        } else {
                            f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64
                        }
                    })
                    .collect()
            }
            None => o["data"].as_array().expect("data").iter().map(|v| v.as_f64().expect("number")).collect(),
        };
        assert_eq!(vals.len() as u64, shape.iter().product::<u64>(), "{} size vs shape", o["name"]);
        out.insert(o["name"].as_str().expect("name").to_string(), (shape, vals));
    }
    assert!(bin.is_empty(), "unread binary output bytes");
    out
}

#[test]
fn v2_infer_json_and_binary_give_the_library_detections() {
    let server = start(&[]);
    let engine = engine();
    let bytes = read_image("kids.jpg");
    let want = expected(&engine, "kids.jpg", &bytes).1;
    let k = want.len() as u64;
    let f = |v: f64| v as f32;
    let check = |outs: &std::collections::BTreeMap<String, (Vec<u64>, Vec<f64>)>| {
        assert_eq!(outs["num_detections"], (vec![1], vec![k as f64]));
        assert_eq!(outs["boxes"].0, vec![1, k, 4]);
        assert_eq!(outs["landmarks"].0, vec![1, k, 10]);
        // Exact in f32: JSON text holds each f32's shortest form, binary its bits.
        for (j, d) in want.iter().enumerate() {
            let b: Vec<f32> = outs["boxes"].1[j * 4..j * 4 + 4].iter().map(|&v| f(v)).collect();
            assert_eq!(b, d.bbox, "box {j}");
            assert_eq!(f(outs["scores"].1[j]), d.score, "score {j}");
            let l: Vec<f32> = outs["landmarks"].1[j * 10..j * 10 + 10].iter().map(|&v| f(v)).collect();
            assert_eq!(l, d.landmarks, "landmarks {j}");
        }
    };

    // JSON: the BYTES element is the base64 of the file.
    let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
    let req = json!({"id": "r1", "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}]});
    let r = post(server.addr(), "/v2/models/retinaface/infer", "application/json", req.to_string().as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["id"], "r1");
    assert_eq!(r.json()["model_name"], "retinaface");
    check(&outputs(&r));

    // Binary data extension as Triton clients send it: 4-byte length prefix, binary outputs.
    for prefixed in [true, false] {
        let mut data = Vec::new();
        if prefixed {
            data.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        }
        data.extend_from_slice(&bytes);
        let head = json!({
            "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": data.len()}}],
            "outputs": [{"name": "num_detections", "parameters": {"binary_data": true}}, {"name": "boxes", "parameters": {"binary_data": true}},
                        {"name": "scores"}, {"name": "landmarks", "parameters": {"binary_data": true}}],
        })
        .to_string();
        let mut body = head.clone().into_bytes();
        body.extend_from_slice(&data);
        let hl = head.len().to_string();
        let r = request(
            server.addr(),
            "POST",
            "/v2/models/retinaface/versions/1/infer",
            &[("Inference-Header-Content-Length", &hl), ("Content-Type", "application/octet-stream")],
            &body,
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.header("inference-header-content-length").is_some());
        check(&outputs(&r));
    }

    // Two images in one request: padded to the larger count, rows in request order.
    let small = read_image("trio.jpg");
    let want2 = expected(&engine, "trio.jpg", &small).1.len() as f64;
    let req = json!({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
        "data": [b64, base64::engine::general_purpose::STANDARD.encode(&small)]}]});
    let r = post(server.addr(), "/v2/models/retinaface/infer", "application/json", req.to_string().as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    let outs = outputs(&r);
    assert_eq!(outs["num_detections"].1, vec![k as f64, want2]);
    assert_eq!(outs["scores"].0, vec![2, k.max(want2 as u64)]);
    server.shutdown().expect("shutdown");
}

#[test]
fn v2_bad_requests_are_400_with_a_reason() {
    let server = start(&[]);
    let a = server.addr();
    let jpg = base64::engine::general_purpose::STANDARD.encode(read_image("trio.jpg"));
    let cases: Vec<(String, &str)> = vec![
        ("{not json".into(), "not valid JSON"),
        (json!({"inputs": []}).to_string(), "exactly one input"),
        (json!({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [jpg]}]}).to_string(), "unknown input"),
        (json!({"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": [1.0]}]}).to_string(), "datatype"),
        (json!({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": [jpg]}]}).to_string(), "shape says 2"),
        (json!({"inputs": [{"name": "image", "shape": [0], "datatype": "BYTES", "data": []}]}).to_string(), "N >= 1"),
        (json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]}).to_string(), "base64"),
        (json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [jpg]}], "outputs": [{"name": "nope"}]}).to_string(), "unknown output"),
        (json!({"inputs": [{"name": "image", "shape": [100], "datatype": "BYTES", "data": [jpg]}]}).to_string(), "at most"),
    ];
    for (body, why) in cases {
        let r = post(a, "/v2/models/retinaface/infer", "application/json", body.as_bytes());
        assert_eq!(r.status, 400, "{why}: {}", r.text());
        assert!(r.error().contains(why), "expected `{why}` in `{}`", r.error());
    }
    // Binary header longer than the body.
    let r = request(a, "POST", "/v2/models/retinaface/infer", &[("Inference-Header-Content-Length", "999")], b"{}");
    assert_eq!(r.status, 400, "{}", r.text());
    // Unknown model and version: 404 with a JSON error.
    let r = post(a, "/v2/models/other/infer", "application/json", b"{}");
    assert_eq!(r.status, 404);
    assert!(r.error().contains("unknown model"));
    assert_eq!(get(a, "/v2/models/retinaface/versions/7").status, 404);
    assert_eq!(get(a, "/nothing/here").status, 404);
    // Nine bad bodies, the short binary header, the unknown model; the GETs are not inference requests.
    assert_eq!(failures(a, "OTHER"), 11.0, "each bad request counted once");
    server.shutdown().expect("shutdown");
}

#[test]
fn health_metadata_and_metrics() {
    let server = start(&["--model-name", "faces"]);
    let a = server.addr();
    assert_eq!(get(a, "/v2/health/live").status, 200);
    assert_eq!(get(a, "/v2/health/ready").status, 200);
    assert_eq!(get(a, "/v2/models/faces/ready").status, 200);
    assert_eq!(get(a, "/v2/models/faces/versions/1/ready").status, 200);
    assert_eq!(get(a, "/v2/models/retinaface/ready").status, 404);
    let meta = get(a, "/v2").json();
    assert_eq!(meta["extensions"], json!(["binary_tensor_data"]));
    let m = get(a, "/v2/models/faces").json();
    assert_eq!(m["name"], "faces");
    assert_eq!(m["inputs"][0]["datatype"], "BYTES");
    assert_eq!(m["outputs"].as_array().map(Vec::len), Some(4));
    assert_eq!(detect(a, &read_image("trio.jpg")).status, 200);
    // The metrics port serves Triton's names; the main port serves the same text.
    let text = get(server.metrics_addr(), "/metrics").text();
    for name in [
        "nv_inference_request_success",
        "nv_inference_request_failure",
        "nv_inference_count",
        "nv_inference_exec_count",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_pending_request_count",
    ] {
        assert!(text.contains(&format!("\n{name}{{model=\"faces\",version=\"1\"")), "{name} missing:\n{text}");
    }
    assert_eq!(metric(server.metrics_addr(), "nv_inference_request_success"), 1.0);
    assert_eq!(metric(a, "nv_inference_count"), 1.0);
    assert!(metric(a, "nv_inference_compute_infer_duration_us") > 0.0);
    assert_eq!(get(server.metrics_addr(), "/v2/health/live").status, 404, "the metrics port serves only /metrics");
    server.shutdown().expect("shutdown");
}

#[test]
fn a_batch_gives_each_image_what_it_gets_alone() {
    // Four different 320x240 crops: one bucket. With the executor held until all four are queued,
    // they run as one batch of four.
    let engine = engine();
    let mut crops = Vec::new();
    for (name, x, y) in [("crowd.jpg", 0, 0), ("crowd.jpg", 500, 300), ("kids.jpg", 300, 200), ("trio.jpg", 100, 60)] {
        let img = image_io::load(&shared().join("images").join(name), &DecodeLimits::default()).expect("load");
        crops.push(img.crop(x, y, 320, 240).expect("crop"));
    }
    let alone: Vec<Vec<Detection>> =
        crops.iter().map(|c| engine.detect(c, &DetectOptions::default()).expect("detect")).collect();
    assert!(alone.iter().all(|d| !d.is_empty()), "every crop has detections to compare");

    let (server, gate) = start_gated(&["--max-batch", "4", "--max-queue-delay-us", "10000000"], false);
    let a = server.addr();
    let handles: Vec<_> = crops
        .iter()
        .map(|c| {
            let png = png_of(c);
            std::thread::spawn(move || detect(a, &png))
        })
        .collect();
    wait_until(Duration::from_secs(20), "four queued requests", || {
        metric(a, "nv_inference_pending_request_count") == 4.0
    });
    gate.open();
    for (h, want) in handles.into_iter().zip(&alone) {
        let r = h.join().expect("client thread");
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(&detections(&r.json()) == want, "batched answer differs from the image run alone");
    }
    assert_eq!(metric(a, "nv_inference_exec_count"), 1.0, "one batch");
    assert_eq!(metric(a, "nv_inference_count"), 4.0, "of four images");
    server.shutdown().expect("shutdown");
}

/// The batcher runs on the engine's backend: with the CUDA kernels (here in the CPU simulation) the
/// server answers what the CPU library answers, within the CUDA path's tolerance.
#[test]
fn batches_run_on_the_chosen_backend() {
    let server = start(&["--backend", "cuda-sim"]);
    let engine = engine();
    let bytes = read_image("trio.jpg");
    let r = detect(server.addr(), &bytes);
    assert_eq!(r.status, 200, "{}", r.text());
    let (_, want) = expected(&engine, "trio.jpg", &bytes);
    let got = detections(&r.json());
    assert_eq!(got.len(), want.len());
    // The kernels sum in another order than the CPU ops: bit-identical answers would mean the batcher
    // ran the CPU path despite the backend chosen.
    assert_ne!(got, want, "the answer came from the CPU path");
    for (g, w) in got.iter().zip(&want) {
        assert!((g.score - w.score).abs() < 1e-5, "{g:?} vs {w:?}");
        assert!(g.bbox.iter().zip(&w.bbox).all(|(a, b)| (a - b).abs() < 1e-3), "{g:?} vs {w:?}");
    }
    server.shutdown().expect("shutdown");
}
