//! 3×3 stride-1 convolutions (pad 1, dense) by Winograd's F(4×4, 3×3) in the channel-blocked layout
//! (NCHW16c), at the AVX-512 and AVX2 levels, for `cpu::dense_run`: the ResNets' 3×3s on 160²–20²
//! maps, which ran on the blocked direct path (~190 GFLOPS, one thread) or as NCHW islands whose
//! reorders ate Winograd's lead (and kept ResNet-18 and -34 out of the blocked layout).
//!
//! The transforms are those of `conv::winograd` (Bᵀ d B row by row then column by column, Aᵀ m A column
//! then row, the same f32 operations in the same order) with one 16-channel vector per element instead
//! of a run of tiles: in this layout a tile's 6×6 patch of a channel block is 36 whole vectors, so
//! nothing is split into phases or transposed. The sums over input channels are 36 GEMMs, one per
//! element e of the transformed tile, on the blocked 1x1 kernel (`blocked::pointwise_span`): the
//! transformed input of a band of tiles is e's "image" ([cin/16][tiles][16]), the transformed weights
//! G g Gᵀ its 1x1 weights, the products e's output ([cout/16][tiles][16]). The output transform adds
//! the bias (and the residual), applies the activation and writes the 4×4 pixels inside the map.
//!
//! Tasks: (image, band of tile rows), the band's transformed input and products (36·(cin + cout)
//! floats per tile) in a thread's buffer; within a band the GEMMs run element by element, so each
//! element's weights (cin·cout floats) are read once per band. Work per tile: 36·cin·cout multiply-adds
//! instead of 144 direct (4x fewer) plus the transforms (per 16 channels: 36 loads and ~200 vector
//! operations in, ~100 out). Rounding: F(4×4)'s, tested at 4e-6 of Σ|w·x| as the NCHW path is.

use super::blocked::{BLOCK, PointwiseWeights, Simd, Span, pointwise_span};
use super::conv::{SharedMut, aligned, transform_a, transform_b, transform_weight4};
use crate::graph::{Act, Conv};
use rayon::prelude::*;
use std::cell::RefCell;

/// Elements of a transformed tile: one GEMM each.
const ELEMS: usize = 36;

/// Bytes of transformed input and products a band holds at least: the band's GEMMs sweep them once per
/// element, from L2. A band holds up to twice the transformed weights' bytes where those are more, so
/// that re-reading every element's weights once per band costs at most half the band's own traffic:
/// per op in ResNet-50 (one thread, Sapphire Rapids-class VM), bands of 1 / 4 / 16 / 64 MiB ran the 64
/// channels at 160² (0.6 MiB of weights) in 5.3–6.0 / 5.8–6.6 / 6.6–8.6 / 6.8–10 ms, 128 at 80²
/// (2.4 MiB) in 5.1–5.2 / 4.7 / 4.8–5.5 / 4.6–5.0 ms, 256 at 40² (9.4 MiB) in 8.4–8.9 / 5.0–5.6 /
/// 4.5–4.8 / 4.2–4.7 ms, 512 at 20² (38 MiB) in 16.1 / 6.7–7.2 / 7.0–7.3 / 6.9–7.1 ms; the direct
/// path 9.8 / 9.6 / 7.7 (as NCHW islands) / 10.1 ms.
const BAND_BYTES: usize = 1 << 20;

/// Bytes a band holds at most (a thread's buffer): ResNet-50's 40² and 20² maps fit whole (7.4 and 3.7
/// MiB); on large images the 512-channel maps run in bands of this size rather than of 75 MiB.
const MAX_BAND_BYTES: usize = 16 << 20;

/// Whether this path computes `conv`: a dense 3×3 of stride 1 and padding 1.
pub fn handles(conv: &Conv) -> bool {
    (conv.kernel, conv.stride, conv.pad, conv.groups) == (3, 1, 1, 1)
}

