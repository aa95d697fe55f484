//! Device post-processing at any scale (kernels/post.cu through src/cuda/ops/post.rs), run in the CPU
//! simulation against src/post on the CPU: no candidate cap, the radix sort's order (ties by anchor
//! index, as the CPU's stable sort), both NMS paths, one resize factor per image. Equality is exact:
//! the same detections, in the same order, with the same f32 bits.
#![cfg(feature = "cuda-sim")]

mod rng;
use retinaface::cuda::ops::post::{NmsPath, device_postprocess_each};
use retinaface::cuda::params::NMS_BITMASK_MAX;
use retinaface::cuda::sim::SimRunner;
use retinaface::post::{PostOptions, RawOutput, anchors, postprocess};
use rng::Rng;
use std::path::{Path, PathBuf};

/// Raw outputs of an h×w input with random boxes and scores; `levels` quantises the scores so that
/// many are exactly equal (ties).
fn random_raw(rng: &mut Rng, h: usize, w: usize, levels: Option<u32>) -> RawOutput {
    let a = anchors::num_anchors(h, w);
    let mut conf = Vec::with_capacity(2 * a);
    for _ in 0..a {
        let mut s = rng.uniform();
        if let Some(q) = levels {
            s = (s * q as f32).floor() / q as f32;
        }
        conf.extend_from_slice(&[1.0 - s, s]);
    }
    RawOutput { h, w, loc: rng.vec(4 * a, 1.5), conf, landmarks: rng.vec(10 * a, 2.0) }
}

fn uncapped(conf_threshold: f32) -> PostOptions {
    PostOptions { conf_threshold, nms_threshold: 0.4, pre_nms_topk: None, post_nms_topk: None }
}

/// Runs the device post-processing on `raws` with `resizes` over `path` and compares every image with
/// the CPU's; returns (candidates, detections) of each image.
fn check(
    r: &mut SimRunner,
    raws: &[RawOutput],
    opts: &PostOptions,
    resizes: &[f32],
    path: NmsPath,
    what: &str,
) -> Vec<(usize, usize)> {
    let t0 = std::time::Instant::now();
    let got = device_postprocess_each(r, raws, opts, resizes, path).unwrap();
    let t_dev = t0.elapsed();
    let priors = anchors::priors(raws[0].h, raws[0].w);
    let mut stats = Vec::new();
    for (b, raw) in raws.iter().enumerate() {
        let want = postprocess(raw, &priors, resizes[b], opts);
        let cands = raw.conf.chunks(2).filter(|c| c[1] > opts.conf_threshold).count();
        assert_eq!(got[b].len(), want.len(), "{what} image {b} ({cands} candidates): number of detections");
        for (i, (g, w)) in got[b].iter().zip(&want).enumerate() {
            assert_eq!(g, w, "{what} image {b}: detection {i}");
        }
        stats.push((cands, want.len()));
    }
    println!("{what} {path:?}: (candidates, detections) {stats:?}, simulation {:.2} s", t_dev.as_secs_f64());
    stats
}

#[test]
fn uncapped_at_640_with_ties_caps_and_per_image_resize_factors() {
    let mut rng = Rng(41);
    let mut r = SimRunner::new();
    let (h, w) = (640, 640);
    assert_eq!(anchors::num_anchors(h, w), 16800);
    // Three images, each with its own resize factor: one call, as CudaExecutor::detect now makes.
    let raws: Vec<RawOutput> = vec![
        random_raw(&mut rng, h, w, None),
        random_raw(&mut rng, h, w, Some(16)),
        random_raw(&mut rng, h, w, Some(3)),
    ];
    let resizes = [1.0, 0.5, 1.7];
    // WIDER's protocol: no cap; nearly every anchor a candidate; thousands of ties in images 1 and 2.
    let s = check(&mut r, &raws, &uncapped(0.02), &resizes, NmsPath::Auto, "640 uncapped");
    assert!(s.iter().all(|&(c, d)| c > 10_000 && d > 100), "{s:?}");
    // Every anchor a candidate (image 0 has no score of exactly 0).
    let s = check(&mut r, &raws, &uncapped(0.0), &resizes, NmsPath::Tiled, "640 all candidates");
    assert_eq!(s[0].0, 16800);
    // The reference's defaults (5000 / 750), the tiled path by Auto.
    check(&mut r, &raws, &PostOptions::default(), &resizes, NmsPath::Auto, "640 default caps");
    // Caps the bitmask path takes, against the tiled one on the same input.
    let small =
        PostOptions { conf_threshold: 0.3, nms_threshold: 0.3, pre_nms_topk: Some(2000), post_nms_topk: Some(90) };
    const { assert!(2000 <= NMS_BITMASK_MAX) };
    let a = check(&mut r, &raws, &small, &resizes, NmsPath::Bitmask, "640 bitmask");
    let b = check(&mut r, &raws, &small, &resizes, NmsPath::Tiled, "640 tiled");
    assert_eq!(a, b);
    assert!(a.iter().all(|&(_, d)| d == 90), "post_nms_topk cuts: {a:?}");
    // Only a pre-NMS cap, and only a post-NMS cap.
    let pre = PostOptions { pre_nms_topk: Some(777), ..uncapped(0.5) };
    check(&mut r, &raws, &pre, &resizes, NmsPath::Auto, "640 pre cap");
    let post = PostOptions { post_nms_topk: Some(333), ..uncapped(0.5) };
    check(&mut r, &raws, &post, &resizes, NmsPath::Tiled, "640 post cap");
}

