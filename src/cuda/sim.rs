//! The CPU simulation of the device: kernels/*.cu compiled with g++ against kernels/sim/cuda_sim.h
//! (build.rs), launched through `cudasim_launch`. Memory is host memory aligned like cudaMalloc's.

use super::runner::{DevBuf, KernelRunner, LaunchDims, check_range};
use crate::error::{Error, Result};
use std::alloc::{Layout, alloc, dealloc};
use std::collections::HashMap;
use std::ffi::{CString, c_char, c_int, c_void};

unsafe extern "C" {
    fn cudasim_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        params: *const c_void,
        size: usize,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
}

/// cudaMalloc aligns to 256 bytes; so do we, so vector loads behave alike.
const ALIGN: usize = 256;

#[derive(Default)]
pub struct SimRunner {
    /// Live allocations: address → layout.
    allocs: HashMap<u64, Layout>,
}

impl SimRunner {
    pub fn new() -> SimRunner {
        SimRunner::default()
    }

    fn slice(&mut self, buf: DevBuf) -> Result<&mut [u8]> {
        if !self.allocs.contains_key(&buf.ptr) {
            return Err(Error::Cuda(format!("simulation: {:#x} is not a live allocation", buf.ptr)));
        }
        // SAFETY: buf.ptr is a live allocation of at least buf.bytes bytes made by alloc below.
        Ok(unsafe { std::slice::from_raw_parts_mut(buf.ptr as *mut u8, buf.bytes) })
    }
}

impl Drop for SimRunner {
    fn drop(&mut self) {
        for (p, l) in self.allocs.drain() {
            // SAFETY: allocated with this layout and not freed yet.
            unsafe { dealloc(p as *mut u8, l) };
        }
    }
}

impl KernelRunner for SimRunner {
    fn describe(&self) -> String {
        format!(
            "CUDA simulation on the CPU ({} threads)",
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        )
    }

    fn is_simulation(&self) -> bool {
        true
    }

    fn alloc(&mut self, bytes: usize) -> Result<DevBuf> {
        let layout = Layout::from_size_align(bytes.max(1), ALIGN)
            .map_err(|e| Error::Cuda(format!("simulation alloc of {bytes} bytes: {e}")))?;
        // SAFETY: non-zero size.
        let p = unsafe { alloc(layout) };
        if p.is_null() {
            return Err(Error::Cuda(format!("simulation: out of memory allocating {bytes} bytes")));
        }
        self.allocs.insert(p as u64, layout);
        let b = DevBuf { ptr: p as u64, bytes };
        // New device memory holds garbage; the simulation makes it NaN so unwritten reads show.
        self.poison(b)?;
        Ok(b)
    }

    fn free(&mut self, buf: DevBuf) -> Result<()> {
        let layout = self
            .allocs
            .remove(&buf.ptr)
            .ok_or_else(|| Error::Cuda(format!("simulation: double free of {:#x}", buf.ptr)))?;
        // SAFETY: allocated with this layout.
        unsafe { dealloc(buf.ptr as *mut u8, layout) };
        Ok(())
    }

    fn upload(&mut self, dst: DevBuf, offset: usize, src: &[u8]) -> Result<()> {
        check_range(dst, offset, src.len(), "upload")?;
        self.slice(dst)?[offset..offset + src.len()].copy_from_slice(src);
        Ok(())
    }

    fn download(&mut self, src: DevBuf, offset: usize, dst: &mut [u8]) -> Result<()> {
        check_range(src, offset, dst.len(), "download")?;
        dst.copy_from_slice(&self.slice(src)?[offset..offset + dst.len()]);
        Ok(())
    }

    fn memset(&mut self, buf: DevBuf, value: u8) -> Result<()> {
        self.slice(buf)?.fill(value);
        Ok(())
    }

    fn poison(&mut self, buf: DevBuf) -> Result<()> {
        let nan = 0x7fc0_0000u32.to_le_bytes();
        for (i, b) in self.slice(buf)?.iter_mut().enumerate() {
            *b = nan[i % 4];
        }
        Ok(())
    }

    fn launch_raw(&mut self, kernel: &str, dims: LaunchDims, params: &[u8]) -> Result<()> {
        let name = CString::new(kernel).map_err(|_| Error::Cuda(format!("kernel name {kernel:?} contains NUL")))?;
        let mut err = vec![0u8; 1024];
        // SAFETY: the arrays outlive the call; params is the kernel's parameter struct (size checked by
        // the registry against the C sizeof); the kernel's pointers are live allocations of this runner.
        let rc = unsafe {
            cudasim_launch(
                name.as_ptr(),
                dims.grid.as_ptr(),
                dims.block.as_ptr(),
                params.as_ptr().cast(),
                params.len(),
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        if rc != 0 {
            let end = err.iter().position(|&c| c == 0).unwrap_or(err.len());
            return Err(Error::Cuda(format!("simulated launch of {kernel}: {}", String::from_utf8_lossy(&err[..end]))));
        }
        Ok(())
    }

    fn synchronize(&mut self) -> Result<()> {
        Ok(())
    }
}
