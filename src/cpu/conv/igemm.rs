//! Dense convolution (groups 1, stride 1 or 2, any kernel size) as an implicit GEMM with an AVX-512
//! micro-kernel (`Isa::Avx512`) or an AVX2 + FMA one (`Isa::Avx2`, in `igemm_avx2`).
//!
//! `out[co, pixel] = Σ_k W[co, k] · B[k, pixel]` with k = (ci, ky, kx). B is never materialised: the
//! input rows are copied into zero-padded *phase planes* (for stride 2 the padded plane is split into
//! its four even/odd row/column phases), in which tap k of every output pixel of the flattened grid
//! `oy·wq + ox` lies at `offset[k] + oy·wq + ox`. So each step of the reduction loads NR consecutive
//! floats at a per-k offset, and the micro-kernel reads its B operand straight from the planes, with no
//! packing and no im2col. Columns `ox ≥ ow` of the grid are junk, computed and dropped. A 1×1 stride-1
//! convolution reads its input in place (the grid is the input plane itself). On memory-bound layers
//! each task copies only the rows it reads, so the copy is written and read in the core's cache (a
//! whole-image copy costs a write and a read of the input through memory); elsewhere the whole image
//! is copied once (`Planes`).
//!
//! The weights are packed once per convolution (`Conv::packed`) as [cout/MR][K][MR], so a micro-tile
//! broadcasts MR consecutive floats per step.
//!
//! Each output sums its products in k order, in one thread: results do not depend on the thread
//! count, and differ from the definition only by f32 rounding (fused multiply-adds).

use super::common::{Sinks, aligned, min_tasks, store_grid};
use super::tile::{MR, NR};
use crate::cpu::isa::{Simd, avx_dispatch};
use crate::cpu::rows::valid_columns;
use crate::graph::Conv;
use crate::reference::out_size;
use rayon::prelude::*;
use std::cell::RefCell;

/// Reduction steps per pass over a task's tiles: a tile's B rows (at most KC·NR floats, 48 KiB for a 1×1
/// convolution, much less for 3×3 whose taps share lines) stay in L1 while every weight block uses them.
const KC: usize = 256;
/// Floats of accumulator band per task (1 MiB): the band and the planes it reads stay in L2.
const BAND_BUDGET: usize = 1 << 18;

