//! 3×3 stride-1 convolutions (pad 1) by Winograd's F(m×m, 3×3), m = 2 or 4, at the AVX2 and AVX-512
//! levels.
//!
//! Each m×m output tile is `Aᵀ [Σ_ci (G g Gᵀ) ⊙ (Bᵀ d B)] A` for the tile's (m + 2)² input patch d:
//! F(2×2) does 16 multiplies per tile and input channel instead of 36 (2.25x fewer), F(4×4) 36 instead
//! of 144 (4x fewer). The sums over input channels are (m + 2)² independent GEMMs (one per element e
//! of the transformed tile), run on the implicit-GEMM micro-kernel: weights transformed and packed once
//! per convolution and tile as [elems][cout/MR][cin][MR] (`Conv::packed.winograd`, `.winograd4`), the
//! transformed input as elems × cin planes (one row of the B operand per input channel, tiles along
//! it), and the products summed per e into a scratch from which the output transform writes m×m pixels
//! per tile with bias, residual and activation.
//!
//! Two schedules (`Schedule`): bands of tile rows per task keep the transformed input and the products
//! (elems·(cin + cout) floats per tile) in L2, but stream all the transformed weights per band; for many
//! channels on small maps the whole image is transformed once and the tasks split the output channels
//! instead, so each weight is read once. The transforms are vectorised along a tile row (adjacent tiles
//! are adjacent lanes): the input rows are split into even and odd columns (F(2×2): tile tx reads
//! columns 2tx − 1 … 2tx + 2 as even[tx], odd[tx], even[tx + 1], odd[tx + 1] of the row padded by one
//! zero) or, splitting twice, into the four phases of columns mod 4 (F(4×4)).
//!
//! The transforms are exact in the sense of algebra, not of f32. F(2×2) rounds a little more than a
//! change of summation order (its transforms add and subtract up to four inputs, the weight transform
//! halves): tested against `reference::conv2d` at 1e-4. F(4×4)'s transforms have entries up to 8 and
//! 1/6 and 1/24 (the interpolation points 0, ±1, ±2): its error scales with the size of the summed
//! terms rather than the result, tested at 4e-6 of Σ|w·x| per output, and through whole networks by
//! the goldens with it forced everywhere.

use super::common::{Sinks, aligned, store_epilogue_fast};
use super::igemm::{self, conflict_free_stride};
use super::tile::{MR, NR};
use crate::cpu::isa::Isa;
use crate::cpu::isa::Simd;
use crate::cpu::rows::{deinterleave, interleave, split_padded};
use crate::graph::Conv;
use rayon::prelude::*;

/// Floats of transformed input plus products per task (2 MiB): within L2 together with the weights'
/// current panel.
const BAND_BUDGET: usize = 1 << 19;

/// Whether `conv` is a convolution this path computes at `level`.
pub fn handles(conv: &Conv, level: Isa) -> bool {
    Simd::of(level).is_some() && conv.groups == 1 && conv.kernel == 3 && conv.stride == 1 && conv.pad == 1
}

/// Winograd's output tile: F(m×m, 3×3) reads (m + 2)² inputs per tile and runs (m + 2)² GEMMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tile {
    /// F(2×2, 3×3): 16 products per 4 outputs (2.25x fewer than direct), exact transforms (±1, ½).
    F2,
    /// F(4×4, 3×3): 36 products per 16 outputs (4x fewer), transforms with 4, 5, 8 and 1/6, 1/24;
    /// a little more rounding.
    F4,
}

impl Tile {
    /// Output rows and columns per tile.
    pub const fn m(self) -> usize {
        match self {
            Tile::F2 => 2,
            Tile::F4 => 4,
        }
    }

    /// Transformed elements per tile, one GEMM each.
    pub const fn elems(self) -> usize {
        (self.m() + 2) * (self.m() + 2)
    }
}

