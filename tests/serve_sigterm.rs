//! SIGTERM drains the server: readiness false, no new connections, the in-flight request answered,
//! and `join` returns Ok (the CLI then exits 0). Its own test binary: the signal is process-wide.

mod serve_util;

use serve_util::*;
use std::time::Duration;

#[test]
fn sigterm_drains_in_flight_requests_and_stops() {
    let (server, gate) = start_gated(&["--shutdown-timeout-ms", "20000"], true);
    let a = server.addr();
    let img = read_image("trio.jpg");
    let client = std::thread::spawn(move || detect(a, &img));
    wait_until(Duration::from_secs(10), "the request queued", || {
        metric(a, "nv_inference_pending_request_count") == 1.0
    });
    let pid = std::process::id().to_string();
    let st = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs");
    assert!(st.success());
    wait_until(Duration::from_secs(5), "readiness false", || !server.is_ready());
    wait_until(Duration::from_secs(5), "listener closed", || {
        std::net::TcpStream::connect_timeout(&a, Duration::from_millis(200)).is_err()
    });
    // The in-flight request still gets its answer once the executor runs.
    gate.open();
    let r = client.join().expect("client");
    assert_eq!(r.status, 200, "{}", r.text());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(server.join());
    });
    let done = rx.recv_timeout(Duration::from_secs(10)).expect("server stopped in time");
    assert!(done.is_ok(), "{done:?}");
}
