//! Post-processing: priors, decoding, score threshold, top-k, NMS, mapping back to original pixels.

pub mod anchors;
pub mod decode;
pub mod nms;

use crate::detection::Detection;
use crate::error::{Error, Result};

/// The reference detect script's knobs and defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PostOptions {
    /// Keep anchors whose face score is strictly greater.
    pub conf_threshold: f32,
    pub nms_threshold: f32,
    /// Anchors kept (best first) before NMS; `None` keeps all.
    pub pre_nms_topk: Option<usize>,
    /// Detections kept after NMS; `None` keeps all.
    pub post_nms_topk: Option<usize>,
}

impl Default for PostOptions {
    fn default() -> Self {
        PostOptions { conf_threshold: 0.02, nms_threshold: 0.4, pre_nms_topk: Some(5000), post_nms_topk: Some(750) }
    }
}

impl PostOptions {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.conf_threshold) {
            return Err(Error::InvalidArgument(format!("conf threshold {} is not in [0, 1]", self.conf_threshold)));
        }
        if !(0.0..=1.0).contains(&self.nms_threshold) {
            return Err(Error::InvalidArgument(format!("NMS threshold {} is not in [0, 1]", self.nms_threshold)));
        }
        Ok(())
    }
}

/// The raw head outputs of one image at network input size `h`×`w`, in the goldens' layout.
#[derive(Clone, Debug, Default)]
pub struct RawOutput {
    pub h: usize,
    pub w: usize,
    /// [A, 4]
    pub loc: Vec<f32>,
    /// [A, 2], softmaxed.
    pub conf: Vec<f32>,
    /// [A, 10]
    pub landmarks: Vec<f32>,
}

/// Detections of one image, best first. `resize` is the factor the image was scaled by before the
/// network (1 at original size); boxes and landmarks come back in original pixels.
pub fn postprocess(raw: &RawOutput, priors: &[f32], resize: f32, opts: &PostOptions) -> Vec<Detection> {
    let a = raw.conf.len() / 2;
    let mut cand: Vec<(usize, f32)> =
        (0..a).map(|i| (i, raw.conf[2 * i + 1])).filter(|&(_, s)| s > opts.conf_threshold).collect();
    // Stable sort: equal scores keep anchor order (the reference leaves their order arbitrary).
    cand.sort_by(|x, y| y.1.total_cmp(&x.1));
    if let Some(k) = opts.pre_nms_topk {
        cand.truncate(k);
    }
    let (w, h) = (raw.w as f32, raw.h as f32);
    let boxes: Vec<[f32; 4]> =
        cand.iter().map(|&(i, _)| decode::decode_box(&priors[4 * i..], &raw.loc[4 * i..], w, h, resize)).collect();
    let mut keep = nms::nms(&boxes, opts.nms_threshold);
    if let Some(k) = opts.post_nms_topk {
        keep.truncate(k);
    }
    keep.into_iter()
        .map(|j| {
            let (i, score) = cand[j];
            Detection {
                bbox: boxes[j],
                score,
                landmarks: decode::decode_landmarks(&priors[4 * i..], &raw.landmarks[10 * i..], w, h, resize),
            }
        })
        .collect()
}
