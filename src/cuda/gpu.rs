//! The real device through cudarc's driver API: discovery that never panics, modules compiled by NVRTC
//! (cached on disk, see [`super::nvrtc`]) and loaded once per family, functions looked up once, one
//! launch site. Work goes to the context's legacy default stream, so copies order with launches.

use super::kernels;
use super::nvrtc;
use super::runner::{DevBuf, KernelRunner, LaunchDims, check_range};
use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, result, sys};
use std::collections::{HashMap, HashSet};
use std::ffi::{CString, c_void};
use std::sync::Arc;

/// A GPU that the driver reports.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_memory: usize,
}

fn drv(what: &str) -> impl Fn(result::DriverError) -> Error + '_ {
    move |e| Error::Cuda(format!("{what}: {e}"))
}

/// Ok when the driver library (libcuda) can be loaded; checked before any cudarc driver call, which
/// would panic without it.
pub fn driver_present() -> Result<()> {
    // SAFETY: only tries dlopen on candidate names.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::Cuda("no NVIDIA driver (libcuda.so) on this machine".into()))
    }
}

/// The GPUs present: an error (never a panic) when there is no driver; empty when it sees none.
pub fn devices() -> Result<Vec<DeviceInfo>> {
    driver_present()?;
    let n = CudaContext::device_count().map_err(drv("cuInit / cuDeviceGetCount"))?;
    let mut v = Vec::new();
    for ordinal in 0..n.max(0) as usize {
        let dev = result::device::get(ordinal as i32).map_err(drv("cuDeviceGet"))?;
        let name = result::device::get_name(dev).map_err(drv("cuDeviceGetName"))?;
        // SAFETY: dev is a valid device handle from cuDeviceGet.
        let (maj, min, mem) = unsafe {
            (
                result::device::get_attribute(
                    dev,
                    sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                )
                .map_err(drv("cuDeviceGetAttribute"))?,
                result::device::get_attribute(
                    dev,
                    sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                )
                .map_err(drv("cuDeviceGetAttribute"))?,
                result::device::total_mem(dev).map_err(drv("cuDeviceTotalMem"))?,
            )
        };
        v.push(DeviceInfo { ordinal, name, compute_capability: (maj, min), total_memory: mem });
    }
    Ok(v)
}

pub struct GpuRunner {
    ctx: Arc<CudaContext>,
    info: DeviceInfo,
    arch: String,
    modules: HashMap<&'static str, sys::CUmodule>,
    functions: HashMap<String, sys::CUfunction>,
    allocs: HashSet<u64>,
}

impl GpuRunner {
    /// Opens GPU `ordinal`; errors (no driver, no such device, no NVRTC) are values.
    pub fn new(ordinal: usize) -> Result<GpuRunner> {
        let devs = devices()?;
        let info = devs
            .get(ordinal)
            .cloned()
            .ok_or_else(|| Error::Cuda(format!("no CUDA device {ordinal} ({} present)", devs.len())))?;
        nvrtc::available()?;
        let ctx = CudaContext::new(ordinal).map_err(drv("creating the CUDA context"))?;
        let arch = format!("sm_{}{}", info.compute_capability.0, info.compute_capability.1);
        Ok(GpuRunner { ctx, info, arch, modules: HashMap::new(), functions: HashMap::new(), allocs: HashSet::new() })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    pub fn arch(&self) -> &str {
        &self.arch
    }

    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(drv("binding the CUDA context"))
    }

    /// Compiles (or takes from the cache) and loads every family now, so the first frame does not pay.
    pub fn load_all(&mut self) -> Result<()> {
        for (k, _) in kernels::KERNELS {
            self.function(k)?;
        }
        Ok(())
    }

    fn function(&mut self, kernel: &str) -> Result<sys::CUfunction> {
        if let Some(&f) = self.functions.get(kernel) {
            return Ok(f);
        }
        let family = kernels::family_of(kernel).ok_or_else(|| Error::Cuda(format!("no kernel named {kernel}")))?;
        let module = match self.modules.get(family) {
            Some(&m) => m,
            None => {
                let compiled = nvrtc::compile_cached(family, &self.arch)?;
                self.bind()?;
                // SAFETY: a complete cubin from nvrtcGetCUBIN (or our cache of one) for this device's arch.
                let m = unsafe { result::module::load_data(compiled.cubin.as_ptr().cast()) }
                    .map_err(|e| Error::Cuda(format!("loading module {family} for {}: {e}", self.arch)))?;
                self.modules.insert(family, m);
                m
            }
        };
        let name = CString::new(kernel).map_err(|_| Error::Cuda(format!("kernel name {kernel:?} contains NUL")))?;
        // SAFETY: module is loaded and not unloaded before self drops.
        let f = unsafe { result::module::get_function(module, name) }
            .map_err(|e| Error::Cuda(format!("cuModuleGetFunction({kernel}): {e}")))?;
        self.functions.insert(kernel.to_string(), f);
        Ok(f)
    }
}

