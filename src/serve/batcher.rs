//! The dynamic batcher, after Triton's: admitted requests wait in per-size buckets; one executor
//! thread takes a batch from a bucket when it holds `max_batch` requests or when its oldest request
//! has waited `max_queue_delay`, runs it as one forward pass and answers every request in it.
//!
//! Buckets are keyed by the exact network input size (after `--resize`). Images of different sizes
//! are never padded or resized to share a batch: padding changes what the convolutions see at the
//! borders and the anchors, so detections would differ from those of the image run alone. Clients
//! that want batching across a mixed stream should send images of a few fixed sizes, or run with
//! `--resize long-side:N` so that images of one aspect ratio share a size.
//!
//! On a CUDA backend the executor streams batches (`Engine::detect_stream`): while one batch runs on
//! the device, the next one that is ready (full, or due) is taken and uploaded, and the first one's
//! detections come back while the second runs. A batch that is not ready yet is not waited for: the
//! stream ends and the batches in flight are answered.
//!
//! Admission is bounded: a request takes a slot before its body is decoded and gives it back when
//! its batch starts, when it fails, or when it is withdrawn; with every slot taken the next request
//! is refused at once (503) instead of queueing without bound.

use super::memory::{self, ForwardModel};
use super::metrics::Metrics;
use crate::detection::Detection;
use crate::engine::{Backend, DetectOptions, Engine, StreamBatch, Timings};
use crate::image_io::BgrImage;
use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Why a queued request got no detections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecError {
    /// It waited longer than the queue timeout and was not run.
    QueueTimeout,
    /// The server is shutting down and no longer takes requests.
    ShuttingDown,
    /// The engine failed on the batch.
    Backend(String),
    /// The device failed for good (a sticky fault): the server takes no more work and exits.
    Unhealthy(String),
}

type Reply = std::result::Result<Vec<Detection>, ExecError>;

struct Job {
    id: u64,
    image: BgrImage,
    /// Factor the original image was scaled by to make `image` (1 at original size).
    scale: f64,
    enqueued: Instant,
    deadline: Option<Instant>,
    reply: oneshot::Sender<Reply>,
    /// Held while queued; dropped when the batch starts, so `--max-queue` bounds waiting requests
    /// and Triton's pending count excludes the ones executing.
    slot: Option<Slot>,
    /// The request's share of `--max-memory`, held until its batch has run.
    _memory: Option<Arc<memory::Reservation>>,
}

type Key = (usize, usize);

#[derive(Default)]
struct State {
    buckets: HashMap<Key, VecDeque<Job>>,
    shutdown: bool,
    /// Why the engine became unusable, once it did.
    fault: Option<String>,
}

/// Test-only hook: while closed, the executor takes nothing from the queue, as if every worker were
/// busy. Lets tests fill the queue deterministically; never set by the CLI.
#[derive(Default)]
pub struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
}

