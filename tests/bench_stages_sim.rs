//! Per-stage device times of `retinaface bench` on the CUDA executor, in the simulation: events
//! recorded inside a capture become record nodes that each replay records with its clock; a timed
//! bench pass books the time between its consecutive events to preprocessing, backbone, FPN + SSH,
//! heads and post-processing, which add up to its device total, eagerly and from a replayed graph,
//! in f32 and f16, forward-only and with post-processing; the graphs detection replays get no record
//! nodes; every network's fused ops book to stages in order.
#![cfg(feature = "cuda-sim")]

mod common;

use common::hooked::Hooked;
use retinaface::cuda::runner::EventId;
use retinaface::cuda::sim::{SimRunner, StreamOrder};
use retinaface::cuda::stages::fused_op_stages;
use retinaface::cuda::{GpuEngine, KernelRunner, KernelRunnerExt, LaunchDims, Stream};
use retinaface::exec::{BenchMode, StageClock};
use retinaface::graph::Stage;
use retinaface::passes::{Fusions, fuse};
use retinaface::{BgrImage, Engine, Network, PostOptions, Precision, Timings, WeightsSpec};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// A record made during a capture is a node: it records nothing then, and each replay records the
/// event where it reaches it, so the times between events inside and outside the graph add up.
#[test]
fn an_event_recorded_inside_a_capture_replays() {
    let mut r = SimRunner::new();
    let src = r.alloc(4096).unwrap();
    let dst = r.alloc(4096 * 4).unwrap();
    let ev: Vec<EventId> = (0..4).map(|_| r.event_create().unwrap()).collect();
    r.begin_capture().unwrap();
    r.memset(src, 9).unwrap();
    r.event_record(ev[1]).unwrap();
    let p = retinaface::cuda::params::PreprocessParams { src: src.ptr, dst: dst.ptr, total: 4096, pad0: 0 };
    r.launch("preprocess_bgr", LaunchDims::linear(4096, 256), &p).unwrap();
    r.event_record(ev[2]).unwrap();
    // Only the compute stream is captured.
    let err = r.event_record_on(Stream::Copy, ev[3]).unwrap_err().to_string();
    assert!(err.contains("event_record on the copy stream during graph capture"), "{err}");
    let g = r.end_capture().unwrap();
    let err = r.event_elapsed(ev[1], ev[2]).unwrap_err().to_string();
    assert!(err.contains("never recorded"), "the capture recorded the event: {err}");
    assert_eq!(r.download_f32(dst, 1).unwrap()[0].to_bits(), 0x7fc0_0000, "the capture ran the launch");

    let replay = |r: &mut SimRunner| {
        r.event_record(ev[0]).unwrap();
        r.replay(g).unwrap();
        r.event_record(ev[3]).unwrap();
        r.event_synchronize(ev[3]).unwrap();
        let t = |r: &mut SimRunner, a: usize, b: usize| r.event_elapsed(ev[a], ev[b]).unwrap();
        let parts = [t(r, 0, 1), t(r, 1, 2), t(r, 2, 3)];
        assert_eq!(parts.iter().sum::<Duration>(), t(r, 0, 3), "{parts:?}");
        assert!(parts[1] > Duration::ZERO, "the launch between the record nodes takes time");
    };
    replay(&mut r);
    // The launch between the two nodes ran: 9 - 104 (the blue mean) in every element.
    assert_eq!(r.download_f32(dst, 3).unwrap(), vec![9.0 - 104.0, 9.0 - 117.0, 9.0 - 123.0]);
    replay(&mut r);

    // A replay makes the nodes' events its own: queued and not yet run, they have not completed.
    r.set_stream_order(StreamOrder::HoldBack(Stream::Compute)).unwrap();
    r.replay(g).unwrap();
    let err = r.event_elapsed(ev[1], ev[2]).unwrap_err().to_string();
    assert!(err.contains("has not completed"), "{err}");
    r.synchronize().unwrap();
    r.event_elapsed(ev[1], ev[2]).unwrap();

    // A graph that records a destroyed event cannot replay.
    r.event_destroy(ev[2]).unwrap();
    let err = r.replay(g).unwrap_err().to_string();
    assert!(err.contains(&format!("records event {}", ev[2].0)) && err.contains("destroyed"), "{err}");
}

