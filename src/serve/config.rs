//! `retinaface serve` flags and the validated settings the server runs with.

use crate::DetectOptions;
use crate::error::{Error, Result};
use crate::image_io::{DecodeLimits, ResizeMode};
use crate::network::Network;
use crate::weights::WeightsSpec;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

pub use crate::exec::Backend;

/// Flags of `retinaface serve`. The CLI flattens this into its `serve` subcommand.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// Weights file (.pth or .safetensors).
    #[arg(long, conflicts_with = "synthetic_seed", required_unless_present = "synthetic_seed")]
    pub weights: Option<PathBuf>,
    /// Use the reproducible synthetic weights with this seed instead of a file (needs --network).
    #[arg(long)]
    pub synthetic_seed: Option<u64>,
    /// Network name; inferred from the weights file when omitted.
    #[arg(long)]
    pub network: Option<String>,
    /// Compute backend: cpu, cuda (needs a GPU), auto (CUDA when a GPU is present, else cpu) or cuda-sim.
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub backend: Backend,
    /// CUDA backends: replay one captured CUDA graph per batch size (on) or launch every kernel (off).
    #[arg(long, value_enum, default_value_t = crate::exec::Switch::On)]
    pub cuda_graph: crate::exec::Switch,
    /// CUDA backends: batches in flight at once, each run by its own executor on its own stream
    /// (1..=16). The CPU backend runs one batch at a time over all cores.
    #[arg(long, default_value_t = 2)]
    pub streams: usize,
    /// Number format of the CUDA executor: f16 (the default on a GPU) or f32 (the default in
    /// cuda-sim). The CPU computes in f32 only.
    #[arg(long, value_enum)]
    pub precision: Option<crate::exec::Precision>,
    /// Address to listen on. The default listens on every interface, as a container needs.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: IpAddr,
    /// HTTP port of the inference API (0 picks a free port).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Port of the Prometheus endpoint `/metrics` (Triton's default 8002; 0 picks a free port).
    /// `/metrics` is also served on the main port.
    #[arg(long, default_value_t = 8002)]
    pub metrics_port: u16,
    /// Model name in the /v2/models/{name} routes.
    #[arg(long, default_value = "retinaface")]
    pub model_name: String,
    /// Largest batch the dynamic batcher forms (1 disables batching).
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// How long the oldest queued request may wait for its batch to fill, in microseconds.
    #[arg(long, default_value_t = 2000)]
    pub max_queue_delay_us: u64,
    /// Requests admitted but not yet executing (decoding or queued); one more is refused with 503 at once.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// A request still queued after this long is answered 503 and never executed (0: no timeout).
    #[arg(long, default_value_t = 5000)]
    pub queue_timeout_ms: u64,
    /// Largest request body; a larger declared Content-Length is refused with 413 before it is read.
    #[arg(long, default_value_t = 20 * 1024 * 1024, value_parser = parse_body_bytes)]
    pub max_body_bytes: usize,
    /// Largest decoded image, in pixels (checked from the header, before any pixel is decoded).
    /// The forward pass's memory grows with pixels times batch size: lower this or --max-batch to
    /// bound it (default 4096x4096).
    #[arg(long, default_value_t = 16_777_216)]
    pub max_image_pixels: u64,
    /// Resize before the network: original, multiscale or long-side:N (as `retinaface detect`).
    #[arg(long, default_value = "original")]
    pub resize: String,
    /// Threads that decode images and parse JSON, off the async runtime (0: one per CPU; at most
    /// 4 per CPU, and 256).
    #[arg(long, default_value_t = 0)]
    pub decode_workers: usize,
    /// Memory the requests being served may use together: decoded images and forward-pass buffers,
    /// counted from the image headers before decoding. A request that does not fit beside the others
    /// is refused with 503 at once, one larger than the whole budget with 413. Bytes, or with a K, M,
    /// G or T suffix (powers of 1024). Default: half the machine's memory (or its cgroup limit).
    #[arg(long, value_parser = parse_bytes)]
    pub max_memory: Option<u64>,
    /// Request body bytes buffered across all connections at once; a request whose body would pass
    /// it is refused with 503 before its body is read. Bytes or K/M/G suffix (default 256M, and at
    /// least --max-body-bytes).
    #[arg(long, value_parser = parse_bytes)]
    pub max_body_bytes_in_flight: Option<u64>,
    /// Time a client has to send the request line and headers.
    #[arg(long, default_value_t = 10_000)]
    pub header_read_timeout_ms: u64,
    /// Time a client has to send the whole body once the headers are in.
    #[arg(long, default_value_t = 30_000)]
    pub body_read_timeout_ms: u64,
    /// On SIGTERM, how long in-flight requests may take to finish before the server exits anyway.
    #[arg(long, default_value_t = 30_000)]
    pub shutdown_timeout_ms: u64,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// MiB of activation memory (host or device) kept for cached execution plans, one per batch and
    /// input size; the least recently used are freed past it. The plan running now always stays.
    #[arg(long, default_value_t = crate::graph::DEFAULT_PLAN_CACHE_BYTES >> 20)]
    pub plan_cache_mb: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl ServeArgs {
    /// Parses flags as the CLI would (without the program name), for tests and embedding.
    pub fn parse_from_flags<I, T>(flags: I) -> Result<ServeArgs>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: ServeArgs,
        }
        let all = std::iter::once(std::ffi::OsString::from("serve")).chain(flags.into_iter().map(Into::into));
        <Wrapper as clap::Parser>::try_parse_from(all)
            .map(|w| w.args)
            .map_err(|e| Error::InvalidArgument(e.to_string()))
    }
}

