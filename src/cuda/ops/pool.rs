//! The max-pool family (kernels/pool.cu): 3×3 stride-2 pad-1, one thread per output element.

use super::dim;
use crate::cuda::params::PoolParams;
use crate::cuda::runner::{KernelRunner, KernelRunnerExt, LaunchDims};
use crate::error::Result;

/// Pools `x` ([n][h][w][c]) into `y` ([n][oh][ow][c]).
#[allow(clippy::too_many_arguments)] // the two tensors' addresses and sizes
pub fn launch(
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
    let total = dim(n * oh * ow * c, "output elements")?;
    let p = PoolParams {
        x,
        y,
        n: dim(n, "batch")?,
        h: dim(h, "height")?,
        w: dim(w, "width")?,
        c: dim(c, "channels")?,
        oh: dim(oh, "height")?,
        ow: dim(ow, "width")?,
    };
    r.launch("maxpool3x3s2", LaunchDims::linear(total as usize, 256), &p)
}
