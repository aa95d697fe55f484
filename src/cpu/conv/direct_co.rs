//! Dense convolution (groups 1, any kernel, stride and padding) computed directly and vectorised over
//! output channels, at the AVX-512 and AVX2 levels (`Simd`). A micro-tile of 64 output channels × 6
//! pixels of one output row (48 × 8, 32 × 12 or 16 × 12 when fewer channels are left; at AVX2 16
//! channels, two 8-lane halves, × 6 pixels per block of the tile, in the same order of summation, so
//! the same bits) keeps its 24 sums in registers; each
//! reduction step (input channel, tap ky, kx) loads four weight vectors and broadcasts one input value
//! per pixel straight from the NCHW planes. Nothing is copied or transformed: no phase planes, no
//! im2col, no Winograd tiles, whose overheads dominate on the 40² and 20² maps (where Winograd's 10×10
//! and 5×5 tile grids leave its GEMMs short) and on the 3-channel stems (K = 27 or 147).
//!
//! Layout: the input NCHW, read in place; the weights packed once ([cout/64][cin·k·k][64], zeros past
//! cout, from a 64-byte boundary: `PackedWeights::direct_co`); each task's sums go to a band buffer in
//! the blocked layout ([4][rows·ow][16], in L2), written to the NCHW output (through `Sinks`, so an
//! SSH pair's two tensors) by 16×16 register transposes (8×8 per half at AVX2) with the epilogue
//! (bias, residual, activation, in `common::epilogue`'s order). `conv_blocked` reads and writes the
//! channel-blocked layout (NCHW16c) instead, for `cpu::dense_run`: the same tiles broadcast each
//! channel from its lane of a pixel's vector, and the band's vectors are stored whole with the same
//! epilogue, so both entry points give the same bits.
//!
//! Work: 2·cin·k²·cout flops per output pixel; memory: the input read once per 64 output channels (its
//! rows from the cache), the output written once. Tasks: (image, tile of 64 output channels, band of
//! output rows), at least `min_tasks()`. Input channels go in passes of KC_TAPS taps (the tile's
//! weights for a pass, 36 KiB, stay in L1 while the pass sweeps the band). Columns whose taps reach
//! the left or right padding run as tiles down the column (their taps kx the same for every row), so
//! every tile keeps the full register tile. Each output sums its products in
//! (ci, ky, kx) order in one task: results do not depend on the thread count.

use super::common::{ModeSwitch, PathMode, SharedMut, Sinks, aligned, min_tasks};
use crate::cpu::isa::Simd;
use crate::graph::{Act, Conv};
use crate::reference::out_size;
use rayon::prelude::*;
use std::cell::RefCell;

/// Channels per vector.
const BLOCK: usize = 16;
/// Channels per AVX2 register: half a block.
const HALF: usize = BLOCK / 2;
/// Output channels per tile: four vectors.
const CO_TILE: usize = 4 * BLOCK;
/// Taps (input channel × ky × kx) per reduction pass: a tile's weights for a pass (36 KiB) stay in
/// the 48 KiB L1 while the pass sweeps the band; the sums go through the band buffer once per pass.
/// `conv_shapes -- direct_co` at 64 / 144 / 512 taps: 84–141 / 122–147 / 112–136 GFLOPS (one thread,
/// Ice Lake Xeon).
const KC_TAPS: usize = 144;
/// Input channels per reduction pass of a k×k convolution of `cin` inputs: KC_TAPS taps' worth (one
/// channel at least), or all of them in one pass when they are at most an eighth more than KC_TAPS, as
/// ResNet's 7×7 stem's 147 taps are (144 would split them into passes of two channels and one: the
/// second pass re-reads the band's sums and re-sweeps the input rows for a third of the work).
/// Continuing a sum in registers or from the band buffer adds the same products in the same order:
/// the same bits either way.
fn passes_channels(cin: usize, k: usize) -> usize {
    if cin * k * k <= KC_TAPS + KC_TAPS / 8 { cin.max(1) } else { (KC_TAPS / (k * k)).max(1) }
}

/// Floats of a task's band buffer, at most (128 KiB; at least one output row).
const BAND_FLOATS: usize = 32 << 10;

thread_local! {
    /// A task's band buffer, reused across calls.
    static BAND: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `conv`'s weights as the tiles read them: [cout/64][cin·k·k][64], zeros past cout, from the
/// 64-byte boundary `aligned` chose (recomputed from the allocation on use).
fn pack(conv: &Conv) -> Vec<f32> {
    let depth = conv.cin * conv.kernel * conv.kernel;
    let tiles = conv.cout.div_ceil(CO_TILE);
    let mut w = Vec::new();
    let at = aligned(&mut w, tiles * depth * CO_TILE);
    for co in 0..conv.cout {
        for (kk, &v) in conv.weight[co * depth..][..depth].iter().enumerate() {
            w[at + ((co / CO_TILE) * depth + kk) * CO_TILE + co % CO_TILE] = v;
        }
    }
    w
}

/// Whether this path computes `conv` with `kernel`'s instructions: dense, on a processor that has them.
pub(crate) fn handles(conv: &Conv, kernel: Simd) -> bool {
    conv.groups == 1 && kernel.isa().supported()
}

/// Where the path is taken: `RETINAFACE_CPU_DIRECT_CO` (`0` never, `1` wherever it applies), else
/// by the measured rule, unless `set_mode` forced a mode.
static MODE: ModeSwitch = ModeSwitch::new("RETINAFACE_CPU_DIRECT_CO");

/// Forces a mode for the whole process (`None`: back to the environment's), so a test or a benchmark
/// can time this path against the others on one machine in one process.
pub fn set_mode(mode: Option<PathMode>) {
    MODE.set(mode)
}

/// The mode in force.
pub(super) fn mode() -> PathMode {
    MODE.get()
}

/// Whether the measured rule takes this path for `conv` on a `h`×`w` input (`PathMode::Auto`):
/// `conv_shapes -- direct_co` (Ice Lake Xeon, against the path chosen without it, median of paired
/// rounds at one / two threads) had it ahead on stride 2 with 32 output channels or more (stems
/// 1.15x / 1.55x, ResNet's downsampling 3×3 1.2–1.4x), and on 3×3 stride 1 on maps of 20² (SSH's
/// last pair 1.1–1.9x) and of 40² up to 128 input channels (the merges and SSH pairs 0.9–1.3x), where
/// Winograd's tile grid is short; behind Winograd on larger maps (0.7–0.8x), on the 8- and
/// 16-channel stems (0.7–0.85x) and on ResNet-50's 1×1 stride-2 downsampling (0.54–0.74x: one tap per
/// input channel, so each broadcast line serves one step instead of k²).
///
/// At AVX2 (the same benchmark under tools/cpuid/hide_avx512.so, one / two threads): ahead on the
/// stride-2 convolutions from 16 output channels (the 16- and 32-channel stems 1.37x / 1.26x and
/// 1.35x / 1.14x, ResNet-50's 3×3 s2 1.06–1.40x / 1.07–1.09x, ResNet's 1.01–1.06x / 1.04–1.11x except
/// 256->512 on 40², 0.89x / 0.94x, the 7×7 stem even), behind on the 8-channel stem (0.97x / 0.74x) and
/// on 3×3 stride 1, where Winograd and the AVX2 implicit GEMM win (0.56–0.59x on 20² maps at one thread).
pub(super) fn preferred(conv: &Conv, h: usize, w: usize, kernel: Simd) -> bool {
    if kernel == Simd::Avx2 {
        return conv.stride > 1 && conv.kernel > 1 && conv.cout >= 16;
    }
    let (oh, ow) = (out_size(h, conv.kernel, conv.stride, conv.pad), out_size(w, conv.kernel, conv.stride, conv.pad));
    let px = oh * ow;
    match conv.stride {
        1 => conv.kernel == 3 && (px <= 400 || (px <= 1600 && conv.cin <= 128)),
        _ => conv.kernel > 1 && conv.cout >= 32,
    }
}

/// `conv` of `x` [n, cin, h, w] into `sinks`, `residual` [n, cout, oh, ow] added before the
/// activation, with `kernel`'s instructions. Panics unless `handles(conv, kernel)` (the caller checks).
#[allow(clippy::too_many_arguments)] // the definition's operands and sizes, as every conv path takes them
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
    let (oh, ow) = (out_size(h, conv.kernel, conv.stride, conv.pad), out_size(w, conv.kernel, conv.stride, conv.pad));
    assert_eq!(x.len(), n * conv.cin * h * w, "direct_co: conv {} input size", conv.name);
    if let Some(r) = residual {
        assert_eq!(r.len(), n * conv.cout * oh * ow, "direct_co: conv {} residual size", conv.name);
    }
    run(kernel, conv, x, false, n, (h, w), Output::Planes(sinks), residual);
}

