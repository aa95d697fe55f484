//! The CPU engine's convolution: the dispatch to its paths, each in its own file. Every path computes
//! `crate::reference::conv2d` up to f32 rounding; which one runs depends on the shape and the level.
//!
//! - `igemm` (+ `igemm_avx512`, `igemm_avx2`, `tile`): implicit GEMM, at the AVX-512 and AVX2 levels.
//! - `direct_co`: direct, vectorised over output channels (AVX-512): stems and small maps.
//! - `direct`: few taps per output. `shifted3x3`: 3×3 stride 1 as nine GEMMs. `gemm`: im2col + GEMM.
//! - `depthwise`: groups = channels. `common`: the output pointer, budgets and the epilogue.
//!
//! Threaded with rayon over independent output regions; every output element is computed by one task in
//! a fixed order, so results do not depend on the thread count.

mod common;
mod depthwise;
mod direct;
mod direct_co;
pub mod dwpw;
mod gemm;
mod igemm;
mod igemm_avx2;
mod igemm_avx512;
mod shifted3x3;
mod tile;
mod winograd;

pub use common::PathMode;
pub use direct_co::{set_mode as set_direct_co_mode, set_pool_mode as set_conv_pool_mode};
pub use winograd::{
    Tile as WinogradTile, WinogradMode, set_f4_from as set_winograd_f4_from, set_mode as set_winograd_mode,
};

use crate::cpu::isa::{Isa, Simd, isa};
use crate::graph::Conv;
use crate::reference::out_size;
pub(crate) use common::{ModeSwitch, SharedMut, aligned, min_tasks};
use common::{Sink, Sinks};
pub use direct_co::blocked_len;
#[cfg(test)]
pub(crate) use direct_co::pools_taken;
pub(crate) use direct_co::{
    conv_blocked, conv_max_pool, conv_max_pool_blocked, handles as handles_blocked, rows_blocked,
};
pub(crate) use winograd::{transform_a, transform_b, transform_weight4};

/// `crate::reference::conv2d` (same operands, same result up to f32 rounding) on the fastest path for
/// `conv` at the process's level (`isa()`).
///
/// `x` is [n, conv.cin, h, w]; `out` is [n, out_channels, oh, ow] with `out_channels ≥ off + cout`;
/// `residual`, if any, is [n, cout, oh, ow].
#[allow(clippy::too_many_arguments)] // the definition's operands and sizes, as every conv path takes them
pub fn conv2d(
    conv: &Conv,
    x: &[f32],
    n: usize,
    h: usize,
    w: usize,
    out: &mut [f32],
    out_channels: usize,
    residual: Option<&[f32]>,
) {
    let (k, s, p) = (conv.kernel, conv.stride, conv.pad);
    let (oh, ow) = (out_size(h, k, s, p), out_size(w, k, s, p));
    assert_eq!(x.len(), n * conv.cin * h * w, "conv {} input size", conv.name);
    assert_eq!(out.len(), n * out_channels * oh * ow, "conv {} output size", conv.name);
    assert!(conv.out_channel_offset + conv.cout <= out_channels);
    if let Some(r) = residual {
        assert_eq!(r.len(), n * conv.cout * oh * ow, "conv {} residual size", conv.name);
    }
    let level = isa();
    conv2d_on(choose_path(conv, h, w, level), level, conv, x, n, h, w, out, out_channels, residual);
}

