//! 3×3 stride-1 convolutions as nine shifted GEMMs on a zero-padded plane (the portable level's path for
//! the networks' 3×3 layers).

use super::common::{COLUMN_BUDGET, SharedMut, min_tasks, store_grid};
use crate::cpu::isa::Isa;
use crate::graph::Conv;
use rayon::prelude::*;

/// 3×3, stride 1, padding 1, without im2col: the input is copied once into a zero-padded plane of width
/// w + 2, in which tap (ky, kx) of every output pixel of a row band is one contiguous run. So the conv is
/// nine GEMMs accumulating into the band, `C += W[:, :, ky, kx] · X_pad[:, shifted]`, computed over the
/// padded width (two junk columns per row, dropped by the epilogue).
#[allow(clippy::too_many_arguments)]
pub(super) fn conv(
    level: Isa,
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
    let co_tasks = (min_tasks().div_ceil(n * row_tasks)).min(conv.cout.div_ceil(16)).max(1);
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
                store_grid(
                    level,
                    &band[(co - co0) * np..][..np],
                    y0 * wp,
                    wp,
                    w,
                    out,
                    plane_at,
                    conv.bias[co],
                    res,
                    conv.act,
                )
            };
        }
    });
}
