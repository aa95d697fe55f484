//! Priors (anchors): per level k with step s_k and feature size (ceil(H/s_k), ceil(W/s_k)), rows, then
//! columns, then the two min sizes; `(cx, cy, w, h)` normalised by the input size, not clipped.

use crate::consts::{PRIOR_MIN_SIZES as M, PRIOR_STEPS};

/// The levels' strides and anchor sizes, from kernels/constants.cuh (the device decode uses them too).
pub const STEPS: [usize; 3] = PRIOR_STEPS;
pub const MIN_SIZES: [[usize; 2]; 3] = [[M[0], M[1]], [M[2], M[3]], [M[4], M[5]]];

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
