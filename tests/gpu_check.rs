//! `tools/gpu-check.sh --dry-run` on this machine (no GPU needed): the plan holds every step the issue
//! names, within the 8-minute run, every flag it passes exists in the binary's `--help`, and the report
//! files are written. It uses the binary cargo built for the tests (RETINAFACE_BIN), so it builds
//! nothing, and a venv path that does not exist, so it installs nothing.
//!
//! The report (`tools/gpu-check.sh --report-from DIR`, tools/gpu_check_report.py) from real `bench
//! --json` output of this machine (`--backend cuda-sim` for device event stage times, `--backend cpu`
//! for the host clock): every stage column with bench's numbers, "n/a" where a row has no device
//! stages, and an unreadable step output named.

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

fn dry_run(out: &Path, budget: Option<&str>, bin: &str) -> Output {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut c = Command::new("bash");
    c.arg(root.join("tools/gpu-check.sh"))
        .arg("--dry-run")
        .arg(out)
        .env("RETINAFACE_BIN", bin)
        .env("GPU_CHECK_VENV", out.join("no-venv"))
        .env_remove("GPU_CHECK_BUDGET_S");
    if let Some(b) = budget {
        c.env("GPU_CHECK_BUDGET_S", b);
    }
    c.output().unwrap()
}

#[test]
fn the_dry_run_plans_every_step_within_eight_minutes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dry_run(dir.path(), None, env!("CARGO_BIN_EXE_retinaface"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(!stderr.contains("PROBLEM"), "{stderr}");
    let plan: Vec<&str> = stdout.lines().filter(|l| l.starts_with("plan: ")).collect();
    let has = |needle: &str| plan.iter().any(|l| l.contains(needle));
    assert!(has("plan: goldens ") && has("--test gpu") && has("real_weights_f16_goldens_on_gpu"), "{stdout}");
    assert!(has("plan: goldens-f16"), "f16 goldens planned or skipped with a reason: {stdout}");
    assert!(has("plan: bench-kernels-resnet50 ") && has("plan: bench-kernels-mobilenetv1_0.25 "), "{stdout}");
    assert!(has("--tune full"), "{stdout}");
    // The Hopper tiles meet the device first in a guard run of their own, which can withdraw them.
    assert!(has("plan: wgmma-guard (0 s") && has("RETINAFACE_WGMMA=0"), "{stdout}");
    for net in
        ["mobilenetv1_0.25", "mobilenetv1_0.50", "mobilenetv1", "mobilenetv2", "resnet18", "resnet34", "resnet50"]
    {
        for size in ["640x640", "1920x1080"] {
            let step = format!("plan: sweep-{net}-{size} ");
            let line = plan.iter().find(|l| l.starts_with(&step)).unwrap_or_else(|| panic!("no {step}: {stdout}"));
            assert!(line.contains("--backend cuda") && line.contains("--batch 1,8,64"), "{line}");
        }
    }
    assert!(has("plan: serve ") && has("BACKEND=cuda"), "{stdout}");
    let anchors = plan.iter().find(|l| l.starts_with("plan: anchors ")).unwrap();
    for what in ["PyTorch", "CUDA graph", "TensorRT", "gpu_baselines.py"] {
        assert!(anchors.contains(what), "{what}: {anchors}");
    }
    // Each step's time-box, and their sum within the run's 480 s.
    let total: u64 = plan
        .iter()
        .filter_map(|l| {
            l.split_once(" (").and_then(|(_, r)| r.split_once(" s)")).map(|(n, _)| n.parse::<u64>().unwrap())
        })
        .sum();
    assert!(total > 0 && total <= 480, "time-boxes add up to {total} s");
    assert!(stdout.contains(&format!("time-boxes: {total} s of the run's 480 s")), "{stdout}");
    // The driver check says what it needs even where there is no GPU.
    assert!(stdout.contains("580.65.06"), "{stdout}");
    // The report: one markdown table and the same rows as JSON, every planned step in both.
    let md = std::fs::read_to_string(dir.path().join("gpu-check.md")).unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("gpu-check.json")).unwrap()).unwrap();
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(json["dry_run"], true);
    assert_eq!(rows.len(), plan.len(), "one row per planned step");
    assert_eq!(md.lines().filter(|l| l.starts_with("| step |")).count(), plan.len(), "{md}");
    assert!(rows.iter().all(|r| r["status"] == "planned" || r["status"].as_str().unwrap().starts_with("SKIP")));
    let header = md.lines().find(|l| l.starts_with("| section |")).unwrap();
    for col in ["end-to-end ms / batch (p50, host clock)", "GPU ms / batch (CUDA events)", "stages from"] {
        assert!(header.contains(col), "{header}");
    }
    assert!(!dir.path().join("no-venv").exists(), "a dry run installs nothing");
}

