//! The CPU reference of every operation: plain NCHW f32 functions, the oracle the CUDA kernels are
//! checked against. Threaded with rayon over independent output regions; every output element is
//! computed by one task in a fixed order, so results do not depend on the thread count.

use super::igemm::{self, Kernel};
use super::{Isa, isa};
use crate::model::graph::{Act, Conv, HEAD_BOX_OFFSET, HEAD_CLASS_OFFSET, HEAD_LANDMARK_OFFSET};
use rayon::prelude::*;
use std::cell::RefCell;

/// Output spatial size of a k×k convolution or pool with `stride` and `pad`.
pub fn out_size(size: usize, kernel: usize, stride: usize, pad: usize) -> usize {
    (size + 2 * pad - kernel) / stride + 1
}

/// A raw pointer that tasks writing disjoint parts of one buffer may share.
#[derive(Clone, Copy)]
pub(super) struct SharedMut(pub(super) *mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    // A method, not a field access, so closures capture the Send + Sync wrapper rather than the raw pointer.
    pub(super) fn get(self) -> *mut f32 {
        self.0
    }
}

thread_local! {
    static COLUMNS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Elements of the im2col matrix budgeted per task (1 MiB of f32): the panel a task writes and the GEMM
/// then reads stays in the core's L2.
const COLUMN_BUDGET: usize = 1 << 18;
/// Tasks wanted per convolution, so small maps still spread over the cores (a few per core).
pub(super) const MIN_TASKS: usize = 8;

/// `out[n, off + co, y, x] = act(Σ w[co, ci, ky, kx] · x[n, g·cin_g + ci, y·s + ky − p, x·s + kx − p] + bias[co] + residual[n, co, y, x])`.
///
/// `x` is [n, conv.cin, h, w]; `out` is [n, out_channels, oh, ow] with `out_channels ≥ off + cout`;
/// `residual`, if any, is [n, cout, oh, ow].
#[allow(clippy::too_many_arguments)] // the definition's operands and sizes, as every conv path takes them
pub fn conv2d(
    conv: &Conv,
    x: &[f32],
    n: usize,
    h: usize,
    w: usize,
    out: &mut [f32],
    out_channels: usize,
    residual: Option<&[f32]>,
) {
    let (k, s, p) = (conv.kernel, conv.stride, conv.pad);
    let (oh, ow) = (out_size(h, k, s, p), out_size(w, k, s, p));
    assert_eq!(x.len(), n * conv.cin * h * w, "conv {} input size", conv.name);
    assert_eq!(out.len(), n * out_channels * oh * ow, "conv {} output size", conv.name);
    assert!(conv.out_channel_offset + conv.cout <= out_channels);
    if let Some(r) = residual {
        assert_eq!(r.len(), n * conv.cout * oh * ow, "conv {} residual size", conv.name);
    }
    conv2d_on(choose_path(conv, h, w, isa()), conv, x, n, h, w, out, out_channels, residual);
}

/// The ways `conv2d` computes a convolution; each gives the definition's values up to f32 rounding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConvPath {
    /// Implicit GEMM on an AVX-512 or AVX2 micro-kernel (`igemm`), for any dense convolution.
    Igemm(Kernel),
    /// Few taps per output: direct accumulation, all output channels at once.
    DirectSmall,
    /// 3×3 stride 1: nine shifted GEMMs on a padded plane.
    Shifted3x3,
    /// im2col + GEMM (or GEMM straight on the input for 1×1 stride 1).
    Im2colGemm,
    Depthwise,
}

/// The path for `conv` at level `isa` (which the caller has checked the processor supports).
fn choose_path(conv: &Conv, h: usize, w: usize, isa: Isa) -> ConvPath {
    let k = conv.kernel;
    let kernel = Kernel::for_isa(isa).filter(|_| igemm::preferred(conv) && igemm::fits(conv, h, w));
    if conv.groups != 1 {
        ConvPath::Depthwise
    } else if let Some(kernel) = kernel {
        ConvPath::Igemm(kernel)
    } else if conv.cin * k * k <= DIRECT_MAX_TAPS {
        ConvPath::DirectSmall
    } else if k == 3 && conv.stride == 1 && conv.pad == 1 {
        ConvPath::Shifted3x3
    } else {
        ConvPath::Im2colGemm
    }
}

