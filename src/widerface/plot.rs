//! A PNG plot of the three precision-recall curves, drawn by hand on an `image::RgbImage`:
//! grid, axes with tick labels, one coloured polyline per subset and a legend with swatches and
//! APs. Text uses a built-in 5x7 pixel font (upper-case letters, digits, `.`, `-`).

use std::path::Path;

use image::{Rgb, RgbImage};

use super::eval::Evaluation;
use super::ground_truth::Subset;
use crate::{Error, Result};

pub const PLOT_WIDTH: u32 = 900;
pub const PLOT_HEIGHT: u32 = 700;

const LEFT: i32 = 90;
const RIGHT: i32 = 30;
const TOP: i32 = 50;
const BOTTOM: i32 = 70;
const SCALE: i32 = 2;

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const BLACK: Rgb<u8> = Rgb([0, 0, 0]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);

/// The colour of a subset's curve.
pub fn subset_colour(subset: Subset) -> Rgb<u8> {
    match subset {
        Subset::Easy => Rgb([31, 119, 180]),
        Subset::Medium => Rgb([255, 127, 14]),
        Subset::Hard => Rgb([44, 160, 44]),
    }
}

/// Draws the precision (y) against recall (x) curves of the three subsets.
pub fn render_curves(eval: &Evaluation) -> RgbImage {
    let mut img = RgbImage::from_pixel(PLOT_WIDTH, PLOT_HEIGHT, WHITE);
    let (w, h) = (PLOT_WIDTH as i32, PLOT_HEIGHT as i32);
    let (x0, x1, y0, y1) = (LEFT, w - RIGHT, h - BOTTOM, TOP);
    let to_px = |recall: f64, precision: f64| -> (i32, i32) {
        let x = x0 as f64 + recall.clamp(0.0, 1.0) * (x1 - x0) as f64;
        let y = y0 as f64 - precision.clamp(0.0, 1.0) * (y0 - y1) as f64;
        (x.round() as i32, y.round() as i32)
    };

    // Grid and tick labels every 0.1, labels every 0.2.
    for k in 0..=10 {
        let v = k as f64 / 10.0;
        let (gx, _) = to_px(v, 0.0);
        let (_, gy) = to_px(0.0, v);
        line(&mut img, (gx, y0), (gx, y1), GRID, 1);
        line(&mut img, (x0, gy), (x1, gy), GRID, 1);
        line(&mut img, (gx, y0), (gx, y0 + 6), BLACK, 1);
        line(&mut img, (x0 - 6, gy), (x0, gy), BLACK, 1);
        if k % 2 == 0 {
            let label = format!("{v:.1}");
            text(&mut img, gx - text_width(&label) / 2, y0 + 12, &label, BLACK);
            text(&mut img, x0 - 12 - text_width(&label), gy - 7, &label, BLACK);
        }
    }
    // Axes.
    line(&mut img, (x0, y0), (x1, y0), BLACK, 1);
    line(&mut img, (x0, y0), (x0, y1), BLACK, 1);
    text(&mut img, (x0 + x1) / 2 - text_width("RECALL") / 2, y0 + 40, "RECALL", BLACK);
    text_vertical(&mut img, 14, (y0 + y1) / 2 + text_width("PRECISION") / 2, "PRECISION", BLACK);
    let title = "WIDER FACE VAL - PRECISION RECALL";
    text(&mut img, (x0 + x1) / 2 - text_width(title) / 2, 16, title, BLACK);

    // Curves (points without a defined precision are left out).
    for s in Subset::ALL {
        let pts: Vec<(i32, i32)> = eval
            .subset(s)
            .curve
            .iter()
            .filter(|p| p.precision.is_finite() && p.recall.is_finite())
            .map(|p| to_px(p.recall, p.precision))
            .collect();
        for pair in pts.windows(2) {
            line(&mut img, pair[0], pair[1], subset_colour(s), 3);
        }
        if let [only] = pts.as_slice() {
            line(&mut img, *only, *only, subset_colour(s), 3);
        }
    }

    // Legend, bottom left (where precision-recall curves do not go).
    let (lx, mut ly) = (x0 + 20, y0 - 3 * 26 - 16);
    let legend_w = 20 + 30 + text_width("MEDIUM  AP 0.0000") + 16;
    fill_rect(&mut img, lx - 10, ly - 10, legend_w, 3 * 26 + 12, WHITE);
    rect_outline(&mut img, lx - 10, ly - 10, legend_w, 3 * 26 + 12, BLACK);
    for s in Subset::ALL {
        fill_rect(&mut img, lx, ly, 30, 14, subset_colour(s));
        let ap = eval.subset(s).ap;
        let label = format!(
            "{:<6}  AP {}",
            s.label().to_uppercase(),
            if ap.is_finite() { format!("{ap:.4}") } else { "-".into() }
        );
        text(&mut img, lx + 40, ly, &label, BLACK);
        ly += 26;
    }
    img
}

