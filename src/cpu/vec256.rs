//! AVX2 register helpers the channel-blocked kernels share (`blocked`, `conv::direct_co`): an 8×8
//! transpose, a mask of the first lanes, and the activations on a vector. `#[inline]`: they are called
//! from other codegen units, where an out-of-line call per vector costs more than the work.

#[cfg(target_arch = "x86_64")]
use crate::graph::Act;

/// Transposes 8 rows of 8 floats: `out[k]` lane i = `r[i]` lane k. Unpacks pair the rows' floats,
/// shuffles gather each column's quarters within 128-bit lanes, and lane permutes join the halves.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) fn transpose8(r: [std::arch::x86_64::__m256; 8]) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
    // t[2m], t[2m + 1]: rows 2m and 2m + 1 interleaved (low and high pairs of each 128-bit lane).
    let t: [__m256; 8] = std::array::from_fn(|k| {
        let (a, b) = (r[k & !1], r[k | 1]);
        if k % 2 == 0 { _mm256_unpacklo_ps(a, b) } else { _mm256_unpackhi_ps(a, b) }
    });
    // u[4q + col]: in 128-bit lane L, rows 4q..4q + 4 of column 4L + col.
    let u: [__m256; 8] = std::array::from_fn(|k| {
        let (q, col) = (k / 4, k % 4);
        let (a, b) = (t[4 * q + col / 2], t[4 * q + col / 2 + 2]);
        if col % 2 == 0 { _mm256_shuffle_ps::<0x44>(a, b) } else { _mm256_shuffle_ps::<0xee>(a, b) }
    });
    std::array::from_fn(|k| {
        let col = k % 4;
        if k < 4 {
            _mm256_permute2f128_ps::<0x20>(u[col], u[4 + col])
        } else {
            _mm256_permute2f128_ps::<0x31>(u[col], u[4 + col])
        }
    })
}

/// The AVX2 load/store mask of the first `run` (≤ 8) lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) fn first_lanes(run: usize) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    _mm256_cmpgt_epi32(_mm256_set1_epi32(run as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
}

/// `act(v)` on 8 lanes, as `vec512::act_vec` computes it on 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) fn act8(y: std::arch::x86_64::__m256, act: Act) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let zero = _mm256_setzero_ps();
    match act {
        Act::None => y,
        // f32::max(y, 0): NaN gives 0, as `max_ps` returns its second operand.
        Act::Leaky(0.0) => _mm256_max_ps(y, zero),
        Act::Leaky(slope) => {
            let neg = _mm256_mul_ps(y, _mm256_set1_ps(slope));
            _mm256_blendv_ps(neg, y, _mm256_cmp_ps::<_CMP_GE_OQ>(y, zero))
        }
        // f32::clamp(y, 0, 6) keeps NaN: with y second, `max_ps`/`min_ps` return it.
        Act::Relu6 => _mm256_min_ps(_mm256_set1_ps(6.0), _mm256_max_ps(zero, y)),
    }
}
