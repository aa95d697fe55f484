//! The channel-blocked activation layout (NCHW16c) and its kernels at the AVX-512 and AVX2 levels
//! (`Simd`): the 1×1 convolution and the 3×3 depthwise convolution, which `chain` runs the MobileNet
//! backbones with. `cargo bench --bench conv_shapes -- blocked` times each against the engine's NCHW
//! path (`RETINAFACE_CPU_ISA=avx2` for the AVX2 kernels).
//!
//! At AVX2 a block is two 8-lane halves: the layout, the packed weights and every output's order of
//! summation are the AVX-512 level's, so both levels give the same bits; the micro-tiles shrink to
//! the 16 ymm registers (16 output channels × 6 pixels for the 1×1, 4 pixels of one half for the
//! depthwise).
//!
//! Why this layout: in NCHW the output channels of a GEMM micro-tile lie a plane apart, so a pointwise
//! convolution either packs its input into panels and writes each tile's rows to separate planes, or
//! reads a plane per reduction step; both stall on memory on the large maps (1x1 convolutions at
//! 80²–160² run at 65–120 GFLOPS on the GEMM crate and on packed NCHW tiles on the Ice Lake Xeon of
//! benches/RESULTS.md, whose FMA peak is ~175; this kernel at 120–150). In NCHW16c ([n][c/16][h·w][16], channels past c zero)
//! the 16 channels of a pixel are one vector: a tile of 64 output channels × 6 pixels broadcasts one
//! input value per pixel and reduction step against four weight vectors, reads its input in place
//! (sixteen steps share each input line), and stores four runs of six whole vectors. ONNX Runtime's
//! MLAS runs its CPU convolutions in this layout.
//!
//! `pointwise`: `out[co, p] = act(Σ_ci W[co, ci] · x[ci, p] + bias[co] (+ residual[co, p]))`, weights
//! packed once (`PointwiseWeights`, [cout/64][cin/16·16][64], zeros past cout and cin). Work: 2·cin·cout
//! flops per pixel; memory: the input read once per 64 output channels, the weights once per task, the
//! output written once per reduction pass of KC input channels (once when cin ≤ KC). Tasks split the
//! pixels and the blocks of 64 output channels. Each output sums its products in ci order, in one
//! task, with fused multiply-adds: results do not depend on the thread count.

use crate::cpu::conv::{SharedMut, aligned};
#[cfg(target_arch = "x86_64")]
use crate::cpu::vec256::{act8, first_lanes, transpose8};
#[cfg(target_arch = "x86_64")]
use crate::cpu::vec512::{act_vec, transpose16};
use crate::graph::{Act, Conv};
use rayon::prelude::*;
use std::ops::Range;

/// Channels per block: one 16-lane register (two 8-lane ones at AVX2).
pub const BLOCK: usize = 16;
/// Lanes of an AVX2 register: half a block.
const HALF: usize = 8;

/// The instruction set the blocked kernels run with (both give the same bits).
pub use crate::cpu::isa::Simd;

/// Output channels per micro-tile: four registers of weights.
const CO_TILE: usize = 4 * BLOCK;
/// Pixels per micro-tile: 6 × 4 = 24 accumulators, four weight vectors and a broadcast of the 32 registers.
const PX_TILE: usize = 6;
/// Input channels per reduction pass: a tile's weights (KC·64 floats, 32 KiB) stay in the 48 KiB L1
/// while the pass sweeps the task's pixels; the sums go through the output once per pass, from L2.
/// With 512 (128 KiB of weights, from L2 at every micro-tile: four 64-byte loads per 24 FMAs) the
/// ResNet-50 1x1s of 512–2048 inputs ran at 182–186 GFLOPS, with 128 at 199–207 (`conv_shapes --
/// blocked`, one thread, Sapphire Rapids-class VM); whole passes, `paired` KC 512 against 128: ResNet-50
/// 1.023 / 1.017 (one / two threads), MobileNetV1 1.020 / 1.022, MobileNetV2 1.009 / 1.012, x0.25 even;
/// at AVX2 (hide_avx512.so) ResNet-50 1.021 / 1.023, MobileNetV1 1.017 / 1.015. 256 measured as 512;
/// 64 and bounding the pixels a pass sweeps (240–1920) no better than 128 alone.
const KC: usize = 128;

/// Floats of an [n][c] activation of `npix` pixels in the blocked layout (the conv paths' definition,
/// which `conv::conv_blocked` reads and writes).
pub use crate::cpu::conv::blocked_len;

/// `x` [n][c][npix] (NCHW) into `out` [n][c/16][npix][16], channels past c zero. One task per
/// channel block; 16 pixels at a time, the 16 channel rows are read whole and written transposed (one
/// 16×16 transpose in registers at AVX-512, two 8×8 ones per 8 pixels at AVX2).
pub fn to_blocked(simd: Simd, x: &[f32], n: usize, c: usize, npix: usize, out: &mut [f32]) {
    simd.check();
    assert_eq!(x.len(), n * c * npix, "to_blocked: input size");
    assert_eq!(out.len(), blocked_len(n, c, npix), "to_blocked: output size");
    let blocks = c.div_ceil(BLOCK);
    out.par_chunks_mut(npix * BLOCK).enumerate().for_each(|(nb, dst)| {
        let (b, cb) = (nb / blocks, nb % blocks);
        let lanes = BLOCK.min(c - cb * BLOCK);
        let src = &x[(b * c + cb * BLOCK) * npix..][..lanes * npix];
        // SAFETY: the set was checked; `src` holds `lanes` planes of npix and `dst` npix vectors.
        unsafe {
            match simd {
                Simd::Avx512 => to_block_avx512(src, npix, lanes, npix, dst),
                Simd::Avx2 => to_block_avx2(src, npix, lanes, npix, dst),
            }
        }
    });
}

/// `x` [n][c/16][npix][16] back into `out` [n][c][npix] (NCHW): `to_blocked`'s inverse, one task per
/// channel block.
pub fn from_blocked(simd: Simd, x: &[f32], n: usize, c: usize, npix: usize, out: &mut [f32]) {
    simd.check();
    assert_eq!(x.len(), blocked_len(n, c, npix), "from_blocked: input size");
    assert_eq!(out.len(), n * c * npix, "from_blocked: output size");
    let blocks = c.div_ceil(BLOCK);
    let outp = SharedMut(out.as_mut_ptr());
    (0..n * blocks).into_par_iter().for_each(|nb| {
        let (b, cb) = (nb / blocks, nb % blocks);
        let lanes = BLOCK.min(c - cb * BLOCK);
        let src = &x[nb * npix * BLOCK..][..npix * BLOCK];
        // SAFETY: the block's `lanes` planes of image b lie in `out` and are this task's alone.
        let dst = unsafe { std::slice::from_raw_parts_mut(outp.get().add((b * c + cb * BLOCK) * npix), lanes * npix) };
        // SAFETY: the set was checked; the slices hold what the kernels read and write.
        unsafe {
            match simd {
                Simd::Avx512 => from_block_avx512(src, lanes, npix, dst),
                Simd::Avx2 => from_block_avx2(src, lanes, npix, dst),
            }
        }
    });
}