/// A byte count: digits, optionally followed by K, M, G or T (powers of 1024, an optional trailing
/// `B` or `iB` allowed).
pub fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix('B')).unwrap_or(t);
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("`{s}`: unknown unit `{c}` (K, M, G or T)")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits.trim().parse().map_err(|_| format!("`{s}` is not a byte count (e.g. 8G, 512M, 1000000)"))?;
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("`{s}` is too large"))
}

fn parse_body_bytes(s: &str) -> std::result::Result<usize, String> {
    usize::try_from(parse_bytes(s)?).map_err(|_| format!("`{s}` is too large"))
}

/// Most decode workers per CPU: more only adds threads that wait for a core and memory they hold.
const MAX_DECODE_WORKERS_PER_CPU: usize = 4;
const MAX_DECODE_WORKERS: usize = 256;
/// `--max-body-bytes-in-flight` default.
const DEFAULT_BODY_BYTES_IN_FLIGHT: u64 = 256 << 20;
/// Smallest `--max-memory`: below it not even a small photo would be admitted.
const MIN_MAX_MEMORY: u64 = 16 << 20;

/// Upper bound on the long side of `--resize long-side:N`: keeps every network input under the
/// engine's pixel limit.
const MAX_LONG_SIDE: u32 = 8000;

/// The settings the server runs with, checked once at start.
#[derive(Clone, Debug)]
pub struct Config {
    pub weights: WeightsSpec,
    pub network: Option<Network>,
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub model_name: String,
    pub max_batch: usize,
    pub max_queue_delay: Duration,
    pub max_queue: usize,
    pub queue_timeout: Option<Duration>,
    pub max_body_bytes: usize,
    pub decode_limits: DecodeLimits,
    pub detect: DetectOptions,
    pub decode_workers: usize,
    pub max_memory: u64,
    pub max_body_bytes_in_flight: u64,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub log_format: LogFormat,
    pub streams: usize,
}

