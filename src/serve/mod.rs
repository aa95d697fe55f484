//! `retinaface serve`: an inference server on tokio + hyper with an axum router.
//!
//! Connections are accepted and driven by hyper directly (not `axum::serve`) because `axum::serve`
//! sets no header-read timeout and exposes no way to set one; here every connection gets the explicit
//! `--header-read-timeout-ms`, and handlers bound the body read with `--body-read-timeout-ms`.
//!
//! Threads: the async runtime (two workers: it only parses and routes), a bounded pool of blocking
//! threads that decode images, and executor threads that run batches: one on the CPU (whose forward
//! pass is itself parallel on rayon's pool), `--streams` on a CUDA backend, each with its own engine
//! and stream, so that several batches are in flight on the device.

pub mod batcher;
pub mod config;
mod conn_io;
pub mod http;
pub mod memory;
pub mod metrics;
pub mod v2;

pub use batcher::Gate;
pub use config::{Backend, Config, LogFormat, ServeArgs};

use crate::engine::Engine;
use crate::error::{Error, Result};
use batcher::Batcher;
use http::AppState;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use metrics::Metrics;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// A batch whose forward pass may take this much (or an eighth of `--max-memory`, if less) is
/// "large": once the queue is empty after it, the engine's spare buffers are dropped and freed
/// memory handed back to the OS. Smaller ones keep their buffers for the next request, which saves
/// their page faults (a 1080p frame of mobilenetv1_0.25 takes about 140 MiB).
const RELEASE_ABOVE_BYTES: u64 = 128 << 20;

/// After a device fault, how long the server keeps answering 503 (ready and infer) before it exits:
/// long enough for a probe or a load balancer to see it rather than only a closed port.
const FAULT_LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// Hooks for tests only; the CLI never sets them.
#[doc(hidden)]
#[derive(Default, Clone)]
pub struct TestHooks {
    /// While this gate is closed the executor takes nothing from the queue ("all workers blocked").
    pub executor_gate: Option<Arc<Gate>>,
}

