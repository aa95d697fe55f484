//! The real device through cudarc's driver API: discovery that never panics, modules compiled by NVRTC
//! (cached on disk, see [`super::nvrtc`]) and loaded once per family, functions looked up once, one
//! launch site. Work goes to two non-blocking streams of the runner's own (never the legacy default
//! stream, which would serialise with every other stream of the process): launches, memsets, graph
//! capture and replay to the compute stream; copies from and to pinned host buffers and events to
//! either, ordered across them by events.

use super::kernels;
use super::nvrtc;
use super::runner::{
    DevBuf, EventId, GraphId, KernelRunner, LaunchDims, Readback, Stream, StreamClock, capture_error, check_range,
};
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

/// Page-locked host memory from cuMemHostAlloc: copies from and to it are truly asynchronous.
struct Pinned {
    ptr: *mut u8,
    cap: usize,
}

/// Pinned download buffers kept for reuse; more than this many idle ones are freed.
const MAX_IDLE_PINNED: usize = 8;

/// Whether a driver error leaves the context unusable (every later call fails the same way).
fn is_sticky(e: &result::DriverError) -> bool {
    use sys::CUresult::*;
    matches!(
        e.0,
        CUDA_ERROR_ILLEGAL_ADDRESS
            | CUDA_ERROR_LAUNCH_TIMEOUT
            | CUDA_ERROR_ASSERT
            | CUDA_ERROR_HARDWARE_STACK_ERROR
            | CUDA_ERROR_ILLEGAL_INSTRUCTION
            | CUDA_ERROR_MISALIGNED_ADDRESS
            | CUDA_ERROR_INVALID_ADDRESS_SPACE
            | CUDA_ERROR_INVALID_PC
            | CUDA_ERROR_LAUNCH_FAILED
            | CUDA_ERROR_ECC_UNCORRECTABLE
            | CUDA_ERROR_UNKNOWN
    )
}

pub struct GpuRunner {
    ctx: Arc<CudaContext>,
    info: DeviceInfo,
    arch: String,
    modules: HashMap<&'static str, sys::CUmodule>,
    /// Each kernel loaded so far, with the dynamic shared memory it is launched with.
    functions: HashMap<String, (sys::CUfunction, u32)>,
    allocs: HashSet<u64>,
    /// The compute stream, then the copy stream.
    streams: [sys::CUstream; 2],
    clocks: [StreamClock; 2],
    next_id: u64,
    /// Per stream, the staging buffer of `upload_staged_on`, and the event recorded after its last
    /// copy (the host must not overwrite it before that copy has read it).
    staging: [Option<Pinned>; 2],
    staging_free: [sys::CUevent; 2],
    /// Idle pinned download buffers, and the queued ones by readback id.
    pinned_idle: Vec<Pinned>,
    pinned_busy: HashMap<u64, Pinned>,
    /// Events: the handle and the (stream, number) of the last record.
    events: HashMap<u64, (sys::CUevent, Option<(usize, u64)>)>,
    graphs: HashMap<u64, (sys::CUgraph, sys::CUgraphExec)>,
    capturing: bool,
    /// The events recorded into the capture under way, then per graph: each replay makes them
    /// recorded at the replay's place in the compute stream's bookkeeping.
    capture_events: Vec<u64>,
    graph_events: HashMap<u64, Vec<u64>>,
    sync_each_launch: bool,
    fault: Option<String>,
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
        let (major, minor) = info.compute_capability;
        let arch = nvrtc::arch_for(major.max(0) as u32, minor.max(0) as u32);
        ctx.bind_to_thread().map_err(drv("binding the CUDA context"))?;
        let stream = || result::stream::create(result::stream::StreamKind::NonBlocking).map_err(drv("cuStreamCreate"));
        let streams = [stream()?, stream()?];
        let event = || result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(drv("cuEventCreate"));
        let staging_free = [event()?, event()?];
        Ok(GpuRunner {
            ctx,
            info,
            arch,
            modules: HashMap::new(),
            functions: HashMap::new(),
            allocs: HashSet::new(),
            streams,
            clocks: Default::default(),
            next_id: 0,
            staging: [None, None],
            staging_free,
            pinned_idle: Vec::new(),
            pinned_busy: HashMap::new(),
            events: HashMap::new(),
            graphs: HashMap::new(),
            capturing: false,
            capture_events: Vec::new(),
            graph_events: HashMap::new(),
            sync_each_launch: false,
            fault: None,
        })
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// The crate error for a failed driver call; a sticky one marks the runner as faulted.
    fn fail(&mut self, what: &str, e: result::DriverError) -> Error {
        let msg = format!("{what}: {e}");
        if !is_sticky(&e) {
            return Error::Cuda(msg);
        }
        let f =
            format!("{msg} (sticky: the context is unusable; RETINAFACE_CUDA_SYNC=1 names the kernel that faulted)");
        self.fault.get_or_insert_with(|| f.clone());
        Error::Cuda(f)
    }

