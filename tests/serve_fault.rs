//! A device fault through the real server: `retinaface serve --backend cuda-sim` with a sticky fault
//! injected into the simulation (RETINAFACE_SIM_FAULT) answers the failing request 503, turns
//! `/v2/health/ready` to 503, refuses further work, and exits non-zero so an orchestrator restarts it.
#![cfg(feature = "cuda-sim")]

mod serve_util;

use serve_util::*;
use std::time::Duration;

fn small_png() -> Vec<u8> {
    let data = (0..32 * 32 * 3).map(|i| (i * 7 % 251) as u8).collect();
    png_of(&retinaface::BgrImage { width: 32, height: 32, data })
}

#[test]
fn a_device_fault_turns_serve_unready_refuses_work_and_exits_non_zero() {
    let flags = ["--backend", "cuda-sim", "--synthetic-seed", "1", "--network", "mobilenetv1_0.25", "--max-batch", "1"];
    let mut server = spawn_server(&flags, "export RETINAFACE_SIM_FAULT=conv3x3;");
    let a = server.addr;
    assert_eq!(get(a, "/v2/health/ready").status, 200, "ready before the fault");
    let r = detect(a, &small_png());
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.error().contains("device failed") && r.error().contains("illegal memory access"), "{}", r.text());
    // The server answers 503 for a moment before it exits, so a probe sees why.
    assert_eq!(get(a, "/v2/health/ready").status, 503, "not ready after the fault");
    assert_eq!(get(a, "/v2/models/retinaface/ready").status, 503);
    let again = detect(a, &small_png());
    assert_eq!(again.status, 503, "no more work: {}", again.text());
    let st = server.wait(Duration::from_secs(30));
    assert!(!st.success(), "exits non-zero for a restart: {st:?}");
    let logs: Vec<String> = server.logs.try_iter().collect();
    assert!(logs.iter().any(|l| l.contains("device is unusable")), "{logs:?}");
}

#[test]
fn a_healthy_cuda_sim_server_stays_ready() {
    let flags =
        ["--backend", "cuda-sim", "--synthetic-seed", "1", "--network", "mobilenetv1_0.25", "--cuda-graph", "on"];
    let mut server = spawn_server(&flags, "");
    let a = server.addr;
    for _ in 0..2 {
        let r = detect(a, &small_png());
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(get(a, "/v2/health/ready").status, 200);
    assert!(server.terminate(Duration::from_secs(30)).success());
}

/// Several executors on separate streams (`--streams 3`) answer concurrent requests exactly as one
/// executor does.
#[test]
fn several_streams_answer_concurrent_requests_as_one_does() {
    let base = ["--backend", "cuda-sim", "--synthetic-seed", "1", "--network", "mobilenetv1_0.25"];
    let pngs: Vec<Vec<u8>> = (0..6)
        .map(|k| {
            let data = (0..32 * 40 * 3).map(|i| ((i * (7 + k) + k) % 251) as u8).collect();
            png_of(&retinaface::BgrImage { width: 40, height: 32, data })
        })
        .collect();
    let one = start(&[&base[..], &["--streams", "1"]].concat());
    let want: Vec<String> = pngs.iter().map(|p| detect(one.addr(), p).text()).collect();
    one.shutdown().unwrap();
    let many = start(&[&base[..], &["--streams", "3", "--max-batch", "2", "--max-queue-delay-us", "0"]].concat());
    let a = many.addr();
    let got: Vec<(u16, String)> = std::thread::scope(|s| {
        let hs: Vec<_> = pngs
            .iter()
            .map(|p| {
                s.spawn(move || {
                    let r = detect(a, p);
                    (r.status, r.text())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (status, text)) in got.iter().enumerate() {
        assert_eq!(*status, 200, "{text}");
        assert_eq!(text, &want[i], "request {i}");
    }
    many.shutdown().unwrap();
}

#[test]
fn streams_out_of_range_are_named() {
    let err =
        retinaface::serve::ServeArgs::parse_from_flags(["--synthetic-seed", "1", "--streams", "0"].map(String::from))
            .and_then(|a| retinaface::serve::Config::from_args(&a).map(|_| ()))
            .unwrap_err()
            .to_string();
    assert!(err.contains("--streams 0"), "{err}");
}
