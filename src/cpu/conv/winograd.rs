//! 3×3 stride-1 convolutions (pad 1) by Winograd's F(2×2, 3×3), at the AVX2 and AVX-512 levels.
//!
//! Each 2×2 output tile is `Aᵀ [Σ_ci (G g G ᵀ) ⊙ (Bᵀ d B)] A` for the tile's 4×4 input patch d: 16
//! multiplies per tile and input channel instead of 36, 2.25x fewer. The sums over input channels are
//! 16 independent GEMMs (one per element e of the 4×4 transformed tile), run on the implicit-GEMM
//! micro-kernel: weights transformed and packed once per convolution as [16][cout/MR][cin][MR]
//! (`Conv::packed.winograd`), the transformed input of a band of tiles as 16 × cin planes (one row of the
//! B operand per input channel, tiles along it), and the products summed per e into a scratch from which
//! the output transform writes 2×2 pixels per tile with bias, residual and activation.
//!
//! Bands of tile rows per task keep the transformed input and the products (16·(cin + cout) floats per
//! tile) in L2. The transforms are vectorised along a tile row (adjacent tiles are adjacent lanes): the
//! input rows are split into even and odd columns, so tile tx reads columns 2tx − 1 … 2tx + 2 as
//! even[tx], odd[tx], even[tx + 1], odd[tx + 1] of the row padded by one zero.
//!
//! The transforms are exact in the sense of algebra, not of f32: results differ from the direct sum by
//! rounding a little larger than a change of summation order (the input transform adds and subtracts
//! up to four inputs, the weight transform halves). Tested against `reference::conv2d` at 1e-4.

use super::common::{SharedMut, store_epilogue_fast};
use super::igemm::{self, Kernel, conflict_free_stride};
use super::tile::{MR, NR};
use crate::cpu::isa::Isa;
use crate::cpu::rows::{deinterleave, interleave};
use crate::graph::Conv;
use rayon::prelude::*;

/// Floats of transformed input plus products per task (2 MiB): within L2 together with the weights'
/// current panel.
const BAND_BUDGET: usize = 1 << 19;

/// Whether `conv` is a convolution this path computes at `level`.
pub fn handles(conv: &Conv, level: Isa) -> bool {
    Kernel::for_isa(level).is_some() && conv.groups == 1 && conv.kernel == 3 && conv.stride == 1 && conv.pad == 1
}

/// Whether this path is the faster one for `conv` on an h×w input. Measured (`CONV_SHAPES_CLOCK=cpu
/// RAYON_NUM_THREADS=1 cargo bench --bench conv_shapes -- 3x3`, AVX-512 Xeon, against
/// `RETINAFACE_CPU_WINOGRAD=0`): 1.2–1.25x on 64–128 channels at 80²–160², 1.1x on 64 channels at 80²,
/// even at 256 channels on 40²; at 512 channels on 20² it is 0.75x, as its 16 transformed weight
/// matrices (16 MiB) stream from L3 for every band. The input transform costs per input channel and
/// the saving is per output channel: with fewer than 64 outputs (SSH's 32- and 16-channel branches)
/// it loses (0.65–0.85x in the network); and on small maps the micro-kernel's 48-tile columns are
/// mostly empty.
pub fn preferred(conv: &Conv, h: usize, w: usize) -> bool {
    enabled()
        && conv.cin >= 32
        && conv.cout >= 64
        && conv.cin * conv.cout <= 256 * 256
        && h.div_ceil(2) * w.div_ceil(2) >= NR
}

/// `RETINAFACE_CPU_WINOGRAD=0` turns this path off (read once), so a benchmark can compare it with the
/// implicit GEMM on the same machine in the same session.
fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("RETINAFACE_CPU_WINOGRAD").map_or(true, |v| v != "0"))
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

/// The weights transformed and packed as [16][cout/MR][cin][MR], rows past cout zero.
pub fn pack_weights(weight: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let blocks = cout.div_ceil(MR);
    let per_e = blocks * cin * MR;
    let mut packed = vec![0.0f32; 16 * per_e];
    for co in 0..cout {
        for ci in 0..cin {
            let u = transform_weight(&weight[(co * cin + ci) * 9..][..9]);
            for (e, v) in u.iter().enumerate() {
                packed[e * per_e + ((co / MR) * cin + ci) * MR + co % MR] = *v;
            }
        }
    }
    packed
}

/// The convolution of `conv::conv2d` by F(2×2, 3×3). Call only when `handles(conv, level)`.
#[allow(clippy::too_many_arguments)]
pub(super) fn conv(
    level: Isa,
    conv: &Conv,
    x: &[f32],
    n: usize,
    h: usize,
    w: usize,
    out: SharedMut,
    out_channels: usize,
    residual: Option<&[f32]>,
) {
    let Some(kernel) = Kernel::for_isa(level) else {
        unreachable!("winograd::conv at a level without a micro-kernel: `handles` was not checked")
    };
    assert!(kernel.isa().supported(), "winograd: the {kernel:?} kernel was chosen on a processor without it");
    let packed = conv.packed.winograd.get_or_init(|| pack_weights(&conv.weight, conv.cout, conv.cin));
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let blocks = conv.cout.div_ceil(MR);
    // Tile rows per band: the transformed input and the products within the budget, and enough bands
    // for the threads.
    let per_tile_row = 16 * (conv.cin + blocks * MR) * tw;
    let budget_rows = (BAND_BUDGET / per_tile_row.max(1)).clamp(1, th);
    let rows = band_rows(th, tw, budget_rows, n, rayon::current_num_threads());
    let bands = th.div_ceil(rows);
    let task = Band { level, kernel, conv, packed, x, h, w, tw, out, out_channels, residual };
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
    kernel: Kernel,
    conv: &'a Conv,
    packed: &'a [f32],
    x: &'a [f32],
    h: usize,
    w: usize,
    tw: usize,
    out: SharedMut,
    out_channels: usize,
    residual: Option<&'a [f32]>,
}