/// The tile this path would use for `conv` on an h×w input, if it is the faster way. Measured
/// (`CONV_SHAPES_CLOCK=cpu RAYON_NUM_THREADS=1 cargo bench --bench conv_shapes`, AVX-512 Xeon, against
/// `RETINAFACE_CPU_WINOGRAD=0`, `=2` and `=4`):
/// - F(2×2) is 1.25–1.35x ahead of the implicit GEMM on 64–256 channels at 40²–160², and 1.17x on 512
///   channels at 20² (whose 16 MiB of transformed weights would stream once per band: `schedule` runs
///   it over the whole image instead). The input transform costs per input channel and the saving is
///   per output channel: with fewer than 64 outputs (SSH's 32- and 16-channel branches) it loses
///   (0.65–0.85x in the network); and on maps under 48 tiles the micro-kernel's columns are mostly empty.
/// - F(4×4) against F(2×2): 1.2–1.3x on 128 input channels at 80² (ResNet layer2, the FPN merges, SSH's
///   conv3X3), 1.05x at 40²; 1.25–1.4x on 256 channels at 80² (ResNet's FPN merge and SSH), 1.15x at
///   40²; 1.2x on 64 channels at 160² (ResNet layer1), even at 80², 0.96x at 40²; even on 512 channels
///   at 20² (25 tiles: half a micro-kernel column). Where they are even, F(2×2): it rounds less.
/// - Inside the networks F(4×4) loses those leads up to 128 input channels: per op, the same binary with
///   `RETINAFACE_CPU_WINOGRAD=2` against the choice above, alternating runs (Ice Lake Xeon, 2026-12-01),
///   F(2×2) ran the 128-channel FPN merge at 80² 14.4 against 18.8 ms (one thread) and 8.3 against 10.4
///   (two), SSH's first pair 10.6 against 15.8 and 6.6 against 8.0, ResNet-18's layer1 and layer2 3×3s
///   8–16% faster at two threads: F(4×4)'s transformed weights (2.4 MB at 128 channels, against 1 MB)
///   come from memory once per band after the layers before them have flushed the caches, which a
///   benchmark of the convolution alone never sees. At 256 channels F(4×4) still wins in the network
///   (ResNet-50's merge 25.8 against 39.1 ms, its layer3 3×3s 9 against 11): F(4×4) from 129 input
///   channels at AVX-512. Paired in one process (`cargo bench --bench paired -- f4from=129 f4from=128`,
///   2026-12-02, two threads) the AVX-512 networks were even (0.96–1.035, quartiles either side of 1).
/// - On the AVX2 kernel, whose GEMM runs at half the rate, the streamed weights weigh less and F(4×4)
///   wins from 128 input channels: paired (as above, under tools/cpuid/hide_avx512.so, time with F(2×2) over time with F(4×4)
///   for 128 channels) MobileNetV1 x0.5 1.10x at two threads (quartiles 1.08–1.14) and 1.07x at one
///   (1.03–1.14), ResNet-18 and -34 1.04x, x1.0 1.02x / 0.99x; from 64 channels (ResNet layer1, x0.25's
///   neck) even or behind (0.97–1.01x).
/// - On the AVX2 kernel (Zen 3, `RAYON_NUM_THREADS=1`, best of three alternating runs) the implicit GEMM
///   is weaker and Winograd already wins from 32 output channels: F(2×2) runs x0.25's SSH conv3X3 +
///   conv5X5_1 (64→32+16 at 80²) 1.65–1.7x faster than the implicit GEMM, x1.0's conv5X5_1 (128→32)
///   1.23–1.41x.
pub fn choose(conv: &Conv, h: usize, w: usize, kernel: Simd) -> Option<Tile> {
    let min_cout = if kernel == Simd::Avx2 { 32 } else { 64 };
    let f2 = conv.cin >= 32 && conv.cout >= min_cout && h.div_ceil(2) * w.div_ceil(2) >= NR;
    let f4 = conv.cin >= f4_from(kernel) && conv.cin <= 256 && w >= 40;
    match mode() {
        WinogradMode::Off => None,
        WinogradMode::Force(t) => f2.then_some(t),
        WinogradMode::Auto => f2.then_some(if f4 { Tile::F4 } else { Tile::F2 }),
    }
}

/// The fewest input channels from which `choose` takes F(4×4) (up to 256, on maps 40 wide or more), unless
/// `set_f4_from` set another: 128 on the AVX2 kernel, 129 on AVX-512 (see `choose`).
pub fn f4_from(kernel: Simd) -> usize {
    match F4_FROM.load(std::sync::atomic::Ordering::Relaxed) {
        0 if kernel == Simd::Avx2 => 128,
        0 => 129,
        forced => forced,
    }
}

/// `set_f4_from`'s threshold, or 0: the measured one.
static F4_FROM: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Sets the threshold `f4_from` returns at every level (`None`: back to the measured one), so a benchmark
/// can time the measured rule against another in one process (`benches/paired.rs`).
pub fn set_f4_from(cin: Option<usize>) {
    F4_FROM.store(cin.unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
}

/// How the Winograd path is chosen: by measurement, never, or always with one tile where it applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WinogradMode {
    Auto,
    Off,
    Force(Tile),
}

