//! Depthwise convolutions (groups = cin = cout), one output plane per task.

use super::common::{SharedMut, epilogue, epilogue_fast};
use crate::cpu::isa::{Isa, avx2_dispatch};
use crate::cpu::rows::{split_even_odd, valid_columns};
use crate::graph::{Act, Conv};
use rayon::prelude::*;

/// Each output plane of a depthwise `conv`, one task per plane.
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
        if level >= Isa::Avx2 && k == 3 && conv.pad == 1 && (conv.stride == 1 || conv.stride == 2) {
            // The register-blocked rows of the fused path (all nine taps per output vector, AVX-512
            // wide at that level, fused multiply-adds), with the epilogue; a residual is added after
            // (bias then residual, as `epilogue` orders them).
            let weight: &[f32; 9] = plane.weight.try_into().expect("3x3 depthwise weights");
            let (bias, act) = if plane.residual.is_some() { (0.0, Act::None) } else { (plane.bias, plane.act) };
            // In chunks of rows, so a stride-2 plane's split rows stay in L1.
            const ROWS: usize = 8;
            for (i, rows) in o.chunks_mut(ROWS * ow).enumerate() {
                super::dwpw::depthwise3x3_rows(
                    level,
                    plane.input,
                    h,
                    w,
                    conv.stride,
                    weight,
                    bias,
                    act,
                    i * ROWS,
                    rows,
                    ow,
                    scratch,
                    0,
                );
            }
            if plane.residual.is_some() {
                epilogue_fast(level, o, plane.bias, plane.residual, plane.act);
            }
            return;
        }
        depthwise_plane_fast(level, &plane, o, scratch);
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

avx2_dispatch!(depthwise_plane_fast, depthwise_plane_avx2, depthwise_plane, (d: &DwPlane<'_>, out: &mut [f32], scratch: &mut Vec<f32>));
