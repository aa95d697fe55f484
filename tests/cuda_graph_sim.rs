//! Streams, graphs and faults of the CUDA executor, in the CPU simulation: a replayed graph gives
//! exactly what eager launches give; a capture refuses what a CUDA stream capture cannot record;
//! queued downloads and events follow the stream's rules; an injected sticky fault is named with
//! `RETINAFACE_CUDA_SYNC`'s per-launch synchronisation and marks the executor unhealthy.
#![cfg(feature = "cuda-sim")]

mod rng;

use retinaface::cuda::sim::SimRunner;
use retinaface::cuda::{CudaExecutor, GpuEngine, KernelRunner, KernelRunnerExt};
use retinaface::exec::Executor;
use retinaface::{Backend, BgrImage, Engine, Network, PostOptions, Timings, WeightsSpec};

fn network_graph(net: Network) -> retinaface::model::graph::Graph {
    Engine::new(&WeightsSpec::Synthetic { seed: 3 }, Some(net)).unwrap().graph().clone()
}

fn images(n: usize, h: usize, w: usize, seed: u64) -> Vec<BgrImage> {
    let mut r = rng::Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    (0..n)
        .map(|_| BgrImage { width: w, height: h, data: (0..h * w * 3).map(|_| (r.next() >> 56) as u8).collect() })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Raw outputs and detections of one batch, as bit patterns (NaN-safe, exact).
fn run(g: &mut GpuEngine, imgs: &[BgrImage]) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let refs: Vec<&BgrImage> = imgs.iter().collect();
    let raw = g.raw_outputs(&refs).unwrap();
    let raw_bits = raw.iter().flat_map(|r| [bits(&r.loc), bits(&r.conf), bits(&r.landmarks)]).collect();
    let post = PostOptions { conf_threshold: 0.3, ..PostOptions::default() };
    let dets = g.detect(&refs, &post).unwrap();
    let det_bits = dets
        .iter()
        .map(|d| {
            d.iter().flat_map(|x| x.bbox.iter().chain([&x.score]).chain(&x.landmarks).map(|v| v.to_bits())).collect()
        })
        .collect();
    (raw_bits, det_bits)
}

/// Replay equals eager execution bit for bit, over several sizes and batches, on the first pass of
/// a plan (capture, then replay), on later passes (replay only), and after the plan was evicted and
/// rebuilt (a fresh capture over new buffers; the old graph was freed with its plan, or replaying it
/// would touch freed buffers, which the simulation reports).
#[test]
fn graph_replay_equals_eager_execution() {
    let graph = network_graph(Network::MobileNetV1_025);
    let mut eager = GpuEngine::new(&graph, Backend::CudaSim).unwrap();
    eager.set_cuda_graphs(false);
    let mut replay = GpuEngine::new(&graph, Backend::CudaSim).unwrap();
    assert!(replay.cuda_graphs(), "graphs are on by default");
    let cases = [(1, 32, 48), (2, 40, 40), (3, 24, 56), (1, 32, 48)];
    for (i, &(n, h, w)) in cases.iter().enumerate() {
        let imgs = images(n, h, w, 10 + i as u64);
        let want = run(&mut eager, &imgs);
        assert_eq!(run(&mut replay, &imgs), want, "batch {n} of {w}x{h}");
        // A second pass of the same plan replays the graph captured by the first, on new inputs.
        let imgs2 = images(n, h, w, 100 + i as u64);
        assert_eq!(run(&mut replay, &imgs2), run(&mut eager, &imgs2), "replayed batch {n} of {w}x{h}");
    }
    // A budget of one byte keeps only the newest plan: every size change evicts (and frees the graph).
    replay.set_plan_cache_bytes(1).unwrap();
    for (i, &(n, h, w)) in cases.iter().enumerate() {
        let imgs = images(n, h, w, 200 + i as u64);
        assert_eq!(run(&mut replay, &imgs), run(&mut eager, &imgs), "rebuilt plan, batch {n} of {w}x{h}");
    }
    replay.release_plans().unwrap();
    assert_eq!(replay.held_bytes(), 0);
}

