//! The CPU executor and its fast paths. The plain definition of every op, which these paths are tested
//! against, is `crate::reference`.
//!
//! - `exec`: the executor (plans, arenas, the op loop).
//! - `conv`: the convolution paths and their dispatch; `ops`: the max-pool and upsample-add.
//! - `blocked`: the channel-blocked layout (NCHW16c) and its kernels (1x1 and 3x3 depthwise).
//! - `bands`: depthwise-separable ops run band by band in that layout, their intermediates in cache.
//! - `chain`: runs of depthwise + pointwise ops executed in the blocked layout at AVX-512 and AVX2.
//! - `dense_run`: runs of dense convolutions and max-pools (the ResNet backbones) in that layout;
//!   `winograd_blocked`: their 3x3 stride-1 convolutions by Winograd's F(4×4) in that layout.
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
pub mod winograd_blocked;

pub use chain::{runs_taken as blocked_runs_taken, set_enabled as set_blocked_enabled};
pub use dense_run::{
    runs_taken as dense_runs_taken, set_enabled as set_dense_runs_enabled, set_island_max_pixels,
    set_winograd as set_dense_winograd,
};
pub use exec::CpuExecutor;

/// Held by the unit tests that switch the blocked runs on and off process-wide, so that none runs under
/// another's switch.
#[cfg(test)]
pub(crate) static BLOCKED_SWITCHES: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The largest absolute difference between two equally long slices.
#[cfg(test)]
pub(crate) fn max_abs_diff(x: &[f32], y: &[f32]) -> f32 {
    x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max)
}

/// `max_abs_diff` of two raw outputs of one image, per output, for the tests that run a network two
/// ways.
#[cfg(test)]
pub(crate) fn raw_differences(a: &crate::post::RawOutput, b: &crate::post::RawOutput) -> [(&'static str, f32); 3] {
    [
        ("loc", max_abs_diff(&a.loc, &b.loc)),
        ("conf", max_abs_diff(&a.conf, &b.conf)),
        ("landmarks", max_abs_diff(&a.landmarks, &b.landmarks)),
    ]
}
pub use isa::{Isa, describe, isa, set_isa};
