//! The preprocess family (kernels/preprocess.cu): u8 BGR → f32 minus the BGR means, one thread per
//! byte; the layout stays HWC, which is already the NHWC the kernels run in.

use super::dim;
use crate::cuda::params::PreprocessParams;
use crate::cuda::runner::{KernelRunner, KernelRunnerExt, LaunchDims};
use crate::error::Result;

/// Converts `total` bytes at `src` ([n][h][w][3] u8) into f32 at `dst` (same layout).
pub fn launch(r: &mut dyn KernelRunner, src: u64, dst: u64, total: usize) -> Result<()> {
    let p = PreprocessParams { src, dst, total: dim(total, "input")?, pad0: 0 };
    r.launch("preprocess_bgr", LaunchDims::linear(total, 256), &p)
}