/// Two convolutions of one input with the same geometry (`Op::ConvPair`: SSH's conv3X3 and conv5X5_1,
/// and its conv5X5_2 and conv7X7_2) as one GEMM over both weight sets, where the joint convolution
/// takes a micro-kernel path: the input is copied into planes or Winograd-transformed once, and the
/// joint output channels reach 64 where Winograd applies (conv5X5_1 alone has 16–64). Each conv's
/// channels go to its own tensor with its own activation and offset; neither may have a residual.
/// Elsewhere each conv runs on its own path. `out_a` and `out_b` are [n, oc_a or oc_b, oh, ow].
#[allow(clippy::too_many_arguments)]
pub fn conv2d_pair(
    a: &Conv,
    b: &Conv,
    x: &[f32],
    n: usize,
    h: usize,
    w: usize,
    out_a: &mut [f32],
    oc_a: usize,
    out_b: &mut [f32],
    oc_b: usize,
) {
    let same = (a.cin, a.kernel, a.stride, a.pad, a.groups) == (b.cin, b.kernel, b.stride, b.pad, b.groups);
    assert!(
        same && a.residual.is_none() && b.residual.is_none(),
        "conv pair {} + {}: not one geometry",
        a.name,
        b.name
    );
    let (k, s, p) = (a.kernel, a.stride, a.pad);
    let (oh, ow) = (out_size(h, k, s, p), out_size(w, k, s, p));
    assert_eq!(out_a.len(), n * oc_a * oh * ow, "conv {} output size", a.name);
    assert_eq!(out_b.len(), n * oc_b * oh * ow, "conv {} output size", b.name);
    assert!(a.out_channel_offset + a.cout <= oc_a && b.out_channel_offset + b.cout <= oc_b);
    conv2d_pair_at(isa(), a, b, x, n, h, w, out_a, oc_a, out_b, oc_b)
}

/// `conv2d_pair` at `level`.
#[allow(clippy::too_many_arguments)]
fn conv2d_pair_at(
    level: Isa,
    a: &Conv,
    b: &Conv,
    x: &[f32],
    n: usize,
    h: usize,
    w: usize,
    out_a: &mut [f32],
    oc_a: usize,
    out_b: &mut [f32],
    oc_b: usize,
) {
    let joint = a.packed.pair.get_or_init(|| Box::new(joint_conv(a, b)));
    let sink = |out: &mut [f32], out_channels, c: &Conv| Sink {
        out: SharedMut(out.as_mut_ptr()),
        out_channels,
        offset: c.out_channel_offset,
        act: c.act,
    };
    let sinks = Sinks::two(sink(out_a, oc_a, a), a.cout, sink(out_b, oc_b, b));
    match choose_path(joint, h, w, level) {
        ConvPath::Igemm(kernel) => igemm::conv(kernel, joint, x, n, h, w, sinks, None),
        ConvPath::Winograd(kernel, tile) => winograd::conv(kernel.isa(), tile, joint, x, n, h, w, sinks, None),
        ConvPath::DirectCo(kernel) => direct_co::conv(kernel, joint, x, n, h, w, sinks, None),
        _ => {
            conv2d_on(choose_path(a, h, w, level), level, a, x, n, h, w, out_a, oc_a, None);
            conv2d_on(choose_path(b, h, w, level), level, b, x, n, h, w, out_b, oc_b, None);
        }
    }
}

/// `a` and `b` as one convolution: b's output channels after a's (weights and biases concatenated).
fn joint_conv(a: &Conv, b: &Conv) -> Conv {
    Conv {
        name: format!("{} + {}", a.name, b.name),
        out_channel_offset: 0,
        cout: a.cout + b.cout,
        weight: [a.weight.as_slice(), b.weight.as_slice()].concat(),
        bias: [a.bias.as_slice(), b.bias.as_slice()].concat(),
        packed: Default::default(),
        ..a.clone()
    }
}

/// The ways `conv2d` computes a convolution; each gives the definition's values up to f32 rounding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConvPath {
    /// Implicit GEMM on an AVX-512 or AVX2 micro-kernel (`igemm`), for any dense convolution.
    Igemm(Simd),
    /// 3×3 stride 1 by Winograd's F(2×2, 3×3) on the same micro-kernels (`winograd`).
    Winograd(Simd, winograd::Tile),
    /// Few taps per output: direct accumulation, all output channels at once (`direct`).
    DirectSmall,
    /// Direct, vectorised over output channels (`direct_co`, AVX-512 or AVX2).
    DirectCo(Simd),
    /// 3×3 stride 1: nine shifted GEMMs on a padded plane (`shifted3x3`).
    Shifted3x3,
    /// im2col + GEMM, or GEMM straight on the input for 1×1 stride 1 (`gemm`).
    Im2colGemm,
    /// Groups = channels (`depthwise`).
    Depthwise,
}

