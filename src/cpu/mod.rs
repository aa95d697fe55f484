//! The CPU executor and its fast paths. The plain definition of every op, which these paths are tested
//! against, is `crate::reference`.
//!
//! - `exec`: the executor (plans, arenas, the op loop).
//! - `conv`: the convolution paths and their dispatch; `ops`: the max-pool and upsample-add.
//! - `blocked`: the channel-blocked layout (NCHW16c) and its kernels (1x1 and 3x3 depthwise).
//! - `bands`: depthwise-separable ops run band by band in that layout, their intermediates in cache.
//! - `chain`: runs of depthwise + pointwise ops executed in the blocked layout at AVX-512 and AVX2.
//! - `dense_run`: runs of dense convolutions and max-pools (the ResNet backbones) in that layout.
//! - `vec512`, `vec256`: AVX-512 and AVX2 register helpers (transposes, activations) those kernels share.
//! - `isa`: the SIMD level the paths run at; `rows`: row helpers shared by the paths.

pub mod bands;
pub mod blocked;
mod chain;
pub mod conv;
mod dense_run;
pub mod exec;
pub mod isa;
pub mod ops;
mod rows;
mod vec256;
mod vec512;

pub use chain::{runs_taken as blocked_runs_taken, set_enabled as set_blocked_enabled};
pub use dense_run::{runs_taken as dense_runs_taken, set_enabled as set_dense_runs_enabled};
pub use exec::CpuExecutor;

/// Held by the unit tests that switch the blocked runs on and off process-wide, so that none runs under
/// another's switch.
#[cfg(test)]
pub(crate) static BLOCKED_SWITCHES: std::sync::Mutex<()> = std::sync::Mutex::new(());
pub use isa::{Isa, describe, isa, set_isa};