/// Post-processing is captured too, one graph per plan and post settings: replays with new resize
/// factors per image (read from the device, not baked into the graph) and new inputs equal eager
/// post-processing bit for bit, and changed settings (threshold, caps) recapture rather than replay a
/// graph made for others.
#[test]
fn post_processing_replays_with_new_resize_factors_and_recaptures_on_new_settings() {
    let graph = network_graph(Network::MobileNetV1_025);
    let mut eager = GpuEngine::new(&graph, Backend::CudaSim).unwrap();
    eager.set_cuda_graphs(false);
    let mut replay = GpuEngine::new(&graph, Backend::CudaSim).unwrap();
    let to_bits = |d: Vec<Vec<retinaface::Detection>>| -> Vec<Vec<u32>> {
        d.iter()
            .map(|d| {
                d.iter()
                    .flat_map(|x| x.bbox.iter().chain([&x.score]).chain(&x.landmarks).map(|v| v.to_bits()))
                    .collect()
            })
            .collect()
    };
    let settings = [
        PostOptions { conf_threshold: 0.3, ..PostOptions::default() },
        PostOptions { conf_threshold: 0.3, ..PostOptions::default() },
        PostOptions { conf_threshold: 0.1, nms_threshold: 0.3, ..PostOptions::default() },
        PostOptions { conf_threshold: 0.1, pre_nms_topk: Some(50), post_nms_topk: Some(7), ..PostOptions::default() },
        PostOptions { conf_threshold: 0.3, ..PostOptions::default() },
    ];
    let factors = [[1.0f32, 0.5], [2.5, 1.0], [0.75, 3.0], [1.0, 1.0], [0.4, 1.7]];
    let mut found = 0;
    for (i, (post, f)) in settings.iter().zip(factors).enumerate() {
        let imgs = images(2, 40, 56, 300 + i as u64);
        let refs: Vec<&BgrImage> = imgs.iter().collect();
        let want = to_bits(eager.detect_scaled(&refs, post, &f).unwrap());
        let got = to_bits(replay.detect_scaled(&refs, post, &f).unwrap());
        assert_eq!(got, want, "call {i}: factors {f:?}, {post:?}");
        found += want.iter().map(|d| d.len()).sum::<usize>();
    }
    assert!(found > 0, "no detections at all: the comparison would be vacuous");
}

/// ResNet's residual adds and the other backbone families replay equal too.
#[test]
fn graph_replay_equals_eager_on_resnet18_and_mobilenetv2() {
    for net in [Network::ResNet18, Network::MobileNetV2] {
        let graph = network_graph(net);
        let mut eager = GpuEngine::new(&graph, Backend::CudaSim).unwrap();
        eager.set_cuda_graphs(false);
        let mut replay = GpuEngine::new(&graph, Backend::CudaSim).unwrap();
        for seed in [1, 2] {
            let imgs = images(2, 32, 32, seed);
            assert_eq!(run(&mut replay, &imgs), run(&mut eager, &imgs), "{net}");
        }
    }
}

/// During a capture the calls a CUDA stream capture cannot record fail and name themselves; launches
/// and memsets are recorded, not run, and each replay runs them again in order.
#[test]
fn capture_records_launches_and_memsets_and_rejects_the_rest() {
    let mut r = SimRunner::new();
    let a = r.alloc(64).unwrap();
    let b = r.alloc(64 * 4).unwrap();
    r.upload(a, 0, &[7u8; 64]).unwrap();
    r.begin_capture().unwrap();
    let refused: Vec<(&str, String)> = vec![
        ("alloc", r.alloc(16).unwrap_err().to_string()),
        ("free", r.free(a).unwrap_err().to_string()),
        ("upload (synchronous)", r.upload(a, 0, &[1]).unwrap_err().to_string()),
        ("download (synchronous)", r.download(a, 0, &mut [0u8; 4]).unwrap_err().to_string()),
        ("upload_staged", r.upload_staged(a, 0, &[&[1u8][..]]).unwrap_err().to_string()),
        ("download_async", r.download_async(a, 0, 4).unwrap_err().to_string()),
        ("synchronize", r.synchronize().unwrap_err().to_string()),
        ("begin_capture", r.begin_capture().unwrap_err().to_string()),
    ];
    for (call, msg) in &refused {
        assert!(msg.contains(&format!("{call} during graph capture")), "{call}: {msg}");
    }
    // Recorded, not run: `a` still holds 7s and `b` its poison until the replay.
    r.memset(a, 3).unwrap();
    let p = retinaface::cuda::params::PreprocessParams { src: a.ptr, dst: b.ptr, total: 64, pad0: 0 };
    r.launch("preprocess_bgr", retinaface::cuda::LaunchDims::linear(64, 64), &p).unwrap();
    let g = r.end_capture().unwrap();
    assert_eq!(download(&mut r, a), vec![7u8; 64]);
    assert!(r.download_f32(b, 64).unwrap().iter().all(|x| x.is_nan()));
    r.replay(g).unwrap();
    assert_eq!(download(&mut r, a), vec![3u8; 64]);
    let once = r.download_f32(b, 64).unwrap();
    // The eager launch on the same bytes gives the same values.
    r.poison(b).unwrap();
    r.launch("preprocess_bgr", retinaface::cuda::LaunchDims::linear(64, 64), &p).unwrap();
    assert_eq!(bits(&r.download_f32(b, 64).unwrap()), bits(&once));
    assert!(once.iter().all(|x| x.is_finite()));
    // Replays repeat the memset after the host changed the buffer.
    r.upload(a, 0, &[9u8; 64]).unwrap();
    r.replay(g).unwrap();
    assert_eq!(download(&mut r, a), vec![3u8; 64]);
    r.free_graph(g).unwrap();
    assert!(r.replay(g).unwrap_err().to_string().contains("does not exist"));
    // A graph that outlived its buffers is caught at replay, not run over freed memory.
    r.begin_capture().unwrap();
    r.memset(a, 1).unwrap();
    let stale = r.end_capture().unwrap();
    r.free(a).unwrap();
    assert!(r.replay(stale).unwrap_err().to_string().contains("not a live allocation"));
}