fn engine_graph(net: Network) -> retinaface::graph::Graph {
    Engine::new(&WeightsSpec::Synthetic { seed: 5 }, Some(net)).unwrap().graph().clone()
}

fn frame(n: usize, h: usize, w: usize) -> Vec<BgrImage> {
    (0..n)
        .map(|k| BgrImage { width: w, height: h, data: (0..h * w * 3).map(|i| ((i * 31 + k) % 253) as u8).collect() })
        .collect()
}

/// The stage times of `t` against its device total: all device times, none negative, adding up to
/// the total (the stretches are consecutive; the simulation's clock is exact to the nanosecond).
fn check_adds_up(t: &Timings, what: &str) {
    assert_eq!(t.stage_clock, StageClock::Device, "{what}");
    let sum = t.preprocess + t.backbone + t.neck + t.heads + t.postprocess;
    assert!(t.device > Duration::ZERO, "{what}: {t:?}");
    assert!(sum.abs_diff(t.device) <= Duration::from_nanos(5), "{what}: stages {sum:?}, device {:?}", t.device);
    for (name, d) in [("preprocess", t.preprocess), ("backbone", t.backbone), ("fpn_ssh", t.neck)] {
        assert!(d > Duration::ZERO, "{what}: {name} is empty: {t:?}");
    }
}

