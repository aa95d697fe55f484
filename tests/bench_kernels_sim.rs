//! `retinaface bench-kernels` in the simulation: every conv shape of a network listed with each f16
//! variant, each validated against the CPU reference, with the simulation's counters, and one variant
//! kept per shape (the heuristic, as there is no GPU to time).
#![cfg(feature = "cuda-sim")]

use retinaface::Network;
use retinaface::cuda::bench_kernels as bk;
use retinaface::cuda::conv_f16;
use retinaface::cuda::sim::SimRunner;
use retinaface::cuda::tune::{TuneCache, TuneMode};

#[test]
fn every_shape_of_a_network_validates_and_one_variant_is_kept() {
    let layers = bk::layers(Network::MobileNetV1_025, 64, 48, 2).unwrap();
    // 27 backbone convs + FPN/SSH; distinct shapes are fewer, but each conv is counted once.
    let convs: usize = layers.iter().map(|l| l.count).sum();
    assert!(convs >= 40, "only {convs} convs found");
    let mut r = SimRunner::new();
    let rows = bk::run(&mut r, None, &layers, 0, TuneMode::Full, &mut TuneCache::default()).unwrap();
    bk::check_rows(&rows).unwrap();
    for l in &layers {
        let mine: Vec<&bk::Row> = rows.iter().filter(|r| r.shape == l.describe()).collect();
        let expected = if l.depthwise() {
            1
        } else {
            conv_f16::VARIANTS.iter().filter(|v| retinaface::cuda::tune::supported(v, &l.shape(), 90)).count()
        };
        assert_eq!(mine.len(), expected, "{}", l.describe());
        let kept: Vec<&&bk::Row> = mine.iter().filter(|r| r.kept).collect();
        assert_eq!(kept.len(), 1, "{}: one kept variant", l.describe());
        if !l.depthwise() {
            assert_eq!(kept[0].variant, conv_f16::heuristic(&l.shape(), conv_f16::DEFAULT_SMS).name);
        }
        for row in mine {
            if row.variant.contains("_sk") {
                assert!(row.sim.is_none(), "split-K rows show no (reduce-kernel) counters");
                continue;
            }
            let c = row.sim.expect("simulation counters");
            assert!(c.global_requests > 0, "{} {}: no global loads counted", row.shape, row.variant);
            if !l.depthwise() {
                assert_eq!(c.bank_conflicts(), 0, "{} {}", row.shape, row.variant);
            }
        }
    }
    let text = bk::format(&rows, None);
    assert!(text.lines().count() == rows.len() + 1 && text.contains("conv_dw_f16") && text.contains("conv_f16_128x8"));
}

#[test]
fn cli_prints_the_table_in_the_simulation() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_retinaface"))
        .args(["bench-kernels", "--network", "mobilenetv1_0.25", "--size", "32x32", "--backend", "cuda-sim"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("on the CUDA simulation") && stdout.contains("conv_f16_64x64") && stdout.contains(" ok "));
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_retinaface"))
        .args(["bench-kernels", "--network", "mobilenetv1_0.25", "--precision", "f8", "--backend", "cuda-sim"])
        .output()
        .unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("--precision `f8`"));
}
