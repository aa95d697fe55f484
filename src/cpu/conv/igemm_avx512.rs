//! The AVX-512F micro-kernel of the implicit-GEMM convolution (`igemm`, `Isa::Avx512`): one MR×NR = 8×48
//! tile of 16-lane registers. Everything but this inner loop is `igemm`'s.

#[cfg(target_arch = "x86_64")]
use super::tile::{MR, NR};

/// 16-lane registers per row of a micro-tile: MR·V = 24 accumulators, 3 B vectors and a broadcast of
/// the 32 registers; per reduction step 3 B loads and 8 broadcasts feed 24 FMAs.
#[cfg(target_arch = "x86_64")]
const V: usize = NR / 16;
#[cfg(target_arch = "x86_64")]
const _: () = assert!(NR == 16 * V);

/// One MR×NR tile: `C[r, 0..NR] (+)= Σ_k a[k·MR + r] · src[offset[k] + 0..NR]` for r < MR, C rows `ldc`
/// apart. With `MASKED`, lanes ≥ `valid` of B are not read; with `PREFETCH`, the B columns of the next
/// tile (NR further on) are prefetched.
///
/// # Safety
/// AVX-512F must be available; `src` must cover `offset[k] + valid` for every k; `c` must cover MR rows
/// of NR floats `ldc` apart; `a` must hold `offsets.len() · MR` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn tile<const MASKED: bool, const PREFETCH: bool>(
    a: *const f32,
    offsets: &[u32],
    src: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    valid: usize,
) {
    // SAFETY: the caller's contract (see `tile_dispatch`).
    unsafe {
        use std::arch::x86_64::*;
        let mut masks = [0xffffu16; V];
        for (v, m) in masks.iter_mut().enumerate() {
            let lanes = valid.saturating_sub(16 * v).min(16);
            *m = ((1u32 << lanes) - 1) as u16;
        }
        let mut acc = [[_mm512_setzero_ps(); V]; MR];
        if accumulate {
            for (r, row) in acc.iter_mut().enumerate() {
                for (v, x) in row.iter_mut().enumerate() {
                    *x = _mm512_loadu_ps(c.add(r * ldc + 16 * v));
                }
            }
        }
        let mut ap = a;
        for &off in offsets {
            let bp = src.add(off as usize);
            let mut b = [_mm512_setzero_ps(); V];
            for (v, x) in b.iter_mut().enumerate() {
                if PREFETCH {
                    _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(NR + 16 * v) as *const i8);
                }
                *x = if MASKED {
                    _mm512_maskz_loadu_ps(masks[v], bp.add(16 * v))
                } else {
                    _mm512_loadu_ps(bp.add(16 * v))
                };
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*ap.add(r));
                for (x, bv) in row.iter_mut().zip(&b) {
                    *x = _mm512_fmadd_ps(av, *bv, *x);
                }
            }
            ap = ap.add(MR);
        }
        for (r, row) in acc.iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                _mm512_storeu_ps(c.add(r * ldc + 16 * v), *x);
            }
        }
    }
}