// SAFETY: the module and function handles belong to the context, not to a thread, and every entry
// point (alloc, free, copies, launch, synchronize, drop) makes the context current on the calling
// thread first; `&mut self` keeps two threads from using the runner at once.
unsafe impl Send for GpuRunner {}

impl Drop for GpuRunner {
    fn drop(&mut self) {
        if self.bind().is_err() {
            return;
        }
        for p in self.allocs.drain() {
            // SAFETY: allocated by malloc_sync in this context; errors at teardown have no one to go to.
            let _ = unsafe { result::free_sync(p) };
        }
        for (_, m) in self.modules.drain() {
            // SAFETY: loaded by load_data; functions from it are dropped with self.
            let _ = unsafe { result::module::unload(m) };
        }
    }
}

impl KernelRunner for GpuRunner {
    fn describe(&self) -> String {
        format!("cuda:{} {} ({})", self.info.ordinal, self.info.name, self.arch)
    }

    fn is_simulation(&self) -> bool {
        false
    }

    fn alloc(&mut self, bytes: usize) -> Result<DevBuf> {
        self.bind()?;
        // SAFETY: plain allocation in the bound context.
        let p = unsafe { result::malloc_sync(bytes.max(1)) }
            .map_err(|e| Error::Cuda(format!("cuMemAlloc({bytes} bytes): {e}")))?;
        self.allocs.insert(p);
        Ok(DevBuf { ptr: p, bytes })
    }

    fn free(&mut self, buf: DevBuf) -> Result<()> {
        if !self.allocs.remove(&buf.ptr) {
            return Err(Error::Cuda(format!("free of {:#x}, which is not a live allocation", buf.ptr)));
        }
        self.bind()?;
        // SAFETY: a live allocation of this runner.
        unsafe { result::free_sync(buf.ptr) }.map_err(drv("cuMemFree"))
    }

    fn upload(&mut self, dst: DevBuf, offset: usize, src: &[u8]) -> Result<()> {
        check_range(dst, offset, src.len(), "upload")?;
        self.bind()?;
        // SAFETY: range checked against the allocation.
        unsafe { result::memcpy_htod_sync(dst.ptr + offset as u64, src) }.map_err(drv("cuMemcpyHtoD"))
    }

    fn download(&mut self, src: DevBuf, offset: usize, dst: &mut [u8]) -> Result<()> {
        check_range(src, offset, dst.len(), "download")?;
        self.bind()?;
        // SAFETY: range checked against the allocation. Synchronous: waits for prior launches.
        unsafe { result::memcpy_dtoh_sync(dst, src.ptr + offset as u64) }
            .map_err(drv("cuMemcpyDtoH (a kernel may have faulted)"))
    }

    fn memset(&mut self, buf: DevBuf, value: u8) -> Result<()> {
        self.bind()?;
        // SAFETY: the whole of a live allocation.
        unsafe { result::memset_d8_sync(buf.ptr, value, buf.bytes) }.map_err(drv("cuMemsetD8"))
    }

    fn poison(&mut self, buf: DevBuf) -> Result<()> {
        self.bind()?;
        // SAFETY: the whole of a live allocation, in 4-byte words.
        unsafe { sys::cuMemsetD32_v2(buf.ptr, 0x7fc0_0000, buf.bytes / 4) }.result().map_err(drv("cuMemsetD32"))
    }

    fn launch_raw(&mut self, kernel: &str, dims: LaunchDims, params: &[u8]) -> Result<()> {
        let f = self.function(kernel)?;
        self.bind()?;
        // Each kernel takes one struct by value: kernelParams[0] points at its bytes, which the driver
        // copies at launch time.
        let mut args = [params.as_ptr() as *mut c_void];
        let g = (dims.grid[0], dims.grid[1], dims.grid[2]);
        let b = (dims.block[0], dims.block[1], dims.block[2]);
        // SAFETY: f comes from a module compiled from the same common.cuh the params mirror; pointers
        // inside the params are live allocations of this runner (the executor owns them).
        unsafe { result::launch_kernel(f, g, b, 0, std::ptr::null_mut(), &mut args) }
            .map_err(|e| Error::Cuda(format!("launching {kernel} grid {g:?} block {b:?}: {e}")))
    }

    fn synchronize(&mut self) -> Result<()> {
        self.bind()?;
        result::ctx::synchronize().map_err(drv("cuCtxSynchronize (a kernel faulted?)"))
    }
}
