//! What the fast convolution paths share: the output pointer tasks write through, the task and column
//! budgets, and the epilogue (bias, residual, activation) that every path ends with.

use crate::cpu::isa::{Isa, avx_dispatch, avx2_dispatch};
use crate::graph::Act;

/// A raw pointer that tasks writing disjoint parts of one buffer may share.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub(crate) *mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    // A method, not a field access, so closures capture the Send + Sync wrapper rather than the raw pointer.
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// One destination of a convolution's output channels: the tensor (`out`, `out_channels` planes per
/// image), the first channel written there, and the activation.
#[derive(Clone, Copy)]
pub(super) struct Sink {
    pub(super) out: SharedMut,
    pub(super) out_channels: usize,
    pub(super) offset: usize,
    pub(super) act: Act,
}

/// Where each output channel of a GEMM goes: all to one `Sink`, or (a pair of convolutions run as one
/// GEMM, `conv2d_pair`) channels below `split` to the first conv's and the rest to the second's.
#[derive(Clone, Copy)]
pub(super) struct Sinks {
    first: Sink,
    split: usize,
    second: Sink,
}

impl Sinks {
    /// Every channel of `conv` to `out` ([n, out_channels, …], from `conv.out_channel_offset`).
    pub(super) fn one(out: SharedMut, out_channels: usize, conv: &crate::graph::Conv) -> Sinks {
        let sink = Sink { out, out_channels, offset: conv.out_channel_offset, act: conv.act };
        Sinks { first: sink, split: usize::MAX, second: sink }
    }

    /// Channels below `split` to `first`, the rest (renumbered from 0) to `second`.
    pub(super) fn two(first: Sink, split: usize, second: Sink) -> Sinks {
        Sinks { first, split, second }
    }

    /// Output channel `co` of image b: its tensor, the index where its plane (`plane` floats) starts,
    /// and its activation.
    pub(super) fn route(&self, b: usize, co: usize, plane: usize) -> (SharedMut, usize, Act) {
        let (sink, c) = if co < self.split { (&self.first, co) } else { (&self.second, co - self.split) };
        (sink.out, (b * sink.out_channels + sink.offset + c) * plane, sink.act)
    }
}

/// Elements of the im2col matrix budgeted per task (1 MiB of f32): the panel a task writes and the GEMM
/// then reads stays in the core's L2.
pub(super) const COLUMN_BUDGET: usize = 1 << 18;
/// Tasks wanted per convolution, so small maps still spread over the cores: four per thread of the
/// pool (at least 8), so that on 16–64 cores every core still gets work on the 20×20 and 40×40 maps,
/// and the last tasks of an uneven split cost a quarter of a core's share.
pub(crate) fn min_tasks() -> usize {
    (4 * rayon::current_num_threads()).max(8)
}

/// `v = act(v + bias [+ residual])` over a row, with the activation chosen once so the loop vectorises.
#[inline(always)]
pub(super) fn epilogue(row: &mut [f32], bias: f32, residual: Option<&[f32]>, act: Act) {
    #[inline(always)]
    fn run(row: &mut [f32], bias: f32, residual: Option<&[f32]>, f: impl Fn(f32) -> f32) {
        match residual {
            Some(r) => row.iter_mut().zip(r).for_each(|(v, &res)| *v = f(*v + bias + res)),
            None => row.iter_mut().for_each(|v| *v = f(*v + bias)),
        }
    }
    match act {
        Act::None => run(row, bias, residual, |v| v),
        Act::Leaky(0.0) => run(row, bias, residual, |v| v.max(0.0)),
        Act::Leaky(a) => run(row, bias, residual, |v| if v >= 0.0 { v } else { v * a }),
        Act::Relu6 => run(row, bias, residual, |v| v.clamp(0.0, 6.0)),
    }
}