/// A running server. Dropping it without `shutdown` leaves the server running until the process ends.
pub struct ServerHandle {
    addr: SocketAddr,
    metrics_addr: SocketAddr,
    stop: Arc<Notify>,
    state: Arc<AppState>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl ServerHandle {
    /// Loads the engine, binds both ports and starts serving on background threads; returns once
    /// the server accepts connections. With port 0 the OS picks free ports: see `addr`.
    pub fn start(args: ServeArgs) -> Result<ServerHandle> {
        Self::start_inner(args, TestHooks::default(), false)
    }

    /// As `start`, and SIGTERM/SIGINT start the graceful shutdown (what `run` does, without blocking).
    pub fn start_with_signals(args: ServeArgs) -> Result<ServerHandle> {
        Self::start_inner(args, TestHooks::default(), true)
    }

    #[doc(hidden)]
    pub fn start_with_hooks(args: ServeArgs, hooks: TestHooks, handle_signals: bool) -> Result<ServerHandle> {
        Self::start_inner(args, hooks, handle_signals)
    }

    /// Whether `/v2/health/ready` answers 200 (false from the start of shutdown).
    pub fn is_ready(&self) -> bool {
        self.state.ready.load(Ordering::Acquire)
    }

    /// Address of the inference API.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Address of the Prometheus endpoint.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The server's metrics, for tests that check what ran.
    pub fn metrics(&self) -> &Metrics {
        &self.state.metrics
    }

    /// Starts the graceful shutdown SIGTERM starts (readiness false, no new connections, in-flight
    /// requests finished) and waits for it.
    pub fn shutdown(mut self) -> Result<()> {
        self.stop.notify_one();
        self.join_inner()
    }

    /// Waits until the server stops (after SIGTERM/SIGINT when started by `run`).
    pub fn join(mut self) -> Result<()> {
        self.join_inner()
    }

    fn join_inner(&mut self) -> Result<()> {
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| Error::InvalidArgument("server thread panicked".into()))?,
            None => Ok(()),
        }
    }

    fn start_inner(args: ServeArgs, hooks: TestHooks, handle_signals: bool) -> Result<ServerHandle> {
        let cfg = Arc::new(Config::from_args(&args)?);
        let t0 = Instant::now();
        let plan_cache = args.plan_cache_mb.checked_mul(1 << 20).ok_or_else(|| {
            Error::InvalidArgument(format!("--plan-cache-mb {} overflows a byte count", args.plan_cache_mb))
        })?;
        let load = |backend: Backend| -> Result<(Engine, String)> {
            let mut engine = Engine::new(&cfg.weights, cfg.network)?;
            engine.set_cuda_graphs(args.cuda_graph.is_on())?;
            let line = engine.set_backend_with(backend, args.precision)?;
            engine.set_plan_cache_bytes(plan_cache)?;
            Ok((engine, line))
        };
        let (first, backend) = load(args.backend)?;
        // On a CUDA backend each executor has its own runner, hence its own stream: several batches
        // are in flight at once. The CPU executor already spreads one batch over every core.
        let resolved = first.backend();
        let executors = if resolved == Backend::Cpu { 1 } else { cfg.streams };
        let mut engines = vec![Arc::new(first)];
        for _ in 1..executors {
            engines.push(Arc::new(load(resolved)?.0));
        }
        let engine = engines[0].clone();
        let backend = backend.trim_start_matches("backend ");
        tracing::info!(network = %engine.network(), ms = t0.elapsed().as_millis() as u64, %backend, executors, "engine loaded");

        let bind = |a: SocketAddr| -> Result<std::net::TcpListener> {
            let l = std::net::TcpListener::bind(a).map_err(|e| Error::io(format!("listen on {a}"), e))?;
            l.set_nonblocking(true).map_err(|e| Error::io(format!("listen on {a}"), e))?;
            Ok(l)
        };
        let api = bind(cfg.listen)?;
        let met = bind(cfg.metrics_listen)?;
        let addr = api.local_addr().map_err(|e| Error::io("local address", e))?;
        let metrics_addr = met.local_addr().map_err(|e| Error::io("local address", e))?;

        let metrics = Arc::new(Metrics::default());
        let forward = memory::ForwardModel::new(engine.graph());
        let batcher = Batcher::new(
            cfg.max_batch,
            cfg.max_queue_delay,
            cfg.max_queue,
            cfg.queue_timeout,
            metrics.clone(),
            forward.clone(),
            RELEASE_ABOVE_BYTES.min(cfg.max_memory / 8),
        );
        let state = Arc::new(AppState {
            cfg: cfg.clone(),
            batcher: batcher.clone(),
            metrics,
            ready: AtomicBool::new(false),
            decode_pool: Arc::new(tokio::sync::Semaphore::new(cfg.decode_workers)),
            budget: memory::Budget::new(cfg.max_memory),
            forward,
            body_bytes: memory::Budget::new(cfg.max_body_bytes_in_flight),
            network: engine.network().to_string(),
        });

        let stop = Arc::new(Notify::new());
        let mut execs = Vec::with_capacity(engines.len());
        for engine in engines {
            let (batcher, opts, gate) = (batcher.clone(), cfg.detect, hooks.executor_gate.clone());
            let (state, stop) = (state.clone(), stop.clone());
            let exec = std::thread::Builder::new()
                .name("retinaface-exec".into())
                .spawn(move || {
                    batcher.run_executor(&engine, &opts, gate.as_deref());
                    // The loop ends early only when the device failed: answer 503 (ready and infer)
                    // for a moment, so probes and load balancers see it, then stop serving so the
                    // process exits non-zero and its orchestrator starts a fresh one.
                    if batcher.fault().is_some() {
                        state.ready.store(false, Ordering::Release);
                        std::thread::sleep(FAULT_LINGER);
                        stop.notify_one();
                    }
                })
                .map_err(|e| Error::io("executor thread", e))?;
            execs.push(exec);
        }

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(cfg.decode_workers + 2)
            .thread_name("retinaface-http")
            .enable_all()
            .build()
            .map_err(|e| Error::io("tokio runtime", e))?;
        let (started_tx, started_rx) = std::sync::mpsc::channel::<Result<()>>();
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::Builder::new()
                .name("retinaface-serve".into())
                .spawn(move || -> Result<()> {
                    let r = rt.block_on(serve_until_stopped(state.clone(), api, met, stop, handle_signals, started_tx));
                    batcher.shutdown();
                    if let Err(Stopped::Forced) = r {
                        // A second signal: do not wait for the batch that may be running.
                        rt.shutdown_background();
                        tracing::warn!("server stopped by a second signal; in-flight requests abandoned");
                        return Err(Error::Serve("stopped by a second signal; in-flight requests abandoned".into()));
                    }
                    // Every connection is closed: let the executor finish what is queued, then stop.
                    for exec in execs {
                        exec.join().map_err(|_| Error::InvalidArgument("executor thread panicked".into()))?;
                    }
                    rt.shutdown_timeout(std::time::Duration::from_secs(1));
                    tracing::info!("server stopped");
                    if let Some(f) = batcher.fault() {
                        return Err(Error::Serve(format!(
                            "the device failed ({f}); exiting so that the server is restarted"
                        )));
                    }
                    r.map_err(|e| match e {
                        Stopped::Failed(e) => e,
                        Stopped::Abandoned(t) => Error::Serve(format!(
                            "in-flight requests did not finish within the shutdown timeout of {t} ms and were abandoned"
                        )),
                        Stopped::Forced => Error::Serve("stopped by a second signal".into()),
                    })
                })
                .map_err(|e| Error::io("server thread", e))?
        };
        match started_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return match thread.join() {
                    Ok(Err(e)) => Err(e),
                    _ => Err(Error::InvalidArgument("server thread ended before it started".into())),
                };
            }
        }
        tracing::info!(%addr, %metrics_addr, model = %cfg.model_name, max_batch = cfg.max_batch, max_queue = cfg.max_queue, "serving");
        Ok(ServerHandle { addr, metrics_addr, stop, state, thread: Some(thread) })
    }
}

