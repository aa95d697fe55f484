//! Face alignment: the crop that recognition models (ArcFace and its family) take, as insightface's
//! `face_align.norm_crop` makes it. The five detected landmarks are mapped onto the ArcFace template by
//! the least-squares similarity (Umeyama's method, rotation without reflection, as scikit-image's
//! `SimilarityTransform.estimate`), and the image is warped with OpenCV's `warpAffine` rule: bilinear,
//! constant border 0, the destination pixel centre mapped back through the inverted matrix.

use crate::error::{Error, Result};
use crate::image_io::BgrImage;

/// The ArcFace five-point template for a 112x112 crop: left eye, right eye, nose, left and right mouth
/// corners (insightface's `arcface_dst`).
pub const ARCFACE_TEMPLATE: [[f64; 2]; 5] =
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]];

/// A 2x3 affine matrix `[a, b, c, d, e, f]`: `x' = a·x + b·y + c`, `y' = d·x + e·y + f`.
pub type Affine = [f64; 6];

/// The template scaled for a `size`x`size` crop: insightface accepts multiples of 112 (scaled) and of
/// 128 (scaled from 128 and shifted right by 8·ratio).
pub fn template(size: usize) -> Result<[[f64; 2]; 5]> {
    let (ratio, dx) = if size > 0 && size.is_multiple_of(112) {
        (size as f64 / 112.0, 0.0)
    } else if size > 0 && size.is_multiple_of(128) {
        let r = size as f64 / 128.0;
        (r, 8.0 * r)
    } else {
        return Err(Error::InvalidArgument(format!(
            "alignment size {size}: must be a multiple of 112 or of 128 (as insightface's norm_crop)"
        )));
    };
    Ok(ARCFACE_TEMPLATE.map(|[x, y]| [x * ratio + dx, y * ratio]))
}

/// The similarity transform (rotation, uniform scale, translation; no reflection) that maps `src` onto
/// `dst` with the least squared error: Umeyama (1991). In 2-D the optimal rotation has a closed form:
/// with the cross-covariance A = Σ d·sᵀ / n, the rotation angle is atan2(a10 − a01, a00 + a11) and the
/// trace of the rotated covariance is the norm of that pair, which equals Umeyama's `S·d` (s1 + s2 when
/// det A ≥ 0, s1 − s2 when det A < 0, the reflection being refused).
pub fn similarity(src: &[[f64; 2]], dst: &[[f64; 2]]) -> Result<Affine> {
    if src.len() != dst.len() || src.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "similarity needs equal, non-empty point sets ({} and {} points)",
            src.len(),
            dst.len()
        )));
    }
    let n = src.len() as f64;
    let mean = |p: &[[f64; 2]]| {
        let (sx, sy) = p.iter().fold((0.0, 0.0), |(a, b), q| (a + q[0], b + q[1]));
        [sx / n, sy / n]
    };
    let (ms, md) = (mean(src), mean(dst));
    let (mut a00, mut a01, mut a10, mut a11, mut var) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for (s, d) in src.iter().zip(dst) {
        let (sx, sy, dx, dy) = (s[0] - ms[0], s[1] - ms[1], d[0] - md[0], d[1] - md[1]);
        a00 += dx * sx;
        a01 += dx * sy;
        a10 += dy * sx;
        a11 += dy * sy;
        var += sx * sx + sy * sy;
    }
    let (p, q) = ((a00 + a11) / n, (a10 - a01) / n);
    let var = var / n;
    let norm = p.hypot(q);
    if !(var.is_finite() && norm.is_finite() && var > 0.0 && norm > 0.0) {
        return Err(Error::InvalidArgument(
            "landmarks are degenerate (all points equal, or not finite): no similarity transform".into(),
        ));
    }
    let scale = norm / var;
    let (c, s) = (p / norm * scale, q / norm * scale);
    Ok([c, -s, md[0] - (c * ms[0] - s * ms[1]), s, c, md[1] - (s * ms[0] + c * ms[1])])
}

/// The matrix that maps the landmarks (x0, y0, …, x4, y4) onto the template of a `size` crop
/// (insightface's `estimate_norm`).
pub fn estimate_norm(landmarks: &[f32; 10], size: usize) -> Result<Affine> {
    let src: Vec<[f64; 2]> = landmarks.chunks_exact(2).map(|p| [p[0] as f64, p[1] as f64]).collect();
    similarity(&src, &template(size)?)
}