#[test]
fn uncapped_at_1920x1080_every_anchor_a_candidate() {
    let mut rng = Rng(43);
    let mut r = SimRunner::new();
    let (h, w) = (1080, 1920);
    let a = anchors::num_anchors(h, w);
    assert_eq!(a, 85200);
    // One image (the simulation's tiled NMS takes ~40 s on it: 85k candidates, 33k kept); ties and
    // batches are covered at 640.
    let raws = vec![random_raw(&mut rng, h, w, None)];
    let s = check(&mut r, &raws, &uncapped(0.0), &[0.75], NmsPath::Auto, "1080p all candidates");
    assert_eq!(s[0].0, a, "every anchor is a candidate");
}

#[test]
fn no_candidates_and_zero_caps_give_no_detections() {
    let mut rng = Rng(47);
    let mut r = SimRunner::new();
    let raws = vec![random_raw(&mut rng, 640, 640, None); 2];
    // Softmaxed scores are at most 1: nothing is above a threshold of 1.
    for path in [NmsPath::Tiled, NmsPath::Auto] {
        let s = check(&mut r, &raws, &uncapped(1.0), &[1.0, 2.0], path, "no candidates");
        assert_eq!(s, vec![(0, 0), (0, 0)]);
    }
    let small = PostOptions { pre_nms_topk: Some(100), ..uncapped(1.0) };
    check(&mut r, &raws, &small, &[1.0, 2.0], NmsPath::Bitmask, "no candidates, bitmask");
    let zero = PostOptions { post_nms_topk: Some(0), ..uncapped(0.02) };
    check(&mut r, &raws, &zero, &[1.0, 1.0], NmsPath::Auto, "post_nms_topk 0");
}

#[test]
fn bad_arguments_are_named() {
    let mut rng = Rng(53);
    let mut r = SimRunner::new();
    let raws = vec![random_raw(&mut rng, 64, 64, None)];
    let e = device_postprocess_each(&mut r, &raws, &uncapped(0.02), &[1.0, 1.0], NmsPath::Auto).unwrap_err();
    assert!(e.to_string().contains("2 resize factors for a batch of 1"), "{e}");
    let e = device_postprocess_each(&mut r, &raws, &uncapped(0.02), &[f32::NAN], NmsPath::Auto).unwrap_err();
    assert!(e.to_string().contains("resize factor NaN of image 0"), "{e}");
    let big = vec![random_raw(&mut rng, 256, 256, None)];
    assert!(anchors::num_anchors(256, 256) > NMS_BITMASK_MAX);
    let e = device_postprocess_each(&mut r, &big, &uncapped(0.02), &[1.0], NmsPath::Bitmask).unwrap_err();
    assert!(e.to_string().contains("bitmask NMS takes at most"), "{e}");
}

fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared")
}

/// Every file under `dir` (relative path → bytes).
fn files_of(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.strip_prefix(dir).expect("prefix").to_path_buf(), std::fs::read(&p).expect("read"));
            }
        }
    }
    out
}