/// Runs the server until SIGTERM or SIGINT, then drains in-flight requests and returns Ok.
pub fn run(args: ServeArgs) -> Result<()> {
    init_tracing(args.log_format);
    ServerHandle::start_inner(args, TestHooks::default(), true)?.join()
}

/// Installs the log subscriber (RUST_LOG filters, default info) unless the program already has one.
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: escape codes in a collected log file are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => b.try_init(),
        LogFormat::Json => b.json().try_init(),
    };
}

/// How serving ended, when not cleanly.
enum Stopped {
    Failed(Error),
    /// The shutdown timeout (ms) passed with requests in flight.
    Abandoned(u64),
    /// A second SIGTERM/SIGINT during the drain.
    Forced,
}

async fn serve_until_stopped(
    state: Arc<AppState>,
    api: std::net::TcpListener,
    met: std::net::TcpListener,
    stop: Arc<Notify>,
    handle_signals: bool,
    started: std::sync::mpsc::Sender<Result<()>>,
) -> std::result::Result<(), Stopped> {
    let listeners = (TcpListener::from_std(api), TcpListener::from_std(met));
    let (api, met) = match listeners {
        (Ok(a), Ok(m)) => (a, m),
        (Err(e), _) | (_, Err(e)) => {
            let err = Error::io("listener", e);
            let _ = started.send(Err(Error::InvalidArgument(err.to_string())));
            return Err(Stopped::Failed(err));
        }
    };
    // Signals are listened for from here on, so a second one during the drain is seen too.
    let mut signals = Signals::new(handle_signals);
    let graceful = GracefulShutdown::new();
    let api_router = http::router(state.clone());
    let met_router = http::metrics_router(state.clone());
    state.ready.store(true, Ordering::Release);
    let _ = started.send(Ok(()));
    let mut errors = AcceptErrors::default();
    loop {
        let failed = tokio::select! {
            r = api.accept() => accept(r, &api_router, &graceful, &state),
            r = met.accept() => accept(r, &met_router, &graceful, &state),
            _ = stop.notified() => { tracing::info!("shutdown requested"); break; }
            s = signals.next() => { tracing::info!(signal = s, "shutting down"); break; }
        };
        match failed {
            None => errors.reset(),
            Some(e) => {
                // Out of descriptors (EMFILE) the listener stays readable and accept fails at once,
                // forever: pause accepting, longer each time, and log at a bounded rate.
                let pause = errors.record(&e);
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.notified() => { tracing::info!("shutdown requested"); break; }
                    s = signals.next() => { tracing::info!(signal = s, "shutting down"); break; }
                }
            }
        }
    }
    // Readiness goes false first so load balancers stop sending; listeners close; then connections
    // finish their in-flight requests (idle keep-alive ones close at once).
    state.ready.store(false, Ordering::Release);
    drop(api);
    drop(met);
    let t = state.cfg.shutdown_timeout;
    tokio::select! {
        r = tokio::time::timeout(t, graceful.shutdown()) => {
            if r.is_err() {
                tracing::warn!(timeout_ms = t.as_millis() as u64, "in-flight requests did not finish in time; closing anyway");
                return Err(Stopped::Abandoned(t.as_millis() as u64));
            }
        }
        s = signals.next() => {
            tracing::warn!(signal = s, "second signal during the drain: exiting now");
            return Err(Stopped::Forced);
        }
    }
    Ok(())
}

