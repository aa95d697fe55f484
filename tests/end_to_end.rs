//! From the JPEG files through our own decoder to detections, against the reference.
//!
//! Our JPEG decoder and OpenCV's differ by a few grey levels here and there (see the spec), so the
//! bounds are looser than the raw-parity ones (tests/goldens.rs) and stated here:
//! - decoded pixels: within 16 grey levels of OpenCV's, mean absolute difference below 1;
//! - per anchor (our decode vs OpenCV's pixels through the same network): face score within 0.05 and
//!   box corners within 4 pixels for every anchor scoring above 0.3 in either (measured: ≤ 0.041 and
//!   ≤ 2.9 px);
//! - detections: every reference face with score ≥ 0.5 found with IoU ≥ 0.9 and score within 0.05, and
//!   none of ours with score ≥ 0.55 without a reference partner. One exception, checked rather than
//!   assumed: when the reference's own pixels give two overlapping candidates (IoU above the NMS
//!   threshold, both ≥ 0.5) whose scores are within 1e-3 — an NMS near-tie — and our decoder's pixels
//!   swap their order, NMS keeps the other one and the faces around it change. Such a case must still
//!   meet the anchor bound, and the tie is printed. (Measured: on biubug6's kids.jpg, 0.9185 vs 0.9183
//!   from OpenCV's pixels become 0.9194 vs 0.9195 from ours.)

mod common;
use common::*;
use retinaface::image_io::{self, DecodeLimits};
use retinaface::post::{PostOptions, anchors, decode, nms::iou};
use retinaface::{BgrImage, Detection, Engine};

fn candidates(e: &Engine, img: &BgrImage) -> Vec<(f32, [f32; 4])> {
    let raw = e.forward(&[img]).unwrap().pop().unwrap();
    let pr = anchors::priors(img.height, img.width);
    (0..raw.conf.len() / 2)
        .map(|i| {
            (
                raw.conf[2 * i + 1],
                decode::decode_box(&pr[4 * i..], &raw.loc[4 * i..], img.width as f32, img.height as f32, 1.0),
            )
        })
        .collect()
}

#[test]
fn real_photos_from_jpeg_find_the_reference_faces() {
    let mut failures = Vec::new();
    let nms = PostOptions::default().nms_threshold;
    for name in case_names().into_iter().filter(|n| n.starts_with("real-")) {
        let c = load_case(&name);
        let img = image_io::load(&c.image, &DecodeLimits::default()).unwrap();
        assert_eq!((img.width, img.height), (c.input.width, c.input.height), "{name}: decoded size (EXIF orientation)");
        let diffs: Vec<u32> =
            img.data.iter().zip(&c.input.data).map(|(a, b)| (*a as i32 - *b as i32).unsigned_abs()).collect();
        let max = *diffs.iter().max().unwrap();
        let mean = diffs.iter().map(|&d| d as f64).sum::<f64>() / diffs.len() as f64;
        assert!(max <= 16 && mean < 1.0, "{name}: decoded pixels differ from OpenCV's by max {max}, mean {mean}");

        let e = Engine::new(&c.weights, None).unwrap();
        let ours = candidates(&e, &img);
        let theirs = candidates(&e, &c.input);
        let (mut ds, mut db) = (0.0f32, 0.0f32);
        for (o, t) in ours.iter().zip(&theirs) {
            if o.0 > 0.3 || t.0 > 0.3 {
                ds = ds.max((o.0 - t.0).abs());
                db = db.max(o.1.iter().zip(&t.1).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max));
            }
        }
        println!("{name}: pixels max {max} mean {mean:.3}; anchors: score {ds:.4}, box {db:.3} px");
        assert!(ds <= 0.05 && db <= 4.0, "{name}: anchor outputs moved by score {ds}, box {db} px");

        let strong: Vec<usize> = (0..ours.len()).filter(|&i| ours[i].0 >= 0.5 && theirs[i].0 >= 0.5).collect();
        let near_tie_flip = strong.iter().flat_map(|&i| strong.iter().map(move |&j| (i, j))).find(|&(i, j)| {
            i < j
                && (theirs[i].0 - theirs[j].0).abs() < 1e-3
                && iou(&theirs[i].1, &theirs[j].1) > nms
                && (ours[i].0 > ours[j].0) != (theirs[i].0 > theirs[j].0)
        });
        let mut case_failures = Vec::new();
        let dets = e.detect(&img, &Default::default()).unwrap();
        let partner = |d: &Detection, pool: &[Detection]| {
            pool.iter().any(|p| iou(&d.bbox, &p.bbox) >= 0.9 && (d.score - p.score).abs() <= 0.05)
        };
        for r in c.detections.iter().filter(|d| d.score >= 0.5) {
            if !partner(r, &dets) {
                case_failures.push(format!("{name}: reference face {:?} ({}) not found", r.bbox, r.score));
            }
        }
        for o in dets.iter().filter(|d| d.score >= 0.55) {
            if !partner(o, &c.detections) {
                case_failures.push(format!("{name}: extra face {:?} ({})", o.bbox, o.score));
            }
        }
        match near_tie_flip {
            Some((i, j)) if !case_failures.is_empty() => println!(
                "{name}: detections differ around an NMS near-tie the decoder flips: scores {:.4}/{:.4} from OpenCV's pixels, {:.4}/{:.4} from ours:\n  {}",
                theirs[i].0,
                theirs[j].0,
                ours[i].0,
                ours[j].0,
                case_failures.join("\n  ")
            ),
            _ => failures.extend(case_failures),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