thread_local! {
    /// A task's phase planes and accumulator band, reused across calls.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    /// Whole-image phase planes (`Planes::Whole`), reused across calls.
    static WHOLE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Whether `conv` has a shape this path computes.
pub fn handles(conv: &Conv) -> bool {
    conv.groups == 1 && (conv.stride == 1 || conv.stride == 2)
}

/// Whether this path is the faster one for `conv` (measured on AVX-512 Xeons): for 1×1 stride-1
/// convolutions with 64 or more input channels, a packed GEMM straight on the input is ahead, as its
/// B panel is contiguous while each step here reads another channel plane.
pub fn preferred(conv: &Conv) -> bool {
    handles(conv) && !(conv.kernel == 1 && conv.stride == 1 && conv.cin >= 64)
}

/// Whether one image's planes are small enough for the 32-bit tap offsets (they are for every input the
/// image limits admit; a larger one takes the portable paths).
pub fn fits(conv: &Conv, h: usize, w: usize) -> bool {
    let l = Layout::new(conv, h, w);
    // The largest plane stride `conv` uses (whole planes with their halo rows); the largest offset,
    // plus a grid (at most a plane) read from it.
    let halo = (conv.kernel - 1) / conv.stride + 1;
    let plane = if l.in_place { l.plane } else { conflict_free_stride((l.hq + halo) * l.wq) };
    conv.cin.saturating_mul(l.phases * l.phases).saturating_mul(plane).saturating_add(plane) < u32::MAX as usize
}

/// `weight` [cout, K] as [cout.div_ceil(MR)][K][MR], rows past cout zero.
pub fn pack_weights(weight: &[f32], cout: usize, depth: usize) -> Vec<f32> {
    let blocks = cout.div_ceil(MR);
    let mut packed = vec![0.0f32; blocks * depth * MR];
    for co in 0..cout {
        let (blk, r) = (co / MR, co % MR);
        for k in 0..depth {
            packed[(blk * depth + k) * MR + r] = weight[co * depth + k];
        }
    }
    packed
}

/// The shape of one input channel's planes.
#[derive(Clone, Copy)]
struct Layout {
    /// Phase planes per axis: 1, or 2 for stride 2 (except a 1-wide kernel, which reads phase 0 only).
    phases: usize,
    /// Rows and columns of a phase plane (the zero-padded input, split by phase).
    hq: usize,
    wq: usize,
    /// Floats from one plane to the next: hq·wq rounded up to a conflict-free stride, or h·w in place.
    plane: usize,
    /// Whether the planes are the input itself (1×1, stride 1, with a conflict-free plane size).
    in_place: bool,
}

impl Layout {
    fn new(conv: &Conv, h: usize, w: usize) -> Layout {
        let (k, s, p) = (conv.kernel, conv.stride, conv.pad);
        let (hq, wq) = ((h + 2 * p).div_ceil(s), (w + 2 * p).div_ceil(s));
        let in_place = k == 1 && s == 1 && p == 0 && conflict_free(h * w);
        let plane = if in_place { h * w } else { conflict_free_stride(hq * wq) };
        Layout { phases: k.min(s), hq, wq, plane, in_place }
    }
}

/// Where tap k of grid pixel 0 lies in the planes of one image, and the grid's shape.
struct Geometry {
    l: Layout,
    /// Per k = (ci, ky, kx).
    offsets: Vec<u32>,
    /// Grid pixels per image: oh·wq.
    grid: usize,
}

/// The offsets for planes `plane` floats apart (`l.plane` for whole images, a band's stride for bands).
fn geometry(conv: &Conv, l: Layout, plane: usize, oh: usize) -> Geometry {
    let (k, s) = (conv.kernel, conv.stride);
    let per_channel = l.phases * l.phases;
    let mut offsets = Vec::with_capacity(conv.cin * k * k);
    for ci in 0..conv.cin {
        for ky in 0..k {
            for kx in 0..k {
                let phase = (ky % s) * l.phases + kx % s;
                offsets.push(((ci * per_channel + phase) * plane + (ky / s) * l.wq + kx / s) as u32);
            }
        }
    }
    Geometry { offsets, grid: oh * l.wq, l }
}

/// Whether planes `stride` floats apart spread a tile's rows over the L1 sets. A micro-tile reads the
/// same columns of KC consecutive planes; when the stride is a multiple of 128 bytes, those lines fall
/// in at most half of the 64 sets and evict each other (a 40×40 map is 6400 bytes: 16 sets).
fn conflict_free(stride: usize) -> bool {
    !stride.is_multiple_of(32)
}

/// The smallest stride of at least `len` floats that is conflict-free: an odd number of cache lines.
pub(super) fn conflict_free_stride(len: usize) -> usize {
    let lines = len.div_ceil(16);
    (lines | 1) * 16
}

/// Fills `dst` [phases][plane] with rows `qy0..qy0 + rows` of one input channel's phase planes (the
/// zero-padded channel `src` (h×w), split by phase; rows past the planes are zeros): every element a
/// tile reads is written, so the buffer may hold old values.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn fill_channel(l: &Layout, conv: &Conv, src: &[f32], h: usize, w: usize, qy0: usize, rows: usize, dst: &mut [f32]) {
    let (s, p) = (conv.stride, conv.pad);
    let plane = dst.len() / (l.phases * l.phases);
    for (phase, dst) in dst.chunks_exact_mut(plane).enumerate() {
        let (a, bp) = (phase / l.phases, phase % l.phases);
        // Columns qx whose input column qx·s + bp − p lies inside [0, w).
        let (lo, hi) = valid_columns(bp, s, p, w, l.wq);
        for (r, row) in dst[..rows * l.wq].chunks_exact_mut(l.wq).enumerate() {
            let iy = ((qy0 + r) * s + a) as isize - p as isize;
            if qy0 + r >= l.hq || iy < 0 || iy as usize >= h {
                row.fill(0.0);
                continue;
            }
            let srow = &src[iy as usize * w..(iy as usize + 1) * w];
            row[..lo].fill(0.0);
            row[hi..].fill(0.0);
            let first = lo * s + bp - p;
            let run = &mut row[lo..hi];
            if s == 1 {
                run.copy_from_slice(&srow[first..first + run.len()]);
            } else if let Some((last, head)) = run.split_last_mut() {
                // Stride 2 (the only other one `handles` takes): pairs of a constant size, so the
                // gather of every other column vectorises as a deinterleave (shuffles at the level
                // `fill_channel_fast` builds for).
                debug_assert_eq!(s, 2);
                let len = head.len();
                for (v, pair) in head.iter_mut().zip(srow[first..first + 2 * len].chunks_exact(2)) {
                    *v = pair[0];
                }
                *last = srow[first + 2 * len];
            }
        }
    }
}

