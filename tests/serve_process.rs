//! `retinaface serve` as a process: out of file descriptors its accept loop backs off and logs at a
//! bounded rate; a drain cut by the shutdown timeout, or by a second SIGTERM, exits non-zero.

mod serve_util;

use serve_util::*;
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// User plus system CPU time of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime");
    ticks / 100.0
}

fn drain(logs: &std::sync::mpsc::Receiver<String>) -> Vec<String> {
    logs.try_iter().collect()
}

#[test]
fn out_of_descriptors_the_accept_loop_backs_off_and_recovers() {
    // The case 8: a 64-descriptor limit and 150 idle connections.
    let server = spawn_server(&["--header-read-timeout-ms", "60000"], "ulimit -n 64;");
    let a = server.addr;
    let idle: Vec<TcpStream> =
        (0..150).filter_map(|_| TcpStream::connect_timeout(&a, Duration::from_millis(500)).ok()).collect();
    assert!(idle.len() >= 100, "connections made: {}", idle.len());
    std::thread::sleep(Duration::from_millis(500));
    let _ = drain(&server.logs);
    let cpu0 = cpu_seconds(server.proc.id());
    std::thread::sleep(Duration::from_secs(4));
    let cpu = cpu_seconds(server.proc.id()) - cpu0;
    let lines = drain(&server.logs);
    let failures = lines.iter().filter(|l| l.contains("accept failed")).count();
    assert!(failures >= 1, "the failure is logged: {lines:?}");
    assert!(failures <= 6, "at most about one line a second, got {failures} in 4 s");
    assert!(cpu < 0.4, "the loop does not spin: {cpu:.2} s of CPU in 4 s");
    // Descriptors back: the server answers again.
    drop(idle);
    wait_until(Duration::from_secs(10), "served again", || {
        TcpStream::connect_timeout(&a, Duration::from_millis(500)).is_ok() && get(a, "/v2/health/ready").status == 200
    });
}

/// A request whose body never finishes: in flight until the body timeout.
fn stalled_request(a: std::net::SocketAddr) -> TcpStream {
    let mut s = connect(a);
    s.write_all(b"POST /v1/detect HTTP/1.1\r\nHost: t\r\nContent-Type: image/jpeg\r\nContent-Length: 1000\r\n\r\nabc")
        .expect("head");
    s
}

fn wait_for_log(server: &Child, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let line = server.logs.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect(text);
        if line.contains(text) {
            return;
        }
    }
}

#[test]
fn a_drain_cut_by_the_shutdown_timeout_exits_non_zero() {
    let mut server = spawn_server(&["--shutdown-timeout-ms", "500", "--body-read-timeout-ms", "60000"], "");
    let _s = stalled_request(server.addr);
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    let st = server.terminate(Duration::from_secs(20));
    assert!(!st.success(), "the abandoned request is reported by the exit status: {st:?}");
    assert!(t0.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_second_sigterm_forces_the_exit() {
    let mut server = spawn_server(&["--shutdown-timeout-ms", "60000", "--body-read-timeout-ms", "60000"], "");
    let _s = stalled_request(server.addr);
    std::thread::sleep(Duration::from_millis(200));
    let pid = server.proc.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
    wait_for_log(&server, "shutting down");
    let t0 = Instant::now();
    let st = server.terminate(Duration::from_secs(10));
    assert!(!st.success(), "forced exit is not a clean one: {st:?}");
    assert!(t0.elapsed() < Duration::from_secs(5), "second SIGTERM took {:?}", t0.elapsed());
}

#[test]
fn a_clean_drain_still_exits_zero() {
    let mut server = spawn_server(&["--shutdown-timeout-ms", "20000"], "");
    assert_eq!(detect(server.addr, &read_image("trio.jpg")).status, 200);
    let st = server.terminate(Duration::from_secs(30));
    assert!(st.success(), "{st:?}");
}