/// A convolution's transformed weights, packed once: per element e, the cin × cout matrix (G g Gᵀ)[e]
/// as the blocked 1x1 kernel reads it (no bias, no activation: those come after the output transform).
pub struct WinogradWeights {
    cin: usize,
    cout: usize,
    act: Act,
    /// Per output channel, zeros past cout to the next block.
    bias: Vec<f32>,
    per_elem: Vec<PointwiseWeights>,
}

impl WinogradWeights {
    /// `conv`'s weights transformed for F(4×4, 3×3); `None` unless it is a dense 3×3 of stride 1 and
    /// padding 1.
    pub fn new(conv: &Conv) -> Option<WinogradWeights> {
        if !handles(conv) {
            return None;
        }
        let (cin, cout) = (conv.cin, conv.cout);
        let mut u = vec![vec![0.0f32; cout * cin]; ELEMS];
        for co in 0..cout {
            for ci in 0..cin {
                let t = transform_weight4(&conv.weight[(co * cin + ci) * 9..][..9]);
                for (e, v) in t.into_iter().enumerate() {
                    u[e][co * cin + ci] = v;
                }
            }
        }
        let zeros = vec![0.0; cout];
        let per_elem = u.iter().map(|m| PointwiseWeights::from_matrix(cin, cout, m, &zeros, Act::None)).collect();
        let mut bias = vec![0.0; cout.div_ceil(BLOCK) * BLOCK];
        bias[..cout].copy_from_slice(&conv.bias);
        Some(WinogradWeights { cin, cout, act: conv.act, bias, per_elem })
    }
}

thread_local! {
    /// A task's transformed input and products, reused across calls.
    static BAND: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Convolutions this process has run on this path, for tests that must know it was taken.
static CONVS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many convolutions this process has run on this path.
pub fn convs_taken() -> usize {
    CONVS.load(std::sync::atomic::Ordering::Relaxed)
}

/// `ww`'s convolution of `x` [n][cin/16][h·w][16] into `out` [n][cout/16][h·w][16], `residual` (the
/// output's layout) added before the activation.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3(
    simd: Simd,
    ww: &WinogradWeights,
    x: &[f32],
    n: usize,
    (h, w): (usize, usize),
    out: &mut [f32],
    residual: Option<&[f32]>,
) {
    simd.check();
    let (ib, ob) = (ww.cin.div_ceil(BLOCK), ww.cout.div_ceil(BLOCK));
    assert_eq!(x.len(), n * ib * BLOCK * h * w, "blocked winograd: input size");
    assert_eq!(out.len(), n * ob * BLOCK * h * w, "blocked winograd: output size");
    if let Some(r) = residual {
        assert_eq!(r.len(), out.len(), "blocked winograd: residual size");
    }
    CONVS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (th, tw) = (h.div_ceil(4), w.div_ceil(4));
    let per_row = ELEMS * (ib + ob) * BLOCK * tw * 4;
    let weights = ELEMS * ib * ob * BLOCK * BLOCK * 4;
    let budget = band_bytes_override().unwrap_or((2 * weights).clamp(BAND_BYTES, MAX_BAND_BYTES));
    let rows = (budget / per_row.max(1)).clamp(1, th);
    // Enough bands for the threads (each band re-reads every element's weights).
    let rows = rows.min(th.div_ceil(rayon::current_num_threads().div_ceil(n)).max(1));
    let bands = th.div_ceil(rows);
    let outp = SharedMut(out.as_mut_ptr());
    (0..n * bands).into_par_iter().for_each(|task| {
        let (b, band) = (task / bands, task % bands);
        let ty = band * rows..((band + 1) * rows).min(th);
        let tiles = ty.len() * tw;
        let (v_len, m_len) = (ELEMS * ib * BLOCK * tiles, ELEMS * ob * BLOCK * tiles);
        BAND.with(|buf| {
            let mut buf = buf.borrow_mut();
            let at = aligned(&mut buf, v_len + m_len);
            let (v, m) = buf[at..][..v_len + m_len].split_at_mut(v_len);
            let image = &x[b * ib * BLOCK * h * w..][..ib * BLOCK * h * w];
            input_transform_at(simd.isa(), image, ib, (h, w), ty.clone(), tw, v);
            let (v_e, m_e) = (ib * BLOCK * tiles, ob * BLOCK * tiles);
            for (e, pw) in ww.per_elem.iter().enumerate() {
                let span = Span {
                    x: v[e * v_e..].as_ptr(),
                    x_plane: tiles * BLOCK,
                    npix: tiles,
                    out: m[e * m_e..].as_mut_ptr(),
                    out_plane: tiles * BLOCK,
                    residual: None,
                };
                // SAFETY: the processor supports `simd` (checked); element e's input holds ib blocks
                // of `tiles` vectors and its products ob blocks, in this task's own buffer.
                unsafe { pointwise_span(simd, pw, &span) };
            }
            let base = b * ob * BLOCK * h * w;
            let r = residual.map(|r| &r[base..][..ob * BLOCK * h * w]);
            let ep = Epilogue { bias: &ww.bias, residual: r, act: ww.act };
            // SAFETY: image b's output planes lie in `out` (checked) and the band's output rows (tile
            // rows `ty`) are this task's alone.
            unsafe { output_transform_at(simd.isa(), m, ob, (h, w), ty, tw, &ep, outp.get().add(base)) };
        });
    });
}