avx_dispatch!(fill_channel_fast, fill_channel_avx2, fill_channel_avx512, fill_channel, (l: &Layout, conv: &Conv, src: &[f32], h: usize, w: usize, qy0: usize, rows: usize, dst: &mut [f32]));

/// Where the tiles' B operand comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
enum Planes {
    /// The input itself (1×1 stride 1 with a conflict-free plane size).
    InPlace,
    /// Phase planes of whole images, filled once before the GEMM and shared by every task (when bands
    /// would refill too much: many small tasks, or tasks split by output channel).
    Whole,
    /// Each task fills the plane rows its pixels read, so the copy is written and read in the core's
    /// cache instead of going through memory.
    Bands,
}

/// The convolution of `conv::conv2d`, on `kernel`. Call only when `handles(conv)` and `fits`.
#[allow(clippy::too_many_arguments)]
pub(super) fn conv(
    kernel: Simd,
    conv: &Conv,
    x: &[f32],
    n: usize,
    h: usize,
    w: usize,
    sinks: Sinks,
    residual: Option<&[f32]>,
) {
    // An internal invariant (levels are checked where they are chosen), kept as a check because the
    // alternative to a panic here is an illegal instruction.
    assert!(kernel.isa().supported(), "igemm: the {kernel:?} kernel was chosen on a processor without it");
    let (k, s, p) = (conv.kernel, conv.stride, conv.pad);
    let (oh, ow) = (out_size(h, k, s, p), out_size(w, k, s, p));
    let depth = conv.cin * k * k;
    let packed = conv.packed.igemm.get_or_init(|| pack_weights(&conv.weight, conv.cout, depth));
    let l = Layout::new(conv, h, w);
    let grid = oh * l.wq;

    let blocks = conv.cout.div_ceil(MR);
    let tiles = grid.div_ceil(NR);
    // Split the pixels into even chunks (within the band budget, and into min_tasks() when each still gets
    // a few tiles); split the output channels only when that is not enough tasks.
    let max_chunk = (BAND_BUDGET / (blocks * MR * NR)).clamp(1, tiles);
    let want = tiles.div_ceil(max_chunk).max(min_tasks().div_ceil(n).min(tiles / 4));
    let chunk_tiles = tiles.div_ceil(want.max(1));
    let pix_tasks = tiles.div_ceil(chunk_tiles);
    let co_tasks = min_tasks().div_ceil(n * pix_tasks).clamp(1, blocks);
    let blocks_per_task = blocks.div_ceil(co_tasks);
    let co_tasks = blocks.div_ceil(blocks_per_task);
    // A chunk's pixels span at most chunk/wq + 2 grid rows (it may start and end mid-row); its taps read
    // (k − 1)/s rows below, and a junk column's taps wrap into one more row.
    let halo = (k - 1) / s + 1;
    let band_rows = ((chunk_tiles * NR).div_ceil(l.wq) + 2 + halo).min(l.hq + halo);
    // Bands where the conv is bound by memory rather than arithmetic (few products per input read:
    // cout·k² ≤ 256, the narrow 1×1 convolutions and the small stems), while their refills (halos, one
    // fill per output-channel task) add at most half to a whole-image fill. Measured one thread, A/B
    // interleaved: 1×1 16→32 and 32→32 at 160² 1.2x, 8→16 at 320² 1.13x, 16→96 at 160² 1.08x, the
    // x0.25 stem 1.07x; a 3×3 stride-2 64→128 at 160² 0.92x, hence the arithmetic bound.
    let mode = if l.in_place {
        Planes::InPlace
    } else if conv.cout * k * k <= 256 && pix_tasks * co_tasks * band_rows * 2 <= (l.hq + halo) * 3 {
        Planes::Bands
    } else {
        Planes::Whole
    };
    let (rows, plane) = match mode {
        Planes::InPlace => (l.hq, l.plane),
        Planes::Bands => (band_rows, conflict_free_stride(band_rows * l.wq)),
        Planes::Whole => (l.hq + halo, conflict_free_stride((l.hq + halo) * l.wq)),
    };
    #[cfg(test)]
    tests::MODES_USED[mode as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let g = geometry(conv, l, plane, oh);
    let per_image = conv.cin * l.phases * l.phases * plane;
    // Taken rather than borrowed: a nested call on this thread (rayon work stealing) gets its own.
    let mut whole = WHOLE.with(|c| c.take());
    let mut at = 0;
    if mode == Planes::Whole {
        at = aligned(&mut whole, n * per_image + NR);
        whole[at + n * per_image..].fill(0.0);
        let nph = l.phases * l.phases;
        whole[at..at + n * per_image].par_chunks_mut(nph * plane).enumerate().for_each(|(bc, dst)| {
            fill_channel_fast(kernel.isa(), &l, conv, &x[bc * h * w..(bc + 1) * h * w], h, w, 0, rows, dst)
        });
    }
    let task = Task {
        kernel,
        conv,
        g: &g,
        x,
        h,
        w,
        mode,
        rows,
        plane,
        whole: &whole[at..],
        per_image,
        packed,
        depth,
        sinks,
        residual,
        oh,
        ow,
    };
    (0..n * pix_tasks * co_tasks).into_par_iter().for_each(|t| {
        let (b, rest) = (t / (pix_tasks * co_tasks), t % (pix_tasks * co_tasks));
        let (pt, ct) = (rest / co_tasks, rest % co_tasks);
        let tile0 = pt * chunk_tiles;
        let ntiles = chunk_tiles.min(tiles - tile0);
        let blk0 = ct * blocks_per_task;
        let nblk = blocks_per_task.min(blocks - blk0);
        // Taken rather than borrowed: a nested call on this thread (rayon work stealing) gets its own.
        let (mut planes, mut band) = SCRATCH.with(|c| c.take());
        task.run(b, tile0, ntiles, blk0, nblk, &mut planes, &mut band);
        SCRATCH.with(|c| *c.borrow_mut() = (planes, band));
    });
    WHOLE.with(|c| *c.borrow_mut() = whole);
}

struct Task<'a> {
    kernel: Simd,
    conv: &'a Conv,
    g: &'a Geometry,
    /// The input [n, cin, h, w]: read in place, or copied into planes as `mode` says.
    x: &'a [f32],
    h: usize,
    w: usize,
    mode: Planes,
    /// Plane rows per band (or per whole plane), the floats from one plane to the next, the whole
    /// images' planes and the floats per image there.
    rows: usize,
    plane: usize,
    whole: &'a [f32],
    per_image: usize,
    packed: &'a [f32],
    depth: usize,
    sinks: Sinks,
    residual: Option<&'a [f32]>,
    oh: usize,
    ow: usize,
}

