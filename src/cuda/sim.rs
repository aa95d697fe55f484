//! The CPU simulation of the device: kernels/*.cu compiled with g++ against kernels/sim/cuda_sim.h
//! (build.rs), launched through `cudasim_launch`. Memory is host memory aligned like cudaMalloc's.
//!
//! Work runs as it is issued, but the stream's rules are kept: a queued download is readable only
//! after a synchronisation, a capture records launches and memsets (and refuses what a CUDA stream
//! capture refuses), and an injected fault behaves like a sticky CUDA error: reported by a later call,
//! not by the launch that caused it, and by every call after it.

use super::runner::{
    DevBuf, EventId, GraphId, KernelRunner, LaunchDims, Readback, StreamClock, capture_error, check_range,
};
use crate::error::{Error, Result};
use std::alloc::{Layout, alloc, dealloc};
use std::collections::HashMap;
use std::ffi::{CString, c_char, c_int, c_void};
use std::time::Instant;

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

/// One recorded graph node.
enum Node {
    Launch { kernel: String, dims: LaunchDims, params: Vec<u8> },
    Memset { buf: DevBuf, value: u8 },
    Poison { buf: DevBuf },
}

#[derive(Default)]
pub struct SimRunner {
    /// Live allocations: address → layout.
    allocs: HashMap<u64, Layout>,
    clock: StreamClock,
    next_id: u64,
    /// Queued downloads: id → bytes.
    readbacks: HashMap<u64, Vec<u8>>,
    /// Events: id → (host time, stream position) of the last record.
    events: HashMap<u64, Option<(Instant, u64)>>,
    graphs: HashMap<u64, Vec<Node>>,
    capture: Option<Vec<Node>>,
    sync_each_launch: bool,
    /// An injected fault: the kernel and which of its launches (1-based) fails.
    inject: Option<(String, u64)>,
    launches_of_injected: u64,
    /// The sticky error, once a fault has happened.
    fault: Option<String>,
}

impl SimRunner {
    pub fn new() -> SimRunner {
        SimRunner::default()
    }

