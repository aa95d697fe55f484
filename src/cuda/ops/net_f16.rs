//! The f16 network's other ops (kernels/net_f16.cu): preprocessing into 8 padded channels, max-pool
//! and upsample-add on NHWC f16 with channels padded to multiples of 8.

use super::dim;
use crate::cuda::params::{PoolF16Params, PreprocessF16Params, UpsampleAddF16Params};
use crate::cuda::runner::{KernelRunner, KernelRunnerExt, LaunchDims};
use crate::error::{Error, Result};

fn check_c8(c: usize, what: &str) -> Result<()> {
    if c == 0 || !c.is_multiple_of(8) {
        return Err(Error::InvalidArgument(format!("f16 {what}: {c} stored channels, not a positive multiple of 8")));
    }
    Ok(())
}

/// BGR u8 `src` ([pixels][3]) into `dst` ([pixels][8] f16: the three channels minus the means, then zeros).
pub fn preprocess(r: &mut dyn KernelRunner, src: u64, dst: u64, pixels: usize) -> Result<()> {
    dim(pixels * 8, "input elements")?;
    let p = PreprocessF16Params { src, dst, pixels: dim(pixels, "pixels")?, pad0: 0 };
    r.launch("preprocess_bgr_f16", LaunchDims::linear(pixels, 256), &p)
}

/// 3×3 stride-2 max-pool of `x` ([n][h][w][c] f16) into `y` ([n][oh][ow][c]).
#[allow(clippy::too_many_arguments)] // the two tensors' addresses and sizes
pub fn maxpool(
    r: &mut dyn KernelRunner,
    x: u64,
    y: u64,
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    oh: usize,
    ow: usize,
) -> Result<()> {
    check_c8(c, "max-pool")?;
    dim(n * h * w * c, "input elements")?;
    let total = dim(n * oh * ow * c, "output elements")? as usize;
    let p = PoolF16Params {
        x,
        y,
        n: dim(n, "batch")?,
        h: dim(h, "height")?,
        w: dim(w, "width")?,
        c: dim(c, "channels")?,
        oh: dim(oh, "height")?,
        ow: dim(ow, "width")?,
    };
    r.launch("maxpool3x3s2_f16", LaunchDims::linear(total / 8, 256), &p)
}

/// `dst` ([n][dh][dw][c] f16) += nearest(`src` [n][sh][sw][c]).
pub fn upsample_add(
    r: &mut dyn KernelRunner,
    src: u64,
    dst: u64,
    n: usize,
    (sh, sw): (usize, usize),
    (dh, dw): (usize, usize),
    c: usize,
) -> Result<()> {
    check_c8(c, "upsample-add")?;
    dim(n * sh * sw * c, "input elements")?;
    let total = dim(n * dh * dw * c, "output elements")? as usize;
    let p = UpsampleAddF16Params {
        src,
        dst,
        n: dim(n, "batch")?,
        sh: dim(sh, "height")?,
        sw: dim(sw, "width")?,
        dh: dim(dh, "height")?,
        dw: dim(dw, "width")?,
        c: dim(c, "channels")?,
    };
    r.launch("upsample_nearest_add_f16", LaunchDims::linear(total / 8, 256), &p)
}