impl Gate {
    pub fn closed() -> Arc<Gate> {
        Arc::new(Gate::default())
    }
    pub fn open(&self) {
        *lock(&self.open) = true;
        self.cv.notify_all();
    }
    fn wait(&self) {
        let mut g = lock(&self.open);
        while !*g {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// A poisoned lock only means another thread panicked while holding it; the queue's invariants hold
/// between statements, so carrying on is safe and better than taking the whole server down.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct Batcher {
    state: Mutex<State>,
    cv: Condvar,
    admitted: Arc<AtomicUsize>,
    next_id: AtomicU64,
    max_batch: usize,
    max_delay: Duration,
    max_queue: usize,
    queue_timeout: Option<Duration>,
    metrics: Arc<Metrics>,
    forward: ForwardModel,
    /// After a batch whose forward pass may take this many bytes or more, the engine's spare buffers
    /// are dropped and freed memory handed back to the OS once the queue is empty.
    release_above: u64,
}

/// One admitted request's place in the bounded queue; given back on drop.
pub struct Slot {
    admitted: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.admitted.fetch_sub(1, Ordering::AcqRel);
        self.metrics.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Batcher {
    pub fn new(
        max_batch: usize,
        max_delay: Duration,
        max_queue: usize,
        queue_timeout: Option<Duration>,
        metrics: Arc<Metrics>,
        forward: ForwardModel,
        release_above: u64,
    ) -> Arc<Batcher> {
        Arc::new(Batcher {
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            admitted: Arc::new(AtomicUsize::new(0)),
            next_id: AtomicU64::new(0),
            max_batch,
            max_delay,
            max_queue,
            queue_timeout,
            metrics,
            forward,
            release_above,
        })
    }

    /// Takes `n` slots at once (a request with n images), or none if fewer are free.
    pub fn admit(&self, n: usize) -> Option<Vec<Slot>> {
        let mut cur = self.admitted.load(Ordering::Acquire);
        loop {
            if cur + n > self.max_queue {
                return None;
            }
            match self.admitted.compare_exchange_weak(cur, cur + n, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(v) => cur = v,
            }
        }
        self.metrics.pending.fetch_add(n as u64, Ordering::Relaxed);
        Some((0..n).map(|_| Slot { admitted: self.admitted.clone(), metrics: self.metrics.clone() }).collect())
    }

    /// Queues a decoded image. `admitted_at` starts the queue timeout (admission, not end of decode,
    /// so a slow decode counts against it too).
    pub fn submit(
        self: &Arc<Self>,
        slot: Slot,
        image: BgrImage,
        scale: f64,
        admitted_at: Instant,
        memory: Option<Arc<memory::Reservation>>,
    ) -> Ticket {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let key = (image.width, image.height);
        let (tx, rx) = oneshot::channel();
        let deadline = self.queue_timeout.map(|t| admitted_at + t);
        let mut st = lock(&self.state);
        if let Some(f) = &st.fault {
            let _ = tx.send(Err(ExecError::Unhealthy(f.clone())));
        } else if st.shutdown {
            let _ = tx.send(Err(ExecError::ShuttingDown));
        } else {
            st.buckets.entry(key).or_default().push_back(Job {
                id,
                image,
                scale,
                enqueued: Instant::now(),
                deadline,
                reply: tx,
                slot: Some(slot),
                _memory: memory,
            });
            self.cv.notify_all();
        }
        drop(st);
        Ticket { batcher: self.clone(), id, key, deadline, rx, settled: false }
    }

    /// Removes a job that is still queued; false if the executor already took it.
    fn withdraw(&self, key: Key, id: u64) -> bool {
        let mut st = lock(&self.state);
        let Some(q) = st.buckets.get_mut(&key) else { return false };
        let Some(pos) = q.iter().position(|j| j.id == id) else { return false };
        q.remove(pos);
        if q.is_empty() {
            st.buckets.remove(&key);
        }
        true
    }

    /// Why the engine became unusable, if it did (the server then answers 503 and exits non-zero).
    pub fn fault(&self) -> Option<String> {
        lock(&self.state).fault.clone()
    }

    /// The engine cannot be trusted any more: answer every queued request with the fault and stop,
    /// so the executor loop returns and the server exits for its orchestrator to restart it.
    fn fail_device(&self, fault: String) {
        let mut st = lock(&self.state);
        tracing::error!(error = %fault, "the device is unusable: refusing all work and stopping");
        for (_, q) in st.buckets.drain() {
            for job in q {
                let _ = job.reply.send(Err(ExecError::Unhealthy(fault.clone())));
            }
        }
        st.fault = Some(fault);
        st.shutdown = true;
        self.cv.notify_all();
    }

    /// Stops taking requests; the executor finishes what is queued, then returns.
    pub fn shutdown(&self) {
        lock(&self.state).shutdown = true;
        self.cv.notify_all();
    }

    /// The executor loop: blocks the calling thread until shutdown and an empty queue.
    ///
    /// After a large batch the engine keeps its buffers while more batches wait (they reuse them);
    /// once the queue is empty they are dropped and freed memory handed back to the OS, so resident
    /// memory falls back when the burst is over.
    pub fn run_executor(&self, engine: &Engine, opts: &DetectOptions, gate: Option<&Gate>) {
        let mut holding_large = false;
        let release = |why: &str| {
            if let Err(e) = engine.release_spare_buffers() {
                tracing::warn!(error = %e, "releasing the engine's buffers failed");
            }
            memory::return_freed_memory();
            tracing::debug!(rss = memory::resident_bytes(), why, "memory released");
        };
        loop {
            if let Some(g) = gate {
                g.wait();
            }
            if holding_large && lock(&self.state).buckets.is_empty() {
                release("queue empty after a large batch");
                holding_large = false;
            }
            let Some(jobs) = self.next_batch() else {
                if holding_large {
                    release("shutdown");
                }
                return;
            };
            let (w, h) = jobs.first().map_or((0, 0), |j| (j.image.width, j.image.height));
            holding_large |= self.forward.bytes(h, w).saturating_mul(jobs.len() as u64) >= self.release_above;
            // The test gate holds the executor between batches, which a stream would not.
            if gate.is_none() && matches!(engine.backend(), Backend::Cuda | Backend::CudaSim) {
                holding_large |= self.execute_stream(engine, opts, jobs);
            } else {
                self.execute(engine, opts, jobs);
            }
        }
    }

    /// Waits for the next batch; None once shut down with nothing left.
    fn next_batch(&self) -> Option<Vec<Job>> {
        self.take_batch(true)
    }

    /// The next batch if one is ready now (full, or its oldest request due), without waiting.
    fn ready_batch(&self) -> Option<Vec<Job>> {
        self.take_batch(false)
    }

    /// The next batch; with `wait`, waits for one (None once shut down with nothing left), else None
    /// when none is ready now.
    fn take_batch(&self, wait: bool) -> Option<Vec<Job>> {
        let mut st = lock(&self.state);
        loop {
            let now = Instant::now();
            // The bucket to serve next: among full buckets, else among all, the one whose head
            // has waited longest (first come, first served across sizes).
            let mut best: Option<(Key, Instant, bool)> = None;
            for (k, q) in &st.buckets {
                let Some(head) = q.front() else { continue };
                let full = q.len() >= self.max_batch;
                let better = match best {
                    None => true,
                    Some((_, t, f)) => (full && !f) || (full == f && head.enqueued < t),
                };
                if better {
                    best = Some((*k, head.enqueued, full));
                }
            }
            match best {
                None if st.shutdown || !wait => return None,
                None => st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner()),
                Some((key, oldest, full)) => {
                    let due = oldest + self.max_delay;
                    if full || now >= due || st.shutdown {
                        let q = st.buckets.get_mut(&key)?;
                        let n = q.len().min(self.max_batch);
                        let taken: Vec<Job> = q.drain(..n).collect();
                        if q.is_empty() {
                            st.buckets.remove(&key);
                        }
                        // Expired or abandoned requests are answered here and never run.
                        let mut batch = Vec::with_capacity(taken.len());
                        for mut job in taken {
                            job.slot = None;
                            if job.reply.is_closed() {
                                continue;
                            }
                            if job.deadline.is_some_and(|d| now >= d) {
                                let _ = job.reply.send(Err(ExecError::QueueTimeout));
                                continue;
                            }
                            batch.push(job);
                        }
                        if !batch.is_empty() {
                            return Some(batch);
                        }
                    } else if !wait {
                        return None;
                    } else {
                        st = self.cv.wait_timeout(st, due - now).map(|r| r.0).unwrap_or_else(|p| p.into_inner().0);
                    }
                }
            }
        }
    }

    fn execute(&self, engine: &Engine, opts: &DetectOptions, jobs: Vec<Job>) {
        let start = Instant::now();
        let queue_us: u64 = jobs.iter().map(|j| start.duration_since(j.enqueued).as_micros() as u64).sum();
        self.metrics.queue_duration_us.fetch_add(queue_us, Ordering::Relaxed);
        // A panic in the engine must not kill the only executor thread: every later request would hang.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_batch(engine, opts, &jobs)));
        let result = match result {
            Ok(r) => r,
            Err(_) => Err("the engine panicked on this batch".to_string()),
        };
        match result {
            Ok((dets, t)) => {
                self.answered(&jobs, start, Some(&t));
                for (job, d) in jobs.into_iter().zip(dets) {
                    let _ = job.reply.send(Ok(d));
                }
            }
            Err(msg) => self.failed(engine, jobs, &msg),
        }
    }
}

/// A batch in flight in a stream: its jobs (their images handed to the engine) and when it was issued.
struct Issued {
    jobs: Vec<Job>,
    start: Instant,
}

impl Batcher {
    /// Runs `first` and every batch ready while the ones before it run, two in flight, through
    /// `Engine::detect_stream`; answers each as its detections come back. Returns whether a batch
    /// was large (see `release_above`).
    fn execute_stream(&self, engine: &Engine, opts: &DetectOptions, first: Vec<Job>) -> bool {
        let inflight: std::cell::RefCell<VecDeque<Issued>> = Default::default();
        let large = std::cell::Cell::new(false);
        let mut first = Some(first);
        let mut batches = std::iter::from_fn(|| {
            let mut jobs = first.take().or_else(|| self.ready_batch())?;
            let start = Instant::now();
            let queue_us: u64 = jobs.iter().map(|j| start.duration_since(j.enqueued).as_micros() as u64).sum();
            self.metrics.queue_duration_us.fetch_add(queue_us, Ordering::Relaxed);
            let (w, h) = (jobs[0].image.width, jobs[0].image.height);
            if self.forward.bytes(h, w).saturating_mul(jobs.len() as u64) >= self.release_above {
                large.set(true);
            }
            // The engine copies the images into its staging buffer when it issues the batch; the
            // jobs keep only their sizes.
            let images = jobs
                .iter_mut()
                .map(|j| {
                    let empty = BgrImage { width: j.image.width, height: j.image.height, data: Vec::new() };
                    Cow::Owned(std::mem::replace(&mut j.image, empty))
                })
                .collect();
            let scales = jobs.iter().map(|j| j.scale).collect();
            inflight.borrow_mut().push_back(Issued { jobs, start });
            Some(Ok(StreamBatch { images, scales }))
        });
        let mut done = |dets: Vec<Vec<Detection>>| {
            let Some(b) = inflight.borrow_mut().pop_front() else {
                return Err(crate::Error::Cuda("the stream answered a batch it was not given".into()));
            };
            self.answered(&b.jobs, b.start, None);
            for (job, d) in b.jobs.into_iter().zip(dets) {
                let _ = job.reply.send(Ok(d));
            }
            Ok(())
        };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            engine.detect_stream(&mut batches, &opts.post, &mut done)
        }));
        let msg = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("the engine panicked on this batch".to_string()),
        };
        if let Some(msg) = msg {
            for b in inflight.borrow_mut().drain(..) {
                self.failed(engine, b.jobs, &msg);
            }
        }
        large.get()
    }

    /// Metrics and the log line of a batch that ran.
    /// `t`: the engine's stage times; a streamed batch has none, its compute time is the time from
    /// its issue to its answer.
    fn answered(&self, jobs: &[Job], start: Instant, t: Option<&Timings>) {
        let m = &self.metrics;
        m.exec_count.fetch_add(1, Ordering::Relaxed);
        m.inference_count.fetch_add(jobs.len() as u64, Ordering::Relaxed);
        let n = jobs.len() as u64;
        // Triton adds a batch's compute time once per request in it.
        let infer = t.map_or_else(|| start.elapsed(), |t| t.backbone + t.neck + t.heads);
        let t = t.copied().unwrap_or_default();
        m.compute_input_duration_us.fetch_add(t.preprocess.as_micros() as u64 * n, Ordering::Relaxed);
        m.compute_infer_duration_us.fetch_add(infer.as_micros() as u64 * n, Ordering::Relaxed);
        m.compute_output_duration_us.fetch_add(t.postprocess.as_micros() as u64 * n, Ordering::Relaxed);
        tracing::debug!(
            batch = jobs.len(),
            width = jobs[0].image.width,
            height = jobs[0].image.height,
            ms = start.elapsed().as_secs_f64() * 1e3,
            "batch done"
        );
    }

    /// Answers the jobs of a failed batch; a fault that left the device unusable fails everything
    /// after it too.
    fn failed(&self, engine: &Engine, jobs: Vec<Job>, msg: &str) {
        tracing::error!(batch = jobs.len(), error = %msg, "batch failed");
        // The fault is recorded before anyone hears of it, so a probe after an answer sees 503.
        let fault = engine.healthy().err().map(|e| e.to_string());
        if let Some(f) = &fault {
            self.fail_device(f.clone());
        }
        for job in jobs {
            let e = match &fault {
                Some(f) => ExecError::Unhealthy(f.clone()),
                None => ExecError::Backend(msg.to_string()),
            };
            let _ = job.reply.send(Err(e));
        }
    }
}

