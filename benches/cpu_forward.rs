//! CPU forward pass per network at 640x640 and at crowd.jpg's size (1024x624), batch 1.
//!
//!     cargo bench --bench cpu_forward [-- NETWORK...]
//!
//! Prints the median and minimum of a few timed runs after a warm-up, with synthetic weights (seed 1);
//! the work does not depend on the weights' values. Baselines: benches/baselines.py.

use retinaface::{BgrImage, Engine, Network, WeightsSpec};
use std::time::Instant;

fn main() {
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    println!("{:<18} {:>10} {:>12} {:>12} {:>8}", "network", "size", "median ms", "min ms", "GMAC");
    for net in Network::ALL {
        if !filter.is_empty() && !filter.iter().any(|f| f == net.name()) {
            continue;
        }
        let engine = match Engine::new(&WeightsSpec::Synthetic { seed: 1 }, Some(net)) {
            Ok(e) => e,
            Err(e) => {
                eprintln!("{net}: {e}");
                std::process::exit(1);
            }
        };
        for (w, h) in [(640, 640), (1024, 624)] {
            let data: Vec<u8> = (0..w * h * 3).map(|i| ((i * 7919) % 251) as u8).collect();
            let img = BgrImage { width: w, height: h, data };
            let iters = if engine.graph().macs(h, w) > 10_000_000_000 { 3 } else { 10 };
            let mut times = Vec::new();
            for i in 0..=iters {
                let t = Instant::now();
                if let Err(e) = engine.forward(&[&img]) {
                    eprintln!("{net}: {e}");
                    std::process::exit(1);
                }
                if i > 0 {
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            times.sort_by(f64::total_cmp);
            let gmac = engine.graph().macs(h, w) as f64 / 1e9;
            println!(
                "{:<18} {:>10} {:>12.1} {:>12.1} {:>8.2}",
                net.name(),
                format!("{w}x{h}"),
                times[times.len() / 2],
                times[0],
                gmac
            );
        }
    }
}