impl Task<'_> {
    /// Output blocks blk0..blk0+nblk over grid tiles tile0..tile0+ntiles of image b.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        b: usize,
        tile0: usize,
        ntiles: usize,
        blk0: usize,
        nblk: usize,
        planes: &mut Vec<f32>,
        band: &mut Vec<f32>,
    ) {
        let ld = ntiles * NR;
        let band_at = aligned(band, nblk * MR * ld);
        let band = &mut band[band_at..];
        let px0 = tile0 * NR;
        let len = (self.g.grid - px0).min(ld);
        let l = &self.g.l;
        let img: &[f32] = match self.mode {
            Planes::InPlace => &self.x[b * self.conv.cin * self.h * self.w + px0..],
            Planes::Whole => &self.whole[b * self.per_image + px0..],
            Planes::Bands => {
                let (cin, hw, nph) = (self.conv.cin, self.h * self.w, l.phases * l.phases);
                let qy0 = px0 / l.wq;
                let at = aligned(planes, self.per_image + NR);
                let planes = &mut planes[at..];
                planes[self.per_image..].fill(0.0);
                for (ci, dst) in planes[..self.per_image].chunks_exact_mut(nph * self.plane).enumerate() {
                    let src = &self.x[(b * cin + ci) * hw..][..hw];
                    fill_channel_fast(self.kernel.isa(), l, self.conv, src, self.h, self.w, qy0, self.rows, dst);
                }
                &planes[px0 - qy0 * l.wq..]
            }
        };
        let a = &self.packed[blk0 * self.depth * MR..];
        // SAFETY: `conv` checked that the processor runs `kernel`. Every B read lies at offset[k] + px +
        // lane with px + lane < len: in place, inside the image's planes; otherwise within `rows` rows
        // of the last plane (or the NR floats of slack after it), as `conv` sized them.
        unsafe { gemm_tiles(self.kernel, a, &self.g.offsets, img, len, ntiles, nblk, band, ld) };
        self.store(b, px0, ld, blk0, nblk, band);
    }

    /// Copies the band's valid pixels (ox < ow) to the output and applies bias, residual and activation.
    fn store(&self, b: usize, px0: usize, ld: usize, blk0: usize, nblk: usize, band: &[f32]) {
        let (conv, plane) = (self.conv, self.oh * self.ow);
        let len = (px0 + ld).min(self.g.grid) - px0;
        for co in blk0 * MR..((blk0 + nblk) * MR).min(conv.cout) {
            let res = self.residual.map(|r| &r[(b * conv.cout + co) * plane..][..plane]);
            let (out, plane_at, act) = self.sinks.route(b, co, plane);
            // SAFETY: each output pixel of each channel belongs to exactly one task's band.
            unsafe {
                store_grid(
                    self.kernel.isa(),
                    &band[(co - blk0 * MR) * ld..][..len],
                    px0,
                    self.g.l.wq,
                    self.ow,
                    out,
                    plane_at,
                    conv.bias[co],
                    res,
                    act,
                )
            };
        }
    }
}