/// `set_band_bytes`'s value, or 0: the rule at `BAND_BYTES`.
static BAND_OVERRIDE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Overrides the bytes a band holds for the whole process (`None`: back to the rule at `BAND_BYTES`), so
/// a benchmark can set it against the rule (benches/paired.rs `wband=KIB`) and a test can force bands
/// of one tile row.
pub fn set_band_bytes(bytes: Option<usize>) {
    BAND_OVERRIDE.store(bytes.map_or(0, |b| b.max(1)), std::sync::atomic::Ordering::Relaxed);
}

fn band_bytes_override() -> Option<usize> {
    match BAND_OVERRIDE.load(std::sync::atomic::Ordering::Relaxed) {
        0 => None,
        b => Some(b),
    }
}

/// What the output transform applies to each pixel: `act(y + bias [+ residual])`.
struct Epilogue<'a> {
    bias: &'a [f32],
    residual: Option<&'a [f32]>,
    act: Act,
}

/// Bᵀ d B for every tile of tile rows `ty` and every channel block of one image `x` ([ib][h·w][16]) into
/// `v` ([36][ib][tiles][16], tiles of the band row-major), the padding as zeros: for each of the six
/// patch rows the row transform over its six columns, then the column transform, into e = 6i + j.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn input_transform(x: &[f32], ib: usize, (h, w): (usize, usize), ty: std::ops::Range<usize>, tw: usize, v: &mut [f32]) {
    let tiles = ty.len() * tw;
    let e_stride = ib * BLOCK * tiles;
    let zero = [0.0f32; BLOCK];
    let mut rt = [[0.0f32; BLOCK]; ELEMS];
    for cb in 0..ib {
        let plane = &x[cb * h * w * BLOCK..][..h * w * BLOCK];
        for (r, y) in ty.clone().enumerate() {
            for tx in 0..tw {
                let t = r * tw + tx;
                for (pr, rows) in rt.chunks_exact_mut(6).enumerate() {
                    let iy = (4 * y + pr) as isize - 1;
                    if iy < 0 || iy as usize >= h {
                        rows.iter_mut().for_each(|v| *v = [0.0; BLOCK]);
                        continue;
                    }
                    let row = &plane[iy as usize * w * BLOCK..][..w * BLOCK];
                    let col = |c: usize| match (4 * tx + c).checked_sub(1) {
                        Some(ix) if ix < w => &row[ix * BLOCK..][..BLOCK],
                        _ => &zero[..],
                    };
                    let d = [col(0), col(1), col(2), col(3), col(4), col(5)];
                    for (i, out) in rows.iter_mut().enumerate() {
                        transform_b(i, d, out);
                    }
                }
                for j in 0..6 {
                    let d = [&rt[j][..], &rt[6 + j], &rt[12 + j], &rt[18 + j], &rt[24 + j], &rt[30 + j]];
                    for i in 0..6 {
                        let at = (6 * i + j) * e_stride + (cb * tiles + t) * BLOCK;
                        transform_b(i, d, &mut v[at..at + BLOCK]);
                    }
                }
            }
        }
    }
}