    /// Fails once the context is unusable, and binds it to this thread otherwise.
    fn ready(&self, call: &str) -> Result<()> {
        if let Some(f) = &self.fault {
            return Err(Error::Cuda(format!("{call}: {f}")));
        }
        self.bind()
    }

    fn not_capturing(&self, call: &str) -> Result<()> {
        self.ready(call)?;
        if self.capturing { Err(capture_error(call)) } else { Ok(()) }
    }

    /// Waits for the compute stream's work.
    fn sync_stream(&mut self, what: &str) -> Result<()> {
        self.sync_one(Stream::Compute, what)
    }

    fn sync_one(&mut self, s: Stream, what: &str) -> Result<()> {
        // SAFETY: the runner's own live stream.
        match unsafe { result::stream::synchronize(self.streams[s.index()]) } {
            Ok(()) => {
                self.clocks[s.index()].all_done();
                Ok(())
            }
            Err(e) => Err(self.fail(what, e)),
        }
    }

    /// Waits for both streams' work.
    fn sync_both(&mut self, what: &str) -> Result<()> {
        self.sync_one(Stream::Copy, what)?;
        self.sync_one(Stream::Compute, what)
    }

    fn pinned(&mut self, bytes: usize) -> Result<Pinned> {
        // SAFETY: plain page-locked allocation in the bound context.
        let p = unsafe { result::malloc_host(bytes.max(1), sys::CU_MEMHOSTALLOC_PORTABLE) }
            .map_err(|e| self.fail(&format!("cuMemHostAlloc({bytes} bytes)"), e))?;
        Ok(Pinned { ptr: p.cast(), cap: bytes.max(1) })
    }