/// `C[j·MR + r, t·NR + i] = Σ_k a[(j·depth + k)·MR + r] · src[offsets[k] + t·NR + i]` for blocks
/// j < nblk, tiles t < ntiles and pixels t·NR + i < len (the rest of C is junk), depth = offsets.len(),
/// C rows `ld` apart: the reduction in passes of KC steps, tile-major, so a tile's B rows (KC·NR floats)
/// stay in L1 while every weight block passes over them; the first block's pass also prefetches the
/// next tile's rows. On the AVX2 kernel with a deep reduction and several blocks, each tile's B rows
/// are first copied to one contiguous panel (see `PACK_MIN_DEPTH`). Each output sums its products in k
/// order, packed or not.
///
/// # Safety
/// The processor must run `kernel`; `src` must cover `offsets[k] + len` for every k; `a` must hold
/// nblk·depth·MR floats; `c` must hold nblk·MR rows of `ld ≥ ntiles·NR` floats.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_tiles(
    kernel: Simd,
    a: &[f32],
    offsets: &[u32],
    src: &[f32],
    len: usize,
    ntiles: usize,
    nblk: usize,
    c: &mut [f32],
    ld: usize,
) {
    let g = Gemm { kernel, a, offsets, src, len, ntiles, nblk, ld };
    if kernel == Simd::Avx2 && nblk >= PACK_MIN_BLOCKS && offsets.len() >= PACK_MIN_DEPTH {
        PANEL.with_borrow_mut(|(panel, poffs)| {
            panel.resize(KC_PACK * NR + 16, 0.0);
            let at = panel.as_ptr().align_offset(64);
            if poffs.len() != KC_PACK {
                *poffs = (0..KC_PACK).map(|k| (k * NR) as u32).collect();
            }
            // SAFETY: the caller's contract.
            unsafe { g.run(c, Some((&mut panel[at..at + KC_PACK * NR], poffs))) }
        })
    } else {
        // SAFETY: the caller's contract.
        unsafe { g.run(c, None) }
    }
}

