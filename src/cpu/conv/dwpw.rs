//! Depthwise 3×3 + pointwise 1×1 fused per band of output rows (MobileNetV1's blocks, MobileNetV2's
//! depthwise + project), at the AVX2 and AVX-512 levels.
//!
//! The composition writes the depthwise output to memory and reads it back: on the early MobileNet
//! layers (8–32 channels at 160²–320²) both convolutions are bound by that traffic, not by arithmetic.
//! Here each task computes the depthwise output of a band of rows, all channels, into a scratch that
//! stays in L2 ([channel][band pixels]), and the pointwise convolution reads it from there with the
//! implicit-GEMM micro-kernel (the scratch is its B operand, one plane per channel, like a 1×1 input)
//! and writes the band's output rows with the epilogue applied.
//!
//! Same values as the composition at the same level: the depthwise is the same row kernel as
//! `depthwise`'s (nine taps in (ky, kx) order, fused multiply-adds, taps outside the image adding a zero
//! product, then the epilogue); the pointwise is the same micro-kernel over the same packed weights in
//! the same k order.

use super::common::{SharedMut, aligned, epilogue_fast, min_tasks, store_grid};
use super::igemm::{self, conflict_free_stride};
use super::tile::{MR, NR};
use crate::cpu::isa::Isa;
use crate::cpu::isa::Simd;
use crate::cpu::rows::split_padded;
use crate::graph::{Act, Conv};
use crate::reference::out_size;
use rayon::prelude::*;

/// Floats of depthwise scratch plus pointwise accumulators per task (1 MiB): both stay in L2.
const BAND_BUDGET: usize = 1 << 18;

/// Whether `dw` then `pw` is a pair this path computes at `level` (else the caller runs the composition).
pub fn fuses(dw: &Conv, pw: &Conv, level: Isa) -> bool {
    Simd::of(level).is_some()
        && dw.groups == dw.cin
        && dw.cin == dw.cout
        && dw.kernel == 3
        && dw.pad == 1
        && (dw.stride == 1 || dw.stride == 2)
        && dw.residual.is_none()
        && pw.kernel == 1
        && pw.stride == 1
        && pw.pad == 0
        && pw.groups == 1
        && pw.cin == dw.cout
}

/// Whether fusing is the faster way for this pair on an h×w input (measured with `cargo bench --bench
/// conv_shapes -- dw+pw`, one thread, AVX-512 Xeon): it wins on narrow pointwise convolutions (up to 64
/// input channels: 1.4–1.5x on MobileNet x0.25's 8–64 channel layers), and up to 128 on maps of at most
/// 80×80 (1.2x); from 128 channels on large maps and from 256 on, the composition's GEMM-crate
/// pointwise path is faster (0.5–0.9x fused). On the AVX2 kernel (Zen 3, one thread, four runs) the
/// 128-channel 40² pair (x0.25's stage2) runs 0.54–0.92x of the composition fused, the 64-channel
/// pairs 1.0–1.3x: the AVX2 micro-kernel trails the GEMM crate from 128 channels, so only up to 64 fuse.
pub fn preferred(dw: &Conv, pw: &Conv, h: usize, w: usize, level: Isa) -> bool {
    let (oh, ow) = (out_size(h, 3, dw.stride, 1), out_size(w, 3, dw.stride, 1));
    pw.cin <= 64 || (level >= Isa::Avx512 && pw.cin <= 128 && oh * ow <= 80 * 80)
}

/// `pw(dw(x))`: `x` is [n, dw.cin, h, w]; `out` is [n, out_channels, oh, ow] (pw's channels at
/// `pw.out_channel_offset`); `residual` is pw's, [n, pw.cout, oh, ow]. Call only when `fuses`.
#[allow(clippy::too_many_arguments)]
pub fn conv(
    level: Isa,
    dw: &Conv,
    pw: &Conv,
    x: &[f32],
    n: usize,
    h: usize,
    w: usize,
    out: &mut [f32],
    out_channels: usize,
    residual: Option<&[f32]>,
) {
    run_bands(level, None, dw, pw, x, n, h, w, out, out_channels, residual)
}

/// Whether the 1×1 expansion `ex` followed by the pair `dw`, `pw` (MobileNetV2's inverted residual)
/// is a chain `invres` computes at `level`.
pub fn fuses_invres(ex: &Conv, dw: &Conv, pw: &Conv, level: Isa) -> bool {
    fuses(dw, pw, level)
        && ex.kernel == 1
        && ex.stride == 1
        && ex.pad == 0
        && ex.groups == 1
        && ex.residual.is_none()
        && ex.out_channel_offset == 0
        && ex.cout == dw.cin
}

/// Whether fusing the expansion in is the faster way (measured per op with `RETINAFACE_PROFILE=cpu`,
/// MobileNetV2 at 640², one thread, AVX-512 Xeon): on the early blocks (16–32 inputs expanded six times
/// on 80²–320² maps) the expanded tensor is megabytes that the composition writes and reads back (1.4–2x
/// fused); the 64-input blocks at 40² still gain 4–17%; from 96 inputs (40² and 20² maps) the
/// composition, with its expansion on the GEMM crate and no recomputed halo, is even or up to 1.5x
/// faster.
pub fn preferred_invres(ex: &Conv) -> bool {
    ex.cin <= 64
}

