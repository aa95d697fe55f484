//! Row helpers shared by the convolution paths and the max-pool: which output columns a tap reaches
//! inside the image, and the even/odd split that makes stride-2 taps contiguous.

use crate::cpu::isa::Isa;

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
pub(super) fn split_even_odd(src: &[f32], split: &mut [f32]) {
    let w = src.len();
    let half = w.div_ceil(2);
    let (even, odd) = split.split_at_mut(half);
    deinterleave(crate::cpu::isa::isa(), src, even, odd);
    if w % 2 == 1 {
        even[half - 1] = src[w - 1];
    }
}

/// `even[k] = src[2k]` and `odd[k] = src[2k + 1]` for every pair of `src` (a trailing single element is
/// the caller's), with two-register permutes where `level` has them: the stride-2 convolutions split
/// every input row this way, and one element at a time it took as long as the depthwise sums.
#[inline(always)]
pub(crate) fn deinterleave(level: Isa, src: &[f32], even: &mut [f32], odd: &mut [f32]) {
    let pairs = src.len() / 2;
    assert!(
        even.len() >= pairs && odd.len() >= pairs,
        "deinterleave: {pairs} pairs into {} and {}",
        even.len(),
        odd.len()
    );
    #[allow(unused_mut)]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    {
        if level >= Isa::Avx512 && Isa::Avx512.supported() {
            // SAFETY: AVX-512F checked just above; the lengths were asserted.
            done = unsafe { deinterleave_avx512(src, even, odd) };
        } else if level >= Isa::Avx2 && Isa::Avx2.supported() {
            // SAFETY: AVX2 checked just above; the lengths were asserted.
            done = unsafe { deinterleave_avx2(src, even, odd) };
        }
    }
    let _ = level;
    for k in done..pairs {
        even[k] = src[2 * k];
        odd[k] = src[2 * k + 1];
    }
}

/// A row padded by one zero column on the left, split into its even padded columns (`even`) and odd
/// ones (`odd`): padded column j is input column j − 1, so `even[k + 1] = src[2k + 1]`, `odd[k] =
/// src[2k]`. Every slot of both is written (past the row with zeros). Stride-2 taps and Winograd tiles
/// (which start one column left of their outputs) read contiguous runs of these.
#[inline(always)]
pub(crate) fn split_padded(level: Isa, src: &[f32], even: &mut [f32], odd: &mut [f32]) {
    let w = src.len();
    assert!(
        even.len() > w / 2 && odd.len() >= w.div_ceil(2),
        "split_padded: a row of {w} into {} and {}",
        even.len(),
        odd.len()
    );
    deinterleave(level, src, odd, &mut even[1..]);
    even[0] = 0.0;
    even[w / 2 + 1..].fill(0.0);
    if w % 2 == 1 {
        odd[w / 2] = src[w - 1];
    }
    odd[w.div_ceil(2)..].fill(0.0);
}

/// Whole blocks of 16 pairs; returns the pairs done.
///
/// # Safety
/// AVX-512F must be available; `even` and `odd` must hold `src.len() / 2` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn deinterleave_avx512(src: &[f32], even: &mut [f32], odd: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let pairs = src.len() / 2;
    let mut k = 0;
    // SAFETY: k + 16 ≤ pairs, so the loads read src[2k..2k + 32] and the stores write [k..k + 16].
    unsafe {
        let ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let io = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        while k + 16 <= pairs {
            let a = _mm512_loadu_ps(src.as_ptr().add(2 * k));
            let b = _mm512_loadu_ps(src.as_ptr().add(2 * k + 16));
            _mm512_storeu_ps(even.as_mut_ptr().add(k), _mm512_permutex2var_ps(a, ie, b));
            _mm512_storeu_ps(odd.as_mut_ptr().add(k), _mm512_permutex2var_ps(a, io, b));
            k += 16;
        }
    }
    k
}

/// Whole blocks of 8 pairs; returns the pairs done.
///
/// # Safety
/// AVX2 must be available; `even` and `odd` must hold `src.len() / 2` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn deinterleave_avx2(src: &[f32], even: &mut [f32], odd: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let pairs = src.len() / 2;
    let mut k = 0;
    // SAFETY: k + 8 ≤ pairs, so the loads read src[2k..2k + 16] and the stores write [k..k + 8].
    unsafe {
        while k + 8 <= pairs {
            let a = _mm256_loadu_ps(src.as_ptr().add(2 * k));
            let b = _mm256_loadu_ps(src.as_ptr().add(2 * k + 8));
            // Within each 128-bit lane [a0 a2 b0 b2], [a4 a6 b4 b6]; then the 64-bit quarters reordered.
            let e = _mm256_castps_pd(_mm256_shuffle_ps::<0b10_00_10_00>(a, b));
            let o = _mm256_castps_pd(_mm256_shuffle_ps::<0b11_01_11_01>(a, b));
            _mm256_storeu_ps(even.as_mut_ptr().add(k), _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(e)));
            _mm256_storeu_ps(odd.as_mut_ptr().add(k), _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(o)));
            k += 8;
        }
    }
    k
}

