//! Drawing detections on a BGR image (boxes, scores, the five landmarks), like the reference's detect
//! script, and saving it. A 3×5 digit font is enough for scores, so no font file is needed.

use crate::detection::Detection;
use crate::error::{Error, Result};
use crate::image_io::BgrImage;
use std::path::Path;

const BOX_BGR: [u8; 3] = [0, 0, 255];
const TEXT_BGR: [u8; 3] = [255, 255, 255];
/// Left eye, right eye, nose, left and right mouth corner, in the reference's colours (BGR).
const LANDMARK_BGR: [[u8; 3]; 5] = [[0, 0, 255], [0, 255, 255], [255, 0, 255], [0, 255, 0], [255, 0, 0]];

/// 3×5 glyphs, rows top to bottom, 3 bits each (MSB left).
fn glyph(c: char) -> Option<[u8; 5]> {
    Some(match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        _ => return None,
    })
}

fn put(img: &mut BgrImage, x: i64, y: i64, c: [u8; 3]) {
    if x >= 0 && y >= 0 && (x as usize) < img.width && (y as usize) < img.height {
        let i = (y as usize * img.width + x as usize) * 3;
        img.data[i..i + 3].copy_from_slice(&c);
    }
}

fn fill(img: &mut BgrImage, x0: i64, y0: i64, x1: i64, y1: i64, c: [u8; 3]) {
    for y in y0.max(0)..=y1.min(img.height as i64 - 1) {
        for x in x0.max(0)..=x1.min(img.width as i64 - 1) {
            put(img, x, y, c);
        }
    }
}

pub fn draw_text(img: &mut BgrImage, text: &str, x: i64, y: i64, scale: i64, c: [u8; 3]) {
    for (i, ch) in text.chars().enumerate() {
        let Some(g) = glyph(ch) else { continue };
        let gx = x + i as i64 * 4 * scale;
        for (row, bits) in g.iter().enumerate() {
            for col in 0..3 {
                if bits & (4 >> col) != 0 {
                    let (px, py) = (gx + col * scale, y + row as i64 * scale);
                    fill(img, px, py, px + scale - 1, py + scale - 1, c);
                }
            }
        }
    }
}

/// Draws every detection with `score >= vis_threshold`.
pub fn draw_detections(img: &mut BgrImage, dets: &[Detection], vis_threshold: f32) {
    let t = ((img.width.max(img.height) as f32 / 500.0).round() as i64).max(1);
    for d in dets.iter().filter(|d| d.score >= vis_threshold) {
        let [x1, y1, x2, y2] = d.bbox.map(|v| v.round() as i64);
        fill(img, x1, y1, x2, y1 + t - 1, BOX_BGR);
        fill(img, x1, y2 - t + 1, x2, y2, BOX_BGR);
        fill(img, x1, y1, x1 + t - 1, y2, BOX_BGR);
        fill(img, x2 - t + 1, y1, x2, y2, BOX_BGR);
        let label = format!("{:.2}", d.score);
        let (lx, ly) = (x1, y1 - 6 * t - 1);
        fill(img, lx - 1, ly - 1, lx + label.len() as i64 * 4 * t, ly + 5 * t, BOX_BGR);
        draw_text(img, &label, lx, ly, t, TEXT_BGR);
        for (p, c) in LANDMARK_BGR.iter().enumerate() {
            let (px, py) = (d.landmarks[2 * p].round() as i64, d.landmarks[2 * p + 1].round() as i64);
            let r = t + 1;
            for dy in -r..=r {
                for dx in -r..=r {
                    if dx * dx + dy * dy <= r * r {
                        put(img, px + dx, py + dy, *c);
                    }
                }
            }
        }
    }
}

/// Saves as JPEG or PNG by extension.
pub fn save(img: &BgrImage, path: &Path) -> Result<()> {
    let rgb: Vec<u8> = img.data.chunks_exact(3).flat_map(|p| [p[2], p[1], p[0]]).collect();
    let buf = image::RgbImage::from_raw(img.width as u32, img.height as u32, rgb)
        .ok_or_else(|| Error::InvalidArgument("image buffer does not match its size".into()))?;
    buf.save(path)
        .map_err(|e| Error::Image { source_name: path.display().to_string(), msg: format!("cannot save: {e}") })
}