/// Floats of an n-image tensor of `c` channels of `npix` pixels in the channel-blocked layout
/// (NCHW16c: [n][c/16][npix][16], channels past c zero).
pub fn blocked_len(n: usize, c: usize, npix: usize) -> usize {
    n * c.div_ceil(BLOCK) * BLOCK * npix
}

/// `conv` as `conv` computes it, from and to the channel-blocked layout (NCHW16c, `blocked_len`) for
/// `cpu::dense_run`: `x` [n, cin, h, w] blocked (`input_blocked`) or NCHW (a stem reading the image),
/// `out` and `residual` blocked [n, cout, oh, ow], the lanes past cout written as zeros. No transposes:
/// a pixel's 16 channels are one vector in both layouts, so the tiles broadcast the input in place and
/// the epilogue stores whole vectors.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv_blocked(
    kernel: Simd,
    conv: &Conv,
    x: &[f32],
    input_blocked: bool,
    n: usize,
    (h, w): (usize, usize),
    out: &mut [f32],
    residual: Option<&[f32]>,
) {
    let (oh, ow) = (out_size(h, conv.kernel, conv.stride, conv.pad), out_size(w, conv.kernel, conv.stride, conv.pad));
    let x_len = if input_blocked { blocked_len(n, conv.cin, h * w) } else { n * conv.cin * h * w };
    assert_eq!(x.len(), x_len, "direct_co: conv {} input size", conv.name);
    assert_eq!(out.len(), blocked_len(n, conv.cout, oh * ow), "direct_co: conv {} output size", conv.name);
    if let Some(r) = residual {
        assert_eq!(r.len(), out.len(), "direct_co: conv {} residual size", conv.name);
    }
    run(kernel, conv, x, input_blocked, n, (h, w), Output::Blocked(SharedMut(out.as_mut_ptr())), residual);
}

/// Output rows `rows` of one image of `conv` (NCHW input `image`, h×w) in the blocked layout on the
/// calling thread, row `rows.start` from pixel `first` of `out`'s blocks, `plane` pixels apart: a
/// network's stem computing the rows a fused op's ring needs (`cpu::bands`). The same tiles, sums and
/// epilogue as `conv_blocked`, so the same bits.
///
/// # Safety
/// The processor must have `kernel`'s instructions; `out` must hold cout/16 blocks of `plane` pixels,
/// pixels `first..first + rows.len()·ow` of each this thread's alone.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn rows_blocked(
    kernel: Simd,
    conv: &Conv,
    image: &[f32],
    (h, w): (usize, usize),
    rows: std::ops::Range<usize>,
    out: *mut f32,
    plane: usize,
    first: usize,
) {
    assert!(handles(conv, kernel), "direct_co: conv {} is not dense, or no {kernel:?}", conv.name);
    let (k, s, p) = (conv.kernel, conv.stride, conv.pad);
    let (oh, ow) = (out_size(h, k, s, p), out_size(w, k, s, p));
    assert!(image.len() == conv.cin * h * w && rows.end <= oh, "direct_co: conv {} rows", conv.name);
    assert!(first + rows.len() * ow <= plane, "direct_co: conv {} output plane", conv.name);
    let packed = conv.packed.direct_co.get_or_init(|| pack(conv));
    let geometry = Geometry { cin: conv.cin, h, w, k, s, p, oh, ow, pix: 1 };
    let chunk = (BAND_FLOATS / (CO_TILE * ow)).max(1);
    for t in 0..conv.cout.div_ceil(CO_TILE) {
        for y0 in rows.clone().step_by(chunk) {
            let y1 = (y0 + chunk).min(rows.end);
            let pixels = (first + (y0 - rows.start) * ow, (y1 - y0) * ow);
            // SAFETY: `handles` asserted the instructions; `image` is the image's planes; the caller's
            // contract covers these pixels of `out`.
            unsafe {
                geometry.tile_rows(kernel, conv, packed, image, t, y0..y1, |nb, band| {
                    write_back_blocked(kernel, conv, SharedMut(out), None, (0, t * CO_TILE, nb), pixels, plane, band)
                })
            };
        }
    }
}

/// Where a task's sums go: the NCHW planes of one or two tensors, or one blocked tensor.
enum Output {
    Planes(Sinks),
    Blocked(SharedMut),
}

/// The tasks of `conv`: sums into each task's band, then its write-back to `out`.
#[allow(clippy::too_many_arguments)]
fn run(
    kernel: Simd,
    conv: &Conv,
    x: &[f32],
    input_blocked: bool,
    n: usize,
    (h, w): (usize, usize),
    out: Output,
    residual: Option<&[f32]>,
) {
    assert!(handles(conv, kernel), "direct_co: conv {} is not dense, or no {kernel:?}", conv.name);
    let (k, s, p) = (conv.kernel, conv.stride, conv.pad);
    let (oh, ow) = (out_size(h, k, s, p), out_size(w, k, s, p));
    // Floats per input pixel of a channel, and per image.
    let (pix, image_len) = if input_blocked { (BLOCK, blocked_len(1, conv.cin, h * w)) } else { (1, conv.cin * h * w) };
    let packed = conv.packed.direct_co.get_or_init(|| pack(conv));
    let tiles = conv.cout.div_ceil(CO_TILE);
    // Bands of output rows: within the buffer budget, and enough tasks for every thread.
    let rows = (BAND_FLOATS / (CO_TILE * ow)).clamp(1, oh);
    let rows = rows.min(oh.div_ceil(min_tasks().div_ceil(n * tiles).clamp(1, oh)));
    let bands = oh.div_ceil(rows);
    let geometry = Geometry { cin: conv.cin, h, w, k, s, p, oh, ow, pix };
    (0..n * tiles * bands).into_par_iter().for_each(|task| {
        let (b, t, r) = (task / (tiles * bands), task / bands % tiles, task % bands);
        let (y0, y1) = (r * rows, ((r + 1) * rows).min(oh));
        let image = &x[b * image_len..][..image_len];
        // SAFETY: the kernel's instructions were asserted (`handles`); `image` is the image's planes;
        // the tile's channels of rows y0..y1 of image b are this task's alone.
        unsafe {
            geometry.tile_rows(kernel, conv, packed, image, t, y0..y1, |nb, band| {
                let (tile, pixels) = ((b, t * CO_TILE, nb), (y0 * ow, (y1 - y0) * ow));
                match (&out, kernel) {
                    (Output::Planes(sinks), Simd::Avx512) => {
                        write_back(conv, sinks, residual, tile, pixels, oh * ow, band)
                    }
                    (Output::Planes(sinks), Simd::Avx2) => {
                        write_back_avx2(conv, sinks, residual, tile, pixels, oh * ow, band)
                    }
                    (Output::Blocked(o), _) => {
                        write_back_blocked(kernel, conv, *o, residual, tile, pixels, oh * ow, band)
                    }
                }
            })
        };
    });
}

