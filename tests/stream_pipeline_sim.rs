//! Double-buffered batches in the CPU simulation: `detect_stream` (upload of batch k+1 and download of
//! batch k-1 on the copy stream while batch k runs on the compute stream) gives exactly what one
//! batch at a time gives, in every order the two streams may run in; and with either cross-stream
//! wait left out, the simulation's stream order makes the results wrong, so a missing event cannot
//! pass unnoticed.
#![cfg(feature = "cuda-sim")]

mod common;
mod rng;

use common::hooked::counting_launches;
use retinaface::cuda::sim::{SimRunner, StreamOrder};
use retinaface::cuda::{GpuEngine, KernelRunner, KernelRunnerExt, PipelineWait, Stream};
use retinaface::exec::StreamBatch;
use retinaface::{BgrImage, Detection, Engine, Network, PostOptions, WeightsSpec};
use std::borrow::Cow;

fn network_graph(net: Network) -> retinaface::model::graph::Graph {
    Engine::new(&WeightsSpec::Synthetic { seed: 3 }, Some(net)).unwrap().graph().clone()
}

fn images(n: usize, h: usize, w: usize, seed: u64) -> Vec<BgrImage> {
    let mut r = rng::Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    (0..n)
        .map(|_| BgrImage { width: w, height: h, data: (0..h * w * 3).map(|_| (r.next() >> 56) as u8).collect() })
        .collect()
}

fn bits(d: &[Vec<Detection>]) -> Vec<Vec<u32>> {
    d.iter()
        .map(|d| {
            d.iter().flat_map(|x| x.bbox.iter().chain([&x.score]).chain(&x.landmarks).map(|v| v.to_bits())).collect()
        })
        .collect()
}

/// The batches of a stream: five of one size (slots reused twice over), then two of another (the
/// stream drains before a new plan), each image with its own resize factor.
fn batches() -> Vec<(Vec<BgrImage>, Vec<f64>)> {
    let sizes = [(2, 32, 48), (2, 32, 48), (2, 32, 48), (2, 32, 48), (2, 32, 48), (3, 40, 40), (3, 40, 40)];
    sizes
        .iter()
        .enumerate()
        .map(|(i, &(n, h, w))| (images(n, h, w, 50 + i as u64), (0..n).map(|j| 1.0 + 0.25 * (i + j) as f64).collect()))
        .collect()
}

fn post() -> PostOptions {
    PostOptions { conf_threshold: 0.3, ..PostOptions::default() }
}

/// Each batch alone through `detect_scaled`, on the compute stream only.
fn one_at_a_time(graph: &retinaface::model::graph::Graph, b: &[(Vec<BgrImage>, Vec<f64>)]) -> Vec<Vec<Vec<u32>>> {
    let mut g = GpuEngine::with_runner(graph, Box::new(SimRunner::new())).unwrap();
    b.iter()
        .map(|(imgs, scales)| {
            let refs: Vec<&BgrImage> = imgs.iter().collect();
            let f: Vec<f32> = scales.iter().map(|&s| s as f32).collect();
            bits(&g.detect_scaled(&refs, &post(), &f).unwrap())
        })
        .collect()
}

/// The stream through `detect_stream` on a simulation running its streams in `order`.
fn streamed(
    graph: &retinaface::model::graph::Graph,
    b: &[(Vec<BgrImage>, Vec<f64>)],
    order: StreamOrder,
    graphs: bool,
    skip: Option<PipelineWait>,
) -> retinaface::Result<Vec<Vec<Vec<u32>>>> {
    let mut r = SimRunner::new();
    r.set_stream_order(order)?;
    let mut g = GpuEngine::with_runner(graph, Box::new(r))?;
    g.set_cuda_graphs(graphs);
    g.skip_pipeline_wait(skip);
    let mut it = b.iter().map(|(imgs, scales)| {
        Ok(StreamBatch { images: imgs.iter().map(Cow::Borrowed).collect(), scales: scales.clone() })
    });
    let mut out = Vec::new();
    g.detect_stream(&mut it, &post(), &mut |d| {
        out.push(bits(&d));
        Ok(())
    })?;
    Ok(out)
}

const ORDERS: [StreamOrder; 3] =
    [StreamOrder::AsIssued, StreamOrder::HoldBack(Stream::Copy), StreamOrder::HoldBack(Stream::Compute)];

#[test]
fn detect_stream_equals_one_batch_at_a_time_in_every_stream_order() {
    let graph = network_graph(Network::MobileNetV1_025);
    let b = batches();
    let want = one_at_a_time(&graph, &b);
    let found: usize = want.iter().flatten().map(|d| d.len() / 15).sum();
    assert!(found > 20, "the batches must give detections to compare ({found})");
    for order in ORDERS {
        for graphs in [true, false] {
            let got = streamed(&graph, &b, order, graphs, None).unwrap();
            assert_eq!(got, want, "stream order {order:?}, graphs {graphs}");
        }
    }
}

