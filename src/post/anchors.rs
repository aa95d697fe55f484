//! Priors (anchors): per level k with step s_k and feature size (ceil(H/s_k), ceil(W/s_k)), rows, then
//! columns, then the two min sizes; `(cx, cy, w, h)` normalised by the input size, not clipped.

pub const STEPS: [usize; 3] = [8, 16, 32];
pub const MIN_SIZES: [[usize; 2]; 3] = [[16, 32], [64, 128], [256, 512]];

pub fn num_anchors(h: usize, w: usize) -> usize {
    STEPS.iter().map(|&s| 2 * h.div_ceil(s) * w.div_ceil(s)).sum()
}

/// [A, 4] priors for an h×w network input. Computed in f64 as the reference's Python does, then rounded.
pub fn priors(h: usize, w: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(num_anchors(h, w) * 4);
    for (k, &step) in STEPS.iter().enumerate() {
        let (fh, fw) = (h.div_ceil(step), w.div_ceil(step));
        for i in 0..fh {
            for j in 0..fw {
                for &m in &MIN_SIZES[k] {
                    let cx = (j as f64 + 0.5) * step as f64 / w as f64;
                    let cy = (i as f64 + 0.5) * step as f64 / h as f64;
                    out.extend_from_slice(&[
                        cx as f32,
                        cy as f32,
                        (m as f64 / w as f64) as f32,
                        (m as f64 / h as f64) as f32,
                    ]);
                }
            }
        }
    }
    out
}