/// Accept failures since the last success: the pause before the next accept doubles from 5 ms to
/// 1 s, and at most one log line a second says how many failed.
#[derive(Default)]
struct AcceptErrors {
    pause: std::time::Duration,
    failed: u64,
    last_log: Option<Instant>,
}

impl AcceptErrors {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(5);
    const MAX: std::time::Duration = std::time::Duration::from_secs(1);
    const LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

    fn reset(&mut self) {
        self.pause = std::time::Duration::ZERO;
    }

    fn record(&mut self, e: &std::io::Error) -> std::time::Duration {
        self.failed += 1;
        self.pause = if self.pause.is_zero() { Self::FIRST } else { (self.pause * 2).min(Self::MAX) };
        if self.last_log.is_none_or(|t| t.elapsed() >= Self::LOG_EVERY) {
            // Typically EMFILE (out of file descriptors) or a connection reset before accept.
            tracing::warn!(error = %e, failed = self.failed, pause_ms = self.pause.as_millis() as u64, "accept failed; pausing accepts");
            self.last_log = Some(Instant::now());
            self.failed = 0;
        }
        self.pause
    }
}

/// Returns the error when accept failed, for the caller to back off.
fn accept(
    r: std::io::Result<(tokio::net::TcpStream, SocketAddr)>,
    router: &axum::Router,
    graceful: &GracefulShutdown,
    state: &AppState,
) -> Option<std::io::Error> {
    let (stream, peer) = match r {
        Ok(x) => x,
        Err(e) => return Some(e),
    };
    let _ = stream.set_nodelay(true);
    let svc = TowerToHyperService::new(router.clone());
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new()).header_read_timeout(state.cfg.header_read_timeout).keep_alive(true);
    let conn = graceful.watch(b.serve_connection(TokioIo::new(conn_io::JsonParseErrors::new(stream)), svc));
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%peer, error = %e, "connection closed with an error");
        }
    });
    None
}

/// SIGTERM and SIGINT as a stream (none when the server was started without signal handling).
struct Signals {
    #[cfg(unix)]
    streams: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
    #[cfg(not(unix))]
    enabled: bool,
}

impl Signals {
    #[cfg(unix)]
    fn new(enabled: bool) -> Signals {
        use tokio::signal::unix::{SignalKind, signal};
        if !enabled {
            return Signals { streams: None };
        }
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(t), Ok(i)) => Signals { streams: Some((t, i)) },
            _ => {
                tracing::error!("cannot install signal handlers; stop the server with SIGKILL");
                Signals { streams: None }
            }
        }
    }

    #[cfg(not(unix))]
    fn new(enabled: bool) -> Signals {
        Signals { enabled }
    }

    /// The next signal's name; never returns when signals are not handled.
    #[cfg(unix)]
    async fn next(&mut self) -> &'static str {
        match &mut self.streams {
            Some((term, int)) => tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            },
            None => std::future::pending().await,
        }
    }

    #[cfg(not(unix))]
    async fn next(&mut self) -> &'static str {
        if !self.enabled {
            return std::future::pending().await;
        }
        let _ = tokio::signal::ctrl_c().await;
        "ctrl-c"
    }
}