#[allow(clippy::too_many_arguments)]
fn conv2d_on(
    path: ConvPath,
    conv: &Conv,
    x: &[f32],
    n: usize,
    h: usize,
    w: usize,
    out: &mut [f32],
    out_channels: usize,
    residual: Option<&[f32]>,
) {
    let (k, s, p) = (conv.kernel, conv.stride, conv.pad);
    let (oh, ow) = (out_size(h, k, s, p), out_size(w, k, s, p));
    let out = SharedMut(out.as_mut_ptr());
    match path {
        ConvPath::Igemm(kernel) => igemm::conv(kernel, conv, x, n, h, w, out, out_channels, residual),
        ConvPath::DirectSmall => conv_direct_small(conv, x, n, h, w, oh, ow, out, out_channels, residual),
        ConvPath::Shifted3x3 => conv3x3_shifted(conv, x, n, h, w, out, out_channels, residual),
        ConvPath::Im2colGemm => conv_gemm(conv, x, n, h, w, oh, ow, out, out_channels, residual),
        ConvPath::Depthwise => {
            assert!(
                conv.groups == conv.cin && conv.groups == conv.cout,
                "only depthwise grouped convolutions are used"
            );
            conv_depthwise(conv, x, n, h, w, oh, ow, out, out_channels, residual)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn conv_gemm(
    conv: &Conv,
    x: &[f32],
    n: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    out: SharedMut,
    out_channels: usize,
    residual: Option<&[f32]>,
) {
    let (k, s, p) = (conv.kernel, conv.stride, conv.pad);
    let depth = conv.cin * k * k;
    let npix = oh * ow;
    let direct = k == 1 && s == 1 && p == 0;
    let pix_chunk = npix.min((COLUMN_BUDGET / depth).max(64));
    let pix_tasks = npix.div_ceil(pix_chunk);
    let co_tasks = (MIN_TASKS.div_ceil(n * pix_tasks)).min(conv.cout.div_ceil(16)).max(1);
    let co_chunk = conv.cout.div_ceil(co_tasks);
    let tasks: Vec<(usize, usize, usize)> =
        (0..n).flat_map(|b| (0..pix_tasks).flat_map(move |pt| (0..co_tasks).map(move |ct| (b, pt, ct)))).collect();
    tasks.into_par_iter().for_each(|(b, pt, ct)| {
        let p0 = pt * pix_chunk;
        let np = pix_chunk.min(npix - p0);
        let co0 = ct * co_chunk;
        let nco = co_chunk.min(conv.cout - co0);
        if nco == 0 {
            return;
        }
        let xb = &x[b * conv.cin * h * w..(b + 1) * conv.cin * h * w];
        let c_ptr = unsafe { out.get().add(((b * out_channels + conv.out_channel_offset + co0) * npix) + p0) };
        let a = &conv.weight[co0 * depth..];
        let gemm = |bmat: *const f32, rsb: isize| unsafe {
            sgemm(nco, depth, np, a.as_ptr(), depth as isize, bmat, rsb, c_ptr, npix as isize);
        };
        if direct {
            gemm(xb[p0..].as_ptr(), (h * w) as isize);
        } else {
            COLUMNS.with(|cols| {
                let mut cols = cols.borrow_mut();
                cols.resize(depth * np, 0.0);
                im2col(xb, conv.cin, h, w, k, s, p, ow, p0, np, &mut cols);
                gemm(cols.as_ptr(), np as isize);
            });
        }
        for co in co0..co0 + nco {
            let row = unsafe {
                std::slice::from_raw_parts_mut(
                    out.get().add((b * out_channels + conv.out_channel_offset + co) * npix + p0),
                    np,
                )
            };
            let res = residual.map(|r| &r[(b * conv.cout + co) * npix + p0..][..np]);
            epilogue_fast(row, conv.bias[co], res, conv.act);
        }
    });
}

/// `v = act(v + bias [+ residual])` over a row, with the activation chosen once so the loop vectorises.
#[inline(always)]
fn epilogue(row: &mut [f32], bias: f32, residual: Option<&[f32]>, act: Act) {
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

/// Writes one output channel from a band of *grid* pixels `px0..px0 + band.len()`: grid rows are `wq`
/// wide and only their first `ow` pixels are output pixels (the rest are padding columns computed as
/// junk). Output pixel (y, x) becomes `act(band + bias + residual[y·ow + x])` at `out + plane_at +
/// y·ow + x`; `residual` is the channel's plane.
///
/// # Safety
/// The output pixels written must lie in `out`'s buffer and belong to the caller alone.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn store_grid(
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
        orow.copy_from_slice(&band[lo - px0..hi - px0]);
        epilogue_fast(orow, bias, residual.map(|r| &r[at..at + hi - lo]), act);
    }
}

/// `C[m×n] = A[m×k] · B[k×n]`, all row-major with the given row strides, on the calling thread.
///
/// # Safety
/// The pointers must cover the matrices their sizes and strides describe; C must not alias A or B.
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    a: *const f32,
    rsa: isize,
    b: *const f32,
    rsb: isize,
    c: *mut f32,
    rsc: isize,
) {
    // gemm's convention: dst = alpha·dst + beta·lhs·rhs; with read_dst false, dst is only written.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            rsc,
            false,
            a,
            1,
            rsa,
            b,
            1,
            rsb,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    };
}

/// The output columns `lo..hi` whose input column `ox·s + kx − p` lies inside `[0, w)`.
#[inline(always)]
pub(super) fn valid_columns(kx: usize, s: usize, p: usize, w: usize, ow: usize) -> (usize, usize) {
    let lo = p.saturating_sub(kx).div_ceil(s).min(ow);
    let hi = if w + p > kx { ((w + p - kx - 1) / s + 1).min(ow) } else { 0 }.max(lo);
    (lo, hi)
}

