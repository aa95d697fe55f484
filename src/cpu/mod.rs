//! The CPU executor and its fast paths. The plain definition of every op, which these paths are tested
//! against, is `crate::reference`.
//!
//! - `exec`: the executor (plans, arenas, the op loop).
//! - `conv`: the convolution paths and their dispatch; `ops`: the max-pool and upsample-add.
//! - `blocked`: the channel-blocked layout (NCHW16c) and its 1x1 convolution, measured against the
//!   NCHW paths; not yet used by the executor.
//! - `isa`: the SIMD level the paths run at; `rows`: row helpers shared by the paths.

pub mod blocked;
pub mod conv;
pub mod exec;
pub mod isa;
pub mod ops;
mod rows;

pub use exec::CpuExecutor;
pub use isa::{Isa, describe, isa, set_isa};
