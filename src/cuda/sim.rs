//! The CPU simulation of the device: kernels/*.cu compiled with g++ against kernels/sim/cuda_sim.h
//! (build.rs), launched through `cudasim_launch`. Memory is host memory aligned like cudaMalloc's.
//!
//! Each of the two streams is a queue of work run in order; a wait for an event holds its stream until
//! the other has run the work before the event's record. By default work runs as it is issued (once
//! its waits are met); [`StreamOrder::HoldBack`] holds one stream's work until something needs it, so
//! that work on the other stream that no event orders runs first, and a missing event reads stale or
//! overwritten bytes as it could on a GPU. The stream's rules are kept: a queued download is readable
//! only after a synchronisation, a capture records launches, memsets and event records on the compute stream
//! (and refuses what a CUDA stream capture refuses; a replay records the events with the clock of
//! the moment it runs them), and an injected fault behaves like a sticky CUDA error: reported by a later call,
//! not by the launch that caused it, and by every call after it.

use super::runner::{
    DevBuf, EventId, GraphId, KernelRunner, LaunchDims, Readback, Stream, StreamClock, capture_error, check_range,
};
use crate::error::{Error, Result};
use std::alloc::{Layout, alloc, dealloc};
use std::collections::{HashMap, VecDeque};
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
    fn cudasim_set_dynamic_shared(bytes: u32);
}

/// cudaMalloc aligns to 256 bytes; so do we, so vector loads behave alike.
const ALIGN: usize = 256;

/// Stream work: what a graph records (launches, memsets) and what the streams queue besides.
#[derive(Clone)]
enum Work {
    Launch {
        kernel: String,
        dims: LaunchDims,
        params: Vec<u8>,
    },
    Memset {
        buf: DevBuf,
        value: u8,
    },
    Poison {
        buf: DevBuf,
    },
    /// A host-to-device copy; its bytes were taken from the host when it was queued.
    Write {
        dst: DevBuf,
        offset: usize,
        bytes: Vec<u8>,
    },
    /// A device-to-host copy into the readback `id`; the bytes are taken when it runs.
    Read {
        src: DevBuf,
        offset: usize,
        len: usize,
        id: u64,
    },
    Record {
        event: u64,
    },
    /// Holds the stream until `stream` has run its work numbered up to `seq`.
    Wait {
        stream: usize,
        seq: u64,
    },
}

/// When the simulation runs the work of its two streams. Every order is one the GPU may choose;
/// holding a stream back makes the other's work run before it wherever no event forbids it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StreamOrder {
    /// Work runs as it is issued (once what it waits for has run).
    #[default]
    AsIssued,
    /// This stream's work runs only when something needs it: a host synchronisation, or the other
    /// stream waiting for an event recorded behind it. A read on the other stream that no event
    /// orders after this stream's write then sees the old bytes; a write that no event orders after
    /// this stream's read overwrites what the read was to see.
    HoldBack(Stream),
}

#[derive(Default)]
pub struct SimRunner {
    /// Live allocations: address → layout.
    allocs: HashMap<u64, Layout>,
    /// Per stream: the work queued and not yet run (numbered by its clock), and the number of the
    /// last work run.
    queues: [VecDeque<(u64, Work)>; 2],
    ran: [u64; 2],
    clocks: [StreamClock; 2],
    order: StreamOrder,
    next_id: u64,
    /// Downloads: id → bytes (None until the copy has run).
    readbacks: HashMap<u64, Option<Vec<u8>>>,
    /// Events: id → (stream, number) of the last record and the host time it ran at (None before).
    events: HashMap<u64, Option<(usize, u64, Option<Instant>)>>,
    graphs: HashMap<u64, Vec<Work>>,
    capture: Option<Vec<Work>>,
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

