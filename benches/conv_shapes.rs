//! Single convolutions of the shapes that dominate the networks at 640x640, on the CPU path the engine
//! picks (the AVX-512 or AVX2 implicit GEMM where the processor has it), as GFLOPS.
//!
//!     cargo bench --bench conv_shapes                               # the chosen paths
//!     RETINAFACE_CPU_ISA=avx2 cargo bench --bench conv_shapes       # the AVX2 + FMA kernel
//!     RETINAFACE_CPU_ISA=portable cargo bench --bench conv_shapes   # the portable paths, to compare
//!     RAYON_NUM_THREADS=1 cargo bench --bench conv_shapes           # one core
//!     cargo bench --bench conv_shapes -- layer3 layer4              # names containing these
//!
//! Best of 20 runs after a warm-up: on a shared machine the minimum is the figure least disturbed by
//! other tenants; run both variants back to back and compare ratios. `CONV_SHAPES_CLOCK=cpu` times by
//! the process's CPU time instead of the wall clock: with `RAYON_NUM_THREADS=1` that is the work alone,
//! which time-slicing with other processes on a loaded machine does not inflate.

use retinaface::cpu::conv::{conv2d, conv2d_pair, dwpw};
use retinaface::model::graph::{Act, Conv};
use retinaface::reference::out_size;
use std::time::Instant;

/// With `CONV_SHAPES_COLD=1`, evicts the caches before each timed run (writes 64 MiB), so the
/// weights and the input come from memory as they do inside a network's pass.
fn cool_caches() {
    static COLD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *COLD.get_or_init(|| std::env::var("CONV_SHAPES_COLD").is_ok_and(|v| v == "1")) {
        let mut junk = vec![1u8; 64 << 20];
        junk.iter_mut().step_by(64).for_each(|b| *b = b.wrapping_add(1));
        std::hint::black_box(&junk);
    }
}

/// The best of 20 timed runs of `f` after a warm-up, the caches evicted before each under
/// `CONV_SHAPES_COLD=1`.
fn best(f: &mut dyn FnMut()) -> f64 {
    f();
    (0..20)
        .map(|_| {
            cool_caches();
            let t = now();
            f();
            now() - t
        })
        .fold(f64::MAX, f64::min)
}

/// A convolution (pad k/2, bias 0.1) with deterministic weights in [−0.5, 0.5).
fn conv(name: &str, cin: usize, cout: usize, k: usize, stride: usize, groups: usize, act: Act) -> Conv {
    let mut i = 0usize;
    let mut weights = || {
        i += 1;
        ((i - 1) * 7919 % 1000) as f32 * 1e-3 - 0.5
    };
    Conv { bias: vec![0.1; cout], ..Conv::with_values(name, [cin, cout, k, stride, groups], act, &mut weights) }
}

/// A deterministic input of `len` values in [0, 1).
fn input(len: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * 104729) % 997) as f32 * 1e-3).collect()
}

/// Seconds on the clock `CONV_SHAPES_CLOCK` names: the wall clock (default) or the process's CPU time.
fn now() -> f64 {
    static CPU: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *CPU.get_or_init(|| std::env::var("CONV_SHAPES_CLOCK").is_ok_and(|v| v == "cpu")) {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime fills the timespec it is given.
        unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
        return ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9;
    }
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs_f64()
}

