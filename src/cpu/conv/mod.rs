//! The CPU engine's convolution: the dispatch to its paths, each in its own file. Every path computes
//! `crate::reference::conv2d` up to f32 rounding; which one runs depends on the shape and the level.
//!
//! - `igemm` (+ `igemm_avx512`, `igemm_avx2`, `tile`): implicit GEMM, at the AVX-512 and AVX2 levels.
//! - `direct`: few taps per output. `shifted3x3`: 3×3 stride 1 as nine GEMMs. `gemm`: im2col + GEMM.
//! - `depthwise`: groups = channels. `common`: the output pointer, budgets and the epilogue.
//!
//! Threaded with rayon over independent output regions; every output element is computed by one task in
//! a fixed order, so results do not depend on the thread count.

mod common;
mod depthwise;
mod direct;
pub mod dwpw;
mod gemm;
mod igemm;
mod igemm_avx2;
mod igemm_avx512;
mod shifted3x3;
mod tile;
mod winograd;

use crate::cpu::isa::{Isa, isa};
use crate::graph::Conv;
use crate::reference::out_size;
use common::SharedMut;
use igemm::Kernel;

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

/// The ways `conv2d` computes a convolution; each gives the definition's values up to f32 rounding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConvPath {
    /// Implicit GEMM on an AVX-512 or AVX2 micro-kernel (`igemm`), for any dense convolution.
    Igemm(Kernel),
    /// 3×3 stride 1 by Winograd's F(2×2, 3×3) on the same micro-kernels (`winograd`).
    Winograd(Kernel),
    /// Few taps per output: direct accumulation, all output channels at once (`direct`).
    DirectSmall,
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
    let kernel = Kernel::for_isa(isa).filter(|_| igemm::preferred(conv) && igemm::fits(conv, h, w));
    let winograd = Kernel::for_isa(isa).filter(|_| winograd::handles(conv, isa) && winograd::preferred(conv, h, w));
    if conv.groups != 1 {
        ConvPath::Depthwise
    } else if let Some(kernel) = winograd {
        ConvPath::Winograd(kernel)
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
        ConvPath::Igemm(kernel) => igemm::conv(kernel, conv, x, n, h, w, out, out_channels, residual),
        ConvPath::Winograd(kernel) => winograd::conv(kernel.isa(), conv, x, n, h, w, out, out_channels, residual),
        ConvPath::DirectSmall => direct::conv(level, conv, x, n, h, w, oh, ow, out, out_channels, residual),
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
mod tests {
    use super::*;
    use crate::graph::Act;
    use crate::reference;

    #[test]
    fn every_conv_path_at_every_level_matches_the_reference() {
        let mut seed = 99u64;
        let mut rnd = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / 16777216.0) * 2.0 - 1.0
        };
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
        ];
        let levels = Isa::supported_levels();
        let kernels: Vec<Kernel> = levels.iter().filter_map(|&l| Kernel::for_isa(l)).collect();
        let mut exercised = std::collections::HashSet::new();
        let mut winograd_exercised = std::collections::HashSet::new();
        for (n, cin, cout, k, stride, groups, h, w, act, with_res, off) in cases {
            let conv = Conv {
                name: "test".into(),
                input: 0,
                output: 1,
                out_channel_offset: off,
                cin,
                cout,
                kernel: k,
                stride,
                pad: (k - 1) / 2,
                groups,
                weight: (0..cout * (cin / groups) * k * k).map(|_| rnd()).collect(),
                bias: (0..cout).map(|_| rnd()).collect(),
                residual: None,
                act,
                packed: Default::default(),
            };
            let x: Vec<f32> = (0..n * cin * h * w).map(|_| rnd() * 3.0).collect();
            let (oh, ow) = (reference::out_size(h, k, stride, conv.pad), reference::out_size(w, k, stride, conv.pad));
            let res: Option<Vec<f32>> = with_res.then(|| (0..n * cout * oh * ow).map(|_| rnd()).collect());
            let oc = cout + off + 1;
            let mut want = vec![f32::NAN; n * oc * oh * ow];
            reference::conv2d(&conv, &x, n, h, w, &mut want, oc, res.as_deref());
            // What every level this processor runs would choose, every portable path, and each
            // micro-kernel wherever it applies (not only where it is preferred).
            let mut paths: Vec<ConvPath> = levels.iter().map(|&l| choose_path(&conv, h, w, l)).collect();
            paths.extend(fallback_paths(&conv));
            if igemm::handles(&conv) && igemm::fits(&conv, h, w) {
                paths.extend(kernels.iter().map(|&k| ConvPath::Igemm(k)));
            }
            paths.extend(kernels.iter().filter(|k| winograd::handles(&conv, k.isa())).map(|&k| ConvPath::Winograd(k)));
            paths.dedup();
            // Each path with each level's element-wise loops (the AVX2 build of the epilogue and of the
            // direct and depthwise loops, or the baseline one).
            let runs = paths.iter().flat_map(|&p| levels.iter().map(move |&l| (p, l)));
            for (path, level) in runs {
                if let ConvPath::Igemm(k) = path {
                    exercised.insert(k.isa());
                }
                if let ConvPath::Winograd(k) = path {
                    winograd_exercised.insert(k.isa());
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
                    } else {
                        assert!(
                            (g - e).abs() <= 1e-4 * e.abs().max(1.0),
                            "{path:?} at {level:?} k{k} s{stride} g{groups} {h}x{w}: element {i}: {g} vs {e}"
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
            assert!(winograd_exercised.contains(&k.isa()), "Winograd on the {k:?} kernel was exercised");
        }
        println!("levels tested: {levels:?}");
    }

    #[test]
    fn each_level_chooses_only_its_own_kernel() {
        let conv = |cin, k, stride| Conv {
            name: "t".into(),
            input: 0,
            output: 1,
            out_channel_offset: 0,
            cin,
            cout: 16,
            kernel: k,
            stride,
            pad: k / 2,
            groups: 1,
            weight: vec![0.0; 16 * cin * k * k],
            bias: vec![0.0; 16],
            residual: None,
            act: Act::None,
            packed: Default::default(),
        };
        for c in [conv(3, 3, 2), conv(16, 1, 1), conv(8, 3, 1), conv(64, 3, 1)] {
            assert_eq!(choose_path(&c, 40, 40, Isa::Avx512), ConvPath::Igemm(Kernel::Avx512));
            assert_eq!(choose_path(&c, 40, 40, Isa::Avx2), ConvPath::Igemm(Kernel::Avx2));
            assert!(!matches!(choose_path(&c, 40, 40, Isa::Portable), ConvPath::Igemm(_)));
        }
        // 3x3 stride 1 with enough channels and pixels: Winograd on the level's own kernel.
        let c = Conv { cout: 64, weight: vec![0.0; 64 * 64 * 9], bias: vec![0.0; 64], ..conv(64, 3, 1) };
        assert_eq!(choose_path(&c, 40, 40, Isa::Avx512), ConvPath::Winograd(Kernel::Avx512));
        assert_eq!(choose_path(&c, 40, 40, Isa::Avx2), ConvPath::Winograd(Kernel::Avx2));
        assert!(!matches!(choose_path(&c, 40, 40, Isa::Portable), ConvPath::Winograd(_) | ConvPath::Igemm(_)));
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
