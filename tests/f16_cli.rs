//! `--precision f32|f16` on the CLI: f16 runs the CUDA executor in f16 (here in the simulation) and
//! finds the faces the f32 CPU path finds; f16 on the CPU, or a bad value, is a clear error; `auto`
//! falling back to the CPU says it computes in f32.

mod common;
use common::*;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_retinaface"))
}

fn weights() -> String {
    shared().join("weights/retinaface_mv1_0.25.pth").to_string_lossy().into_owned()
}

fn dets(o: &std::process::Output) -> Vec<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["detections"].as_array().unwrap().clone()
}

#[cfg(feature = "cuda-sim")]
#[test]
fn detect_in_f16_finds_the_f32_faces() {
    let img = shared().join("images/trio.jpg");
    let run = |extra: &[&str]| {
        bin().args(["detect", "--json", "--weights", &weights()]).args(extra).arg(&img).output().unwrap()
    };
    let cpu = run(&["--backend", "cpu"]);
    let f16 = run(&["--backend", "cuda-sim", "--precision", "f16"]);
    let err = String::from_utf8_lossy(&f16.stderr);
    assert!(cpu.status.success() && f16.status.success(), "{err}");
    assert!(err.contains("simulation") && err.contains("f16"), "the backend line names f16: {err}");
    let (a, b) = (dets(&cpu), dets(&f16));
    let faces: Vec<_> = a.iter().filter(|d| d["score"].as_f64().unwrap() >= 0.5).collect();
    assert!(!faces.is_empty());
    for f in faces {
        let close = b.iter().any(|g| {
            (g["score"].as_f64().unwrap() - f["score"].as_f64().unwrap()).abs() <= 0.05
                && f["box"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .zip(g["box"].as_array().unwrap())
                    .all(|(p, q)| (p.as_f64().unwrap() - q.as_f64().unwrap()).abs() <= 1.0)
        });
        assert!(close, "f16 lacks the face {f}");
    }
}

#[test]
fn f16_on_the_cpu_and_a_bad_precision_are_clear_errors() {
    let img = shared().join("images/trio.jpg").to_string_lossy().into_owned();
    let golden =
        shared().join("reference/goldens/real-mv1_0.25-yakhyo-trio.safetensors").to_string_lossy().into_owned();
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("raw.safetensors").to_string_lossy().into_owned();
    for (args, want) in [
        (vec!["detect", "--backend", "cpu", "--precision", "f16", &img], "--precision f16 needs a CUDA backend"),
        (
            vec!["forward", "--backend", "cpu", "--precision", "f16", "--input", &golden, "--output", &out_file],
            "--precision f16 needs a CUDA backend",
        ),
        (vec!["detect", "--backend", "cpu", "--precision", "bf16", &img], "bf16"),
        (vec!["detect", "--backend", "cpu", "--tune", "fast", &img], "--tune `fast`"),
    ] {
        let out = bin().args(&args).args(["--weights", &weights()]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(want) && !err.contains("panicked"), "{args:?}: {err}");
    }
    let out = bin()
        .args(["serve", "--backend", "cpu", "--precision", "f16", "--port", "0", "--weights", &weights()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--precision f16 needs a CUDA backend"), "serve: {err}");
}

#[test]
fn auto_without_a_gpu_says_f32() {
    if retinaface::cuda::gpu_status().is_ok() {
        println!("a GPU is present: auto picks it, the fallback note is not exercised here");
        return;
    }
    let img = shared().join("images/trio.jpg");
    let out =
        bin().args(["detect", "--json", "--backend", "auto", "--weights", &weights()]).arg(&img).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("backend auto: cpu") && err.contains("precision f32"), "{err}");
}