fn main() {
    // (what it is, cin, cout, kernel, stride, h, w); "dw" in the name makes it depthwise (groups = cin)
    let shapes = [
        ("ResNet 7x7 stem", 3, 64, 7, 2, 640, 640),
        ("ResNet layer1 3x3", 64, 64, 3, 1, 160, 160),
        ("ResNet layer2 3x3", 128, 128, 3, 1, 80, 80),
        ("ResNet layer3 3x3", 256, 256, 3, 1, 40, 40),
        ("ResNet layer4 3x3", 512, 512, 3, 1, 20, 20),
        ("ResNet layer2.0 3x3 s2", 64, 128, 3, 2, 160, 160),
        ("ResNet downsample 1x1 s2", 128, 256, 1, 2, 80, 80),
        ("ResNet-50 downsample 1x1 s2", 256, 512, 1, 2, 160, 160),
        ("ResNet-50 downsample 1x1 s2", 1024, 2048, 1, 2, 40, 40),
        ("ResNet-50 1x1 64->256", 64, 256, 1, 1, 160, 160),
        ("ResNet-50 1x1 256->64", 256, 64, 1, 1, 160, 160),
        ("ResNet-50 1x1 128->512", 128, 512, 1, 1, 80, 80),
        ("ResNet-50 1x1 256->1024", 256, 1024, 1, 1, 40, 40),
        ("ResNet-50 1x1 512->128", 512, 128, 1, 1, 80, 80),
        ("ResNet-50 1x1 1024->256", 1024, 256, 1, 1, 40, 40),
        ("ResNet-50 1x1 2048->512", 2048, 512, 1, 1, 20, 20),
        ("FPN merge 3x3", 128, 128, 3, 1, 80, 80),
        ("FPN merge 3x3 40x40", 128, 128, 3, 1, 40, 40),
        ("ResNet FPN merge 3x3", 256, 256, 3, 1, 80, 80),
        ("ResNet SSH conv3X3", 256, 128, 3, 1, 80, 80),
        ("ResNet SSH conv3X3 40x40", 256, 128, 3, 1, 40, 40),
        ("MobileNet stem 3x3 s2", 3, 32, 3, 2, 640, 640),
        ("MobileNetV1 1x1 32->64", 32, 64, 1, 1, 320, 320),
        ("MobileNetV1 1x1 128->128", 128, 128, 1, 1, 160, 160),
        ("MobileNetV1 1x1 512->512", 512, 512, 1, 1, 40, 40),
        ("x0.25 stem 3x3 s2", 3, 8, 3, 2, 640, 640),
        ("x0.25 dw 3x3 8ch", 8, 8, 3, 1, 320, 320),
        ("x0.25 pw 8->16", 8, 16, 1, 1, 320, 320),
        ("x0.25 dw 3x3 s2 16ch", 16, 16, 3, 2, 320, 320),
        ("x0.25 pw 16->32", 16, 32, 1, 1, 160, 160),
        ("x0.25 dw 3x3 32ch", 32, 32, 3, 1, 160, 160),
        ("x0.25 pw 32->32", 32, 32, 1, 1, 160, 160),
        ("x0.25 pw 64->64 40x40", 64, 64, 1, 1, 40, 40),
        ("x0.25 FPN merge 3x3 64", 64, 64, 3, 1, 80, 80),
        ("x0.25 FPN merge 3x3 64 40x40", 64, 64, 3, 1, 40, 40),
        ("x0.25 SSH 3x3 64->48", 64, 48, 3, 1, 80, 80),
        ("x1.0 SSH conv3X3", 128, 64, 3, 1, 80, 80),
        ("x1.0 SSH conv5X5_1", 128, 32, 3, 1, 80, 80),
        ("x1.0 SSH both as one", 128, 96, 3, 1, 80, 80),
        ("x0.25 FPN lateral 64->64", 64, 64, 1, 1, 80, 80),
        ("MobileNetV2 expand 16->96", 16, 96, 1, 1, 160, 160),
        ("MobileNetV2 expand 24->144", 24, 144, 1, 1, 80, 80),
        ("MobileNetV2 project 144->24", 144, 24, 1, 1, 80, 80),
        ("MobileNetV2 dw 3x3 144ch", 144, 144, 3, 1, 80, 80),
        ("MobileNetV2 expand 96->576", 96, 576, 1, 1, 40, 40),
        ("MobileNetV2 project 576->96", 576, 96, 1, 1, 40, 40),
        ("MobileNetV2 expand 160->960", 160, 960, 1, 1, 20, 20),
        ("MobileNetV2 project 960->160", 960, 160, 1, 1, 20, 20),
        ("MobileNetV2 1x1 320->1280", 320, 1280, 1, 1, 20, 20),
        ("x1.0 dw 3x3 128ch", 128, 128, 3, 1, 160, 160),
        ("x1.0 dw 3x3 512ch", 512, 512, 3, 1, 40, 40),
    ];
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    println!("{:<26} {:>22} {:>10} {:>8}", "conv", "shape", "best ms", "GFLOPS");
    for (what, cin, cout, k, s, h, w) in shapes {
        if !filter.is_empty() && !filter.iter().any(|f| what.contains(f.as_str())) {
            continue;
        }
        let groups = if what.contains(" dw ") { cin } else { 1 };
        let conv = conv(what, cin, cout, k, s, groups, Act::Leaky(0.0));
        let x = input(cin * h * w);
        let (oh, ow) = (out_size(h, k, s, k / 2), out_size(w, k, s, k / 2));
        let mut out = vec![0.0; cout * oh * ow];
        let flop = 2.0 * (cin / groups * cout * k * k * oh * ow) as f64;
        let best = best(&mut || conv2d(&conv, &x, 1, h, w, &mut out, cout, None));
        let shape = format!("{cin}->{cout} {k}x{k} s{s} {h}x{w}");
        println!("{what:<26} {shape:>22} {:>10.2} {:>8.1}", best * 1e3, flop / best * 1e-9);
    }
    dwpw_pairs(&filter);
    conv_pairs(&filter);
    blocked_pointwise(&filter);
    blocked_depthwise(&filter);
    bands(&filter);
    direct_co(&filter);
}