/// Whether `conv_max_pool` computes `conv` with the 3×3 stride-2 max-pool of its output (padding 1,
/// counted as −∞) fused: pooling the sums before the epilogue gives the same values
/// (`Conv::epilogue_commutes_with_max`), and the pooled tensor is the conv's channels from 0.
pub(crate) fn pools(conv: &Conv) -> bool {
    conv.epilogue_commutes_with_max() && conv.groups == 1 && conv.out_channel_offset == 0
}

/// Where the fused conv + max-pool is taken: `RETINAFACE_CPU_CONV_POOL` (`0` never, `1` wherever
/// `pools` allows, the conv then on this path whatever the rule prefers), else where the rule puts the
/// conv on this path (`preferred`), unless `set_pool_mode` forced a mode.
static POOL_MODE: ModeSwitch = ModeSwitch::new("RETINAFACE_CPU_CONV_POOL");

/// Forces the fused conv + max-pool's mode for the whole process (`None`: back to the environment's).
pub fn set_pool_mode(mode: Option<PathMode>) {
    POOL_MODE.set(mode)
}

/// The fused conv + max-pool's mode in force.
pub(super) fn pool_mode() -> PathMode {
    POOL_MODE.get()
}

/// Floats of conv rows a pooling task computes per call of the tiles (640 KiB, in L2): ResNet's stem
/// at 640² (64 channels × 320 columns a row) ran 12.9 / 11.9 / 11.5 / 12.0 ms with 2 / 4 / 8 / 16 rows
/// a call (`RETINAFACE_PROFILE=1`, one thread, Sapphire Rapids-class Xeon, 2 MiB L2): more rows make
/// longer runs down the edge columns and fewer calls, until the band outgrows L2.
const POOL_BAND_FLOATS: usize = 160 << 10;

/// Fused conv + max-pool ops run by this process so far, for tests that must know the path was taken.
static POOLED_RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many fused conv + max-pool ops this process has run.
#[cfg(test)]
pub(crate) fn pools_taken() -> usize {
    POOLED_RUNS.load(std::sync::atomic::Ordering::Relaxed)
}

thread_local! {
    /// A pooling task's buffers (the carried row's maxima and the pooled rows), reused across calls.
    static POOLED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `conv`, then the 3×3 stride-2 max-pool (padding 1) of its output, as one op: `x` NCHW [n, cin, h,
/// w], `out` the pooled [n, cout, ph, pw] in NCHW. The conv's output never leaves the cache: ResNet's
/// stem wrote 26 MB at 640² (a quarter of the stem's time went to its transposed write-back) that the
/// max-pool read back. Values: the pooled maxima of the conv's sums, then its epilogue (`pools`), which
/// equals the pool of the conv's output; the sums are `conv`'s, so the same bits as the two ops.
pub(crate) fn conv_max_pool(kernel: Simd, conv: &Conv, x: &[f32], n: usize, h: usize, w: usize, out: &mut [f32]) {
    let (oh, ow) = (out_size(h, conv.kernel, conv.stride, conv.pad), out_size(w, conv.kernel, conv.stride, conv.pad));
    assert_eq!(x.len(), n * conv.cin * h * w, "direct_co: conv {} input size", conv.name);
    let pooled = n * conv.cout * out_size(oh, 3, 2, 1) * out_size(ow, 3, 2, 1);
    assert_eq!(out.len(), pooled, "direct_co: conv {} + max-pool output size", conv.name);
    let sinks = Sinks::one(SharedMut(out.as_mut_ptr()), conv.cout, conv);
    run_pooled(kernel, conv, x, false, n, (h, w), Output::Planes(sinks));
}

/// `conv_max_pool` from and to the channel-blocked layout, as `conv_blocked` (`x` blocked or NCHW, `out`
/// the pooled [n, cout, ph, pw] blocked): ResNet-50's stem and max-pool in `cpu::dense_run`.
pub(crate) fn conv_max_pool_blocked(
    kernel: Simd,
    conv: &Conv,
    x: &[f32],
    input_blocked: bool,
    n: usize,
    (h, w): (usize, usize),
    out: &mut [f32],
) {
    let (oh, ow) = (out_size(h, conv.kernel, conv.stride, conv.pad), out_size(w, conv.kernel, conv.stride, conv.pad));
    let x_len = if input_blocked { blocked_len(n, conv.cin, h * w) } else { n * conv.cin * h * w };
    assert_eq!(x.len(), x_len, "direct_co: conv {} input size", conv.name);
    let pooled = blocked_len(n, conv.cout, out_size(oh, 3, 2, 1) * out_size(ow, 3, 2, 1));
    assert_eq!(out.len(), pooled, "direct_co: conv {} + max-pool output size", conv.name);
    run_pooled(kernel, conv, x, input_blocked, n, (h, w), Output::Blocked(SharedMut(out.as_mut_ptr())));
}

/// The tasks of a fused conv + max-pool: bands of pooled rows, each computing the conv rows its windows
/// cover `step` pairs at a time (the sums of `run`'s tiles) and pooling them as they come: each conv
/// row's horizontal maxima (columns 2x − 1, 2x, 2x + 1) and, down the rows, for pooled row q the maximum
/// of row 2q − 1's (carried from the pair before), row 2q's and row 2q + 1's (carried on). A band's
/// first window also needs the conv row above it, which the band before computes too: one row in
/// 2·(band rows) computed twice.
fn run_pooled(
    kernel: Simd,
    conv: &Conv,
    x: &[f32],
    input_blocked: bool,
    n: usize,
    (h, w): (usize, usize),
    out: Output,
) {
    assert!(handles(conv, kernel) && pools(conv), "direct_co: conv {} does not fuse a max-pool", conv.name);
    let (k, s, p) = (conv.kernel, conv.stride, conv.pad);
    let (oh, ow) = (out_size(h, k, s, p), out_size(w, k, s, p));
    let (ph, pw) = (out_size(oh, 3, 2, 1), out_size(ow, 3, 2, 1));
    let (pix, image_len) = if input_blocked { (BLOCK, blocked_len(1, conv.cin, h * w)) } else { (1, conv.cin * h * w) };
    let packed = conv.packed.direct_co.get_or_init(|| pack(conv));
    let tiles = conv.cout.div_ceil(CO_TILE);
    let rows = ph.div_ceil(min_tasks().div_ceil(n * tiles).clamp(1, ph));
    let bands = ph.div_ceil(rows);
    // Pooled rows per call of the tiles: their conv rows within the pooling band's budget.
    let step = (POOL_BAND_FLOATS / (2 * CO_TILE * ow)).clamp(1, rows);
    let geometry = Geometry { cin: conv.cin, h, w, k, s, p, oh, ow, pix };
    let row_len = pw * BLOCK;
    POOLED_RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    (0..n * tiles * bands).into_par_iter().for_each(|task| {
        let (b, t, r) = (task / (tiles * bands), task / bands % tiles, task % bands);
        let (q0, q1) = (r * rows, ((r + 1) * rows).min(ph));
        let image = &x[b * image_len..][..image_len];
        POOLED.with(|buf| {
            let mut buf = buf.borrow_mut();
            let at = aligned(&mut buf, 4 * row_len * (1 + step));
            // carry: [4][pw][16], the horizontal maxima of the conv row above the next window;
            // pooled: [4][pooled rows · pw][16], as the write-backs read a band.
            let (carry, pooled) = buf[at..][..4 * row_len * (1 + step)].split_at_mut(4 * row_len);
            // SAFETY (both calls): the kernel's instructions were asserted (`handles`); `image` is the
            // image's planes; the tile's channels of pooled rows q0..q1 of image b are this task's alone.
            if q0 > 0 {
                unsafe {
                    geometry.tile_rows(kernel, conv, packed, image, t, 2 * q0 - 1..2 * q0, |nb, band| {
                        for j in 0..nb {
                            hmax_row(
                                kernel,
                                &band[j * ow * BLOCK..][..ow * BLOCK],
                                &mut carry[j * row_len..][..row_len],
                                false,
                            );
                        }
                    })
                };
            }
            let mut carried = q0 > 0;
            for q in (q0..q1).step_by(step) {
                let qn = step.min(q1 - q);
                let conv_rows = 2 * q..(2 * (q + qn)).min(oh);
                let plane_in = conv_rows.len() * ow * BLOCK;
                let plane_out = qn * row_len;
                unsafe {
                    geometry.tile_rows(kernel, conv, packed, image, t, conv_rows, |nb, band| {
                        for j in 0..nb {
                            let carry = &mut carry[j * row_len..][..row_len];
                            let row = |y: usize| &band[j * plane_in + y * ow * BLOCK..][..ow * BLOCK];
                            let mut have = carried;
                            for i in 0..qn {
                                let dst = &mut pooled[j * plane_out + i * row_len..][..row_len];
                                if have {
                                    dst.copy_from_slice(carry);
                                }
                                hmax_row(kernel, row(2 * i), dst, have);
                                // The window's last row, the next window's first: absent only below an
                                // odd map's last window.
                                if 2 * (q + i) + 1 < oh {
                                    hmax_row(kernel, row(2 * i + 1), carry, false);
                                    max_into(dst, carry);
                                    have = true;
                                }
                            }
                        }
                        let (tile, pixels) = ((b, t * CO_TILE, nb), (q * pw, qn * pw));
                        let pooled = &pooled[..nb * plane_out];
                        match (&out, kernel) {
                            (Output::Planes(sinks), Simd::Avx512) => {
                                write_back(conv, sinks, None, tile, pixels, ph * pw, pooled)
                            }
                            (Output::Planes(sinks), Simd::Avx2) => {
                                write_back_avx2(conv, sinks, None, tile, pixels, ph * pw, pooled)
                            }
                            (Output::Blocked(o), _) => {
                                write_back_blocked(kernel, conv, *o, None, tile, pixels, ph * pw, pooled)
                            }
                        }
                    })
                };
                carried = true;
            }
        });
    });
}

/// `dst[x] = max(src[2x − 1], src[2x], src[2x + 1])` over a row of 16-channel vectors (`src` a conv
/// row, `dst` its pooled width; columns outside the row left out), or `dst[x] = max(dst[x], …)` with
/// `acc`. The maximum is the instruction's (`maxps`), which for finite sums is the reference's.
fn hmax_row(kernel: Simd, src: &[f32], dst: &mut [f32], acc: bool) {
    let (width, pw) = (src.len() / BLOCK, dst.len() / BLOCK);
    assert!(src.len() == width * BLOCK && dst.len() == pw * BLOCK && pw <= width.div_ceil(2) && width > 0);
    kernel.check();
    // SAFETY: `check` asserted the instructions; every window's columns lie inside `src` (column
    // 2x − 1 ≥ 0 and 2x < width as x < pw ≤ ⌈width / 2⌉), every x inside `dst`.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        match kernel {
            Simd::Avx512 => hmax_row_avx512(src, dst, acc),
            Simd::Avx2 => hmax_row_avx2(src, dst, acc),
        }
    }
}

