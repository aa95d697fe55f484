//! Shared test helpers: the goldens in ../shared/reference/goldens and comparisons.
#![allow(dead_code)]

pub mod hooked;

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

/// The tensor-core issue's f16 bounds (tests/f16_goldens_sim.rs in the simulation, tests/gpu.rs on a
/// GPU): (worst IoU, worst score error, median landmark error in px) of `got` against every reference face
/// with score ≥ 0.5; panics naming the first face not found at IoU ≥ 0.9 with score within 0.05.
pub fn match_f16_faces(name: &str, got: &[Detection], want: &[Detection]) -> (f32, f32, f32) {
    let mut worst_iou = 1.0f32;
    let mut worst_score = 0.0f32;
    let mut land = Vec::new();
    let mut faces = 0;
    for w in want.iter().filter(|d| d.score >= 0.5) {
        faces += 1;
        let best = got
            .iter()
            .max_by(|a, b| {
                retinaface::post::nms::iou(&a.bbox, &w.bbox).total_cmp(&retinaface::post::nms::iou(&b.bbox, &w.bbox))
            })
            .unwrap_or_else(|| panic!("{name}: no detections at all"));
        let i = retinaface::post::nms::iou(&best.bbox, &w.bbox);
        let ds = (best.score - w.score).abs();
        assert!(i >= 0.9 && ds <= 0.05, "{name}: face {w:?} best match {best:?} has IoU {i}, score error {ds}");
        worst_iou = worst_iou.min(i);
        worst_score = worst_score.max(ds);
        for k in 0..5 {
            let (dx, dy) =
                (best.landmarks[2 * k] - w.landmarks[2 * k], best.landmarks[2 * k + 1] - w.landmarks[2 * k + 1]);
            land.push((dx * dx + dy * dy).sqrt());
        }
    }
    assert!(faces > 0, "{name}: no reference face with score >= 0.5");
    land.sort_by(f32::total_cmp);
    let median = land[land.len() / 2];
    assert!(median <= 0.5, "{name}: median landmark error {median} px > 0.5");
    (worst_iou, worst_score, median)
}

/// A kernel's largest error against the reference, relative to the reference's magnitude (at least
/// 1); panics on a NaN, which in the simulation marks an element the kernel never wrote.
pub fn norm_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let mut m = 0.0f32;
    let mut mag = 1.0f32;
    for (g, w) in got.iter().zip(want) {
        assert!(!g.is_nan(), "NaN in the kernel's output (unwritten element)");
        m = m.max((g - w).abs());
        mag = mag.max(w.abs());
    }
    m / mag
}