/// `len` zeros from a 64-byte boundary: the buffer and the boundary's index in it.
fn aligned_zeros(len: usize) -> (Vec<f32>, usize) {
    let v = vec![0.0f32; len + 16];
    let at = v.as_ptr().align_offset(64);
    (v, at)
}

/// The best of three timed calls of `f` after a warm-up.
fn best_of_3(f: &mut dyn FnMut()) -> f64 {
    f();
    (0..3)
        .map(|_| {
            let t = now();
            f();
            now() - t
        })
        .fold(f64::MAX, f64::min)
}

/// `rounds` paired rounds of `a` against `b` (each `best_of_3`, which goes first alternating), so a slow
/// spell of a shared machine falls on both sides of a round's ratio: the best time of each and the
/// rounds' ratios b / a, sorted.
fn paired(rounds: usize, a: &mut dyn FnMut(), b: &mut dyn FnMut()) -> (f64, f64, Vec<f64>) {
    let (mut best_a, mut best_b, mut ratios) = (f64::MAX, f64::MAX, Vec::with_capacity(rounds));
    for round in 0..rounds {
        let (ta, tb) = if round % 2 == 0 {
            let ta = best_of_3(a);
            (ta, best_of_3(b))
        } else {
            let tb = best_of_3(b);
            (best_of_3(a), tb)
        };
        best_a = best_a.min(ta);
        best_b = best_b.min(tb);
        ratios.push(tb / ta);
    }
    ratios.sort_by(f64::total_cmp);
    (best_a, best_b, ratios)
}

/// The 3×3 depthwise convolutions in the channel-blocked layout against the engine's NCHW path, paired
/// as `blocked_pointwise` does.
fn blocked_depthwise(filter: &[String]) {
    use retinaface::cpu::blocked::{DepthwiseWeights, blocked_len, depthwise3x3, to_blocked};
    let Some(simd) = retinaface::cpu::blocked::Simd::at(retinaface::cpu::isa()) else {
        return;
    };
    // (what, channels, stride, input h, w)
    let shapes = [
        ("blocked dw x0.25 8ch", 8, 1, 320, 320),
        ("blocked dw x0.25 16ch s2", 16, 2, 320, 320),
        ("blocked dw x0.25 64ch", 64, 1, 80, 80),
        ("blocked dw x1.0 32ch", 32, 1, 320, 320),
        ("blocked dw x1.0 64ch s2", 64, 2, 320, 320),
        ("blocked dw x1.0 128ch", 128, 1, 160, 160),
        ("blocked dw x1.0 256ch", 256, 1, 80, 80),
        ("blocked dw x1.0 256ch s2", 256, 2, 80, 80),
        ("blocked dw x1.0 512ch", 512, 1, 40, 40),
        ("blocked dw x1.0 1024ch", 1024, 1, 20, 20),
        ("blocked dw MobileNetV2 144ch", 144, 1, 80, 80),
    ];
    const ROUNDS: usize = 7;
    println!(
        "\n{:<30} {:>18} {:>8} {:>8} {:>8} {:>10}",
        "3x3 depthwise, NCHW16c vs NCHW", "shape", "blk ms", "NCHW ms", "speed-up", "range"
    );
    for (what, c, s, h, w) in shapes {
        if !filter.is_empty() && !filter.iter().any(|f| what.contains(f.as_str())) {
            continue;
        }
        let conv = conv(what, c, c, 3, s, c, Act::Leaky(0.1));
        let packed = DepthwiseWeights::new(&conv).expect("a 3x3 depthwise conv");
        let (oh, ow) = (out_size(h, 3, s, 1), out_size(w, 3, s, 1));
        let x = input(c * h * w);
        let (mut xb_buf, xo) = aligned_zeros(blocked_len(1, c, h * w));
        let (mut yb_buf, yo) = aligned_zeros(blocked_len(1, c, oh * ow));
        let xb = &mut xb_buf[xo..][..blocked_len(1, c, h * w)];
        let yb = &mut yb_buf[yo..][..blocked_len(1, c, oh * ow)];
        to_blocked(simd, &x, 1, c, h * w, xb);
        let mut out = vec![0.0; c * oh * ow];
        let (best_b, best_n, ratios) =
            paired(ROUNDS, &mut || depthwise3x3(simd, &packed, xb, 1, h, w, yb), &mut || {
                conv2d(&conv, &x, 1, h, w, &mut out, c, None)
            });
        let shape = format!("{c}ch s{s} {h}x{w}");
        println!(
            "{what:<30} {shape:>18} {:>8.2} {:>8.2} {:>7.2}x {:>4.2}-{:<4.2}",
            best_b * 1e3,
            best_n * 1e3,
            ratios[ROUNDS / 2],
            ratios[0],
            ratios[ROUNDS - 1]
        );
    }
}

