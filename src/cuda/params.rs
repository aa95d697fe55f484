//! The launch-parameter structs, field for field as kernels/common.cuh declares them. Pointers are
//! device addresses (`u64`; host addresses in the simulation). No struct has implicit padding, so each
//! is a byte-exact `Pod`; the simulation checks every size against the C `sizeof` at each launch.

use bytemuck::{Pod, Zeroable};

/// A struct a kernel takes by value as its one parameter.
pub trait KernelParams: Pod {}

macro_rules! params {
    ($($(#[$m:meta])* pub struct $name:ident { $($f:ident : $t:ty),* $(,)? })*) => {$(
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default)]
        pub struct $name { $(pub $f: $t),* }
        // SAFETY: repr(C), only u64/i32/f32 fields laid out without padding (sizes asserted in tests
        // and, in the simulation, against the C structs at every launch).
        unsafe impl Zeroable for $name {}
        unsafe impl Pod for $name {}
        impl KernelParams for $name {}
    )*};
}

params! {
    pub struct PreprocessParams { src: u64, dst: u64, total: i32, pad0: i32 }
    pub struct ConvParams {
        x: u64, wt: u64, bias: u64, residual: u64, y: u64,
        n: i32, h: i32, w: i32, cin: i32,
        oh: i32, ow: i32, cout: i32, k: i32,
        stride: i32, pad: i32, out_ctot: i32, out_coff: i32,
        act: i32, slope: f32,
    }
    pub struct PoolParams { x: u64, y: u64, n: i32, h: i32, w: i32, c: i32, oh: i32, ow: i32 }
    pub struct UpsampleAddParams { src: u64, dst: u64, n: i32, sh: i32, sw: i32, dh: i32, dw: i32, c: i32 }
    pub struct HeadParams {
        x: u64, wt: u64, bias: u64, loc: u64, conf: u64, landm: u64,
        n: i32, h: i32, w: i32, c: i32, anchor_base: i32, num_anchors: i32,
    }
    pub struct SelectParams { conf: u64, keys: u64, count: u64, n: i32, num_anchors: i32, threshold: f32, pad0: i32 }
    pub struct TopkParams { keys: u64, count: u64, order: u64, kept: u64, n: i32, num_anchors: i32, k: i32, pad0: i32 }
    pub struct DecodeParams {
        order: u64, kept: u64, loc: u64, conf: u64, landm: u64, boxes: u64, scores: u64, lands: u64,
        n: i32, num_anchors: i32, k: i32, img_h: i32, img_w: i32, resize: f32,
    }
    pub struct NmsMaskParams { boxes: u64, kept: u64, mask: u64, n: i32, k: i32, words: i32, threshold: f32 }
    pub struct NmsReduceParams {
        mask: u64, kept: u64, boxes: u64, scores: u64, lands: u64, dets: u64, det_count: u64,
        n: i32, k: i32, words: i32, max_out: i32,
    }
}

/// Activation codes of kernels/common.cuh.
pub const ACT_NONE: i32 = 0;
pub const ACT_LEAKY: i32 = 1;
pub const ACT_RELU6: i32 = 2;

/// (code, slope) of an activation.
pub fn act_code(act: crate::model::graph::Act) -> (i32, f32) {
    use crate::model::graph::Act;
    match act {
        Act::None => (ACT_NONE, 0.0),
        Act::Leaky(s) => (ACT_LEAKY, s),
        Act::Relu6 => (ACT_RELU6, 0.0),
    }
}

/// The most candidates the device NMS handles per image (kernels/post.cu: 128 mask words of 64 bits
/// in one block's shared memory).
pub const NMS_MAX_CANDIDATES: usize = 8192;

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;

    #[test]
    fn sizes_match_the_c_structs() {
        // The C sizes, computed by hand from kernels/common.cuh (8-byte pointers, 4-byte scalars).
        assert_eq!(size_of::<PreprocessParams>(), 24);
        assert_eq!(size_of::<ConvParams>(), 5 * 8 + 14 * 4);
        assert_eq!(size_of::<PoolParams>(), 16 + 24);
        assert_eq!(size_of::<UpsampleAddParams>(), 16 + 24);
        assert_eq!(size_of::<HeadParams>(), 48 + 24);
        assert_eq!(size_of::<SelectParams>(), 24 + 16);
        assert_eq!(size_of::<TopkParams>(), 32 + 16);
        assert_eq!(size_of::<DecodeParams>(), 64 + 24);
        assert_eq!(size_of::<NmsMaskParams>(), 24 + 16);
        assert_eq!(size_of::<NmsReduceParams>(), 56 + 16);
    }
}

params! {
    /// kernels/conv_f16.cuh: the f16 tensor-core convolutions (pointers to f16 data are raw u16 words).
    pub struct ConvF16Params {
        x: u64, wt: u64, bias: u64, residual: u64, y: u64,
        n: i32, h: i32, w: i32, cin: i32,
        oh: i32, ow: i32, cout: i32, k: i32,
        stride: i32, pad: i32, out_ctot: i32, out_coff: i32,
        act: i32, slope: f32,
        ws: u64,
        splits: i32, kt_per_split: i32,
    }
}

params! {
    /// kernels/conv_f16.cuh: f16 preprocessing, max-pool and upsample-add (kernels/net_f16.cu).
    pub struct PreprocessF16Params { src: u64, dst: u64, pixels: i32, pad0: i32 }
    pub struct PoolF16Params { x: u64, y: u64, n: i32, h: i32, w: i32, c: i32, oh: i32, ow: i32 }
    pub struct UpsampleAddF16Params { src: u64, dst: u64, n: i32, sh: i32, sw: i32, dh: i32, dw: i32, c: i32 }
}
