//! Weights: the synthetic recipe's test vectors, each network's keys against the reference's, the
//! converter tool, both checkpoint layouts and formats, and every kind of bad weights file.
// The test vectors are the reference's values as PyTorch prints them, digits beyond f32 included.
#![allow(clippy::excessive_precision)]

mod common;
use common::*;
use retinaface::model;
use retinaface::weights::{self, StateDict, Tensor, WeightsSpec, safetensors_io, synthetic};
use retinaface::{BgrImage, Engine, Error, Network};
use std::path::{Path, PathBuf};

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("retinaface-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn synthetic_recipe_matches_its_test_vectors() {
    let u = synthetic::uniform_stream("abc", 0, 3);
    for (a, b) in u.iter().zip([0.16362262f32, 0.28698403, 0.00903624]) {
        assert!((a - b).abs() < 5e-9, "raw stream {u:?}");
    }
    let vectors: &[(Network, &str, [f32; 3])] = &[
        (Network::MobileNetV1_025, "fx.stage1.0.0.weight", [-0.00506802788, 0.00349514931, -0.00488187699]),
        (Network::MobileNetV1_025, "fx.stage1.0.1.weight", [1.14060855, 0.828938007, 0.81797117]),
        (Network::MobileNetV1_025, "fx.stage1.0.1.bias", [-0.0169042461, 0.00909229554, 0.0887902752]),
        (Network::MobileNetV1_025, "fx.stage1.0.1.running_mean", [-0.0964255482, 0.0468419679, 0.0815261006]),
        (Network::MobileNetV1_025, "fx.stage1.0.1.running_var", [1.21023798, 0.887724757, 1.4443326]),
        (Network::MobileNetV1_025, "fx.stage2.3.0.0.weight", [-0.544366658, -0.0344958976, 0.556827724]),
        (Network::MobileNetV1_025, "class_head.class_head.0.bias", [0.0178431757, 0.0331856981, -0.0964555591]),
        (Network::ResNet50, "fx.layer1.0.bn3.weight", [0.172518879, 0.166519538, 0.288849652]),
        (Network::ResNet50, "fx.layer3.2.conv2.weight", [-0.0140269287, -0.023881387, 0.0221664365]),
        (Network::ResNet50, "fx.layer1.0.bn2.weight", [0.9917081, 1.06094003, 1.07059634]),
        (Network::ResNet18, "fx.layer2.1.bn2.weight", [0.222974062, 0.276568174, 0.288947016]),
    ];
    for (net, key, want) in vectors {
        let sd = synthetic::state_dict(*net, 1);
        let t = &sd.tensors[*key];
        // Printed to 9 significant digits, which identifies an f32 exactly.
        for (got, want) in t.data.iter().zip(want) {
            assert_eq!(format!("{got:.8e}"), format!("{want:.8e}"), "{net} {key}");
        }
    }
}

fn reference_keys(net: Network) -> Vec<(String, Vec<usize>)> {
    let text = std::fs::read_to_string(shared().join(format!("reference/keys/{}.txt", net.name()))).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let shape: Vec<usize> = f[1]
                .trim_matches(|c| c == '[' || c == ']')
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.trim().parse().unwrap())
                .collect();
            (f[0].to_string(), shape)
        })
        .collect()
}

#[test]
fn every_network_reads_exactly_the_reference_keys() {
    for net in Network::ALL {
        let mut ours: Vec<(String, Vec<usize>)> =
            model::required_keys(net).into_iter().map(|(k, s, _)| (k, s)).collect();
        let mut theirs = reference_keys(net);
        ours.sort();
        theirs.sort();
        assert_eq!(ours.len(), theirs.len(), "{net}: key count");
        assert_eq!(ours, theirs, "{net}: keys and shapes");
    }
}

fn raw_of(spec: &WeightsSpec, img: &BgrImage) -> retinaface::RawOutput {
    Engine::new(spec, None).unwrap().forward(&[img]).unwrap().pop().unwrap()
}

#[test]
fn converter_tool_and_direct_loading_agree_for_both_layouts() {
    let img = load_case("synthetic-mobilenetv1_0.25-seed1-301x203").input;
    let mut outputs = Vec::new();
    for name in ["retinaface_mv1_0.25", "biubug6_mobilenet0.25_Final"] {
        let pth = shared().join(format!("weights/{name}.pth"));
        let st = tmp(&format!("{name}.safetensors"));
        let status = std::process::Command::new("python3")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/convert_weights.py"))
            .arg(&pth)
            .arg(&st)
            .status()
            .expect("python3 runs");
        assert!(status.success(), "convert_weights.py {name}");
        let direct = weights::load(&pth).unwrap();
        let converted = weights::load(&st).unwrap();
        assert_eq!(converted.network.as_deref(), Some("mobilenetv1_0.25"), "network recorded in the metadata");
        assert_eq!(direct.tensors.len(), converted.tensors.len());
        for (k, t) in &direct.tensors {
            assert_eq!(Some(t), converted.tensors.get(k), "{name}: tensor {k}");
        }
        let a = raw_of(&WeightsSpec::File(pth), &img);
        let b = raw_of(&WeightsSpec::File(st), &img);
        assert_eq!(a.loc, b.loc);
        assert_eq!(a.conf, b.conf);
        assert_eq!(a.landmarks, b.landmarks);
        outputs.push(a);
    }
    // Different trainings: the two checkpoints must not collapse to the same weights.
    assert_ne!(outputs[0].conf, outputs[1].conf);
}