    /// A runner with the fault of `RETINAFACE_SIM_FAULT` (`KERNEL` or `KERNEL:N`, the Nth launch of
    /// KERNEL) injected, if set: how tests reach the fault paths of the executor and the server.
    pub fn from_env() -> Result<SimRunner> {
        let mut r = SimRunner::new();
        if let Ok(v) = std::env::var("RETINAFACE_SIM_FAULT") {
            let (kernel, nth) = match v.split_once(':') {
                Some((k, n)) => (
                    k,
                    n.parse::<u64>().ok().filter(|&n| n > 0).ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "RETINAFACE_SIM_FAULT={v:?}: the launch number `{n}` is not 1 or more"
                        ))
                    })?,
                ),
                None => (v.as_str(), 1),
            };
            if super::kernels::family_of(kernel).is_none() {
                return Err(Error::InvalidArgument(format!("RETINAFACE_SIM_FAULT={v:?}: no kernel named `{kernel}`")));
            }
            r.inject_fault(kernel, nth);
        }
        Ok(r)
    }

    /// Makes the `nth` launch (from 1) of `kernel` fault like an illegal address on a GPU: the launch
    /// itself succeeds, the next call reports the error, and every call after that fails too.
    pub fn inject_fault(&mut self, kernel: &str, nth: u64) {
        self.inject = Some((kernel.to_string(), nth));
        self.launches_of_injected = 0;
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// The sticky error, named for the call that meets it (as a GPU reports it at the next call).
    fn check_fault(&self, call: &str) -> Result<()> {
        match &self.fault {
            Some(f) => Err(Error::Cuda(format!("{call}: {f}"))),
            None => Ok(()),
        }
    }

    fn not_capturing(&self, call: &str) -> Result<()> {
        self.check_fault(call)?;
        if self.capture.is_some() { Err(capture_error(call)) } else { Ok(()) }
    }

    fn run_launch(&mut self, kernel: &str, dims: LaunchDims, params: &[u8]) -> Result<()> {
        self.check_fault(&format!("launching {kernel}"))?;
        if let Some((k, nth)) = &self.inject
            && k == kernel
        {
            self.launches_of_injected += 1;
            if self.launches_of_injected == *nth {
                self.fault = Some(
                    "simulated CUDA_ERROR_ILLEGAL_ADDRESS: an illegal memory access was encountered (sticky: the context is unusable; RETINAFACE_CUDA_SYNC=1 names the kernel that faulted)"
                        .to_string(),
                );
                self.clock.enqueue();
                return Ok(());
            }
        }
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
        self.clock.enqueue();
        if rc != 0 {
            let end = err.iter().position(|&c| c == 0).unwrap_or(err.len());
            return Err(Error::Cuda(format!("simulated launch of {kernel}: {}", String::from_utf8_lossy(&err[..end]))));
        }
        Ok(())
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
        self.not_capturing("alloc")?;
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
        self.not_capturing("free")?;
        let layout = self
            .allocs
            .remove(&buf.ptr)
            .ok_or_else(|| Error::Cuda(format!("simulation: double free of {:#x}", buf.ptr)))?;
        // SAFETY: allocated with this layout.
        unsafe { dealloc(buf.ptr as *mut u8, layout) };
        Ok(())
    }

    fn upload(&mut self, dst: DevBuf, offset: usize, src: &[u8]) -> Result<()> {
        self.not_capturing("upload (synchronous)")?;
        check_range(dst, offset, src.len(), "upload")?;
        self.slice(dst)?[offset..offset + src.len()].copy_from_slice(src);
        Ok(())
    }

    fn download(&mut self, src: DevBuf, offset: usize, dst: &mut [u8]) -> Result<()> {
        self.not_capturing("download (synchronous)")?;
        // A synchronous copy waits for everything queued before it.
        self.clock.all_done();
        check_range(src, offset, dst.len(), "download")?;
        dst.copy_from_slice(&self.slice(src)?[offset..offset + dst.len()]);
        Ok(())
    }

    fn memset(&mut self, buf: DevBuf, value: u8) -> Result<()> {
        self.check_fault("memset")?;
        if self.capture.is_some() {
            self.slice(buf)?;
            self.capture.get_or_insert_default().push(Node::Memset { buf, value });
            return Ok(());
        }
        self.slice(buf)?.fill(value);
        Ok(())
    }

    fn poison(&mut self, buf: DevBuf) -> Result<()> {
        self.check_fault("memset (poison)")?;
        if self.capture.is_some() {
            self.slice(buf)?;
            self.capture.get_or_insert_default().push(Node::Poison { buf });
            return Ok(());
        }
        let nan = 0x7fc0_0000u32.to_le_bytes();
        for (i, b) in self.slice(buf)?.iter_mut().enumerate() {
            *b = nan[i % 4];
        }
        Ok(())
    }

    fn launch_raw(&mut self, kernel: &str, dims: LaunchDims, params: &[u8]) -> Result<()> {
        if let Some(nodes) = &mut self.capture {
            nodes.push(Node::Launch { kernel: kernel.to_string(), dims, params: params.to_vec() });
            return Ok(());
        }
        self.run_launch(kernel, dims, params)?;
        if self.sync_each_launch {
            self.synchronize().map_err(|e| {
                Error::Cuda(format!("kernel {kernel} (grid {:?} block {:?}) failed: {e}", dims.grid, dims.block))
            })?;
        }
        Ok(())
    }

    fn synchronize(&mut self) -> Result<()> {
        self.not_capturing("synchronize")?;
        self.clock.all_done();
        Ok(())
    }

    fn upload_staged(&mut self, dst: DevBuf, offset: usize, parts: &[&[u8]]) -> Result<()> {
        self.not_capturing("upload_staged")?;
        let total = parts.iter().map(|p| p.len()).sum();
        check_range(dst, offset, total, "staged upload")?;
        let d = &mut self.slice(dst)?[offset..offset + total];
        let mut at = 0;
        for p in parts {
            d[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        self.clock.enqueue();
        Ok(())
    }

    fn download_async(&mut self, src: DevBuf, offset: usize, len: usize) -> Result<Readback> {
        self.not_capturing("download_async")?;
        check_range(src, offset, len, "download")?;
        let bytes = self.slice(src)?[offset..offset + len].to_vec();
        let id = self.id();
        self.readbacks.insert(id, bytes);
        Ok(Readback { id, seq: self.clock.enqueue(), bytes: len })
    }

    fn read_back(&mut self, rb: Readback, dst: &mut [u8]) -> Result<()> {
        let bytes = self
            .readbacks
            .remove(&rb.id)
            .ok_or_else(|| Error::Cuda(format!("simulation: read_back of an unknown download {}", rb.id)))?;
        if dst.len() != bytes.len() {
            return Err(Error::Cuda(format!("read_back of {} bytes into a buffer of {}", bytes.len(), dst.len())));
        }
        if !self.clock.is_done(rb.seq) {
            return Err(Error::Cuda(
                "read_back before synchronize: the download was queued and may not have landed yet".into(),
            ));
        }
        self.check_fault("read_back")?;
        dst.copy_from_slice(&bytes);
        Ok(())
    }

    fn event_create(&mut self) -> Result<EventId> {
        self.check_fault("event_create")?;
        let id = self.id();
        self.events.insert(id, None);
        Ok(EventId(id))
    }

    fn event_record(&mut self, e: EventId) -> Result<()> {
        self.not_capturing("event_record")?;
        let seq = self.clock.enqueue();
        let slot = self.events.get_mut(&e.0).ok_or_else(|| Error::Cuda(format!("event {} does not exist", e.0)))?;
        *slot = Some((Instant::now(), seq));
        Ok(())
    }

    fn event_synchronize(&mut self, e: EventId) -> Result<()> {
        self.not_capturing("event_synchronize")?;
        match self.events.get(&e.0) {
            Some(Some((_, seq))) => {
                self.clock.done_to(*seq);
                Ok(())
            }
            Some(None) => Ok(()),
            None => Err(Error::Cuda(format!("event {} does not exist", e.0))),
        }
    }

    fn event_elapsed(&mut self, start: EventId, end: EventId) -> Result<std::time::Duration> {
        self.check_fault("event_elapsed")?;
        let get = |e: EventId| match self.events.get(&e.0) {
            Some(Some((t, seq))) if self.clock.is_done(*seq) => Ok(*t),
            Some(Some(_)) => Err(Error::Cuda(format!("event {} has not completed: synchronize first", e.0))),
            Some(None) => Err(Error::Cuda(format!("event {} was never recorded", e.0))),
            None => Err(Error::Cuda(format!("event {} does not exist", e.0))),
        };
        let (a, b) = (get(start)?, get(end)?);
        Ok(b.saturating_duration_since(a))
    }

    fn event_destroy(&mut self, e: EventId) -> Result<()> {
        self.events.remove(&e.0).map(|_| ()).ok_or_else(|| Error::Cuda(format!("event {} does not exist", e.0)))
    }

    fn begin_capture(&mut self) -> Result<()> {
        self.not_capturing("begin_capture")?;
        self.capture = Some(Vec::new());
        Ok(())
    }

    fn end_capture(&mut self) -> Result<GraphId> {
        let nodes = self.capture.take().ok_or_else(|| Error::Cuda("end_capture without begin_capture".into()))?;
        self.check_fault("end_capture")?;
        let id = self.id();
        self.graphs.insert(id, nodes);
        Ok(GraphId(id))
    }

    fn replay(&mut self, g: GraphId) -> Result<()> {
        self.not_capturing("replay")?;
        let nodes = self.graphs.remove(&g.0).ok_or_else(|| Error::Cuda(format!("graph {} does not exist", g.0)))?;
        let mut res = Ok(());
        for n in &nodes {
            res = match n {
                Node::Launch { kernel, dims, params } => self.run_launch(kernel, *dims, params),
                Node::Memset { buf, value } => self.memset(*buf, *value),
                Node::Poison { buf } => self.poison(*buf),
            };
            if res.is_err() {
                break;
            }
        }
        self.graphs.insert(g.0, nodes);
        res
    }

    fn free_graph(&mut self, g: GraphId) -> Result<()> {
        self.not_capturing("free_graph")?;
        self.graphs.remove(&g.0).map(|_| ()).ok_or_else(|| Error::Cuda(format!("graph {} does not exist", g.0)))
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
}
