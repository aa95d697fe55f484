//! The heads' split of one pyramid level into per-anchor outputs (the second step of `Op::Heads`, after
//! its 1×1 convolution).

use crate::graph::ir::{HEAD_BOX_OFFSET, HEAD_CLASS_OFFSET, HEAD_LANDMARK_OFFSET};

/// Softmax over two logits, as PyTorch computes it: `exp(x − max) / Σ exp(x − max)`.
pub fn softmax2(a: f32, b: f32) -> [f32; 2] {
    let m = a.max(b);
    let (ea, eb) = ((a - m).exp(), (b - m).exp());
    let s = ea + eb;
    [ea / s, eb / s]
}

/// The reference model's `permute(0, 2, 3, 1).view(n, -1, k)` of the class, box and landmark heads, and
/// its `softmax(dim=-1)` of the class logits, for one image of one level: `head` is the level's fused
/// head tensor [32, h, w] (per anchor j of 2: class logits at channels `2j..2j+2`, box at `4 + 4j..`,
/// landmarks at `12 + 10j..`). Anchor `a = (y·w + x)·2 + j` gets `loc[a]` (4 values), `conf[a]` (2,
/// softmaxed) and `landmarks[a]` (10).
pub fn heads_to_anchors(head: &[f32], h: usize, w: usize, loc: &mut [f32], conf: &mut [f32], landmarks: &mut [f32]) {
    let hw = h * w;
    assert_eq!(head.len(), crate::graph::ir::HEAD_CHANNELS * hw, "head tensor size");
    assert!(loc.len() == 2 * hw * 4 && conf.len() == 2 * hw * 2 && landmarks.len() == 2 * hw * 10, "anchor outputs");
    for pix in 0..hw {
        for j in 0..2 {
            let a = pix * 2 + j;
            let ch = |c: usize| head[c * hw + pix];
            let s = softmax2(ch(HEAD_CLASS_OFFSET + 2 * j), ch(HEAD_CLASS_OFFSET + 2 * j + 1));
            conf[a * 2..a * 2 + 2].copy_from_slice(&s);
            for d in 0..4 {
                loc[a * 4 + d] = ch(HEAD_BOX_OFFSET + 4 * j + d);
            }
            for d in 0..10 {
                landmarks[a * 10 + d] = ch(HEAD_LANDMARK_OFFSET + 10 * j + d);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_of_two_is_stable_and_sums_to_one() {
        assert_eq!(softmax2(0.0, 0.0), [0.5, 0.5]);
        let [a, b] = softmax2(1000.0, 0.0);
        assert!(a == 1.0 && b == 0.0, "no overflow: {a} {b}");
        let [a, b] = softmax2(1.0, 2.0);
        assert!((b - 1.0 / (1.0 + (-1.0f32).exp())).abs() < 1e-7 && (a + b - 1.0).abs() < 1e-7);
    }

    #[test]
    fn anchors_are_pixel_major_then_anchor() {
        // A 1x2 level: channel c at pixel x holds 100·c + x.
        let (h, w) = (1, 2);
        let head: Vec<f32> = (0..32).flat_map(|c| (0..2).map(move |x| (100 * c + x) as f32)).collect();
        let (mut loc, mut conf, mut lm) = (vec![0.0; 16], vec![0.0; 8], vec![0.0; 40]);
        heads_to_anchors(&head, h, w, &mut loc, &mut conf, &mut lm);
        // Anchor 3 = pixel 1, j = 1: box channels 8..12, landmark channels 22..32.
        assert_eq!(&loc[12..16], &[801.0, 901.0, 1001.0, 1101.0]);
        assert_eq!(lm[30], 2201.0);
        assert_eq!(lm[39], 3101.0);
        // Its class logits are channels 2 and 3 (201 and 301): the second is far larger.
        assert!(conf[6] < 1e-40 && conf[7] == 1.0, "{:?}", &conf[6..8]);
    }
}