/// The path for `conv` at level `isa` (which the caller has checked the processor supports).
fn choose_path(conv: &Conv, h: usize, w: usize, isa: Isa) -> ConvPath {
    let k = conv.kernel;
    let kernel = Simd::of(isa).filter(|_| igemm::preferred(conv) && igemm::fits(conv, h, w));
    let winograd = Simd::of(isa)
        .filter(|_| winograd::handles(conv, isa))
        .and_then(|k| winograd::choose(conv, h, w, k).map(|t| (k, t)));
    let direct_co = Simd::of(isa).filter(|&k| {
        direct_co::handles(conv, k)
            && match direct_co::mode() {
                PathMode::Force => true,
                PathMode::Off => false,
                PathMode::Auto => direct_co::preferred(conv, h, w, k),
            }
    });
    if conv.groups != 1 {
        ConvPath::Depthwise
    } else if let Some(kernel) = direct_co {
        ConvPath::DirectCo(kernel)
    } else if let Some((kernel, tile)) = winograd {
        ConvPath::Winograd(kernel, tile)
    } else if let Some(kernel) = kernel {
        ConvPath::Igemm(kernel)
    } else if conv.cin * k * k <= direct::MAX_TAPS {
        ConvPath::DirectSmall
    } else if k == 3 && conv.stride == 1 && conv.pad == 1 {
        ConvPath::Shifted3x3
    } else {
        ConvPath::Im2colGemm
    }
}

/// Whether `conv2d` at level `isa` computes `conv` on an `h`×`w` input with the direct path vectorised
/// over output channels (whose blocked build `conv_blocked` is), rather than Winograd or a GEMM.
pub(crate) fn prefers_direct(conv: &Conv, h: usize, w: usize, isa: Isa) -> bool {
    matches!(choose_path(conv, h, w, isa), ConvPath::DirectCo(_))
}

/// The instructions `conv_max_pool` (`conv_max_pool_blocked`) runs `conv` (on an h×w input) and the 3×3 stride-2 max-pool of its
/// output with at level `isa`, if it fuses them there: where the direct path computes the conv
/// (`prefers_direct`; anywhere it applies with `RETINAFACE_CPU_CONV_POOL=1`) and the epilogue commutes
/// with the maximum (`direct_co::pools`).
pub(crate) fn max_pool_kernel(conv: &Conv, h: usize, w: usize, isa: Isa) -> Option<Simd> {
    let simd = Simd::of(isa).filter(|&k| direct_co::handles(conv, k) && direct_co::pools(conv))?;
    match direct_co::pool_mode() {
        PathMode::Off => None,
        PathMode::Force => Some(simd),
        PathMode::Auto => prefers_direct(conv, h, w, isa).then_some(simd),
    }
}

