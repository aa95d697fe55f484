//! The CPU engine's input transpose, max-pool and nearest upsample-add: the same operations as
//! `crate::reference`'s, row vectorised (the pool, under AVX2 where the level allows) and threaded over
//! planes or rows. Convolutions are in `super::conv`.

use super::isa::{Isa, avx2_dispatch, isa};
use super::rows::split_even_odd;
use crate::reference::{nearest_index, out_size};
use rayon::prelude::*;

/// `reference::preprocess` (u8 HWC BGR to f32 CHW minus the means, exact) threaded over bands of rows,
/// each reading its interleaved pixels once for all three planes.
pub fn preprocess(bgr: &[u8], h: usize, w: usize, out: &mut [f32]) {
    assert_eq!(bgr.len(), h * w * 3, "preprocess input size");
    assert_eq!(out.len(), 3 * h * w, "preprocess output size");
    let m = crate::reference::BGR_MEAN;
    // Bands of at least 16 rows, about four per thread.
    let rows = h.div_ceil(4 * rayon::current_num_threads()).max(16).min(h.max(1));
    let band = (rows * w).max(1);
    let (b, rest) = out.split_at_mut(h * w);
    let (g, r) = rest.split_at_mut(h * w);
    b.par_chunks_mut(band).zip(g.par_chunks_mut(band)).zip(r.par_chunks_mut(band)).enumerate().for_each(
        |(i, ((b, g), r))| {
            let px = &bgr[i * band * 3..][..b.len() * 3];
            for (j, p) in px.chunks_exact(3).enumerate() {
                b[j] = p[0] as f32 - m[0];
                g[j] = p[1] as f32 - m[1];
                r[j] = p[2] as f32 - m[2];
            }
        },
    );
}

/// 3×3 stride-2 max-pool, padding 1 counted as −∞. `x` [n·c, h, w] → `out` [n·c, oh, ow].
pub fn max_pool_3x3s2(x: &[f32], nc: usize, h: usize, w: usize, out: &mut [f32]) {
    max_pool_at(isa(), x, nc, h, w, out)
}

/// `max_pool_3x3s2` with `level`'s loops.
fn max_pool_at(level: Isa, x: &[f32], nc: usize, h: usize, w: usize, out: &mut [f32]) {
    let (oh, ow) = (out_size(h, 3, 2, 1), out_size(w, 3, 2, 1));
    assert_eq!(out.len(), nc * oh * ow);
    out.par_chunks_mut(oh * ow).enumerate().for_each_init(Vec::new, |scratch: &mut Vec<f32>, (i, o)| {
        max_pool_plane_fast(level, &x[i * h * w..(i + 1) * h * w], h, w, o, scratch);
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

avx2_dispatch!(max_pool_plane_fast, max_pool_plane_avx2, max_pool_plane, (plane: &[f32], h: usize, w: usize, o: &mut [f32], scratch: &mut Vec<f32>));

/// `dst[i, y, x] += src[i, ny(y), nx(x)]` with the nearest rule; `src` [nc, sh, sw], `dst` [nc, dh, dw].
pub fn upsample_nearest_add(src: &[f32], sh: usize, sw: usize, dst: &mut [f32], dh: usize, dw: usize) {
    let ys: Vec<usize> = (0..dh).map(|y| nearest_index(y, sh, dh)).collect();
    let xs: Vec<usize> = (0..dw).map(|x| nearest_index(x, sw, dw)).collect();
    // Exactly twice the size (every FPN level of a map whose sides divide by 32): each source value is
    // added to two neighbours, a loop that vectorises, where the index lookups below gather.
    let doubling = dw == 2 * sw && xs.iter().enumerate().all(|(x, &sx)| sx == x / 2);
    dst.par_chunks_mut(dh * dw).enumerate().for_each(|(i, d)| {
        let s = &src[i * sh * sw..(i + 1) * sh * sw];
        for (y, &sy) in ys.iter().enumerate() {
            let (drow, srow) = (&mut d[y * dw..(y + 1) * dw], &s[sy * sw..(sy + 1) * sw]);
            if doubling {
                for (pair, &v) in drow.chunks_exact_mut(2).zip(srow) {
                    pair[0] += v;
                    pair[1] += v;
                }
            } else {
                for (dv, &sx) in drow.iter_mut().zip(&xs) {
                    *dv += srow[sx];
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference;

    #[test]
    fn threaded_preprocess_equals_the_reference() {
        for (h, w) in [(1, 1), (2, 3), (17, 5), (203, 301), (640, 640)] {
            let bgr: Vec<u8> = (0..h * w * 3).map(|i| (i * 7919 % 251) as u8).collect();
            let mut want = vec![f32::NAN; 3 * h * w];
            reference::preprocess(&bgr, h, w, &mut want);
            let mut got = vec![f32::NAN; 3 * h * w];
            preprocess(&bgr, h, w, &mut got);
            assert!(got == want, "{h}x{w}");
        }
    }

    fn values(seed: &mut u64, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (*seed >> 40) as f32 / 16777216.0 - 0.5
            })
            .collect()
    }

    #[test]
    fn max_pool_at_every_level_equals_the_reference() {
        let mut seed = 7u64;
        for (h, w) in [(1, 1), (1, 2), (2, 3), (3, 4), (5, 7), (8, 8), (9, 16), (17, 33)] {
            let x = values(&mut seed, 2 * h * w);
            let (oh, ow) = (out_size(h, 3, 2, 1), out_size(w, 3, 2, 1));
            let mut want = vec![f32::NAN; 2 * oh * ow];
            reference::max_pool_3x3s2(&x, 2, h, w, &mut want);
            for level in Isa::supported_levels() {
                let mut got = vec![f32::NAN; 2 * oh * ow];
                max_pool_at(level, &x, 2, h, w, &mut got);
                assert_eq!(got, want, "{h}x{w} at {level:?}");
            }
        }
    }

    #[test]
    fn upsample_add_equals_the_reference() {
        let mut seed = 3u64;
        for ((sh, sw), (dh, dw)) in [
            ((1, 1), (1, 2)),
            ((3, 5), (5, 10)),
            ((20, 20), (40, 40)),
            ((7, 4), (13, 7)),
            ((20, 20), (39, 40)),
            ((20, 20), (40, 39)),
        ] {
            let src = values(&mut seed, 3 * sh * sw);
            let dst = values(&mut seed, 3 * dh * dw);
            let (mut want, mut got) = (dst.clone(), dst);
            reference::upsample_nearest_add(&src, sh, sw, &mut want, dh, dw);
            upsample_nearest_add(&src, sh, sw, &mut got, dh, dw);
            assert_eq!(got, want, "{sh}x{sw} -> {dh}x{dw}");
        }
    }
}