    /// When the two streams' work runs from now on (see [`StreamOrder`]); runs what becomes runnable.
    pub fn set_stream_order(&mut self, order: StreamOrder) -> Result<()> {
        self.order = order;
        self.pump()
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

    /// Queues `work` on stream `s` and runs what may run now; its number on the stream.
    fn enqueue(&mut self, s: Stream, work: Work) -> Result<u64> {
        let seq = self.clocks[s.index()].enqueue();
        self.queues[s.index()].push_back((seq, work));
        self.pump()?;
        Ok(seq)
    }

    fn held_back(&self, s: usize) -> bool {
        matches!(self.order, StreamOrder::HoldBack(h) if h.index() == s)
    }

    /// Whether the next work of stream `s` may run (it is there, and any wait it is has been met).
    fn runnable(&self, s: usize) -> bool {
        match self.queues[s].front() {
            None => false,
            Some((_, Work::Wait { stream, seq })) => self.ran[*stream] >= *seq,
            Some(_) => true,
        }
    }

    /// Runs the work of the streams not held back while any of it may run.
    fn pump(&mut self) -> Result<()> {
        while let Some(s) = (0..2).find(|&s| !self.held_back(s) && self.runnable(s)) {
            self.step(s)?;
        }
        Ok(())
    }

    /// Runs work until `done` holds: the streams not held back first, a held-back one only when
    /// nothing else may run.
    fn run_until(&mut self, done: impl Fn(&SimRunner) -> bool) -> Result<()> {
        while !done(self) {
            let s = (0..2)
                .find(|&s| !self.held_back(s) && self.runnable(s))
                .or_else(|| (0..2).find(|&s| self.runnable(s)))
                .ok_or_else(|| Error::Cuda("simulation: both streams wait and nothing can run".into()))?;
            self.step(s)?;
        }
        Ok(())
    }

    fn drain(&mut self) -> Result<()> {
        self.run_until(|r| r.queues.iter().all(|q| q.is_empty()))
    }

    /// Runs the next work of stream `s`.
    fn step(&mut self, s: usize) -> Result<()> {
        let Some((seq, work)) = self.queues[s].pop_front() else { return Ok(()) };
        self.ran[s] = seq;
        if let Work::Record { event } = work {
            // Only the event's last record stamps it: an earlier one still queued is overwritten.
            if let Some(Some((es, eseq, t))) = self.events.get_mut(&event)
                && (*es, *eseq) == (s, seq)
            {
                *t = Some(Instant::now());
            }
            return Ok(());
        }
        self.run_work(&work)
    }

    fn run_work(&mut self, work: &Work) -> Result<()> {
        match work {
            Work::Launch { kernel, dims, params } => self.run_launch(kernel, *dims, params),
            Work::Memset { buf, value } => {
                self.slice(*buf)?.fill(*value);
                Ok(())
            }
            Work::Poison { buf } => {
                let nan = 0x7fc0_0000u32.to_le_bytes();
                for (i, b) in self.slice(*buf)?.iter_mut().enumerate() {
                    *b = nan[i % 4];
                }
                Ok(())
            }
            Work::Write { dst, offset, bytes } => {
                self.slice(*dst)?[*offset..*offset + bytes.len()].copy_from_slice(bytes);
                Ok(())
            }
            Work::Read { src, offset, len, id } => {
                let bytes = self.slice(*src)?[*offset..*offset + *len].to_vec();
                self.readbacks.insert(*id, Some(bytes));
                Ok(())
            }
            // Stamped by `step`, which knows the record's place in its stream.
            Work::Record { .. } | Work::Wait { .. } => Ok(()),
        }
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
                return Ok(());
            }
        }
        let name = CString::new(kernel).map_err(|_| Error::Cuda(format!("kernel name {kernel:?} contains NUL")))?;
        let mut err = vec![0u8; 1024];
        // SAFETY: the arrays outlive the call; params is the kernel's parameter struct (size checked by
        // the registry against the C sizeof); the kernel's pointers are live allocations of this runner.
        let rc = unsafe {
            cudasim_set_dynamic_shared(super::ops::conv_f16::dynamic_shared_bytes(kernel));
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

    fn slice(&mut self, buf: DevBuf) -> Result<&mut [u8]> {
        if !self.allocs.contains_key(&buf.ptr) {
            return Err(Error::Cuda(format!("simulation: {:#x} is not a live allocation", buf.ptr)));
        }
        // SAFETY: buf.ptr is a live allocation of at least buf.bytes bytes made by alloc below.
        Ok(unsafe { std::slice::from_raw_parts_mut(buf.ptr as *mut u8, buf.bytes) })
    }

    /// Queues a memset-like `work` on the compute stream, or records it during a capture.
    fn memset_work(&mut self, call: &str, buf: DevBuf, work: Work) -> Result<()> {
        self.check_fault(call)?;
        self.slice(buf)?;
        if let Some(nodes) = &mut self.capture {
            nodes.push(work);
            return Ok(());
        }
        self.enqueue(Stream::Compute, work).map(|_| ())
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
        // New device memory holds garbage; the simulation makes it NaN so unwritten reads show. No
        // queued work can use it yet, so this happens at once.
        self.run_work(&Work::Poison { buf: b })?;
        Ok(b)
    }

    fn free(&mut self, buf: DevBuf) -> Result<()> {
        self.not_capturing("free")?;
        // Work queued on either stream may still use it.
        self.drain()?;
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
        self.slice(dst)?;
        // As on the GPU: ordered on the compute stream; the host's bytes are taken now.
        self.enqueue(Stream::Compute, Work::Write { dst, offset, bytes: src.to_vec() }).map(|_| ())
    }

    fn download(&mut self, src: DevBuf, offset: usize, dst: &mut [u8]) -> Result<()> {
        self.not_capturing("download (synchronous)")?;
        check_range(src, offset, dst.len(), "download")?;
        // A synchronous copy waits for everything queued on the compute stream before it.
        let c = Stream::Compute.index();
        self.run_until(|r| r.queues[c].is_empty())?;
        self.clocks[c].all_done();
        dst.copy_from_slice(&self.slice(src)?[offset..offset + dst.len()]);
        Ok(())
    }

    fn memset(&mut self, buf: DevBuf, value: u8) -> Result<()> {
        self.memset_work("memset", buf, Work::Memset { buf, value })
    }

    fn poison(&mut self, buf: DevBuf) -> Result<()> {
        self.memset_work("memset (poison)", buf, Work::Poison { buf })
    }

    fn launch_raw(&mut self, kernel: &str, dims: LaunchDims, params: &[u8]) -> Result<()> {
        let work = Work::Launch { kernel: kernel.to_string(), dims, params: params.to_vec() };
        if let Some(nodes) = &mut self.capture {
            nodes.push(work);
            return Ok(());
        }
        self.enqueue(Stream::Compute, work)?;
        if self.sync_each_launch {
            self.synchronize().map_err(|e| {
                Error::Cuda(format!("kernel {kernel} (grid {:?} block {:?}) failed: {e}", dims.grid, dims.block))
            })?;
        }
        Ok(())
    }

    fn synchronize(&mut self) -> Result<()> {
        self.not_capturing("synchronize")?;
        self.drain()?;
        for c in &mut self.clocks {
            c.all_done();
        }
        self.check_fault("synchronize")
    }

    fn upload_staged(&mut self, dst: DevBuf, offset: usize, parts: &[&[u8]]) -> Result<()> {
        self.upload_staged_on(Stream::Compute, dst, offset, parts)
    }

    fn download_async(&mut self, src: DevBuf, offset: usize, len: usize) -> Result<Readback> {
        self.download_async_on(Stream::Compute, src, offset, len)
    }

    fn read_back(&mut self, rb: Readback, dst: &mut [u8]) -> Result<()> {
        let landed = self
            .readbacks
            .remove(&rb.id)
            .ok_or_else(|| Error::Cuda(format!("simulation: read_back of an unknown download {}", rb.id)))?;
        if dst.len() != rb.bytes {
            return Err(Error::Cuda(format!("read_back of {} bytes into a buffer of {}", rb.bytes, dst.len())));
        }
        let bytes = match landed {
            Some(b) if self.clocks[rb.stream.index()].is_done(rb.seq) => b,
            _ => {
                return Err(Error::Cuda(
                    "read_back before synchronize: the download was queued and may not have landed yet".into(),
                ));
            }
        };
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
        self.event_record_on(Stream::Compute, e)
    }

    fn event_synchronize(&mut self, e: EventId) -> Result<()> {
        self.not_capturing("event_synchronize")?;
        match self.events.get(&e.0) {
            Some(Some((s, seq, _))) => {
                let (s, seq) = (*s, *seq);
                self.run_until(|r| r.ran[s] >= seq)?;
                self.clocks[s].done_to(seq);
                Ok(())
            }
            Some(None) => Ok(()),
            None => Err(Error::Cuda(format!("event {} does not exist", e.0))),
        }
    }

    fn event_elapsed(&mut self, start: EventId, end: EventId) -> Result<std::time::Duration> {
        self.check_fault("event_elapsed")?;
        let get = |e: EventId| match self.events.get(&e.0) {
            Some(Some((s, seq, Some(t)))) if self.clocks[*s].is_done(*seq) => Ok(*t),
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
        let nodes = self.graphs.get(&g.0).ok_or_else(|| Error::Cuda(format!("graph {} does not exist", g.0)))?;
        // A record node of a destroyed event would write a freed event on a GPU.
        if let Some(e) = nodes.iter().find_map(|n| match n {
            Work::Record { event } if !self.events.contains_key(event) => Some(*event),
            _ => None,
        }) {
            return Err(Error::Cuda(format!("graph {} records event {e}, which was destroyed", g.0)));
        }
        let s = Stream::Compute.index();
        // The whole graph is queued before any of it runs, as one launch of it on a GPU; each record
        // node becomes its event's last record, at its place in the stream.
        for n in nodes.clone() {
            let seq = self.clocks[s].enqueue();
            if let Work::Record { event } = n {
                self.events.insert(event, Some((s, seq, None)));
            }
            self.queues[s].push_back((seq, n));
        }
        self.pump()
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

    fn upload_staged_on(&mut self, s: Stream, dst: DevBuf, offset: usize, parts: &[&[u8]]) -> Result<()> {
        self.not_capturing("upload_staged")?;
        let total = parts.iter().map(|p| p.len()).sum();
        check_range(dst, offset, total, "staged upload")?;
        self.slice(dst)?;
        self.enqueue(s, Work::Write { dst, offset, bytes: parts.concat() }).map(|_| ())
    }

    fn download_async_on(&mut self, s: Stream, src: DevBuf, offset: usize, len: usize) -> Result<Readback> {
        self.not_capturing("download_async")?;
        check_range(src, offset, len, "download")?;
        self.slice(src)?;
        let id = self.id();
        self.readbacks.insert(id, None);
        let seq = self.enqueue(s, Work::Read { src, offset, len, id })?;
        Ok(Readback { id, seq, stream: s, bytes: len })
    }

    fn event_record_on(&mut self, s: Stream, e: EventId) -> Result<()> {
        self.check_fault("event_record")?;
        if !self.events.contains_key(&e.0) {
            return Err(Error::Cuda(format!("event {} does not exist", e.0)));
        }
        if let Some(nodes) = &mut self.capture {
            // A record node (CU_EVENT_RECORD_EXTERNAL on a GPU): the event is recorded when a replay
            // reaches it, not now.
            if s != Stream::Compute {
                return Err(capture_error("event_record on the copy stream"));
            }
            nodes.push(Work::Record { event: e.0 });
            return Ok(());
        }
        let seq = self.clocks[s.index()].enqueue();
        let slot = self.events.get_mut(&e.0).ok_or_else(|| Error::Cuda(format!("event {} does not exist", e.0)))?;
        *slot = Some((s.index(), seq, None));
        self.queues[s.index()].push_back((seq, Work::Record { event: e.0 }));
        self.pump()
    }

    fn wait_event(&mut self, s: Stream, e: EventId) -> Result<()> {
        self.not_capturing("wait_event")?;
        match self.events.get(&e.0) {
            // The record's place when the wait is issued, as cuStreamWaitEvent takes it.
            Some(Some((from, seq, _))) => {
                let w = Work::Wait { stream: *from, seq: *seq };
                self.enqueue(s, w).map(|_| ())
            }
            Some(None) => Ok(()),
            None => Err(Error::Cuda(format!("event {} does not exist", e.0))),
        }
    }
}