/// The 1×1 convolutions in the channel-blocked layout (`cpu::blocked`, NCHW16c, AVX-512) against the
/// engine's NCHW path for the same convolution, in `paired` rounds: the speed-up is the median of the
/// rounds' ratios. The reorders into and out of the layout, which a
/// blocked executor would pay only at its edges, are timed apart.
fn blocked_pointwise(filter: &[String]) {
    use retinaface::cpu::blocked::{PointwiseWeights, blocked_len, from_blocked, pointwise, to_blocked};
    let Some(simd) = retinaface::cpu::blocked::Simd::at(retinaface::cpu::isa()) else {
        return;
    };
    // (what, cin, cout, h, w)
    let shapes = [
        ("blocked MobileNetV1 128->128", 128, 128, 160, 160),
        ("blocked MobileNetV1 256->256", 256, 256, 80, 80),
        ("blocked MobileNetV1 512->512", 512, 512, 40, 40),
        ("blocked MobileNetV1 1024->1024", 1024, 1024, 20, 20),
        ("blocked ResNet-50 64->256", 64, 256, 160, 160),
        ("blocked ResNet-50 256->64", 256, 64, 160, 160),
        ("blocked ResNet-50 256->128", 256, 128, 160, 160),
        ("blocked ResNet-50 128->512", 128, 512, 80, 80),
        ("blocked ResNet-50 512->128", 512, 128, 80, 80),
        ("blocked ResNet-50 1024->256", 1024, 256, 40, 40),
        ("blocked ResNet-50 2048->512", 2048, 512, 20, 20),
        ("blocked MobileNetV2 96->576", 96, 576, 40, 40),
        ("blocked MobileNetV2 576->96", 576, 96, 40, 40),
        ("blocked MobileNetV2 144->24", 144, 24, 80, 80),
        ("blocked FPN lateral 64->64", 64, 64, 80, 80),
    ];
    const ROUNDS: usize = 7;
    println!(
        "\n{:<30} {:>18} {:>8} {:>7} {:>8} {:>7} {:>8} {:>10} {:>9}",
        "1x1, NCHW16c vs NCHW", "shape", "blk ms", "GFLOPS", "NCHW ms", "GFLOPS", "speed-up", "range", "reorders"
    );
    for (what, cin, cout, h, w) in shapes {
        if !filter.is_empty() && !filter.iter().any(|f| what.contains(f.as_str())) {
            continue;
        }
        let npix = h * w;
        let conv = conv(what, cin, cout, 1, 1, 1, Act::Leaky(0.1));
        let packed = PointwiseWeights::new(&conv).expect("a 1x1 conv");
        let x = input(cin * npix);
        // Blocked tensors from a 64-byte boundary, as an executor's arena would place them.
        let (mut xb_buf, xo) = aligned_zeros(blocked_len(1, cin, npix));
        let (mut yb_buf, yo) = aligned_zeros(blocked_len(1, cout, npix));
        let xb = &mut xb_buf[xo..][..blocked_len(1, cin, npix)];
        let yb = &mut yb_buf[yo..][..blocked_len(1, cout, npix)];
        to_blocked(simd, &x, 1, cin, npix, xb);
        let mut out = vec![0.0; cout * npix];
        let (best_b, best_n, ratios) =
            paired(ROUNDS, &mut || pointwise(simd, &packed, xb, 1, npix, yb, None), &mut || {
                conv2d(&conv, &x, 1, h, w, &mut out, cout, None)
            });
        let reorders = best_of_3(&mut || {
            to_blocked(simd, &x, 1, cin, npix, xb);
            from_blocked(simd, yb, 1, cout, npix, &mut out);
        });
        let flop = 2.0 * (cin * cout * npix) as f64;
        let shape = format!("{cin}->{cout} {h}x{w}");
        println!(
            "{what:<30} {shape:>18} {:>8.2} {:>7.1} {:>8.2} {:>7.1} {:>7.2}x {:>4.2}-{:<4.2} {:>8.2}",
            best_b * 1e3,
            flop / best_b * 1e-9,
            best_n * 1e3,
            flop / best_n * 1e-9,
            ratios[ROUNDS / 2],
            ratios[0],
            ratios[ROUNDS - 1],
            reorders * 1e3
        );
    }
}

