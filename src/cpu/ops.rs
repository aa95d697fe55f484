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
    preprocess_at(isa(), bgr, h, w, out)
}

/// `preprocess` with `level`'s loops.
fn preprocess_at(level: Isa, bgr: &[u8], h: usize, w: usize, out: &mut [f32]) {
    assert_eq!(bgr.len(), h * w * 3, "preprocess input size");
    assert_eq!(out.len(), 3 * h * w, "preprocess output size");
    // Bands of at least 16 rows, about four per thread.
    let rows = h.div_ceil(4 * rayon::current_num_threads()).max(16).min(h.max(1));
    let band = (rows * w).max(1);
    let (b, rest) = out.split_at_mut(h * w);
    let (g, r) = rest.split_at_mut(h * w);
    b.par_chunks_mut(band)
        .zip(g.par_chunks_mut(band))
        .zip(r.par_chunks_mut(band))
        .enumerate()
        .for_each(|(i, ((b, g), r))| split_planes(level, &bgr[i * band * 3..][..b.len() * 3], b, g, r));
}

/// Interleaved pixels `px` into the runs `b`, `g`, `r` (one value per pixel each) minus the means.
fn split_planes(level: Isa, px: &[u8], b: &mut [f32], g: &mut [f32], r: &mut [f32]) {
    let m = crate::reference::BGR_MEAN;
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if level >= Isa::Avx2 && Isa::Avx2.supported() {
        // SAFETY: the processor supports AVX2, checked just above.
        done = unsafe { split_planes_avx2(px, b, g, r) };
    }
    let _ = level;
    for (j, p) in px.chunks_exact(3).enumerate().skip(done) {
        b[j] = p[0] as f32 - m[0];
        g[j] = p[1] as f32 - m[1];
        r[j] = p[2] as f32 - m[2];
    }
}

/// `split_planes` for whole groups of 16 pixels (48 bytes: three 16-byte loads, each channel's 16
/// bytes gathered from them by three byte shuffles), then widened to f32 eight at a time; returns the
/// pixels done. The same operations per value as the scalar loop (an exact conversion, one rounded
/// subtraction), so the same bits.
///
/// # Safety
/// The processor must support AVX2; `b`, `g`, `r` must hold at least `px.len() / 3` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn split_planes_avx2(px: &[u8], b: &mut [f32], g: &mut [f32], r: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    /// For channel c, the bytes of each 16-byte load that hold it, in pixel order (−1: none).
    const fn masks(c: usize) -> [[i8; 16]; 3] {
        let mut m = [[-1i8; 16]; 3];
        let mut p = 0;
        while p < 16 {
            let byte = 3 * p + c;
            m[byte / 16][p] = (byte % 16) as i8;
            p += 1;
        }
        m
    }
    const MASKS: [[[i8; 16]; 3]; 3] = [masks(0), masks(1), masks(2)];
    let n = px.len() / 3 / 16 * 16;
    assert!(b.len() >= n && g.len() >= n && r.len() >= n, "split_planes_avx2: plane sizes");
    let mean = crate::reference::BGR_MEAN;
    // SAFETY: every load reads 48 bytes of the group (p + 16 ≤ n pixels), every store 16 floats of
    // the planes at p (n ≤ their lengths, checked above); AVX2 per the contract.
    unsafe {
        let shuf: [[__m128i; 3]; 3] = MASKS.map(|c| c.map(|m| _mm_loadu_si128(m.as_ptr() as *const __m128i)));
        let means = mean.map(|v| _mm256_set1_ps(v));
        let planes = [b.as_mut_ptr(), g.as_mut_ptr(), r.as_mut_ptr()];
        let src = px.as_ptr();
        for p in (0..n).step_by(16) {
            let at = src.add(3 * p);
            let v = [0, 16, 32].map(|o| _mm_loadu_si128(at.add(o) as *const __m128i));
            for c in 0..3 {
                let s = &shuf[c];
                let bytes = _mm_or_si128(
                    _mm_or_si128(_mm_shuffle_epi8(v[0], s[0]), _mm_shuffle_epi8(v[1], s[1])),
                    _mm_shuffle_epi8(v[2], s[2]),
                );
                let lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
                let hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(bytes)));
                _mm256_storeu_ps(planes[c].add(p), _mm256_sub_ps(lo, means[c]));
                _mm256_storeu_ps(planes[c].add(p + 8), _mm256_sub_ps(hi, means[c]));
            }
        }
    }
    n
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

    /// Bit for bit at every level: bands whose pixel counts are and are not multiples of the vector
    /// loop's 16, every byte value.
    #[test]
    fn threaded_preprocess_at_every_level_equals_the_reference() {
        for (h, w) in [(1, 1), (2, 3), (1, 16), (1, 17), (17, 5), (16, 32), (203, 301), (640, 640)] {
            let bgr: Vec<u8> = (0..h * w * 3).map(|i| (i * 7919 % 256) as u8).collect();
            let mut want = vec![f32::NAN; 3 * h * w];
            reference::preprocess(&bgr, h, w, &mut want);
            for level in Isa::supported_levels() {
                let mut got = vec![f32::NAN; 3 * h * w];
                preprocess_at(level, &bgr, h, w, &mut got);
                assert!(got == want, "{h}x{w} at {level:?}");
            }
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