/// `dst = act(src + bias [+ residual])`: the epilogue applied while storing a computed row, so the row
/// is written once instead of copied and then rewritten (the same operations in the same order as a
/// copy followed by `epilogue`, so the same values).
#[inline(always)]
pub(super) fn store_epilogue(src: &[f32], dst: &mut [f32], bias: f32, residual: Option<&[f32]>, act: Act) {
    #[inline(always)]
    fn run(src: &[f32], dst: &mut [f32], bias: f32, residual: Option<&[f32]>, f: impl Fn(f32) -> f32) {
        let src = &src[..dst.len()];
        match residual {
            Some(r) => {
                let r = &r[..dst.len()];
                for i in 0..dst.len() {
                    dst[i] = f(src[i] + bias + r[i]);
                }
            }
            None => dst.iter_mut().zip(src).for_each(|(d, &v)| *d = f(v + bias)),
        }
    }
    match act {
        Act::None => run(src, dst, bias, residual, |v| v),
        Act::Leaky(0.0) => run(src, dst, bias, residual, |v| v.max(0.0)),
        Act::Leaky(a) => run(src, dst, bias, residual, |v| if v >= 0.0 { v } else { v * a }),
        Act::Relu6 => run(src, dst, bias, residual, |v| v.clamp(0.0, 6.0)),
    }
}

/// Writes one output channel from a band of *grid* pixels `px0..px0 + band.len()`: grid rows are `wq`
/// wide and only their first `ow` pixels are output pixels (the rest are padding columns computed as
/// junk). Output pixel (y, x) becomes `act(band + bias + residual[y·ow + x])` at `out + plane_at +
/// y·ow + x`; `residual` is the channel's plane.
///
/// # Safety
/// The output pixels written must lie in `out`'s buffer and belong to the caller alone.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn store_grid(
    level: Isa,
    band: &[f32],
    px0: usize,
    wq: usize,
    ow: usize,
    out: SharedMut,
    plane_at: usize,
    bias: f32,
    residual: Option<&[f32]>,
    act: Act,
) {
    let px1 = px0 + band.len();
    for oy in px0 / wq..px1.div_ceil(wq) {
        let (lo, hi) = ((oy * wq).max(px0), (oy * wq + ow).min(px1));
        if lo >= hi {
            continue;
        }
        let at = oy * ow + lo - oy * wq;
        // SAFETY: the caller's contract.
        let orow = unsafe { std::slice::from_raw_parts_mut(out.get().add(plane_at + at), hi - lo) };
        store_epilogue_fast(level, &band[lo - px0..hi - px0], orow, bias, residual.map(|r| &r[at..at + hi - lo]), act);
    }
}

avx2_dispatch!(pub(super) epilogue_fast, epilogue_avx2, epilogue, (row: &mut [f32], bias: f32, residual: Option<&[f32]>, act: Act));
avx_dispatch!(pub(super) store_epilogue_fast, store_epilogue_avx2, store_epilogue_avx512, store_epilogue, (src: &[f32], dst: &mut [f32], bias: f32, residual: Option<&[f32]>, act: Act));

/// Resizes `v` to hold `len` floats from a 64-byte boundary and returns that boundary's index: vector
/// loads of whole cache lines from it then never split across two lines (the allocator aligns to 16).
pub(crate) fn aligned(v: &mut Vec<f32>, len: usize) -> usize {
    v.resize(len + 15, 0.0);
    v.as_ptr().align_offset(64)
}

/// Where an optional path is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathMode {
    /// Where its benchmark measured it ahead of the other paths.
    Auto,
    /// Never.
    Off,
    /// Wherever it applies.
    Force,
}

/// A path's mode: forced by `set` (a test or a benchmark timing it against the others in one
/// process), else its environment variable (`0` off, `1` forced, else auto), read once.
pub(crate) struct ModeSwitch {
    /// `set`'s choice: 1 auto, 2 off, 3 forced; 0 none.
    forced: std::sync::atomic::AtomicU8,
    var: &'static str,
    env: std::sync::OnceLock<PathMode>,
}

impl ModeSwitch {
    pub(crate) const fn new(var: &'static str) -> ModeSwitch {
        ModeSwitch { forced: std::sync::atomic::AtomicU8::new(0), var, env: std::sync::OnceLock::new() }
    }

    pub(crate) fn set(&self, mode: Option<PathMode>) {
        let code = match mode {
            None => 0,
            Some(PathMode::Auto) => 1,
            Some(PathMode::Off) => 2,
            Some(PathMode::Force) => 3,
        };
        self.forced.store(code, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> PathMode {
        match self.forced.load(std::sync::atomic::Ordering::Relaxed) {
            1 => PathMode::Auto,
            2 => PathMode::Off,
            3 => PathMode::Force,
            _ => *self.env.get_or_init(|| match std::env::var(self.var).as_deref() {
                Ok("0") => PathMode::Off,
                Ok("1") => PathMode::Force,
                _ => PathMode::Auto,
            }),
        }
    }
}