fn download(r: &mut SimRunner, b: retinaface::cuda::DevBuf) -> Vec<u8> {
    let mut v = vec![0u8; b.bytes];
    r.download(b, 0, &mut v).unwrap();
    v
}

/// A queued download is readable only after a synchronisation (or waiting on a later event); one
/// staged upload carries several images end to end; events time only completed work.
#[test]
fn queued_downloads_and_events_follow_the_stream() {
    let mut r = SimRunner::new();
    let a = r.alloc(12).unwrap();
    r.upload_staged(a, 2, &[&[1u8, 2, 3][..], &[4, 5][..], &[6u8; 5][..]]).unwrap();
    let early = r.download_async(a, 2, 10).unwrap();
    let mut got = [0u8; 10];
    let e = r.read_back(early, &mut got).unwrap_err().to_string();
    assert!(e.contains("before synchronize"), "{e}");
    let rb = r.download_async(a, 2, 10).unwrap();
    r.synchronize().unwrap();
    r.read_back(rb, &mut got).unwrap();
    assert_eq!(got, [1, 2, 3, 4, 5, 6, 6, 6, 6, 6]);
    assert!(r.upload_staged(a, 4, &[&[0u8; 9][..]]).unwrap_err().to_string().contains("overrun"));

    let (t0, t1) = (r.event_create().unwrap(), r.event_create().unwrap());
    r.event_record(t0).unwrap();
    let rb = r.download_async(a, 0, 12).unwrap();
    r.event_record(t1).unwrap();
    assert!(r.event_elapsed(t0, t1).unwrap_err().to_string().contains("synchronize first"));
    let mut all = [0u8; 12];
    assert!(r.read_back(rb, &mut all).is_err(), "not synchronised yet");
    let rb = r.download_async(a, 0, 12).unwrap();
    let t2 = r.event_create().unwrap();
    r.event_record(t2).unwrap();
    r.event_synchronize(t2).unwrap();
    r.read_back(rb, &mut all).unwrap();
    assert_eq!(&all[2..5], &[1, 2, 3]);
    assert!(r.event_elapsed(t0, t2).is_ok());
    for e in [t0, t1, t2] {
        r.event_destroy(e).unwrap();
    }
}