/// `npix` pixels of one image's NCHW planes (`c` of them, `plane` floats apart from `x`) into the
/// blocked layout at `out` (block cb at `out` + cb · `out_plane`, channels past c zero), on the calling
/// thread: `to_blocked` on a band of rows, which a fused op's first step makes in its row buffer.
///
/// # Safety
/// The processor must support `simd`; `x` must hold the c planes' pixels from it (`(c − 1)·plane +
/// npix` floats), `out` c/16 blocks of `npix` vectors at `out_plane` strides, no other thread's.
pub unsafe fn to_blocked_span(
    simd: Simd,
    x: *const f32,
    c: usize,
    plane: usize,
    npix: usize,
    out: *mut f32,
    out_plane: usize,
) {
    for cb in 0..c.div_ceil(BLOCK) {
        let lanes = BLOCK.min(c - cb * BLOCK);
        // SAFETY: the caller's contract: block cb's `lanes` rows of npix pixels, `plane` apart, and
        // its npix output vectors.
        unsafe {
            let src = std::slice::from_raw_parts(x.add(cb * BLOCK * plane), (lanes - 1) * plane + npix);
            let dst = std::slice::from_raw_parts_mut(out.add(cb * out_plane), npix * BLOCK);
            match simd {
                Simd::Avx512 => to_block_avx512(src, plane, lanes, npix, dst),
                Simd::Avx2 => to_block_avx2(src, plane, lanes, npix, dst),
            }
        }
    }
}

/// The 3×3 stride-2 max-pool with padding 1 (counted as −∞; `reference::max_pool_3x3s2`) on a
/// blocked tensor, with `simd`'s vectors: `x` [n][c/16][h·w][16] → `out` [n][c/16][oh·ow][16]. A
/// pixel's 16 channels are one vector, so each output row is the maximum of up to three input rows,
/// then of up to three columns, a vector at a time. Work: 8 comparisons per output value; memory: the
/// input read once, the output written once. Tasks: per image and channel block, bands of rows.
pub fn max_pool3x3s2(simd: Simd, x: &[f32], n: usize, c: usize, (h, w): (usize, usize), out: &mut [f32]) {
    simd.check();
    let (oh, ow) = (crate::reference::out_size(h, 3, 2, 1), crate::reference::out_size(w, 3, 2, 1));
    assert_eq!(x.len(), blocked_len(n, c, h * w), "blocked max-pool: input size");
    assert_eq!(out.len(), blocked_len(n, c, oh * ow), "blocked max-pool: output size");
    let planes = n * c.div_ceil(BLOCK);
    // Bands of output rows: enough tasks for every thread.
    let rows = oh.div_ceil(crate::cpu::conv::min_tasks().div_ceil(planes).clamp(1, oh.max(1))).max(1);
    let level = simd.isa();
    let bands = out.par_chunks_mut((oh * ow * BLOCK).max(1)).enumerate().flat_map(|(plane, o)| {
        o.par_chunks_mut(rows * ow * BLOCK).enumerate().map(move |(r, ob)| (plane, r * rows, ob))
    });
    bands.for_each_init(Vec::new, |vmax: &mut Vec<[f32; BLOCK]>, (plane, oy0, o)| {
        vmax.resize(w, [0.0; BLOCK]);
        pool_rows_at(level, &x[plane * h * w * BLOCK..][..h * w * BLOCK], (h, w), oy0, o, vmax);
    });
}

/// Every other pixel of every other row (the input of a 1×1 stride-2 convolution without padding):
/// `x` [n][c/16][h·w][16] → `out` [n][c/16][⌈h/2⌉·⌈w/2⌉][16], whole vectors copied.
pub fn subsample2(x: &[f32], n: usize, c: usize, (h, w): (usize, usize), out: &mut [f32]) {
    let (oh, ow) = (h.div_ceil(2), w.div_ceil(2));
    assert_eq!(x.len(), blocked_len(n, c, h * w), "blocked subsample: input size");
    assert_eq!(out.len(), blocked_len(n, c, oh * ow), "blocked subsample: output size");
    out.par_chunks_mut((ow * BLOCK).max(1)).enumerate().for_each(|(row, o)| {
        let (plane, oy) = (row / oh, row % oh);
        let src = &x[(plane * h * w + 2 * oy * w) * BLOCK..][..w * BLOCK];
        for (ox, dst) in o.chunks_exact_mut(BLOCK).enumerate() {
            dst.copy_from_slice(&src[2 * ox * BLOCK..][..BLOCK]);
        }
    });
}

/// Output rows oy0.. of one channel block's max-pool (`o` whole rows of `ow` vectors), `vmax` a row of
/// `w` vectors.
#[inline(always)]
fn pool_rows(src: &[f32], (h, w): (usize, usize), oy0: usize, o: &mut [f32], vmax: &mut [[f32; BLOCK]]) {
    let ow = crate::reference::out_size(w, 3, 2, 1);
    for (oy, orow) in (oy0..).zip(o.chunks_exact_mut(ow * BLOCK)) {
        // The column-wise maximum of the window's rows, then of each window's columns.
        let window = (oy * 2).saturating_sub(1)..(oy * 2 + 2).min(h);
        for (ix, m) in vmax.iter_mut().enumerate() {
            m.copy_from_slice(&src[(window.start * w + ix) * BLOCK..][..BLOCK]);
            for iy in window.start + 1..window.end {
                let v = &src[(iy * w + ix) * BLOCK..][..BLOCK];
                m.iter_mut().zip(v).for_each(|(m, &v)| *m = m.max(v));
            }
        }
        for (ox, dst) in orow.chunks_exact_mut(BLOCK).enumerate() {
            let cols = (ox * 2).saturating_sub(1)..(ox * 2 + 2).min(w);
            dst.copy_from_slice(&vmax[cols.start]);
            for m in &vmax[cols.start + 1..cols.end] {
                dst.iter_mut().zip(m).for_each(|(d, &v)| *d = d.max(v));
            }
        }
    }
}

crate::cpu::isa::avx_dispatch!(pool_rows_at, pool_rows_avx2, pool_rows_avx512, pool_rows, (src: &[f32], hw: (usize, usize), oy0: usize, o: &mut [f32], vmax: &mut [[f32; BLOCK]]));

/// One channel block into the blocked layout: `src` holds `lanes` rows of `npix` pixels, `stride`
/// floats apart (a plane, or a longer one of which they are a run), `dst` npix vectors (lanes past
/// `lanes` zero).
///
/// # Safety
/// AVX-512F must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn to_block_avx512(src: &[f32], stride: usize, lanes: usize, npix: usize, dst: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(lanes <= BLOCK && dst.len() >= npix * BLOCK && (lanes == 0 || src.len() >= (lanes - 1) * stride + npix));
    for p0 in (0..npix).step_by(BLOCK) {
        let run = BLOCK.min(npix - p0);
        let mask = ((1u32 << run) - 1) as u16;
        // SAFETY: row j's loads cover pixels p0..p0 + run of plane j < lanes (masked past `run`),
        // the stores vectors p0..p0 + run of `dst`, all within the asserted lengths.
        unsafe {
            let rows: [__m512; 16] = std::array::from_fn(|j| {
                if j < lanes {
                    _mm512_maskz_loadu_ps(mask, src.as_ptr().add(j * stride + p0))
                } else {
                    _mm512_setzero_ps()
                }
            });
            let cols = transpose16(rows);
            for (i, v) in cols.iter().enumerate().take(run) {
                _mm512_storeu_ps(dst.as_mut_ptr().add((p0 + i) * BLOCK), *v);
            }
        }
    }
}