/// `hmax_row` at AVX-512.
///
/// # Safety
/// AVX-512F must be available; as `hmax_row`'s assertions.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn hmax_row_avx512(src: &[f32], dst: &mut [f32], acc: bool) {
    use std::arch::x86_64::*;
    let width = src.len() / BLOCK;
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    // SAFETY: the caller's contract.
    unsafe {
        for x in 0..dst.len() / BLOCK {
            let cols = (2 * x).saturating_sub(1)..(2 * x + 2).min(width);
            let mut m = _mm512_loadu_ps(s.add(cols.start * BLOCK));
            for c in cols.start + 1..cols.end {
                m = _mm512_max_ps(m, _mm512_loadu_ps(s.add(c * BLOCK)));
            }
            if acc {
                m = _mm512_max_ps(_mm512_loadu_ps(d.add(x * BLOCK)), m);
            }
            _mm512_storeu_ps(d.add(x * BLOCK), m);
        }
    }
}

/// `hmax_row` at AVX2: two halves a vector.
///
/// # Safety
/// AVX2 must be available; as `hmax_row`'s assertions.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn hmax_row_avx2(src: &[f32], dst: &mut [f32], acc: bool) {
    use std::arch::x86_64::*;
    let width = src.len() / BLOCK;
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    // SAFETY: the caller's contract.
    unsafe {
        for x in 0..dst.len() / BLOCK {
            let cols = (2 * x).saturating_sub(1)..(2 * x + 2).min(width);
            for half in [0, HALF] {
                let mut m = _mm256_loadu_ps(s.add(cols.start * BLOCK + half));
                for c in cols.start + 1..cols.end {
                    m = _mm256_max_ps(m, _mm256_loadu_ps(s.add(c * BLOCK + half)));
                }
                if acc {
                    m = _mm256_max_ps(_mm256_loadu_ps(d.add(x * BLOCK + half)), m);
                }
                _mm256_storeu_ps(d.add(x * BLOCK + half), m);
            }
        }
    }
}

/// `dst = max(dst, src)` elementwise (`src` a row of `hmax_row`'s).
fn max_into(dst: &mut [f32], src: &[f32]) {
    dst.iter_mut().zip(src).for_each(|(d, &v)| *d = if v > *d { v } else { *d });
}

/// The convolution's shape, as the tiles read it.
struct Geometry {
    cin: usize,
    h: usize,
    w: usize,
    k: usize,
    s: usize,
    p: usize,
    oh: usize,
    ow: usize,
    /// Floats per input pixel of one channel: 1 in NCHW, 16 in the blocked layout (whose channel c
    /// lies at (c / 16)·16·h·w + c % 16 of a pixel's offset).
    pix: usize,
}