/// `pw(dw(ex(x)))`, MobileNetV2's inverted residual: `x` is [n, ex.cin, h, w]; `out` and `residual`
/// as `conv`'s (the shortcut is pw's residual). Each band expands the input rows its depthwise rows
/// read (the halo rows twice, once per band) eight channels at a time, so no expanded row leaves L1/L2.
/// Same values as the composition `ex` on the implicit GEMM, then `conv`. Call only when `fuses_invres`.
#[allow(clippy::too_many_arguments)]
pub fn invres(
    level: Isa,
    ex: &Conv,
    dw: &Conv,
    pw: &Conv,
    x: &[f32],
    n: usize,
    h: usize,
    w: usize,
    out: &mut [f32],
    out_channels: usize,
    residual: Option<&[f32]>,
) {
    assert_eq!(x.len(), n * ex.cin * h * w, "invres {} input size", ex.name);
    run_bands(level, Some(ex), dw, pw, x, n, h, w, out, out_channels, residual)
}

#[allow(clippy::too_many_arguments)]
fn run_bands(
    level: Isa,
    ex: Option<&Conv>,
    dw: &Conv,
    pw: &Conv,
    x: &[f32],
    n: usize,
    h: usize,
    w: usize,
    out: &mut [f32],
    out_channels: usize,
    residual: Option<&[f32]>,
) {
    let Some(kernel) = Simd::of(level) else {
        unreachable!("dwpw::conv at a level without a micro-kernel: `fuses` was not checked")
    };
    assert!(kernel.isa().supported(), "dwpw: the {kernel:?} kernel was chosen on a processor without it");
    let (s, c) = (dw.stride, dw.cout);
    let (oh, ow) = (out_size(h, 3, s, 1), out_size(w, 3, s, 1));
    let cin = ex.map_or(c, |e| e.cin);
    assert_eq!(x.len(), n * cin * h * w, "dwpw {} input size", dw.name);
    assert_eq!(out.len(), n * out_channels * oh * ow, "dwpw {} output size", pw.name);
    assert!(pw.out_channel_offset + pw.cout <= out_channels);
    if let Some(r) = residual {
        assert_eq!(r.len(), n * pw.cout * oh * ow, "dwpw {} residual size", pw.name);
    }
    let packed = pw.packed.igemm.get_or_init(|| igemm::pack_weights(&pw.weight, pw.cout, pw.cin));
    let expand =
        ex.map(|e| (e, e.packed.igemm.get_or_init(|| igemm::pack_weights(&e.weight, e.cout, e.cin)).as_slice()));
    let blocks = pw.cout.div_ceil(MR);
    // Rows per band: the scratch (c planes, and the copied input rows an expansion reads) and the
    // accumulators (blocks·MR rows) within the budget, and enough bands for the threads.
    let per_row = (c + blocks * MR) * ow + ex.map_or(0, |e| e.cin * s * w);
    let budget_rows = (BAND_BUDGET / per_row.max(1)).max(1);
    let want = min_tasks().div_ceil(n).min(oh);
    let rows = budget_rows.min(oh.div_ceil(want)).max(1);
    let bands = oh.div_ceil(rows);
    let out = SharedMut(out.as_mut_ptr());
    let task = Band { level, kernel, expand, dw, pw, packed, x, h, w, oh, ow, out, out_channels, residual };
    (0..n * bands).into_par_iter().for_each(|t| {
        // A thread's scratch is reused across calls (taken, so a nested call on this thread gets its
        // own): fresh megabytes per task would be page faults and zero fills.
        let mut s = SCRATCH.with(|c| c.take());
        let (b, bi) = (t / bands, t % bands);
        let y0 = bi * rows;
        task.run(b, y0, rows.min(oh - y0), &mut s);
        SCRATCH.with(|c| *c.borrow_mut() = s);
    });
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

#[derive(Default)]
struct Scratch {
    /// Depthwise output of the band: [c][plane], plane ≥ rows·ow, from `mid_at` (a 64-byte boundary).
    mid: Vec<f32>,
    mid_at: usize,
    /// Pointwise accumulators: [blocks·MR][ld].
    acc: Vec<f32>,
    /// Stride 2: the band's input rows split into even and odd padded columns.
    split: Vec<f32>,
    /// Pointwise reduction offsets (one plane per input channel).
    offsets: Vec<u32>,
    /// Expansion: the band's input rows [cin][plane], their reduction offsets, and MR expanded
    /// channels' rows [MR][ld].
    rows_in: Vec<f32>,
    ex_offsets: Vec<u32>,
    expanded: Vec<f32>,
}

struct Band<'a> {
    level: Isa,
    kernel: Simd,
    /// The expansion and its packed weights (an inverted residual); `x` is then its input.
    expand: Option<(&'a Conv, &'a [f32])>,
    dw: &'a Conv,
    pw: &'a Conv,
    packed: &'a [f32],
    x: &'a [f32],
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    out: SharedMut,
    out_channels: usize,
    residual: Option<&'a [f32]>,
}