/// `cv2.warpAffine(img, m, (width, height))` with bilinear interpolation and a constant 0 border: each
/// destination pixel (x, y) samples the source at the inverse of `m`. Coordinates and weights are f32
/// as OpenCV's current vectorised warp computes them; the result is rounded to nearest.
pub fn warp_affine(img: &BgrImage, m: &Affine, width: usize, height: usize) -> Result<BgrImage> {
    let det = m[0] * m[4] - m[1] * m[3];
    if det == 0.0 || !det.is_finite() {
        return Err(Error::InvalidArgument(format!("affine matrix {m:?} is not invertible")));
    }
    let inv_d = 1.0 / det;
    let (i0, i1, i3, i4) = (m[4] * inv_d, -m[1] * inv_d, -m[3] * inv_d, m[0] * inv_d);
    let (i2, i5) = (-i0 * m[2] - i1 * m[5], -i3 * m[2] - i4 * m[5]);
    let (sw, sh) = (img.width as i64, img.height as i64);
    let px = |x: i64, y: i64, ch: usize| -> f32 {
        if x < 0 || y < 0 || x >= sw || y >= sh { 0.0 } else { img.data[((y * sw + x) * 3) as usize + ch] as f32 }
    };
    let mut out = vec![0u8; width * height * 3];
    for y in 0..height {
        let (bx, by) = ((y as f64 * i1 + i2) as f32, (y as f64 * i4 + i5) as f32);
        for x in 0..width {
            let sx = (i0 as f32).mul_add(x as f32, bx);
            let sy = (i3 as f32).mul_add(x as f32, by);
            if !sx.is_finite() || !sy.is_finite() {
                continue;
            }
            let (fx, fy) = (sx.floor(), sy.floor());
            let (ax, ay) = (sx - fx, sy - fy);
            let (ix, iy) = (fx as i64, fy as i64);
            for ch in 0..3 {
                let (p00, p01) = (px(ix, iy, ch), px(ix + 1, iy, ch));
                let (p10, p11) = (px(ix, iy + 1, ch), px(ix + 1, iy + 1, ch));
                let top = ax.mul_add(p01 - p00, p00);
                let bottom = ax.mul_add(p11 - p10, p10);
                let v = ay.mul_add(bottom - top, top);
                out[(y * width + x) * 3 + ch] = v.round_ties_even().clamp(0.0, 255.0) as u8;
            }
        }
    }
    BgrImage::new(width, height, out)
}

/// The aligned `size`x`size` face crop of `img` for these landmarks (insightface's `norm_crop`).
pub fn norm_crop(img: &BgrImage, landmarks: &[f32; 10], size: usize) -> Result<BgrImage> {
    if landmarks.iter().any(|v| !v.is_finite()) {
        return Err(Error::InvalidArgument(format!("landmarks {landmarks:?} are not all finite")));
    }
    warp_affine(img, &estimate_norm(landmarks, size)?, size, size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn similarity_recovers_a_known_transform() {
        let (angle, scale, tx, ty) = (0.3f64, 1.7, 12.5, -4.0);
        let (c, s) = (angle.cos() * scale, angle.sin() * scale);
        let src: Vec<[f64; 2]> = ARCFACE_TEMPLATE.to_vec();
        let dst: Vec<[f64; 2]> = src.iter().map(|p| [c * p[0] - s * p[1] + tx, s * p[0] + c * p[1] + ty]).collect();
        let m = similarity(&src, &dst).unwrap();
        for (got, want) in m.iter().zip([c, -s, tx, s, c, ty]) {
            assert!((got - want).abs() < 1e-9, "{m:?}");
        }
    }

    #[test]
    fn similarity_refuses_reflection() {
        // A mirrored point set: the best proper similarity is not the mirror, and it maps points with
        // a residual; a reflection would fit exactly.
        let src: Vec<[f64; 2]> = ARCFACE_TEMPLATE.to_vec();
        let dst: Vec<[f64; 2]> = src.iter().map(|p| [-p[0], p[1]]).collect();
        let m = similarity(&src, &dst).unwrap();
        assert!((m[0] * m[4] - m[1] * m[3]) > 0.0, "determinant must be positive: {m:?}");
    }

    #[test]
    fn degenerate_inputs_are_errors() {
        assert!(similarity(&[[1.0, 1.0]; 5], &ARCFACE_TEMPLATE).is_err());
        assert!(template(100).is_err());
        assert!(template(0).is_err());
        let img = BgrImage::new(4, 4, vec![0; 48]).unwrap();
        assert!(norm_crop(&img, &[f32::NAN; 10], 112).is_err());
        assert!(warp_affine(&img, &[0.0; 6], 2, 2).is_err());
    }

    #[test]
    fn identity_warp_copies_and_borders_are_zero() {
        let data: Vec<u8> = (0..5 * 4 * 3).map(|i| (i * 7 % 251) as u8).collect();
        let img = BgrImage::new(5, 4, data).unwrap();
        let same = warp_affine(&img, &[1.0, 0.0, 0.0, 0.0, 1.0, 0.0], 5, 4).unwrap();
        assert_eq!(same, img);
        let shifted = warp_affine(&img, &[1.0, 0.0, 10.0, 0.0, 1.0, 0.0], 5, 4).unwrap();
        assert!(shifted.data.iter().all(|&v| v == 0));
    }

    #[test]
    fn template_sizes() {
        assert_eq!(template(112).unwrap(), ARCFACE_TEMPLATE);
        let t = template(128).unwrap();
        assert!((t[0][0] - (38.2946 * 128.0 / 128.0 + 8.0)).abs() < 1e-12);
        let t = template(224).unwrap();
        assert!((t[2][1] - 71.7366 * 2.0).abs() < 1e-12);
    }
}
