//! Held activation memory stays bounded when a server sees many image sizes (`--resize original` and
//! varied uploads): 40 distinct sizes through the CPU executor and the CUDA-simulation executor, each
//! with a plan cache bounded in bytes. Before plans were cached in an LRU, the simulation grew by
//! hundreds of MB over 40 sizes. Both executors run the same plan (shapes, liveness, arena offsets).

use retinaface::{Backend, BgrImage, Engine, Network, WeightsSpec};

const SIZES: usize = 40;

/// The i-th of 40 distinct (width, height), from 40x30 to 235x147.
fn size(i: usize) -> (usize, usize) {
    (40 + 5 * i, 30 + 3 * i)
}

fn image(w: usize, h: usize) -> BgrImage {
    let data = (0..w * h * 3).map(|k| ((k * 37 + k / 3 * 11) % 251) as u8).collect();
    BgrImage::new(w, h, data).unwrap()
}

fn engine(backend: Backend) -> Engine {
    let mut e = Engine::new(&WeightsSpec::Synthetic { seed: 1 }, Some(Network::MobileNetV1_025)).unwrap();
    e.set_backend(backend).unwrap();
    e
}

/// Runs the 40 sizes with a budget of three of the largest arenas; after every pass the held bytes
/// stay within the budget plus the newest plan (which always stays, so one large frame still runs).
fn forty_sizes_stay_bounded(backend: Backend) {
    let mut e = engine(backend);
    let (bw, bh) = size(SIZES - 1);
    let largest = e.plan(1, bh, bw).unwrap().arena_bytes();
    let budget = 3 * largest;
    e.set_plan_cache_bytes(budget).unwrap();
    let mut unbounded = 0usize;
    let mut peak = 0usize;
    for i in 0..SIZES {
        let (w, h) = size(i);
        let raw = e.forward(&[&image(w, h)]).unwrap();
        assert_eq!((raw[0].w, raw[0].h), (w, h));
        let plan = e.plan(1, h, w).unwrap();
        unbounded += plan.arena_bytes();
        let held = e.held_bytes();
        // The newest entry may also hold its input bytes and raw outputs (the CUDA executor): small next
        // to the arena, so twice the arena bounds it.
        assert!(held <= budget + 2 * plan.arena_bytes(), "{backend:?} size {w}x{h}: holds {held} B, budget {budget} B");
        assert!(held >= plan.arena_bytes(), "{backend:?}: the current plan's arena is cached");
        peak = peak.max(held);
    }
    println!("{backend:?}: peak held {peak} B over {SIZES} sizes; budget {budget} B; unbounded {unbounded} B");
    // Without the bound every size's arena would be held: the test would not notice a leak otherwise.
    assert!(unbounded > 3 * budget, "sizes too alike to exercise eviction: {unbounded} B vs {budget} B");
}

#[test]
fn cpu_executor_memory_is_bounded_over_40_sizes() {
    forty_sizes_stay_bounded(Backend::Cpu);
}

#[cfg(feature = "cuda-sim")]
#[test]
fn simulation_executor_memory_is_bounded_over_40_sizes() {
    forty_sizes_stay_bounded(Backend::CudaSim);
}

/// One plan for both executors: the same type, computed by the same code, equal field for field.
#[cfg(feature = "cuda-sim")]
#[test]
fn cpu_and_simulation_run_the_same_plan() {
    let (cpu, sim) = (engine(Backend::Cpu), engine(Backend::CudaSim));
    for (n, (w, h)) in [(1, size(0)), (2, size(17)), (1, (301, 203))] {
        let (a, b): (std::sync::Arc<retinaface::graph::Plan>, _) =
            (cpu.plan(n, h, w).unwrap(), sim.plan(n, h, w).unwrap());
        assert_eq!(a, b, "{n}x{w}x{h}");
        // The arena shares memory between tensors whose live ranges do not meet.
        assert!(a.arena_bytes() < a.unshared_bytes(), "{} vs {}", a.arena_bytes(), a.unshared_bytes());
    }
}
