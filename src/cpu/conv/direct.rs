//! The direct path for convolutions with few taps per output (the 3→8 stem and the 8→16 pointwise
//! layers of MobileNet x0.25), where a GEMM would spend its time packing.

use super::common::{SharedMut, epilogue, min_tasks};
use crate::cpu::isa::{Isa, avx2_dispatch};
use crate::cpu::rows::{split_even_odd, valid_columns};
use crate::graph::Conv;
use rayon::prelude::*;

/// Convolutions with at most this many taps per output (cin·k·k) are computed directly: a GEMM with so
/// short a reduction spends its time packing (the 3→8 stem, 8→16 pointwise layers of MobileNet x0.25).
pub(super) const MAX_TAPS: usize = 32;

/// Direct convolution over bands of output rows: for each output row, every input row a tap needs is
/// read once and added, weighted, into the accumulator rows of all output channels (which stay in L1),
/// so the input is streamed once rather than once per output channel. Taps in (ci, ky, kx) order.
#[allow(clippy::too_many_arguments)]
pub(super) fn conv(
    level: Isa,
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
    let band = oh.div_ceil(min_tasks().div_ceil(n)).max(1);
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
        direct_band_fast(level, &d, rows.start, rows.end, scratch);
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

avx2_dispatch!(direct_band_fast, direct_band_avx2, direct_band, (d: &DirectBand<'_>, y0: usize, y1: usize, scratch: &mut Vec<f32>));
