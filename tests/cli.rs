//! The `retinaface` command line: detect (table, JSON, drawing), forward, bench, and its errors.

mod common;
use common::*;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_retinaface"))
}

fn weights() -> String {
    shared().join("weights/retinaface_mv1_0.25.pth").display().to_string()
}

#[test]
fn detect_json_lists_every_kept_detection_best_first() {
    let img = shared().join("images/trio.jpg");
    let out = bin().args(["detect", "--backend", "cpu", "--json", "--weights", &weights()]).arg(&img).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1);
    let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(v["image"], img.display().to_string());
    assert_eq!((v["width"].as_u64(), v["height"].as_u64()), (Some(540), Some(360)));
    let dets = v["detections"].as_array().unwrap();
    let scores: Vec<f64> = dets.iter().map(|d| d["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "best first");
    assert!(scores.iter().all(|&s| s > 0.02));
    assert_eq!(scores.iter().filter(|&&s| s > 0.5).count(), 3, "trio.jpg holds three faces");
    assert_eq!(dets[0]["box"].as_array().unwrap().len(), 4);
    assert_eq!(dets[0]["landmarks"].as_array().unwrap().len(), 10);
}

#[test]
fn detect_table_and_saved_drawing() {
    let dir = std::env::temp_dir().join(format!("retinaface-cli-{}", std::process::id()));
    let out = bin()
        .args(["detect", "--backend", "cpu", "--weights", &weights(), "--save-image"])
        .arg(&dir)
        .arg(shared().join("images/crowd.jpg"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("crowd.jpg (1024x624)"), "{text}");
    let drawn = image::open(dir.join("crowd.jpg")).unwrap().to_rgb8();
    let original = image::open(shared().join("images/crowd.jpg")).unwrap().to_rgb8();
    assert_eq!(drawn.dimensions(), original.dimensions());
    let red = drawn.pixels().filter(|p| p[0] > 200 && p[1] < 60 && p[2] < 60).count();
    let red0 = original.pixels().filter(|p| p[0] > 200 && p[1] < 60 && p[2] < 60).count();
    assert!(red > red0 + 1000, "boxes drawn in red: {red} vs {red0}");
}

#[test]
fn forward_writes_the_goldens_layout() {
    let name = "synthetic-mobilenetv2-seed1-301x203";
    let input = shared().join(format!("reference/goldens/{name}.safetensors"));
    let output = std::env::temp_dir().join(format!("retinaface-forward-{}.safetensors", std::process::id()));
    let out = bin()
        .args(["forward", "--backend", "cpu", "--synthetic-seed", "1", "--network", "mobilenetv2", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let c = load_case(name);
    let bytes = std::fs::read(&output).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for k in ["loc", "conf", "landmarks", "priors"] {
        let t = st.tensor(k).unwrap();
        assert_eq!(t.shape(), c.tensors[k].0.as_slice(), "{k} shape");
        let ours = retinaface::weights::safetensors_io::to_f32(t.dtype(), t.data()).unwrap();
        let (d, _) = max_abs_diff(&ours, &c.tensors[k].1);
        assert!(d <= 1e-4, "{k}: {d}");
    }
}

#[test]
fn bench_reports_throughput_latency_and_stages() {
    let out = bin()
        .args([
            "bench",
            "--backend",
            "cpu",
            "--network",
            "mobilenetv1_0.25",
            "--size",
            "64x48",
            "--batch",
            "2",
            "--iters",
            "3",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["images_per_s"].as_f64().unwrap() > 0.0);
    for k in ["p50", "p90", "p99"] {
        assert!(v["latency_ms"][k].as_f64().unwrap() > 0.0);
    }
    for k in ["preprocess", "backbone", "fpn_ssh", "heads", "postprocess"] {
        assert!(v["stages_ms"][k].as_f64().is_some(), "{k}");
    }
}

#[test]
fn command_line_errors_name_the_problem() {
    let cases: &[(&[&str], &str)] = &[
        (&["detect", "--backend", "cpu", "--synthetic-seed", "1", "x.jpg"], "synthetic weights need a network"),
        (
            &["detect", "--backend", "cpu", "--synthetic-seed", "1", "--network", "resnet99", "x.jpg"],
            "unknown network `resnet99`",
        ),
        (
            &["detect", "--backend", "cpu", "--synthetic-seed", "1", "--network", "resnet18", "/nonexistent.jpg"],
            "/nonexistent.jpg",
        ),
        (
            &["detect", "--backend", "tpu", "--synthetic-seed", "1", "--network", "resnet18", "x.jpg"],
            "invalid value 'tpu' for '--backend",
        ),
        (
            &[
                "detect",
                "--backend",
                "cpu",
                "--synthetic-seed",
                "1",
                "--network",
                "resnet18",
                "--resize",
                "huge",
                "x.jpg",
            ],
            "resize mode `huge`",
        ),
        (
            &[
                "detect",
                "--backend",
                "cpu",
                "--synthetic-seed",
                "1",
                "--network",
                "resnet18",
                "--nms-threshold",
                "7",
                "x.jpg",
            ],
            "NMS threshold 7",
        ),
        (&["bench", "--backend", "cpu", "--network", "resnet18", "--size", "640"], "size `640`"),
    ];
    for (args, want) in cases {
        let out = bin().args(*args).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn backends_cuda_sim_matches_cpu_and_cuda_without_a_gpu_is_a_clean_error() {
    let img = shared().join("images/trio.jpg");
    let run = |backend: &str| {
        bin().args(["detect", "--json", "--backend", backend, "--weights", &weights()]).arg(&img).output().unwrap()
    };
    let cpu = run("cpu");
    let sim = run("cuda-sim");
    assert!(cpu.status.success() && sim.status.success(), "{}", String::from_utf8_lossy(&sim.stderr));
    assert!(String::from_utf8_lossy(&sim.stderr).contains("simulation"));
    let dets = |o: &std::process::Output| -> Vec<serde_json::Value> {
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["detections"].as_array().unwrap().clone()
    };
    let (a, b) = (dets(&cpu), dets(&sim));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!((x["score"].as_f64().unwrap() - y["score"].as_f64().unwrap()).abs() < 1e-5);
        for (p, q) in x["box"].as_array().unwrap().iter().zip(y["box"].as_array().unwrap()) {
            assert!((p.as_f64().unwrap() - q.as_f64().unwrap()).abs() < 1e-3);
        }
    }
    if retinaface::cuda::gpu_status().is_err() {
        let cuda = run("cuda");
        assert!(!cuda.status.success());
        let err = String::from_utf8_lossy(&cuda.stderr);
        assert!(err.contains("CUDA") && !err.contains("panicked"), "{err}");
        let auto = run("auto");
        assert!(auto.status.success());
        assert!(String::from_utf8_lossy(&auto.stderr).contains("backend auto: cpu"));
        assert_eq!(dets(&auto), a);
    } else {
        println!("a GPU is present: the no-GPU error path is not exercised here");
    }
}

#[test]
fn detect_crops_writes_one_aligned_png_per_listed_face() {
    let dir = std::env::temp_dir().join(format!("retinaface-crops-{}", std::process::id()));
    let img_path = shared().join("images/trio.jpg");
    let out = bin()
        .args(["detect", "--backend", "cpu", "--weights", &weights(), "--crop-size", "128", "--crops"])
        .arg(&dir)
        .arg(&img_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["trio_face0.png", "trio_face1.png", "trio_face2.png"], "trio.jpg lists three faces");
    // Each crop is the library's norm_crop of the image for that face, pixel for pixel.
    let engine = retinaface::Engine::new(&retinaface::WeightsSpec::File(weights().into()), None).unwrap();
    let img = retinaface::image_io::load(&img_path, &Default::default()).unwrap();
    let dets = engine.detect(&img, &Default::default()).unwrap();
    for (i, d) in dets.iter().filter(|d| d.score >= 0.6).enumerate() {
        let want = retinaface::align::norm_crop(&img, &d.landmarks, 128).unwrap();
        let got = image::open(dir.join(format!("trio_face{i}.png"))).unwrap().to_rgb8();
        assert_eq!(got.dimensions(), (128, 128));
        let bgr: Vec<u8> = got.pixels().flat_map(|p| [p[2], p[1], p[0]]).collect();
        assert_eq!(bgr, want.data, "crop {i}");
    }
    std::fs::remove_dir_all(&dir).ok();
    let bad = bin()
        .args(["detect", "--backend", "cpu", "--weights", &weights(), "--crop-size", "100", "--crops"])
        .arg(&dir)
        .arg(&img_path)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("alignment size 100"));
    std::fs::remove_dir_all(&dir).ok();
}
