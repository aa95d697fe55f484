//! Per-stage device times of a `retinaface bench` pass on the CUDA executor. Events recorded on the
//! compute stream cut the pass into stretches: preprocessing (the input's upload and the preprocess
//! kernel), one per run of ops of one stage (backbone, FPN + SSH, heads), and post-processing (from
//! the end of the forward pass to the detections on the host). The forward pass's own events are
//! recorded by the op loop, eagerly or into the timed graph of its plan (record nodes, see
//! [`super::runner::KernelRunner::event_record`]), so replayed passes are timed stage by stage too.
//! The stretches are consecutive, so they add up to the time from the first event to the last: the
//! device's timeline, including any time it waits for the host (as for the detection count it reads
//! back before the detections).
//!
//! Only bench passes record these events: the graphs of detection and serving are captured without
//! them (a timed pass captures graphs of its own), so they have no extra nodes.

use super::runner::{EventId, KernelRunner};
use crate::error::{Error, Result};
use crate::exec::{StageClock, Timings};
use crate::graph::{Graph, Stage};

/// What the time between two consecutive events of a timed pass is booked to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stretch {
    Preprocess,
    Ops(Stage),
    Postprocess,
}

fn rank(s: Stage) -> u8 {
    match s {
        Stage::Backbone => 0,
        Stage::Neck => 1,
        Stage::Heads => 2,
    }
}

/// The stage each op of `fused` (`passes::fuse` of `original`) books to: the latest stage of the ops
/// of `original` that wrote the tensors it writes (a fused op writes its steps' outputs, the fused-away
/// ones included). So a fused op that spans a stage boundary books to the stage it ends in, where the
/// fusion passes keep the first step's stage in `op_stages`. None of the fusions spans one today
/// (depthwise + pointwise and inverted residuals are backbone, the FPN lateral + upsample-add and the
/// SSH pair neck); `tests/bench_stages_sim.rs` checks the stages stay in order for every network.
pub fn fused_op_stages(original: &Graph, fused: &Graph) -> Vec<Stage> {
    let mut writer = vec![None; original.tensors.len()];
    for (op, &s) in original.ops.iter().zip(&original.op_stages) {
        for t in op.writes() {
            if let Some(w) = writer.get_mut(t) {
                *w = Some(s);
            }
        }
    }
    fused
        .ops
        .iter()
        .zip(&fused.op_stages)
        .map(|(op, &own)| {
            op.writes()
                .into_iter()
                .filter_map(|t| writer.get(t).copied().flatten())
                .max_by_key(|&s| rank(s))
                .unwrap_or(own)
        })
        .collect()
}

/// Where a forward pass records its events, besides the one before its input is uploaded: before
/// each op of `before_op` (the first op run, which ends preprocessing, and each op run whose stage
/// differs from that of the op run before it) and after the last op run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardMarks {
    pub before_op: Vec<bool>,
    /// What each stretch between consecutive events is, from the event before the upload on: one more
    /// than the forward pass's own events.
    pub stretches: Vec<Stretch>,
}

/// The marks of a forward pass over ops of `stages` (per op) in which op i runs when `runs(i)`.
pub fn forward_marks(stages: &[Stage], runs: impl Fn(usize) -> bool) -> ForwardMarks {
    let mut before_op = vec![false; stages.len()];
    let mut stretches = vec![Stretch::Preprocess];
    let mut last = None;
    for (i, &s) in stages.iter().enumerate() {
        if !runs(i) {
            continue;
        }
        if last != Some(s) {
            before_op[i] = true;
            stretches.push(Stretch::Ops(s));
            last = Some(s);
        }
    }
    ForwardMarks { before_op, stretches }
}

impl ForwardMarks {
    /// The number of events the forward pass records itself.
    pub fn events(&self) -> usize {
        self.stretches.len()
    }
}

/// Records a forward pass's events as its op loop reaches them (none when timing is off).
pub struct Marker<'a> {
    events: &'a [EventId],
    before_op: Vec<bool>,
    next: usize,
}

