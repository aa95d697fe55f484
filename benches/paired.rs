//! Two settings of the CPU paths' switches timed against each other in one process, pass by pass:
//! each round runs one forward pass under each setting (alternating which goes first), and the
//! figure is the median of the rounds' time ratios, with its quartiles. A shared machine's slow
//! spells (this project's 2-vCPU VM moves the same op 10–20% between processes) fall on both
//! settings of a round alike, where separate processes measured minutes apart see them on one side.
//!
//!     cargo bench --bench paired -- A B [--rounds N] [NETWORK...]
//!
//! A and B are comma-separated `switch=value` lists (`auto`: every switch at its measured rule):
//! `winograd=auto|off|f2|f4`, `f4from=CHANNELS` (the fewest input channels for F(4×4)),
//! `directco=auto|off|force`, `blocked=on|off`, `dense=on|off`, `convpool=auto|off|force` (the
//! stem's fused max-pool), `island=PIXELS` (with `bwino=off`, at AVX-512, the largest output map a
//! dense run's Winograd convolution leaves the blocked direct path for the NCHW paths on),
//! `bwino=auto|on|off` (a dense run's 3x3s by Winograd in the blocked layout), `wband=KIB` (the bytes
//! of its bands). The level is the process's
//! (`RETINAFACE_CPU_ISA`; at avx2 on an AVX-512 processor, run under tools/cpuid/hide_avx512.so as
//! benches/baselines.py does, or the GEMM crate's kernels run AVX-512), the threads rayon's
//! (`RAYON_NUM_THREADS`). Synthetic weights (seed 1), a 640x640 image, batch 1; default networks: all.

use retinaface::cpu::conv::{PathMode, WinogradMode, WinogradTile};
use retinaface::cpu::{conv, set_blocked_enabled, set_dense_runs_enabled, set_dense_winograd, set_island_max_pixels};
use retinaface::{BgrImage, Engine, Network, WeightsSpec};
use std::time::Instant;

/// One switch's setting.
#[derive(Clone, Copy, Debug)]
enum Switch {
    Winograd(WinogradMode),
    F4From(usize),
    DirectCo(PathMode),
    ConvPool(PathMode),
    Blocked(bool),
    Dense(bool),
    Island(usize),
    Wino(Option<bool>),
    WBand(usize),
}

fn parse(setting: &str) -> Result<Vec<Switch>, String> {
    if setting == "auto" {
        return Ok(Vec::new());
    }
    setting
        .split(',')
        .map(|kv| {
            let (k, v) = kv.split_once('=').ok_or_else(|| format!("{kv:?}: expected switch=value"))?;
            let bad = || format!("{kv:?}: unknown value for {k}");
            Ok(match (k, v) {
                ("winograd", "auto") => Switch::Winograd(WinogradMode::Auto),
                ("winograd", "off") => Switch::Winograd(WinogradMode::Off),
                ("winograd", "f2") => Switch::Winograd(WinogradMode::Force(WinogradTile::F2)),
                ("winograd", "f4") => Switch::Winograd(WinogradMode::Force(WinogradTile::F4)),
                ("f4from", n) => Switch::F4From(n.parse().map_err(|_| bad())?),
                ("bwino", "auto") => Switch::Wino(None),
                ("bwino", "on") => Switch::Wino(Some(true)),
                ("bwino", "off") => Switch::Wino(Some(false)),
                ("wband", n) => Switch::WBand(n.parse::<usize>().map_err(|_| bad())? << 10),
                ("island", n) => Switch::Island(n.parse().map_err(|_| bad())?),
                ("directco", "auto") => Switch::DirectCo(PathMode::Auto),
                ("directco", "off") => Switch::DirectCo(PathMode::Off),
                ("directco", "force") => Switch::DirectCo(PathMode::Force),
                ("convpool", "auto") => Switch::ConvPool(PathMode::Auto),
                ("convpool", "off") => Switch::ConvPool(PathMode::Off),
                ("convpool", "force") => Switch::ConvPool(PathMode::Force),
                ("blocked" | "dense", "on" | "off") => {
                    let on = v == "on";
                    if k == "blocked" { Switch::Blocked(on) } else { Switch::Dense(on) }
                }
                ("winograd" | "directco" | "convpool" | "blocked" | "dense" | "bwino", _) => return Err(bad()),
                _ => return Err(format!("{kv:?}: unknown switch {k}")),
            })
        })
        .collect()
}