/// `dst[2k] = even[k]` and `dst[2k + 1] = odd[k]` for k < dst.len() / 2 (the inverse of `deinterleave`).
#[inline(always)]
pub(crate) fn interleave(level: Isa, even: &[f32], odd: &[f32], dst: &mut [f32]) {
    let pairs = dst.len() / 2;
    assert!(
        even.len() >= pairs && odd.len() >= pairs,
        "interleave: {pairs} pairs from {} and {}",
        even.len(),
        odd.len()
    );
    #[allow(unused_mut)]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    {
        if level >= Isa::Avx512 && Isa::Avx512.supported() {
            // SAFETY: AVX-512F checked just above; the lengths were asserted.
            done = unsafe { interleave_avx512(even, odd, dst) };
        } else if level >= Isa::Avx2 && Isa::Avx2.supported() {
            // SAFETY: AVX2 checked just above; the lengths were asserted.
            done = unsafe { interleave_avx2(even, odd, dst) };
        }
    }
    let _ = level;
    for k in done..pairs {
        dst[2 * k] = even[k];
        dst[2 * k + 1] = odd[k];
    }
}

/// Whole blocks of 16 pairs; returns the pairs done.
///
/// # Safety
/// AVX-512F must be available; `even` and `odd` must hold `dst.len() / 2` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn interleave_avx512(even: &[f32], odd: &[f32], dst: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let pairs = dst.len() / 2;
    let mut k = 0;
    // SAFETY: k + 16 ≤ pairs: the loads read [k..k + 16], the stores write dst[2k..2k + 32].
    unsafe {
        let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        while k + 16 <= pairs {
            let e = _mm512_loadu_ps(even.as_ptr().add(k));
            let o = _mm512_loadu_ps(odd.as_ptr().add(k));
            _mm512_storeu_ps(dst.as_mut_ptr().add(2 * k), _mm512_permutex2var_ps(e, lo, o));
            _mm512_storeu_ps(dst.as_mut_ptr().add(2 * k + 16), _mm512_permutex2var_ps(e, hi, o));
            k += 16;
        }
    }
    k
}

/// Whole blocks of 8 pairs; returns the pairs done.
///
/// # Safety
/// AVX2 must be available; `even` and `odd` must hold `dst.len() / 2` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn interleave_avx2(even: &[f32], odd: &[f32], dst: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let pairs = dst.len() / 2;
    let mut k = 0;
    // SAFETY: k + 8 ≤ pairs: the loads read [k..k + 8], the stores write dst[2k..2k + 16].
    unsafe {
        while k + 8 <= pairs {
            let e = _mm256_loadu_ps(even.as_ptr().add(k));
            let o = _mm256_loadu_ps(odd.as_ptr().add(k));
            // Per 128-bit lane: [e0 o0 e1 o1 | e4 o4 e5 o5] and [e2 o2 e3 o3 | e6 o6 e7 o7].
            let (l, h) = (_mm256_unpacklo_ps(e, o), _mm256_unpackhi_ps(e, o));
            _mm256_storeu_ps(dst.as_mut_ptr().add(2 * k), _mm256_permute2f128_ps::<0x20>(l, h));
            _mm256_storeu_ps(dst.as_mut_ptr().add(2 * k + 8), _mm256_permute2f128_ps::<0x31>(l, h));
            k += 8;
        }
    }
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every slot written: the input columns where the padded row has them, zeros elsewhere.
    #[test]
    fn split_padded_writes_every_slot_at_every_level() {
        for w in [1, 2, 3, 16, 31, 32, 33, 64, 65, 81] {
            let src: Vec<f32> = (0..w).map(|i| i as f32 + 1.0).collect();
            for level in Isa::supported_levels() {
                let half = w / 2 + 3;
                let (mut even, mut odd) = (vec![f32::NAN; half], vec![f32::NAN; half]);
                split_padded(level, &src, &mut even, &mut odd);
                let padded = |j: usize| if j >= 1 && j <= w { src[j - 1] } else { 0.0 };
                for k in 0..half {
                    assert_eq!((even[k], odd[k]), (padded(2 * k), padded(2 * k + 1)), "{level:?} w {w} slot {k}");
                }
            }
        }
    }

    /// Every level against the definition, on lengths around the vector blocks (odd ones included).
    #[test]
    fn interleave_merges_pairs_at_every_level() {
        for len in [0, 1, 2, 7, 15, 16, 17, 31, 32, 33, 34, 63, 64, 65, 100, 321] {
            let even: Vec<f32> = (0..len / 2).map(|i| i as f32 + 0.25).collect();
            let odd: Vec<f32> = (0..len / 2).map(|i| -(i as f32) - 0.5).collect();
            for level in Isa::supported_levels() {
                let mut dst = vec![f32::NAN; len];
                interleave(level, &even, &odd, &mut dst);
                for k in 0..len / 2 {
                    assert_eq!((dst[2 * k], dst[2 * k + 1]), (even[k], odd[k]), "{level:?} len {len} pair {k}");
                }
                assert!(len % 2 == 0 || dst[len - 1].is_nan(), "{level:?} len {len}: wrote past the pairs");
            }
        }
    }

    /// Every level against the definition, on lengths around the vector blocks (odd ones included).
    #[test]
    fn deinterleave_splits_pairs_at_every_level() {
        for len in [0, 1, 2, 7, 15, 16, 17, 31, 32, 33, 34, 63, 64, 65, 100, 321] {
            let src: Vec<f32> = (0..len).map(|i| i as f32 * 1.5 - 7.0).collect();
            for level in Isa::supported_levels() {
                let (mut even, mut odd) = (vec![f32::NAN; len / 2 + 1], vec![f32::NAN; len / 2 + 1]);
                deinterleave(level, &src, &mut even, &mut odd);
                for k in 0..len / 2 {
                    assert_eq!((even[k], odd[k]), (src[2 * k], src[2 * k + 1]), "{level:?} len {len} pair {k}");
                }
                assert!(even[len / 2].is_nan() && odd[len / 2].is_nan(), "{level:?} len {len}: wrote past the pairs");
            }
        }
    }
}