impl<'a> Marker<'a> {
    pub fn off() -> Marker<'static> {
        Marker { events: &[], before_op: Vec::new(), next: 0 }
    }

    /// A marker recording `events` (as many as `marks` has) at `marks`' places.
    pub fn new(events: &'a [EventId], marks: ForwardMarks) -> Result<Marker<'a>> {
        if events.len() != marks.events() {
            return Err(Error::Cuda(format!(
                "a timed forward pass records {} events, {} were given",
                marks.events(),
                events.len()
            )));
        }
        Ok(Marker { events, before_op: marks.before_op, next: 0 })
    }

    /// Just before op `i`.
    pub fn before(&mut self, r: &mut dyn KernelRunner, i: usize) -> Result<()> {
        if self.before_op.get(i).copied().unwrap_or(false) {
            self.record(r)?;
        }
        Ok(())
    }

    /// After the last op: records the last event and checks that every event was recorded.
    pub fn end(mut self, r: &mut dyn KernelRunner) -> Result<()> {
        if self.events.is_empty() {
            return Ok(());
        }
        self.record(r)?;
        if self.next != self.events.len() {
            return Err(Error::Cuda(format!(
                "a timed forward pass recorded {} of its {} events",
                self.next,
                self.events.len()
            )));
        }
        Ok(())
    }

    fn record(&mut self, r: &mut dyn KernelRunner) -> Result<()> {
        let e = *self
            .events
            .get(self.next)
            .ok_or_else(|| Error::Cuda(format!("a timed forward pass ran out of its {} events", self.events.len())))?;
        self.next += 1;
        r.event_record(e)
    }
}

/// The events of timed passes, made as needed and kept for the engine's life: the timed graphs record
/// them, so they must outlive every graph (a pass always uses them from the first, in the same order,
/// so a graph replays the events it was captured with).
#[derive(Default)]
pub struct StageEvents {
    pool: Vec<EventId>,
}

impl StageEvents {
    /// The first `n` events.
    pub fn first(&mut self, r: &mut dyn KernelRunner, n: usize) -> Result<Vec<EventId>> {
        while self.pool.len() < n {
            self.pool.push(r.event_create()?);
        }
        Ok(self.pool[..n].to_vec())
    }
}

/// Books the time between consecutive `events` (recorded and completed) to `stretches` (one fewer) in
/// `t`, as device times: `t.device` gets the time from the first event to the last.
pub fn book(r: &mut dyn KernelRunner, events: &[EventId], stretches: &[Stretch], t: &mut Timings) -> Result<()> {
    if events.len() != stretches.len() + 1 {
        return Err(Error::Cuda(format!("{} events cannot bound {} stretches", events.len(), stretches.len())));
    }
    for (pair, s) in events.windows(2).zip(stretches) {
        let d = r.event_elapsed(pair[0], pair[1])?;
        *match s {
            Stretch::Preprocess => &mut t.preprocess,
            Stretch::Ops(Stage::Backbone) => &mut t.backbone,
            Stretch::Ops(Stage::Neck) => &mut t.neck,
            Stretch::Ops(Stage::Heads) => &mut t.heads,
            Stretch::Postprocess => &mut t.postprocess,
        } += d;
    }
    if let (Some(&a), Some(&b)) = (events.first(), events.last()) {
        t.device += r.event_elapsed(a, b)?;
    }
    t.stage_clock = StageClock::Device;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use Stage::*;

    #[test]
    fn marks_cut_runs_of_one_stage_and_skip_ops_that_do_not_run() {
        let stages = [Backbone, Backbone, Neck, Neck, Heads, Heads];
        let m = forward_marks(&stages, |_| true);
        assert_eq!(m.before_op, [true, false, true, false, true, false]);
        assert_eq!(m.stretches, [Stretch::Preprocess, Stretch::Ops(Backbone), Stretch::Ops(Neck), Stretch::Ops(Heads)]);
        assert_eq!(m.events(), 4);
        // The detect path's forward pass leaves the heads to post-processing.
        let m = forward_marks(&stages, |i| i < 4);
        assert_eq!(m.before_op, [true, false, true, false, false, false]);
        assert_eq!(m.stretches, [Stretch::Preprocess, Stretch::Ops(Backbone), Stretch::Ops(Neck)]);
        // A stage that comes back opens a stretch of its own, booked to it again.
        let m = forward_marks(&[Backbone, Neck, Backbone], |_| true);
        assert_eq!(m.stretches[1..], [Stretch::Ops(Backbone), Stretch::Ops(Neck), Stretch::Ops(Backbone)]);
    }
}
