//! The heads family (kernels/heads.cu): one level's 1×1 conv to 32 channels, split into anchor-major
//! loc, softmaxed conf and landmarks (the raw outputs); on the detect path, the same with the score
//! threshold and the decoding fused ([`launch_fused`]), writing candidates for the post family.
//! Weights are packed as the conv family packs a 1×1 conv.

use super::dim;
use crate::cuda::params::{HeadF16Params, HeadFusedParams, HeadParams};
use crate::cuda::runner::{KernelRunner, KernelRunnerExt, LaunchDims};
use crate::error::{Error, Result};

/// Device addresses and sizes of one level's heads launch.
#[derive(Clone, Copy, Debug)]
pub struct HeadArgs {
    pub x: u64,
    pub wt: u64,
    pub bias: u64,
    pub loc: u64,
    pub conf: u64,
    pub landm: u64,
    pub n: usize,
    /// The level's feature map.
    pub h: usize,
    pub w: usize,
    pub c: usize,
    /// Anchors of the levels before this one, and of all levels.
    pub anchor_base: usize,
    pub num_anchors: usize,
}

pub use super::conv::pack;

pub fn launch(r: &mut dyn KernelRunner, a: &HeadArgs) -> Result<()> {
    let p = HeadParams {
        x: a.x,
        wt: a.wt,
        bias: a.bias,
        loc: a.loc,
        conf: a.conf,
        landm: a.landm,
        n: dim(a.n, "batch")?,
        h: dim(a.h, "height")?,
        w: dim(a.w, "width")?,
        c: dim(a.c, "channels")?,
        anchor_base: dim(a.anchor_base, "anchors")?,
        num_anchors: dim(a.num_anchors, "anchors")?,
    };
    // Eight pixels per 256-thread block (one warp per pixel).
    r.launch("heads_level", LaunchDims { grid: [(a.n * a.h * a.w).div_ceil(8) as u32, 1, 1], block: [256, 1, 1] }, &p)
}

/// The heads on the f16 path's NHWC f16 input whose channels are stored padded to `cstride` (the first
/// `a.c` are real): same weights, f32 outputs as [`launch`].
pub fn launch_f16(r: &mut dyn KernelRunner, a: &HeadArgs, cstride: usize) -> Result<()> {
    if cstride < a.c {
        return Err(Error::InvalidArgument(format!("f16 heads: {} channels stored in {cstride}", a.c)));
    }
    dim(a.n * a.h * a.w * cstride, "head input elements")?;
    let p = HeadF16Params {
        x: a.x,
        wt: a.wt,
        bias: a.bias,
        loc: a.loc,
        conf: a.conf,
        landm: a.landm,
        n: dim(a.n, "batch")?,
        h: dim(a.h, "height")?,
        w: dim(a.w, "width")?,
        c: dim(a.c, "channels")?,
        cstride: dim(cstride, "channels")?,
        anchor_base: dim(a.anchor_base, "anchors")?,
        num_anchors: dim(a.num_anchors, "anchors")?,
        pad0: 0,
    };
    r.launch(
        "heads_level_f16",
        LaunchDims { grid: [(a.n * a.h * a.w).div_ceil(8) as u32, 1, 1], block: [256, 1, 1] },
        &p,
    )
}

/// One level of the fused heads (kernels/heads.cu `heads_fused`): where its input and weights are.
#[derive(Clone, Copy, Debug)]
pub struct FusedHeadArgs {
    pub x: u64,
    pub wt: u64,
    pub bias: u64,
    pub n: usize,
    /// The level's feature map and its real channels.
    pub h: usize,
    pub w: usize,
    pub c: usize,
    /// Channels stored per pixel of `x` (c in f32; c padded to 8 in f16).
    pub cstride: usize,
    /// `x` holds f16 (the f16 executor's layout), else f32.
    pub f16: bool,
}

/// Where the fused heads write: the dense keys and decoded rows of every anchor, and what they read
/// from the device per call (the resize factors).
#[derive(Clone, Copy, Debug)]
pub struct CandidateOut {
    pub keys: u64,
    pub rows: u64,
    pub resize: u64,
}

/// The three levels of the fused heads for an `img_h`×`img_w` network input, in one launch: threshold,
/// decoding and the dense candidate keys and rows ([`CandidateOut`]). Each level's map must be the
/// priors' (ceil(input / stride)), as the anchors are numbered from them, and all levels one batch and
/// one precision.
pub fn launch_fused(
    r: &mut dyn KernelRunner,
    levels: &[FusedHeadArgs; 3],
    img_h: usize,
    img_w: usize,
    out: &CandidateOut,
    threshold: f32,
) -> Result<()> {
    let num_anchors = crate::post::anchors::num_anchors(img_h, img_w);
    let [l0, l1, l2] = levels;
    for (l, (a, &step)) in levels.iter().zip(&crate::post::anchors::STEPS).enumerate() {
        if (a.h, a.w) != (img_h.div_ceil(step), img_w.div_ceil(step)) {
            return Err(Error::InvalidArgument(format!(
                "fused heads level {l}: a {}x{} map for a {img_w}x{img_h} input (the priors need {}x{})",
                a.w,
                a.h,
                img_w.div_ceil(step),
                img_h.div_ceil(step)
            )));
        }
        if a.cstride < a.c {
            return Err(Error::InvalidArgument(format!(
                "fused heads level {l}: {} channels stored in {}",
                a.c, a.cstride
            )));
        }
        if (a.n, a.f16) != (l0.n, l0.f16) {
            return Err(Error::InvalidArgument(format!(
                "fused heads level {l}: batch {} ({}), level 0: batch {} ({})",
                a.n,
                if a.f16 { "f16" } else { "f32" },
                l0.n,
                if l0.f16 { "f16" } else { "f32" }
            )));
        }
        dim(a.n * a.h * a.w * a.cstride, "head input elements")?;
    }
    dim(l0.n * num_anchors * 15, "candidate row elements")?;
    let pixels = levels.iter().map(|a| a.n * a.h * a.w).sum::<usize>();
    let p = HeadFusedParams {
        x0: l0.x,
        x1: l1.x,
        x2: l2.x,
        wt0: l0.wt,
        wt1: l1.wt,
        wt2: l2.wt,
        bias0: l0.bias,
        bias1: l1.bias,
        bias2: l2.bias,
        resize: out.resize,
        keys: out.keys,
        rows: out.rows,
        n: dim(l0.n, "batch")?,
        num_anchors: dim(num_anchors, "anchors")?,
        img_h: dim(img_h, "height")?,
        img_w: dim(img_w, "width")?,
        h0: dim(l0.h, "height")?,
        w0: dim(l0.w, "width")?,
        c0: dim(l0.c, "channels")?,
        cs0: dim(l0.cstride, "channels")?,
        h1: dim(l1.h, "height")?,
        w1: dim(l1.w, "width")?,
        c1: dim(l1.c, "channels")?,
        cs1: dim(l1.cstride, "channels")?,
        h2: dim(l2.h, "height")?,
        w2: dim(l2.w, "width")?,
        c2: dim(l2.c, "channels")?,
        cs2: dim(l2.cstride, "channels")?,
        threshold,
        pad0: 0,
    };
    let name = if l0.f16 { "heads_fused_f16" } else { "heads_fused" };
    // Eight pixels per 256-thread block (one warp per pixel), as heads_level.
    r.launch(name, LaunchDims { grid: [pixels.div_ceil(8) as u32, 1, 1], block: [256, 1, 1] }, &p)
}