/// SSH's convolution pairs (two 3×3 convs of one input, `Op::ConvPair`): one GEMM over both weight sets
/// (`conv2d_pair`) against the two convolutions each on its own path, in the same run.
fn conv_pairs(filter: &[String]) {
    // (what, cin, first cout, second cout, h, w)
    let pairs = [
        ("x0.25 SSH pair 1", 64, 32, 16, 80, 80),
        ("x0.25 SSH pair 2", 16, 16, 16, 80, 80),
        ("x1.0 SSH pair 1", 128, 64, 32, 80, 80),
        ("x1.0 SSH pair 1 40x40", 128, 64, 32, 40, 40),
        ("x1.0 SSH pair 2", 32, 32, 32, 80, 80),
        ("ResNet SSH pair 1", 256, 128, 64, 80, 80),
        ("ResNet SSH pair 1 40x40", 256, 128, 64, 40, 40),
        ("ResNet SSH pair 2", 64, 64, 64, 80, 80),
    ];
    println!("\n{:<26} {:>22} {:>10} {:>10} {:>8}", "conv pair", "shape", "joint ms", "apart", "speed-up");
    for (what, cin, ca, cb, h, w) in pairs {
        if !filter.is_empty() && !filter.iter().any(|f| what.contains(f.as_str())) {
            continue;
        }
        let (a, b) = (conv(what, cin, ca, 3, 1, 1, Act::Leaky(0.0)), conv(what, cin, cb, 3, 1, 1, Act::Leaky(0.1)));
        let x = input(cin * h * w);
        let (mut ya, mut yb) = (vec![0.0; ca * h * w], vec![0.0; cb * h * w]);
        let joint = best(&mut || conv2d_pair(&a, &b, &x, 1, h, w, &mut ya, ca, &mut yb, cb));
        let apart = best(&mut || {
            conv2d(&a, &x, 1, h, w, &mut ya, ca, None);
            conv2d(&b, &x, 1, h, w, &mut yb, cb, None);
        });
        let shape = format!("{cin}->{ca}+{cb} {h}x{w}");
        println!("{what:<26} {shape:>22} {:>10.2} {:>10.2} {:>7.2}x", joint * 1e3, apart * 1e3, apart / joint);
    }
}

/// MobileNet depthwise + pointwise pairs: the fused path (`dwpw`) against the composition of the two
/// convolutions (each on its own path, the intermediate written to memory), in the same run.
fn dwpw_pairs(filter: &[String]) {
    // (what, channels, pointwise outputs, depthwise stride, input h, w)
    let pairs = [
        ("x0.25 stage1.1 dw+pw", 8, 16, 1, 320, 320),
        ("x0.25 stage1.2 dw+pw s2", 16, 32, 2, 320, 320),
        ("x0.25 stage1.3 dw+pw", 32, 32, 1, 160, 160),
        ("x0.25 stage1.5 dw+pw", 64, 64, 1, 80, 80),
        ("x0.25 stage2.1 dw+pw", 128, 128, 1, 40, 40),
        ("x0.25 stage3.1 dw+pw", 256, 256, 1, 20, 20),
        ("x1.0 stage1.1 dw+pw", 32, 64, 1, 320, 320),
        ("x1.0 stage1.2 dw+pw s2", 64, 128, 2, 320, 320),
        ("x1.0 stage1.3 dw+pw", 128, 128, 1, 160, 160),
        ("x1.0 stage1.4 dw+pw s2", 128, 256, 2, 160, 160),
        ("x1.0 stage1.5 dw+pw", 256, 256, 1, 80, 80),
        ("x1.0 stage2 dw+pw", 512, 512, 1, 40, 40),
        ("x1.0 stage3.1 dw+pw", 1024, 1024, 1, 20, 20),
    ];
    let level = retinaface::cpu::isa();
    println!(
        "\n{:<26} {:>22} {:>10} {:>10} {:>8}",
        "depthwise + pointwise", "shape", "fused ms", "composed", "speed-up"
    );
    for (what, c, cout, s, h, w) in pairs {
        if !filter.is_empty() && !filter.iter().any(|f| what.contains(f.as_str())) {
            continue;
        }
        let leaky = Act::Leaky(0.1);
        let (dw, pw) = (conv(what, c, c, 3, s, c, leaky), conv(what, c, cout, 1, 1, 1, leaky));
        if !dwpw::fuses(&dw, &pw, level) {
            println!("{what:<26} not fused at {level:?}");
            continue;
        }
        let x = input(c * h * w);
        let (oh, ow) = (out_size(h, 3, s, 1), out_size(w, 3, s, 1));
        let mut mid = vec![0.0; c * oh * ow];
        let mut out = vec![0.0; cout * oh * ow];
        let fused = best(&mut || dwpw::conv(level, &dw, &pw, &x, 1, h, w, &mut out, cout, None));
        let composed = best(&mut || {
            conv2d(&dw, &x, 1, h, w, &mut mid, c, None);
            conv2d(&pw, &mid, 1, oh, ow, &mut out, cout, None);
        });
        let shape = format!("{c}->{cout} s{s} {h}x{w}");
        println!("{what:<26} {shape:>22} {:>10.2} {:>10.2} {:>7.2}x", fused * 1e3, composed * 1e3, composed / fused);
    }
}