impl Geometry {
    /// The sums of `conv`'s tile t (output channels 64t.., its `nb` blocks) for output rows `rows` of
    /// `image` into the thread's band buffer ([4][rows·ow][16]), then `write(nb, band)`: the one task
    /// body of `run` and `rows_blocked`.
    ///
    /// # Safety
    /// The processor must have `kernel`'s instructions; `image` must hold the image (cin planes of h·w,
    /// or their blocks); `packed` is `conv`'s `pack`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_rows(
        &self,
        kernel: Simd,
        conv: &Conv,
        packed: &[f32],
        image: &[f32],
        t: usize,
        rows: std::ops::Range<usize>,
        write: impl FnOnce(usize, &[f32]),
    ) {
        let depth = self.cin * self.k * self.k;
        let w_at = packed.as_ptr().align_offset(64).min(15);
        let weights = &packed[w_at + t * depth * CO_TILE..][..depth * CO_TILE];
        let nb = (conv.cout.div_ceil(BLOCK) - t * 4).min(4);
        let len = CO_TILE * rows.len() * self.ow;
        BAND.with(|buf| {
            let mut buf = buf.borrow_mut();
            let at = aligned(&mut buf, len);
            let band = &mut buf[at..][..len];
            // SAFETY: the caller's contract; `band` holds 4 blocks of the rows' pixels, `weights` the
            // tile's.
            unsafe { self.sums(kernel, image, weights, nb, rows, band) };
            write(nb, band);
        });
    }

    /// The taps (ky or kx) of a kernel row or column that stay inside an input of `len` for the output
    /// at `o`: those with 0 ≤ o·s + t − p < len.
    fn taps(&self, o: usize, len: usize) -> std::ops::Range<usize> {
        let t0 = self.p.saturating_sub(o * self.s).min(self.k);
        t0..(len + self.p).saturating_sub(o * self.s).min(self.k).max(t0)
    }

    /// The sums (no bias) of one tile of `nb` output blocks for output rows `rows` into `band`
    /// ([4][rows·ow][16]), every input channel in passes of KC_TAPS taps.
    ///
    /// Each pass runs the interior columns (every kx inside the row) as tiles along each output row, and
    /// the edge columns (whose taps reach the left or right padding) as tiles down each column, over runs
    /// of rows with the same taps ky, so every tile has one tap range for all its pixels and keeps the
    /// full register tile: a pixel at a time, the 20² maps' two edge columns took a third of the time.
    ///
    /// # Safety
    /// The processor must have `kernel`'s instructions; `image` must hold the image (cin planes of h·w,
    /// or their blocks), `weights` cin·k²·64 floats, `band` 4 · rows·ow · 16.
    #[cfg(target_arch = "x86_64")]
    unsafe fn sums(
        &self,
        kernel: Simd,
        image: &[f32],
        weights: &[f32],
        nb: usize,
        rows: std::ops::Range<usize>,
        band: &mut [f32],
    ) {
        let (k, s, p, w, ow, pix) = (self.k, self.s, self.p, self.w, self.ow, self.pix);
        let plane_out = rows.len() * ow * BLOCK;
        let image_len = if pix == 1 { self.cin * self.h * w } else { self.cin.div_ceil(BLOCK) * BLOCK * self.h * w };
        assert!(image.len() == image_len && weights.len() == self.cin * k * k * CO_TILE);
        assert!(band.len() >= 4 * plane_out && rows.end <= self.oh);
        // Output columns whose taps all lie inside the row: ox·s ≥ p and ox·s − p + k − 1 ≤ w − 1.
        let lo = p.div_ceil(s).min(ow);
        let hi = if w + p >= k { ((w + p - k) / s + 1).min(ow) } else { 0 }.max(lo);
        let kc = passes_channels(self.cin, k);
        let px_max = match kernel {
            Simd::Avx512 => PX_OF[nb],
            Simd::Avx2 => PX_AVX2,
        };
        let band = band.as_mut_ptr();
        for c0 in (0..self.cin).step_by(kc) {
            let nc = kc.min(self.cin - c0);
            // The tile of `px` pixels from output (oy, ox), the next pixel `next` = (rows, columns) on,
            // with taps ky × kx. Pointers may start in the padding: only taps inside are read.
            let step = |oy: usize, ox: usize, ky: std::ops::Range<usize>, kx: std::ops::Range<usize>, next| {
                let (dy, dx) = next;
                let iy = (oy * s + ky.start).saturating_sub(p);
                let ix = (ox * s) as isize - p as isize;
                // Channel c's plane within its block and the blocks: the same formula for both layouts.
                let plane = if pix == 1 { self.h * w } else { 1 };
                Step {
                    x: image.as_ptr().wrapping_add(iy * w * pix).wrapping_offset(ix * pix as isize),
                    w: weights[(c0 * k * k + ky.start * k) * CO_TILE..].as_ptr(),
                    c0,
                    nc,
                    nky: ky.len(),
                    k,
                    kx,
                    plane,
                    block: BLOCK * self.h * w,
                    row: w * pix,
                    col: pix,
                    dx: (dy * s * w + dx * s) * pix,
                    out: band.wrapping_add(((oy - rows.start) * ow + ox) * BLOCK),
                    dout: (dy * ow + dx) * BLOCK,
                    out_stride: plane_out,
                    accumulate: c0 > 0,
                }
            };
            let run_tiles = |st: &Step, px: usize| {
                // SAFETY: the caller's contract; `step` gives each tile only taps inside the image.
                unsafe {
                    match kernel {
                        Simd::Avx512 => tile_dispatch(nb, px, st),
                        Simd::Avx2 => (0..nb).for_each(|j| tile_avx2_dispatch(px, st, j)),
                    }
                }
            };
            for oy in rows.clone() {
                let mut ox = lo;
                while ox < hi {
                    let px = px_max.min(hi - ox);
                    run_tiles(&step(oy, ox, self.taps(oy, self.h), 0..k, (0, 1)), px);
                    ox += px;
                }
            }
            for ox in (0..lo).chain(hi..ow) {
                let mut oy = rows.start;
                while oy < rows.end {
                    // The run of rows with oy's taps ky, in tiles of px_max rows at most.
                    let ky = self.taps(oy, self.h);
                    let mut px = 1;
                    while px < px_max && oy + px < rows.end && self.taps(oy + px, self.h) == ky {
                        px += 1;
                    }
                    run_tiles(&step(oy, ox, ky, self.taps(ox, w), (1, 0)), px);
                    oy += px;
                }
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn sums(&self, _: Simd, _: &[f32], _: &[f32], nb: usize, _: std::ops::Range<usize>, _: &mut [f32]) {
        unreachable!("the AVX-512 level exists only on x86_64 ({nb} blocks)")
    }
}

/// Pixels per tile for 1–4 output blocks: 24 accumulators at most (12 for one block, whose tile is
/// bound by its broadcasts).
const PX_OF: [usize; 5] = [0, 12, 12, 8, 6];

/// Pixels per AVX2 tile (one block of 16 output channels, two 8-lane halves): 12 accumulators beside
/// two weight halves and a broadcast in the 16 ymm registers.
const PX_AVX2: usize = 6;

/// One tile's operands: input channels c0..c0 + nc (channel c at (c / 16)·block + (c % 16)·plane) ×
/// `nky` rows (`row` apart) × the columns `kx` (`col` apart) from `x` (the first pixel's tap (ky,
/// kx = 0) of channel 0, which may lie in the padding; pixel i's `dx`·i on), the weights from `w`
/// (channel c0 + c, row ky, column kx at ((c·k + ky)·k + kx)·64), the sums to `out` (pixel i's `dout`·i
/// on, block j at j·out_stride).
struct Step {
    x: *const f32,
    w: *const f32,
    c0: usize,
    nc: usize,
    nky: usize,
    k: usize,
    kx: std::ops::Range<usize>,
    plane: usize,
    block: usize,
    row: usize,
    col: usize,
    dx: usize,
    out: *mut f32,
    dout: usize,
    out_stride: usize,
    accumulate: bool,
}

/// `tile::<nb, px>` (px ≤ PX_OF[nb]), each a separate instantiation so the sums stay in registers.
///
/// # Safety
/// As `tile`.
#[cfg(target_arch = "x86_64")]
unsafe fn tile_dispatch(nb: usize, px: usize, s: &Step) {
    macro_rules! by_px {
        ($nb:literal, $($p:literal)*) => {
            match px {
                $($p => tile::<$nb, $p>(s),)*
                _ => unreachable!("{px} pixels for {} blocks", $nb),
            }
        };
    }
    // SAFETY: the caller's contract.
    unsafe {
        match nb {
            4 => by_px!(4, 1 2 3 4 5 6),
            3 => by_px!(3, 1 2 3 4 5 6 7 8),
            2 => by_px!(2, 1 2 3 4 5 6 7 8 9 10 11 12),
            _ => by_px!(1, 1 2 3 4 5 6 7 8 9 10 11 12),
        }
    }
}

/// `out[j][i] = [out +] Σ w · x` for output block j < NB and pixel i < PX over the step's taps.
///
/// # Safety
/// AVX-512F must be available; the step's taps of the PX pixels must lie inside `x`'s planes, `w` must
/// hold the step's weights, `out` NB blocks of the PX pixels.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile<const NB: usize, const PX: usize>(st: &Step) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract covers every pointer read or written below.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); NB]; PX];
        if st.accumulate {
            for (i, a) in acc.iter_mut().enumerate() {
                for (j, v) in a.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(st.out.add(j * st.out_stride + i * st.dout));
                }
            }
        }
        let kk = st.k * st.k;
        for c in 0..st.nc {
            for ky in 0..st.nky {
                let ch = st.c0 + c;
                let xr = st.x.wrapping_add((ch / BLOCK) * st.block + (ch % BLOCK) * st.plane + ky * st.row);
                let wr = st.w.add((c * kk + ky * st.k) * CO_TILE);
                for kx in st.kx.clone() {
                    let mut wv = [_mm512_setzero_ps(); NB];
                    for (j, v) in wv.iter_mut().enumerate() {
                        *v = _mm512_loadu_ps(wr.add(kx * CO_TILE + j * BLOCK));
                    }
                    for (i, a) in acc.iter_mut().enumerate() {
                        let xv = _mm512_set1_ps(*xr.wrapping_add(i * st.dx + kx * st.col));
                        for (v, w) in a.iter_mut().zip(&wv) {
                            *v = _mm512_fmadd_ps(*w, xv, *v);
                        }
                    }
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            for (j, v) in a.iter().enumerate() {
                _mm512_storeu_ps(st.out.add(j * st.out_stride + i * st.dout), *v);
            }
        }
    }
}

/// `tile_avx2::<px>`.
///
/// # Safety
/// As `tile_avx2`.
#[cfg(target_arch = "x86_64")]
unsafe fn tile_avx2_dispatch(px: usize, s: &Step, j: usize) {
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
}

/// `tile::<1, PX>` for the step's output block j (channels 16j..16j + 16 of the tile) at AVX2, in
/// `tile`'s order of summation (so the same bits).
///
/// # Safety
/// AVX2 and FMA must be available; as `tile` for block j.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const PX: usize>(st: &Step, j: usize) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract covers every pointer read or written below.
    unsafe {
        let out = st.out.add(j * st.out_stride);
        let mut acc = [[_mm256_setzero_ps(); 2]; PX];
        if st.accumulate {
            for (i, halves) in acc.iter_mut().enumerate() {
                for (h, a) in halves.iter_mut().enumerate() {
                    *a = _mm256_loadu_ps(out.add(i * st.dout + h * HALF));
                }
            }
        }
        let kk = st.k * st.k;
        for c in 0..st.nc {
            for ky in 0..st.nky {
                let ch = st.c0 + c;
                let xr = st.x.wrapping_add((ch / BLOCK) * st.block + (ch % BLOCK) * st.plane + ky * st.row);
                let wr = st.w.add((c * kk + ky * st.k) * CO_TILE + j * BLOCK);
                for kx in st.kx.clone() {
                    let w0 = _mm256_loadu_ps(wr.add(kx * CO_TILE));
                    let w1 = _mm256_loadu_ps(wr.add(kx * CO_TILE + HALF));
                    for (i, [a0, a1]) in acc.iter_mut().enumerate() {
                        let xv = _mm256_broadcast_ss(&*xr.wrapping_add(i * st.dx + kx * st.col));
                        *a0 = _mm256_fmadd_ps(w0, xv, *a0);
                        *a1 = _mm256_fmadd_ps(w1, xv, *a1);
                    }
                }
            }
        }
        for (i, halves) in acc.iter().enumerate() {
            for (h, a) in halves.iter().enumerate() {
                _mm256_storeu_ps(out.add(i * st.dout + h * HALF), *a);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_avx2_dispatch(px: usize, _: &Step, j: usize) {
    unreachable!("the AVX2 level exists only on x86_64 ({px} pixels, block {j})")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_dispatch(nb: usize, px: usize, _: &Step) {
    unreachable!("the AVX-512 level exists only on x86_64 ({nb} x {px})")
}

/// Writes the band's sums of output channels co0.. (`nb` blocks, `npix` vectors each in `band`) of
/// image b, pixels first.. of its `plane`-pixel maps, to the blocked tensor `out`: `act(sum + bias
/// [+ residual])` per vector, in `write_back`'s order (so the same bits); lanes past cout get zero
/// bias, and their sums are zero (the packed weights are), so they stay zero.
///
/// # Safety
/// `kernel`'s instructions must be available; `out` and the residual must hold image b's blocks, these
/// pixels of these blocks this task's alone.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn write_back_blocked(
    kernel: Simd,
    conv: &Conv,
    out: SharedMut,
    residual: Option<&[f32]>,
    (b, co0, nb): (usize, usize, usize),
    (first, npix): (usize, usize),
    plane: usize,
    band: &[f32],
) {
    let blocks = conv.cout.div_ceil(BLOCK);
    let plane_out = npix * BLOCK;
    assert!(band.len() >= nb * plane_out && first + npix <= plane && co0.is_multiple_of(BLOCK));
    for j in 0..nb {
        let cb = co0 / BLOCK + j;
        let bias: [f32; BLOCK] = std::array::from_fn(|l| conv.bias.get(cb * BLOCK + l).copied().unwrap_or(0.0));
        let at = ((b * blocks + cb) * plane + first) * BLOCK;
        let sums = &band[j * plane_out..][..plane_out];
        let res = residual.map(|r| &r[at..at + plane_out]);
        // SAFETY: the caller's contract; `at..at + plane_out` is this task's part of `out`.
        unsafe {
            let dst = std::slice::from_raw_parts_mut(out.get().add(at), plane_out);
            match kernel {
                Simd::Avx512 => epilogue_blocked_avx512(sums, &bias, res, conv.act, dst),
                Simd::Avx2 => epilogue_blocked_avx2(sums, &bias, res, conv.act, dst),
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn write_back_blocked(
    _: Simd,
    conv: &Conv,
    _: SharedMut,
    _: Option<&[f32]>,
    _: (usize, usize, usize),
    _: (usize, usize),
    _: usize,
    _: &[f32],
) {
    unreachable!("the blocked layout's kernels exist only on x86_64 ({})", conv.name)
}

/// `dst = act(sums + bias [+ res])`, 16 channels a vector.
///
/// # Safety
/// AVX-512F must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn epilogue_blocked_avx512(sums: &[f32], bias: &[f32; BLOCK], res: Option<&[f32]>, act: Act, dst: &mut [f32]) {
    use crate::cpu::vec512::act_vec;
    use std::arch::x86_64::*;
    assert!(dst.len() == sums.len() && res.is_none_or(|r| r.len() == sums.len()) && sums.len().is_multiple_of(BLOCK));
    // SAFETY: every access lies within the slices' equal lengths, a whole number of vectors.
    unsafe {
        let bv = _mm512_loadu_ps(bias.as_ptr());
        for q in (0..sums.len()).step_by(BLOCK) {
            let mut y = _mm512_add_ps(_mm512_loadu_ps(sums.as_ptr().add(q)), bv);
            if let Some(r) = res {
                y = _mm512_add_ps(y, _mm512_loadu_ps(r.as_ptr().add(q)));
            }
            _mm512_storeu_ps(dst.as_mut_ptr().add(q), act_vec(y, act));
        }
    }
}

/// `epilogue_blocked_avx512` at AVX2: two halves a vector.
///
/// # Safety
/// AVX2 and FMA must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn epilogue_blocked_avx2(sums: &[f32], bias: &[f32; BLOCK], res: Option<&[f32]>, act: Act, dst: &mut [f32]) {
    use crate::cpu::vec256::act8;
    use std::arch::x86_64::*;
    assert!(dst.len() == sums.len() && res.is_none_or(|r| r.len() == sums.len()) && sums.len().is_multiple_of(BLOCK));
    // SAFETY: every access lies within the slices' equal lengths, a whole number of half vectors.
    unsafe {
        let bv = [_mm256_loadu_ps(bias.as_ptr()), _mm256_loadu_ps(bias.as_ptr().add(HALF))];
        for q in (0..sums.len()).step_by(HALF) {
            let mut y = _mm256_add_ps(_mm256_loadu_ps(sums.as_ptr().add(q)), bv[q / HALF % 2]);
            if let Some(r) = res {
                y = _mm256_add_ps(y, _mm256_loadu_ps(r.as_ptr().add(q)));
            }
            _mm256_storeu_ps(dst.as_mut_ptr().add(q), act8(y, act));
        }
    }
}

/// Writes the band's sums of output channels co0.. (`nb` blocks, `npix` vectors each in `band`) of
/// image b, pixels first.. of its `plane`-pixel maps, to their sinks: 16 pixels × 16 channels at a
/// time transposed in registers, then `act(sum + bias [+ residual])` per channel row.
///
/// # Safety
/// AVX-512F must be available; the sinks' tensors must hold image b's channels, these pixels theirs
/// alone.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn write_back(
    conv: &Conv,
    sinks: &Sinks,
    residual: Option<&[f32]>,
    (b, co0, nb): (usize, usize, usize),
    (first, npix): (usize, usize),
    plane: usize,
    band: &[f32],
) {
    use crate::cpu::vec512::{act_vec, transpose16};
    use std::arch::x86_64::*;
    let plane_out = npix * BLOCK;
    assert!(band.len() >= nb * plane_out && first + npix <= plane);
    // SAFETY: the loads lie inside `band` (pixels < npix), the stores and residual loads inside the
    // channels' pixels first..first + npix (the caller's contract).
    unsafe {
        for j in 0..nb {
            let lanes = BLOCK.min(conv.cout - co0 - j * BLOCK);
            let targets: [_; BLOCK] = std::array::from_fn(|c| {
                let co = co0 + j * BLOCK + c;
                (c < lanes).then(|| {
                    (
                        sinks.route(b, co, plane),
                        conv.bias[co],
                        residual.map(|r| r.as_ptr().add((b * conv.cout + co) * plane)),
                    )
                })
            });
            for q0 in (0..npix).step_by(BLOCK) {
                let run = BLOCK.min(npix - q0);
                let mask: __mmask16 = if run == BLOCK { 0xffff } else { (1u16 << run) - 1 };
                let rows: [__m512; BLOCK] = std::array::from_fn(|i| {
                    if i < run {
                        _mm512_loadu_ps(band.as_ptr().add(j * plane_out + (q0 + i) * BLOCK))
                    } else {
                        _mm512_setzero_ps()
                    }
                });
                let cols = transpose16(rows);
                for (c, target) in targets.iter().enumerate() {
                    let Some(((out, at, act), bias, res)) = *target else { continue };
                    let mut y = _mm512_add_ps(cols[c], _mm512_set1_ps(bias));
                    if let Some(r) = res {
                        y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, r.add(first + q0)));
                    }
                    _mm512_mask_storeu_ps(out.get().add(at + first + q0), mask, act_vec(y, act));
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) unsafe fn write_back(
    conv: &Conv,
    _: &Sinks,
    _: Option<&[f32]>,
    _: (usize, usize, usize),
    _: (usize, usize),
    _: usize,
    _: &[f32],
) {
    unreachable!("the AVX-512 level exists only on x86_64 ({})", conv.name)
}

/// `write_back` at AVX2: per half block, 8 pixels × 8 channels transposed in registers.
///
/// # Safety
/// AVX2 and FMA must be available; as `write_back`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn write_back_avx2(
    conv: &Conv,
    sinks: &Sinks,
    residual: Option<&[f32]>,
    (b, co0, nb): (usize, usize, usize),
    (first, npix): (usize, usize),
    plane: usize,
    band: &[f32],
) {
    use crate::cpu::vec256::{act8, first_lanes, transpose8};
    use std::arch::x86_64::*;
    let plane_out = npix * BLOCK;
    assert!(band.len() >= nb * plane_out && first + npix <= plane);
    // SAFETY: the loads lie inside `band` (pixels < npix), the stores and residual loads inside the
    // channels' pixels first..first + npix (masked past the run; the caller's contract).
    unsafe {
        for j in 0..nb {
            let lanes = BLOCK.min(conv.cout - co0 - j * BLOCK);
            for h in 0..lanes.div_ceil(HALF) {
                let targets: [_; HALF] = std::array::from_fn(|jj| {
                    let c = h * HALF + jj;
                    let co = co0 + j * BLOCK + c;
                    (c < lanes).then(|| {
                        (
                            sinks.route(b, co, plane),
                            conv.bias[co],
                            residual.map(|r| r.as_ptr().add((b * conv.cout + co) * plane)),
                        )
                    })
                });
                for q0 in (0..npix).step_by(HALF) {
                    let run = HALF.min(npix - q0);
                    let mask = first_lanes(run);
                    let rows: [__m256; HALF] = std::array::from_fn(|i| {
                        if i < run {
                            _mm256_loadu_ps(band.as_ptr().add(j * plane_out + (q0 + i) * BLOCK + h * HALF))
                        } else {
                            _mm256_setzero_ps()
                        }
                    });
                    let cols = transpose8(rows);
                    for (jj, target) in targets.iter().enumerate() {
                        let Some(((out, at, act), bias, res)) = *target else { continue };
                        let mut y = _mm256_add_ps(cols[jj], _mm256_set1_ps(bias));
                        if let Some(r) = res {
                            y = _mm256_add_ps(y, _mm256_maskload_ps(r.add(first + q0), mask));
                        }
                        _mm256_maskstore_ps(out.get().add(at + first + q0), mask, act8(y, act));
                    }
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn write_back_avx2(
    conv: &Conv,
    _: &Sinks,
    _: Option<&[f32]>,
    _: (usize, usize, usize),
    _: (usize, usize),
    _: usize,
    _: &[f32],
) {
    unreachable!("the AVX2 level exists only on x86_64 ({})", conv.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dense convolution with "same" padding and random weights and bias.
    fn random_conv(cin: usize, cout: usize, k: usize, s: usize, rnd: &mut impl FnMut() -> f32) -> Conv {
        Conv::with_values("t", [cin, cout, k, s, 1], Act::Leaky(0.1), rnd)
    }

    /// The AVX2 build sums in the AVX-512 tile's order, edge columns included, so the two give the same
    /// bits wherever the processor has both; shapes with interior and edge columns, edge columns only
    /// (maps narrower than the kernel), stride 2, a 7x7 stem, 1x1 stride 2, partial tiles and passes.
    #[test]
    fn both_levels_give_the_same_bits() {
        let kernels: Vec<Simd> = [Simd::Avx512, Simd::Avx2].into_iter().filter(|k| k.isa().supported()).collect();
        if kernels.len() < 2 {
            eprintln!("this processor lacks AVX-512 or AVX2: nothing to compare");
            return;
        }
        let mut rnd = super::super::tests::uniform(7);
        // (n, cin, cout, k, stride, h, w)
        for (n, cin, cout, k, s, h, w) in [
            (1, 20, 70, 3, 1, 13, 11),
            (2, 17, 16, 3, 1, 2, 2),
            (1, 5, 40, 3, 1, 1, 9),
            (1, 33, 48, 3, 2, 9, 14),
            (1, 3, 64, 7, 2, 19, 23),
            (1, 40, 24, 1, 2, 7, 5),
            (1, 160, 64, 3, 1, 20, 20),
        ] {
            let conv = random_conv(cin, cout, k, s, &mut rnd);
            let x: Vec<f32> = (0..n * cin * h * w).map(|_| rnd()).collect();
            let (oh, ow) = (out_size(h, k, s, k / 2), out_size(w, k, s, k / 2));
            let outs: Vec<Vec<f32>> = kernels
                .iter()
                .map(|&kernel| {
                    let mut out = vec![f32::NAN; n * cout * oh * ow];
                    let sinks = Sinks::one(super::super::SharedMut(out.as_mut_ptr()), cout, &conv);
                    super::conv(kernel, &conv, &x, n, h, w, sinks, None);
                    out
                })
                .collect();
            for (i, (a, b)) in outs[0].iter().zip(&outs[1]).enumerate() {
                assert!(a.is_finite(), "{cin}->{cout} k{k} s{s} {h}x{w} element {i} not written: {a}");
                assert_eq!(a.to_bits(), b.to_bits(), "{cin}->{cout} k{k} s{s} {h}x{w} element {i}: {a} vs {b}");
            }
        }
    }

    /// The fused conv + max-pool against its two ops, at every level the processor has: the pooled
    /// NCHW output the same bits as the direct path's conv output pooled by `reference::max_pool_3x3s2`,
    /// and within 1e-4 of the reference conv pooled; the blocked entry point the same bits as the NCHW
    /// one. Odd and even conv maps (a last window with and without its third row, one-column and
    /// one-row maps), several bands per image and batches (so bands start mid-image, recomputing the
    /// row above), channel counts off the 64-channel tiles, every monotone activation, blocked and NCHW
    /// inputs.
    #[test]
    fn a_fused_max_pool_equals_the_conv_then_the_pool() {
        let mut rnd = super::super::tests::uniform(13);
        let kernels: Vec<Simd> = [Simd::Avx512, Simd::Avx2].into_iter().filter(|k| k.isa().supported()).collect();
        // (n, cin, cout, k, stride, h, w, act, input blocked)
        for (n, cin, cout, k, s, h, w, act, input_blocked) in [
            (1, 3, 64, 7, 2, 43, 38, Act::Leaky(0.0), false),
            (2, 3, 40, 7, 2, 21, 17, Act::Leaky(0.1), false),
            (1, 5, 70, 3, 1, 29, 11, Act::None, false),
            (2, 16, 16, 3, 2, 9, 2, Act::Relu6, true),
            (1, 32, 48, 3, 1, 1, 7, Act::Leaky(0.0), true),
            (1, 3, 64, 7, 2, 70, 33, Act::Leaky(0.0), false),
        ] {
            let conv = Conv::with_values("t", [cin, cout, k, s, 1], act, &mut rnd);
            assert!(pools(&conv));
            let x: Vec<f32> = (0..n * cin * h * w).map(|_| rnd() * 4.0).collect();
            let (oh, ow) = (out_size(h, k, s, k / 2), out_size(w, k, s, k / 2));
            let (ph, pw) = (out_size(oh, 3, 2, 1), out_size(ow, 3, 2, 1));
            let mut want = vec![0.0; n * cout * oh * ow];
            crate::reference::conv2d(&conv, &x, n, h, w, &mut want, cout, None);
            let mut want_pooled = vec![0.0; n * cout * ph * pw];
            crate::reference::max_pool_3x3s2(&want, n * cout, oh, ow, &mut want_pooled);
            for &kernel in &kernels {
                let what = format!("{kernel:?} {cin}->{cout} k{k} s{s} {h}x{w} {act:?}");
                // The two ops: the direct path's conv, then the reference pool.
                let mut planes = vec![0.0; n * cout * oh * ow];
                super::conv(kernel, &conv, &x, n, h, w, Sinks::one(SharedMut(planes.as_mut_ptr()), cout, &conv), None);
                let mut composed = vec![0.0; n * cout * ph * pw];
                crate::reference::max_pool_3x3s2(&planes, n * cout, oh, ow, &mut composed);
                let mut got = vec![f32::NAN; n * cout * ph * pw];
                conv_max_pool(kernel, &conv, &x, n, h, w, &mut got);
                for (i, ((g, c), e)) in got.iter().zip(&composed).zip(&want_pooled).enumerate() {
                    assert_eq!(g.to_bits(), c.to_bits(), "{what}: element {i}: {g} vs the two ops' {c}");
                    assert!((g - e).abs() <= 1e-4 * e.abs().max(1.0), "{what}: element {i}: {g} vs {e}");
                }
                let xin = if input_blocked { blocked(&x, n, cin, h * w) } else { x.clone() };
                let mut got_b = vec![f32::NAN; blocked_len(n, cout, ph * pw)];
                conv_max_pool_blocked(kernel, &conv, &xin, input_blocked, n, (h, w), &mut got_b);
                for (i, (g, e)) in got_b.iter().zip(&blocked(&got, n, cout, ph * pw)).enumerate() {
                    assert_eq!(g.to_bits(), e.to_bits(), "{what}: blocked element {i}: {g} vs {e}");
                }
            }
        }
    }

    /// NCHW [n][c][npix] in the blocked layout (channels past c zero).
    fn blocked(x: &[f32], n: usize, c: usize, npix: usize) -> Vec<f32> {
        let cb = c.div_ceil(BLOCK);
        let mut out = vec![0.0; blocked_len(n, c, npix)];
        for b in 0..n {
            for ch in 0..c {
                for q in 0..npix {
                    out[((b * cb + ch / BLOCK) * npix + q) * BLOCK + ch % BLOCK] = x[(b * c + ch) * npix + q];
                }
            }
        }
        out
    }

    /// The blocked entry point against the reference, at every level the processor has: blocked and NCHW
    /// inputs, a blocked residual, channel counts off the 16-lane blocks (their padded lanes written as
    /// zeros), a 7x7 stem, stride 2, 1x1 stride 2, and the same bits as the NCHW entry point.
    #[test]
    fn the_blocked_layout_matches_the_reference() {
        let mut rnd = super::super::tests::uniform(11);
        let kernels: Vec<Simd> = [Simd::Avx512, Simd::Avx2].into_iter().filter(|k| k.isa().supported()).collect();
        // (n, cin, cout, k, stride, h, w, input blocked, residual)
        for (n, cin, cout, k, s, h, w, input_blocked, with_res) in [
            (2, 32, 48, 3, 1, 9, 11, true, true),
            (1, 20, 40, 3, 2, 13, 10, true, false),
            (1, 3, 64, 7, 2, 21, 19, false, false),
            (1, 48, 80, 1, 2, 9, 7, true, true),
            (1, 160, 64, 3, 1, 6, 5, true, true),
            (1, 16, 16, 3, 1, 1, 1, true, false),
        ] {
            let conv = random_conv(cin, cout, k, s, &mut rnd);
            let x: Vec<f32> = (0..n * cin * h * w).map(|_| rnd()).collect();
            let (oh, ow) = (out_size(h, k, s, k / 2), out_size(w, k, s, k / 2));
            let res: Option<Vec<f32>> = with_res.then(|| (0..n * cout * oh * ow).map(|_| rnd()).collect());
            let mut want = vec![0.0; n * cout * oh * ow];
            crate::reference::conv2d(&conv, &x, n, h, w, &mut want, cout, res.as_deref());
            let xin = if input_blocked { blocked(&x, n, cin, h * w) } else { x.clone() };
            let res_b = res.as_deref().map(|r| blocked(r, n, cout, oh * ow));
            for &kernel in &kernels {
                let mut got = vec![f32::NAN; blocked_len(n, cout, oh * ow)];
                conv_blocked(kernel, &conv, &xin, input_blocked, n, (h, w), &mut got, res_b.as_deref());
                let want_b = blocked(&want, n, cout, oh * ow);
                for (i, (g, e)) in got.iter().zip(&want_b).enumerate() {
                    let what = format!("{kernel:?} {cin}->{cout} k{k} s{s} {h}x{w} element {i}");
                    assert!((g - e).abs() <= 1e-4 * e.abs().max(1.0), "{what}: {g} vs {e}");
                }
                // The NCHW entry point sums in the same order: the same bits.
                let mut planes = vec![0.0; n * cout * oh * ow];
                if !input_blocked {
                    let sinks = Sinks::one(super::super::SharedMut(planes.as_mut_ptr()), cout, &conv);
                    super::conv(kernel, &conv, &x, n, h, w, sinks, res.as_deref());
                    for (i, (g, e)) in got.iter().zip(&blocked(&planes, n, cout, oh * ow)).enumerate() {
                        assert_eq!(g.to_bits(), e.to_bits(), "{kernel:?} {cin}->{cout} element {i}");
                    }
                }
            }
        }
    }
}