impl Band<'_> {
    /// Output rows y0..y0+rows of image b.
    fn run(&self, b: usize, y0: usize, rows: usize, s: &mut Scratch) {
        let (c, ow) = (self.dw.cout, self.ow);
        let len = rows * ow;
        let plane = conflict_free_stride(len);
        s.mid_at = aligned(&mut s.mid, c * plane);
        let (h, w) = (self.h, self.w);
        if let Some((ex, packed)) = self.expand {
            self.expand_depthwise(ex, packed, b, y0, len, plane, s);
        } else {
            for ch in 0..c {
                let input = &self.x[(b * c + ch) * h * w..][..h * w];
                let dst = &mut s.mid[s.mid_at + ch * plane..][..len];
                self.depthwise(ch, input, y0, dst, &mut s.split, 0);
            }
        }
        self.pointwise(b, y0, len, plane, s);
    }

    /// Depthwise channel `ch` of output rows from `y0` into `dst`, bias and activation applied;
    /// `input` holds the channel's rows from `first_row`.
    fn depthwise(&self, ch: usize, input: &[f32], y0: usize, dst: &mut [f32], split: &mut Vec<f32>, first_row: usize) {
        let (h, w, dw) = (self.h, self.w, self.dw);
        let weight: &[f32; 9] = dw.weight[ch * 9..ch * 9 + 9].try_into().expect("3x3 depthwise weights");
        depthwise3x3_rows(
            self.level,
            input,
            h,
            w,
            dw.stride,
            weight,
            dw.bias[ch],
            dw.act,
            y0,
            dst,
            self.ow,
            split,
            first_row,
        );
    }

    /// The expansion of the input rows that output rows y0.. (`len` pixels) read, MR channels at a
    /// time on the micro-kernel, each block's rows straight into the depthwise (`s.mid`, `plane` apart).
    #[allow(clippy::too_many_arguments)]
    fn expand_depthwise(
        &self,
        ex: &Conv,
        packed: &[f32],
        b: usize,
        y0: usize,
        len: usize,
        plane: usize,
        s: &mut Scratch,
    ) {
        let (h, w, st) = (self.h, self.w, self.dw.stride);
        let last = y0 + len / self.ow - 1;
        let (r0, r1) = ((y0 * st).saturating_sub(1), (last * st + 2).min(h));
        let len_in = (r1 - r0) * w;
        // The rows copied to conflict-free planes: in place, a power-of-two map's channel planes
        // would all fall in the same cache sets.
        let plane_in = conflict_free_stride(len_in);
        s.rows_in.resize(ex.cin * plane_in, 0.0);
        for ci in 0..ex.cin {
            let src = &self.x[((b * ex.cin + ci) * h + r0) * w..][..len_in];
            s.rows_in[ci * plane_in..][..len_in].copy_from_slice(src);
        }
        s.ex_offsets.clear();
        s.ex_offsets.extend((0..ex.cin).map(|ci| (ci * plane_in) as u32));
        let tiles = len_in.div_ceil(NR);
        let ld = tiles * NR;
        s.expanded.resize(MR * ld, 0.0);
        for blk in 0..ex.cout.div_ceil(MR) {
            let a = &packed[blk * ex.cin * MR..(blk + 1) * ex.cin * MR];
            // SAFETY: `run_bands` checked that the processor runs the kernel; every B read lies at
            // ci·plane_in + px + lane with px + lane < len_in, inside `rows_in`; `expanded` holds MR
            // rows of ld ≥ tiles·NR.
            unsafe {
                igemm::gemm_tiles(self.kernel, a, &s.ex_offsets, &s.rows_in, len_in, tiles, 1, &mut s.expanded, ld)
            };
            for r in 0..MR.min(ex.cout - blk * MR) {
                let ch = blk * MR + r;
                let row = &mut s.expanded[r * ld..][..len_in];
                epilogue_fast(self.level, row, ex.bias[ch], None, ex.act);
                self.depthwise(ch, row, y0, &mut s.mid[s.mid_at + ch * plane..][..len], &mut s.split, r0);
            }
        }
    }

    /// The pointwise convolution of the band's `len` pixels from `s.mid`, written to the output.
    fn pointwise(&self, b: usize, y0: usize, len: usize, plane: usize, s: &mut Scratch) {
        let (pw, depth) = (self.pw, self.pw.cin);
        let blocks = pw.cout.div_ceil(MR);
        let tiles = len.div_ceil(NR);
        let ld = tiles * NR;
        let acc_at = aligned(&mut s.acc, blocks * MR * ld);
        s.offsets.clear();
        s.offsets.extend((0..depth).map(|ci| (ci * plane) as u32));
        // SAFETY: `conv` checked that the processor runs the kernel; every B read lies at ci·plane +
        // px + lane with px + lane < len, inside the scratch.
        unsafe {
            igemm::gemm_tiles(
                self.kernel,
                self.packed,
                &s.offsets,
                &s.mid[s.mid_at..],
                len,
                tiles,
                blocks,
                &mut s.acc[acc_at..],
                ld,
            )
        };
        let out_plane = self.oh * self.ow;
        let px0 = y0 * self.ow;
        for co in 0..pw.cout {
            let res = self.residual.map(|r| &r[(b * pw.cout + co) * out_plane..][..out_plane]);
            let plane_at = (b * self.out_channels + pw.out_channel_offset + co) * out_plane;
            // SAFETY: the band's rows of each output channel belong to this task alone.
            unsafe {
                store_grid(
                    self.level,
                    &s.acc[acc_at + co * ld..][..len],
                    px0,
                    self.ow,
                    self.ow,
                    self.out,
                    plane_at,
                    pw.bias[co],
                    res,
                    pw.act,
                )
            };
        }
    }
}