#[test]
fn the_dry_run_fails_on_an_inconsistent_plan() {
    let dir = tempfile::tempdir().unwrap();
    let out = dry_run(dir.path(), Some("100"), env!("CARGO_BIN_EXE_retinaface"));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("over the run's 100 s"), "{stderr}");

    // A binary without the flags the steps pass (here: not a retinaface binary at all).
    let out = dry_run(dir.path(), None, "/bin/true");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("has no --batch flag"), "{stderr}");
}

/// The JSON lines `retinaface bench --json` prints for `args` (64x48, two iterations: the simulation is
/// slow).
fn bench_lines(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_retinaface"))
        .args(["bench", "--network", "mobilenetv1_0.25", "--size", "64x48", "--iters", "2", "--json"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// A run's directory as gpu-check leaves it: `steps.jsonl` (lines as its `step` writes them) and each
/// sweep step's bench output in `<step>.jsonl`.
fn run_dir(dir: &Path, steps: &[(&str, &str, Option<&str>)]) {
    let mut log = String::new();
    for (name, status, output) in steps {
        log += &format!(
            "{{\"step\":\"{name}\",\"status\":\"{status}\",\"budget_s\":12,\"seconds\":3,\"what\":\"bench\",\"log\":\"{name}.log\"}}\n"
        );
        if let Some(text) = output {
            std::fs::write(dir.join(format!("{name}.jsonl")), text).unwrap();
        }
    }
    std::fs::write(dir.join("steps.jsonl"), log).unwrap();
}

fn report_from(dir: &Path) -> Output {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    Command::new("bash").arg(root.join("tools/gpu-check.sh")).arg("--report-from").arg(dir).output().unwrap()
}

/// The markdown table's header and its rows, each as its cells.
fn table(md: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let cells = |l: &str| l.trim().trim_matches('|').split('|').map(|c| c.trim().to_string()).collect::<Vec<_>>();
    let mut lines = md.lines().skip_while(|l| !l.starts_with("| section |"));
    let header = cells(lines.next().expect("no table header"));
    let rows = lines.skip(1).take_while(|l| l.starts_with('|')).map(cells).collect();
    (header, rows)
}

/// A number of the table (printed to 3 decimals) against the JSON's: within the half unit of the last
/// printed digit that the printing rounds away, and nothing more.
fn assert_cell(cell: &str, want: f64, what: &str) {
    let got: f64 = cell.parse().unwrap_or_else(|_| panic!("{what}: `{cell}` is not a number"));
    assert!((got - want).abs() <= 5e-4 + 1e-12, "{what}: table {cell}, JSON {want}");
}

/// The report built from real bench JSON: for each bench line an engine row with its end-to-end p50
/// and GPU time apart, its device event stage times by name (in the JSON exactly, in the table to the
/// printed digits) and their source; the CPU's host clock rows and a bench line without stages (an
/// older binary's) say "n/a" in every stage column instead of numbers.
#[cfg(feature = "cuda-sim")]
#[test]
fn the_report_shows_bench_stage_times_by_name_and_na_without_them() {
    let dir = tempfile::tempdir().unwrap();
    let detect = bench_lines(&["--backend", "cuda-sim", "--batch", "1,2"]);
    let forward = bench_lines(&["--backend", "cuda-sim", "--batch", "2", "--forward-only", "--cuda-graph", "off"]);
    let cpu = bench_lines(&["--backend", "cpu", "--batch", "1"]);
    // A bench from before the stage times: the same line without them.
    let mut old: Value = serde_json::from_str(detect.lines().next().unwrap()).unwrap();
    for k in ["stages_ms", "stages_source", "host_preprocess_ms"] {
        old.as_object_mut().unwrap().remove(k).unwrap();
    }
    let old = format!("{old}\n");
    let files =
        [("sweep-a-64x48", &detect), ("sweep-b-64x48", &forward), ("sweep-c-64x48", &cpu), ("sweep-d-64x48", &old)];
    let steps: Vec<_> = files.iter().map(|(n, t)| (*n, "PASS", Some(t.as_str()))).collect();
    run_dir(dir.path(), &steps);
    let out = report_from(dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let json: Value = serde_json::from_slice(&std::fs::read(dir.path().join("gpu-check.json")).unwrap()).unwrap();
    let md = std::fs::read_to_string(dir.path().join("gpu-check.md")).unwrap();
    assert_eq!(json["errors"], serde_json::json!([]), "{json}");

    // Every stage bench reports, by its name: a JSON stage name and a table column each.
    let first: Value = serde_json::from_str(detect.lines().next().unwrap()).unwrap();
    let bench_stages: Vec<&String> = first["stages_ms"].as_object().unwrap().keys().collect();
    assert!(bench_stages.len() >= 5, "{first}");
    let mut names: Vec<&str> = json["stage_names"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, bench_stages, "{json}");
    let (header, cells) = table(&md);
    let col =
        |name: &str| header.iter().position(|h| h == name).unwrap_or_else(|| panic!("no column {name}: {header:?}"));
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), cells.len(), "one table row per JSON row:\n{md}");

    // The engine rows measured per pass, in the bench lines' order.
    let engine: Vec<(&Value, &Vec<String>)> =
        rows.iter().zip(&cells).filter(|(r, _)| r["section"] == "engine" && r["streamed"] == false).collect();
    let lines: Vec<(usize, Value)> = files
        .iter()
        .enumerate()
        .flat_map(|(i, (_, t))| t.lines().map(move |l| (i, serde_json::from_str(l).unwrap())))
        .collect();
    assert_eq!(engine.len(), lines.len(), "{json}");
    for ((row, cell), (file, want)) in engine.iter().zip(&lines) {
        let what = format!("{}: {want}", files[*file].0);
        assert_eq!(row["name"], want["network"], "{what}");
        assert_eq!(row["batch"], want["batch"], "{what}");
        assert_eq!(row["input"], "64x48", "{what}");
        assert_eq!(row["images_per_s"], want["images_per_s"], "{what}");
        assert_eq!(row["end_to_end_p50_ms"], want["latency_ms"]["p50"], "{what}");
        assert_eq!(row["gpu_ms_per_batch"], want["device_ms_per_batch"], "{what}");
        assert_cell(
            &cell[col("end-to-end ms / batch (p50, host clock)")],
            want["latency_ms"]["p50"].as_f64().unwrap(),
            &what,
        );
        match *file {
            0 | 1 => {
                assert_eq!(want["stages_source"], "device events", "{what}");
                assert_eq!(row["stages_source"], "device events", "{what}");
                assert_eq!(cell[col("stages from")], "device events", "{what}");
                assert_eq!(row["stages_ms"], want["stages_ms"], "{what}");
                assert_cell(
                    &cell[col("GPU ms / batch (CUDA events)")],
                    want["device_ms_per_batch"].as_f64().unwrap(),
                    &what,
                );
                assert_cell(
                    &cell[col("host preprocess ms / batch")],
                    want["host_preprocess_ms"].as_f64().unwrap(),
                    &what,
                );
                for (stage, ms) in want["stages_ms"].as_object().unwrap() {
                    let c = &cell[col(&format!("{stage} ms / batch"))];
                    assert_cell(c, ms.as_f64().unwrap(), &format!("{what}: {stage}"));
                }
                // Forward-only runs the heads and no post-processing; detection the reverse.
                let (heads, post) =
                    (want["stages_ms"]["heads"].as_f64().unwrap(), want["stages_ms"]["postprocess"].as_f64().unwrap());
                assert_eq!((heads > 0.0, post > 0.0), (*file == 1, *file == 0), "{what}");
            }
            2 | 3 => {
                let na = if *file == 2 { "n/a: host clock" } else { "n/a: not reported" };
                assert_eq!(row["stages_ms"], Value::Null, "{what}");
                assert_eq!(row["stages_note"], na, "{what}");
                for stage in &bench_stages {
                    assert_eq!(cell[col(&format!("{stage} ms / batch"))], na, "{what}: {stage}");
                }
                let source = if *file == 2 { "host clock" } else { "not reported" };
                assert_eq!(cell[col("stages from")], source, "{what}");
                if *file == 2 {
                    assert_eq!(cell[col("GPU ms / batch (CUDA events)")], "n/a: host clock", "{what}");
                }
            }
            _ => unreachable!(),
        }
    }
    // The streamed throughput rows (host images to detections only): images/s from bench, no stages.
    let streamed: Vec<(&Value, &Vec<String>)> =
        rows.iter().zip(&cells).filter(|(r, _)| r["streamed"] == true).collect();
    let want: Vec<&Value> = lines.iter().map(|(_, l)| &l["pipelined_images_per_s"]).filter(|v| !v.is_null()).collect();
    assert_eq!(streamed.len(), want.len(), "{json}");
    assert_eq!(streamed.len(), 2 + 1 + 1, "detect 1,2 + cpu 1 + old 1; forward-only streams nothing");
    for ((row, cell), want) in streamed.iter().zip(want) {
        assert_eq!(&row["images_per_s"], want);
        assert!(bench_stages.iter().all(|s| cell[col(&format!("{s} ms / batch"))] == "n/a: host clock"), "{cell:?}");
    }
    // The table says what each stage holds, for the names it shows.
    assert!(md.contains("postprocess: from the end of the forward pass"), "{md}");
}

/// An unreadable step output is an error naming the file (and line): the report keeps the rest, says
/// so at its top, and the exit status is 1. A failed step's missing output is no error.
#[test]
fn the_report_names_an_unreadable_step_output() {
    let cpu = bench_lines(&["--backend", "cpu", "--batch", "1,2"]);
    let first = cpu.lines().next().unwrap();
    let check = |steps: &[(&str, &str, Option<&str>)], wants: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        run_dir(dir.path(), steps);
        let out = report_from(dir.path());
        let stderr = String::from_utf8_lossy(&out.stderr);
        let md = std::fs::read_to_string(dir.path().join("gpu-check.md")).unwrap();
        let json: Value = serde_json::from_slice(&std::fs::read(dir.path().join("gpu-check.json")).unwrap()).unwrap();
        let errors = json["errors"].as_array().unwrap();
        if wants.is_empty() {
            assert!(out.status.success() && errors.is_empty(), "{stderr}");
            return json;
        }
        assert!(!out.status.success(), "{stderr}");
        assert_eq!(errors.len(), 1, "{json}");
        let dir_s = dir.path().display().to_string();
        for w in wants {
            let w = w.replace("DIR", &dir_s);
            assert!(stderr.contains(&w), "`{w}` not in: {stderr}");
            assert!(errors[0].as_str().unwrap().contains(&w), "{json}");
            assert!(md.lines().any(|l| l.starts_with("ERROR: ") && l.contains(&w)), "{md}");
        }
        json
    };
    let engine_rows = |j: &Value| j["rows"].as_array().unwrap().iter().filter(|r| r["section"] == "engine").count();

    // A line cut off: the rows before it are kept.
    let cut = format!("{first}\n{}\n", &first[..first.len() / 2]);
    let j = check(&[("sweep-a", "PASS", Some(&cut))], &["DIR/sweep-a.jsonl line 2: not JSON"]);
    assert_eq!(engine_rows(&j), 2, "the first line's row and its streamed row: {j}");
    // A passed step without its output; a failed one is no error.
    let j = check(&[("sweep-a", "PASS", Some(&cpu)), ("sweep-b", "PASS", None)], &["DIR/sweep-b.jsonl: missing"]);
    assert_eq!(engine_rows(&j), 4, "{j}");
    check(&[("sweep-a", "PASS", Some(&cpu)), ("sweep-b", "FAIL (exit 1)", None)], &[]);
    // A row without a field the table needs, and a stage time that is not a number.
    let mut v: Value = serde_json::from_str(first).unwrap();
    v.as_object_mut().unwrap().remove("latency_ms");
    check(&[("sweep-a", "PASS", Some(&format!("{v}\n")))], &["DIR/sweep-a.jsonl line 1: no field latency_ms.p50"]);
    let mut v: Value = serde_json::from_str(first).unwrap();
    v["stages_source"] = "device events".into();
    v["stages_ms"]["backbone"] = "fast".into();
    check(
        &[("sweep-a", "PASS", Some(&format!("{v}\n")))],
        &["DIR/sweep-a.jsonl line 1", "backbone is \"fast\", not a number"],
    );
    // No steps.jsonl: not a gpu-check directory.
    let dir = tempfile::tempdir().unwrap();
    let out = report_from(dir.path());
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("{}/steps.jsonl: missing", dir.path().display())), "{stderr}");
}