/// The depthwise-separable ops band by band (`cpu::bands`) against the same blocked kernels on whole
/// maps (expansion, depthwise and projection each writing its whole output), in `paired` rounds: the
/// speed-up is the median of the rounds' ratios. The engine's band choice, and bands of one and of 16
/// output rows beside it, on MobileNetV2's inverted residuals and MobileNetV1 x1.0's pairs.
fn bands(filter: &[String]) {
    use retinaface::cpu::bands::FusedOp;
    use retinaface::cpu::blocked::{
        DepthwiseWeights, PointwiseWeights, blocked_len, depthwise3x3, pointwise, to_blocked,
    };
    let Some(simd) = retinaface::cpu::blocked::Simd::at(retinaface::cpu::isa()) else {
        return;
    };
    // (what, cin, expanded (0: none), cout, stride, h, w, shortcut)
    let ops = [
        ("bands MobileNetV2 features.1", 32, 0, 16, 1, 320, 320, false),
        ("bands MobileNetV2 features.2", 16, 96, 24, 2, 320, 320, false),
        ("bands MobileNetV2 features.3", 24, 144, 24, 1, 160, 160, true),
        ("bands MobileNetV2 features.4", 24, 144, 32, 2, 160, 160, false),
        ("bands MobileNetV2 features.5", 32, 192, 32, 1, 80, 80, true),
        ("bands MobileNetV2 features.12", 96, 576, 96, 1, 40, 40, true),
        ("bands MobileNetV2 features.15", 160, 960, 160, 1, 20, 20, true),
        ("bands MobileNetV1 x1.0 pair 1", 32, 0, 64, 1, 320, 320, false),
        ("bands MobileNetV1 x1.0 pair 2", 64, 0, 128, 2, 320, 320, false),
        ("bands MobileNetV1 x1.0 pair 3", 128, 0, 128, 1, 160, 160, false),
        ("bands MobileNetV1 x1.0 pair 5", 256, 0, 256, 1, 80, 80, false),
    ];
    const ROUNDS: usize = 7;
    println!(
        "\n{:<30} {:>20} {:>6} {:>8} {:>8} {:>8} {:>10} {:>9} {:>9}",
        "band by band vs whole maps", "shape", "rows", "band ms", "whole ms", "speed-up", "range", "1 row", "16 rows"
    );
    for (what, cin, cm, cout, s, h, w, shortcut) in ops {
        if !filter.is_empty() && !filter.iter().any(|f| what.contains(f.as_str())) {
            continue;
        }
        let mid = if cm > 0 { cm } else { cin };
        let ex = (cm > 0).then(|| conv(what, cin, cm, 1, 1, 1, Act::Relu6));
        let dwc = conv(what, mid, mid, 3, s, mid, Act::Relu6);
        let pwc = conv(what, mid, cout, 1, 1, 1, Act::None);
        let exw = ex.as_ref().map(|c| PointwiseWeights::new(c).expect("a 1x1 conv"));
        let dww = DepthwiseWeights::new(&dwc).expect("a 3x3 depthwise conv");
        let pww = PointwiseWeights::new(&pwc).expect("a 1x1 conv");
        let (oh, ow) = (out_size(h, 3, s, 1), out_size(w, 3, s, 1));
        let n_x = blocked_len(1, cin, h * w);
        let (n_e, n_d, n_y) = (blocked_len(1, mid, h * w), blocked_len(1, mid, oh * ow), blocked_len(1, cout, oh * ow));
        let (mut bufs, at): (Vec<_>, Vec<_>) = [n_x, n_e, n_d, n_y].iter().map(|&len| aligned_zeros(len)).unzip();
        let [xb, eb, db, yb] = bufs.get_disjoint_mut([0, 1, 2, 3]).expect("four buffers");
        let (xb, eb, db, yb) =
            (&mut xb[at[0]..][..n_x], &mut eb[at[1]..][..n_e], &mut db[at[2]..][..n_d], &mut yb[at[3]..][..n_y]);
        to_blocked(simd, &input(cin * h * w), 1, cin, h * w, xb);
        let xb = &*xb;
        let fused = FusedOp::new(exw.as_ref(), &dww, &pww, 1, (h, w));
        let variants = [fused.band().rows, 1, 16]
            .map(|rows| FusedOp::new(exw.as_ref(), &dww, &pww, 1, (h, w)).with_band_rows(rows));
        let threads = rayon::current_num_threads();
        let slot = variants.iter().map(FusedOp::slot_floats).max().unwrap_or(0);
        let (mut slot_buf, so) = aligned_zeros(threads * slot);
        let slots = &mut slot_buf[so..][..threads * slot];
        // Per variant: its best time, the whole maps' best time, the rounds' ratios.
        let mut runs = Vec::new();
        for op in &variants {
            let mut out = vec![0.0; n_y];
            let residual = shortcut.then_some(xb);
            runs.push(paired(ROUNDS, &mut || op.run(simd, xb, &mut out, shortcut, slots, slot), &mut || {
                let dw_in: &[f32] = match &exw {
                    Some(e) => {
                        pointwise(simd, e, xb, 1, h * w, eb, None);
                        eb
                    }
                    None => xb,
                };
                depthwise3x3(simd, &dww, dw_in, 1, h, w, db);
                pointwise(simd, &pww, db, 1, oh * ow, yb, residual);
            }));
        }
        let whole = runs.iter().map(|r| r.1).fold(f64::MAX, f64::min);
        let ratios = &runs[0].2;
        let shape = format!("{cin}->{cm}->{cout} s{s} {h}x{w}");
        println!(
            "{what:<30} {shape:>20} {:>6} {:>8.2} {:>8.2} {:>7.2}x {:>4.2}-{:<4.2} {:>9.2} {:>9.2}",
            fused.band().rows,
            runs[0].0 * 1e3,
            whole * 1e3,
            ratios[ROUNDS / 2],
            ratios[0],
            ratios[ROUNDS - 1],
            runs[1].0 * 1e3,
            runs[2].0 * 1e3,
        );
    }
}

