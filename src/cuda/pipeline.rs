//! Double-buffered batches: while the compute stream runs batch k, the copy stream uploads batch k+1
//! and downloads the detections of batch k-1. Each plan has two slots (input bytes and
//! post-processing buffers, see `IoSlot`); the arena and the raw outputs are shared, as only the
//! compute stream touches them and it runs one batch after another.
//!
//! Per batch in slot s, two events order the streams:
//! - copy: upload into slot s's input, record `uploaded[s]`;
//!   compute: wait `uploaded[s]`, forward + post-processing (graphs per slot), record `computed[s]`;
//! - copy: wait `computed[s]`, download the counts, then the kept detections.
//!
//! The host reads batch k's detections (waiting for those downloads) before it issues batch k+2 into
//! the same slot, so the copy stream's upload of k+2 follows the download of k, which followed the
//! pass of k: no further event is needed for the slot's reuse.

use super::{BatchInput, GpuEngine, IoSlot, PipelineWait};
use crate::cuda::ops;
use crate::cuda::runner::{EventId, Stream};
use crate::detection::Detection;
use crate::error::{Error, Result};
use crate::exec::{Precision, StreamBatch, check_batch};
use crate::graph::PlanKey;
use crate::image_io::BgrImage;
use crate::post::PostOptions;
use std::collections::VecDeque;

/// The input and post-processing slots of a plan: the fields of its `GpuBufs` (pipelined slot 0,
/// and every other pass), the spare (pipelined slot 1), the batch `stage_input` left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Slot {
    Main,
    Spare,
    Staged,
}

/// A batch issued and not yet read.
enum Pending {
    /// Issued on the streams: its plan, slot and post-processing pass (None: nothing can be kept).
    Queued { key: PlanKey, slot: usize, pass: Option<ops::post::PostPass> },
    /// A path that does not pipeline (f16) ran it at once.
    Done(Vec<Vec<Detection>>),
}

impl GpuEngine {
    /// Test hook: leaves out one cross-stream wait of the pipeline, so a test can show that the
    /// simulation's stream order catches the missing event. Never set outside tests.
    #[doc(hidden)]
    pub fn skip_pipeline_wait(&mut self, w: Option<PipelineWait>) {
        self.skip_wait = w;
    }