/// Output rows y0.. of a 3×3 depthwise convolution (pad 1, stride 1 or 2) of one channel plane (h×w, of
/// which `input` holds rows `first_row..`, at least every row the output rows read) into `dst` (whole
/// rows of `ow`), bias and activation applied: `row[x] = act(Σ_{ky, kx} w[ky·3 + kx] · in[oy·s + ky −
/// 1][x·s + kx − 1] + bias)`, summed in (ky, kx) order, each output's nine taps in registers; taps
/// outside the image add zero products. At AVX2 and AVX-512 the sum is fused multiply-adds, as in the
/// GEMM micro-kernels (one instruction a tap instead of two, where multiplies and adds share ports); at
/// the portable level separate multiplies and adds (a software fma would be slower than both). The
/// epilogue is applied in registers, so each output is written once. `scratch` holds the stride-2 split
/// rows or the zero row that stands for padding.
#[allow(clippy::too_many_arguments)]
pub(super) fn depthwise3x3_rows(
    level: Isa,
    input: &[f32],
    h: usize,
    w: usize,
    stride: usize,
    weight: &[f32; 9],
    bias: f32,
    act: Act,
    y0: usize,
    dst: &mut [f32],
    ow: usize,
    scratch: &mut Vec<f32>,
    first_row: usize,
) {
    let p = DwRows { level, input, h, w, stride, weight, bias, act, y0, ow, first_row };
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn avx512(p: &DwRows<'_>, dst: &mut [f32], scratch: &mut Vec<f32>) {
            p.run::<true>(dst, scratch)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(p: &DwRows<'_>, dst: &mut [f32], scratch: &mut Vec<f32>) {
            p.run::<true>(dst, scratch)
        }
        if level >= Isa::Avx512 && Isa::Avx512.supported() {
            // SAFETY: the processor supports AVX-512F, AVX2 and FMA (`Isa::supported`).
            return unsafe { avx512(&p, dst, scratch) };
        }
        if level >= Isa::Avx2 && Isa::Avx2.supported() {
            // SAFETY: the processor supports AVX2 and FMA (`Isa::supported`).
            return unsafe { avx2(&p, dst, scratch) };
        }
    }
    p.run::<false>(dst, scratch)
}

/// The arguments of `depthwise3x3_rows`.
struct DwRows<'a> {
    level: Isa,
    input: &'a [f32],
    h: usize,
    w: usize,
    stride: usize,
    weight: &'a [f32; 9],
    bias: f32,
    act: Act,
    y0: usize,
    ow: usize,
    first_row: usize,
}

/// Outputs per step of the row loops: two AVX2 or one AVX-512 register, independent sums in flight.
const DW_LANES: usize = 16;

