//! JPEG pixels equal OpenCV's `imread(IMREAD_COLOR)`, byte for byte: on the shared photos and on JPEGs
//! that OpenCV and Pillow write here (baseline, progressive, optimised tables, every chroma subsampling,
//! grey, restart markers, odd sizes, Adobe CMYK). OpenCV comes from a Python with opencv-python-headless,
//! numpy and pillow: $RETINAFACE_OPENCV_PYTHON, or .venv-test / .venv in the crate. Without one the test
//! says so and passes, unless RETINAFACE_REQUIRE_OPENCV=1 (CI), where it fails.

mod common;
use common::*;
use retinaface::image_io::{self, DecodeLimits};
use std::path::{Path, PathBuf};

fn opencv_python() -> Option<PathBuf> {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let candidates = std::env::var_os("RETINAFACE_OPENCV_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([crate_dir.join(".venv-test/bin/python"), crate_dir.join(".venv/bin/python")]);
    for p in candidates {
        let ok = std::process::Command::new(&p)
            .args(["-c", "import cv2, numpy, PIL"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Some(p);
        }
    }
    let msg = "no Python with cv2, numpy and PIL (set RETINAFACE_OPENCV_PYTHON or make .venv-test)";
    assert!(std::env::var("RETINAFACE_REQUIRE_OPENCV").as_deref() != Ok("1"), "{msg}");
    eprintln!("skipped: {msg}");
    None
}

#[test]
fn jpeg_pixels_equal_opencv_imread() {
    let Some(python) = opencv_python() else { return };
    let dir = std::env::temp_dir().join(format!("retinaface-opencv-jpeg-{}", std::process::id()));
    let photos: Vec<PathBuf> =
        ["crowd", "kids", "trio"].iter().map(|n| shared().join(format!("images/{n}.jpg"))).collect();
    let out = std::process::Command::new(python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/opencv_jpeg.py"))
        .arg(&dir)
        .args(&photos)
        .output()
        .unwrap();
    assert!(out.status.success(), "opencv_jpeg.py: {}", String::from_utf8_lossy(&out.stderr));
    let names: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(str::to_string).collect();
    assert!(names.len() >= 24, "{names:?}");
    let mut failures = Vec::new();
    for name in &names {
        let src = photos.iter().find(|p| p.file_name().unwrap() == name.as_str()).cloned().unwrap_or(dir.join(name));
        let theirs = std::fs::read(dir.join(format!("{name}.bgr"))).unwrap();
        let nl = theirs.iter().position(|&c| c == b'\n').unwrap();
        let dims: Vec<usize> =
            std::str::from_utf8(&theirs[..nl]).unwrap().split(' ').map(|s| s.parse().unwrap()).collect();
        let theirs = &theirs[nl + 1..];
        let ours = image_io::load(&src, &DecodeLimits::default()).unwrap();
        if (ours.width, ours.height) != (dims[0], dims[1]) {
            failures.push(format!("{name}: {}x{} vs OpenCV's {}x{}", ours.width, ours.height, dims[0], dims[1]));
            continue;
        }
        let differ = ours.data.iter().zip(theirs).filter(|(a, b)| a != b).count();
        let max = ours.data.iter().zip(theirs).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap_or(0);
        println!("{name}: {}x{}, {differ} of {} samples differ (max {max})", dims[0], dims[1], theirs.len());
        if differ != 0 {
            failures.push(format!("{name}: {differ} samples differ from OpenCV's, by up to {max}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