impl Config {
    pub fn from_args(a: &ServeArgs) -> Result<Config> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        let weights = match (&a.weights, a.synthetic_seed) {
            (Some(p), None) => WeightsSpec::File(p.clone()),
            (None, Some(seed)) => WeightsSpec::Synthetic { seed },
            _ => return bad("give exactly one of --weights PATH and --synthetic-seed S".into()),
        };
        let network = a.network.as_deref().map(str::parse::<Network>).transpose()?;
        if a.streams == 0 || a.streams > 16 {
            return bad(format!("--streams {} is not in 1..=16", a.streams));
        }
        if a.max_batch == 0 || a.max_batch > 256 {
            return bad(format!("--max-batch {} is not in 1..=256", a.max_batch));
        }
        // A v2 request may carry up to --max-batch images, all admitted at once: a smaller queue
        // would refuse such a request forever.
        if a.max_queue < a.max_batch {
            return bad(format!("--max-queue {} must be at least --max-batch {}", a.max_queue, a.max_batch));
        }
        if a.max_body_bytes == 0 {
            return bad("--max-body-bytes must be at least 1".into());
        }
        if a.max_image_pixels == 0 || a.max_image_pixels > crate::engine::MAX_INPUT_PIXELS as u64 {
            return bad(format!(
                "--max-image-pixels {} is not in 1..={}",
                a.max_image_pixels,
                crate::engine::MAX_INPUT_PIXELS
            ));
        }
        let resize: ResizeMode = a.resize.parse()?;
        if let ResizeMode::LongSide(n) = resize
            && n > MAX_LONG_SIDE
        {
            return bad(format!("--resize long-side:{n}: at most {MAX_LONG_SIDE}"));
        }
        for (name, v) in
            [("--header-read-timeout-ms", a.header_read_timeout_ms), ("--body-read-timeout-ms", a.body_read_timeout_ms)]
        {
            if v == 0 {
                return bad(format!("{name} must be at least 1 (slow clients must be cut)"));
            }
        }
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        let max_workers = (cpus * MAX_DECODE_WORKERS_PER_CPU).min(MAX_DECODE_WORKERS);
        if a.decode_workers > max_workers {
            return bad(format!(
                "--decode-workers {} is more than {max_workers} ({MAX_DECODE_WORKERS_PER_CPU} per CPU on {cpus} CPUs, at most {MAX_DECODE_WORKERS})",
                a.decode_workers
            ));
        }
        let decode_workers = if a.decode_workers == 0 { cpus } else { a.decode_workers };
        if let Err(e) = super::memory::machine_memory_override() {
            return bad(e);
        }
        let max_memory = a.max_memory.unwrap_or_else(super::memory::default_max_memory);
        if max_memory < MIN_MAX_MEMORY {
            return bad(format!("--max-memory {max_memory} is less than the minimum of {MIN_MAX_MEMORY} bytes (16M)"));
        }
        let max_body_bytes_in_flight =
            a.max_body_bytes_in_flight.unwrap_or(DEFAULT_BODY_BYTES_IN_FLIGHT.max(a.max_body_bytes as u64));
        if max_body_bytes_in_flight < a.max_body_bytes as u64 {
            return bad(format!(
                "--max-body-bytes-in-flight {max_body_bytes_in_flight} is less than --max-body-bytes {}: no request of the largest size could be read",
                a.max_body_bytes
            ));
        }
        Ok(Config {
            weights,
            network,
            listen: SocketAddr::new(a.host, a.port),
            metrics_listen: SocketAddr::new(a.host, a.metrics_port),
            model_name: a.model_name.clone(),
            max_batch: a.max_batch,
            max_queue_delay: Duration::from_micros(a.max_queue_delay_us),
            max_queue: a.max_queue,
            queue_timeout: (a.queue_timeout_ms > 0).then(|| Duration::from_millis(a.queue_timeout_ms)),
            max_body_bytes: a.max_body_bytes,
            decode_limits: DecodeLimits { max_pixels: a.max_image_pixels, ..DecodeLimits::default() },
            detect: DetectOptions { resize, ..DetectOptions::default() },
            decode_workers,
            max_memory,
            max_body_bytes_in_flight,
            header_read_timeout: Duration::from_millis(a.header_read_timeout_ms),
            body_read_timeout: Duration::from_millis(a.body_read_timeout_ms),
            shutdown_timeout: Duration::from_millis(a.shutdown_timeout_ms),
            log_format: a.log_format,
            streams: a.streams,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(flags: &[&str]) -> Result<Config> {
        Config::from_args(&ServeArgs::parse_from_flags(flags.iter().copied())?)
    }

    #[test]
    fn defaults_follow_the_issue_and_triton() {
        let c = cfg(&["--synthetic-seed", "1", "--network", "mobilenetv1_0.25"]).expect("defaults");
        assert_eq!(c.listen.port(), 8000);
        assert_eq!(c.metrics_listen.port(), 8002);
        assert_eq!(c.max_batch, 8);
        assert_eq!(c.queue_timeout, Some(Duration::from_millis(5000)));
        assert_eq!(c.detect, DetectOptions::default());
        assert!(c.decode_workers >= 1);
    }

    #[test]
    fn bad_flags_are_named_in_the_error() {
        let err = |flags: &[&str]| cfg(flags).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err(&["--synthetic-seed", "1", "--max-batch", "0"]).contains("--max-batch 0"));
        assert!(
            err(&["--synthetic-seed", "1", "--max-queue", "0"])
                .contains("--max-queue 0 must be at least --max-batch 8")
        );
        assert!(err(&["--synthetic-seed", "1", "--resize", "huge"]).contains("resize mode `huge`"));
        assert!(err(&["--synthetic-seed", "1", "--resize", "long-side:100000"]).contains("at most"));
        assert!(err(&["--synthetic-seed", "1", "--max-image-pixels", "0"]).contains("--max-image-pixels"));
        assert!(err(&["--synthetic-seed", "1", "--header-read-timeout-ms", "0"]).contains("slow clients"));
        assert!(err(&["--synthetic-seed", "1", "--network", "vgg"]).contains("unknown network `vgg`"));
        assert!(err(&["--weights", "a.pth", "--synthetic-seed", "1"]).contains("cannot be used with"));
        assert!(err(&[]).contains("--weights"), "{}", err(&[]));
        assert!(err(&["--synthetic-seed", "1", "--backend", "tpu"]).contains("tpu"));
        assert!(err(&["--synthetic-seed", "1", "--decode-workers", "100000"]).contains("--decode-workers 100000"));
        assert!(err(&["--synthetic-seed", "1", "--max-memory", "1M"]).contains("--max-memory 1048576"));
        assert!(err(&["--synthetic-seed", "1", "--max-memory", "1.5G"]).contains("not a byte count"));
        assert!(
            err(&["--synthetic-seed", "1", "--max-body-bytes-in-flight", "1M"])
                .contains("less than --max-body-bytes 20971520")
        );
    }

    #[test]
    fn byte_counts_take_binary_suffixes() {
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert_eq!(parse_bytes("8G"), Ok(8 << 30));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("3k"), Ok(3 << 10));
        assert!(parse_bytes("9999999999T").is_err());
        assert!(parse_bytes("5X").is_err());
    }

    #[test]
    fn memory_default_fits_the_machine() {
        let c = cfg(&["--synthetic-seed", "1"]).expect("defaults");
        if let Some(m) = crate::serve::memory::machine_memory() {
            assert!(c.max_memory <= m / 2 && c.max_memory > 0, "{} of {m}", c.max_memory);
        }
        assert_eq!(c.max_body_bytes_in_flight, 256 << 20);
        let c = cfg(&["--synthetic-seed", "1", "--max-memory", "3G", "--decode-workers", "2"]).expect("flags");
        assert_eq!((c.max_memory, c.decode_workers), (3 << 30, 2));
    }
}
