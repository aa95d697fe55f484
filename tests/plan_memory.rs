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

/// One planner for both executors: the same shapes and live ranges; the CUDA executor's plan leaves
/// out the tensors it never stores (a fused depthwise output, the head maps), so its arena is laid
/// out from the tensors that exist on the device.
#[cfg(feature = "cuda-sim")]
#[test]
fn cpu_and_simulation_plan_alike_but_the_device_leaves_out_what_it_never_stores() {
    let (cpu, sim) = (engine(Backend::Cpu), engine(Backend::CudaSim));
    let graph = retinaface::passes::fuse(sim.graph(), retinaface::passes::Fusions::CUDA_F32);
    let absent = retinaface::cuda::engine::absent_tensors(&graph);
    for (n, (w, h)) in [(1, size(0)), (2, size(17)), (1, (301, 203))] {
        let (a, b): (std::sync::Arc<retinaface::graph::Plan>, _) =
            (cpu.plan(n, h, w).unwrap(), sim.plan(n, h, w).unwrap());
        assert_eq!((&a.shapes, &a.live), (&b.shapes, &b.live), "{n}x{w}x{h}");
        assert!(a.absent.iter().all(|&x| !x), "the CPU stores every tensor");
        let want = retinaface::graph::Plan::without(&graph, (n, h, w, false), retinaface::graph::Layout::F32, &absent);
        assert_eq!(*b, want.unwrap(), "{n}x{w}x{h}: the simulation's plan is the planner's without its absent tensors");
        assert!(b.arena_bytes() < a.arena_bytes(), "{} vs {}", b.arena_bytes(), a.arena_bytes());
        // The arena shares memory between tensors whose live ranges do not meet.
        assert!(a.arena_bytes() < a.unshared_bytes(), "{} vs {}", a.arena_bytes(), a.unshared_bytes());
    }
}

/// Every stored tensor has its own arena slot: inside the arena, and apart from every other stored
/// tensor alive at any step it is; absent ones take no space.
fn every_tensor_has_a_slot(p: &retinaface::graph::Plan, what: &str) {
    let nt = p.shapes.len();
    for t in 0..nt {
        if p.absent[t] {
            assert_eq!(p.elems(t), 0, "{what}: absent tensor {t}");
            continue;
        }
        assert!(p.elems(t) > 0 && p.range(t).end <= p.arena_elems, "{what}: tensor {t} outside the arena");
        for u in t + 1..nt {
            let meet = p.live[t].0 <= p.live[u].1 && p.live[u].0 <= p.live[t].1;
            if p.absent[u] || !meet {
                continue;
            }
            let (a, b) = (p.range(t), p.range(u));
            assert!(a.end <= b.start || b.end <= a.start, "{what}: tensors {t} and {u} overlap while both live");
        }
    }
}

/// Arena bytes with every tensor stored (as before) and without the tensors the CUDA executors never
/// store, for every network, in f32 (the fused graph: depthwise outputs of depthwise + pointwise ops,
/// head maps) and f16 (no fusions yet: the head maps); each plan still gives every stored tensor a slot.
#[test]
fn device_arenas_leave_out_fused_away_tensors_for_every_network() {
    use retinaface::graph::{Layout, Plan};
    use retinaface::passes::{Fusions, fuse};
    let (n, h, w) = (2, 160, 224);
    for net in Network::ALL {
        let e = Engine::new(&WeightsSpec::Synthetic { seed: 1 }, Some(net)).unwrap();
        for (fusions, layout, name) in [(Fusions::CUDA_F32, Layout::F32, "f32"), (Fusions::NONE, Layout::F16, "f16")] {
            let g = fuse(e.graph(), fusions);
            let absent = retinaface::cuda::engine::absent_tensors(&g);
            let before = Plan::with_layout(&g, n, h, w, false, layout).unwrap();
            let after = Plan::without(&g, (n, h, w, false), layout, &absent).unwrap();
            let kept_before = Plan::with_layout(&g, n, h, w, true, layout).unwrap();
            let kept = Plan::without(&g, (n, h, w, true), layout, &absent).unwrap();
            println!(
                "{net:?} {name}: arena {} -> {} bytes ({} absent tensors); keep_all {} -> {} bytes",
                before.arena_bytes(),
                after.arena_bytes(),
                absent.len(),
                kept_before.arena_bytes(),
                kept.arena_bytes()
            );
            // The peak may lie where no absent tensor lives (the head maps are small and late), so the
            // arena shrinks or stays; with depthwise + pointwise ops it shrinks; with every tensor
            // kept to the end every absent one is space saved.
            assert!(after.arena_bytes() <= before.arena_bytes(), "{net:?} {name}");
            let dwpw = g.ops.iter().any(|op| matches!(op, retinaface::graph::Op::DwPw { .. }));
            if dwpw {
                assert!(after.arena_bytes() < before.arena_bytes(), "{net:?} {name}: depthwise outputs take no space");
            }
            assert!(kept.arena_bytes() < kept_before.arena_bytes(), "{net:?} {name} keep_all");
            every_tensor_has_a_slot(&after, &format!("{net:?} {name}"));
            every_tensor_has_a_slot(&kept, &format!("{net:?} {name} keep_all"));
        }
    }
}
