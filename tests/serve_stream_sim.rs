//! `serve` on a CUDA backend (here the simulation) streams its batches, two in flight: concurrent
//! requests of several sizes each get exactly what their image gets alone on the same backend, and
//! every one of them is counted once.
#![cfg(feature = "cuda-sim")]

mod serve_util;

use retinaface::image_io::{self, DecodeLimits};
use retinaface::{Backend, DetectOptions, Detection, Engine, ResizeMode, WeightsSpec};
use serve_util::*;

#[test]
fn streamed_batches_answer_each_request_with_its_own_detections() {
    // No queue timeout: the simulation is slow, more so beside other tests, and this test is about
    // answers, not deadlines.
    let server =
        start(&["--backend", "cuda-sim", "--max-batch", "2", "--resize", "long-side:160", "--queue-timeout-ms", "0"]);
    let mut engine = Engine::new(&WeightsSpec::File(real_weights()), None).unwrap();
    engine.set_backend(Backend::CudaSim).unwrap();
    let opts = DetectOptions { resize: ResizeMode::LongSide(160), ..DetectOptions::default() };
    let names = ["trio.jpg", "kids.jpg", "crowd.jpg"];
    let mut want = Vec::new();
    for name in names {
        let bytes = read_image(name);
        let img = image_io::decode(&bytes, name, &DecodeLimits::default()).unwrap();
        want.push((bytes, engine.detect(&img, &opts).unwrap()));
    }
    assert!(want.iter().all(|(_, d)| !d.is_empty()), "every image gives detections to compare");
    let addr = server.addr();
    // Three rounds of every image at once: batches of equal sizes (two in flight) and size changes.
    let handles: Vec<_> = (0..9)
        .map(|i| {
            let bytes = want[i % 3].0.clone();
            std::thread::spawn(move || detect(addr, &bytes))
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let r = h.join().expect("client thread");
        assert_eq!(r.status, 200, "{}", r.text());
        let got: Vec<Detection> = serde_json::from_value(r.json()["detections"].clone()).unwrap();
        assert!(got == want[i % 3].1, "request {i} ({}) got another answer", names[i % 3]);
    }
    assert_eq!(metric(server.metrics_addr(), "nv_inference_count"), 9.0);
    server.shutdown().expect("shutdown");
}