/// Without the compute stream's wait for the upload, holding the copy stream back runs each pass on
/// the slot's old bytes; without the copy stream's wait for the pass, holding the compute stream back
/// downloads detections before they are made. Either shows as an error or a wrong result.
#[test]
fn a_missing_cross_stream_wait_is_caught() {
    let graph = network_graph(Network::MobileNetV1_025);
    let b = batches();
    let want = one_at_a_time(&graph, &b);
    for (skip, order) in [
        (PipelineWait::ComputeAfterUpload, StreamOrder::HoldBack(Stream::Copy)),
        (PipelineWait::DownloadAfterCompute, StreamOrder::HoldBack(Stream::Compute)),
    ] {
        match streamed(&graph, &b, order, true, Some(skip)) {
            Ok(got) => assert_ne!(got, want, "{skip:?} left out under {order:?} went unnoticed"),
            Err(e) => println!("{skip:?} left out under {order:?}: {e}"),
        }
        // The same order with every wait in place is right (the order alone is no error).
        assert_eq!(streamed(&graph, &b, order, true, None).unwrap(), want, "{order:?} with every wait");
    }
}

/// The runner's own rules: a wait orders a copy-stream write before a compute-stream read in every
/// order; without it a held-back copy stream leaves the read with the old bytes; a download on the
/// copy stream is readable only after the host waited for it.
#[test]
fn simulated_streams_follow_events() {
    for (order, wait) in [
        (StreamOrder::AsIssued, false),
        (StreamOrder::HoldBack(Stream::Copy), true),
        (StreamOrder::HoldBack(Stream::Compute), true),
        (StreamOrder::HoldBack(Stream::Copy), false),
    ] {
        let mut r = SimRunner::new();
        r.set_stream_order(order).unwrap();
        let src = r.alloc(8).unwrap();
        r.upload(src, 0, &[1; 8]).unwrap();
        r.synchronize().unwrap();
        let e = r.event_create().unwrap();
        r.upload_staged_on(Stream::Copy, src, 0, &[&[7; 8]]).unwrap();
        r.event_record_on(Stream::Copy, e).unwrap();
        if wait {
            r.wait_event(Stream::Compute, e).unwrap();
        }
        // A read of src on the compute stream: it sees the bytes src holds when it runs.
        let rb = r.download_async_on(Stream::Compute, src, 0, 8).unwrap();
        let early = r.read_back(rb, &mut [0; 8]).unwrap_err().to_string();
        assert!(early.contains("before synchronize"), "{early}");
        let rb = r.download_async_on(Stream::Compute, src, 0, 8).unwrap();
        let done = r.event_create().unwrap();
        r.event_record_on(Stream::Compute, done).unwrap();
        r.event_synchronize(done).unwrap();
        let mut seen = [0u8; 8];
        r.read_back(rb, &mut seen).unwrap();
        let want = if wait || order == StreamOrder::AsIssued { 7 } else { 1 };
        assert_eq!(seen, [want; 8], "{order:?}, wait {wait}");
        r.synchronize().unwrap();
        assert_eq!(r.download_f32(src, 2).unwrap(), vec![f32::from_le_bytes([7; 4]); 2]);
        r.free(src).unwrap();
    }
}

/// `bench --input-on-device`: the staged batch runs through graphs captured over its own slot (a
/// second pass launches nothing itself, it replays), and gives what the same images give from the
/// host, with graphs and without; a host pass between staged ones leaves the staged bytes alone.
#[test]
fn a_staged_batch_replays_its_graphs_and_equals_the_host_pass() {
    use std::sync::atomic::Ordering;
    let graph = network_graph(Network::MobileNetV1_025);
    let imgs = images(2, 32, 48, 7);
    let other = images(2, 32, 48, 8);
    let (refs, other_refs): (Vec<&BgrImage>, Vec<&BgrImage>) = (imgs.iter().collect(), other.iter().collect());
    let mut want = None;
    for graphs in [true, false] {
        let (runner, launches) = counting_launches(SimRunner::new());
        let mut g = GpuEngine::with_runner(&graph, Box::new(runner)).unwrap();
        g.set_cuda_graphs(graphs);
        let host = bits(&g.detect_scaled(&refs, &post(), &[1.0, 1.0]).unwrap());
        assert!(host.iter().any(|d| !d.is_empty()), "the batch gives detections to compare");
        assert_eq!(*want.get_or_insert_with(|| host.clone()), host);
        g.stage_input(&refs).unwrap();
        assert_eq!(bits(&g.detect_staged(&post()).unwrap()), host, "graphs {graphs}: first staged pass");
        let before = launches.load(Ordering::Relaxed);
        assert_eq!(bits(&g.detect_staged(&post()).unwrap()), host, "graphs {graphs}: second staged pass");
        let issued = launches.load(Ordering::Relaxed) - before;
        if graphs {
            assert_eq!(issued, 0, "a staged pass with graphs on replays them");
        } else {
            assert!(issued > 20, "without graphs every kernel is launched: {issued}");
        }
        let o = g.detect_scaled(&other_refs, &post(), &[1.0, 1.0]).unwrap();
        assert_ne!(bits(&o), host, "the other batch differs");
        assert_eq!(bits(&g.detect_staged(&post()).unwrap()), host, "graphs {graphs}: staged after a host pass");
        let mode = retinaface::exec::BenchMode { input_on_device: true, forward_only: false };
        g.bench_pass(&refs, mode, &post(), None).unwrap();
    }
}