/// Splits a row into its even columns (first `ceil(w/2)` slots of `split`) and odd columns (after
/// them), so a stride-2 tap reads one contiguous run.
#[inline(always)]
fn split_even_odd(src: &[f32], split: &mut [f32]) {
    let w = src.len();
    let half = w.div_ceil(2);
    let (even, odd) = split.split_at_mut(half);
    for ((e, o), pair) in even.iter_mut().zip(odd.iter_mut()).zip(src.chunks_exact(2)) {
        *e = pair[0];
        *o = pair[1];
    }
    if w % 2 == 1 {
        even[half - 1] = src[w - 1];
    }
}

/// Convolutions with at most this many taps per output (cin·k·k) are computed directly: a GEMM with so
/// short a reduction spends its time packing (the 3→8 stem, 8→16 pointwise layers of MobileNet x0.25).
const DIRECT_MAX_TAPS: usize = 32;

/// Direct convolution over bands of output rows: for each output row, every input row a tap needs is
/// read once and added, weighted, into the accumulator rows of all output channels (which stay in L1),
/// so the input is streamed once rather than once per output channel. Taps in (ci, ky, kx) order.
#[allow(clippy::too_many_arguments)]
fn conv_direct_small(
    conv: &Conv,
    x: &[f32],
    n: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    out: SharedMut,
    out_channels: usize,
    residual: Option<&[f32]>,
) {
    let band = oh.div_ceil(MIN_TASKS.div_ceil(n)).max(1);
    let bands = oh.div_ceil(band);
    (0..n * bands).into_par_iter().for_each_init(Vec::new, |scratch: &mut Vec<f32>, task| {
        let (b, bi) = (task / bands, task % bands);
        let rows = bi * band..((bi + 1) * band).min(oh);
        let d = DirectBand {
            conv,
            input: &x[b * conv.cin * h * w..(b + 1) * conv.cin * h * w],
            residual: residual.map(|r| &r[b * conv.cout * oh * ow..(b + 1) * conv.cout * oh * ow]),
            out,
            out_base: (b * out_channels + conv.out_channel_offset) * oh * ow,
            h,
            w,
            oh,
            ow,
        };
        direct_band_fast(&d, rows.start, rows.end, scratch);
    });
}

struct DirectBand<'a> {
    conv: &'a Conv,
    /// All input channels of one image.
    input: &'a [f32],
    /// [cout, oh, ow] of the same image.
    residual: Option<&'a [f32]>,
    out: SharedMut,
    /// Offset of this image's first output channel in `out`.
    out_base: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
}

#[inline(always)]
fn direct_band(d: &DirectBand<'_>, y0: usize, y1: usize, scratch: &mut Vec<f32>) {
    let c = d.conv;
    let (k, s, p, h, w, ow) = (c.kernel, c.stride, c.pad, d.h, d.w, d.ow);
    let half = w.div_ceil(2);
    scratch.clear();
    scratch.resize(c.cout * ow + w + 1, 0.0);
    let (acc, split) = scratch.split_at_mut(c.cout * ow);
    for oy in y0..y1 {
        acc.fill(0.0);
        for ci in 0..c.cin {
            let plane = &d.input[ci * h * w..(ci + 1) * h * w];
            for ky in 0..k {
                let iy = (oy * s + ky) as isize - p as isize;
                if iy < 0 || iy as usize >= h {
                    continue;
                }
                let src = &plane[iy as usize * w..(iy as usize + 1) * w];
                if s == 2 {
                    split_even_odd(src, split);
                }
                for kx in 0..k {
                    let (lo, hi) = valid_columns(kx, s, p, w, ow);
                    if lo >= hi {
                        continue;
                    }
                    let first = lo * s + kx - p;
                    let tap = (ci * k + ky) * k + kx;
                    for co in 0..c.cout {
                        let wv = c.weight[co * c.cin * k * k + tap];
                        let a = &mut acc[co * ow + lo..co * ow + hi];
                        match s {
                            1 => a.iter_mut().zip(&src[first..]).for_each(|(v, &xv)| *v += wv * xv),
                            2 => {
                                let base = (first & 1) * half + first / 2;
                                a.iter_mut().zip(&split[base..]).for_each(|(v, &xv)| *v += wv * xv)
                            }
                            // Other strides do not occur in these networks; gather them plainly.
                            _ => a.iter_mut().enumerate().for_each(|(j, v)| *v += wv * src[first + j * s]),
                        }
                    }
                }
            }
        }
        for co in 0..c.cout {
            let orow =
                unsafe { std::slice::from_raw_parts_mut(d.out.get().add(d.out_base + co * d.oh * ow + oy * ow), ow) };
            orow.copy_from_slice(&acc[co * ow..(co + 1) * ow]);
            epilogue(orow, c.bias[co], d.residual.map(|r| &r[co * d.oh * ow + oy * ow..][..ow]), c.act);
        }
    }
}

