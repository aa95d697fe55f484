//! The upsample-add family (kernels/upsample.cu): `dst += nearest(src)`, one thread per dst element.

use super::dim;
use crate::cuda::params::UpsampleAddParams;
use crate::cuda::runner::{KernelRunner, KernelRunnerExt, LaunchDims};
use crate::error::Result;

/// `dst` ([n][dh][dw][c]) += nearest-resized `src` ([n][sh][sw][c]).
#[allow(clippy::too_many_arguments)] // the two tensors' addresses and sizes
pub fn launch(
    r: &mut dyn KernelRunner,
    src: u64,
    dst: u64,
    n: usize,
    (sh, sw): (usize, usize),
    (dh, dw): (usize, usize),
    c: usize,
) -> Result<()> {
    let total = dim(n * dh * dw * c, "output elements")?;
    let p = UpsampleAddParams {
        src,
        dst,
        n: dim(n, "batch")?,
        sh: dim(sh, "height")?,
        sw: dim(sw, "width")?,
        dh: dim(dh, "height")?,
        dw: dim(dw, "width")?,
        c: dim(c, "channels")?,
    };
    r.launch("upsample_nearest_add", LaunchDims::linear(total as usize, 256), &p)
}