/// One channel block back to NCHW: `src` holds npix vectors, `dst` `lanes` planes of `npix`.
///
/// # Safety
/// AVX-512F must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn from_block_avx512(src: &[f32], lanes: usize, npix: usize, dst: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(src.len() >= npix * BLOCK && dst.len() >= lanes * npix && lanes <= BLOCK);
    for p0 in (0..npix).step_by(BLOCK) {
        let run = BLOCK.min(npix - p0);
        let mask = ((1u32 << run) - 1) as u16;
        // SAFETY: the loads are vectors p0..p0 + run of `src`, the stores pixels p0..p0 + run
        // (masked) of planes j < lanes of `dst`, all within the asserted lengths.
        unsafe {
            let rows: [__m512; 16] = std::array::from_fn(|i| {
                if i < run { _mm512_loadu_ps(src.as_ptr().add((p0 + i) * BLOCK)) } else { _mm512_setzero_ps() }
            });
            let cols = transpose16(rows);
            for (j, v) in cols.iter().enumerate().take(lanes) {
                _mm512_mask_storeu_ps(dst.as_mut_ptr().add(j * npix + p0), mask, *v);
            }
        }
    }
}

/// `to_block_avx512` at AVX2: 8 pixels at a time, each half block by an 8×8 transpose.
///
/// # Safety
/// AVX2 and FMA must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn to_block_avx2(src: &[f32], stride: usize, lanes: usize, npix: usize, dst: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(lanes <= BLOCK && dst.len() >= npix * BLOCK && (lanes == 0 || src.len() >= (lanes - 1) * stride + npix));
    for p0 in (0..npix).step_by(HALF) {
        let run = HALF.min(npix - p0);
        let mask = first_lanes(run);
        for h in 0..2 {
            // SAFETY: row j's loads cover pixels p0..p0 + run of plane j < lanes (masked past `run`),
            // the stores the half blocks of vectors p0..p0 + run of `dst`, within the asserted lengths.
            unsafe {
                let rows: [__m256; 8] = std::array::from_fn(|jj| {
                    let j = h * HALF + jj;
                    if j < lanes {
                        _mm256_maskload_ps(src.as_ptr().add(j * stride + p0), mask)
                    } else {
                        _mm256_setzero_ps()
                    }
                });
                let cols = transpose8(rows);
                for (i, v) in cols.iter().enumerate().take(run) {
                    _mm256_storeu_ps(dst.as_mut_ptr().add((p0 + i) * BLOCK + h * HALF), *v);
                }
            }
        }
    }
}