    fn free_pinned(p: Pinned) {
        // SAFETY: from cuMemHostAlloc, no copy in flight (the caller synchronised or never queued one).
        let _ = unsafe { result::free_host(p.ptr.cast()) };
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

    /// The kernel's function and its dynamic shared memory, loaded on first use.
    fn function(&mut self, kernel: &str) -> Result<(sys::CUfunction, u32)> {
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
        // Above 48 KiB of dynamic shared memory a kernel must opt in once.
        let shared = super::ops::conv_f16::dynamic_shared_bytes(kernel);
        if shared > 48 * 1024 {
            let attr = sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
            // SAFETY: f was just obtained from the loaded module.
            unsafe { result::function::set_function_attribute(f, attr, shared as i32) }.map_err(|e| {
                Error::Cuda(format!("cuFuncSetAttribute({kernel}, max dynamic shared memory {shared} bytes): {e}"))
            })?;
        }
        self.functions.insert(kernel.to_string(), (f, shared));
        Ok((f, shared))
    }
}

// SAFETY: the module, function, stream, event and graph handles belong to the context, not to a
// thread, and every entry point makes the context current on the calling thread first; the pinned
// buffers are plain host memory owned by the runner; `&mut self` keeps two threads from using the
// runner at once.
unsafe impl Send for GpuRunner {}

impl Drop for GpuRunner {
    fn drop(&mut self) {
        if self.bind().is_err() {
            return;
        }
        // SAFETY: the runner's stream; errors at teardown have no one to go to.
        for s in self.streams {
            let _ = unsafe { result::stream::synchronize(s) };
        }
        for (_, (g, x)) in self.graphs.drain() {
            // SAFETY: instantiated by end_capture and not freed.
            let _ = unsafe { result::graph::exec_destroy(x) };
            let _ = unsafe { result::graph::destroy(g) };
        }
        for (_, (e, _)) in self.events.drain() {
            // SAFETY: created by event_create.
            let _ = unsafe { result::event::destroy(e) };
        }
        for e in self.staging_free {
            // SAFETY: created in new.
            let _ = unsafe { result::event::destroy(e) };
        }
        for p in self.staging.iter_mut().filter_map(Option::take).chain(self.pinned_idle.drain(..)) {
            GpuRunner::free_pinned(p);
        }
        for (_, p) in self.pinned_busy.drain() {
            GpuRunner::free_pinned(p);
        }
        for p in self.allocs.drain() {
            // SAFETY: allocated by malloc_sync in this context; errors at teardown have no one to go to.
            let _ = unsafe { result::free_sync(p) };
        }
        for (_, m) in self.modules.drain() {
            // SAFETY: loaded by load_data; functions from it are dropped with self.
            let _ = unsafe { result::module::unload(m) };
        }
        for s in self.streams {
            // SAFETY: created in new; nothing is queued on it any more.
            let _ = unsafe { result::stream::destroy(s) };
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
        self.not_capturing("alloc")?;
        // SAFETY: plain allocation in the bound context.
        let p = unsafe { result::malloc_sync(bytes.max(1)) }
            .map_err(|e| self.fail(&format!("cuMemAlloc({bytes} bytes)"), e))?;
        self.allocs.insert(p);
        Ok(DevBuf { ptr: p, bytes })
    }

    fn free(&mut self, buf: DevBuf) -> Result<()> {
        self.not_capturing("free")?;
        if !self.allocs.contains(&buf.ptr) {
            return Err(Error::Cuda(format!("free of {:#x}, which is not a live allocation", buf.ptr)));
        }
        // Work queued on either stream may still use it.
        self.sync_both("cuStreamSynchronize before cuMemFree")?;
        self.allocs.remove(&buf.ptr);
        // SAFETY: a live allocation of this runner, no longer used by queued work.
        unsafe { result::free_sync(buf.ptr) }.map_err(|e| self.fail("cuMemFree", e))
    }

    fn upload(&mut self, dst: DevBuf, offset: usize, src: &[u8]) -> Result<()> {
        self.not_capturing("upload (synchronous)")?;
        check_range(dst, offset, src.len(), "upload")?;
        // SAFETY: range checked against the allocation. From pageable memory the call returns once
        // `src` has been staged by the driver, so the caller may reuse it.
        unsafe { result::memcpy_htod_async(dst.ptr + offset as u64, src, self.streams[0]) }
            .map_err(|e| self.fail("cuMemcpyHtoDAsync", e))?;
        self.clocks[0].enqueue();
        Ok(())
    }

    fn download(&mut self, src: DevBuf, offset: usize, dst: &mut [u8]) -> Result<()> {
        self.not_capturing("download (synchronous)")?;
        check_range(src, offset, dst.len(), "download")?;
        // SAFETY: range checked against the allocation; the stream is synchronised before `dst` is used.
        unsafe { result::memcpy_dtoh_async(dst, src.ptr + offset as u64, self.streams[0]) }
            .map_err(|e| self.fail("cuMemcpyDtoHAsync", e))?;
        self.sync_stream("cuStreamSynchronize after a download (a kernel may have faulted)")
    }

    fn memset(&mut self, buf: DevBuf, value: u8) -> Result<()> {
        self.ready("memset")?;
        // SAFETY: the whole of a live allocation.
        unsafe { result::memset_d8_async(buf.ptr, value, buf.bytes, self.streams[0]) }
            .map_err(|e| self.fail("cuMemsetD8Async", e))?;
        self.clocks[0].enqueue();
        Ok(())
    }

    fn poison(&mut self, buf: DevBuf) -> Result<()> {
        self.ready("memset (poison)")?;
        // SAFETY: the whole of a live allocation, in 4-byte words.
        unsafe { sys::cuMemsetD32Async(buf.ptr, 0x7fc0_0000, buf.bytes / 4, self.streams[0]) }
            .result()
            .map_err(|e| self.fail("cuMemsetD32Async", e))?;
        self.clocks[0].enqueue();
        Ok(())
    }

    fn launch_raw(&mut self, kernel: &str, dims: LaunchDims, params: &[u8]) -> Result<()> {
        self.ready(&format!("launching {kernel}"))?;
        let (f, shared) = self.function(kernel)?;
        // Each kernel takes one struct by value: kernelParams[0] points at its bytes, which the driver
        // copies at launch time (and into the graph node during a capture).
        let mut args = [params.as_ptr() as *mut c_void];
        let g = (dims.grid[0], dims.grid[1], dims.grid[2]);
        let b = (dims.block[0], dims.block[1], dims.block[2]);
        // SAFETY: f comes from a module compiled from the same common.cuh the params mirror; pointers
        // inside the params are live allocations of this runner (the executor owns them).
        unsafe { result::launch_kernel(f, g, b, shared, self.streams[0], &mut args) }
            .map_err(|e| self.fail(&format!("launching {kernel} grid {g:?} block {b:?}"), e))?;
        self.clocks[0].enqueue();
        if self.sync_each_launch && !self.capturing {
            self.sync_stream("cuStreamSynchronize")
                .map_err(|e| Error::Cuda(format!("kernel {kernel} (grid {g:?} block {b:?}) failed: {e}")))?;
        }
        Ok(())
    }

    fn synchronize(&mut self) -> Result<()> {
        self.not_capturing("synchronize")?;
        self.sync_both("cuStreamSynchronize (a kernel faulted?)")
    }

    fn upload_staged(&mut self, dst: DevBuf, offset: usize, parts: &[&[u8]]) -> Result<()> {
        self.upload_staged_on(Stream::Compute, dst, offset, parts)
    }

    fn download_async(&mut self, src: DevBuf, offset: usize, len: usize) -> Result<Readback> {
        self.download_async_on(Stream::Compute, src, offset, len)
    }

    fn read_back(&mut self, rb: Readback, dst: &mut [u8]) -> Result<()> {
        let p = self
            .pinned_busy
            .remove(&rb.id)
            .ok_or_else(|| Error::Cuda(format!("read_back of an unknown download {}", rb.id)))?;
        let done = self.clocks[rb.stream.index()].is_done(rb.seq);
        let res = if dst.len() != rb.bytes {
            Err(Error::Cuda(format!("read_back of {} bytes into a buffer of {}", rb.bytes, dst.len())))
        } else if !done {
            Err(Error::Cuda("read_back before synchronize: the download was queued and may not have landed yet".into()))
        } else {
            // SAFETY: the copy into p has completed (the stream was synchronised past it).
            dst.copy_from_slice(unsafe { std::slice::from_raw_parts(p.ptr, rb.bytes) });
            Ok(())
        };
        if done {
            self.pinned_idle.push(p);
            if self.pinned_idle.len() > MAX_IDLE_PINNED {
                let smallest = (0..self.pinned_idle.len()).min_by_key(|&i| self.pinned_idle[i].cap).unwrap_or(0);
                GpuRunner::free_pinned(self.pinned_idle.swap_remove(smallest));
            }
        } else {
            // The copy may still land in it: keep it until teardown rather than reuse it.
            let id = self.id();
            self.pinned_busy.insert(id, p);
        }
        res
    }

    fn event_create(&mut self) -> Result<EventId> {
        self.ready("event_create")?;
        let e =
            result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).map_err(|e| self.fail("cuEventCreate", e))?;
        let id = self.id();
        self.events.insert(id, (e, None));
        Ok(EventId(id))
    }

