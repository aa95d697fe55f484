//! `tools/gpu-check.sh --dry-run` on this machine (no GPU needed): the plan holds every step the issue
//! names, within the 8-minute run, every flag it passes exists in the binary's `--help`, and the report
//! files are written. It uses the binary cargo built for the tests (RETINAFACE_BIN), so it builds
//! nothing, and a venv path that does not exist, so it installs nothing.

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
