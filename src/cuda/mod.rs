//! The CUDA backend: our own kernels (kernels/*.cu, NHWC f32), compiled at run time by NVRTC for the
//! GPU, or with g++ against kernels/sim/cuda_sim.h for the CPU simulation that tests run everywhere.
//!
//! - [`runner::KernelRunner`]: memory, copies, the one launch site; [`gpu::GpuRunner`] (cudarc) and
//!   [`sim::SimRunner`] implement it.
//! - [`engine::GpuEngine`]: the one graph executor over a runner (image bytes → raw outputs →
//!   detections, all on the device).
//! - [`nvrtc`]: runtime compilation with an on-disk cache and the ptxas resource report.
//!
//! Nothing here panics on a machine without CUDA: [`gpu::devices`] and [`nvrtc::available`] return
//! errors when a library is missing.

pub mod bench_kernels;
pub mod engine;
pub mod gpu;
pub mod kernels;
pub mod nvrtc;
pub mod ops;
pub mod params;
pub mod runner;
pub mod sass;
#[cfg(feature = "cuda-sim")]
pub mod sim;
pub mod stages;
pub mod tune;

/// The f16 convolution launcher's old path (`retinaface::cuda::conv_f16`), kept for callers.
pub use ops::conv_f16;

pub use engine::{CudaExecutor, GpuEngine, PipelineWait, nchw_to_nhwc, nhwc_to_nchw};
pub use ops::post::{NmsPath, device_postprocess, device_postprocess_each};
pub use runner::{DevBuf, KernelRunner, KernelRunnerExt, LaunchDims, Stream};

/// Whether a GPU can be used now: the first device's description, or why not.
pub fn gpu_status() -> crate::Result<String> {
    let devs = gpu::devices()?;
    let d = devs.first().ok_or_else(|| crate::Error::Cuda("the driver sees no CUDA device".into()))?;
    nvrtc::available()?;
    Ok(format!(
        "cuda:{} {} (sm_{}{}, {} MiB)",
        d.ordinal,
        d.name,
        d.compute_capability.0,
        d.compute_capability.1,
        d.total_memory >> 20
    ))
}
