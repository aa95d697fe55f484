//! RetinaFace face detection: a CPU reference engine (the oracle) and CUDA kernels.

pub mod detection;
pub mod error;
pub mod widerface;

pub use detection::Detection;
pub use error::{Error, Result};