impl DwRows<'_> {
    #[inline(always)]
    fn run<const FMA: bool>(&self, dst: &mut [f32], scratch: &mut Vec<f32>) {
        let bias = self.bias;
        match self.act {
            Act::None => self.rows::<FMA>(dst, scratch, move |v: f32| v + bias),
            Act::Leaky(0.0) => self.rows::<FMA>(dst, scratch, move |v: f32| (v + bias).max(0.0)),
            Act::Leaky(a) => self.rows::<FMA>(dst, scratch, move |v: f32| {
                let v = v + bias;
                if v >= 0.0 { v } else { v * a }
            }),
            Act::Relu6 => self.rows::<FMA>(dst, scratch, move |v: f32| (v + bias).clamp(0.0, 6.0)),
        }
    }

    /// The rows with `f` (bias and activation) applied to each sum.
    #[inline(always)]
    fn rows<const FMA: bool>(&self, dst: &mut [f32], scratch: &mut Vec<f32>, f: impl Fn(f32) -> f32 + Copy) {
        let (h, w, ow, wt) = (self.h, self.w, self.ow, self.weight);
        let rows = dst.len() / ow;
        let line = |iy: isize| {
            (iy >= 0 && (iy as usize) < h).then(|| {
                let at = (iy as usize - self.first_row) * w;
                &self.input[at..at + w]
            })
        };
        if self.stride == 1 {
            // Only bands at the image's top or bottom edge read a padding row: the others skip zeroing
            // one (an empty row there would fail loudly if that reasoning were wrong).
            let pads = self.y0 == 0 || self.y0 + rows >= h;
            if pads {
                scratch.clear();
                scratch.resize(w, 0.0);
            }
            let zero: &[f32] = if pads { &scratch[..w] } else { &[] };
            // The rows with an image row above and below, as one flat run (see `flat_s1`) where the
            // explicit kernel runs; their edge columns are then recomputed below.
            let (ya, yb) = (self.y0.max(1), (self.y0 + rows).min(h.saturating_sub(1)));
            let flat = FMA && ya < yb && self.flat_s1(ya, yb, dst);
            for (r, row) in dst.chunks_exact_mut(ow).enumerate() {
                let y = self.y0 + r;
                let oy = y as isize;
                let lines = [line(oy - 1).unwrap_or(zero), line(oy).unwrap_or(zero), line(oy + 1).unwrap_or(zero)];
                if flat && (ya..yb).contains(&y) {
                    row[0] = edge_s1::<FMA>(&lines, wt, 0, ow, f);
                    row[ow - 1] = edge_s1::<FMA>(&lines, wt, ow - 1, ow, f);
                } else {
                    row_s1::<FMA>(lines, wt, row, f);
                }
            }
            return;
        }
        // Stride 2: the input rows, each split once into even and odd padded columns; a row outside
        // the image is a zero row.
        let half = (w + 2).div_ceil(2);
        let top = (2 * self.y0) as isize - 1;
        scratch.resize((2 * rows + 1) * 2 * half, 0.0);
        for (i, part) in scratch.chunks_exact_mut(2 * half).enumerate() {
            match line(top + i as isize) {
                Some(src) => {
                    let (even, odd) = part.split_at_mut(half);
                    split_padded(self.level, src, even, odd);
                }
                None => part.fill(0.0),
            }
        }
        for (r, row) in dst.chunks_exact_mut(ow).enumerate() {
            // Output x reads even[x], odd[x], even[x + 1] of each of its three rows.
            let seg = |i: usize| &scratch[(2 * r * 2 + i) * half..][..half];
            let (e0, o0, e1, o1, e2, o2) = (seg(0), seg(1), seg(2), seg(3), seg(4), seg(5));
            let src = [e0, o0, &e0[1..], e1, o1, &e1[1..], e2, o2, &e2[1..]];
            if !(FMA && self.taps_explicit(src, row)) {
                taps::<FMA>(src, wt, row, f);
            }
        }
    }

    /// Stride 1, output rows ya..yb (each with an image row above and below): the image's rows seen as
    /// one flat run of pixels, output pixel j (row-major) reading input pixels j + (ky − 1)·w + kx − 1,
    /// so the run vectorises across row ends without a tail per row. A pixel in column 0 or w − 1 then
    /// holds a sum that wrapped into the neighbouring row (its padding tap read a real pixel): the
    /// caller recomputes those columns. Whether the explicit kernel ran (false on short runs: the
    /// caller computes those rows per row).
    #[inline(always)]
    fn flat_s1(&self, ya: usize, yb: usize, dst: &mut [f32]) -> bool {
        let w = self.w;
        // From column 1 of row ya to column w − 2 of row yb − 1: every tap then lies inside rows
        // ya − 1 ..= yb, which `input` holds.
        let n = ((yb - ya) * w).saturating_sub(2);
        if n < EXPLICIT_MIN {
            return false;
        }
        let base = (ya - 1 - self.first_row) * w;
        let src: [&[f32]; 9] = std::array::from_fn(|t| &self.input[base + (t / 3) * w + t % 3..][..n]);
        self.taps_explicit(src, &mut dst[(ya - self.y0) * w + 1..][..n])
    }

    /// `out[x] = act(Σ_t wt[t] · src[t][x] + bias)` on the explicit AVX2 kernel (`taps_avx2`), the same
    /// operations in the same order as `taps::<true>`; false (nothing written) where `out` is shorter
    /// than one vector. Call only from the AVX2/AVX-512 instantiations (`FMA`).
    #[inline(always)]
    fn taps_explicit(&self, src: [&[f32]; 9], out: &mut [f32]) -> bool {
        let n = out.len();
        // The processor check is a cached load; it keeps the unsafe call sound even if a portable
        // caller reached here.
        if n < EXPLICIT_MIN || !Isa::Avx2.supported() {
            return false;
        }
        assert!(src.iter().all(|s| s.len() >= n), "depthwise taps shorter than the output");
        #[cfg(target_arch = "x86_64")]
        {
            let (p, wt, o, b) = (src.map(|s| s.as_ptr()), self.weight, out.as_mut_ptr(), self.bias);
            // SAFETY: the processor runs AVX2 and FMA (checked above); each source holds n floats
            // (asserted), `out` n.
            unsafe {
                match self.act {
                    Act::None => taps_avx2::<ACT_NONE>(p, wt, o, n, b, 0.0),
                    Act::Leaky(0.0) => taps_avx2::<ACT_RELU>(p, wt, o, n, b, 0.0),
                    Act::Leaky(a) => taps_avx2::<ACT_LEAKY>(p, wt, o, n, b, a),
                    Act::Relu6 => taps_avx2::<ACT_RELU6>(p, wt, o, n, b, 0.0),
                }
            }
        }
        true
    }
}

/// The shortest run `taps_avx2` takes: one 8-lane vector (its last step overlaps the one before).
const EXPLICIT_MIN: usize = 8;

const ACT_NONE: u8 = 0;
const ACT_RELU: u8 = 1;
const ACT_LEAKY: u8 = 2;
const ACT_RELU6: u8 = 3;

