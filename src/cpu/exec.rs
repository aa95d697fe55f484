//! Runs a graph on the CPU reference ops.

use super::ops;
use crate::model::graph::{Graph, Op, Stage, TensorId};
use std::time::{Duration, Instant};

/// Every tensor of one forward pass that is still alive at its end: the taps, and everything when
/// `keep_all` was asked for. Each is [n, c, h, w].
pub struct Activations {
    pub n: usize,
    pub input_h: usize,
    pub input_w: usize,
    pub tensors: Vec<Option<Vec<f32>>>,
}

impl Activations {
    pub fn get(&self, t: TensorId) -> Option<&[f32]> {
        self.tensors[t].as_deref()
    }
}

/// Spare f32 buffers kept between passes.
#[derive(Default)]
pub struct BufferPool {
    free: Vec<Vec<f32>>,
}

/// More buffers than any network here has tensors alive at once, times a few batch shapes.
const POOL_MAX_BUFFERS: usize = 256;

impl BufferPool {
    /// The smallest spare buffer that holds `len` values, resized to `len` (its old values stay; only
    /// growth is zero-filled), or a new one.
    pub fn take(&mut self, len: usize) -> Vec<f32> {
        let best =
            (0..self.free.len()).filter(|&i| self.free[i].capacity() >= len).min_by_key(|&i| self.free[i].capacity());
        match best {
            Some(i) => {
                let mut v = self.free.swap_remove(i);
                v.resize(len, 0.0);
                v
            }
            None => vec![0.0; len],
        }
    }

    pub fn give(&mut self, v: Vec<f32>) {
        if self.free.len() < POOL_MAX_BUFFERS && v.capacity() > 0 {
            self.free.push(v);
        }
    }

    pub fn merge(&mut self, other: BufferPool) {
        for v in other.free {
            self.give(v);
        }
    }
}

/// Time spent per stage of the graph.
#[derive(Clone, Copy, Debug, Default)]
pub struct StageTimes {
    pub backbone: Duration,
    pub neck: Duration,
    pub heads: Duration,
}

/// Runs `graph` on `input` ([n, 3, h, w], already normalised). Buffers are dropped after their last
/// use unless they are taps (or `keep_all`).
pub fn run(
    graph: &Graph,
    input: Vec<f32>,
    n: usize,
    h: usize,
    w: usize,
    keep_all: bool,
    times: Option<&mut StageTimes>,
    pool: &mut BufferPool,
) -> Activations {
    let nt = graph.tensors.len();
    let dims = |t: TensorId| {
        let i = &graph.tensors[t];
        (i.channels, i.height(h), i.width(w))
    };
    let mut last_use = vec![0usize; nt];
    for (i, op) in graph.ops.iter().enumerate() {
        let reads: Vec<TensorId> = match op {
            Op::Conv(c) => std::iter::once(c.input).chain(c.residual).collect(),
            Op::MaxPool { input, .. } => vec![*input],
            Op::UpsampleAdd { src, .. } => vec![*src],
        };
        for t in reads {
            last_use[t] = i;
        }
    }
    let taps = &graph.taps;
    let keep: Vec<bool> = (0..nt)
        .map(|t| {
            keep_all
                || taps.backbone.contains(&t)
                || taps.fpn.contains(&t)
                || taps.ssh.contains(&t)
                || taps.head.contains(&t)
        })
        .collect();

    let mut bufs: Vec<Option<Vec<f32>>> = vec![None; nt];
    bufs[graph.input] = Some(input);
    // Buffers of dead tensors (and of earlier passes, through `pool`) are reused for new ones, so a
    // steady stream of frames neither allocates nor faults in fresh pages. Every op overwrites all of
    // its output (SSH's three branches cover all channels), so stale values never show.
    let mut local_times = StageTimes::default();
    // RETINAFACE_PROFILE=1 prints each op's time (slowest first) after the pass, for tuning.
    let profile = std::env::var_os("RETINAFACE_PROFILE").is_some_and(|v| v == "1");
    let mut op_times: Vec<(f64, String)> = Vec::new();
    for (i, op) in graph.ops.iter().enumerate() {
        let start = Instant::now();
        match op {
            Op::Conv(c) => {
                let (_, ih, iw) = dims(c.input);
                let (oc, oh, ow) = dims(c.output);
                let mut out = bufs[c.output].take().unwrap_or_else(|| pool.take(n * oc * oh * ow));
                let x = bufs[c.input]
                    .as_deref()
                    .unwrap_or_else(|| panic!("graph order: {} read before written", graph.tensors[c.input].name));
                let r = c.residual.and_then(|r| bufs[r].as_deref());
                ops::conv2d(c, x, n, ih, iw, &mut out, oc, r);
                bufs[c.output] = Some(out);
            }
            Op::MaxPool { input, output } => {
                let (ic, ih, iw) = dims(*input);
                let (_, oh, ow) = dims(*output);
                let mut out = pool.take(n * ic * oh * ow);
                ops::max_pool_3x3s2(bufs[*input].as_deref().unwrap_or(&[]), n * ic, ih, iw, &mut out);
                bufs[*output] = Some(out);
            }
            Op::UpsampleAdd { src, dst } => {
                let (sc, sh, sw) = dims(*src);
                let (_, dh, dw) = dims(*dst);
                let mut d = bufs[*dst].take().unwrap_or_default();
                ops::upsample_nearest_add(bufs[*src].as_deref().unwrap_or(&[]), sh, sw, &mut d, dh, dw);
                debug_assert_eq!(d.len(), n * sc * dh * dw);
                bufs[*dst] = Some(d);
            }
        }
        for (t, &lu) in last_use.iter().enumerate() {
            if lu == i && !keep[t] && t != Graph::op_output(op) {
                if let Some(v) = bufs[t].take() {
                    pool.give(v);
                }
            }
        }
        let dt = start.elapsed();
        if profile {
            let what = match op {
                Op::Conv(c) => format!(
                    "conv {} {}x{} s{} g{} {}->{}",
                    c.name, c.kernel, c.kernel, c.stride, c.groups, c.cin, c.cout
                ),
                Op::MaxPool { .. } => "maxpool".to_string(),
                Op::UpsampleAdd { .. } => "upsample+add".to_string(),
            };
            op_times.push((dt.as_secs_f64() * 1e3, what));
        }
        match graph.op_stages[i] {
            Stage::Backbone => local_times.backbone += dt,
            Stage::Neck => local_times.neck += dt,
            Stage::Heads => local_times.heads += dt,
        }
    }
    if profile {
        op_times.sort_by(|a, b| b.0.total_cmp(&a.0));
        let total: f64 = op_times.iter().map(|t| t.0).sum();
        eprintln!("profile: {} ops, {total:.2} ms at {n}x3x{h}x{w}", op_times.len());
        for (ms, what) in op_times.iter().take(25) {
            eprintln!("  {ms:8.2} ms  {:5.1}%  {what}", ms / total * 100.0);
        }
    }
    if let Some(t) = times {
        t.backbone += local_times.backbone;
        t.neck += local_times.neck;
        t.heads += local_times.heads;
    }
    Activations { n, input_h: h, input_w: w, tensors: bufs }
}