/// 3×3, stride 1, padding 1, without im2col: the input is copied once into a zero-padded plane of width
/// w + 2, in which tap (ky, kx) of every output pixel of a row band is one contiguous run. So the conv is
/// nine GEMMs accumulating into the band, `C += W[:, :, ky, kx] · X_pad[:, shifted]`, computed over the
/// padded width (two junk columns per row, dropped by the epilogue).
#[allow(clippy::too_many_arguments)]
fn conv3x3_shifted(
    conv: &Conv,
    x: &[f32],
    n: usize,
    h: usize,
    w: usize,
    out: SharedMut,
    out_channels: usize,
    residual: Option<&[f32]>,
) {
    let cin = conv.cin;
    let (hp, wp) = (h + 2, w + 2);
    let plane = hp * wp;
    // Two spare floats: the junk columns of the last row of the last channel read past its plane.
    let mut padded = vec![0.0f32; n * cin * plane + 2];
    padded[..n * cin * plane].par_chunks_mut(plane).enumerate().for_each(|(bc, dst)| {
        let src = &x[bc * h * w..(bc + 1) * h * w];
        for y in 0..h {
            dst[(y + 1) * wp + 1..(y + 1) * wp + 1 + w].copy_from_slice(&src[y * w..(y + 1) * w]);
        }
    });
    let band_rows = (COLUMN_BUDGET / (conv.cout.min(256) * wp)).clamp(1, h);
    let row_tasks = h.div_ceil(band_rows);
    let co_tasks = (MIN_TASKS.div_ceil(n * row_tasks)).min(conv.cout.div_ceil(16)).max(1);
    let co_chunk = conv.cout.div_ceil(co_tasks);
    let tasks: Vec<(usize, usize, usize)> =
        (0..n).flat_map(|b| (0..row_tasks).flat_map(move |rt| (0..co_tasks).map(move |ct| (b, rt, ct)))).collect();
    let padded = &padded;
    tasks.into_par_iter().for_each_init(Vec::new, |band: &mut Vec<f32>, (b, rt, ct)| {
        let y0 = rt * band_rows;
        let rows = band_rows.min(h - y0);
        let co0 = ct * co_chunk;
        let nco = co_chunk.min(conv.cout.saturating_sub(co0));
        if nco == 0 || rows == 0 {
            return;
        }
        let np = rows * wp;
        band.resize(nco * np, 0.0);
        let xb = &padded[b * cin * plane..];
        for t in 0..9 {
            let (ky, kx) = (t / 3, t % 3);
            unsafe {
                gemm::gemm(
                    nco,
                    np,
                    cin,
                    band.as_mut_ptr(),
                    1,
                    np as isize,
                    t > 0,
                    conv.weight.as_ptr().add(co0 * cin * 9 + t),
                    9,
                    (cin * 9) as isize,
                    xb.as_ptr().add((y0 + ky) * wp + kx),
                    1,
                    plane as isize,
                    1.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            };
        }
        for co in co0..co0 + nco {
            let res = residual.map(|r| &r[(b * conv.cout + co) * h * w..][..h * w]);
            let plane_at = (b * out_channels + conv.out_channel_offset + co) * h * w;
            // SAFETY: rows y0..y0 + rows of channel co of image b are this task's alone.
            unsafe {
                store_grid(&band[(co - co0) * np..][..np], y0 * wp, wp, w, out, plane_at, conv.bias[co], res, conv.act)
            };
        }
    });
}

/// Rows (ci, ky, kx), columns the output pixels p0..p0+np (flattened y·ow + x); zero padding.
/// Copies whole runs of each output row: for a given tap, the valid output columns form one interval.
#[allow(clippy::too_many_arguments)]
fn im2col(
    x: &[f32],
    cin: usize,
    h: usize,
    w: usize,
    k: usize,
    s: usize,
    p: usize,
    ow: usize,
    p0: usize,
    np: usize,
    cols: &mut [f32],
) {
    let p1 = p0 + np;
    for ci in 0..cin {
        let plane = &x[ci * h * w..(ci + 1) * h * w];
        for ky in 0..k {
            for kx in 0..k {
                let row = &mut cols[((ci * k + ky) * k + kx) * np..][..np];
                // Output columns whose input column ox·s + kx − p lies in [0, w).
                let (lo, hi) = valid_columns(kx, s, p, w, ow);
                let mut pix = p0;
                while pix < p1 {
                    let (oy, ox0) = (pix / ow, pix % ow);
                    let run = (ow - ox0).min(p1 - pix);
                    let dst = &mut row[pix - p0..pix - p0 + run];
                    let iy = (oy * s + ky) as isize - p as isize;
                    if iy < 0 || iy as usize >= h {
                        dst.fill(0.0);
                    } else {
                        let src = &plane[iy as usize * w..(iy as usize + 1) * w];
                        let (a, b) = (lo.clamp(ox0, ox0 + run), hi.clamp(ox0, ox0 + run));
                        dst[..a - ox0].fill(0.0);
                        dst[b.max(a) - ox0..].fill(0.0);
                        if a < b {
                            let d = &mut dst[a - ox0..b - ox0];
                            let first = a * s + kx - p;
                            if s == 1 {
                                d.copy_from_slice(&src[first..first + d.len()]);
                            } else {
                                for (j, v) in d.iter_mut().enumerate() {
                                    *v = src[first + j * s];
                                }
                            }
                        }
                    }
                    pix += run;
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn conv_depthwise(
    conv: &Conv,
    x: &[f32],
    n: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    out: SharedMut,
    out_channels: usize,
    residual: Option<&[f32]>,
) {
    let k = conv.kernel;
    let c = conv.cout;
    (0..n * c).into_par_iter().for_each_init(Vec::new, |scratch: &mut Vec<f32>, bc| {
        let (b, ch) = (bc / c, bc % c);
        let o = unsafe {
            std::slice::from_raw_parts_mut(
                out.get().add((b * out_channels + conv.out_channel_offset + ch) * oh * ow),
                oh * ow,
            )
        };
        let plane = DwPlane {
            input: &x[bc * h * w..(bc + 1) * h * w],
            weight: &conv.weight[ch * k * k..(ch + 1) * k * k],
            bias: conv.bias[ch],
            residual: residual.map(|r| &r[(b * c + ch) * oh * ow..(b * c + ch + 1) * oh * ow]),
            k,
            stride: conv.stride,
            pad: conv.pad,
            h,
            w,
            ow,
            act: conv.act,
        };
        depthwise_plane_fast(&plane, o, scratch);
    });
}

struct DwPlane<'a> {
    input: &'a [f32],
    weight: &'a [f32],
    bias: f32,
    residual: Option<&'a [f32]>,
    k: usize,
    stride: usize,
    pad: usize,
    h: usize,
    w: usize,
    ow: usize,
    act: Act,
}

/// One depthwise output plane, a row at a time, tap by tap: each tap adds a shifted input row to the
/// accumulator row, which vectorises; every output sums its taps in (ky, kx) order. For stride 2 the
/// input row is first split into even and odd columns so every tap reads a contiguous run.
#[inline(always)]
fn depthwise_plane(d: &DwPlane<'_>, out: &mut [f32], scratch: &mut Vec<f32>) {
    let (k, s, p, h, w, ow) = (d.k, d.stride, d.pad, d.h, d.w, d.ow);
    let oh = out.len() / ow;
    scratch.clear();
    scratch.resize(ow + w + 1, 0.0);
    let (acc, split) = scratch.split_at_mut(ow);
    for oy in 0..oh {
        acc.fill(0.0);
        for ky in 0..k {
            let iy = (oy * s + ky) as isize - p as isize;
            if iy < 0 || iy as usize >= h {
                continue;
            }
            let src = &d.input[iy as usize * w..(iy as usize + 1) * w];
            let half = w.div_ceil(2);
            if s == 2 {
                split_even_odd(src, split);
            }
            for kx in 0..k {
                let wv = d.weight[ky * k + kx];
                let (lo, hi) = valid_columns(kx, s, p, w, ow);
                if lo >= hi {
                    continue;
                }
                let first = lo * s + kx - p;
                let run: &[f32] = if s == 1 {
                    &src[first..first + (hi - lo)]
                } else {
                    let base = (first & 1) * half + first / 2;
                    &split[base..base + (hi - lo)]
                };
                for (v, &xv) in acc[lo..hi].iter_mut().zip(run) {
                    *v += wv * xv;
                }
            }
        }
        let orow = &mut out[oy * ow..(oy + 1) * ow];
        orow.copy_from_slice(acc);
        epilogue(orow, d.bias, d.residual.map(|r| &r[oy * ow..(oy + 1) * ow]), d.act);
    }
}

/// `$name` runs `$body_fn` with AVX2 enabled at level AVX2 or above (which `isa()` only reports when
/// the processor has it): the crate is built for baseline x86-64, whose SSE2 halves the width of these
/// loops. The body is `#[inline(always)]`, so it is compiled
/// inside the AVX2 function. Only vector width changes (no FMA contraction): the results are the same bits.
macro_rules! avx2_dispatch {
    ($vis:vis $name:ident, $avx2:ident, $body_fn:ident, ($($arg:ident: $ty:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        unsafe fn $avx2($($arg: $ty),*) {
            $body_fn($($arg),*)
        }

        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if isa() >= Isa::Avx2 {
                // SAFETY: `isa()` reports AVX2 or above only when the processor supports it.
                return unsafe { $avx2($($arg),*) };
            }
            $body_fn($($arg),*)
        }
    };
}

avx2_dispatch!(depthwise_plane_fast, depthwise_plane_avx2, depthwise_plane, (d: &DwPlane<'_>, out: &mut [f32], scratch: &mut Vec<f32>));
avx2_dispatch!(max_pool_plane_fast, max_pool_plane_avx2, max_pool_plane, (plane: &[f32], h: usize, w: usize, o: &mut [f32], scratch: &mut Vec<f32>));
avx2_dispatch!(pub(super) epilogue_fast, epilogue_avx2, epilogue, (row: &mut [f32], bias: f32, residual: Option<&[f32]>, act: Act));
avx2_dispatch!(direct_band_fast, direct_band_avx2, direct_band, (d: &DirectBand<'_>, y0: usize, y1: usize, scratch: &mut Vec<f32>));

/// 3×3 stride-2 max-pool, padding 1 counted as −∞. `x` [n·c, h, w] → `out` [n·c, oh, ow].
pub fn max_pool_3x3s2(x: &[f32], nc: usize, h: usize, w: usize, out: &mut [f32]) {
    let (oh, ow) = (out_size(h, 3, 2, 1), out_size(w, 3, 2, 1));
    assert_eq!(out.len(), nc * oh * ow);
    out.par_chunks_mut(oh * ow).enumerate().for_each_init(Vec::new, |scratch: &mut Vec<f32>, (i, o)| {
        max_pool_plane_fast(&x[i * h * w..(i + 1) * h * w], h, w, o, scratch);
    });
}

/// One plane, a row at a time: the column-wise max of the (up to) three input rows, which vectorises,
/// then split into even and odd columns so output x takes max(odd[x−1], even[x], odd[x]) from runs.
#[inline(always)]
fn max_pool_plane(plane: &[f32], h: usize, w: usize, o: &mut [f32], scratch: &mut Vec<f32>) {
    let ow = out_size(w, 3, 2, 1);
    let half = w.div_ceil(2);
    scratch.clear();
    scratch.resize(w + 2 * half, 0.0);
    let (vmax, split) = scratch.split_at_mut(w);
    for (oy, orow) in o.chunks_exact_mut(ow).enumerate() {
        let rows = (oy * 2).saturating_sub(1)..(oy * 2 + 2).min(h);
        vmax.copy_from_slice(&plane[rows.start * w..(rows.start + 1) * w]);
        for iy in rows.start + 1..rows.end {
            vmax.iter_mut().zip(&plane[iy * w..(iy + 1) * w]).for_each(|(m, &v)| *m = m.max(v));
        }
        split_even_odd(vmax, split);
        let (even, odd) = split.split_at(half);
        let odd = &odd[..w / 2];
        // Column 2x−1 (odd[x−1]) exists for x ≥ 1, column 2x+1 (odd[x]) while 2x+1 < w.
        orow[0] = if odd.is_empty() { even[0] } else { even[0].max(odd[0]) };
        let both = odd.len().min(ow);
        for x in 1..both {
            orow[x] = odd[x - 1].max(even[x]).max(odd[x]);
        }
        for x in both.max(1)..ow {
            orow[x] = odd[x - 1].max(even[x]);
        }
    }
}

/// PyTorch's `nearest` source index for an explicit output size: `min(floor(dst · (in/out as f32)), in − 1)`.
pub fn nearest_index(dst: usize, input: usize, output: usize) -> usize {
    let scale = input as f32 / output as f32;
    ((dst as f32 * scale).floor() as usize).min(input - 1)
}

/// `dst[i, y, x] += src[i, ny(y), nx(x)]` with the nearest rule; `src` [nc, sh, sw], `dst` [nc, dh, dw].
pub fn upsample_nearest_add(src: &[f32], sh: usize, sw: usize, dst: &mut [f32], dh: usize, dw: usize) {
    let ys: Vec<usize> = (0..dh).map(|y| nearest_index(y, sh, dh)).collect();
    let xs: Vec<usize> = (0..dw).map(|x| nearest_index(x, sw, dw)).collect();
    dst.par_chunks_mut(dh * dw).enumerate().for_each(|(i, d)| {
        let s = &src[i * sh * sw..(i + 1) * sh * sw];
        for (y, &sy) in ys.iter().enumerate() {
            for (x, &sx) in xs.iter().enumerate() {
                d[y * dw + x] += s[sy * sw + sx];
            }
        }
    });
}

/// Softmax over two logits, as PyTorch computes it: `exp(x − max) / Σ exp(x − max)`.
pub fn softmax2(a: f32, b: f32) -> [f32; 2] {
    let m = a.max(b);
    let (ea, eb) = ((a - m).exp(), (b - m).exp());
    let s = ea + eb;
    [ea / s, eb / s]
}

/// Scatters one level's head tensor (one image, [32, h, w]) into the flat anchor layout:
/// anchor `(y·w + x)·2 + j`, `loc` [A, 4], `conf` [A, 2] softmaxed, `landmarks` [A, 10].
pub fn heads_to_anchors(head: &[f32], h: usize, w: usize, loc: &mut [f32], conf: &mut [f32], landmarks: &mut [f32]) {
    let hw = h * w;
    for pix in 0..hw {
        for j in 0..2 {
            let a = pix * 2 + j;
            let ch = |c: usize| head[c * hw + pix];
            let s = softmax2(ch(HEAD_CLASS_OFFSET + 2 * j), ch(HEAD_CLASS_OFFSET + 2 * j + 1));
            conf[a * 2..a * 2 + 2].copy_from_slice(&s);
            for d in 0..4 {
                loc[a * 4 + d] = ch(HEAD_BOX_OFFSET + 4 * j + d);
            }
            for d in 0..10 {
                landmarks[a * 10 + d] = ch(HEAD_LANDMARK_OFFSET + 10 * j + d);
            }
        }
    }
}

/// u8 HWC BGR pixels to f32 CHW minus the reference means (B 104, G 117, R 123).
pub const BGR_MEAN: [f32; 3] = crate::consts::BGR_MEAN;

pub fn preprocess(bgr: &[u8], h: usize, w: usize, out: &mut [f32]) {
    assert_eq!(bgr.len(), h * w * 3);
    assert_eq!(out.len(), 3 * h * w);
    for (c, plane) in out.chunks_mut(h * w).enumerate() {
        for (i, v) in plane.iter_mut().enumerate() {
            *v = bgr[i * 3 + c] as f32 - BGR_MEAN[c];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, one output at a time, in f64: what every fast path must agree with.
    #[allow(clippy::too_many_arguments)]
    fn conv_naive(
        c: &Conv,
        x: &[f32],
        n: usize,
        h: usize,
        w: usize,
        out_channels: usize,
        residual: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let (k, s, p) = (c.kernel, c.stride, c.pad);
        let (oh, ow) = (out_size(h, k, s, p), out_size(w, k, s, p));
        let cg = c.cin / c.groups;
        let og = c.cout / c.groups;
        for b in 0..n {
            for co in 0..c.cout {
                let g = co / og;
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = 0.0f64;
                        for ci in 0..cg {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let (iy, ix) =
                                        ((oy * s + ky) as isize - p as isize, (ox * s + kx) as isize - p as isize);
                                    if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                        let xv =
                                            x[((b * c.cin + g * cg + ci) * h + iy as usize) * w + ix as usize] as f64;
                                        acc += xv * c.weight[((co * cg + ci) * k + ky) * k + kx] as f64;
                                    }
                                }
                            }
                        }
                        let mut v = acc as f32 + c.bias[co];
                        if let Some(r) = residual {
                            v += r[((b * c.cout + co) * oh + oy) * ow + ox];
                        }
                        out[((b * out_channels + c.out_channel_offset + co) * oh + oy) * ow + ox] = c.act.apply(v);
                    }
                }
            }
        }
    }

    #[test]
    fn every_conv_path_matches_the_definition() {
        let mut seed = 99u64;
        let mut rnd = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / 16777216.0) * 2.0 - 1.0
        };
        // (n, cin, cout, k, stride, groups, h, w, act, residual, channel offset within a wider output)
        let cases = [
            (2, 5, 7, 3, 1, 1, 9, 13, Act::Leaky(0.1), true, 3), // shifted 3x3 path, batch, residual, offset
            (1, 16, 33, 3, 1, 1, 17, 6, Act::Relu6, false, 0),   // shifted, odd sizes
            (2, 3, 8, 3, 2, 1, 11, 7, Act::Leaky(0.0), false, 0), // im2col, stride 2 (the MobileNet stem)
            (1, 3, 16, 7, 2, 1, 15, 9, Act::Leaky(0.0), false, 0), // 7x7 stem
            (2, 12, 20, 1, 1, 1, 5, 9, Act::None, true, 4),      // 1x1, few channels: direct path
            (2, 40, 20, 1, 1, 1, 5, 9, Act::None, true, 4),      // 1x1 GEMM straight on the input
            (1, 3, 5, 3, 1, 1, 6, 7, Act::Leaky(0.1), true, 1),  // 3x3 s1, 27 taps: direct path
            (1, 12, 20, 1, 2, 1, 9, 5, Act::None, false, 0),     // 1x1 stride 2, direct path
            (1, 64, 20, 1, 2, 1, 9, 5, Act::None, false, 0),     // 1x1 stride 2 (downsample), im2col GEMM
            (1, 8, 6, 3, 2, 1, 9, 9, Act::Leaky(0.1), false, 0), // 3x3 s2 with 72 taps: im2col GEMM
            (2, 10, 10, 3, 1, 10, 7, 11, Act::Relu6, true, 0),   // depthwise stride 1
            (1, 9, 9, 3, 2, 9, 8, 13, Act::Leaky(0.1), false, 2), // depthwise stride 2, odd width
            (1, 40, 27, 3, 1, 1, 8, 8, Act::Leaky(0.1), true, 1), // 3x3 with K = 360: two reduction passes
            (2, 300, 13, 1, 1, 1, 4, 8, Act::Relu6, false, 0),   // 1x1 over 32 pixels (copied planes), K = 300
            (1, 20, 14, 1, 1, 1, 8, 8, Act::None, true, 0),      // 1x1, 64 pixels: copied planes, few channels
            (1, 5, 30, 5, 2, 1, 13, 10, Act::Leaky(0.0), false, 0), // 5x5 stride 2: four phases, two taps deep
        ];
        let levels = Isa::supported_levels();
        let kernels: Vec<Kernel> = levels.iter().filter_map(|&l| Kernel::for_isa(l)).collect();
        let mut exercised = std::collections::HashSet::new();
        for (n, cin, cout, k, stride, groups, h, w, act, with_res, off) in cases {
            let conv = Conv {
                name: "test".into(),
                input: 0,
                output: 1,
                out_channel_offset: off,
                cin,
                cout,
                kernel: k,
                stride,
                pad: (k - 1) / 2,
                groups,
                weight: (0..cout * (cin / groups) * k * k).map(|_| rnd()).collect(),
                bias: (0..cout).map(|_| rnd()).collect(),
                residual: None,
                act,
                packed: Default::default(),
            };
            let x: Vec<f32> = (0..n * cin * h * w).map(|_| rnd() * 3.0).collect();
            let (oh, ow) = (out_size(h, k, stride, conv.pad), out_size(w, k, stride, conv.pad));
            let res: Option<Vec<f32>> = with_res.then(|| (0..n * cout * oh * ow).map(|_| rnd()).collect());
            let oc = cout + off + 1;
            let mut want = vec![f32::NAN; n * oc * oh * ow];
            conv_naive(&conv, &x, n, h, w, oc, res.as_deref(), &mut want);
            // What every level this processor runs would choose, every portable path, and each
            // micro-kernel wherever it applies (not only where it is preferred).
            let mut paths: Vec<ConvPath> = levels.iter().map(|&l| choose_path(&conv, h, w, l)).collect();
            paths.extend(fallback_paths(&conv));
            if igemm::handles(&conv) && igemm::fits(&conv, h, w) {
                paths.extend(kernels.iter().map(|&k| ConvPath::Igemm(k)));
            }
            paths.dedup();
            for path in paths {
                if let ConvPath::Igemm(k) = path {
                    exercised.insert(k.isa());
                }
                let mut got = vec![f32::NAN; n * oc * oh * ow];
                conv2d_on(path, &conv, &x, n, h, w, &mut got, oc, res.as_deref());
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    let c = (i / (oh * ow)) % oc;
                    if c < off || c >= off + cout {
                        assert!(
                            g.is_nan(),
                            "{path:?} k{k} s{stride} g{groups}: channel {c} outside the conv was written"
                        );
                    } else {
                        assert!(
                            (g - e).abs() <= 1e-4 * e.abs().max(1.0),
                            "{path:?} k{k} s{stride} g{groups} {h}x{w}: element {i}: {g} vs {e}"
                        );
                    }
                }
            }
        }
        for k in &kernels {
            assert!(exercised.contains(&k.isa()), "the {k:?} kernel was exercised");
        }
        println!("levels tested: {levels:?}");
    }

    #[test]
    fn max_pool_matches_the_definition() {
        let mut seed = 7u64;
        for (h, w) in [(1, 1), (1, 2), (2, 3), (3, 4), (5, 7), (8, 8), (9, 16), (17, 33)] {
            let x: Vec<f32> = (0..2 * h * w)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (seed >> 40) as f32 / 16777216.0 - 0.5
                })
                .collect();
            let (oh, ow) = (out_size(h, 3, 2, 1), out_size(w, 3, 2, 1));
            let mut got = vec![f32::NAN; 2 * oh * ow];
            max_pool_3x3s2(&x, 2, h, w, &mut got);
            for c in 0..2 {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut m = f32::NEG_INFINITY;
                        for iy in (2 * oy) as isize - 1..=(2 * oy) as isize + 1 {
                            for ix in (2 * ox) as isize - 1..=(2 * ox) as isize + 1 {
                                if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                    m = m.max(x[(c * h + iy as usize) * w + ix as usize]);
                                }
                            }
                        }
                        assert_eq!(got[(c * oh + oy) * ow + ox], m, "{h}x{w} channel {c} at ({oy}, {ox})");
                    }
                }
            }
        }
    }

    #[test]
    fn each_level_chooses_only_its_own_kernel() {
        let conv = |cin, k, stride| Conv {
            name: "t".into(),
            input: 0,
            output: 1,
            out_channel_offset: 0,
            cin,
            cout: 16,
            kernel: k,
            stride,
            pad: k / 2,
            groups: 1,
            weight: vec![0.0; 16 * cin * k * k],
            bias: vec![0.0; 16],
            residual: None,
            act: Act::None,
            packed: Default::default(),
        };
        for c in [conv(64, 3, 1), conv(3, 3, 2), conv(16, 1, 1)] {
            assert_eq!(choose_path(&c, 40, 40, Isa::Avx512), ConvPath::Igemm(Kernel::Avx512));
            assert_eq!(choose_path(&c, 40, 40, Isa::Avx2), ConvPath::Igemm(Kernel::Avx2));
            assert!(!matches!(choose_path(&c, 40, 40, Isa::Portable), ConvPath::Igemm(_)));
        }
    }

    #[test]
    fn isa_names_parse_and_unknown_ones_are_refused() {
        for l in Isa::ALL {
            assert_eq!(Isa::parse(l.name()).unwrap(), l);
        }
        assert_eq!(Isa::parse(" AVX2 ").unwrap(), Isa::Avx2);
        let e = Isa::parse("sse4").unwrap_err().to_string();
        assert!(e.contains("sse4") && e.contains("avx512, avx2 or portable"), "{e}");
        assert!(Isa::Portable.supported());
        assert_eq!(Isa::supported_levels().last(), Some(&Isa::Portable));
        assert!(Isa::best().supported());
    }

    /// Every path other than the micro-kernels that computes `conv` (what the portable level runs).
    fn fallback_paths(conv: &Conv) -> Vec<ConvPath> {
        if conv.groups != 1 {
            return vec![ConvPath::Depthwise];
        }
        let mut paths = vec![ConvPath::Im2colGemm];
        if conv.cin * conv.kernel * conv.kernel <= DIRECT_MAX_TAPS {
            paths.push(ConvPath::DirectSmall);
        }
        if conv.kernel == 3 && conv.stride == 1 && conv.pad == 1 {
            paths.push(ConvPath::Shifted3x3);
        }
        paths
    }
}