/// `widerface predict` (WIDER's uncapped protocol at original size) on the CUDA executor in the
/// simulation writes the same files as on the CPU, on images of 1024×624 (26240 anchors, which the
/// old 8192-candidate NMS refused) and 1024×768.
#[test]
fn widerface_predict_on_cuda_sim_writes_the_cpu_files() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let images = tmp.path().join("images");
    for (event, stem) in [("0--Parade", "crowd"), ("1--Handshaking", "kids")] {
        let dir = images.join(event);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::copy(shared().join(format!("images/{stem}.jpg")), dir.join(format!("{stem}.jpg"))).expect("copy");
    }
    let weights = shared().join("weights/retinaface_mv1_0.25.pth");
    let predict = |backend: &str| {
        let out = tmp.path().join(format!("pred-{backend}"));
        let t0 = std::time::Instant::now();
        let run = std::process::Command::new(env!("CARGO_BIN_EXE_retinaface"))
            .args(["widerface", "predict", "--backend", backend, "--quiet", "--weights"])
            .arg(&weights)
            .arg("--images")
            .arg(&images)
            .arg("--out")
            .arg(&out)
            .output()
            .expect("run predict");
        assert!(run.status.success(), "{backend}: {}", String::from_utf8_lossy(&run.stderr));
        println!("{backend}: {} ({:.1} s)", String::from_utf8_lossy(&run.stdout).trim(), t0.elapsed().as_secs_f64());
        files_of(&out)
    };
    let cpu = predict("cpu");
    let sim = predict("cuda-sim");
    assert_eq!(cpu.len(), 2, "{:?}", cpu.keys());
    assert_eq!(cpu.keys().collect::<Vec<_>>(), sim.keys().collect::<Vec<_>>());
    for (path, bytes) in &cpu {
        let (want, got) = (parse_prediction(bytes), parse_prediction(&sim[path]));
        assert!(want.len() >= 5, "{path:?}: {} detections", want.len());
        println!("{path:?}: {} detections, files byte-identical: {}", want.len(), bytes == &sim[path]);
        assert_eq!(got.len(), want.len(), "{path:?}: number of detections (CPU vs CUDA executor)");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // The network's f32 sums run in another order on the CUDA kernels (kernels_sim: 1e-5 of the
            // largest value): scores agree to that, boxes to the printed 0.1 px (a rounding boundary).
            let close =
                (g[4] - w[4]).abs() <= 1e-5 && g[..4].iter().zip(&w[..4]).all(|(a, b)| (a - b).abs() <= 0.1 + 1e-3);
            assert!(close, "{path:?} detection {i}: CUDA {g:?} vs CPU {w:?}");
        }
    }
}

/// The box lines of a prediction file: [x, y, w, h, score].
fn parse_prediction(bytes: &[u8]) -> Vec<[f64; 5]> {
    let text = String::from_utf8_lossy(bytes);
    let mut lines = text.lines();
    lines.next().expect("stem line");
    let n: usize = lines.next().and_then(|l| l.trim().parse().ok()).expect("count line");
    let rows: Vec<[f64; 5]> = lines
        .map(|l| {
            let v: Vec<f64> = l.split_whitespace().map(|x| x.parse().expect("number")).collect();
            [v[0], v[1], v[2], v[3], v[4]]
        })
        .collect();
    assert_eq!(rows.len(), n, "the count line matches the box lines");
    rows
}

/// The executor's path on a real forward pass: one batch whose images have different resize factors
/// goes through `CudaExecutor::detect` as one call (the factors read from a device array) and equals
/// src/post on that pass's raw outputs, image by image. Synthetic weights make nearly every anchor a
/// candidate.
#[test]
fn executor_batch_with_a_resize_factor_per_image_equals_cpu_post_on_its_raw_outputs() {
    use retinaface::cuda::{CudaExecutor, GpuEngine};
    use retinaface::exec::Executor;
    use retinaface::{Backend, BgrImage, Engine, Network, WeightsSpec};
    let cpu = Engine::new(&WeightsSpec::Synthetic { seed: 7 }, Some(Network::MobileNetV1_025)).unwrap();
    let (w, h) = (224, 160);
    let mut rng = Rng(59);
    let images: Vec<BgrImage> =
        (0..3).map(|_| BgrImage::new(w, h, (0..w * h * 3).map(|_| rng.below(256) as u8).collect()).unwrap()).collect();
    let batch: Vec<&BgrImage> = images.iter().collect();
    let scales = [1.0f64, 0.625, 1.5];
    let mut gpu = GpuEngine::new(cpu.graph(), Backend::CudaSim).unwrap();
    let raws = gpu.raw_outputs(&batch).unwrap();
    let exec = CudaExecutor::new(gpu);
    let priors = anchors::priors(h, w);
    for opts in [uncapped(0.02), PostOptions::default()] {
        let got = exec.detect(&batch, &scales, &opts, None).unwrap();
        for (b, raw) in raws.iter().enumerate() {
            let want = postprocess(raw, &priors, scales[b] as f32, &opts);
            let cands = raw.conf.chunks(2).filter(|c| c[1] > opts.conf_threshold).count();
            println!("image {b} (factor {}): {cands} candidates, {} detections", scales[b], want.len());
            assert!(!want.is_empty());
            assert_eq!(got[b], want, "image {b}, {opts:?}");
        }
    }
}
