//! `retinaface bench`: the batch sweep (a row, or a JSON line, per batch size), end-to-end host time
//! and device time reported apart, `--forward-only` and `--input-on-device` on the CUDA executor (in
//! the simulation) and their clear refusal on the CPU, and the errors of a bad sweep.

use std::process::{Command, Output};

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_retinaface"))
        .args(["bench", "--network", "mobilenetv1_0.25", "--size", "64x48", "--iters", "2"])
        .args(args)
        .output()
        .unwrap()
}

fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn a_sweep_reports_each_batch_size_with_end_to_end_and_stage_times() {
    let rows = json_lines(&bench(&["--backend", "cpu", "--batch", "1,3,2", "--json"]));
    assert_eq!(rows.iter().map(|r| r["batch"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 3, 2]);
    for r in &rows {
        assert!(r["images_per_s"].as_f64().unwrap() > 0.0);
        let lat = &r["latency_ms"];
        assert!(lat["min"].as_f64().unwrap() <= lat["p50"].as_f64().unwrap());
        assert!(lat["p50"].as_f64().unwrap() <= lat["p99"].as_f64().unwrap());
        // The CPU has no device clock: its device time is absent, not a copy of the host's.
        assert!(r["device_ms_per_batch"].is_null(), "{r}");
        assert!(r["stages_ms"]["backbone"].as_f64().unwrap() > 0.0);
        assert_eq!(r["forward_only"], false);
        assert_eq!(r["input_on_device"], false);
        assert_eq!(r["iters"], 2);
    }
    // The table: a header line, the column line, one row per batch size.
    let out = bench(&["--backend", "cpu", "--batch", "1,2", "--forward-only"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(lines[0].contains("64x48") && lines[0].contains("forward pass"), "{text}");
    assert!(lines[1].contains("images/s") && lines[1].contains("device ms"), "{text}");
    for (line, b) in lines[2..].iter().zip(["1", "2"]) {
        assert_eq!(line.split_whitespace().next(), Some(b), "{text}");
        assert!(line.contains("n/a"), "no device time on the CPU: {line}");
    }
}

#[test]
fn the_cuda_executor_runs_from_device_memory_and_keeps_forward_outputs_there() {
    for extra in [&["--forward-only"][..], &[][..]] {
        let mut args = vec!["--backend", "cuda-sim", "--batch", "1,2", "--input-on-device", "--json"];
        args.extend_from_slice(extra);
        let rows = json_lines(&bench(&args));
        assert_eq!(rows.len(), 2);
        for r in &rows {
            assert_eq!(r["input_on_device"], true);
            assert_eq!(r["forward_only"], !extra.is_empty());
            assert!(r["backend"].as_str().unwrap().contains("simulation"), "{r}");
            assert!(r["images_per_s"].as_f64().unwrap() > 0.0);
            let post = r["stages_ms"]["postprocess"].as_f64().unwrap();
            assert_eq!(post > 0.0, extra.is_empty(), "post-processing timed only when it runs: {r}");
        }
    }
    let rows = json_lines(&bench(&["--backend", "cuda-sim", "--batch", "2", "--forward-only", "--json"]));
    assert_eq!(rows[0]["measures"].as_str().unwrap().split_whitespace().next(), Some("host"));
}

#[test]
fn input_on_device_on_the_cpu_and_bad_sweeps_are_clear_errors() {
    let cases: &[(&[&str], &str)] = &[
        (&["--backend", "cpu", "--input-on-device"], "--input-on-device"),
        (&["--backend", "cpu", "--batch", "1,0"], "at least one image"),
        (&["--backend", "cpu", "--batch", "8,x"], "`x` is not a batch size"),
        (&["--backend", "cpu", "--batch", "8,8"], "8 is listed twice"),
        (&["--backend", "cpu", "--iters", "0"], "--iters"),
    ];
    for (args, want) in cases {
        let out = bench(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