/// `taps`'s sums with explicit AVX2 + FMA instructions: the nine weights broadcast once into registers,
/// four 8-lane outputs a step (four independent chains of nine dependent multiply-adds in flight, where
/// the autovectorised `taps` kept two and reloaded spilled weights each step), the last step
/// overlapping the one before. Each output is `wt[0]·src[0]` then fused multiply-adds in t order, then
/// bias and activation as `taps`' closure computes them (NaN as `f32::max` / `f32::clamp` treat it).
///
/// # Safety
/// AVX2 and FMA must be available; each `src[t]` must point at `n` ≥ 8 readable floats and `out` at n
/// writable ones that no source overlaps.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn taps_avx2<const ACT: u8>(
    src: [*const f32; 9],
    wt: &[f32; 9],
    out: *mut f32,
    n: usize,
    bias: f32,
    alpha: f32,
) {
    use std::arch::x86_64::*;
    debug_assert!(n >= EXPLICIT_MIN);
    // SAFETY: the caller's contract; every load reads src[t][i..i + 8] and every store out[i..i + 8]
    // with i + 8 ≤ n.
    unsafe {
        let [w0, w1, w2, w3, w4, w5, w6, w7, w8] = wt.map(|v| _mm256_set1_ps(v));
        let [s0, s1, s2, s3, s4, s5, s6, s7, s8] = src;
        let (vb, va) = (_mm256_set1_ps(bias), _mm256_set1_ps(alpha));
        macro_rules! sum {
            ($i:expr) => {{
                let i = $i;
                let mut a = _mm256_mul_ps(w0, _mm256_loadu_ps(s0.add(i)));
                a = _mm256_fmadd_ps(w1, _mm256_loadu_ps(s1.add(i)), a);
                a = _mm256_fmadd_ps(w2, _mm256_loadu_ps(s2.add(i)), a);
                a = _mm256_fmadd_ps(w3, _mm256_loadu_ps(s3.add(i)), a);
                a = _mm256_fmadd_ps(w4, _mm256_loadu_ps(s4.add(i)), a);
                a = _mm256_fmadd_ps(w5, _mm256_loadu_ps(s5.add(i)), a);
                a = _mm256_fmadd_ps(w6, _mm256_loadu_ps(s6.add(i)), a);
                a = _mm256_fmadd_ps(w7, _mm256_loadu_ps(s7.add(i)), a);
                _mm256_fmadd_ps(w8, _mm256_loadu_ps(s8.add(i)), a)
            }};
        }
        let mut i = 0;
        while i + 32 <= n {
            let (a0, a1, a2, a3) = (sum!(i), sum!(i + 8), sum!(i + 16), sum!(i + 24));
            _mm256_storeu_ps(out.add(i), act8::<ACT>(a0, vb, va));
            _mm256_storeu_ps(out.add(i + 8), act8::<ACT>(a1, vb, va));
            _mm256_storeu_ps(out.add(i + 16), act8::<ACT>(a2, vb, va));
            _mm256_storeu_ps(out.add(i + 24), act8::<ACT>(a3, vb, va));
            i += 32;
        }
        while i + 8 <= n {
            _mm256_storeu_ps(out.add(i), act8::<ACT>(sum!(i), vb, va));
            i += 8;
        }
        if i < n {
            // Recomputes some outputs of the step before with the same values.
            _mm256_storeu_ps(out.add(n - 8), act8::<ACT>(sum!(n - 8), vb, va));
        }
    }
}

/// Bias then activation on 8 sums, as `DwRows::run`'s closures do per value.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn act8<const ACT: u8>(
    v: std::arch::x86_64::__m256,
    bias: std::arch::x86_64::__m256,
    alpha: std::arch::x86_64::__m256,
) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // SAFETY: called only from `taps_avx2`, which has AVX.
    unsafe {
        let v = _mm256_add_ps(v, bias);
        let zero = _mm256_setzero_ps();
        match ACT {
            // max_ps returns its second operand when either is NaN: 0 for a NaN sum, as f32::max.
            ACT_RELU => _mm256_max_ps(v, zero),
            // A NaN sum compares false and takes v·alpha, NaN, as the closure's `v >= 0.0` does.
            ACT_LEAKY => _mm256_blendv_ps(_mm256_mul_ps(v, alpha), v, _mm256_cmp_ps::<_CMP_GE_OQ>(v, zero)),
            // NaN stays NaN through both (second operands), as f32::clamp keeps it.
            ACT_RELU6 => _mm256_min_ps(_mm256_set1_ps(6.0), _mm256_max_ps(zero, v)),
            _ => v,
        }
    }
}

/// `acc + w·x`, fused at the AVX levels.
#[inline(always)]
fn madd<const FMA: bool>(acc: f32, w: f32, x: f32) -> f32 {
    if FMA { w.mul_add(x, acc) } else { acc + w * x }
}

/// `out[x] = f(Σ_t wt[t] · src[t][x])` in t order, DW_LANES outputs a step; the last step overlaps the
/// one before (recomputing equal values) rather than leaving a scalar tail, when the row has a step.
/// (Functions, not closures, down to the multiply-add: a closure is compiled without the caller's
/// target features, and an un-inlined `mul_add` there is a call to the software fma.)
#[inline(always)]
fn taps<const FMA: bool>(src: [&[f32]; 9], wt: &[f32; 9], out: &mut [f32], f: impl Fn(f32) -> f32 + Copy) {
    #[inline(always)]
    fn step<const FMA: bool>(src: &[&[f32]; 9], x: usize, wt: &[f32; 9], out: &mut [f32], f: impl Fn(f32) -> f32) {
        let len = out.len();
        let mut s: [&[f32]; 9] = [&[]; 9];
        for t in 0..9 {
            s[t] = &src[t][x..][..len];
        }
        for (j, o) in out.iter_mut().enumerate() {
            let mut acc = wt[0] * s[0][j];
            for t in 1..9 {
                acc = madd::<FMA>(acc, wt[t], s[t][j]);
            }
            *o = f(acc);
        }
    }
    let n = out.len();
    if n < DW_LANES {
        step::<FMA>(&src, 0, wt, out, f);
        return;
    }
    let mut x = 0;
    while x + DW_LANES <= n {
        step::<FMA>(&src, x, wt, &mut out[x..][..DW_LANES], f);
        x += DW_LANES;
    }
    if x < n {
        step::<FMA>(&src, n - DW_LANES, wt, &mut out[n - DW_LANES..], f);
    }
}