/// Aᵀ m A for every tile of tile rows `ty` and every output block from the products `m`
/// ([36][ob][tiles][16]), the epilogue applied, into the pixels of image `out` ([ob][h·w][16]) inside
/// the map: per output row dy the column transform of the six columns, then the row transform per dx.
///
/// # Safety
/// `out` must be valid for writes of the image's ob·h·w vectors, and no other thread may access the
/// pixels of tile rows `ty` while this runs.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn output_transform(
    m: &[f32],
    ob: usize,
    (h, w): (usize, usize),
    ty: std::ops::Range<usize>,
    tw: usize,
    ep: &Epilogue,
    out: *mut f32,
) {
    #[inline(always)]
    fn store(px: &[f32; BLOCK], bias: &[f32], res: Option<&[f32]>, dst: &mut [f32], f: impl Fn(f32) -> f32) {
        match res {
            Some(r) => (0..BLOCK).for_each(|l| dst[l] = f(px[l] + bias[l] + r[l])),
            None => (0..BLOCK).for_each(|l| dst[l] = f(px[l] + bias[l])),
        }
    }
    let tiles = ty.len() * tw;
    let e_stride = ob * BLOCK * tiles;
    let mut cols = [[0.0f32; BLOCK]; 6];
    let mut px = [0.0f32; BLOCK];
    for cb in 0..ob {
        let bias = &ep.bias[cb * BLOCK..][..BLOCK];
        for (r, y) in ty.clone().enumerate() {
            for tx in 0..tw {
                let t = r * tw + tx;
                let me = |e: usize| &m[e * e_stride + (cb * tiles + t) * BLOCK..][..BLOCK];
                for dy in 0..4.min(h - 4 * y) {
                    for (j, c) in cols.iter_mut().enumerate() {
                        transform_a(dy, [me(j), me(6 + j), me(12 + j), me(18 + j), me(24 + j), me(30 + j)], c);
                    }
                    let x6 = [&cols[0][..], &cols[1], &cols[2], &cols[3], &cols[4], &cols[5]];
                    for dx in 0..4.min(w - 4 * tx) {
                        transform_a(dx, x6, &mut px);
                        let at = (cb * h * w + (4 * y + dy) * w + 4 * tx + dx) * BLOCK;
                        let res = ep.residual.map(|r| &r[at..at + BLOCK]);
                        // SAFETY: the caller's contract: pixel (4y + dy, 4tx + dx) lies in the image and
                        // in tile row y of this band.
                        let dst = unsafe { std::slice::from_raw_parts_mut(out.add(at), BLOCK) };
                        match ep.act {
                            Act::None => store(&px, bias, res, dst, |v| v),
                            Act::Leaky(0.0) => store(&px, bias, res, dst, |v| v.max(0.0)),
                            Act::Leaky(a) => store(&px, bias, res, dst, |v| if v >= 0.0 { v } else { v * a }),
                            Act::Relu6 => store(&px, bias, res, dst, |v| v.clamp(0.0, 6.0)),
                        }
                    }
                }
            }
        }
    }
}

