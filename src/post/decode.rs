//! Box and landmark decoding (variances 0.1 and 0.2), in f32 in the reference's order of operations,
//! then scaled to pixels of the original image.

pub const VARIANCE: [f32; 2] = [0.1, 0.2];

/// Anchor `a`'s box in pixels: `(cx, cy, w, h)` from the prior and `loc`, corners, × (W, H, W, H) / r.
pub fn decode_box(prior: &[f32], loc: &[f32], w: f32, h: f32, resize: f32) -> [f32; 4] {
    let cx = prior[0] + loc[0] * VARIANCE[0] * prior[2];
    let cy = prior[1] + loc[1] * VARIANCE[0] * prior[3];
    let bw = prior[2] * (loc[2] * VARIANCE[1]).exp();
    let bh = prior[3] * (loc[3] * VARIANCE[1]).exp();
    // The reference shifts the centre to the corner in place, then adds the size to that corner.
    let x1 = cx - bw / 2.0;
    let y1 = cy - bh / 2.0;
    let x2 = bw + x1;
    let y2 = bh + y1;
    [x1 * w / resize, y1 * h / resize, x2 * w / resize, y2 * h / resize]
}

pub fn decode_landmarks(prior: &[f32], pre: &[f32], w: f32, h: f32, resize: f32) -> [f32; 10] {
    let mut out = [0.0f32; 10];
    for p in 0..5 {
        let x = prior[0] + pre[2 * p] * VARIANCE[0] * prior[2];
        let y = prior[1] + pre[2 * p + 1] * VARIANCE[0] * prior[3];
        out[2 * p] = x * w / resize;
        out[2 * p + 1] = y * h / resize;
    }
    out
}
