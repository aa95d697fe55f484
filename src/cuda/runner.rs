//! What the graph executor needs from a device: memory, copies and kernel launches. Two
//! implementations: the real GPU ([`super::gpu::GpuRunner`], cudarc + NVRTC) and the CPU simulation
//! ([`super::sim::SimRunner`], the same kernels compiled with g++). The executor is written once over
//! this trait, so the code the tests run in simulation is the code that runs on the GPU.

use super::params::KernelParams;
use crate::error::Result;

/// A device allocation: its address (device or, in the simulation, host) and size in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevBuf {
    pub ptr: u64,
    pub bytes: usize,
}

impl DevBuf {
    /// The address `offset` bytes in, for kernel parameters.
    pub fn at(&self, offset: usize) -> u64 {
        debug_assert!(offset <= self.bytes);
        self.ptr + offset as u64
    }
}

/// Grid and block of a launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchDims {
    pub grid: [u32; 3],
    pub block: [u32; 3],
}

impl LaunchDims {
    /// A 1-D launch of `total` threads in blocks of `block`.
    pub fn linear(total: usize, block: u32) -> LaunchDims {
        LaunchDims { grid: [total.div_ceil(block as usize).max(1) as u32, 1, 1], block: [block, 1, 1] }
    }
}

pub trait KernelRunner: Send {
    /// "cuda:0 NVIDIA H200 (sm_90)" or "simulation (N CPU threads)".
    fn describe(&self) -> String;
    /// True for the CPU simulation: the executor then poisons scratch memory before each run.
    fn is_simulation(&self) -> bool;
    fn alloc(&mut self, bytes: usize) -> Result<DevBuf>;
    fn free(&mut self, buf: DevBuf) -> Result<()>;
    fn upload(&mut self, dst: DevBuf, offset: usize, src: &[u8]) -> Result<()>;
    fn download(&mut self, src: DevBuf, offset: usize, dst: &mut [u8]) -> Result<()>;
    /// Sets every byte of `buf` to `value`.
    fn memset(&mut self, buf: DevBuf, value: u8) -> Result<()>;
    /// Fills `buf` with the f32 NaN pattern 0x7fc00000 (also a recognisable garbage for integers).
    fn poison(&mut self, buf: DevBuf) -> Result<()>;
    /// Launches `kernel` with its one parameter struct given as bytes. The only launch site.
    fn launch_raw(&mut self, kernel: &str, dims: LaunchDims, params: &[u8]) -> Result<()>;
    /// Waits for all launched work; reports asynchronous kernel faults.
    fn synchronize(&mut self) -> Result<()>;
}

/// Typed helpers over [`KernelRunner`].
pub trait KernelRunnerExt: KernelRunner {
    fn launch<P: KernelParams>(&mut self, kernel: &str, dims: LaunchDims, params: &P) -> Result<()> {
        self.launch_raw(kernel, dims, bytemuck::bytes_of(params))
    }
    fn upload_f32(&mut self, dst: DevBuf, src: &[f32]) -> Result<()> {
        self.upload(dst, 0, bytemuck::cast_slice(src))
    }
    fn alloc_f32(&mut self, data: &[f32]) -> Result<DevBuf> {
        let b = self.alloc(std::mem::size_of_val(data).max(4))?;
        self.upload(b, 0, bytemuck::cast_slice(data))?;
        Ok(b)
    }
    fn download_f32(&mut self, src: DevBuf, len: usize) -> Result<Vec<f32>> {
        let mut v = vec![0.0f32; len];
        self.download(src, 0, bytemuck::cast_slice_mut(&mut v))?;
        Ok(v)
    }
    fn download_i32(&mut self, src: DevBuf, len: usize) -> Result<Vec<i32>> {
        let mut v = vec![0i32; len];
        self.download(src, 0, bytemuck::cast_slice_mut(&mut v))?;
        Ok(v)
    }
    fn download_u64(&mut self, src: DevBuf, len: usize) -> Result<Vec<u64>> {
        let mut v = vec![0u64; len];
        self.download(src, 0, bytemuck::cast_slice_mut(&mut v))?;
        Ok(v)
    }
}

impl<T: KernelRunner + ?Sized> KernelRunnerExt for T {}

pub(crate) fn check_range(buf: DevBuf, offset: usize, len: usize, what: &str) -> Result<()> {
    if offset.checked_add(len).is_none_or(|e| e > buf.bytes) {
        return Err(crate::Error::Cuda(format!(
            "{what}: {len} bytes at offset {offset} overrun a buffer of {} bytes",
            buf.bytes
        )));
    }
    Ok(())
}