#[test]
fn network_is_inferred_from_shapes_and_metadata() {
    for net in Network::ALL {
        let mut sd = synthetic::state_dict(net, 3);
        let path = tmp(&format!("infer-{}.safetensors", net.name()));
        sd.network = None;
        safetensors_io::save(&sd.tensors, None, &path).unwrap();
        let loaded = weights::load(&path).unwrap();
        assert_eq!(weights::infer_network(&loaded, &path).unwrap(), net);
    }
}

fn save(sd: &StateDict, name: &str) -> PathBuf {
    let p = tmp(name);
    safetensors_io::save(&sd.tensors, sd.network.as_deref(), &p).unwrap();
    p
}

fn engine_err(path: &Path, net: Option<Network>) -> String {
    match Engine::new(&WeightsSpec::File(path.to_path_buf()), net) {
        Ok(_) => panic!("{} loaded without error", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_weights_give_clear_errors() {
    let good = synthetic::state_dict(Network::MobileNetV1_025, 1);
    let good_path = save(&good, "good.safetensors");
    assert!(Engine::new(&WeightsSpec::File(good_path.clone()), None).is_ok());
    let bytes = std::fs::read(&good_path).unwrap();

    // truncated and corrupt safetensors
    for (name, data) in [
        ("truncated.safetensors", bytes[..bytes.len() / 2].to_vec()),
        ("corrupt.safetensors", {
            let mut b = bytes.clone();
            b[8..40].copy_from_slice(&[b'#'; 32]);
            b
        }),
        ("tiny.safetensors", b"abc".to_vec()),
        ("empty.safetensors", Vec::new()),
    ] {
        let p = tmp(name);
        std::fs::write(&p, data).unwrap();
        let e = engine_err(&p, None);
        assert!(e.contains(name), "error names the file: {e}");
    }

    // truncated checkpoints, both torch.save formats
    for name in ["retinaface_mv1_0.25", "biubug6_mobilenet0.25_Final"] {
        let b = std::fs::read(shared().join(format!("weights/{name}.pth"))).unwrap();
        for cut in [b.len() / 3, b.len() - 100] {
            let p = tmp(&format!("{name}-cut{cut}.pth"));
            std::fs::write(&p, &b[..cut]).unwrap();
            let e = engine_err(&p, None);
            assert!(e.contains(&format!("cut{cut}")), "error names the file: {e}");
        }
    }

    // wrong network for the weights
    let e = engine_err(&good_path, Some(Network::ResNet18));
    assert!(e.contains("mobilenetv1_0.25") && e.contains("resnet18"), "{e}");
    let mut anon = good.clone();
    anon.network = None;
    let anon_path = save(&anon, "anon.safetensors");
    let e = engine_err(&anon_path, Some(Network::MobileNetV1_050));
    assert!(e.contains("mobilenetv1_0.25") && e.contains("mobilenetv1_0.50"), "{e}");

    // missing tensor
    let mut sd = good.clone();
    sd.tensors.remove("ssh2.conv7x7_3.1.running_var");
    let e = engine_err(&save(&sd, "missing.safetensors"), None);
    assert!(e.contains("missing tensor `ssh2.conv7x7_3.1.running_var`"), "{e}");

    // wrong shape
    let mut sd = good.clone();
    sd.tensors.insert("fpn.merge1.0.weight".into(), Tensor { shape: vec![64, 64, 1, 1], data: vec![0.1; 64 * 64] });
    let e = engine_err(&save(&sd, "shape.safetensors"), None);
    assert!(e.contains("fpn.merge1.0.weight") && e.contains("[64, 64, 3, 3]") && e.contains("[64, 64, 1, 1]"), "{e}");

    // NaN in weights
    let mut sd = good.clone();
    sd.tensors.get_mut("bbox_head.bbox_head.1.weight").unwrap().data[17] = f32::NAN;
    let e = engine_err(&save(&sd, "nan.safetensors"), None);
    assert!(e.contains("bbox_head.bbox_head.1.weight") && e.contains("NaN") && e.contains("17"), "{e}");

    // extra tensor
    let mut sd = good.clone();
    sd.tensors.insert("fx.stage4.0.weight".into(), Tensor { shape: vec![1], data: vec![0.0] });
    let e = engine_err(&save(&sd, "extra.safetensors"), None);
    assert!(e.contains("unexpected tensor `fx.stage4.0.weight`"), "{e}");

    // no recognisable network
    let sd =
        StateDict { tensors: [("foo".to_string(), Tensor { shape: vec![1], data: vec![1.0] })].into(), network: None };
    let e = engine_err(&save(&sd, "foo.safetensors"), None);
    assert!(e.contains("--network"), "{e}");

    // missing file
    let e = engine_err(Path::new("/nonexistent/w.pth"), None);
    assert!(e.contains("/nonexistent/w.pth"), "{e}");
    assert!(matches!(Engine::new(&WeightsSpec::File("/nonexistent/w.pth".into()), None), Err(Error::Io { .. })));
}

#[test]
fn checkpoints_that_call_other_code_are_refused() {
    // A legacy-format pickle whose state dict is `os.system("...")`: both readers must refuse it.
    let mut b: Vec<u8> = vec![0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e];
    b.extend_from_slice(&[0x80, 0x02, b'M', 0xe9, 0x03, b'.']); // protocol 1001
    b.extend_from_slice(&[0x80, 0x02, b'}', b'.']); // sys info
    b.extend_from_slice(b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueR.");
    let p = tmp("evil.pth");
    std::fs::write(&p, &b).unwrap();
    let e = engine_err(&p, None);
    assert!(e.contains("os.system"), "{e}");
    let out = std::process::Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/convert_weights.py"))
        .arg(&p)
        .arg(tmp("evil.safetensors"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("os.system"), "{}", String::from_utf8_lossy(&out.stderr));
}