    /// Detections of a stream of batches (same-sized network inputs each, image i resized by its
    /// scale, as [`Self::detect_scaled`]), two in flight: batch k+1 is taken from `batches` and
    /// uploaded while batch k runs, and batch k's detections are handed to `done` while k+1 runs.
    /// Results equal [`Self::detect_scaled`]'s, batch by batch, in order.
    pub fn detect_stream<'a>(
        &mut self,
        batches: &mut dyn Iterator<Item = Result<StreamBatch<'a>>>,
        post: &PostOptions,
        done: &mut dyn FnMut(Vec<Vec<Detection>>) -> Result<()>,
    ) -> Result<()> {
        post.validate()?;
        let res = self.run_stream(batches, post, done);
        if res.is_err() {
            // Batches still in flight finish before anything reuses their slots; the first error is
            // the one reported.
            let _ = self.runner.synchronize();
        }
        res
    }

    fn run_stream<'a>(
        &mut self,
        batches: &mut dyn Iterator<Item = Result<StreamBatch<'a>>>,
        post: &PostOptions,
        done: &mut dyn FnMut(Vec<Vec<Detection>>) -> Result<()>,
    ) -> Result<()> {
        let mut pending: VecDeque<Pending> = VecDeque::new();
        let mut slot = 0;
        for b in batches {
            let b = b?;
            let refs: Vec<&BgrImage> = b.images.iter().map(|c| c.as_ref()).collect();
            let (h, w) = check_batch(&refs)?;
            let key = (refs.len(), h, w, false);
            // A batch of another plan waits for those in flight, so no plan is evicted under them.
            if pending.iter().any(|p| matches!(p, Pending::Queued { key: k, .. } if *k != key)) {
                while let Some(p) = pending.pop_front() {
                    done(self.complete(p)?)?;
                }
                slot = 0;
            }
            let resizes: Vec<f32> = b.scales.iter().map(|&s| s as f32).collect();
            pending.push_back(self.submit(&refs, post, &resizes, slot)?);
            slot ^= 1;
            if pending.len() == 2
                && let Some(p) = pending.pop_front()
            {
                done(self.complete(p)?)?;
            }
        }
        while let Some(p) = pending.pop_front() {
            done(self.complete(p)?)?;
        }
        Ok(())
    }

    /// The events of slot `slot`: (uploaded, computed, landed: the last download on the copy stream).
    fn pipe_events(&mut self, slot: usize) -> Result<(EventId, EventId, EventId)> {
        let ev = match self.pipe_events {
            Some(e) => e,
            None => {
                let mut e = [[EventId(0); 3]; 2];
                for s in &mut e {
                    for x in s.iter_mut() {
                        *x = self.runner.event_create()?;
                    }
                }
                self.pipe_events = Some(e);
                e
            }
        };
        Ok((ev[slot][0], ev[slot][1], ev[slot][2]))
    }

    /// Issues one batch into `slot`: the upload on the copy stream, the pass and post-processing on
    /// the compute stream after it. Nothing is waited for.
    fn submit(&mut self, images: &[&BgrImage], post: &PostOptions, resizes: &[f32], slot: usize) -> Result<Pending> {
        if self.precision == Precision::F16 {
            return Ok(Pending::Done(self.detect_scaled(images, post, resizes)?));
        }
        let (h, w) = check_batch(images)?;
        if resizes.len() != images.len() {
            return Err(Error::InvalidArgument(format!(
                "{} resize factors for a batch of {} images",
                resizes.len(),
                images.len()
            )));
        }
        let n = images.len();
        super::dim(n * h * w * 3, "batch elements")?;
        let key = (n, h, w, false);
        let (uploaded, computed, _) = self.pipe_events(slot)?;
        self.plan(key)?;
        let which = if slot == 0 { Slot::Main } else { Slot::Spare };
        let mut other = self.swap_in(key, which)?;
        let res = (|| {
            let bufs = self.plans.buffers(key).ok_or_else(|| Error::Cuda("the pass's plan was evicted".into()))?;
            let input_u8 = bufs.input_u8;
            let parts: Vec<&[u8]> = images.iter().map(|i| i.data.as_slice()).collect();
            self.runner.upload_staged_on(Stream::Copy, input_u8, 0, &parts)?;
            self.runner.event_record_on(Stream::Copy, uploaded)?;
            if self.skip_wait != Some(PipelineWait::ComputeAfterUpload) {
                self.runner.wait_event(Stream::Compute, uploaded)?;
            }
            let heads = self.detect_heads();
            let (_, raw) = self.forward_input(BatchInput::Uploaded(n, h, w), false, heads)?;
            let pass = self.post_launch(key, raw, post, resizes, heads)?;
            self.runner.event_record_on(Stream::Compute, computed)?;
            Ok(Pending::Queued { key, slot, pass })
        })();
        self.swap_out(key, which, &mut other)?;
        res
    }

    /// Makes `slot` the one the pass code reads (the spare is made on first use; a staged batch must
    /// have been staged); returns what [`Self::swap_out`] needs to swap it back.
    pub(super) fn swap_in(&mut self, key: PlanKey, slot: Slot) -> Result<Option<Box<IoSlot>>> {
        let evicted = || Error::Cuda("the pass's plan was evicted".into());
        match slot {
            Slot::Main => return Ok(None),
            Slot::Spare if self.plans.buffers(key).is_some_and(|b| b.spare.is_none()) => {
                let (n, h, w, _) = key;
                let input_u8 = self.runner.alloc(n * h * w * 3)?;
                let spare = IoSlot {
                    input_u8,
                    post: None,
                    graph: None,
                    graph_no_heads: None,
                    timed_graphs: [None; 2],
                    post_graph: None,
                };
                match self.plans.buffers(key) {
                    Some(b) => b.spare = Some(Box::new(spare)),
                    None => {
                        self.runner.free(input_u8)?;
                        return Err(evicted());
                    }
                }
            }
            _ => {}
        }
        let bufs = self.plans.buffers(key).ok_or_else(evicted)?;
        let mut other = match slot {
            Slot::Spare => bufs.spare.take(),
            _ => bufs.staged.take(),
        }
        .ok_or_else(|| {
            Error::InvalidArgument("the staged batch was freed with its plan (evicted): stage it again".into())
        })?;
        bufs.swap_slot(&mut other);
        Ok(Some(other))
    }

    /// Undoes [`Self::swap_in`].
    pub(super) fn swap_out(&mut self, key: PlanKey, slot: Slot, other: &mut Option<Box<IoSlot>>) -> Result<()> {
        if slot == Slot::Main {
            return Ok(());
        }
        let bufs = self.plans.buffers(key).ok_or_else(|| Error::Cuda("the pass's plan was evicted".into()))?;
        let mut o = other.take().ok_or_else(|| Error::Cuda("a swapped slot vanished".into()))?;
        bufs.swap_slot(&mut o);
        match slot {
            Slot::Spare => bufs.spare = Some(o),
            _ => bufs.staged = Some(o),
        }
        Ok(())
    }

    /// Downloads an issued batch's detections on the copy stream (after its pass) and waits for them.
    fn complete(&mut self, p: Pending) -> Result<Vec<Vec<Detection>>> {
        let (key, slot, pass) = match p {
            Pending::Done(d) => return Ok(d),
            Pending::Queued { key, pass: None, .. } => return Ok(vec![Vec::new(); key.0]),
            Pending::Queued { key, slot, pass: Some(pass) } => (key, slot, pass),
        };
        let (_, computed, landed) = self.pipe_events(slot)?;
        let bufs = self.plans.buffers(key).ok_or_else(|| Error::Cuda("the pass's plan was evicted".into()))?;
        let pb = match slot {
            0 => bufs.post.as_ref(),
            _ => bufs.spare.as_ref().and_then(|s| s.post.as_ref()),
        };
        let (det_count, cand) = pb.ok_or_else(|| Error::Cuda("post buffers vanished".into()))?.outputs();
        let r = self.runner.as_mut();
        if self.skip_wait != Some(PipelineWait::DownloadAfterCompute) {
            r.wait_event(Stream::Copy, computed)?;
        }
        let mut counts = vec![0i32; pass.n];
        // Each download waits only for the copy stream (`landed` is recorded behind it), so the
        // compute stream carries on with the next batch meanwhile.
        let rb = r.download_async_on(Stream::Copy, det_count, 0, 4 * pass.n)?;
        r.event_record_on(Stream::Copy, landed)?;
        r.event_synchronize(landed)?;
        r.read_back(rb, bytemuck::cast_slice_mut(&mut counts))?;
        let sizes = ops::post::detection_counts(&counts, pass.max_out)?;
        let total: usize = sizes.iter().sum();
        let mut dets = vec![0.0f32; total * 15];
        let rb = r.download_async_on(Stream::Copy, cand, 0, 4 * dets.len())?;
        r.event_record_on(Stream::Copy, landed)?;
        r.event_synchronize(landed)?;
        r.read_back(rb, bytemuck::cast_slice_mut(&mut dets))?;
        ops::post::unpack(&sizes, &dets, r.is_simulation())
    }
}