/// The direct path vectorised over output channels (`cpu::conv::direct_co`, AVX-512) against the path
/// the engine chooses without it, on the networks' dense convolutions (an SSH pair as its joint
/// convolution), in `paired` rounds: the speed-up is the median of the rounds' ratios.
fn direct_co(filter: &[String]) {
    // (what, cin, cout, k, stride, input h, w)
    let shapes = [
        ("direct_co stem x0.25", 3, 8, 3, 2, 640, 640),
        ("direct_co stem x0.5", 3, 16, 3, 2, 640, 640),
        ("direct_co stem x1.0/MobileNetV2", 3, 32, 3, 2, 640, 640),
        ("direct_co stem ResNet", 3, 64, 7, 2, 640, 640),
        ("direct_co x0.25 merge1", 64, 64, 3, 1, 80, 80),
        ("direct_co x0.25 merge2", 64, 64, 3, 1, 40, 40),
        ("direct_co x0.25 SSH1 pair", 64, 48, 3, 1, 80, 80),
        ("direct_co x0.25 SSH2 pair", 64, 48, 3, 1, 40, 40),
        ("direct_co x0.25 SSH3 pair", 64, 48, 3, 1, 20, 20),
        ("direct_co 128 merge1", 128, 128, 3, 1, 80, 80),
        ("direct_co 128 merge2", 128, 128, 3, 1, 40, 40),
        ("direct_co 128 SSH1 pair", 128, 96, 3, 1, 80, 80),
        ("direct_co 128 SSH2 pair", 128, 96, 3, 1, 40, 40),
        ("direct_co 128 SSH3 pair", 128, 96, 3, 1, 20, 20),
        ("direct_co 256 merge2", 256, 256, 3, 1, 40, 40),
        ("direct_co 256 SSH2 pair", 256, 192, 3, 1, 40, 40),
        ("direct_co 256 SSH3 pair", 256, 192, 3, 1, 20, 20),
        ("direct_co ResNet 64", 64, 64, 3, 1, 160, 160),
        ("direct_co ResNet 128", 128, 128, 3, 1, 80, 80),
        ("direct_co ResNet 256", 256, 256, 3, 1, 40, 40),
        ("direct_co ResNet 512", 512, 512, 3, 1, 20, 20),
        ("direct_co ResNet 64 s2", 64, 128, 3, 2, 160, 160),
        ("direct_co ResNet 128 s2", 128, 256, 3, 2, 80, 80),
        ("direct_co ResNet 256 s2", 256, 512, 3, 2, 40, 40),
        ("direct_co ResNet-50 128 s2", 128, 128, 3, 2, 160, 160),
        ("direct_co ResNet-50 256 s2", 256, 256, 3, 2, 80, 80),
        ("direct_co ResNet-50 512 s2", 512, 512, 3, 2, 40, 40),
        ("direct_co ResNet-50 1x1 64->256", 64, 256, 1, 1, 160, 160),
        ("direct_co ResNet-50 1x1 256->64", 256, 64, 1, 1, 160, 160),
        ("direct_co ResNet-50 1x1 128->512", 128, 512, 1, 1, 80, 80),
        ("direct_co ResNet-50 1x1 512->128", 512, 128, 1, 1, 80, 80),
        ("direct_co ResNet-50 1x1 256->1024", 256, 1024, 1, 1, 40, 40),
        ("direct_co ResNet-50 1x1 1024->256", 1024, 256, 1, 1, 40, 40),
        ("direct_co ResNet-50 1x1 512->2048", 512, 2048, 1, 1, 20, 20),
        ("direct_co ResNet-50 1x1 2048->512", 2048, 512, 1, 1, 20, 20),
        ("direct_co ResNet-50 downsample 2", 256, 512, 1, 2, 160, 160),
        ("direct_co ResNet-50 downsample 3", 512, 1024, 1, 2, 80, 80),
        ("direct_co ResNet-50 downsample 4", 1024, 2048, 1, 2, 40, 40),
    ];
    forced_vs_off(filter, "direct_co vs the chosen path", &shapes, retinaface::cpu::conv::set_direct_co_mode);
}