/// The same call `Engine::detect_batch` makes on already-resized inputs, on the engine's backend, so a
/// batched request gets exactly what `retinaface detect` gives for the image alone.
fn run_batch(engine: &Engine, opts: &DetectOptions, jobs: &[Job]) -> Result<(Vec<Vec<Detection>>, Timings), String> {
    let mut t = Timings::default();
    let images: Vec<&BgrImage> = jobs.iter().map(|j| &j.image).collect();
    let scales: Vec<f64> = jobs.iter().map(|j| j.scale).collect();
    let dets = engine.detect_resized(&images, &scales, &opts.post, Some(&mut t)).map_err(|e| e.to_string())?;
    Ok((dets, t))
}

/// A queued request's claim on its answer. Dropping it before the answer (the client went away, the
/// handler was cancelled) withdraws the request if it has not started, so it never runs.
pub struct Ticket {
    batcher: Arc<Batcher>,
    id: u64,
    key: Key,
    deadline: Option<Instant>,
    rx: oneshot::Receiver<Reply>,
    settled: bool,
}

impl Ticket {
    /// Waits for the answer. At the queue deadline a request still queued is withdrawn and answered
    /// `QueueTimeout`; one already running is waited for (it is out of the queue).
    pub async fn wait(mut self) -> Reply {
        let r = match self.deadline {
            None => (&mut self.rx).await,
            Some(d) => match tokio::time::timeout_at(d.into(), &mut self.rx).await {
                Ok(r) => r,
                Err(_) => {
                    if self.batcher.withdraw(self.key, self.id) {
                        self.settled = true;
                        return Err(ExecError::QueueTimeout);
                    }
                    (&mut self.rx).await
                }
            },
        };
        self.settled = true;
        // The sender is dropped without a reply only when the executor skipped the job, which it does
        // for abandoned tickets; a live ticket never sees this, but answer rather than panic.
        r.unwrap_or(Err(ExecError::ShuttingDown))
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.settled && self.batcher.withdraw(self.key, self.id) {
            self.batcher.metrics.fail(super::metrics::FailureReason::Canceled);
            tracing::info!(id = self.id, "client went away; request withdrawn before it ran");
        }
    }
}