impl Band<'_> {
    /// Tile rows ty0..ty0+rows of image b.
    fn run(&self, b: usize, ty0: usize, rows: usize, s: &mut Scratch) {
        let (cin, cout, tw) = (self.conv.cin, self.conv.cout, self.tw);
        let tiles = rows * tw;
        let plane = conflict_free_stride(tiles);
        s.v.resize(16 * cin * plane, 0.0);
        for ci in 0..cin {
            let input = &self.x[(b * cin + ci) * self.h * self.w..][..self.h * self.w];
            for r in 0..rows {
                input_transform_fast(
                    self.level,
                    self.level,
                    input,
                    self.h,
                    self.w,
                    ty0 + r,
                    tw,
                    &mut s.split,
                    &mut s.rt,
                    &mut s.v,
                    ci * plane + r * tw,
                    cin * plane,
                );
            }
        }
        // The 16 GEMMs: m[e][co][t] = Σ_ci U[e][co][ci] · V[e][ci][t].
        let blocks = cout.div_ceil(MR);
        let ntiles = tiles.div_ceil(NR);
        let ld = ntiles * NR;
        s.m.resize(16 * blocks * MR * ld, 0.0);
        s.offsets.clear();
        s.offsets.extend((0..cin).map(|ci| (ci * plane) as u32));
        let per_e = blocks * cin * MR;
        for e in 0..16 {
            let v = &s.v[e * cin * plane..(e + 1) * cin * plane];
            let m = &mut s.m[e * blocks * MR * ld..(e + 1) * blocks * MR * ld];
            // SAFETY: `conv` checked that the processor runs the kernel; every B read lies at ci·plane +
            // px + lane with px + lane < tiles, inside v's planes.
            unsafe {
                igemm::gemm_tiles(self.kernel, &self.packed[e * per_e..], &s.offsets, v, tiles, ntiles, blocks, m, ld)
            };
        }
        for co in 0..cout {
            for r in 0..rows {
                self.output_row(b, co, ty0 + r, &s.m, (co * ld + r * tw, blocks * MR * ld), &mut s.rt);
            }
        }
    }

    /// Output rows 2ty and 2ty + 1 of channel co from the products of tile row ty (`at.0`: where its
    /// first tile's e = 0 product is, `at.1`: floats from one e to the next).
    fn output_row(&self, b: usize, co: usize, ty: usize, m: &[f32], at: (usize, usize), tmp: &mut Vec<f32>) {
        let (oh, ow, tw) = (self.h, self.w, self.tw);
        let plane = oh * ow;
        let c = self.conv;
        let res = self.residual.map(|r| &r[(b * c.cout + co) * plane..][..plane]);
        let base = (b * self.out_channels + c.out_channel_offset + co) * plane;
        for dy in 0..2 {
            let oy = 2 * ty + dy;
            if oy >= oh {
                break;
            }
            // Every slot is written by the transform: grown once, never cleared.
            tmp.resize(6 * tw, 0.0);
            output_transform_fast(self.level, self.level, m, at.0, at.1, tw, dy, tmp);
            // SAFETY: output row oy of this channel belongs to this task alone (its band of tile rows).
            let orow = unsafe { std::slice::from_raw_parts_mut(self.out.get().add(base + oy * ow), ow) };
            let res_row = res.map(|r| &r[oy * ow..(oy + 1) * ow]);
            store_epilogue_fast(self.level, &tmp[4 * tw..4 * tw + ow], orow, c.bias[co], res_row, c.act);
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
        // Padded columns 0 and past w: even[0], odd[tw], and even[tw] when w is odd.
        even[0] = 0.0;
        odd[tw] = 0.0;
        if w % 2 == 1 {
            even[tw] = 0.0;
        }
        deinterleave(level, src, odd, &mut even[1..]);
        if w % 2 == 1 {
            odd[w / 2] = src[w - 1];
        }
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

crate::cpu::isa::avx_dispatch!(input_transform_fast, input_transform_avx2, input_transform_avx512, input_transform, (level: Isa, input: &[f32], h: usize, w: usize, ty: usize, tw: usize, split: &mut Vec<f32>, rt: &mut Vec<f32>, v: &mut [f32], at: usize, e_stride: usize));
crate::cpu::isa::avx_dispatch!(output_transform_fast, output_transform_avx2, output_transform_avx512, output_transform, (level: Isa, m: &[f32], at: usize, e_stride: usize, tw: usize, dy: usize, tmp: &mut [f32]));
