//! What the graph executor needs from a device: memory, copies and kernel launches. Two
//! implementations: the real GPU ([`super::gpu::GpuRunner`], cudarc + NVRTC) and the CPU simulation
//! ([`super::sim::SimRunner`], the same kernels compiled with g++). The executor is written once over
//! this trait, so the code the tests run in simulation is the code that runs on the GPU.
//!
//! Work is stream-ordered: launches, memsets, staged uploads, queued downloads, event records and
//! graph replays run in the order they were issued, and the host sees their results only after
//! [`KernelRunner::synchronize`] (or [`KernelRunner::event_synchronize`] on an event recorded after
//! them). The simulation runs each call at once but keeps the same bookkeeping, so reading a download
//! too early is an error there as it would be wrong on the GPU.
//!
//! A runner has two streams ([`Stream`]): compute (every call without `_on`) and copy, so that the
//! transfers of one batch overlap the kernels of another. Work on different streams is unordered
//! unless an event orders it ([`KernelRunner::event_record_on`] on one, [`KernelRunner::wait_event`]
//! on the other); the simulation can hold one stream back on purpose
//! ([`super::sim::SimRunner::set_stream_order`]) so that a missing event shows as a wrong result.

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

/// A download queued by [`KernelRunner::download_async`]: the bytes land in pinned host memory and are
/// read with [`KernelRunner::read_back`] once the stream has been synchronised past the copy.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a queued download holds a pinned buffer until read_back"]
pub struct Readback {
    pub(crate) id: u64,
    pub(crate) seq: u64,
    pub(crate) stream: Stream,
    pub bytes: usize,
}

/// The streams of a runner: kernels, memsets and graph replays go to `Compute` (as does every call
/// that names no stream); `Copy` carries the transfers that overlap them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    Compute,
    Copy,
}

impl Stream {
    pub(crate) fn index(self) -> usize {
        match self {
            Stream::Compute => 0,
            Stream::Copy => 1,
        }
    }
}

/// An event of a runner's stream (for ordering and device time).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EventId(pub u64);

/// A captured, instantiated graph of launches and memsets, replayed with [`KernelRunner::replay`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GraphId(pub u64);

pub trait KernelRunner: Send {
    /// "cuda:0 NVIDIA H200 (sm_90)" or "simulation (N CPU threads)".
    fn describe(&self) -> String;
    /// True for the CPU simulation: the executor then poisons scratch memory before each run.
    fn is_simulation(&self) -> bool;
    fn alloc(&mut self, bytes: usize) -> Result<DevBuf>;
    fn free(&mut self, buf: DevBuf) -> Result<()>;
    fn upload(&mut self, dst: DevBuf, offset: usize, src: &[u8]) -> Result<()>;
    fn download(&mut self, src: DevBuf, offset: usize, dst: &mut [u8]) -> Result<()>;
    /// Sets every byte of `buf` to `value` (stream-ordered; captured into a graph during capture).
    fn memset(&mut self, buf: DevBuf, value: u8) -> Result<()>;
    /// Fills `buf` with the f32 NaN pattern 0x7fc00000 (also a recognisable garbage for integers).
    fn poison(&mut self, buf: DevBuf) -> Result<()>;
    /// Launches `kernel` with its one parameter struct given as bytes. The only launch site.
    fn launch_raw(&mut self, kernel: &str, dims: LaunchDims, params: &[u8]) -> Result<()>;
    /// Waits for all launched work; reports asynchronous kernel faults.
    fn synchronize(&mut self) -> Result<()>;

    /// Copies `parts` end to end into a pinned staging buffer and queues one host-to-device copy of
    /// them to `dst` at `offset`: one transfer per batch, which the host may overwrite at once.
    fn upload_staged(&mut self, dst: DevBuf, offset: usize, parts: &[&[u8]]) -> Result<()>;
    /// Queues a copy of `len` bytes of `src` at `offset` into pinned host memory.
    fn download_async(&mut self, src: DevBuf, offset: usize, len: usize) -> Result<Readback>;
    /// The bytes of a queued download, into `dst` (its length); an error before the stream has been
    /// synchronised past the copy, since the bytes may not have landed.
    fn read_back(&mut self, rb: Readback, dst: &mut [u8]) -> Result<()>;

    /// An event with timing on (so [`Self::event_elapsed`] works, also between records in a graph).
    fn event_create(&mut self) -> Result<EventId>;
    /// Records `e` at this point of the stream. During a capture (compute stream only) this becomes a
    /// record node of the graph: `e` is recorded each time a replay reaches it, with the time it is
    /// reached, and not by the capture itself.
    fn event_record(&mut self, e: EventId) -> Result<()>;
    /// Waits until the work before `e`'s last record is done (which completes downloads before it).
    fn event_synchronize(&mut self, e: EventId) -> Result<()>;
    /// Time between two recorded, completed events (the device's clock on the GPU, the host's in the
    /// simulation, where work runs as it is issued).
    fn event_elapsed(&mut self, start: EventId, end: EventId) -> Result<std::time::Duration>;
    fn event_destroy(&mut self, e: EventId) -> Result<()>;