/// Every switch back to its measured rule, then `setting`'s.
fn apply(setting: &[Switch]) {
    conv::set_winograd_mode(None);
    conv::set_winograd_f4_from(None);
    conv::set_direct_co_mode(None);
    conv::set_conv_pool_mode(None);
    set_blocked_enabled(None);
    set_dense_runs_enabled(None);
    set_island_max_pixels(None);
    set_dense_winograd(None);
    retinaface::cpu::winograd_blocked::set_band_bytes(None);
    for s in setting {
        match *s {
            Switch::Winograd(m) => conv::set_winograd_mode(Some(m)),
            Switch::F4From(n) => conv::set_winograd_f4_from(Some(n)),
            Switch::DirectCo(m) => conv::set_direct_co_mode(Some(m)),
            Switch::ConvPool(m) => conv::set_conv_pool_mode(Some(m)),
            Switch::Blocked(on) => set_blocked_enabled(Some(on)),
            Switch::Dense(on) => set_dense_runs_enabled(Some(on)),
            Switch::Island(p) => set_island_max_pixels(Some(p)),
            Switch::Wino(m) => set_dense_winograd(m),
            Switch::WBand(b) => retinaface::cpu::winograd_blocked::set_band_bytes(Some(b)),
        }
    }
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let mut positional = Vec::new();
    let mut rounds = 20usize;
    while let Some(a) = args.next() {
        if a == "--rounds" {
            rounds = match args.next().and_then(|v| v.parse().ok()) {
                Some(r) if r > 0 => r,
                _ => fail("--rounds takes a positive count"),
            };
        } else {
            positional.push(a);
        }
    }
    if positional.len() < 2 {
        fail("usage: paired A B [--rounds N] [NETWORK...] (A, B: switch=value lists or auto)");
    }
    let settings = [&positional[0], &positional[1]].map(|s| parse(s).unwrap_or_else(|e| fail(&e)));
    let names = &positional[2..];
    for name in names {
        if !Network::ALL.iter().any(|n| n.name() == name) {
            fail(&format!("unknown network {name}"));
        }
    }
    let (w, h) = (640, 640);
    let data: Vec<u8> = (0..w * h * 3).map(|i| ((i * 7919) % 251) as u8).collect();
    let img = BgrImage { width: w, height: h, data };
    println!("A = {}, B = {}; {rounds} rounds; {}", positional[0], positional[1], retinaface::cpu::describe());
    println!(
        "{:<18} {:>10} {:>10} {:>10} {:>10} {:>12} {:>14}",
        "network", "A med ms", "A min", "B med ms", "B min", "A/B paired", "quartiles"
    );
    for net in Network::ALL.into_iter().filter(|n| names.is_empty() || names.iter().any(|x| x == n.name())) {
        let engine = Engine::new(&WeightsSpec::Synthetic { seed: 1 }, Some(net))
            .unwrap_or_else(|e| fail(&format!("{net}: {e}")));
        let pass = |s: &[Switch]| {
            apply(s);
            let t = Instant::now();
            if let Err(e) = engine.forward(&[&img]) {
                fail(&format!("{net}: {e}"));
            }
            t.elapsed().as_secs_f64() * 1e3
        };
        // Warm-up: each setting packs its weights and grows its scratch once.
        for s in &settings {
            pass(s);
            pass(s);
        }
        let (mut ta, mut tb, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..rounds {
            let (a, b) = if r % 2 == 0 {
                let a = pass(&settings[0]);
                (a, pass(&settings[1]))
            } else {
                let b = pass(&settings[1]);
                (pass(&settings[0]), b)
            };
            ta.push(a);
            tb.push(b);
            ratio.push(a / b);
        }
        apply(&[]);
        for v in [&mut ta, &mut tb, &mut ratio] {
            v.sort_by(f64::total_cmp);
        }
        println!(
            "{:<18} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>12.3} {:>14}",
            net.name(),
            quantile(&ta, 0.5),
            ta[0],
            quantile(&tb, 0.5),
            tb[0],
            quantile(&ratio, 0.5),
            format!("{:.3}-{:.3}", quantile(&ratio, 0.25), quantile(&ratio, 0.75))
        );
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("paired: {msg}");
    std::process::exit(2)
}
