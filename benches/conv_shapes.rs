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
//! other tenants; run both variants back to back and compare ratios.

use retinaface::cpu::conv::conv2d;
use retinaface::model::graph::{Act, Conv};
use retinaface::reference::out_size;
use std::time::Instant;

fn main() {
    // (what it is, cin, cout, kernel, stride, h, w)
    let shapes = [
        ("ResNet 7x7 stem", 3, 64, 7, 2, 640, 640),
        ("ResNet layer1 3x3", 64, 64, 3, 1, 160, 160),
        ("ResNet layer2 3x3", 128, 128, 3, 1, 80, 80),
        ("ResNet layer3 3x3", 256, 256, 3, 1, 40, 40),
        ("ResNet layer4 3x3", 512, 512, 3, 1, 20, 20),
        ("ResNet layer2.0 3x3 s2", 64, 128, 3, 2, 160, 160),
        ("ResNet downsample 1x1 s2", 128, 256, 1, 2, 80, 80),
        ("FPN merge 3x3", 128, 128, 3, 1, 80, 80),
        ("MobileNet stem 3x3 s2", 3, 32, 3, 2, 640, 640),
        ("MobileNetV1 1x1 32->64", 32, 64, 1, 1, 320, 320),
        ("MobileNetV1 1x1 128->128", 128, 128, 1, 1, 160, 160),
        ("MobileNetV1 1x1 512->512", 512, 512, 1, 1, 40, 40),
    ];
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    println!("{:<26} {:>22} {:>10} {:>8}", "conv", "shape", "best ms", "GFLOPS");
    for (what, cin, cout, k, s, h, w) in shapes {
        if !filter.is_empty() && !filter.iter().any(|f| what.contains(f.as_str())) {
            continue;
        }
        let conv = Conv {
            name: what.into(),
            input: 0,
            output: 1,
            out_channel_offset: 0,
            cin,
            cout,
            kernel: k,
            stride: s,
            pad: k / 2,
            groups: 1,
            weight: (0..cout * cin * k * k).map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5).collect(),
            bias: vec![0.1; cout],
            residual: None,
            act: Act::Leaky(0.0),
            packed: Default::default(),
        };
        let x: Vec<f32> = (0..cin * h * w).map(|i| ((i * 104729) % 997) as f32 * 1e-3).collect();
        let (oh, ow) = (out_size(h, k, s, k / 2), out_size(w, k, s, k / 2));
        let mut out = vec![0.0; cout * oh * ow];
        let flop = 2.0 * (cin * cout * k * k * oh * ow) as f64;
        conv2d(&conv, &x, 1, h, w, &mut out, cout, None);
        let best = (0..20)
            .map(|_| {
                let t = Instant::now();
                conv2d(&conv, &x, 1, h, w, &mut out, cout, None);
                t.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min);
        let shape = format!("{cin}->{cout} {k}x{k} s{s} {h}x{w}");
        println!("{what:<26} {shape:>22} {:>10.2} {:>8.1}", best * 1e3, flop / best * 1e-9);
    }
}