    fn event_record(&mut self, e: EventId) -> Result<()> {
        self.event_record_on(Stream::Compute, e)
    }

    fn event_synchronize(&mut self, e: EventId) -> Result<()> {
        self.not_capturing("event_synchronize")?;
        let (ev, rec) = *self.events.get(&e.0).ok_or_else(|| Error::Cuda(format!("event {} does not exist", e.0)))?;
        // SAFETY: a live event.
        unsafe { result::event::synchronize(ev) }.map_err(|er| self.fail("cuEventSynchronize", er))?;
        if let Some((s, seq)) = rec {
            self.clocks[s].done_to(seq);
        }
        Ok(())
    }

    fn event_elapsed(&mut self, start: EventId, end: EventId) -> Result<std::time::Duration> {
        self.ready("event_elapsed")?;
        let get = |e: EventId| match self.events.get(&e.0) {
            Some((ev, Some((s, seq)))) if self.clocks[*s].is_done(*seq) => Ok(*ev),
            Some((_, Some(_))) => Err(Error::Cuda(format!("event {} has not completed: synchronize first", e.0))),
            Some((_, None)) => Err(Error::Cuda(format!("event {} was never recorded", e.0))),
            None => Err(Error::Cuda(format!("event {} does not exist", e.0))),
        };
        let (a, b) = (get(start)?, get(end)?);
        // SAFETY: two live, completed events of this context.
        let ms = unsafe { result::event::elapsed(a, b) }.map_err(|e| self.fail("cuEventElapsedTime", e))?;
        Ok(std::time::Duration::from_secs_f64(f64::from(ms.max(0.0)) / 1e3))
    }