#[allow(clippy::too_many_arguments)]
fn conv2d_on(
    path: ConvPath,
    level: Isa,
    conv: &Conv,
    x: &[f32],
    n: usize,
    h: usize,
    w: usize,
    out: &mut [f32],
    out_channels: usize,
    residual: Option<&[f32]>,
) {
    let (k, s, p) = (conv.kernel, conv.stride, conv.pad);
    let (oh, ow) = (out_size(h, k, s, p), out_size(w, k, s, p));
    let out = SharedMut(out.as_mut_ptr());
    match path {
        ConvPath::Igemm(kernel) => igemm::conv(kernel, conv, x, n, h, w, Sinks::one(out, out_channels, conv), residual),
        ConvPath::Winograd(kernel, tile) => {
            winograd::conv(kernel.isa(), tile, conv, x, n, h, w, Sinks::one(out, out_channels, conv), residual)
        }
        ConvPath::DirectSmall => direct::conv(level, conv, x, n, h, w, oh, ow, out, out_channels, residual),
        ConvPath::DirectCo(kernel) => {
            direct_co::conv(kernel, conv, x, n, h, w, Sinks::one(out, out_channels, conv), residual)
        }
        ConvPath::Shifted3x3 => shifted3x3::conv(level, conv, x, n, h, w, out, out_channels, residual),
        ConvPath::Im2colGemm => gemm::conv(level, conv, x, n, h, w, oh, ow, out, out_channels, residual),
        ConvPath::Depthwise => {
            assert!(
                conv.groups == conv.cin && conv.groups == conv.cout,
                "only depthwise grouped convolutions are used"
            );
            depthwise::conv(level, conv, x, n, h, w, oh, ow, out, out_channels, residual)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::graph::Act;
    use crate::reference;

    /// Uniform values in [−1, 1) from a fixed seed, for the conv paths' tests.
    pub(crate) fn uniform(mut seed: u64) -> impl FnMut() -> f32 {
        move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / 16777216.0) * 2.0 - 1.0
        }
    }

    #[test]
    fn every_conv_path_at_every_level_matches_the_reference() {
        let mut rnd = uniform(99);
        // (n, cin, cout, k, stride, groups, h, w, act, residual, channel offset within a wider output)
        let cases = [
            (2, 5, 7, 3, 1, 1, 9, 13, Act::Leaky(0.1), true, 3), // shifted 3x3 path, batch, residual, offset
            (1, 16, 33, 3, 1, 1, 17, 6, Act::Relu6, false, 0),   // shifted, odd sizes
            (2, 3, 8, 3, 2, 1, 11, 7, Act::Leaky(0.0), false, 0), // im2col, stride 2 (the MobileNet stem)
            (1, 3, 16, 7, 2, 1, 15, 9, Act::Leaky(0.0), false, 0), // 7x7 stem
            (2, 12, 20, 1, 1, 1, 5, 9, Act::None, true, 4),      // 1x1, few channels: direct path
            (2, 40, 20, 1, 1, 1, 5, 9, Act::None, true, 4),      // 1x1 GEMM straight on the input
            (1, 3, 5, 3, 1, 1, 6, 7, Act::Leaky(0.1), true, 1),  // 3x3 s1, 27 taps: direct path
            (1, 12, 20, 1, 2, 1, 9, 5, Act::None, false, 0),     // 1x1 stride 2, direct path
            (1, 64, 20, 1, 2, 1, 9, 5, Act::None, false, 0),     // 1x1 stride 2 (downsample), im2col GEMM
            (1, 8, 6, 3, 2, 1, 9, 9, Act::Leaky(0.1), false, 0), // 3x3 s2 with 72 taps: im2col GEMM
            (2, 10, 10, 3, 1, 10, 7, 11, Act::Relu6, true, 0),   // depthwise stride 1
            (1, 9, 9, 3, 2, 9, 8, 13, Act::Leaky(0.1), false, 2), // depthwise stride 2, odd width
            (1, 6, 6, 3, 1, 6, 5, 37, Act::Leaky(0.1), true, 0), // depthwise rows of two steps and an overlapping one
            (2, 4, 4, 3, 2, 4, 6, 45, Act::Relu6, false, 1),     // stride 2: one step and an overlapping one
            (1, 40, 27, 3, 1, 1, 8, 8, Act::Leaky(0.1), true, 1), // 3x3 with K = 360: two reduction passes
            (2, 300, 13, 1, 1, 1, 4, 8, Act::Relu6, false, 0),   // 1x1 over 32 pixels (copied planes), K = 300
            (1, 20, 14, 1, 1, 1, 8, 8, Act::None, true, 0),      // 1x1, 64 pixels: copied planes, few channels
            (1, 5, 30, 5, 2, 1, 13, 10, Act::Leaky(0.0), false, 0), // 5x5 stride 2: four phases, two taps deep
            (2, 24, 40, 3, 1, 1, 33, 35, Act::Leaky(0.1), true, 2), // 3x3 s1 where Winograd is preferred, odd sizes
            (1, 300, 20, 3, 1, 1, 7, 9, Act::Relu6, false, 0),   // Winograd with two reduction passes (KC)
            (1, 16, 16, 3, 1, 1, 1, 1, Act::None, true, 0),      // a single pixel: one tile, mostly padding
            (1, 64, 64, 3, 1, 1, 80, 80, Act::Leaky(0.1), false, 0), // the FPN merge shape, several bands
            (1, 3, 8, 3, 2, 1, 200, 200, Act::Leaky(0.1), false, 0), // a stem on a large map: per-task plane bands
            (1, 3, 5, 7, 2, 1, 61, 67, Act::Leaky(0.0), false, 0), // 7x7 stem, odd sizes
            (1, 70, 100, 3, 1, 1, 13, 11, Act::Leaky(0.1), true, 2), // direct_co: 2 passes, a partial 3-block tile
            (1, 130, 48, 3, 2, 1, 21, 19, Act::Relu6, false, 0), // direct_co: stride 2, 3 passes, 3 blocks
            (2, 3, 32, 3, 2, 1, 40, 41, Act::Leaky(0.1), false, 0), // a 32-channel stem: 2-block tiles of 12
            // Depthwise with the activation in the row kernel (no residual): stride 1 as one flat run
            // over the interior rows (edge columns recomputed), one vector wide, a single row, stride 2.
            (1, 5, 5, 3, 1, 5, 9, 21, Act::Leaky(0.1), false, 0),
            (2, 3, 3, 3, 1, 3, 6, 8, Act::Leaky(0.0), false, 1),
            (1, 2, 2, 3, 1, 2, 3, 5, Act::Relu6, false, 0),
            (1, 4, 4, 3, 1, 4, 1, 30, Act::Relu6, false, 0),
            (1, 3, 3, 3, 2, 3, 7, 40, Act::Leaky(0.0), false, 0),
            (1, 2, 2, 3, 1, 2, 40, 40, Act::None, false, 0),
        ];
        let levels = Isa::supported_levels();
        let kernels: Vec<Simd> = levels.iter().filter_map(|&l| Simd::of(l)).collect();
        let mut exercised = std::collections::HashSet::new();
        let mut winograd_exercised = std::collections::HashSet::new();
        for (n, cin, cout, k, stride, groups, h, w, act, with_res, off) in cases {
            let conv = Conv {
                out_channel_offset: off,
                ..Conv::with_values("test", [cin, cout, k, stride, groups], act, &mut rnd)
            };
            let x: Vec<f32> = (0..n * cin * h * w).map(|_| rnd() * 3.0).collect();
            let (oh, ow) = (reference::out_size(h, k, stride, conv.pad), reference::out_size(w, k, stride, conv.pad));
            let res: Option<Vec<f32>> = with_res.then(|| (0..n * cout * oh * ow).map(|_| rnd()).collect());
            let oc = cout + off + 1;
            let mut want = vec![f32::NAN; n * oc * oh * ow];
            reference::conv2d(&conv, &x, n, h, w, &mut want, oc, res.as_deref());
            // Σ|w·x| + |bias| + |residual| per output: the size of the terms an output sums, which bounds
            // the rounding of any summation order or transform (cancellation can make the result small).
            let abs = |v: &[f32]| v.iter().map(|x| x.abs()).collect::<Vec<f32>>();
            let abs_conv = Conv { weight: abs(&conv.weight), bias: abs(&conv.bias), act: Act::None, ..conv.clone() };
            let mut terms = vec![0.0; n * oc * oh * ow];
            reference::conv2d(&abs_conv, &abs(&x), n, h, w, &mut terms, oc, res.as_deref().map(abs).as_deref());
            // What every level this processor runs would choose, every portable path, and each
            // micro-kernel wherever it applies (not only where it is preferred).
            let mut paths: Vec<ConvPath> = levels.iter().map(|&l| choose_path(&conv, h, w, l)).collect();
            paths.extend(fallback_paths(&conv));
            if igemm::handles(&conv) && igemm::fits(&conv, h, w) {
                paths.extend(kernels.iter().map(|&k| ConvPath::Igemm(k)));
            }
            paths.extend(kernels.iter().filter(|&&k| direct_co::handles(&conv, k)).map(|&k| ConvPath::DirectCo(k)));
            for tile in [winograd::Tile::F2, winograd::Tile::F4] {
                let with = kernels.iter().filter(|k| winograd::handles(&conv, k.isa()));
                paths.extend(with.map(|&k| ConvPath::Winograd(k, tile)));
            }
            paths.dedup();
            // Each path with each level's element-wise loops (the AVX2 build of the epilogue and of the
            // direct and depthwise loops, or the baseline one).
            let runs = paths.iter().flat_map(|&p| levels.iter().map(move |&l| (p, l)));
            for (path, level) in runs {
                if let ConvPath::Igemm(k) = path {
                    exercised.insert(k.isa());
                }
                if let ConvPath::Winograd(k, tile) = path {
                    winograd_exercised.insert((k.isa(), tile));
                }
                let mut got = vec![f32::NAN; n * oc * oh * ow];
                conv2d_on(path, level, &conv, &x, n, h, w, &mut got, oc, res.as_deref());
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    let c = (i / (oh * ow)) % oc;
                    if c < off || c >= off + cout {
                        assert!(
                            g.is_nan(),
                            "{path:?} at {level:?} k{k} s{stride} g{groups}: channel {c} outside the conv was written"
                        );
                    } else if let ConvPath::Winograd(_, WinogradTile::F4) = path {
                        // F(4×4)'s transforms (entries up to 8 and 1/6) scale the rounding of the terms
                        // well beyond a direct sum's; 4e-6 of the terms' size is about 4x the worst
                        // seen in 200 random 128-channel tiles (1.05e-6 · Σ|w·x|, numpy, f32 against
                        // f64). A wrong transform entry errs by a sizeable fraction of the terms.
                        let bound = 4e-6 * terms[i].max(1.0);
                        assert!(
                            (g - e).abs() <= bound,
                            "{path:?} at {level:?} k{k} s{stride} {h}x{w}: element {i}: {g} vs {e} (bound {bound:e})"
                        );
                    } else {
                        // Relative to the result, or, where the terms cancel (a small sum of large terms),
                        // to the terms' size: no f32 summation order gets such an output closer than a
                        // few ulps of Σ|w·x| (seen: 0.1646 vs 0.1647 from terms of 2013, 5e-8 of them,
                        // F(2×2) over 300 channels). A wrong tap errs by about Σ|w·x| / taps.
                        let bound = (1e-4 * e.abs().max(1.0)).max(1e-6 * terms[i]);
                        assert!(
                            (g - e).abs() <= bound,
                            "{path:?} at {level:?} k{k} s{stride} g{groups} {h}x{w}: element {i}: {g} vs {e} (bound {bound:e})"
                        );
                    }
                }
            }
        }
        if !kernels.is_empty() {
            let modes = igemm::tests::planes_modes_used();
            assert!(modes.iter().all(|&m| m > 0), "every igemm plane mode (in place, whole, bands) ran: {modes:?}");
        }
        for k in &kernels {
            assert!(exercised.contains(&k.isa()), "the {k:?} kernel was exercised");
            for tile in [winograd::Tile::F2, winograd::Tile::F4] {
                assert!(
                    winograd_exercised.contains(&(k.isa(), tile)),
                    "Winograd {tile:?} on the {k:?} kernel was exercised"
                );
            }
        }
        println!("levels tested: {levels:?}");
    }

    #[test]
    fn each_level_chooses_only_its_own_kernel() {
        let conv = |cin, k, stride| Conv::with_values("t", [cin, 16, k, stride, 1], Act::None, &mut || 0.0);
        // The AVX-512 and AVX2 levels may also take the direct path vectorised over output channels
        // with their own instructions (on 40² maps, at AVX-512, for 3x3 stride 1 up to 128 input
        // channels; at AVX2 for the stride-2 stem).
        for c in [conv(3, 3, 2), conv(16, 1, 1), conv(8, 3, 1), conv(64, 3, 1)] {
            let at512 = choose_path(&c, 40, 40, Isa::Avx512);
            assert!(matches!(at512, ConvPath::Igemm(Simd::Avx512) | ConvPath::DirectCo(Simd::Avx512)), "{at512:?}");
            let at2 = choose_path(&c, 40, 40, Isa::Avx2);
            assert!(matches!(at2, ConvPath::Igemm(Simd::Avx2) | ConvPath::DirectCo(Simd::Avx2)), "{at2:?}");
            assert!(!matches!(choose_path(&c, 40, 40, Isa::Portable), ConvPath::Igemm(_) | ConvPath::DirectCo(_)));
        }
        // 3x3 stride 1 with enough channels and pixels: Winograd on the level's own kernel.
        let c = Conv { cout: 64, weight: vec![0.0; 64 * 64 * 9], bias: vec![0.0; 64], ..conv(64, 3, 1) };
        assert!(matches!(choose_path(&c, 80, 80, Isa::Avx512), ConvPath::Winograd(Simd::Avx512, _)));
        assert!(matches!(choose_path(&c, 80, 80, Isa::Avx2), ConvPath::Winograd(Simd::Avx2, _)));
        assert!(!matches!(choose_path(&c, 80, 80, Isa::Portable), ConvPath::Winograd(..) | ConvPath::Igemm(_)));
        // The direct path's rule: small maps and stride 2 at AVX-512, not 3x3 stride 1 at AVX2.
        assert_eq!(choose_path(&c, 20, 20, Isa::Avx512) == ConvPath::DirectCo(Simd::Avx512), Isa::Avx512.supported());
        assert_ne!(choose_path(&c, 20, 20, Isa::Avx2), ConvPath::DirectCo(Simd::Avx2));
        // Not for 1x1 stride 2 (ResNet-50's downsampling, where it measured 0.54-0.74x).
        let ds = Conv { cout: 512, weight: vec![0.0; 512 * 256], bias: vec![0.0; 512], ..conv(256, 1, 2) };
        assert_ne!(choose_path(&ds, 160, 160, Isa::Avx512), ConvPath::DirectCo(Simd::Avx512));
        assert_ne!(choose_path(&ds, 160, 160, Isa::Avx2), ConvPath::DirectCo(Simd::Avx2));
        // At AVX2 only stride-2 convolutions (16 output channels or more) take it.
        let s2 = Conv { cout: 128, weight: vec![0.0; 128 * 64 * 9], bias: vec![0.0; 128], ..conv(64, 3, 2) };
        assert_eq!(choose_path(&s2, 160, 160, Isa::Avx2) == ConvPath::DirectCo(Simd::Avx2), Isa::Avx2.supported());
    }

    /// A pair as one GEMM: each conv's channels in its own tensor at its offset with its activation,
    /// bit for bit what that conv alone gives on the path the joint conv takes (each output sums the
    /// same products in the same order), and the reference's within that path's bound; at every level,
    /// on joint convs that take the implicit GEMM, Winograd's F(2×2) and F(4×4), and the fallback.
    #[test]
    fn a_pair_as_one_gemm_equals_each_conv_alone() {
        let mut rnd = uniform(17);
        // (n, cin, a.cout, b.cout, k, h, w)
        let cases = [
            (2, 64, 32, 16, 3, 11, 13),  // joint 48 outputs: implicit GEMM
            (1, 128, 64, 32, 3, 41, 40), // Winograd F(4×4)
            (1, 32, 32, 32, 3, 24, 23),  // Winograd F(2×2)
            (1, 64, 24, 40, 1, 9, 10),   // 1×1 with 64 inputs: the GEMM crate, each conv on its own
        ];
        let mut paths_seen = std::collections::HashSet::new();
        for level in Isa::supported_levels() {
            for (n, cin, ca, cb, k, h, w) in cases {
                let mk = |cout: usize, act: Act, off: usize, rnd: &mut dyn FnMut() -> f32| Conv {
                    out_channel_offset: off,
                    ..Conv::with_values(&format!("c{cout}"), [cin, cout, k, 1, 1], act, rnd)
                };
                let a = mk(ca, Act::Leaky(0.0), 2, &mut rnd);
                let b = mk(cb, Act::Leaky(0.1), 0, &mut rnd);
                let x: Vec<f32> = (0..n * cin * h * w).map(|_| rnd()).collect();
                let (oc_a, oc_b) = (ca + 3, cb);
                let (mut got_a, mut got_b) = (vec![f32::NAN; n * oc_a * h * w], vec![f32::NAN; n * oc_b * h * w]);
                conv2d_pair_at(level, &a, &b, &x, n, h, w, &mut got_a, oc_a, &mut got_b, oc_b);
                let path = choose_path(&joint_conv(&a, &b), h, w, level);
                paths_seen.insert(match path {
                    ConvPath::Igemm(_) => "implicit GEMM",
                    ConvPath::Winograd(..) => "Winograd",
                    _ => "each conv on its own",
                });
                for (c, got, oc) in [(&a, &got_a, oc_a), (&b, &got_b, oc_b)] {
                    let mut want = vec![f32::NAN; n * oc * h * w];
                    reference::conv2d(c, &x, n, h, w, &mut want, oc, None);
                    let alone_path = match path {
                        ConvPath::Igemm(_) | ConvPath::Winograd(..) => path,
                        _ => choose_path(c, h, w, level),
                    };
                    let mut alone = vec![f32::NAN; n * oc * h * w];
                    conv2d_on(alone_path, level, c, &x, n, h, w, &mut alone, oc, None);
                    let f4 = matches!(path, ConvPath::Winograd(_, WinogradTile::F4));
                    for (i, ((g, e), s)) in got.iter().zip(&want).zip(&alone).enumerate() {
                        let ch = (i / (h * w)) % oc;
                        let what = format!("{level:?} {path:?} {} element {i} (channel {ch})", c.name);
                        if ch < c.out_channel_offset || ch >= c.out_channel_offset + c.cout {
                            assert!(g.is_nan(), "{what}: written outside the conv's channels");
                            continue;
                        }
                        assert_eq!(g.to_bits(), s.to_bits(), "{what}: pair {g} vs the conv alone {s}");
                        // F(4×4)'s bound is the per-path test's, in terms of Σ|w·x| (here at most cin·k²).
                        let bound = if f4 { 4e-6 * (cin * k * k) as f32 } else { 1e-4 * e.abs().max(1.0) };
                        assert!((g - e).abs() <= bound, "{what}: {g} vs reference {e}");
                    }
                }
            }
        }
        if Isa::supported_levels().iter().any(|l| Simd::of(*l).is_some()) {
            assert_eq!(paths_seen.len(), 3, "the joint conv took each kind of path: {paths_seen:?}");
        }
    }

    /// Every path other than the micro-kernels that computes `conv` (what the portable level runs).
    fn fallback_paths(conv: &Conv) -> Vec<ConvPath> {
        if conv.groups != 1 {
            return vec![ConvPath::Depthwise];
        }
        let mut paths = vec![ConvPath::Im2colGemm];
        if conv.cin * conv.kernel * conv.kernel <= direct::MAX_TAPS {
            paths.push(ConvPath::DirectSmall);
        }
        if conv.kernel == 3 && conv.stride == 1 && conv.pad == 1 {
            paths.push(ConvPath::Shifted3x3);
        }
        paths
    }
}