/// A path forced (`set(Force)`) against the engine's choice with it off, per shape, in `paired` rounds.
#[allow(clippy::type_complexity)]
fn forced_vs_off(
    filter: &[String],
    title: &str,
    shapes: &[(&str, usize, usize, usize, usize, usize, usize)],
    set: fn(Option<retinaface::cpu::conv::PathMode>),
) {
    use retinaface::cpu::conv::PathMode;
    // The forced paths (direct_co) exist at the AVX-512 and AVX2 levels.
    if retinaface::cpu::isa() == retinaface::cpu::Isa::Portable {
        return;
    }
    const ROUNDS: usize = 5;
    println!(
        "\n{:<32} {:>22} {:>8} {:>7} {:>8} {:>7} {:>8} {:>10}",
        title, "shape", "path ms", "GFLOPS", "else ms", "GFLOPS", "speed-up", "range"
    );
    for &(what, cin, cout, k, s, h, w) in shapes {
        if !filter.is_empty() && !filter.iter().any(|f| what.contains(f.as_str())) {
            continue;
        }
        let conv = conv(what, cin, cout, k, s, 1, Act::Leaky(0.1));
        let x = input(cin * h * w);
        let (oh, ow) = (out_size(h, k, s, k / 2), out_size(w, k, s, k / 2));
        let mut out = vec![0.0; cout * oh * ow];
        let mut out2 = vec![0.0; cout * oh * ow];
        let (best_d, best_p, ratios) = paired(
            ROUNDS,
            &mut || {
                set(Some(PathMode::Force));
                conv2d(&conv, &x, 1, h, w, &mut out, cout, None)
            },
            &mut || {
                set(Some(PathMode::Off));
                conv2d(&conv, &x, 1, h, w, &mut out2, cout, None)
            },
        );
        set(None);
        let worst = out.iter().zip(&out2).map(|(a, b)| (a - b).abs() / b.abs().max(1.0)).fold(0.0f32, f32::max);
        assert!(worst < 1e-3, "{what}: the two paths differ by {worst}");
        let flop = 2.0 * (cin * cout * k * k * oh * ow) as f64;
        let shape = format!("{cin}->{cout} {k}x{k} s{s} {h}x{w}");
        println!(
            "{what:<32} {shape:>22} {:>8.2} {:>7.1} {:>8.2} {:>7.1} {:>7.2}x {:>4.2}-{:<4.2}",
            best_d * 1e3,
            flop / best_d * 1e-9,
            best_p * 1e3,
            flop / best_p * 1e-9,
            ratios[ROUNDS / 2],
            ratios[0],
            ratios[ROUNDS - 1]
        );
    }
}