/// `from_block_avx512` at AVX2.
///
/// # Safety
/// AVX2 and FMA must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn from_block_avx2(src: &[f32], lanes: usize, npix: usize, dst: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(src.len() >= npix * BLOCK && dst.len() >= lanes * npix && lanes <= BLOCK);
    for p0 in (0..npix).step_by(HALF) {
        let run = HALF.min(npix - p0);
        let mask = first_lanes(run);
        for h in 0..2.min(lanes.div_ceil(HALF)) {
            // SAFETY: the loads are half blocks of vectors p0..p0 + run of `src`, the stores pixels
            // p0..p0 + run (masked) of planes j < lanes of `dst`, within the asserted lengths.
            unsafe {
                let rows: [__m256; 8] = std::array::from_fn(|i| {
                    if i < run {
                        _mm256_loadu_ps(src.as_ptr().add((p0 + i) * BLOCK + h * HALF))
                    } else {
                        _mm256_setzero_ps()
                    }
                });
                let cols = transpose8(rows);
                for (jj, v) in cols.iter().enumerate().take(lanes - h * HALF) {
                    _mm256_maskstore_ps(dst.as_mut_ptr().add((h * HALF + jj) * npix + p0), mask, *v);
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn to_block_avx2(_: &[f32], _: usize, _: usize, _: usize, _: &mut [f32]) {
    unreachable!("the AVX2 level exists only on x86_64")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn from_block_avx2(_: &[f32], _: usize, _: usize, _: &mut [f32]) {
    unreachable!("the AVX2 level exists only on x86_64")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn to_block_avx512(_: &[f32], _: usize, _: usize, _: usize, _: &mut [f32]) {
    unreachable!("the AVX-512 level exists only on x86_64")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn from_block_avx512(_: &[f32], _: usize, _: usize, _: &mut [f32]) {
    unreachable!("the AVX-512 level exists only on x86_64")
}

/// A 1×1 stride-1 convolution's weights and biases as `pointwise` reads them, packed once.
pub struct PointwiseWeights {
    cin: usize,
    cout: usize,
    act: Act,
    /// [cout/64][cin/16·16][64], zeros past cout and cin, from `w_at` (a 64-byte boundary, so no
    /// weight load splits across two cache lines).
    w: Vec<f32>,
    w_at: usize,
    /// Per tile of 64 output channels, zeros past cout.
    bias: Vec<[f32; CO_TILE]>,
}

impl PointwiseWeights {
    /// `conv`'s weights packed for `pointwise`; `None` unless it is a 1×1 stride-1 unpadded dense
    /// convolution.
    pub fn new(conv: &Conv) -> Option<PointwiseWeights> {
        if (conv.kernel, conv.stride, conv.pad, conv.groups) != (1, 1, 0, 1) {
            return None;
        }
        Some(PointwiseWeights::from_matrix(conv.cin, conv.cout, &conv.weight, &conv.bias, conv.act))
    }

    /// The 1×1 convolution of `weight` [cout][cin] and `bias` [cout] followed by `act`, packed.
    pub fn from_matrix(cin: usize, cout: usize, weight: &[f32], bias: &[f32], act: Act) -> PointwiseWeights {
        assert!(weight.len() == cout * cin && bias.len() == cout, "pointwise weights: {cout}x{cin} matrix");
        let (kp, tiles) = (cin.div_ceil(BLOCK) * BLOCK, cout.div_ceil(CO_TILE));
        let mut w = Vec::new();
        let w_at = aligned(&mut w, tiles * kp * CO_TILE);
        for co in 0..cout {
            for ci in 0..cin {
                w[w_at + ((co / CO_TILE) * kp + ci) * CO_TILE + co % CO_TILE] = weight[co * cin + ci];
            }
        }
        let mut packed_bias = vec![[0.0f32; CO_TILE]; tiles];
        for (co, &b) in bias.iter().enumerate() {
            packed_bias[co / CO_TILE][co % CO_TILE] = b;
        }
        PointwiseWeights { cin, cout, act, w, w_at, bias: packed_bias }
    }

    /// Input channels.
    pub fn cin(&self) -> usize {
        self.cin
    }

    /// Output channels.
    pub fn cout(&self) -> usize {
        self.cout
    }
}

/// The 1×1 convolution `pw` of `x` [n][cin/16][npix][16] into `out` [n][cout/16][npix][16] (blocked
/// layout), `residual` in `out`'s layout added before the activation. The input's padding channels
/// must be zeros (as `to_blocked` writes them); `out` and `residual` from a 64-byte boundary keep each
/// vector in one cache line (any alignment gives the same values). Panics unless the processor
/// supports `simd`.
pub fn pointwise(
    simd: Simd,
    pw: &PointwiseWeights,
    x: &[f32],
    n: usize,
    npix: usize,
    out: &mut [f32],
    residual: Option<&[f32]>,
) {
    simd.check();
    assert_eq!(x.len(), blocked_len(n, pw.cin, npix), "blocked pointwise: input size");
    assert_eq!(out.len(), blocked_len(n, pw.cout, npix), "blocked pointwise: output size");
    if let Some(r) = residual {
        assert_eq!(r.len(), out.len(), "blocked pointwise: residual size");
    }
    let (in_blocks, out_blocks) = (pw.cin.div_ceil(BLOCK), pw.cout.div_ceil(BLOCK));
    let tiles = pw.cout.div_ceil(CO_TILE);
    // Pixel runs per (image, channel tile): enough tasks for every thread, each run a whole number
    // of micro-tiles.
    let runs = crate::cpu::conv::min_tasks().div_ceil(n * tiles).min(npix.div_ceil(PX_TILE)).max(1);
    let run = npix.div_ceil(runs).div_ceil(PX_TILE) * PX_TILE;
    let runs = npix.div_ceil(run);
    let outp = SharedMut(out.as_mut_ptr());
    let resp = residual.map(|r| SharedMut(r.as_ptr().cast_mut()));
    (0..n * tiles * runs).into_par_iter().for_each(|task| {
        // Pixel-major: the tiles of one run are neighbouring tasks, which rayon's halving split keeps
        // on one thread, as it kept the producer's tasks of those pixels; tile-major, each thread read
        // every pixel's input, half of it made by the other core. ResNet-50's layer2.0.conv1 (256->128
        // at 160², two threads) ran 5.5–6.2 ms in the network (4.6 alone) tile-major and 4.6–4.8
        // pixel-major, the whole pass 244–248 -> 236–243 ms p50 (alternating processes, Sapphire
        // Rapids-class VM); one thread even.
        let (b, r, t) = (task / (tiles * runs), task / tiles % runs, task % tiles);
        let (p0, p1) = (r * run, ((r + 1) * run).min(npix));
        let at = (b * out_blocks * npix + p0) * BLOCK;
        // SAFETY: the set was checked; image b's planes (npix apart) from pixel p0 lie in `x`,
        // `out` and the residual for p1 − p0 pixels, and tile t of those pixels is this task's alone.
        unsafe {
            let span = Span {
                x: x.as_ptr().add((b * in_blocks * npix + p0) * BLOCK),
                x_plane: npix * BLOCK,
                npix: p1 - p0,
                out: outp.get().add(at),
                out_plane: npix * BLOCK,
                residual: resp.map(|r| r.get().add(at).cast_const()),
            };
            pointwise_tile(simd, pw, t, &span);
        }
    });
}

/// Pixels of one image in the blocked layout at arbitrary plane strides (floats between one channel
/// block and the next): a whole map, a band of rows of one, or a buffer of rows.
pub struct Span {
    /// The input's first pixel in block 0.
    pub x: *const f32,
    pub x_plane: usize,
    pub npix: usize,
    /// The output's first pixel in block 0; the residual (if any) has the output's strides.
    pub out: *mut f32,
    pub out_plane: usize,
    pub residual: Option<*const f32>,
}

/// `pointwise` on one span, every output tile, on the calling thread: what a fused band runs.
///
/// # Safety
/// The processor must support `simd`; `span` must cover cin/16 input blocks and cout/16 output (and
/// residual) blocks of `npix` pixels, the output no other thread's.
pub unsafe fn pointwise_span(simd: Simd, pw: &PointwiseWeights, span: &Span) {
    for t in 0..pw.cout.div_ceil(CO_TILE) {
        // SAFETY: the caller's contract.
        unsafe { pointwise_tile(simd, pw, t, span) };
    }
}

/// Output tile t (64 channels) of `pw` over `span`: reduction passes of KC input channels, each
/// sweeping the pixels in micro-tiles (at AVX2, each pixel tile's blocks one after another).
///
/// # Safety
/// As `pointwise_span`.
unsafe fn pointwise_tile(simd: Simd, pw: &PointwiseWeights, t: usize, span: &Span) {
    let (in_blocks, out_blocks) = (pw.cin.div_ceil(BLOCK), pw.cout.div_ceil(BLOCK));
    let nb = (out_blocks - t * 4).min(4);
    let wt = &pw.w[pw.w_at + t * in_blocks * BLOCK * CO_TILE..][..in_blocks * BLOCK * CO_TILE];
    let bias = &pw.bias[t];
    let tile_out = t * 4 * span.out_plane;
    for k0 in (0..in_blocks).step_by(KC / BLOCK) {
        let kb = (KC / BLOCK).min(in_blocks - k0);
        let last = k0 + kb == in_blocks;
        for p in (0..span.npix).step_by(PX_TILE) {
            let at = tile_out + p * BLOCK;
            // SAFETY: the caller's contract: pixel p of blocks k0.. of the input, of the tile's
            // blocks of the output and residual.
            unsafe {
                let step = Step {
                    x: span.x.add(k0 * span.x_plane + p * BLOCK),
                    w: wt[k0 * BLOCK * CO_TILE..].as_ptr(),
                    kb,
                    x_stride: span.x_plane,
                    out_stride: span.out_plane,
                    out: span.out.add(at),
                    accumulate: k0 > 0,
                    finish: last.then(|| Finish { bias, residual: span.residual.map(|r| r.add(at)), act: pw.act }),
                };
                let px = (span.npix - p).min(PX_TILE);
                match simd {
                    Simd::Avx512 => tile_dispatch(nb, px, &step),
                    Simd::Avx2 => {
                        for j in 0..nb {
                            tile_avx2_dispatch(px, &step, j);
                        }
                    }
                }
            }
        }
    }
}

/// The last pass's epilogue: `act(acc + bias [+ residual])`, in `common::epilogue`'s order.
struct Finish<'a> {
    bias: &'a [f32; CO_TILE],
    /// The residual at the tile's first block and pixel (the output's layout).
    residual: Option<*const f32>,
    act: Act,
}

/// One micro-tile's operands: `kb` blocks of 16 input channels from `x` (blocks `x_stride` floats
/// apart) and `w` (64 floats per input channel), into `out` (blocks `out_stride` apart).
struct Step<'a> {
    x: *const f32,
    w: *const f32,
    kb: usize,
    x_stride: usize,
    out_stride: usize,
    out: *mut f32,
    accumulate: bool,
    finish: Option<Finish<'a>>,
}

/// The tile for `nb` output blocks (1–4) and `px` pixels (1–6), each a separate instantiation so
/// the accumulators stay in registers.
///
/// # Safety
/// As `tile`.
unsafe fn tile_dispatch(nb: usize, px: usize, s: &Step) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract.
    unsafe {
        macro_rules! by_px {
            ($nb:literal) => {
                match px {
                    6 => tile::<$nb, 6>(s),
                    5 => tile::<$nb, 5>(s),
                    4 => tile::<$nb, 4>(s),
                    3 => tile::<$nb, 3>(s),
                    2 => tile::<$nb, 2>(s),
                    _ => tile::<$nb, 1>(s),
                }
            };
        }
        match nb {
            4 => by_px!(4),
            3 => by_px!(3),
            2 => by_px!(2),
            _ => by_px!(1),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("the AVX-512 level exists only on x86_64 ({nb}, {px}, {})", s.kb)
}

/// `out[j][i] = [out +] Σ_k w[k][j] · x[k][i]` for output block j < NB and pixel i < PX, then the
/// epilogue if `finish`.
///
/// # Safety
/// AVX-512F must be available; `x` must cover kb blocks of PX pixels, `w` kb·16 rows of 64 floats,
/// `out` (and the residual) NB blocks of PX pixels.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile<const NB: usize, const PX: usize>(s: &Step) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract covers every pointer formed below.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); NB]; PX];
        if s.accumulate {
            for (i, row) in acc.iter_mut().enumerate() {
                for (j, a) in row.iter_mut().enumerate() {
                    *a = _mm512_loadu_ps(s.out.add(j * s.out_stride + i * BLOCK));
                }
            }
        }
        for k in 0..s.kb {
            let (xp, wp) = (s.x.add(k * s.x_stride), s.w.add(k * BLOCK * CO_TILE));
            for c in 0..BLOCK {
                let mut wv = [_mm512_setzero_ps(); NB];
                for (j, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(wp.add(c * CO_TILE + j * BLOCK));
                }
                for (i, row) in acc.iter_mut().enumerate() {
                    let xv = _mm512_set1_ps(*xp.add(i * BLOCK + c));
                    for (a, w) in row.iter_mut().zip(&wv) {
                        *a = _mm512_fmadd_ps(*w, xv, *a);
                    }
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (j, &a) in row.iter().enumerate() {
                let at = j * s.out_stride + i * BLOCK;
                let y = match &s.finish {
                    None => a,
                    Some(f) => {
                        let mut y = _mm512_add_ps(a, _mm512_loadu_ps(f.bias.as_ptr().add(j * BLOCK)));
                        if let Some(r) = f.residual {
                            y = _mm512_add_ps(y, _mm512_loadu_ps(r.add(at)));
                        }
                        act_vec(y, f.act)
                    }
                };
                _mm512_storeu_ps(s.out.add(at), y);
            }
        }
    }
}

/// `tile_avx2::<px>`.
///
/// # Safety
/// As `tile_avx2`.
unsafe fn tile_avx2_dispatch(px: usize, s: &Step, j: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract.
    unsafe {
        match px {
            6 => tile_avx2::<6>(s, j),
            5 => tile_avx2::<5>(s, j),
            4 => tile_avx2::<4>(s, j),
            3 => tile_avx2::<3>(s, j),
            2 => tile_avx2::<2>(s, j),
            _ => tile_avx2::<1>(s, j),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("the AVX2 level exists only on x86_64 ({px}, {j}, {})", s.kb)
}

/// `tile::<1, PX>` for the step's output block j, at AVX2: the block's two halves × PX pixels are
/// 12 accumulators, beside two weight halves and a broadcast. Sums in `tile`'s order.
///
/// # Safety
/// AVX2 and FMA must be available; as `tile` for block j.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const PX: usize>(s: &Step, j: usize) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract covers every pointer formed below.
    unsafe {
        let out = s.out.add(j * s.out_stride);
        let mut acc = [[_mm256_setzero_ps(); 2]; PX];
        if s.accumulate {
            for (i, halves) in acc.iter_mut().enumerate() {
                for (h, a) in halves.iter_mut().enumerate() {
                    *a = _mm256_loadu_ps(out.add(i * BLOCK + h * HALF));
                }
            }
        }
        for k in 0..s.kb {
            let (xp, wp) = (s.x.add(k * s.x_stride), s.w.add(k * BLOCK * CO_TILE + j * BLOCK));
            for c in 0..BLOCK {
                let w0 = _mm256_loadu_ps(wp.add(c * CO_TILE));
                let w1 = _mm256_loadu_ps(wp.add(c * CO_TILE + HALF));
                for (i, [a0, a1]) in acc.iter_mut().enumerate() {
                    let xv = _mm256_broadcast_ss(&*xp.add(i * BLOCK + c));
                    *a0 = _mm256_fmadd_ps(w0, xv, *a0);
                    *a1 = _mm256_fmadd_ps(w1, xv, *a1);
                }
            }
        }
        for (i, halves) in acc.iter().enumerate() {
            for (h, &a) in halves.iter().enumerate() {
                let at = i * BLOCK + h * HALF;
                let y = match &s.finish {
                    None => a,
                    Some(f) => {
                        let mut y = _mm256_add_ps(a, _mm256_loadu_ps(f.bias.as_ptr().add(j * BLOCK + h * HALF)));
                        if let Some(r) = f.residual {
                            y = _mm256_add_ps(y, _mm256_loadu_ps(r.add(j * s.out_stride + at)));
                        }
                        act8(y, f.act)
                    }
                };
                _mm256_storeu_ps(out.add(at), y);
            }
        }
    }
}

/// A 3×3 depthwise convolution's weights and biases as `depthwise3x3` reads them, packed once.
pub struct DepthwiseWeights {
    c: usize,
    stride: usize,
    act: Act,
    /// Per block of 16 channels, the nine taps' weights (ky, kx order), zeros past c.
    w: Vec<[[f32; BLOCK]; 9]>,
    /// Per block, zeros past c.
    bias: Vec<[f32; BLOCK]>,
}

impl DepthwiseWeights {
    /// `conv`'s weights packed for `depthwise3x3`; `None` unless it is a 3×3 depthwise convolution of
    /// stride 1 or 2 with padding 1.
    pub fn new(conv: &Conv) -> Option<DepthwiseWeights> {
        let depthwise = conv.groups == conv.cin && conv.cin == conv.cout;
        if !depthwise || conv.kernel != 3 || conv.pad != 1 || !(conv.stride == 1 || conv.stride == 2) {
            return None;
        }
        let blocks = conv.cin.div_ceil(BLOCK);
        let (mut w, mut bias) = (vec![[[0.0f32; BLOCK]; 9]; blocks], vec![[0.0f32; BLOCK]; blocks]);
        for (ch, (taps, &b)) in conv.weight.chunks_exact(9).zip(&conv.bias).enumerate() {
            for (dst, &v) in w[ch / BLOCK].iter_mut().zip(taps) {
                dst[ch % BLOCK] = v;
            }
            bias[ch / BLOCK][ch % BLOCK] = b;
        }
        Some(DepthwiseWeights { c: conv.cin, stride: conv.stride, act: conv.act, w, bias })
    }

    /// The convolution's stride (1 or 2).
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Its channels (in and out).
    pub fn channels(&self) -> usize {
        self.c
    }
}

/// The 3×3 depthwise convolution `dw` (padding 1) of `x` [n][c/16][h·w][16] into `out`
/// [n][c/16][oh·ow][16] (blocked layout). Work: 18 flops per output element; memory: the input read
/// once (each row serves three output rows from the cache), the output written once. Tasks split the
/// channel blocks and the output rows. Panics unless the processor supports `simd`.
pub fn depthwise3x3(simd: Simd, dw: &DepthwiseWeights, x: &[f32], n: usize, h: usize, w: usize, out: &mut [f32]) {
    simd.check();
    let s = dw.stride;
    let (oh, ow) = (crate::reference::out_size(h, 3, s, 1), crate::reference::out_size(w, 3, s, 1));
    assert_eq!(x.len(), blocked_len(n, dw.c, h * w), "blocked depthwise: input size");
    assert_eq!(out.len(), blocked_len(n, dw.c, oh * ow), "blocked depthwise: output size");
    let blocks = dw.c.div_ceil(BLOCK);
    // Row bands per (image, block): enough tasks for every thread.
    let bands = crate::cpu::conv::min_tasks().div_ceil(n * blocks).min(oh).max(1);
    let band = oh.div_ceil(bands);
    let bands = oh.div_ceil(band);
    let outp = SharedMut(out.as_mut_ptr());
    (0..n * blocks * bands).into_par_iter().for_each(|task| {
        let (nb, r) = (task / bands, task % bands);
        let rows = r * band..((r + 1) * band).min(oh);
        // SAFETY: the set was checked; block nb's input plane lies in `x`, its output rows in
        // `out`, and those rows are this task's alone.
        unsafe {
            let src = DwSource { x: x.as_ptr().add(nb * h * w * BLOCK), ring: h, h, w };
            let orow = outp.get().add((nb * oh * ow + rows.start * ow) * BLOCK);
            dw_block_rows(simd, dw, nb % blocks, &src, rows, orow);
        }
    });
}

/// Rows of one channel block of a depthwise input: a whole map, or a ring of rows a band buffer holds.
#[derive(Clone, Copy)]
pub struct DwSource {
    /// The block's first row (rows `w` vectors apart).
    pub x: *const f32,
    /// Image row iy lies at row iy % `ring`: the image's height for a whole map, the buffer's
    /// rows for a ring.
    pub ring: usize,
    /// The image's size (the rows past it, and before row 0, are the padding).
    pub h: usize,
    pub w: usize,
}

/// `depthwise3x3` of output `rows` on the calling thread, every channel block: block cb of the input
/// at `x` + cb · `x_plane` (as `src` describes block 0), of the output at `out` + cb · `out_plane`
/// (row `rows.start` first).
///
/// # Safety
/// The processor must support `simd`; the input rows those output rows read (inside the image) must
/// lie in each block's plane, the output rows in `out`'s, no other thread's.
pub unsafe fn depthwise_span(
    simd: Simd,
    dw: &DepthwiseWeights,
    src: &DwSource,
    x_plane: usize,
    rows: Range<usize>,
    out: *mut f32,
    out_plane: usize,
) {
    for cb in 0..dw.c.div_ceil(BLOCK) {
        // SAFETY: the caller's contract.
        unsafe {
            let block = DwSource { x: src.x.add(cb * x_plane), ..*src };
            dw_block_rows(simd, dw, cb, &block, rows.clone(), out.add(cb * out_plane));
        }
    }
}

/// Output `rows` of channel block `cb` from `src` into `orow` (row `rows.start` first).
///
/// # Safety
/// As `depthwise_span`, for one block.
unsafe fn dw_block_rows(
    simd: Simd,
    dw: &DepthwiseWeights,
    cb: usize,
    src: &DwSource,
    rows: Range<usize>,
    orow: *mut f32,
) {
    let (h, w, s) = (src.h, src.w, dw.stride);
    let ow = crate::reference::out_size(w, 3, s, 1);
    let geometry = DwRows { w, ow, s };
    for (i, oy) in rows.enumerate() {
        let taps: [Option<*const f32>; 3] = std::array::from_fn(|ky| {
            let iy = (oy * s + ky) as isize - 1;
            // SAFETY: rows inside the image lie in the source (the caller's contract).
            (iy >= 0 && (iy as usize) < h).then(|| unsafe { src.x.add(iy as usize % src.ring * w * BLOCK) })
        });
        let (wt, bias, dst) = (&dw.w[cb], &dw.bias[cb], orow.wrapping_add(i * ow * BLOCK));
        // SAFETY: the caller's contract; row i of the output lies at `orow` + i·ow vectors.
        unsafe {
            match simd {
                Simd::Avx512 => dw_row(&geometry, taps, wt, bias, dw.act, dst),
                Simd::Avx2 => {
                    for h in 0..2 {
                        dw_row_avx2(&geometry, taps, (wt, bias, h), dw.act, dst);
                    }
                }
            }
        }
    }
}

/// The shape one block's rows are read with.
struct DwRows {
    w: usize,
    ow: usize,
    s: usize,
}

/// Output pixels per step of `dw_row`: eight accumulators beside the nine tap weights.
const DW_PX: usize = 8;

/// One output row of one channel block from its three input rows (`None`: padding): the interior in
/// steps of DW_PX pixels with no bounds checks, the columns whose taps reach the padding one at a time.
///
/// # Safety
/// AVX-512F must be available; each row must hold w vectors, `orow` ow vectors.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dw_row(
    g: &DwRows,
    rows: [Option<*const f32>; 3],
    taps: &[[f32; BLOCK]; 9],
    bias: &[f32; BLOCK],
    act: Act,
    orow: *mut f32,
) {
    use std::arch::x86_64::*;
    let (w, ow, s) = (g.w, g.ow, g.s);
    // SAFETY: every load below is of a whole vector inside a row (columns ix < w), the stores inside
    // `orow` (columns < ow); the caller's contract covers the rest.
    unsafe {
        let wv: [__m512; 9] = std::array::from_fn(|t| _mm512_loadu_ps(taps[t].as_ptr()));
        let bv = _mm512_loadu_ps(bias.as_ptr());
        // Output columns whose three taps all lie inside the row: ox·s − 1 ≥ 0 and ox·s + 1 ≤ w − 1.
        let lo = 1usize.min(ow);
        let hi = if w >= 2 { ((w - 2) / s + 1).min(ow) } else { 0 }.max(lo);
        // A column whose taps may reach the padding: each tap checked (as many FMAs as taps inside).
        let one = |ox: usize| {
            let mut acc = _mm512_setzero_ps();
            for (ky, row) in rows.iter().enumerate() {
                if let Some(row) = row {
                    for kx in 0..3 {
                        let ix = (ox * s + kx) as isize - 1;
                        if ix >= 0 && (ix as usize) < w {
                            let xv = _mm512_loadu_ps(row.add(ix as usize * BLOCK));
                            acc = _mm512_fmadd_ps(wv[ky * 3 + kx], xv, acc);
                        }
                    }
                }
            }
            _mm512_storeu_ps(orow.add(ox * BLOCK), act_vec(_mm512_add_ps(acc, bv), act));
        };
        for ox in 0..lo {
            one(ox);
        }
        let mut ox = lo;
        while ox + DW_PX <= hi {
            let mut acc = [_mm512_setzero_ps(); DW_PX];
            for (ky, row) in rows.iter().enumerate() {
                if let Some(row) = row {
                    let base = row.add((ox * s - 1) * BLOCK);
                    for kx in 0..3 {
                        for (i, a) in acc.iter_mut().enumerate() {
                            let xv = _mm512_loadu_ps(base.add((i * s + kx) * BLOCK));
                            *a = _mm512_fmadd_ps(wv[ky * 3 + kx], xv, *a);
                        }
                    }
                }
            }
            for (i, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(orow.add((ox + i) * BLOCK), act_vec(_mm512_add_ps(*a, bv), act));
            }
            ox += DW_PX;
        }
        for ox in ox..ow {
            one(ox);
        }
    }
}

/// Output pixels per step of `dw_row_avx2`: four accumulators beside the nine tap weights and the
/// bias in the 16 ymm registers.
const DW_PX_AVX2: usize = 4;

/// `dw_row` at AVX2 for half `h` of the block (lanes 8h..8h + 8), in its order of summation.
///
/// # Safety
/// AVX2 and FMA must be available; as `dw_row`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dw_row_avx2(
    g: &DwRows,
    rows: [Option<*const f32>; 3],
    (taps, bias, h): (&[[f32; BLOCK]; 9], &[f32; BLOCK], usize),
    act: Act,
    orow: *mut f32,
) {
    use std::arch::x86_64::*;
    let (w, ow, s) = (g.w, g.ow, g.s);
    let (rows, orow) = (rows.map(|r| r.map(|r| r.wrapping_add(h * HALF))), orow.wrapping_add(h * HALF));
    // SAFETY: every load below is of a half vector inside a row (columns ix < w), the stores inside
    // `orow` (columns < ow); the caller's contract covers the rest.
    unsafe {
        let wv: [__m256; 9] = std::array::from_fn(|t| _mm256_loadu_ps(taps[t][h * HALF..].as_ptr()));
        let bv = _mm256_loadu_ps(bias[h * HALF..].as_ptr());
        let lo = 1usize.min(ow);
        let hi = if w >= 2 { ((w - 2) / s + 1).min(ow) } else { 0 }.max(lo);
        let one = |ox: usize| {
            let mut acc = _mm256_setzero_ps();
            for (ky, row) in rows.iter().enumerate() {
                if let Some(row) = row {
                    for kx in 0..3 {
                        let ix = (ox * s + kx) as isize - 1;
                        if ix >= 0 && (ix as usize) < w {
                            let xv = _mm256_loadu_ps(row.add(ix as usize * BLOCK));
                            acc = _mm256_fmadd_ps(wv[ky * 3 + kx], xv, acc);
                        }
                    }
                }
            }
            _mm256_storeu_ps(orow.add(ox * BLOCK), act8(_mm256_add_ps(acc, bv), act));
        };
        for ox in 0..lo {
            one(ox);
        }
        let mut ox = lo;
        while ox + DW_PX_AVX2 <= hi {
            let mut acc = [_mm256_setzero_ps(); DW_PX_AVX2];
            for (ky, row) in rows.iter().enumerate() {
                if let Some(row) = row {
                    let base = row.add((ox * s - 1) * BLOCK);
                    for kx in 0..3 {
                        for (i, a) in acc.iter_mut().enumerate() {
                            let xv = _mm256_loadu_ps(base.add((i * s + kx) * BLOCK));
                            *a = _mm256_fmadd_ps(wv[ky * 3 + kx], xv, *a);
                        }
                    }
                }
            }
            for (i, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(orow.add((ox + i) * BLOCK), act8(_mm256_add_ps(*a, bv), act));
            }
            ox += DW_PX_AVX2;
        }
        for ox in ox..ow {
            one(ox);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dw_row_avx2(
    g: &DwRows,
    _: [Option<*const f32>; 3],
    _: (&[[f32; BLOCK]; 9], &[f32; BLOCK], usize),
    _: Act,
    _: *mut f32,
) {
    unreachable!("the AVX2 level exists only on x86_64 ({} columns)", g.ow)
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dw_row(g: &DwRows, _: [Option<*const f32>; 3], _: &[[f32; BLOCK]; 9], _: &[f32; BLOCK], _: Act, _: *mut f32) {
    unreachable!("the AVX-512 level exists only on x86_64 ({} columns)", g.ow)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::conv::tests::uniform;
    use crate::reference;

    /// Subsampling keeps pixel (2y, 2x) of each block, odd sizes included.
    #[test]
    fn subsample_keeps_every_other_pixel() {
        let (n, c, h, w) = (2, 20, 5, 7);
        let x: Vec<f32> = (0..blocked_len(n, c, h * w)).map(|i| i as f32).collect();
        let (oh, ow) = (3, 4);
        let mut out = vec![f32::NAN; blocked_len(n, c, oh * ow)];
        subsample2(&x, n, c, (h, w), &mut out);
        for plane in 0..n * c.div_ceil(BLOCK) {
            for (y, xx, l) in (0..oh).flat_map(|y| (0..ow).flat_map(move |xx| (0..BLOCK).map(move |l| (y, xx, l)))) {
                let got = out[((plane * oh + y) * ow + xx) * BLOCK + l];
                assert_eq!(
                    got,
                    x[((plane * h + 2 * y) * w + 2 * xx) * BLOCK + l],
                    "plane {plane} ({y}, {xx}) lane {l}"
                );
            }
        }
    }

    /// The blocked max-pool against the reference on odd and even sizes, a partial block, a batch.
    #[test]
    fn max_pool_matches_the_reference() {
        let mut rnd = uniform(9);
        for (n, c, h, w) in [(1, 16, 7, 9), (2, 21, 8, 6), (1, 32, 1, 1), (1, 16, 2, 3), (1, 48, 33, 30)] {
            let x: Vec<f32> = (0..n * c * h * w).map(|_| rnd()).collect();
            let (oh, ow) = (reference::out_size(h, 3, 2, 1), reference::out_size(w, 3, 2, 1));
            let mut want = vec![0.0; n * c * oh * ow];
            reference::max_pool_3x3s2(&x, n * c, h, w, &mut want);
            // The layout by its definition (the reorders need a set; the pool does not).
            let blocks = c.div_ceil(BLOCK);
            let to_blocked = |v: &[f32], npix: usize| {
                let mut out = vec![0.0; blocked_len(n, c, npix)];
                for b in 0..n {
                    for ch in 0..c {
                        for q in 0..npix {
                            out[((b * blocks + ch / BLOCK) * npix + q) * BLOCK + ch % BLOCK] =
                                v[(b * c + ch) * npix + q];
                        }
                    }
                }
                out
            };
            for &simd in &Simd::supported() {
                let mut got = vec![f32::NAN; blocked_len(n, c, oh * ow)];
                max_pool3x3s2(simd, &to_blocked(&x, h * w), n, c, (h, w), &mut got);
                assert_eq!(got, to_blocked(&want, oh * ow), "{simd:?} {n}x{c}x{h}x{w}");
            }
        }
    }

    /// Each set's reorders against the layout's definition, with partial blocks, partial halves (at
    /// AVX2) and partial pixel groups.
    #[test]
    fn reorders_round_trip_and_zero_the_padding_channels() {
        let mut rnd = uniform(5);
        for simd in Simd::supported() {
            for (n, c, npix) in [(1, 16, 7), (2, 21, 13), (1, 3, 1), (3, 40, 50), (1, 27, 17)] {
                let x: Vec<f32> = (0..n * c * npix).map(|_| rnd()).collect();
                let mut blocked = vec![f32::NAN; blocked_len(n, c, npix)];
                to_blocked(simd, &x, n, c, npix, &mut blocked);
                let blocks = c.div_ceil(BLOCK);
                for b in 0..n {
                    for ch in 0..blocks * BLOCK {
                        for p in 0..npix {
                            let got = blocked[((b * blocks + ch / BLOCK) * npix + p) * BLOCK + ch % BLOCK];
                            let want = if ch < c { x[(b * c + ch) * npix + p] } else { 0.0 };
                            assert_eq!(got.to_bits(), want.to_bits(), "{simd:?}: image {b} channel {ch} pixel {p}");
                        }
                    }
                }
                let mut back = vec![f32::NAN; x.len()];
                from_blocked(simd, &blocked, n, c, npix, &mut back);
                assert_eq!(back, x, "{simd:?}: {n}x{c}x{npix} back");
            }
        }
    }

    /// Against `reference::conv2d` through the reorders: partial channel blocks and tiles, pixel
    /// counts that leave partial micro-tiles, two reduction passes, batches, residuals, every
    /// activation, and several thread counts' worth of tasks.
    /// Every set, and the sets agree bit for bit.
    #[test]
    fn pointwise_matches_the_reference() {
        let sets = Simd::supported();
        if sets.is_empty() {
            eprintln!("no AVX2 or AVX-512 on this machine: the blocked pointwise convolution is not run");
            return;
        }
        let mut rnd = uniform(11);
        // (n, cin, cout, npix, act, residual)
        let cases = [
            (1, 16, 64, 6, Act::None, false),
            (2, 21, 37, 13, Act::Leaky(0.1), true),
            (1, 64, 130, 97, Act::Leaky(0.0), false),
            (1, 600, 70, 25, Act::Relu6, true),
            (3, 3, 5, 1, Act::Leaky(0.1), false),
            (1, 128, 256, 1600, Act::Leaky(0.1), true),
        ];
        for (n, cin, cout, npix, act, with_res) in cases {
            let conv = Conv::with_values("pw", [cin, cout, 1, 1, 1], act, &mut rnd);
            let x: Vec<f32> = (0..n * cin * npix).map(|_| rnd() * 3.0).collect();
            let res: Option<Vec<f32>> = with_res.then(|| (0..n * cout * npix).map(|_| rnd()).collect());
            let mut want = vec![0.0; n * cout * npix];
            reference::conv2d(&conv, &x, n, npix, 1, &mut want, cout, res.as_deref());
            let pw = PointwiseWeights::new(&conv).expect("a 1x1 conv");
            let mut first: Option<Vec<f32>> = None;
            for &simd in &sets {
                let mut xb = vec![0.0; blocked_len(n, cin, npix)];
                to_blocked(simd, &x, n, cin, npix, &mut xb);
                let rb = res.as_ref().map(|r| {
                    let mut rb = vec![0.0; blocked_len(n, cout, npix)];
                    to_blocked(simd, r, n, cout, npix, &mut rb);
                    rb
                });
                let mut yb = vec![f32::NAN; blocked_len(n, cout, npix)];
                pointwise(simd, &pw, &xb, n, npix, &mut yb, rb.as_deref());
                let mut got = vec![0.0; n * cout * npix];
                from_blocked(simd, &yb, n, cout, npix, &mut got);
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    let bound = 1e-4 * e.abs().max(1.0);
                    assert!((g - e).abs() <= bound, "{simd:?} {cin}->{cout} x{npix}: element {i}: {g} vs {e}");
                }
                // Padding channels of the output: the zero weights and biases past cout give act(0 [+ 0]).
                let blocks = cout.div_ceil(BLOCK);
                for b in 0..n {
                    for ch in cout..blocks * BLOCK {
                        for p in 0..npix {
                            let v = yb[((b * blocks + ch / BLOCK) * npix + p) * BLOCK + ch % BLOCK];
                            assert_eq!(v, 0.0, "{simd:?}: padding channel {ch} pixel {p}");
                        }
                    }
                }
                match &first {
                    None => first = Some(yb),
                    Some(f) => assert!(
                        f.iter().zip(&yb).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{simd:?} {cin}->{cout} x{npix}: not the bits of {:?}",
                        sets[0]
                    ),
                }
            }
        }
    }

    /// Against `reference::conv2d` through the reorders: strides 1 and 2, partial channel blocks, maps
    /// of one to three columns (no interior step), odd sizes, every activation, batches.
    #[test]
    fn depthwise_matches_the_reference() {
        let sets = Simd::supported();
        if sets.is_empty() {
            eprintln!("no AVX2 or AVX-512 on this machine: the blocked depthwise convolution is not run");
            return;
        }
        let mut rnd = uniform(23);
        // (n, c, h, w, stride, act)
        let cases = [
            (1, 16, 7, 9, 1, Act::Leaky(0.1)),
            (2, 21, 10, 13, 2, Act::Relu6),
            (1, 40, 1, 1, 1, Act::None),
            (1, 5, 2, 30, 2, Act::Leaky(0.0)),
            (1, 64, 40, 40, 1, Act::Leaky(0.1)),
            (1, 33, 17, 20, 2, Act::None),
            (1, 16, 5, 1, 1, Act::Leaky(0.1)),
            (1, 16, 6, 2, 2, Act::Leaky(0.1)),
            (1, 16, 3, 3, 1, Act::Relu6),
            (3, 48, 19, 37, 1, Act::Leaky(0.1)),
        ];
        for (n, c, h, w, stride, act) in cases {
            let conv = Conv::with_values("dw", [c, c, 3, stride, c], act, &mut rnd);
            let (oh, ow) = (reference::out_size(h, 3, stride, 1), reference::out_size(w, 3, stride, 1));
            let x: Vec<f32> = (0..n * c * h * w).map(|_| rnd() * 3.0).collect();
            let mut want = vec![0.0; n * c * oh * ow];
            reference::conv2d(&conv, &x, n, h, w, &mut want, c, None);
            let dw = DepthwiseWeights::new(&conv).expect("a 3x3 depthwise conv");
            let mut first: Option<Vec<f32>> = None;
            for &simd in &sets {
                let mut xb = vec![0.0; blocked_len(n, c, h * w)];
                to_blocked(simd, &x, n, c, h * w, &mut xb);
                let mut yb = vec![f32::NAN; blocked_len(n, c, oh * ow)];
                depthwise3x3(simd, &dw, &xb, n, h, w, &mut yb);
                let mut got = vec![0.0; n * c * oh * ow];
                from_blocked(simd, &yb, n, c, oh * ow, &mut got);
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    let bound = 1e-5 * e.abs().max(1.0);
                    assert!((g - e).abs() <= bound, "{simd:?} c{c} {h}x{w} s{stride}: element {i}: {g} vs {e}");
                }
                assert!(yb.iter().all(|v| !v.is_nan()), "{simd:?} c{c} {h}x{w} s{stride}: every output vector written");
                match &first {
                    None => first = Some(yb),
                    Some(f) => assert!(
                        f.iter().zip(&yb).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{simd:?} c{c} {h}x{w} s{stride}: not the bits of {:?}",
                        sets[0]
                    ),
                }
            }
        }
    }
}