/// Timed bench passes on the executor, eagerly and through graphs: the stages add up to the device
/// total; with post-processing the heads run fused into it (booked there, none left in "heads");
/// forward-only, the heads are timed and nothing is post-processed. The timed graph is captured once
/// with its record nodes and replayed; the detect graphs get none.
#[test]
fn timed_bench_passes_book_device_time_to_stages_eagerly_and_replayed() {
    let graph = engine_graph(Network::MobileNetV1_025);
    let imgs = frame(2, 40, 48);
    let refs: Vec<&BgrImage> = imgs.iter().collect();
    let post = PostOptions::default();
    for precision in [Precision::F32, Precision::F16] {
        for graphs in [true, false] {
            let captured = Arc::new(AtomicUsize::new(0));
            let c = captured.clone();
            let runner = Hooked::new(SimRunner::new()).on_record(move |_, capturing| {
                if capturing {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            });
            let mut g = GpuEngine::with_runner_precision(&graph, Box::new(runner), precision).unwrap();
            g.set_cuda_graphs(graphs);
            let what = format!("{precision:?}, graphs {graphs}");
            // Detection and plain forward passes, captured and replayed: no record nodes.
            for _ in 0..2 {
                g.detect(&refs, &post).unwrap();
                g.raw_outputs(&refs).unwrap();
            }
            assert_eq!(captured.load(Ordering::Relaxed), 0, "{what}: a detect graph records events");
            for forward_only in [false, true] {
                let mode = BenchMode { input_on_device: false, forward_only };
                let what = format!("{what}, forward only {forward_only}");
                let before = captured.load(Ordering::Relaxed);
                let mut once = Timings::default();
                g.bench_pass(&refs, mode, &post, Some(&mut once)).unwrap();
                check_adds_up(&once, &what);
                let nodes = captured.load(Ordering::Relaxed) - before;
                // The f16 forward pass runs eagerly; the f32 one is captured with its events after
                // preprocessing, at the neck and (with the heads) at the heads, and at its end.
                let want = match (precision, graphs) {
                    (Precision::F32, true) => 3 + usize::from(forward_only),
                    _ => 0,
                };
                assert_eq!(nodes, want, "{what}: record nodes captured");
                let mut twice = Timings::default();
                g.bench_pass(&refs, mode, &post, Some(&mut twice)).unwrap();
                g.bench_pass(&refs, mode, &post, Some(&mut twice)).unwrap();
                check_adds_up(&twice, &what);
                assert_eq!(captured.load(Ordering::Relaxed) - before, want, "{what}: the timed graph is replayed");
                if forward_only {
                    assert!(twice.heads > Duration::ZERO && twice.postprocess.is_zero(), "{what}: {twice:?}");
                } else {
                    assert!(twice.heads.is_zero() && twice.postprocess > Duration::ZERO, "{what}: {twice:?}");
                }
                // Untimed passes (bench's warm-up) use the untimed graphs.
                g.bench_pass(&refs, mode, &post, None).unwrap();
                assert_eq!(captured.load(Ordering::Relaxed) - before, want, "{what}");
            }
            // A staged input is timed from the replay on: no upload in preprocessing.
            if precision == Precision::F32 {
                g.stage_input(&refs).unwrap();
                let mut t = Timings::default();
                let mode = BenchMode { input_on_device: true, forward_only: false };
                g.bench_pass(&refs, mode, &post, Some(&mut t)).unwrap();
                check_adds_up(&t, &format!("{what}, staged"));
            }
        }
    }
}

/// The fusions of both CUDA executors keep every network's ops in stage order, and each fused op
/// books to the stage its last step is in (which today is also its first step's).
#[test]
fn every_networks_fused_ops_book_to_their_stages_in_order() {
    for net in Network::ALL {
        let graph = engine_graph(net);
        for fusions in [Fusions::CUDA_F32, Fusions::CUDA_F16] {
            let fused = fuse(&graph, fusions);
            let stages = fused_op_stages(&graph, &fused);
            assert_eq!(stages.len(), fused.ops.len());
            let rank = |s: &Stage| [Stage::Backbone, Stage::Neck, Stage::Heads].iter().position(|x| x == s).unwrap();
            assert!(stages.windows(2).all(|w| rank(&w[0]) <= rank(&w[1])), "{net:?}: stages out of order");
            assert_eq!(stages.first(), Some(&Stage::Backbone), "{net:?}");
            assert_eq!(stages.iter().filter(|s| **s == Stage::Heads).count(), 3, "{net:?}: three heads");
            assert!(stages.contains(&Stage::Neck), "{net:?}");
            assert_eq!(stages, fused.op_stages, "{net:?}: a fusion spans a stage boundary");
        }
    }
}

fn bench_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_retinaface"))
        .args(["bench", "--network", "mobilenetv1_0.25", "--size", "64x48", "--iters", "2", "--batch", "2", "--json"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `bench --backend cuda-sim` reports its five stage times from device events (the JSON says so),
/// each present and non-negative, adding up to the device total, with the host's part of
/// preprocessing apart; the CPU's stages stay on the host clock.
#[test]
fn bench_reports_stage_times_from_device_events() {
    for precision in ["f32", "f16"] {
        for graph in ["on", "off"] {
            for forward_only in [false, true] {
                let mut args = vec!["--backend", "cuda-sim", "--precision", precision, "--cuda-graph", graph];
                if forward_only {
                    args.push("--forward-only");
                }
                let r = bench_json(&args);
                assert_eq!(r["stages_source"], "device events", "{args:?}: {r}");
                let stages = ["preprocess", "backbone", "fpn_ssh", "heads", "postprocess"]
                    .map(|k| r["stages_ms"][k].as_f64().unwrap_or_else(|| panic!("{args:?}: no {k}: {r}")));
                assert!(stages.iter().all(|&s| s >= 0.0), "{args:?}: {r}");
                let device = r["device_ms_per_batch"].as_f64().unwrap();
                let sum: f64 = stages.iter().sum();
                assert!(
                    (sum - device).abs() <= 1e-6 * device.max(1.0),
                    "{args:?}: stages {sum} ms, device {device} ms"
                );
                assert!(stages[..3].iter().all(|&s| s > 0.0), "{args:?}: {r}");
                assert_eq!(stages[4] > 0.0, !forward_only, "{args:?}: post-processing timed only when it runs");
                assert!(r["host_preprocess_ms"].as_f64().unwrap() >= 0.0, "{args:?}: {r}");
            }
        }
    }
    let r = bench_json(&["--backend", "cpu"]);
    assert_eq!(r["stages_source"], "host clock", "{r}");
    assert!(r["host_preprocess_ms"].is_null(), "{r}");
    // The table labels each row's stage clock.
    let out = Command::new(env!("CARGO_BIN_EXE_retinaface"))
        .args(["bench", "--network", "mobilenetv1_0.25", "--size", "64x48", "--iters", "1", "--backend", "cuda-sim"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.lines().nth(1).is_some_and(|l| l.contains("host prep")), "{text}");
    assert!(text.lines().nth(2).is_some_and(|l| l.ends_with("device events")), "{text}");
}
