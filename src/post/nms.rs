//! Greedy NMS with the reference's pixel convention: areas and overlaps count `+1`, and a box is
//! suppressed when its IoU with a kept box is strictly greater than the threshold. All in f32.

/// Indices kept from `boxes` ([x1, y1, x2, y2], already in descending score order), in order.
pub fn nms(boxes: &[[f32; 4]], threshold: f32) -> Vec<usize> {
    let area = |b: &[f32; 4]| (b[2] - b[0] + 1.0) * (b[3] - b[1] + 1.0);
    let areas: Vec<f32> = boxes.iter().map(area).collect();
    let mut suppressed = vec![false; boxes.len()];
    let mut keep = Vec::new();
    for i in 0..boxes.len() {
        if suppressed[i] {
            continue;
        }
        keep.push(i);
        let a = &boxes[i];
        for j in i + 1..boxes.len() {
            if suppressed[j] {
                continue;
            }
            let b = &boxes[j];
            let iw = (a[2].min(b[2]) - a[0].max(b[0]) + 1.0).max(0.0);
            let ih = (a[3].min(b[3]) - a[1].max(b[1]) + 1.0).max(0.0);
            let inter = iw * ih;
            let iou = inter / (areas[i] + areas[j] - inter);
            if iou > threshold {
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