/// Blocks of output channels from which `gemm_tiles` packs each B panel.
const PACK_MIN_BLOCKS: usize = 2;
/// Reduction depth from which `gemm_tiles` packs (Zen 3, conv_shapes, one thread, best of three
/// alternating runs: K = 256 gains 1.16–1.43x — ResNet FPN merge, layer3, SSH, x1.0 stage3.1; K = 128
/// was mixed, 0.93–0.95x on the Winograd layer2 and FPN merge, 1.41x on the fused x0.25 stage2.1; K
/// ≤ 64 loses 0.7–0.9x: the planes a panel reads stay in L1 anyway and the copy costs more). Packed,
/// the micro-kernel's loads walk one sequential stream instead of KC_PACK planes far apart.
const PACK_MIN_DEPTH: usize = 256;
/// Reduction steps per packed panel: KC_PACK·NR floats (24 KiB) stay in L1 with an A block.
const KC_PACK: usize = 128;

thread_local! {
    /// `gemm_tiles`' packed panel and its offsets (k·NR).
    static PANEL: RefCell<(Vec<f32>, Vec<u32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// `gemm_tiles`' operands.
struct Gemm<'a> {
    kernel: Simd,
    a: &'a [f32],
    offsets: &'a [u32],
    src: &'a [f32],
    len: usize,
    ntiles: usize,
    nblk: usize,
    ld: usize,
}

impl Gemm<'_> {
    /// The passes; with `panel` (KC_PACK·NR floats and their offsets) each tile's B rows of a pass are
    /// copied there first and every block reads the copy. Passes are KC_PACK steps then (accumulating
    /// across passes continues each sum in k order, so the values do not change).
    ///
    /// # Safety
    /// As `gemm_tiles`.
    unsafe fn run(&self, c: &mut [f32], mut panel: Option<(&mut [f32], &[u32])>) {
        let (depth, ld) = (self.offsets.len(), self.ld);
        let packing = panel.is_some();
        let pass = if packing { KC_PACK } else { KC };
        for kc0 in (0..depth).step_by(pass) {
            let kc = pass.min(depth - kc0);
            let offsets = &self.offsets[kc0..kc0 + kc];
            for t in 0..self.ntiles {
                let px = t * NR;
                let valid = NR.min(self.len - px);
                let (b_offsets, b): (&[u32], &[f32]) = match panel.as_mut() {
                    Some((buf, poffs)) => {
                        for (k, &off) in offsets.iter().enumerate() {
                            let from = off as usize + px;
                            if valid == NR {
                                // A fixed-size copy: vector moves, not a call to memcpy per row.
                                let row: &[f32; NR] = self.src[from..from + NR].try_into().expect("NR floats");
                                buf[k * NR..(k + 1) * NR].copy_from_slice(row);
                            } else {
                                buf[k * NR..k * NR + valid].copy_from_slice(&self.src[from..from + valid]);
                            }
                        }
                        (&poffs[..kc], &buf[..])
                    }
                    None => (offsets, &self.src[px..]),
                };
                for j in 0..self.nblk {
                    let a = &self.a[(j * depth + kc0) * MR..][..kc * MR];
                    // SAFETY: the caller's contract: every B read lies at b_offsets[k] + lane, lane <
                    // valid, inside `src` (from px on) or inside the panel (kc rows of NR floats).
                    unsafe {
                        tile_dispatch(
                            self.kernel,
                            a,
                            b_offsets,
                            b,
                            &mut c[j * MR * ld + px..],
                            ld,
                            kc0 > 0,
                            valid,
                            j == 0 && !packing,
                        )
                    };
                }
            }
        }
    }
}