/// `set_mode`'s choice (1 auto, 2 off, 3 F2, 4 F4), or 0: the environment's applies.
static MODE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Forces a mode for the whole process (`None`: back to the environment's), so a test or a benchmark
/// can run each tile on the same machine in the same process. Every mode meets the same tolerances.
pub fn set_mode(mode: Option<WinogradMode>) {
    let code = match mode {
        None => 0,
        Some(WinogradMode::Auto) => 1,
        Some(WinogradMode::Off) => 2,
        Some(WinogradMode::Force(Tile::F2)) => 3,
        Some(WinogradMode::Force(Tile::F4)) => 4,
    };
    MODE.store(code, std::sync::atomic::Ordering::Relaxed);
}

/// The mode `set_mode` forced, else `RETINAFACE_CPU_WINOGRAD`: `0` off, `2` or `4` that tile wherever
/// the path is taken, anything else (or unset) by measurement; read once.
pub fn mode() -> WinogradMode {
    static ENV: std::sync::OnceLock<WinogradMode> = std::sync::OnceLock::new();
    match MODE.load(std::sync::atomic::Ordering::Relaxed) {
        1 => WinogradMode::Auto,
        2 => WinogradMode::Off,
        3 => WinogradMode::Force(Tile::F2),
        4 => WinogradMode::Force(Tile::F4),
        _ => *ENV.get_or_init(|| match std::env::var("RETINAFACE_CPU_WINOGRAD").as_deref() {
            Ok("0") => WinogradMode::Off,
            Ok("2") => WinogradMode::Force(Tile::F2),
            Ok("4") => WinogradMode::Force(Tile::F4),
            _ => WinogradMode::Auto,
        }),
    }
}

/// G g Gᵀ for one 3×3 kernel g (row-major), row-major 4×4.
fn transform_weight(g: &[f32]) -> [f32; 16] {
    // G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]]; first Gg (4×3), then (Gg)Gᵀ (4×4).
    let mut gg = [0.0f32; 12];
    for c in 0..3 {
        let (g0, g1, g2) = (g[c], g[3 + c], g[6 + c]);
        gg[c] = g0;
        gg[3 + c] = 0.5 * (g0 + g1 + g2);
        gg[6 + c] = 0.5 * (g0 - g1 + g2);
        gg[9 + c] = g2;
    }
    let mut u = [0.0f32; 16];
    for r in 0..4 {
        let (a, b, c) = (gg[r * 3], gg[r * 3 + 1], gg[r * 3 + 2]);
        u[r * 4] = a;
        u[r * 4 + 1] = 0.5 * (a + b + c);
        u[r * 4 + 2] = 0.5 * (a - b + c);
        u[r * 4 + 3] = c;
    }
    u
}

/// G g Gᵀ for F(4×4, 3×3), row-major 6×6, computed in f64 and rounded once:
/// G = [[¼, 0, 0], [−⅙, −⅙, −⅙], [−⅙, ⅙, −⅙], [1/24, 1/12, ⅙], [1/24, −1/12, ⅙], [0, 0, 1]].
pub(crate) fn transform_weight4(g: &[f32]) -> [f32; 36] {
    const G: [[f64; 3]; 6] = [
        [0.25, 0.0, 0.0],
        [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
        [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
        [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
        [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
        [0.0, 0.0, 1.0],
    ];
    let mut gg = [[0.0f64; 3]; 6];
    for (r, row) in gg.iter_mut().enumerate() {
        for (c, v) in row.iter_mut().enumerate() {
            *v = (0..3).map(|k| G[r][k] * g[k * 3 + c] as f64).sum();
        }
    }
    let mut u = [0.0f32; 36];
    for r in 0..6 {
        for c in 0..6 {
            u[r * 6 + c] = (0..3).map(|k| gg[r][k] * G[c][k]).sum::<f64>() as f32;
        }
    }
    u
}

/// The weights transformed for `tile` and packed as [elems][cout/MR][cin][MR], rows past cout zero.
pub fn pack_weights(weight: &[f32], cout: usize, cin: usize, tile: Tile) -> Vec<f32> {
    let blocks = cout.div_ceil(MR);
    let per_e = blocks * cin * MR;
    let mut packed = vec![0.0f32; tile.elems() * per_e];
    for co in 0..cout {
        for ci in 0..cin {
            let g = &weight[(co * cin + ci) * 9..][..9];
            let (u2, u4);
            let u: &[f32] = match tile {
                Tile::F2 => {
                    u2 = transform_weight(g);
                    &u2
                }
                Tile::F4 => {
                    u4 = transform_weight4(g);
                    &u4
                }
            };
            for (e, v) in u.iter().enumerate() {
                packed[e * per_e + ((co / MR) * cin + ci) * MR + co % MR] = *v;
            }
        }
    }
    packed
}

/// The convolution of `conv::conv2d` by F(m×m, 3×3). Call only when `handles(conv, level)`.
#[allow(clippy::too_many_arguments)]
pub(super) fn conv(
    level: Isa,
    tile: Tile,
    conv: &Conv,
    x: &[f32],
    n: usize,
    h: usize,
    w: usize,
    sinks: Sinks,
    residual: Option<&[f32]>,
) {
    let Some(kernel) = Simd::of(level) else {
        unreachable!("winograd::conv at a level without a micro-kernel: `handles` was not checked")
    };
    assert!(kernel.isa().supported(), "winograd: the {kernel:?} kernel was chosen on a processor without it");
    let cache = match tile {
        Tile::F2 => &conv.packed.winograd,
        Tile::F4 => &conv.packed.winograd4,
    };
    let packed = cache.get_or_init(|| pack_weights(&conv.weight, conv.cout, conv.cin, tile));
    let (th, tw) = (h.div_ceil(tile.m()), w.div_ceil(tile.m()));
    let blocks = conv.cout.div_ceil(MR);
    // Tile rows per band: the transformed input and the products within the budget, and enough bands
    // for the threads.
    let per_tile_row = tile.elems() * (conv.cin + blocks * MR) * tw;
    let budget_rows = (BAND_BUDGET / per_tile_row.max(1)).clamp(1, th);
    let rows = band_rows(th, tw, budget_rows, n, rayon::current_num_threads());
    let bands = th.div_ceil(rows);
    let task = Band { level, kernel, tile, conv, packed, x, h, w, tw, sinks, residual };
    let co_tasks = (2 * rayon::current_num_threads()).clamp(1, blocks);
    if schedule(tile, conv.cin, conv.cout, th * tw, bands, co_tasks) == Schedule::WholeImage {
        for b in 0..n {
            task.whole_image(b, th, co_tasks);
        }
        return;
    }
    (0..n * bands).into_par_iter().for_each(|t| {
        // A thread's scratch is reused across calls (taken, so a nested call on this thread gets its
        // own): fresh megabytes per task would be page faults and zero fills.
        let mut s = SCRATCH.with(|c| c.take());
        let (b, bi) = (t / bands, t % bands);
        let ty0 = bi * rows;
        task.run(b, ty0, rows.min(th - ty0), &mut s);
        SCRATCH.with(|c| *c.borrow_mut() = s);
    });
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
    /// A whole image's transformed input and its reduction offsets (`Schedule::WholeImage`), reused
    /// across calls.
    static WHOLE: std::cell::RefCell<(Vec<f32>, Vec<u32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// How the work is split into tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Schedule {
    /// Bands of tile rows, each task transforming its input rows and running every output channel: the
    /// transformed tiles stay in L2, but every band streams all the transformed weights.
    Bands,
    /// The whole image's input transformed once (in parallel over input channels), then one task per
    /// range of output channels over every tile: each transformed weight is read once, and each task
    /// reads the whole transformed input. For many channels on small maps (ResNet's layer4, 512
    /// channels at 20², has 16 MiB of F(2×2) weights and four bands).
    WholeImage,
}

/// The schedule that streams fewer floats: bands re-read the weights once per band beyond the first;
/// the whole image is read once per output-channel task, and written once more.
fn schedule(tile: Tile, cin: usize, cout: usize, tiles: usize, bands: usize, co_tasks: usize) -> Schedule {
    if let Some(forced) = forced_schedule() {
        return forced;
    }
    let weights = tile.elems() * cin * cout;
    let image = tile.elems() * cin * tiles;
    if weights * bands.saturating_sub(1) > image * (co_tasks + 1) { Schedule::WholeImage } else { Schedule::Bands }
}

/// `schedule`'s choice forced by a test (0: none, 1: bands, 2: whole image).
static FORCED_SCHEDULE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// The schedule a test forced, else `RETINAFACE_CPU_WINOGRAD_SCHEDULE` (`bands` or `whole`, for timing
/// one against the other inside a network; read once), else none.
fn forced_schedule() -> Option<Schedule> {
    static ENV: std::sync::OnceLock<Option<Schedule>> = std::sync::OnceLock::new();
    match FORCED_SCHEDULE.load(std::sync::atomic::Ordering::Relaxed) {
        1 => Some(Schedule::Bands),
        2 => Some(Schedule::WholeImage),
        _ => *ENV.get_or_init(|| match std::env::var("RETINAFACE_CPU_WINOGRAD_SCHEDULE").as_deref() {
            Ok("bands") => Some(Schedule::Bands),
            Ok("whole") => Some(Schedule::WholeImage),
            _ => None,
        }),
    }
}

/// Tile rows per band: the count within the budget whose slowest thread runs the fewest micro-tile
/// columns (NR tiles each, the last one of a band partly empty), fewest bands among equals. A band of
/// 50 tiles would run two columns for little more than one column's work.
fn band_rows(th: usize, tw: usize, budget_rows: usize, n: usize, threads: usize) -> usize {
    let cost = |rows: usize| {
        let bands = th.div_ceil(rows);
        let columns = (rows * tw).div_ceil(NR);
        ((n * bands).div_ceil(threads.max(1)) * columns, bands)
    };
    (1..=budget_rows.max(1)).min_by_key(|&r| cost(r)).unwrap_or(1)
}

#[derive(Default)]
struct Scratch {
    /// Transformed input: [16][cin][plane].
    v: Vec<f32>,
    /// Products: [16][blocks·MR][ld].
    m: Vec<f32>,
    /// Four input rows split into even/odd padded columns.
    split: Vec<f32>,
    /// Row-transformed input rows: [4 rows][4 columns][tw].
    rt: Vec<f32>,
    offsets: Vec<u32>,
}

struct Band<'a> {
    level: Isa,
    kernel: Simd,
    tile: Tile,
    conv: &'a Conv,
    packed: &'a [f32],
    x: &'a [f32],
    h: usize,
    w: usize,
    tw: usize,
    sinks: Sinks,
    residual: Option<&'a [f32]>,
}

impl Band<'_> {
    /// Tile rows ty0..ty0+rows of image b.
    fn run(&self, b: usize, ty0: usize, rows: usize, s: &mut Scratch) {
        let (cin, cout, tw, elems) = (self.conv.cin, self.conv.cout, self.tw, self.tile.elems());
        let tiles = rows * tw;
        let plane = conflict_free_stride(tiles);
        let mut v = std::mem::take(&mut s.v);
        let v_at = aligned(&mut v, elems * cin * plane);
        for ci in 0..cin {
            let input = &self.x[(b * cin + ci) * self.h * self.w..][..self.h * self.w];
            for r in 0..rows {
                self.transform_row(input, ty0 + r, s, &mut v[v_at..], ci * plane + r * tw, cin * plane);
            }
        }
        s.v = v;
        // The GEMMs: m[e][co][t] = Σ_ci U[e][co][ci] · V[e][ci][t].
        let blocks = cout.div_ceil(MR);
        let ntiles = tiles.div_ceil(NR);
        let ld = ntiles * NR;
        let m_at = aligned(&mut s.m, elems * blocks * MR * ld);
        s.offsets.clear();
        s.offsets.extend((0..cin).map(|ci| (ci * plane) as u32));
        let per_e = blocks * cin * MR;
        for e in 0..elems {
            let v = &s.v[v_at + e * cin * plane..][..cin * plane];
            let m = &mut s.m[m_at + e * blocks * MR * ld..][..blocks * MR * ld];
            // SAFETY: `conv` checked that the processor runs the kernel; every B read lies at ci·plane +
            // px + lane with px + lane < tiles, inside v's planes.
            unsafe {
                igemm::gemm_tiles(self.kernel, &self.packed[e * per_e..], &s.offsets, v, tiles, ntiles, blocks, m, ld)
            };
        }
        for co in 0..cout {
            for r in 0..rows {
                self.output_row(b, co, ty0 + r, &s.m[m_at..], (co * ld + r * tw, blocks * MR * ld), &mut s.rt);
            }
        }
    }

    /// Image b by `Schedule::WholeImage`: every tile row of every input channel transformed into one
    /// [cin][elems][plane] (parallel over input channels), then `co_tasks` ranges of output blocks, each
    /// task running its blocks' GEMMs over every tile and their output transforms.
    fn whole_image(&self, b: usize, th: usize, co_tasks: usize) {
        let (cin, tw, elems) = (self.conv.cin, self.tw, self.tile.elems());
        let tiles = th * tw;
        let plane = conflict_free_stride(tiles);
        let (mut v, mut offsets) = WHOLE.with(|c| c.take());
        let v_at = aligned(&mut v, cin * elems * plane);
        v[v_at..][..cin * elems * plane].par_chunks_mut(elems * plane).enumerate().for_each(|(ci, vc)| {
            let mut s = SCRATCH.with(|c| c.take());
            let input = &self.x[(b * cin + ci) * self.h * self.w..][..self.h * self.w];
            for ty in 0..th {
                self.transform_row(input, ty, &mut s, vc, ty * tw, plane);
            }
            SCRATCH.with(|c| *c.borrow_mut() = s);
        });
        let blocks = self.conv.cout.div_ceil(MR);
        let per_task = blocks.div_ceil(co_tasks);
        offsets.clear();
        offsets.extend((0..cin).map(|ci| (ci * elems * plane) as u32));
        let (ntiles, per_e) = (tiles.div_ceil(NR), blocks * cin * MR);
        let ld = ntiles * NR;
        (0..blocks.div_ceil(per_task)).into_par_iter().for_each(|t| {
            let mut s = SCRATCH.with(|c| c.take());
            let blk0 = t * per_task;
            let nblk = per_task.min(blocks - blk0);
            let m_at = aligned(&mut s.m, elems * nblk * MR * ld);
            for e in 0..elems {
                let m = &mut s.m[m_at + e * nblk * MR * ld..][..nblk * MR * ld];
                let a = &self.packed[e * per_e + blk0 * cin * MR..];
                // SAFETY: `conv` checked that the processor runs the kernel; every B read lies at
                // ci·elems·plane + e·plane + px + lane with px + lane < tiles, inside `v`.
                unsafe {
                    igemm::gemm_tiles(self.kernel, a, &offsets, &v[v_at + e * plane..], tiles, ntiles, nblk, m, ld)
                };
            }
            for co in blk0 * MR..((blk0 + nblk) * MR).min(self.conv.cout) {
                for ty in 0..th {
                    let at = ((co - blk0 * MR) * ld + ty * tw, nblk * MR * ld);
                    self.output_row(b, co, ty, &s.m[m_at..], at, &mut s.rt);
                }
            }
            SCRATCH.with(|c| *c.borrow_mut() = s);
        });
        WHOLE.with(|c| *c.borrow_mut() = (v, offsets));
    }

    /// Tile row ty of one input channel (`input`, its h×w plane) into `v[e·e_stride + at + tx]`.
    fn transform_row(&self, input: &[f32], ty: usize, s: &mut Scratch, v: &mut [f32], at: usize, e_stride: usize) {
        let (h, w, tw) = (self.h, self.w, self.tw);
        let (split, rt) = (&mut s.split, &mut s.rt);
        match self.tile {
            Tile::F2 => input_transform_fast(self.level, self.level, input, h, w, ty, tw, split, rt, v, at, e_stride),
            Tile::F4 => input_transform4_fast(self.level, self.level, input, h, w, ty, tw, split, rt, v, at, e_stride),
        }
    }

    /// Output rows m·ty … m·ty + m − 1 of channel co from the products of tile row ty (`at.0`: where its
    /// first tile's e = 0 product is, `at.1`: floats from one e to the next).
    fn output_row(&self, b: usize, co: usize, ty: usize, m: &[f32], at: (usize, usize), tmp: &mut Vec<f32>) {
        let (oh, ow, tw, mt) = (self.h, self.w, self.tw, self.tile.m());
        let plane = oh * ow;
        let c = self.conv;
        let res = self.residual.map(|r| &r[(b * c.cout + co) * plane..][..plane]);
        let (out, base, act) = self.sinks.route(b, co, plane);
        for dy in 0..mt {
            let oy = mt * ty + dy;
            if oy >= oh {
                break;
            }
            // Every slot is written by the transform: grown once, never cleared.
            let row = match self.tile {
                Tile::F2 => {
                    tmp.resize(6 * tw, 0.0);
                    output_transform_fast(self.level, self.level, m, at.0, at.1, tw, dy, tmp);
                    &tmp[4 * tw..4 * tw + ow]
                }
                Tile::F4 => {
                    tmp.resize(18 * tw, 0.0);
                    output_transform4_fast(self.level, self.level, m, at.0, at.1, tw, dy, tmp);
                    &tmp[14 * tw..14 * tw + ow]
                }
            };
            // SAFETY: output row oy of this channel belongs to this task alone (its band of tile rows).
            let orow = unsafe { std::slice::from_raw_parts_mut(out.get().add(base + oy * ow), ow) };
            let res_row = res.map(|r| &r[oy * ow..(oy + 1) * ow]);
            store_epilogue_fast(self.level, row, orow, c.bias[co], res_row, act);
        }
    }
}

/// Bᵀ d B for every tile of tile row `ty` of one input channel, into `v[e·e_stride + at + tx]`.
/// Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn input_transform(
    level: Isa,
    input: &[f32],
    h: usize,
    w: usize,
    ty: usize,
    tw: usize,
    split: &mut Vec<f32>,
    rt: &mut Vec<f32>,
    v: &mut [f32],
    at: usize,
    e_stride: usize,
) {
    // Padded row length 2·tw + 2 (one zero left, zeros right): even and odd halves of tw + 1.
    let half = tw + 1;
    // Only the padding columns need zeros: every other slot of split and rt is written below.
    split.resize(4 * 2 * half, 0.0);
    rt.resize(16 * tw, 0.0);
    for r in 0..4 {
        let iy = (2 * ty + r) as isize - 1;
        if iy < 0 || iy as usize >= h {
            rt[r * 4 * tw..(r + 1) * 4 * tw].fill(0.0);
            continue;
        }
        let src = &input[iy as usize * w..(iy as usize + 1) * w];
        let (even, odd) = split[r * 2 * half..(r + 1) * 2 * half].split_at_mut(half);
        split_padded(level, src, even, odd);
        // Row transform d·B: columns (even[tx], odd[tx], even[tx+1], odd[tx+1]) → (d0−d2, d1+d2, d2−d1, d1−d3).
        let (d0, d1, d2, d3) = (&even[..tw], &odd[..tw], &even[1..tw + 1], &odd[1..tw + 1]);
        let row = &mut rt[r * 4 * tw..(r + 1) * 4 * tw];
        let (c0, rest) = row.split_at_mut(tw);
        let (c1, rest) = rest.split_at_mut(tw);
        let (c2, c3) = rest.split_at_mut(tw);
        // One pass per output column (zipped iterators, so each vectorises without bounds checks).
        c0.iter_mut().zip(d0.iter().zip(d2)).for_each(|(c, (a, b))| *c = a - b);
        c1.iter_mut().zip(d1.iter().zip(d2)).for_each(|(c, (a, b))| *c = a + b);
        c2.iter_mut().zip(d2.iter().zip(d1)).for_each(|(c, (a, b))| *c = a - b);
        c3.iter_mut().zip(d1.iter().zip(d3)).for_each(|(c, (a, b))| *c = a - b);
    }
    // Column transform Bᵀ·(dB): rows (r0, r1, r2, r3) → (r0−r2, r1+r2, r2−r1, r1−r3), per column j;
    // element e = 4i + j.
    for j in 0..4 {
        let col = |r: usize| &rt[(r * 4 + j) * tw..(r * 4 + j + 1) * tw];
        let (r0, r1, r2, r3) = (col(0), col(1), col(2), col(3));
        let dst = |i: usize| {
            let start = (i * 4 + j) * e_stride + at;
            start..start + tw
        };
        let (d0, d1, d2, d3) = (dst(0), dst(1), dst(2), dst(3));
        v[d0].iter_mut().zip(r0.iter().zip(r2)).for_each(|(d, (a, b))| *d = a - b);
        v[d1].iter_mut().zip(r1.iter().zip(r2)).for_each(|(d, (a, b))| *d = a + b);
        v[d2].iter_mut().zip(r2.iter().zip(r1)).for_each(|(d, (a, b))| *d = a - b);
        v[d3].iter_mut().zip(r1.iter().zip(r3)).for_each(|(d, (a, b))| *d = a - b);
    }
}

/// Output row dy ∈ {0, 1} of a tile row: Aᵀ m A with Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]], pixel
/// (dy, dx) of tile tx to `out[2tx + dx]`; m[e] of tile tx at `m[at + e·e_stride + tx]`. `tmp` holds
/// the four columns of row dy of Aᵀ m (4·tw floats), then the row (2·tw).
#[inline(always)]
fn output_transform(level: Isa, m: &[f32], at: usize, e_stride: usize, tw: usize, dy: usize, tmp: &mut [f32]) {
    let me = |e: usize| &m[at + e * e_stride..][..tw];
    let (cols, out) = tmp.split_at_mut(4 * tw);
    for (j, dst) in cols.chunks_exact_mut(tw).enumerate() {
        let (a, b, c, d) = (me(j), me(4 + j), me(8 + j), me(12 + j));
        if dy == 0 {
            dst.iter_mut().zip(a.iter().zip(b).zip(c)).for_each(|(o, ((a, b), c))| *o = a + b + c);
        } else {
            dst.iter_mut().zip(b.iter().zip(c).zip(d)).for_each(|(o, ((b, c), d))| *o = b - c - d);
        }
    }
    let (c0, rest) = cols.split_at_mut(tw);
    let (c1, rest) = rest.split_at_mut(tw);
    let (c2, c3) = rest.split_at_mut(tw);
    // Column 1 of the tile row into c3, column 0 into c0 (each element read before it is overwritten),
    // then the two interleaved into the pixel row.
    c3.iter_mut().zip(c1.iter().zip(c2.iter())).for_each(|(d, (b, c))| *d = b - c - *d);
    c0.iter_mut().zip(c1.iter().zip(c2.iter())).for_each(|(a, (b, c))| *a = *a + b + c);
    interleave(level, c0, c3, &mut out[..2 * tw]);
}

/// Bᵀ d B of F(4×4, 3×3) for every tile of tile row `ty` of one input channel, into
/// `v[e·e_stride + at + tx]` (e = 6i + j), with
/// Bᵀ = [[4, 0, −5, 0, 1, 0], [0, −4, −4, 1, 1, 0], [0, 4, −4, −1, 1, 0], [0, −2, −1, 2, 1, 0],
/// [0, 2, −1, −2, 1, 0], [0, 4, 0, −5, 0, 1]].
/// Tile tx reads padded columns 4tx … 4tx + 5 (padded column c is input column c − 1): the padded row is
/// split into its four phases q_r[k] = padded[4k + r] (two even/odd splits), so column 4tx + j is
/// q_{j mod 4}[tx + j / 4] and every term of the transform is a contiguous run over the tiles.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn input_transform4(
    level: Isa,
    input: &[f32],
    h: usize,
    w: usize,
    ty: usize,
    tw: usize,
    split: &mut Vec<f32>,
    rt: &mut Vec<f32>,
    v: &mut [f32],
    at: usize,
    e_stride: usize,
) {
    // The padded row's 4(tw + 1) columns: even/odd halves of 2q, then the four phases of q each.
    let q = tw + 1;
    split.resize(8 * q, 0.0);
    rt.resize(36 * tw, 0.0);
    for r in 0..6 {
        let iy = (4 * ty + r) as isize - 1;
        let row = &mut rt[r * 6 * tw..(r + 1) * 6 * tw];
        if iy < 0 || iy as usize >= h {
            row.fill(0.0);
            continue;
        }
        let src = &input[iy as usize * w..(iy as usize + 1) * w];
        let (halves, phases) = split.split_at_mut(4 * q);
        let (even, odd) = halves.split_at_mut(2 * q);
        split_padded(level, src, even, odd);
        let (q0q2, q1q3) = phases.split_at_mut(2 * q);
        let (q0, q2) = q0q2.split_at_mut(q);
        let (q1, q3) = q1q3.split_at_mut(q);
        deinterleave(level, even, q0, q2);
        deinterleave(level, odd, q1, q3);
        let (d0, d1, d2, d3, d4, d5) = (&q0[..tw], &q1[..tw], &q2[..tw], &q3[..tw], &q0[1..tw + 1], &q1[1..tw + 1]);
        let d = [d0, d1, d2, d3, d4, d5];
        for (i, c) in row.chunks_exact_mut(tw).enumerate() {
            transform_b(i, d, c);
        }
    }
    // Column transform Bᵀ·(d B) per column j, into element e = 6i + j.
    for j in 0..6 {
        let col = |r: usize| &rt[(r * 6 + j) * tw..(r * 6 + j + 1) * tw];
        let d = [col(0), col(1), col(2), col(3), col(4), col(5)];
        for i in 0..6 {
            let start = (i * 6 + j) * e_stride + at;
            transform_b(i, d, &mut v[start..start + tw]);
        }
    }
}

/// One Bᵀ row of F(4×4, 3×3) over runs of tiles: `out = Σ_j Bᵀ[i][j] · d_j`, written as 4d0 − 5d2 + d4,
/// (d3 + d4) − 4(d1 + d2), (d4 − d3) + 4(d1 − d2), (d4 − d2) + 2(d3 − d1), (d4 − d2) − 2(d3 − d1),
/// 4d1 − 5d3 + d5.
#[inline(always)]
pub(crate) fn transform_b(i: usize, d: [&[f32]; 6], out: &mut [f32]) {
    let n = out.len();
    let (d0, d1, d2, d3, d4, d5) = (&d[0][..n], &d[1][..n], &d[2][..n], &d[3][..n], &d[4][..n], &d[5][..n]);
    // Plain indexed loops over equal-length slices: they vectorise inside the caller's level build
    // (closures and array maps here were left out of line, at the baseline level).
    match i {
        0 => {
            for t in 0..n {
                out[t] = (4.0 * d0[t] - 5.0 * d2[t]) + d4[t];
            }
        }
        1 => {
            for t in 0..n {
                out[t] = (d3[t] + d4[t]) - 4.0 * (d1[t] + d2[t]);
            }
        }
        2 => {
            for t in 0..n {
                out[t] = (d4[t] - d3[t]) + 4.0 * (d1[t] - d2[t]);
            }
        }
        3 => {
            for t in 0..n {
                out[t] = (d4[t] - d2[t]) + 2.0 * (d3[t] - d1[t]);
            }
        }
        4 => {
            for t in 0..n {
                out[t] = (d4[t] - d2[t]) - 2.0 * (d3[t] - d1[t]);
            }
        }
        _ => {
            for t in 0..n {
                out[t] = (4.0 * d1[t] - 5.0 * d3[t]) + d5[t];
            }
        }
    }
}

/// One Aᵀ row of F(4×4, 3×3) over runs of tiles: output row `dy` of `Σ_k Aᵀ[dy][k] · x_k` with
/// Aᵀ = [[1, 1, 1, 1, 1, 0], [0, 1, −1, 2, −2, 0], [0, 1, 1, 4, 4, 0], [0, 1, −1, 8, −8, 1]].
#[inline(always)]
pub(crate) fn transform_a(dy: usize, x: [&[f32]; 6], out: &mut [f32]) {
    let n = out.len();
    let (x0, x1, x2, x3, x4, x5) = (&x[0][..n], &x[1][..n], &x[2][..n], &x[3][..n], &x[4][..n], &x[5][..n]);
    match dy {
        0 => {
            for t in 0..n {
                out[t] = (x0[t] + x1[t] + x2[t]) + (x3[t] + x4[t]);
            }
        }
        1 => {
            for t in 0..n {
                out[t] = (x1[t] - x2[t]) + 2.0 * (x3[t] - x4[t]);
            }
        }
        2 => {
            for t in 0..n {
                out[t] = (x1[t] + x2[t]) + 4.0 * (x3[t] + x4[t]);
            }
        }
        _ => {
            for t in 0..n {
                out[t] = ((x1[t] - x2[t]) + 8.0 * (x3[t] - x4[t])) + x5[t];
            }
        }
    }
}

/// Output row dy ∈ 0..4 of a tile row of F(4×4, 3×3): (Aᵀ m A) row dy, pixel (dy, dx) of tile tx to
/// `row[4tx + dx]`; m[e] of tile tx at `m[at + e·e_stride + tx]`. `tmp` (18·tw floats) holds the six
/// columns of row dy of Aᵀ m, the four pixel columns, two interleaved pairs of them, then the row
/// (`tmp[14·tw..18·tw]`).
#[inline(always)]
fn output_transform4(level: Isa, m: &[f32], at: usize, e_stride: usize, tw: usize, dy: usize, tmp: &mut [f32]) {
    let me = |e: usize| &m[at + e * e_stride..][..tw];
    let (cols, rest) = tmp.split_at_mut(6 * tw);
    for (j, dst) in cols.chunks_exact_mut(tw).enumerate() {
        transform_a(dy, [me(j), me(6 + j), me(12 + j), me(18 + j), me(24 + j), me(30 + j)], dst);
    }
    let (px, rest) = rest.split_at_mut(4 * tw);
    let col = |j: usize| &cols[j * tw..(j + 1) * tw];
    let x = [col(0), col(1), col(2), col(3), col(4), col(5)];
    for (dx, dst) in px.chunks_exact_mut(tw).enumerate() {
        transform_a(dx, x, dst);
    }
    // Pixel 4tx + dx: interleave (dx 0, dx 2) and (dx 1, dx 3), then those two.
    let (pairs, row) = rest.split_at_mut(4 * tw);
    let (e02, e13) = pairs.split_at_mut(2 * tw);
    interleave(level, &px[..tw], &px[2 * tw..3 * tw], e02);
    interleave(level, &px[tw..2 * tw], &px[3 * tw..4 * tw], e13);
    interleave(level, e02, e13, &mut row[..4 * tw]);
}

crate::cpu::isa::avx_dispatch!(input_transform4_fast, input_transform4_avx2, input_transform4_avx512, input_transform4, (level: Isa, input: &[f32], h: usize, w: usize, ty: usize, tw: usize, split: &mut Vec<f32>, rt: &mut Vec<f32>, v: &mut [f32], at: usize, e_stride: usize));
crate::cpu::isa::avx_dispatch!(output_transform4_fast, output_transform4_avx2, output_transform4_avx512, output_transform4, (level: Isa, m: &[f32], at: usize, e_stride: usize, tw: usize, dy: usize, tmp: &mut [f32]));
crate::cpu::isa::avx_dispatch!(input_transform_fast, input_transform_avx2, input_transform_avx512, input_transform, (level: Isa, input: &[f32], h: usize, w: usize, ty: usize, tw: usize, split: &mut Vec<f32>, rt: &mut Vec<f32>, v: &mut [f32], at: usize, e_stride: usize));
crate::cpu::isa::avx_dispatch!(output_transform_fast, output_transform_avx2, output_transform_avx512, output_transform, (level: Isa, m: &[f32], at: usize, e_stride: usize, tw: usize, dy: usize, tmp: &mut [f32]));

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Act;
    use std::sync::atomic::Ordering;

    /// The measured rule: F(4×4) from 128 input channels on the AVX2 kernel, from 129 on AVX-512, up to
    /// 256 and on maps at least 40 wide; F(2×2) elsewhere the path applies. (Read without `set_f4_from`,
    /// which would change other tests' paths while they run.)
    #[test]
    fn f4_from_128_channels_at_avx2_and_129_at_avx512() {
        if mode() != WinogradMode::Auto {
            eprintln!("RETINAFACE_CPU_WINOGRAD forces a mode: the rule is not in force, not checked");
            return;
        }
        let mut rnd = crate::cpu::conv::tests::uniform(5);
        let mut tile = |cin: usize, w: usize, kernel: Simd| {
            let conv = Conv::with_values("t", [cin, 128, 3, 1, 1], Act::None, &mut rnd);
            choose(&conv, w, w, kernel)
        };
        assert_eq!((f4_from(Simd::Avx2), f4_from(Simd::Avx512)), (128, 129));
        for (cin, w, avx2, avx512) in [
            (64, 160, Tile::F2, Tile::F2),
            (128, 80, Tile::F4, Tile::F2),
            (128, 20, Tile::F2, Tile::F2),
            (256, 40, Tile::F4, Tile::F4),
            (512, 40, Tile::F2, Tile::F2),
        ] {
            assert_eq!(tile(cin, w, Simd::Avx2), Some(avx2), "{cin} channels, {w}² at AVX2");
            assert_eq!(tile(cin, w, Simd::Avx512), Some(avx512), "{cin} channels, {w}² at AVX-512");
        }
    }

    /// Both schedules run the same sums in the same order (per tile, per input channel, the same
    /// reduction passes), so they agree bit for bit, at every level and with each tile; and both match
    /// the reference. Other tests running meanwhile see a forced schedule, which changes no value.
    #[test]
    fn whole_image_schedule_equals_bands_bit_for_bit() {
        let mut rnd = crate::cpu::conv::tests::uniform(3);
        // (n, cin, cout, h, w): several bands, output blocks not filling the tasks, odd sizes, a batch.
        for (n, cin, cout, h, w) in [(2, 40, 36, 13, 11), (1, 300, 64, 9, 30), (1, 8, 8, 1, 1)] {
            let conv = Conv {
                out_channel_offset: 1,
                ..Conv::with_values("t", [cin, cout, 3, 1, 1], Act::Leaky(0.1), &mut rnd)
            };
            let x: Vec<f32> = (0..n * cin * h * w).map(|_| rnd()).collect();
            let res: Vec<f32> = (0..n * cout * h * w).map(|_| rnd()).collect();
            let oc = cout + 2;
            let mut want = vec![0.0; n * oc * h * w];
            crate::reference::conv2d(&conv, &x, n, h, w, &mut want, oc, Some(&res));
            for level in Isa::supported_levels().into_iter().filter(|l| handles(&conv, *l)) {
                for tile in [Tile::F2, Tile::F4] {
                    let run = |schedule: u8| {
                        FORCED_SCHEDULE.store(schedule, Ordering::Relaxed);
                        let mut out = vec![f32::NAN; n * oc * h * w];
                        conv_on(level, tile, &conv, &x, n, h, w, &mut out, oc, &res);
                        FORCED_SCHEDULE.store(0, Ordering::Relaxed);
                        out
                    };
                    let (bands, whole) = (run(1), run(2));
                    for (i, ((b, wh), e)) in bands.iter().zip(&whole).zip(&want).enumerate() {
                        let ch = (i / (h * w)) % oc;
                        let what = format!("{level:?} {tile:?} {cin}->{cout} {h}x{w} element {i}");
                        if ch == 0 || ch > cout {
                            assert!(b.is_nan() && wh.is_nan(), "{what}: outside the conv's channels");
                            continue;
                        }
                        assert_eq!(b.to_bits(), wh.to_bits(), "{what}: bands {b} vs whole image {wh}");
                        assert!((b - e).abs() <= 1e-3 * e.abs().max(1.0), "{what}: {b} vs reference {e}");
                    }
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn conv_on(
        l: Isa,
        t: Tile,
        c: &Conv,
        x: &[f32],
        n: usize,
        h: usize,
        w: usize,
        out: &mut [f32],
        oc: usize,
        r: &[f32],
    ) {
        let sinks = Sinks::one(super::super::common::SharedMut(out.as_mut_ptr()), oc, c);
        super::conv(l, t, c, x, n, h, w, sinks, Some(r));
    }
}