    fn event_destroy(&mut self, e: EventId) -> Result<()> {
        let (ev, _) = self.events.remove(&e.0).ok_or_else(|| Error::Cuda(format!("event {} does not exist", e.0)))?;
        self.bind()?;
        // SAFETY: a live event, removed from the map.
        unsafe { result::event::destroy(ev) }.map_err(|er| self.fail("cuEventDestroy", er))
    }

    fn begin_capture(&mut self) -> Result<()> {
        self.not_capturing("begin_capture")?;
        // Thread-local mode: only this thread's unsafe calls (cuMemAlloc, synchronous copies) break the
        // capture, so other runners in the process carry on.
        // SAFETY: our stream.
        unsafe {
            result::stream::begin_capture(
                self.streams[0],
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
        }
        .map_err(|e| self.fail("cuStreamBeginCapture", e))?;
        self.capturing = true;
        self.capture_events.clear();
        Ok(())
    }

    fn end_capture(&mut self) -> Result<GraphId> {
        if !self.capturing {
            return Err(Error::Cuda("end_capture without begin_capture".into()));
        }
        self.capturing = false;
        let events = std::mem::take(&mut self.capture_events);
        self.bind()?;
        // SAFETY: our stream, capturing.
        let g =
            unsafe { result::stream::end_capture(self.streams[0]) }.map_err(|e| self.fail("cuStreamEndCapture", e))?;
        // SAFETY: a complete graph from the capture.
        let x = match unsafe { result::graph::instantiate(g, sys::CUgraphInstantiate_flags(0)) } {
            Ok(x) => x,
            Err(e) => {
                // SAFETY: not instantiated; ours to destroy.
                let _ = unsafe { result::graph::destroy(g) };
                return Err(self.fail("cuGraphInstantiate", e));
            }
        };
        let id = self.id();
        self.graphs.insert(id, (g, x));
        self.graph_events.insert(id, events);
        Ok(GraphId(id))
    }

    fn replay(&mut self, g: GraphId) -> Result<()> {
        self.not_capturing("replay")?;
        let (_, x) = *self.graphs.get(&g.0).ok_or_else(|| Error::Cuda(format!("graph {} does not exist", g.0)))?;
        if let Some(e) = self.graph_events.get(&g.0).into_iter().flatten().find(|e| !self.events.contains_key(e)) {
            return Err(Error::Cuda(format!("graph {} records event {e}, which was destroyed", g.0)));
        }
        // SAFETY: an instantiated graph whose buffers the executor keeps alive with it.
        unsafe { result::graph::launch(x, self.streams[0]) }.map_err(|e| self.fail("cuGraphLaunch", e))?;
        let seq = self.clocks[0].enqueue();
        // Its record nodes complete with the graph: their events count as recorded at its place.
        for e in self.graph_events.get(&g.0).into_iter().flatten() {
            if let Some(slot) = self.events.get_mut(e) {
                slot.1 = Some((0, seq));
            }
        }
        if self.sync_each_launch {
            self.sync_stream("cuStreamSynchronize after a graph replay")?;
        }
        Ok(())
    }

    fn free_graph(&mut self, g: GraphId) -> Result<()> {
        self.not_capturing("free_graph")?;
        let (gr, x) = self.graphs.remove(&g.0).ok_or_else(|| Error::Cuda(format!("graph {} does not exist", g.0)))?;
        self.graph_events.remove(&g.0);
        // A replay may still be running.
        self.sync_stream("cuStreamSynchronize before cuGraphExecDestroy")?;
        // SAFETY: instantiated by end_capture, removed from the map, not running.
        unsafe { result::graph::exec_destroy(x) }.map_err(|e| self.fail("cuGraphExecDestroy", e))?;
        // SAFETY: as above.
        unsafe { result::graph::destroy(gr) }.map_err(|e| self.fail("cuGraphDestroy", e))
    }

    fn set_sync_each_launch(&mut self, on: bool) {
        self.sync_each_launch = on;
    }

    fn sync_each_launch(&self) -> bool {
        self.sync_each_launch
    }

    fn fault(&self) -> Option<String> {
        self.fault.clone()
    }

    fn upload_staged_on(&mut self, s: Stream, dst: DevBuf, offset: usize, parts: &[&[u8]]) -> Result<()> {
        self.not_capturing("upload_staged")?;
        let total: usize = parts.iter().map(|p| p.len()).sum();
        check_range(dst, offset, total, "staged upload")?;
        let i = s.index();
        // The previous staged copy of this stream must have read the buffer before the host writes it
        // again.
        // SAFETY: our event; recording it on an idle stream completes at once.
        unsafe { result::event::synchronize(self.staging_free[i]) }.map_err(|e| self.fail("cuEventSynchronize", e))?;
        if self.staging[i].as_ref().is_none_or(|p| p.cap < total) {
            if let Some(old) = self.staging[i].take() {
                GpuRunner::free_pinned(old);
            }
            let p = self.pinned(total.next_power_of_two())?;
            self.staging[i] = Some(p);
        }
        let st = self.staging[i].as_ref().ok_or_else(|| Error::Cuda("staging buffer vanished".into()))?;
        // SAFETY: the staging buffer holds cap >= total bytes and no copy reads it now.
        let host = unsafe { std::slice::from_raw_parts_mut(st.ptr, total) };
        let mut at = 0;
        for p in parts {
            host[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        // SAFETY: pinned source of `total` bytes that stays untouched until staging_free completes.
        unsafe {
            sys::cuMemcpyHtoDAsync_v2(dst.ptr + offset as u64, st.ptr as *const c_void, total, self.streams[i]).result()
        }
        .map_err(|e| self.fail("cuMemcpyHtoDAsync (staged)", e))?;
        // SAFETY: our event and stream.
        unsafe { result::event::record(self.staging_free[i], self.streams[i]) }
            .map_err(|e| self.fail("cuEventRecord", e))?;
        self.clocks[i].enqueue();
        Ok(())
    }

    fn download_async_on(&mut self, s: Stream, src: DevBuf, offset: usize, len: usize) -> Result<Readback> {
        self.not_capturing("download_async")?;
        check_range(src, offset, len, "download")?;
        let pos = self.pinned_idle.iter().enumerate().filter(|(_, p)| p.cap >= len).min_by_key(|(_, p)| p.cap);
        let p = match pos.map(|(i, _)| i) {
            Some(i) => self.pinned_idle.swap_remove(i),
            None => self.pinned(len.next_power_of_two())?,
        };
        // SAFETY: a pinned buffer of cap >= len bytes that nothing else uses until read_back.
        let r = unsafe {
            sys::cuMemcpyDtoHAsync_v2(p.ptr as *mut c_void, src.ptr + offset as u64, len, self.streams[s.index()])
                .result()
        };
        if let Err(e) = r {
            self.pinned_idle.push(p);
            return Err(self.fail("cuMemcpyDtoHAsync", e));
        }
        let id = self.id();
        self.pinned_busy.insert(id, p);
        Ok(Readback { id, seq: self.clocks[s.index()].enqueue(), stream: s, bytes: len })
    }

    fn event_record_on(&mut self, s: Stream, e: EventId) -> Result<()> {
        self.ready("event_record")?;
        let (ev, _) = *self.events.get(&e.0).ok_or_else(|| Error::Cuda(format!("event {} does not exist", e.0)))?;
        if self.capturing {
            if s != Stream::Compute {
                return Err(capture_error("event_record on the copy stream"));
            }
            // EXTERNAL makes the capture add an event record node (a plain record would only order
            // the capture's streams); its time counts from CUDA 11.1, as the event has timing on.
            let flags = sys::CUevent_record_flags::CU_EVENT_RECORD_EXTERNAL as std::ffi::c_uint;
            // SAFETY: a live event and our capturing stream.
            unsafe { sys::cuEventRecordWithFlags(ev, self.streams[0], flags) }
                .result()
                .map_err(|er| self.fail("cuEventRecordWithFlags (capture)", er))?;
            self.capture_events.push(e.0);
            return Ok(());
        }
        // SAFETY: a live event and our stream.
        unsafe { result::event::record(ev, self.streams[s.index()]) }.map_err(|er| self.fail("cuEventRecord", er))?;
        let seq = self.clocks[s.index()].enqueue();
        if let Some(slot) = self.events.get_mut(&e.0) {
            slot.1 = Some((s.index(), seq));
        }
        Ok(())
    }

    fn wait_event(&mut self, s: Stream, e: EventId) -> Result<()> {
        self.not_capturing("wait_event")?;
        let (ev, _) = *self.events.get(&e.0).ok_or_else(|| Error::Cuda(format!("event {} does not exist", e.0)))?;
        // SAFETY: a live event and our stream.
        unsafe {
            result::stream::wait_event(self.streams[s.index()], ev, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT)
        }
        .map_err(|er| self.fail("cuStreamWaitEvent", er))
    }
}
