//! From the JPEG files through our own decoder to detections, against the reference.
//!
//! The decoder is libjpeg-turbo's, set up as OpenCV's imread sets it up, so the decoded pixels must equal
//! the goldens' `input_bgr_u8` (OpenCV's) exactly, and the detections from the file the reference's as
//! tightly as from its pixels: every reference detection with score ≥ 0.1 found with IoU ≥ 0.999 and
//! score within 1e-3, and none of ours with score ≥ 0.1 + 1e-3 without a reference partner.

mod common;
use common::*;
use retinaface::Detection;
use retinaface::Engine;
use retinaface::image_io::{self, DecodeLimits};
use retinaface::post::nms::iou;

#[test]
fn real_photos_from_jpeg_give_the_reference_pixels_and_detections() {
    let mut failures = Vec::new();
    let names: Vec<String> = case_names().into_iter().filter(|n| n.starts_with("real-")).collect();
    assert!(names.len() >= 5, "{names:?}");
    for name in names {
        let c = load_case(&name);
        assert!(c.image.extension().is_some_and(|e| e == "jpg"), "{name}: {}", c.image.display());
        let img = image_io::load(&c.image, &DecodeLimits::default()).unwrap();
        assert_eq!((img.width, img.height), (c.input.width, c.input.height), "{name}: decoded size");
        let differ = img.data.iter().zip(&c.input.data).filter(|(a, b)| a != b).count();
        assert_eq!(differ, 0, "{name}: {differ} decoded samples differ from OpenCV's");

        let e = Engine::new(&c.weights, None).unwrap();
        let dets = e.detect(&img, &Default::default()).unwrap();
        let partner = |d: &Detection, pool: &[Detection]| {
            pool.iter().any(|p| iou(&d.bbox, &p.bbox) >= 0.999 && (d.score - p.score).abs() <= 1e-3)
        };
        for r in c.detections.iter().filter(|d| d.score >= 0.1) {
            if !partner(r, &dets) {
                failures.push(format!("{name}: reference detection {:?} ({}) not found", r.bbox, r.score));
            }
        }
        for o in dets.iter().filter(|d| d.score >= 0.1 + 1e-3) {
            if !partner(o, &c.detections) {
                failures.push(format!("{name}: extra detection {:?} ({})", o.bbox, o.score));
            }
        }
        println!("{name}: pixels equal; {} detections, {} in the reference", dets.len(), c.detections.len());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
