//! Greedy NMS with the reference's pixel convention: areas and overlaps count `+1`, and a box is
//! suppressed when its IoU with a kept box is strictly greater than the threshold. All in f32.

/// Indices kept from `boxes` ([x1, y1, x2, y2], already in descending score order), in order.
pub fn nms(boxes: &[[f32; 4]], threshold: f32) -> Vec<usize> {
    let n = boxes.len();
    // Structure of arrays, so the inner loop over the remaining boxes vectorises.
    let col = |c: usize| boxes.iter().map(|b| b[c]).collect::<Vec<f32>>();
    let (x1, y1, x2, y2) = (col(0), col(1), col(2), col(3));
    let areas: Vec<f32> = (0..n).map(|i| (x2[i] - x1[i] + 1.0) * (y2[i] - y1[i] + 1.0)).collect();
    let mut suppressed = vec![false; n];
    let mut keep = Vec::new();
    for i in 0..n {
        if suppressed[i] {
            continue;
        }
        keep.push(i);
        let r = i + 1..n;
        suppress(
            [x1[i], y1[i], x2[i], y2[i], areas[i]],
            Soa {
                x1: &x1[r.clone()],
                y1: &y1[r.clone()],
                x2: &x2[r.clone()],
                y2: &y2[r.clone()],
                areas: &areas[r.clone()],
            },
            threshold,
            &mut suppressed[r],
        );
    }
    keep
}

struct Soa<'a> {
    x1: &'a [f32],
    y1: &'a [f32],
    x2: &'a [f32],
    y2: &'a [f32],
    areas: &'a [f32],
}

/// Marks every box whose IoU with `a` (x1, y1, x2, y2, area) exceeds `threshold`; the reference's
/// arithmetic in its order: overlap `max(0, min(x2) − max(x1) + 1)`, IoU `inter / (area_a + area_b − inter)`.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // one index over the five SoA columns: the loop that vectorises
fn suppress_body(a: [f32; 5], b: Soa<'_>, threshold: f32, out: &mut [bool]) {
    for j in 0..out.len() {
        let iw = (a[2].min(b.x2[j]) - a[0].max(b.x1[j]) + 1.0).max(0.0);
        let ih = (a[3].min(b.y2[j]) - a[1].max(b.y1[j]) + 1.0).max(0.0);
        let inter = iw * ih;
        let iou = inter / (a[4] + b.areas[j] - inter);
        out[j] |= iou > threshold;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn suppress_avx2(a: [f32; 5], b: Soa<'_>, threshold: f32, out: &mut [bool]) {
    suppress_body(a, b, threshold, out)
}

fn suppress(a: [f32; 5], b: Soa<'_>, threshold: f32, out: &mut [bool]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present, checked just above. Same arithmetic, wider vectors, same bits.
        return unsafe { suppress_avx2(a, b, threshold, out) };
    }
    suppress_body(a, b, threshold, out)
}

/// The plain greedy form, kept as the test oracle of the vectorised one.
pub fn nms_reference(boxes: &[[f32; 4]], threshold: f32) -> Vec<usize> {
    let mut suppressed = vec![false; boxes.len()];
    let mut keep = Vec::new();
    for i in 0..boxes.len() {
        if suppressed[i] {
            continue;
        }
        keep.push(i);
        for j in i + 1..boxes.len() {
            if !suppressed[j] && iou(&boxes[i], &boxes[j]) > threshold {
                suppressed[j] = true;
            }
        }
    }
    keep
}

/// IoU with the same `+1` convention, for tests and evaluation.
pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0]) + 1.0).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1]) + 1.0).max(0.0);
    let inter = iw * ih;
    inter / ((a[2] - a[0] + 1.0) * (a[3] - a[1] + 1.0) + (b[2] - b[0] + 1.0) * (b[3] - b[1] + 1.0) - inter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectorised_nms_equals_the_plain_one_with_ties_and_thousands_of_boxes() {
        let mut state = 12345u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 40) as f32 / 16777216.0
        };
        let mut boxes: Vec<[f32; 4]> = (0..3000)
            .map(|_| {
                let (x, y, w, h) = (next() * 200.0, next() * 200.0, 2.0 + next() * 40.0, 2.0 + next() * 40.0);
                [x, y, x + w, y + h]
            })
            .collect();
        // exact duplicates: IoU 1 must suppress; touching boxes: the +1 convention gives them overlap
        boxes.push(boxes[5]);
        boxes.push([0.0, 0.0, 9.0, 9.0]);
        boxes.push([9.0, 0.0, 18.0, 9.0]);
        for t in [0.0, 0.3, 0.4, 0.7, 1.0] {
            assert_eq!(nms(&boxes, t), nms_reference(&boxes, t), "threshold {t}");
        }
        assert!(nms(&boxes, 0.4).len() < boxes.len());
        // the reference convention: IoU exactly at the threshold is kept, above is suppressed
        let two = [[0.0, 0.0, 9.0, 9.0], [5.0, 0.0, 14.0, 9.0]]; // inter 5·10, union 150 → 1/3
        assert_eq!(nms(&two, 1.0 / 3.0 + 1e-6), vec![0, 1]);
        assert_eq!(nms(&two, 0.3), vec![0]);
    }
}