/// The device time of a pass comes from events: non-zero on the CUDA executor, and no more than the
/// pass's wall time.
/// The tuner's and bench-kernels' timer: `reps` launches between two events, time per repetition;
/// a failing launch is the error (and the events are still destroyed: the next timing works).
#[test]
fn time_with_events_times_each_repetition_and_reports_a_failing_launch() {
    let mut r = SimRunner::new();
    let b = r.alloc(1 << 16).unwrap();
    let mut calls = 0;
    let per = retinaface::cuda::runner::time_with_events(&mut r, 4, |r| {
        calls += 1;
        r.memset(b, 1)
    })
    .unwrap();
    assert_eq!(calls, 4);
    assert!(per > std::time::Duration::ZERO);
    let err = retinaface::cuda::runner::time_with_events(&mut r, 3, |r| {
        r.launch_raw("no_such_kernel", retinaface::cuda::LaunchDims::linear(1, 32), &[])
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("no_such_kernel"), "{err}");
    let again = retinaface::cuda::runner::time_with_events(&mut r, 1, |r| r.memset(b, 2));
    assert!(again.is_ok(), "{again:?}");
}

#[test]
fn timings_carry_device_time_from_events() {
    let graph = network_graph(Network::MobileNetV1_025);
    let exec = CudaExecutor::new(GpuEngine::new(&graph, Backend::CudaSim).unwrap());
    let imgs = images(2, 32, 32, 5);
    let refs: Vec<&BgrImage> = imgs.iter().collect();
    let mut t = Timings::default();
    let t0 = std::time::Instant::now();
    exec.detect(&refs, &[1.0, 1.0], &PostOptions::default(), Some(&mut t)).unwrap();
    let wall = t0.elapsed();
    assert!(t.device > std::time::Duration::ZERO && t.device <= wall, "device {:?}, wall {wall:?}", t.device);
    let mut f = Timings::default();
    exec.forward(&refs, Some(&mut f)).unwrap();
    assert!(f.device > std::time::Duration::ZERO);
}

fn faulty_engine(kernel: &str, sync: bool) -> CudaExecutor {
    let graph = network_graph(Network::MobileNetV1_025);
    let mut r = SimRunner::new();
    r.inject_fault(kernel, 1);
    r.set_sync_each_launch(sync);
    CudaExecutor::new(GpuEngine::with_runner(&graph, Box::new(r)).unwrap())
}

/// A fault surfaces at a later call. Without per-launch synchronisation the error cannot say which
/// kernel faulted (it points at the setting that would); with it the error names the kernel. Either
/// way the executor is unhealthy from then on and every later pass fails.
#[test]
fn a_sticky_fault_is_named_with_sync_each_launch_and_marks_the_executor_unhealthy() {
    let imgs = images(1, 32, 32, 9);
    let refs: Vec<&BgrImage> = imgs.iter().collect();
    for (kernel, sync) in [("conv3x3", false), ("conv3x3", true), ("nms_reduce", true)] {
        let exec = faulty_engine(kernel, sync);
        assert!(exec.healthy().is_ok());
        let e = exec.detect(&refs, &[1.0], &PostOptions::default(), None).unwrap_err().to_string();
        assert!(e.contains("illegal memory access"), "{e}");
        if sync {
            assert!(e.contains(&format!("kernel {kernel} ")), "the error names the faulting kernel: {e}");
        } else {
            assert!(!e.contains(&format!("kernel {kernel} ")), "{e}");
            assert!(e.contains("RETINAFACE_CUDA_SYNC=1"), "the error says how to find the kernel: {e}");
        }
        let h = exec.healthy().unwrap_err().to_string();
        assert!(h.contains("unusable") && h.contains("illegal memory access"), "{h}");
        assert!(exec.detect(&refs, &[1.0], &PostOptions::default(), None).is_err(), "sticky");
        assert!(exec.forward(&refs, None).is_err(), "sticky");
    }
}

/// `RETINAFACE_SIM_FAULT` is checked: a kernel that does not exist or a bad launch number is named.
#[test]
fn a_bad_sim_fault_setting_is_named() {
    // The variable is read by GpuEngine::new; set in a child process, not in the test process.
    let bin = env!("CARGO_BIN_EXE_retinaface");
    for (value, want) in [("no_such_kernel", "no kernel named `no_such_kernel`"), ("nms_reduce:0", "launch number")] {
        let out = std::process::Command::new(bin)
            .args(["bench", "--synthetic-seed", "1", "--network", "mobilenetv1_0.25", "--backend", "cuda-sim"])
            .args(["--size", "32x32", "--iters", "1"])
            .env("RETINAFACE_SIM_FAULT", value)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{value}: {err}");
    }
}

/// `--cuda-graph off` and `on` print the same detections (the command-line switch reaches the
/// executor; replay equals eager), and a bad value is named.
#[test]
fn the_cuda_graph_flag_gives_the_same_detections_either_way() {
    let dir = std::env::temp_dir().join(format!("retinaface-cuda-graph-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("small.png");
    let img = &images(1, 40, 48, 77)[0];
    let rgb: Vec<u8> = img.data.chunks(3).flat_map(|p| [p[2], p[1], p[0]]).collect();
    image::save_buffer(&path, &rgb, 48, 40, image::ExtendedColorType::Rgb8).unwrap();
    let bin = env!("CARGO_BIN_EXE_retinaface");
    let detect = |graph: &str| {
        let out = std::process::Command::new(bin)
            .arg("detect")
            .arg(&path)
            .args(["--synthetic-seed", "1", "--network", "mobilenetv1_0.25", "--backend", "cuda-sim", "--json"])
            .args(["--conf-threshold", "0.3", "--cuda-graph", graph])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let on = detect("on");
    assert!(on.contains("\"score\""), "some detections to compare: {on}");
    assert_eq!(on, detect("off"));
    let bad = std::process::Command::new(bin)
        .arg("detect")
        .arg(&path)
        .args(["--synthetic-seed", "1", "--network", "mobilenetv1_0.25", "--cuda-graph", "maybe"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("maybe") && err.contains("on, off"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