/// Writes [`render_curves`] as a PNG file.
pub fn write_curves_png(eval: &Evaluation, path: &Path) -> Result<()> {
    render_curves(eval)
        .save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| Error::WiderFace(format!("cannot write PNG {}: {e}", path.display())))
}

fn put(img: &mut RgbImage, x: i32, y: i32, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn fill_rect(img: &mut RgbImage, x: i32, y: i32, w: i32, h: i32, c: Rgb<u8>) {
    for yy in y..y + h {
        for xx in x..x + w {
            put(img, xx, yy, c);
        }
    }
}

fn rect_outline(img: &mut RgbImage, x: i32, y: i32, w: i32, h: i32, c: Rgb<u8>) {
    line(img, (x, y), (x + w - 1, y), c, 1);
    line(img, (x, y + h - 1), (x + w - 1, y + h - 1), c, 1);
    line(img, (x, y), (x, y + h - 1), c, 1);
    line(img, (x + w - 1, y), (x + w - 1, y + h - 1), c, 1);
}

/// Bresenham line with a square pen of `width` pixels.
fn line(img: &mut RgbImage, (mut x, mut y): (i32, i32), (xe, ye): (i32, i32), c: Rgb<u8>, width: i32) {
    let (dx, dy) = ((xe - x).abs(), -(ye - y).abs());
    let (sx, sy) = (if x < xe { 1 } else { -1 }, if y < ye { 1 } else { -1 });
    let mut err = dx + dy;
    let lo = -(width - 1) / 2;
    loop {
        for oy in lo..lo + width {
            for ox in lo..lo + width {
                put(img, x + ox, y + oy, c);
            }
        }
        if x == xe && y == ye {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

fn text_width(s: &str) -> i32 {
    s.chars().count() as i32 * 6 * SCALE
}

/// The lit pixels of `s` in the 5x7 font: (character index, column, row).
fn text_pixels(s: &str) -> impl Iterator<Item = (i32, i32, i32)> + '_ {
    s.chars().enumerate().flat_map(|(i, ch)| {
        let rows = glyph(ch);
        (0..7).flat_map(move |gy| {
            (0..5).filter(move |gx| rows[gy] & (0x10 >> gx) != 0).map(move |gx| (i as i32, gx, gy as i32))
        })
    })
}

/// Draws `s` with its top-left corner at (x, y).
fn text(img: &mut RgbImage, x: i32, y: i32, s: &str, c: Rgb<u8>) {
    for (i, gx, gy) in text_pixels(s) {
        fill_rect(img, x + (i * 6 + gx) * SCALE, y + gy * SCALE, SCALE, SCALE, c);
    }
}

/// Draws `s` rotated a quarter turn anticlockwise (reading upwards), starting at (x, y) bottom-left.
fn text_vertical(img: &mut RgbImage, x: i32, y: i32, s: &str, c: Rgb<u8>) {
    for (i, gx, gy) in text_pixels(s) {
        fill_rect(img, x + gy * SCALE, y - (i * 6 + gx) * SCALE, SCALE, SCALE, c);
    }
}

/// 5x7 glyphs, one byte per row (bit 4 = leftmost column). Unknown characters are blank.
fn glyph(ch: char) -> [u8; 7] {
    match ch.to_ascii_uppercase() {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1E],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'Y' => [0x11, 0x11, 0x0A, 0x04, 0x04, 0x04, 0x04],
        _ => [0; 7],
    }
}
