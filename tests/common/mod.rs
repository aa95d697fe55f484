//! Shared test helpers: the goldens in ../shared/reference/goldens and comparisons.
#![allow(dead_code)]

use retinaface::weights::safetensors_io;
use retinaface::{BgrImage, Detection, Network, WeightsSpec};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared")
}

pub struct Case {
    pub name: String,
    pub network: Network,
    pub weights: WeightsSpec,
    pub image: PathBuf,
    pub crop: Option<[usize; 4]>,
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    pub input: BgrImage,
    pub detections: Vec<Detection>,
}

pub fn case_names() -> Vec<String> {
    let idx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(shared().join("reference/goldens/index.json")).unwrap()).unwrap();
    idx.as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap().to_string()).collect()
}

pub fn load_case(name: &str) -> Case {
    let dir = shared().join("reference/goldens");
    let idx: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let c = idx.as_array().unwrap().iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no case {name}"));
    let network: Network = c["network"].as_str().unwrap().parse().unwrap();
    let weights = match c.get("synthetic_seed") {
        Some(s) => WeightsSpec::Synthetic { seed: s.as_u64().unwrap() },
        None => WeightsSpec::File(shared().join(c["checkpoint"].as_str().unwrap())),
    };
    let crop = c.get("crop").map(|v| {
        let a: Vec<usize> = v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        [a[0], a[1], a[2], a[3]]
    });
    let bytes = std::fs::read(dir.join(format!("{name}.safetensors"))).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors = BTreeMap::new();
    let mut input = None;
    for (k, v) in st.tensors() {
        if k == "input_bgr_u8" {
            let s = v.shape();
            input = Some(BgrImage::new(s[1], s[0], v.data().to_vec()).unwrap());
        } else {
            tensors.insert(k.clone(), (v.shape().to_vec(), safetensors_io::to_f32(v.dtype(), v.data()).unwrap()));
        }
    }
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{name}.json"))).unwrap()).unwrap();
    let detections: Vec<Detection> = serde_json::from_value(json["detections"].clone()).unwrap();
    Case {
        name: name.to_string(),
        network,
        weights,
        image: shared().join(c["image"].as_str().unwrap()),
        crop,
        tensors,
        input: input.unwrap(),
        detections,
    }
}

/// (max |a − b|, max |b|).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let mut m = 0.0f32;
    let mut mag = 0.0f32;
    for (x, y) in a.iter().zip(b) {
        m = m.max((x - y).abs());
        mag = mag.max(y.abs());
    }
    (m, mag)
}
