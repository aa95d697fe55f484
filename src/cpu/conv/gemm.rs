//! im2col + GEMM (the gemm crate) for dense convolutions no faster path takes; a 1×1 stride-1
//! convolution multiplies straight on the input planes.

use super::common::{COLUMN_BUDGET, SharedMut, epilogue_fast, min_tasks};
use crate::cpu::isa::Isa;
use crate::cpu::rows::valid_columns;
use crate::graph::Conv;
use rayon::prelude::*;
use std::cell::RefCell;

thread_local! {
    static COLUMNS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

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
    let (k, s, p) = (conv.kernel, conv.stride, conv.pad);
    let depth = conv.cin * k * k;
    let npix = oh * ow;
    let direct = k == 1 && s == 1 && p == 0;
    let pix_chunk = npix.min((COLUMN_BUDGET / depth).max(64));
    let pix_tasks = npix.div_ceil(pix_chunk);
    let co_tasks = (min_tasks().div_ceil(n * pix_tasks)).min(conv.cout.div_ceil(16)).max(1);
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
            epilogue_fast(level, row, conv.bias[co], res, conv.act);
        }
    });
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
