//! The class, box and landmark heads of each level, as one 1×1 conv with 32 output channels.

use super::graph::{HEAD_BOX_OFFSET, HEAD_CHANNELS, HEAD_CLASS_OFFSET, HEAD_LANDMARK_OFFSET};
use super::params::ParamKind;
use super::{Act, Builder, Dest, TensorId};
use crate::error::Result;

pub fn build(b: &mut Builder<'_>, ssh: [TensorId; 3]) -> Result<[TensorId; 3]> {
    let c = b.network.fpn_channels();
    let mut out = [0; 3];
    for k in 0..3 {
        let mut weight = vec![0.0f32; HEAD_CHANNELS * c];
        let mut bias = vec![0.0f32; HEAD_CHANNELS];
        for (prefix, d, offset) in [
            ("class_head.class_head", 4, HEAD_CLASS_OFFSET),
            ("bbox_head.bbox_head", 8, HEAD_BOX_OFFSET),
            ("landmark_head.landmark_head", 20, HEAD_LANDMARK_OFFSET),
        ] {
            let w = b.src.take(&format!("{prefix}.{k}.weight"), &[d, c, 1, 1], ParamKind::ConvWeight)?;
            let bi = b.src.take(&format!("{prefix}.{k}.bias"), &[d], ParamKind::ConvBias)?;
            weight[offset * c..(offset + d) * c].copy_from_slice(&w);
            bias[offset..offset + d].copy_from_slice(&bi);
        }
        out[k] =
            b.conv(ssh[k], format!("head.{k}"), c, HEAD_CHANNELS, 1, 1, 1, weight, bias, None, Act::None, Dest::New);
    }
    Ok(out)
}