crate::cpu::isa::avx_dispatch!(input_transform_at, input_transform_avx2, input_transform_avx512, input_transform, (x: &[f32], ib: usize, hw: (usize, usize), ty: std::ops::Range<usize>, tw: usize, v: &mut [f32]));
crate::cpu::isa::avx_dispatch!(unsafe output_transform_at, output_transform_avx2, output_transform_avx512, output_transform, (m: &[f32], ob: usize, hw: (usize, usize), ty: std::ops::Range<usize>, tw: usize, ep: &Epilogue, out: *mut f32));

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::blocked::{blocked_len, from_blocked, to_blocked};
    use crate::cpu::conv::tests::uniform;
    use crate::reference;

    /// Against `reference::conv2d` through the reorders, at F(4×4)'s bound (4e-6 of Σ|w·x| + |bias| +
    /// |residual| per output, as the NCHW path's test): maps whose sides are and are not multiples of
    /// 4 (partial tiles at the right and bottom), a map smaller than a tile, partial channel blocks, every
    /// activation, a residual, a batch, bands of one and several tile rows, at every level.
    #[test]
    fn blocked_winograd_matches_the_reference() {
        let sets = Simd::supported();
        if sets.is_empty() {
            eprintln!("no AVX2 or AVX-512 on this machine: the blocked Winograd path is not run");
            return;
        }
        let mut rnd = uniform(21);
        // (n, cin, cout, h, w, act, residual)
        let cases: [(usize, usize, usize, usize, usize, Act, bool); 6] = [
            (1, 16, 64, 8, 8, Act::None, false),
            (2, 21, 37, 9, 13, Act::Leaky(0.1), true),
            (1, 64, 64, 22, 18, Act::Leaky(0.0), true),
            (1, 3, 5, 3, 2, Act::Relu6, false),
            (1, 130, 70, 10, 7, Act::Leaky(0.1), false),
            (3, 32, 16, 5, 6, Act::Leaky(0.0), true),
        ];
        for (n, cin, cout, h, w, act, with_res) in cases {
            let conv = Conv::with_values("wb", [cin, cout, 3, 1, 1], act, &mut rnd);
            assert_eq!(conv.pad, 1);
            let ww = WinogradWeights::new(&conv).expect("a 3x3 stride-1 conv");
            let x: Vec<f32> = (0..n * cin * h * w).map(|_| rnd() * 3.0).collect();
            let res: Option<Vec<f32>> = with_res.then(|| (0..n * cout * h * w).map(|_| rnd()).collect());
            let mut want = vec![0.0; n * cout * h * w];
            reference::conv2d(&conv, &x, n, h, w, &mut want, cout, res.as_deref());
            let abs = |v: &[f32]| v.iter().map(|x| x.abs()).collect::<Vec<f32>>();
            let abs_conv = Conv { weight: abs(&conv.weight), bias: abs(&conv.bias), act: Act::None, ..conv.clone() };
            let mut terms = vec![0.0; n * cout * h * w];
            reference::conv2d(&abs_conv, &abs(&x), n, h, w, &mut terms, cout, res.as_deref().map(abs).as_deref());
            for &simd in &sets {
                for band in [None, Some(1)] {
                    set_band_bytes(band);
                    let mut xb = vec![0.0; blocked_len(n, cin, h * w)];
                    to_blocked(simd, &x, n, cin, h * w, &mut xb);
                    let rb = res.as_ref().map(|r| {
                        let mut rb = vec![0.0; blocked_len(n, cout, h * w)];
                        to_blocked(simd, r, n, cout, h * w, &mut rb);
                        rb
                    });
                    let mut yb = vec![f32::NAN; blocked_len(n, cout, h * w)];
                    conv3x3(simd, &ww, &xb, n, (h, w), &mut yb, rb.as_deref());
                    set_band_bytes(None);
                    let mut got = vec![0.0; n * cout * h * w];
                    from_blocked(simd, &yb, n, cout, h * w, &mut got);
                    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                        let bound = 4e-6 * terms[i].max(1.0);
                        assert!(
                            (g - e).abs() <= bound,
                            "{simd:?} {cin}->{cout} {h}x{w} n{n} band {band:?}: element {i}: {g} vs {e} (bound {bound:e})"
                        );
                    }
                    // The padding channels: zero weights and biases give act(0 [+ 0]).
                    let blocks = cout.div_ceil(BLOCK);
                    for b in 0..n {
                        for ch in cout..blocks * BLOCK {
                            for p in 0..h * w {
                                let v = yb[((b * blocks + ch / BLOCK) * h * w + p) * BLOCK + ch % BLOCK];
                                assert_eq!(v, 0.0, "{simd:?}: padding channel {ch} pixel {p}");
                            }
                        }
                    }
                }
            }
        }
    }
}