/// Output column `x` of a stride-1 row, taps outside the row zero: the two edge columns.
#[inline(always)]
fn edge_s1<const FMA: bool>(lines: &[&[f32]; 3], wt: &[f32; 9], x: usize, ow: usize, f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = 0.0;
    for t in 0..9 {
        let ix = (x + t % 3).wrapping_sub(1);
        let v = if ix < ow { lines[t / 3][ix] } else { 0.0 };
        acc = if t == 0 { wt[0] * v } else { madd::<FMA>(acc, wt[t], v) };
    }
    f(acc)
}

/// Stride 1 over three whole input rows (`w` = `row.len()`): the interior columns as `taps` over the
/// rows' shifted slices; the two edge columns, whose outer tap is padding, with that tap a zero.
#[inline(always)]
fn row_s1<const FMA: bool>(lines: [&[f32]; 3], wt: &[f32; 9], row: &mut [f32], f: impl Fn(f32) -> f32 + Copy) {
    let ow = row.len();
    if ow <= 2 {
        for (x, v) in row.iter_mut().enumerate() {
            *v = edge_s1::<FMA>(&lines, wt, x, ow, f);
        }
        return;
    }
    row[0] = edge_s1::<FMA>(&lines, wt, 0, ow, f);
    row[ow - 1] = edge_s1::<FMA>(&lines, wt, ow - 1, ow, f);
    let n = ow - 2;
    let (l0, l1, l2) = (&lines[0][..ow], &lines[1][..ow], &lines[2][..ow]);
    let src = [&l0[..n], &l0[1..], &l0[2..], &l1[..n], &l1[1..], &l1[2..], &l2[..n], &l2[1..], &l2[2..]];
    taps::<FMA>(src, wt, &mut row[1..ow - 1], f);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::conv::tests::uniform;
    use crate::graph::Act;
    use crate::reference;

    #[allow(clippy::too_many_arguments)]
    fn conv(
        name: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        groups: usize,
        act: Act,
        rnd: &mut impl FnMut() -> f32,
    ) -> Conv {
        Conv::with_values(name, [cin, cout, k, stride, groups], act, rnd)
    }

    /// `got` against the reference `want` (f32 rounding) and bit for bit against `composed`, channels
    /// `off..off + cout` of `oc` planes of `plane` pixels; the other channels unwritten (NaN).
    #[allow(clippy::too_many_arguments)]
    fn check(
        got: &[f32],
        want: &[f32],
        composed: &[f32],
        plane: usize,
        oc: usize,
        off: usize,
        cout: usize,
        what: &str,
    ) {
        for (i, ((g, e), m)) in got.iter().zip(want).zip(composed).enumerate() {
            let ch = (i / plane) % oc;
            let at = format!("{what}: element {i} (channel {ch})");
            if ch < off || ch >= off + cout {
                assert!(g.is_nan(), "{at}: written outside the conv's channels");
                continue;
            }
            assert!((g - e).abs() <= 1e-4 * e.abs().max(1.0), "{at}: {g} vs reference {e}");
            assert!(g == m, "{at}: {g} vs the composition's {m}");
        }
    }

    /// The fused pair against the reference composition (f32 rounding) and against the fast paths'
    /// composition at the same level (the same sums in the same order: equal values), on the shapes of
    /// the MobileNets and odd ones: stride 1 and 2, odd and tiny sizes, batches, a residual, an output
    /// channel offset, several bands, and more input channels than one reduction pass (KC).
    #[test]
    fn fused_depthwise_pointwise_equals_the_composition_at_every_level() {
        let mut rnd = uniform(7);
        // (n, c, cout, stride, h, w, residual, offset)
        let cases = [
            (1, 8, 16, 1, 37, 41, false, 0),
            (2, 16, 32, 2, 33, 30, false, 3),
            (1, 24, 24, 1, 9, 7, true, 0),
            (2, 5, 11, 2, 5, 6, false, 0),
            (1, 3, 8, 1, 1, 1, false, 0),
            (1, 4, 8, 1, 2, 3, true, 0),
            (1, 3, 8, 2, 1, 2, false, 0),
            (1, 300, 17, 1, 6, 5, false, 1),
            (1, 32, 64, 2, 160, 161, false, 0),
        ];
        let levels: Vec<Isa> = Isa::supported_levels().into_iter().filter(|l| Simd::of(*l).is_some()).collect();
        for (n, c, cout, s, h, w, with_res, off) in cases {
            let dw = conv("dw", c, c, 3, s, c, Act::Leaky(0.1), &mut rnd);
            let mut pw = conv("pw", c, cout, 1, 1, 1, Act::Relu6, &mut rnd);
            pw.out_channel_offset = off;
            assert!(levels.iter().all(|&l| fuses(&dw, &pw, l)));
            let x: Vec<f32> = (0..n * c * h * w).map(|_| rnd() * 3.0).collect();
            let (oh, ow) = (out_size(h, 3, s, 1), out_size(w, 3, s, 1));
            let res: Option<Vec<f32>> = with_res.then(|| (0..n * cout * oh * ow).map(|_| rnd()).collect());
            let oc = off + cout + 1;
            let mut mid = vec![0.0; n * c * oh * ow];
            reference::conv2d(&dw, &x, n, h, w, &mut mid, c, None);
            let mut want = vec![f32::NAN; n * oc * oh * ow];
            reference::conv2d(&pw, &mid, n, oh, ow, &mut want, oc, res.as_deref());
            for &level in &levels {
                // The composition as the executor runs it at this level.
                let step = |cv: &Conv, x: &[f32], h, w, out: &mut [f32], oc, res: Option<&[f32]>| {
                    let path = crate::cpu::conv::choose_path(cv, h, w, level);
                    crate::cpu::conv::conv2d_on(path, level, cv, x, n, h, w, out, oc, res)
                };
                let mut fast_mid = vec![0.0; n * c * oh * ow];
                step(&dw, &x, h, w, &mut fast_mid, c, None);
                let mut composed = vec![f32::NAN; n * oc * oh * ow];
                step(&pw, &fast_mid, oh, ow, &mut composed, oc, res.as_deref());
                let mut got = vec![f32::NAN; n * oc * oh * ow];
                super::conv(level, &dw, &pw, &x, n, h, w, &mut got, oc, res.as_deref());
                let what = format!("{level:?} n{n} c{c}->{cout} s{s} {h}x{w}");
                check(&got, &want, &composed, oh * ow, oc, off, cout, &what);
            }
        }
    }

    /// The fused inverted residual against the reference composition (f32 rounding) and against the
    /// expansion on the implicit GEMM followed by the fused pair at the same level (equal values): stride
    /// 1 and 2, odd and tiny maps, batches, the shortcut, an output channel offset, several bands, more
    /// channels than one reduction pass, expansions not a multiple of the micro-tile's rows.
    #[test]
    fn fused_inverted_residual_equals_the_composition_at_every_level() {
        let mut rnd = uniform(11);
        // (n, cin, hidden, cout, stride, h, w, residual, offset)
        let cases = [
            (1, 16, 96, 24, 2, 41, 38, false, 0),
            (2, 24, 144, 24, 1, 33, 30, true, 0),
            (1, 3, 8, 5, 1, 1, 1, false, 0),
            (1, 4, 20, 6, 2, 2, 3, false, 2),
            (1, 4, 20, 4, 2, 1, 1, false, 0),
            (1, 32, 192, 32, 1, 64, 160, true, 0),
            (1, 8, 300, 7, 1, 6, 5, false, 1),
            (2, 70, 13, 9, 2, 9, 12, false, 0),
        ];
        let levels: Vec<Isa> = Isa::supported_levels().into_iter().filter(|l| Simd::of(*l).is_some()).collect();
        for (n, cin, hid, cout, s, h, w, with_res, off) in cases {
            let ex = conv("ex", cin, hid, 1, 1, 1, Act::Relu6, &mut rnd);
            let dw = conv("dw", hid, hid, 3, s, hid, Act::Relu6, &mut rnd);
            let mut pw = conv("pw", hid, cout, 1, 1, 1, Act::None, &mut rnd);
            pw.out_channel_offset = off;
            assert!(levels.iter().all(|&l| fuses_invres(&ex, &dw, &pw, l)));
            let x: Vec<f32> = (0..n * cin * h * w).map(|_| rnd() * 3.0).collect();
            let (oh, ow) = (out_size(h, 3, s, 1), out_size(w, 3, s, 1));
            let res: Option<Vec<f32>> = with_res.then(|| (0..n * cout * oh * ow).map(|_| rnd()).collect());
            let oc = off + cout + 1;
            let mut e = vec![0.0; n * hid * h * w];
            reference::conv2d(&ex, &x, n, h, w, &mut e, hid, None);
            let mut mid = vec![0.0; n * hid * oh * ow];
            reference::conv2d(&dw, &e, n, h, w, &mut mid, hid, None);
            let mut want = vec![f32::NAN; n * oc * oh * ow];
            reference::conv2d(&pw, &mid, n, oh, ow, &mut want, oc, res.as_deref());
            for &level in &levels {
                let kernel = Simd::of(level).expect("a level with a kernel");
                let mut fast_e = vec![0.0; n * hid * h * w];
                let path = crate::cpu::conv::ConvPath::Igemm(kernel);
                crate::cpu::conv::conv2d_on(path, level, &ex, &x, n, h, w, &mut fast_e, hid, None);
                let mut composed = vec![f32::NAN; n * oc * oh * ow];
                super::conv(level, &dw, &pw, &fast_e, n, h, w, &mut composed, oc, res.as_deref());
                let mut got = vec![f32::NAN; n * oc * oh * ow];
                invres(level, &ex, &dw, &pw, &x, n, h, w, &mut got, oc, res.as_deref());
                let what = format!("{level:?} n{n} {cin}->{hid}->{cout} s{s} {h}x{w}");
                check(&got, &want, &composed, oh * ow, oc, off, cout, &what);
            }
        }
    }
}