/// One micro-tile: `C[r, 0..NR] (+)= Σ_k a[k·MR + r] · src[offset[k] + 0..NR]` for r < MR, C rows `ldc`
/// apart. Lanes ≥ `valid` of B are not read (and their C values are junk).
///
/// # Safety
/// The processor must run `kernel`; `src` must cover `offset[k] + valid` for every k; `c` must cover MR rows
/// of NR floats `ldc` apart; `a` must hold `offsets.len() · MR` floats.
#[allow(clippy::too_many_arguments)]
unsafe fn tile_dispatch(
    kernel: Simd,
    a: &[f32],
    offsets: &[u32],
    src: &[f32],
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    valid: usize,
    prefetch: bool,
) {
    debug_assert!(a.len() >= offsets.len() * MR && c.len() >= (MR - 1) * ldc + NR);
    #[cfg(target_arch = "x86_64")]
    unsafe {
        if kernel == Simd::Avx2 {
            // It prefetches in every call (see `igemm_avx2::tile`).
            super::igemm_avx2::tile(a.as_ptr(), offsets, src.as_ptr(), c.as_mut_ptr(), ldc, accumulate, valid)
        } else if valid == NR && prefetch {
            super::igemm_avx512::tile::<false, true>(
                a.as_ptr(),
                offsets,
                src.as_ptr(),
                c.as_mut_ptr(),
                ldc,
                accumulate,
                valid,
            )
        } else if valid == NR {
            super::igemm_avx512::tile::<false, false>(
                a.as_ptr(),
                offsets,
                src.as_ptr(),
                c.as_mut_ptr(),
                ldc,
                accumulate,
                valid,
            )
        } else {
            super::igemm_avx512::tile::<true, false>(
                a.as_ptr(),
                offsets,
                src.as_ptr(),
                c.as_mut_ptr(),
                ldc,
                accumulate,
                valid,
            )
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("the {kernel:?} kernel is only chosen on x86-64")
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::graph::Act;
    use std::sync::atomic::AtomicUsize;

    /// How often each `Planes` mode ran, so the path tests can check they covered every one.
    pub(in crate::cpu::conv) static MODES_USED: [AtomicUsize; 3] = [const { AtomicUsize::new(0) }; 3];

    pub(in crate::cpu::conv) fn planes_modes_used() -> [usize; 3] {
        MODES_USED.each_ref().map(|m| m.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn conv(cin: usize, k: usize, s: usize) -> Conv {
        Conv::with_values("t", [cin, 8, k, s, 1], Act::None, &mut || 0.0)
    }

    #[test]
    fn offsets_stay_within_32_bits_or_the_portable_path_is_taken() {
        assert!(fits(&conv(512, 3, 1), 640, 640));
        assert!(fits(&conv(3, 7, 2), 4096, 4096));
        assert!(!fits(&conv(300, 3, 1), 4096, 4096));
        assert!(!fits(&conv(3, 3, 2), 40000, 40000));
        // Where it fits, the largest offset plus a full grid indeed stays below 2^32.
        let c = conv(1000, 3, 1);
        let (h, w) = (2000, 2000);
        assert!(fits(&c, h, w));
        let l = Layout::new(&c, h, w);
        let g = geometry(&c, l, l.plane, h);
        assert!((*g.offsets.last().unwrap() as usize) + g.grid < u32::MAX as usize);
    }

    #[test]
    fn packing_puts_mr_output_channels_side_by_side() {
        let (cout, depth) = (11, 3);
        let w: Vec<f32> = (0..cout * depth).map(|i| i as f32).collect();
        let p = pack_weights(&w, cout, depth);
        assert_eq!(p.len(), 2 * depth * MR);
        for co in 0..cout {
            for k in 0..depth {
                assert_eq!(p[((co / MR) * depth + k) * MR + co % MR], w[co * depth + k]);
            }
        }
        assert!(p[depth * MR..].chunks(MR).all(|row| row[cout - MR..].iter().all(|&v| v == 0.0)));
    }
}