    /// Starts recording launches, memsets and event records into a graph instead of running them. Until
    /// [`Self::end_capture`], synchronous copies, allocations, frees and synchronisation are errors
    /// that name the call.
    fn begin_capture(&mut self) -> Result<()>;
    /// Ends the capture and instantiates what it recorded.
    fn end_capture(&mut self) -> Result<GraphId>;
    /// Queues every recorded launch, memset and event record again, in order, with the parameters they
    /// had. An error if the graph records an event that was destroyed since.
    fn replay(&mut self, g: GraphId) -> Result<()>;
    fn free_graph(&mut self, g: GraphId) -> Result<()>;

    /// With `on`, every launch is followed by a synchronisation and an asynchronous fault is reported
    /// with the kernel that caused it (`RETINAFACE_CUDA_SYNC=1`). Slow; for finding faults.
    fn set_sync_each_launch(&mut self, on: bool);
    fn sync_each_launch(&self) -> bool;
    /// The error that left the device unusable (a sticky CUDA error: every later call fails and
    /// results cannot be trusted), or None while it is healthy.
    fn fault(&self) -> Option<String>;

    /// [`Self::upload_staged`] on stream `s`. A runner with one stream (the default) runs it on that.
    fn upload_staged_on(&mut self, s: Stream, dst: DevBuf, offset: usize, parts: &[&[u8]]) -> Result<()> {
        let _ = s;
        self.upload_staged(dst, offset, parts)
    }
    /// [`Self::download_async`] on stream `s`.
    fn download_async_on(&mut self, s: Stream, src: DevBuf, offset: usize, len: usize) -> Result<Readback> {
        let _ = s;
        self.download_async(src, offset, len)
    }
    /// Records `e` at this point of stream `s`.
    fn event_record_on(&mut self, s: Stream, e: EventId) -> Result<()> {
        let _ = s;
        self.event_record(e)
    }
    /// Makes stream `s` wait, before its later work, for the work before `e`'s last record (on any
    /// stream); an event never recorded is no wait. With one stream everything is in order already.
    fn wait_event(&mut self, s: Stream, e: EventId) -> Result<()> {
        let _ = (s, e);
        Ok(())
    }
}

/// Device time per repetition of `launch` (called `reps` times, at least once) between two events
/// recorded on the runner's stream: the GPU's own clock, so host overheads and other streams do not
/// count (the host's clock in the simulation, where work runs as it is issued).
pub fn time_with_events(
    r: &mut dyn KernelRunner,
    reps: usize,
    mut launch: impl FnMut(&mut dyn KernelRunner) -> Result<()>,
) -> Result<std::time::Duration> {
    let (start, end) = (r.event_create()?, r.event_create()?);
    let timed = (|| {
        r.event_record(start)?;
        for _ in 0..reps.max(1) {
            launch(&mut *r)?;
        }
        r.event_record(end)?;
        r.event_synchronize(end)?;
        r.event_elapsed(start, end)
    })();
    // The events go whatever happened; the first error is the one reported.
    let freed = r.event_destroy(start).and(r.event_destroy(end));
    let total = timed?;
    freed?;
    Ok(total / reps.max(1) as u32)
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

/// Sequence numbers of stream work: what was queued and what the host has seen complete. Both
/// runners keep one, so an early read is the same error on the GPU and in the simulation.
#[derive(Default)]
pub(crate) struct StreamClock {
    queued: u64,
    done: u64,
}

impl StreamClock {
    /// Numbers one more queued operation.
    pub(crate) fn enqueue(&mut self) -> u64 {
        self.queued += 1;
        self.queued
    }
    /// Everything queued so far is complete (after a stream synchronisation).
    pub(crate) fn all_done(&mut self) {
        self.done = self.queued;
    }
    /// Everything up to `seq` is complete (after waiting on an event recorded at `seq`).
    pub(crate) fn done_to(&mut self, seq: u64) {
        self.done = self.done.max(seq);
    }
    pub(crate) fn is_done(&self, seq: u64) -> bool {
        seq <= self.done
    }
}

/// The error for a call the stream capture cannot record.
pub(crate) fn capture_error(call: &str) -> crate::Error {
    crate::Error::Cuda(format!(
        "{call} during graph capture: only launches, memsets and event records on the compute stream can be captured (upload before the capture, download after the replay)"
    ))
}

/// Parses `RETINAFACE_CUDA_SYNC` (unset, 0 or 1).
pub fn sync_from_env() -> Result<bool> {
    match std::env::var("RETINAFACE_CUDA_SYNC") {
        Err(_) => Ok(false),
        Ok(v) if v.is_empty() || v == "0" => Ok(false),
        Ok(v) if v == "1" => Ok(true),
        Ok(v) => Err(crate::Error::InvalidArgument(format!("RETINAFACE_CUDA_SYNC={v:?}: expected 0 or 1"))),
    }
}

pub(crate) fn check_range(buf: DevBuf, offset: usize, len: usize, what: &str) -> Result<()> {
    if offset.checked_add(len).is_none_or(|e| e > buf.bytes) {
        return Err(crate::Error::Cuda(format!(
            "{what}: {len} bytes at offset {offset} overrun a buffer of {} bytes",
            buf.bytes
        )));
    }
    Ok(())
}
