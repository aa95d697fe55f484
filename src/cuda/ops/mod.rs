//! One launcher per kernel family: which kernel of the family runs a given op, its grid, and the
//! weight packing it expects. The CUDA executor and tests/kernels_sim.rs both launch through these,
//! so a kernel is tested exactly as it is run.
//!
//! A new family (a new kernels/NAME.cu) gets a file here with its `launch` (and `pack`, if it takes
//! weights) and a `pub mod` line below; a new variant of a family is a branch of that family's
//! `choose`.

pub mod conv;
pub mod conv_f16;
pub mod fused;
pub mod fused_f16;
pub mod heads;
pub mod net_f16;
pub mod pool;
pub mod post;
pub mod preprocess;
pub mod resize;
pub mod upsample;

use crate::error::{Error, Result};

/// `v` as a kernel's 32-bit index, or an error naming what overflows.
pub fn dim(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::InvalidArgument(format!("{what} = {v} exceeds the kernels' 32-bit indices")))
}
