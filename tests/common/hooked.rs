//! A runner that forwards every call to another and reports some of them to the test: the launches
//! issued one by one (a graph replay issues none) and the event records, with whether a capture was
//! under way (a record node of the graph) or not. Every method is forwarded, the stream-naming ones
//! too, so the wrapped runner behaves exactly as the runner it wraps.

use retinaface::Result;
use retinaface::cuda::runner::{EventId, GraphId, Readback};
use retinaface::cuda::{DevBuf, KernelRunner, LaunchDims, Stream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

type OnLaunch = Box<dyn FnMut(&str) + Send>;
type OnRecord = Box<dyn FnMut(EventId, bool) + Send>;

pub struct Hooked<R> {
    inner: R,
    on_launch: OnLaunch,
    on_record: OnRecord,
    capturing: bool,
}

impl<R: KernelRunner> Hooked<R> {
    pub fn new(inner: R) -> Hooked<R> {
        Hooked { inner, on_launch: Box::new(|_| {}), on_record: Box::new(|_, _| {}), capturing: false }
    }

    /// Called with the kernel's name before each launch is forwarded.
    pub fn on_launch(mut self, f: impl FnMut(&str) + Send + 'static) -> Hooked<R> {
        self.on_launch = Box::new(f);
        self
    }

    /// Called with the event and whether a capture is under way before each record is forwarded.
    pub fn on_record(mut self, f: impl FnMut(EventId, bool) + Send + 'static) -> Hooked<R> {
        self.on_record = Box::new(f);
        self
    }
}

/// `inner` counting the launches it is given one by one.
pub fn counting_launches<R: KernelRunner>(inner: R) -> (Hooked<R>, Arc<AtomicUsize>) {
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    (
        Hooked::new(inner).on_launch(move |_| {
            c.fetch_add(1, Ordering::Relaxed);
        }),
        count,
    )
}

impl<R: KernelRunner> KernelRunner for Hooked<R> {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn is_simulation(&self) -> bool {
        self.inner.is_simulation()
    }
    fn alloc(&mut self, bytes: usize) -> Result<DevBuf> {
        self.inner.alloc(bytes)
    }
    fn free(&mut self, buf: DevBuf) -> Result<()> {
        self.inner.free(buf)
    }
    fn upload(&mut self, dst: DevBuf, offset: usize, src: &[u8]) -> Result<()> {
        self.inner.upload(dst, offset, src)
    }
    fn download(&mut self, src: DevBuf, offset: usize, dst: &mut [u8]) -> Result<()> {
        self.inner.download(src, offset, dst)
    }
    fn memset(&mut self, buf: DevBuf, value: u8) -> Result<()> {
        self.inner.memset(buf, value)
    }
    fn poison(&mut self, buf: DevBuf) -> Result<()> {
        self.inner.poison(buf)
    }
    fn launch_raw(&mut self, kernel: &str, dims: LaunchDims, params: &[u8]) -> Result<()> {
        (self.on_launch)(kernel);
        self.inner.launch_raw(kernel, dims, params)
    }
    fn synchronize(&mut self) -> Result<()> {
        self.inner.synchronize()
    }
    fn upload_staged(&mut self, dst: DevBuf, offset: usize, parts: &[&[u8]]) -> Result<()> {
        self.inner.upload_staged(dst, offset, parts)
    }
    fn download_async(&mut self, src: DevBuf, offset: usize, len: usize) -> Result<Readback> {
        self.inner.download_async(src, offset, len)
    }
    fn read_back(&mut self, rb: Readback, dst: &mut [u8]) -> Result<()> {
        self.inner.read_back(rb, dst)
    }
    fn event_create(&mut self) -> Result<EventId> {
        self.inner.event_create()
    }
    fn event_record(&mut self, e: EventId) -> Result<()> {
        (self.on_record)(e, self.capturing);
        self.inner.event_record(e)
    }
    fn event_synchronize(&mut self, e: EventId) -> Result<()> {
        self.inner.event_synchronize(e)
    }
    fn event_elapsed(&mut self, start: EventId, end: EventId) -> Result<Duration> {
        self.inner.event_elapsed(start, end)
    }
    fn event_destroy(&mut self, e: EventId) -> Result<()> {
        self.inner.event_destroy(e)
    }
    fn begin_capture(&mut self) -> Result<()> {
        self.inner.begin_capture()?;
        self.capturing = true;
        Ok(())
    }
    fn end_capture(&mut self) -> Result<GraphId> {
        self.capturing = false;
        self.inner.end_capture()
    }
    fn replay(&mut self, g: GraphId) -> Result<()> {
        self.inner.replay(g)
    }
    fn free_graph(&mut self, g: GraphId) -> Result<()> {
        self.inner.free_graph(g)
    }
    fn set_sync_each_launch(&mut self, on: bool) {
        self.inner.set_sync_each_launch(on)
    }
    fn sync_each_launch(&self) -> bool {
        self.inner.sync_each_launch()
    }
    fn fault(&self) -> Option<String> {
        self.inner.fault()
    }
    fn upload_staged_on(&mut self, s: Stream, dst: DevBuf, offset: usize, parts: &[&[u8]]) -> Result<()> {
        self.inner.upload_staged_on(s, dst, offset, parts)
    }
    fn download_async_on(&mut self, s: Stream, src: DevBuf, offset: usize, len: usize) -> Result<Readback> {
        self.inner.download_async_on(s, src, offset, len)
    }
    fn event_record_on(&mut self, s: Stream, e: EventId) -> Result<()> {
        (self.on_record)(e, self.capturing);
        self.inner.event_record_on(s, e)
    }
    fn wait_event(&mut self, s: Stream, e: EventId) -> Result<()> {
        self.inner.wait_event(s, e)
    }
}
