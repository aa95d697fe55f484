//! The AVX2 + FMA micro-kernel of the implicit-GEMM convolution (`igemm`, `Isa::Avx2`).
//!
//! Everything but the inner loop is `igemm`'s: the phase planes, the tap offsets, the weights packed as
//! [cout/MR][K][MR] with MR = 8, the task split and the MR×NR = 8×48 tiles of the band. This file
//! computes one such tile as 2×2 micro-tiles of MR2×NR2 = 4×24.
//!
//! Why 4×24: AVX2 has 16 ymm registers of 8 lanes. A 4×24 tile holds 12 accumulators, 3 B vectors and
//! one broadcast (16 registers, no spills); per reduction step 3 B loads and 4 broadcasts feed 12 FMAs.
//! The alternative 6×16 (12 accumulators, 2 B vectors, 1 broadcast) also feeds 12 FMAs but needs 8 loads
//! per step, and its 6 rows do not divide the packed 8-channel blocks (every channel count of these
//! networks is a multiple of 8), so its rows would straddle blocks or waste a quarter of a 8-row block.
//! Reading 4 of each 8 packed weights per step keeps one packing for both levels (`Conv::packed` is
//! filled once, whatever level runs it).
//!
//! Each output sums its products in k order, as in the AVX-512 kernel: results differ from the
//! definition only by f32 rounding (fused multiply-adds), and do not depend on the thread count.

#[cfg(target_arch = "x86_64")]
use super::tile::{MR, NR};

/// Output channels per micro-tile (`micro` names its 4×3 accumulators).
#[cfg(target_arch = "x86_64")]
const MR2: usize = 4;
/// 8-lane registers per row of a micro-tile.
#[cfg(target_arch = "x86_64")]
const V2: usize = 3;
/// Output pixels per micro-tile.
#[cfg(target_arch = "x86_64")]
const NR2: usize = 8 * V2;
#[cfg(target_arch = "x86_64")]
const _: () = assert!(MR.is_multiple_of(MR2) && NR.is_multiple_of(NR2));

/// One MR×NR tile of `igemm`: `C[r, 0..NR] (+)= Σ_k a[k·MR + r] · src[offset[k] + 0..NR]` for r < MR,
/// C rows `ldc` apart. Lanes ≥ `valid` of B are not read (their C values are junk or left as they were).
/// The B columns of the next tile (NR further on) are prefetched.
///
/// # Safety
/// AVX2 and FMA must be available; `src` must cover `offset[k] + valid` for every k; `c` must cover MR
/// rows of NR floats `ldc` apart; `a` must hold `offsets.len() · MR` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn tile(
    a: *const f32,
    offsets: &[u32],
    src: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    valid: usize,
) {
    // SAFETY: the caller's contract; each micro-tile reads rows r0..r0+MR2 of `a` and columns
    // col..col+NR2 (only those < valid) of `src`, and writes inside C's MR×NR tile.
    unsafe {
        for col in (0..NR).step_by(NR2) {
            let lanes = valid.saturating_sub(col).min(NR2);
            if lanes == 0 {
                continue;
            }
            for r0 in (0..MR).step_by(MR2) {
                // Every full micro-tile prefetches the next tile's columns, even where an earlier pass
                // already did: the instantiation without prefetches compiled with its accumulators
                // rotated through register moves inside the loop (perf annotate), and ran ~1.3x
                // slower than this one, whose redundant prefetches fit in the spare load slots.
                let (a, s, c) = (a.add(r0), src.add(col), c.add(r0 * ldc + col));
                if lanes == NR2 {
                    micro::<false, true>(a, offsets, s, c, ldc, accumulate, lanes)
                } else {
                    micro::<true, false>(a, offsets, s, c, ldc, accumulate, lanes)
                }
            }
        }
    }
}

/// One MR2×NR2 micro-tile; `a` points at its first row inside MR-wide packed rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline(never)] // its own function: inlined into `tile`, LLVM spilled accumulators to the stack in the loop
unsafe fn micro<const MASKED: bool, const PREFETCH: bool>(
    a: *const f32,
    offsets: &[u32],
    src: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    valid: usize,
) {
    // SAFETY: see `tile`; masked loads do not touch memory in their masked-off lanes.
    unsafe {
        use std::arch::x86_64::*;
        let lane_index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let mut masks = [_mm256_set1_epi32(-1); V2];
        if MASKED {
            for (v, m) in masks.iter_mut().enumerate() {
                let lanes = valid.saturating_sub(8 * v).min(8) as i32;
                *m = _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes), lane_index);
            }
        }
        // Twelve named accumulators rather than an array: with an array LLVM's register allocator
        // rotated the accumulators through extra moves and spilled one per step (measured in the
        // disassembly), which put a store-to-load round trip on an accumulation chain.
        let ld =
            |r: usize, v: usize| if accumulate { _mm256_loadu_ps(c.add(r * ldc + 8 * v)) } else { _mm256_setzero_ps() };
        let (mut c00, mut c01, mut c02) = (ld(0, 0), ld(0, 1), ld(0, 2));
        let (mut c10, mut c11, mut c12) = (ld(1, 0), ld(1, 1), ld(1, 2));
        let (mut c20, mut c21, mut c22) = (ld(2, 0), ld(2, 1), ld(2, 2));
        let (mut c30, mut c31, mut c32) = (ld(3, 0), ld(3, 1), ld(3, 2));
        let mut ap = a;
        for &off in offsets {
            let bp = src.add(off as usize);
            let (b0, b1, b2) = if MASKED {
                (
                    _mm256_maskload_ps(bp, masks[0]),
                    _mm256_maskload_ps(bp.add(8), masks[1]),
                    _mm256_maskload_ps(bp.add(16), masks[2]),
                )
            } else {
                (_mm256_loadu_ps(bp), _mm256_loadu_ps(bp.add(8)), _mm256_loadu_ps(bp.add(16)))
            };
            if PREFETCH {
                // 24 floats span at most 3 cache lines: their first and last floats and the middle.
                for d in [0, NR2 / 2, NR2 - 1] {
                    _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(NR + d) as *const i8);
                }
            }
            let a0 = _mm256_broadcast_ss(&*ap);
            c00 = _mm256_fmadd_ps(a0, b0, c00);
            c01 = _mm256_fmadd_ps(a0, b1, c01);
            c02 = _mm256_fmadd_ps(a0, b2, c02);
            let a1 = _mm256_broadcast_ss(&*ap.add(1));
            c10 = _mm256_fmadd_ps(a1, b0, c10);
            c11 = _mm256_fmadd_ps(a1, b1, c11);
            c12 = _mm256_fmadd_ps(a1, b2, c12);
            let a2 = _mm256_broadcast_ss(&*ap.add(2));
            c20 = _mm256_fmadd_ps(a2, b0, c20);
            c21 = _mm256_fmadd_ps(a2, b1, c21);
            c22 = _mm256_fmadd_ps(a2, b2, c22);
            let a3 = _mm256_broadcast_ss(&*ap.add(3));
            c30 = _mm256_fmadd_ps(a3, b0, c30);
            c31 = _mm256_fmadd_ps(a3, b1, c31);
            c32 = _mm256_fmadd_ps(a3, b2, c32);
            ap = ap.add(MR);
        }
        for (r, row) in [[c00, c01, c02], [c10, c11, c12], [c20, c21, c22], [c30, c31, c32]].iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                _mm256_storeu_ps(c.add(r * ldc + 8 * v), *x);
            }
        }
    }
}
