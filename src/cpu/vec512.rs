//! AVX-512 register helpers the channel-blocked kernels share (`blocked`, `conv::direct_co`): a
//! 16×16 transpose and the activations on a vector.

#[cfg(target_arch = "x86_64")]
use crate::graph::Act;

/// Transposes 16 rows of 16 floats: `out[k]` lane i = `r[i]` lane k. Unpacks pair the rows' floats
/// and doubles, then two rounds of 128-bit lane shuffles gather each column's four quarters.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn transpose16(r: [std::arch::x86_64::__m512; 16]) -> [std::arch::x86_64::__m512; 16] {
    use std::arch::x86_64::*;
    // t[2m], t[2m + 1]: rows 2m and 2m + 1 interleaved (low and high pairs of each 128-bit lane).
    let t: [__m512; 16] = std::array::from_fn(|k| {
        let (a, b) = (r[k & !1], r[k | 1]);
        if k % 2 == 0 { _mm512_unpacklo_ps(a, b) } else { _mm512_unpackhi_ps(a, b) }
    });
    // u[4q + col]: in 128-bit lane L, rows 4q..4q + 4 of column 4L + col.
    let u: [__m512; 16] = std::array::from_fn(|k| {
        let (q, col) = (k / 4, k % 4);
        let (a, b) = (_mm512_castps_pd(t[4 * q + col / 2]), _mm512_castps_pd(t[4 * q + col / 2 + 2]));
        _mm512_castpd_ps(if col % 2 == 0 { _mm512_unpacklo_pd(a, b) } else { _mm512_unpackhi_pd(a, b) })
    });
    std::array::from_fn(|k| {
        // Column k = 4L + col: lane L of u[col], u[4 + col], u[8 + col], u[12 + col].
        let (lane, col) = (k / 4, k % 4);
        let (lo, hi) = if lane % 2 == 0 {
            (_mm512_shuffle_f32x4::<0x88>(u[col], u[4 + col]), _mm512_shuffle_f32x4::<0x88>(u[8 + col], u[12 + col]))
        } else {
            (_mm512_shuffle_f32x4::<0xdd>(u[col], u[4 + col]), _mm512_shuffle_f32x4::<0xdd>(u[8 + col], u[12 + col]))
        };
        if lane < 2 { _mm512_shuffle_f32x4::<0x88>(lo, hi) } else { _mm512_shuffle_f32x4::<0xdd>(lo, hi) }
    })
}

/// `act(v)`, as `common::epilogue` computes it lane by lane.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn act_vec(y: std::arch::x86_64::__m512, act: Act) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let zero = _mm512_setzero_ps();
    match act {
        Act::None => y,
        // f32::max(y, 0): NaN gives 0, as `max_ps` returns its second operand.
        Act::Leaky(0.0) => _mm512_max_ps(y, zero),
        Act::Leaky(slope) => {
            let neg = _mm512_mul_ps(y, _mm512_set1_ps(slope));
            _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_GE_OQ>(y, zero), neg, y)
        }
        // f32::clamp(y, 0, 6) keeps NaN: with y second, `max_ps`/`min_ps` return it.
        Act::Relu6 => _mm512_min_ps(_mm512_set1_ps(6.0), _mm512_max_ps(zero, y)),
    }
}
