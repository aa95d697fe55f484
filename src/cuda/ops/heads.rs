//! The heads family (kernels/heads.cu): one level's 1×1 conv to 32 channels, split into anchor-major
//! loc, softmaxed conf and landmarks. Weights are packed as the conv family packs a 1×1 conv.

use super::dim;
use crate::cuda::params::{HeadF16Params, HeadParams};
use crate::cuda::runner::{KernelRunner, KernelRunnerExt, LaunchDims};
use crate::error::Result;

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
        return Err(crate::error::Error::InvalidArgument(format!("f16 heads: {} channels stored in {cstride}", a.c)));
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
