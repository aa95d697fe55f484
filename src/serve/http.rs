//! HTTP API: the Open Inference Protocol (KServe v2 / Triton HTTP) with Triton's binary tensor data
//! extension, `POST /v1/detect`, and `/metrics`. Every error is `{"error": "..."}`: 400 bad request,
//! 404 unknown model or route, 408 body too slow, 413 too large, 415 not a JPEG/PNG, 503 overload,
//! queue timeout or shutting down; 500 only when the engine itself fails.

use super::batcher::{Batcher, ExecError};
use super::config::Config;
use super::memory::{self, Budget, ForwardModel, Refusal, Reservation};
use super::metrics::{FailureReason, Metrics};
use super::v2;
use crate::detection::Detection;
use crate::image_io::{self, BgrImage};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::future::join_all;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tokio::sync::Semaphore;

pub struct AppState {
    pub cfg: Arc<Config>,
    pub batcher: Arc<Batcher>,
    pub metrics: Arc<Metrics>,
    pub ready: AtomicBool,
    /// Bounds concurrent decodes: decoding runs on tokio's blocking threads, never on the async workers.
    pub decode_pool: Arc<Semaphore>,
    pub network: String,
    /// `--max-memory`: decoded images and forward-pass buffers of the requests being served.
    pub budget: Budget,
    pub forward: ForwardModel,
    /// `--max-body-bytes-in-flight`: request bodies being read or held, across all connections.
    pub body_bytes: Budget,
}

type St = State<Arc<AppState>>;

/// A client-visible error.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub msg: String,
    reason: FailureReason,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, msg: impl Into<String>) -> Self {
        let reason = match status {
            StatusCode::SERVICE_UNAVAILABLE => FailureReason::Rejected,
            StatusCode::INTERNAL_SERVER_ERROR => FailureReason::Backend,
            _ => FailureReason::Other,
        };
        ApiError { status, msg: msg.into(), reason }
    }
    fn bad(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, msg)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(json!({ "error": self.msg }))).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            // Overload is transient: tell well-behaved clients to come back shortly.
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}", get(model_metadata_v))
        .route("/v2/models/{name}/versions/{version}/ready", get(model_ready_v))
        .route("/v2/models/{name}/versions/{version}/infer", post(infer_v))
        .route("/v1/detect", post(detect))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state)
}

/// The Prometheus endpoint alone, for `--metrics-port`.
pub fn metrics_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state)
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no route {}", uri.path()))
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, format!("method {method} is not allowed on {}", uri.path()))
}

/// Every error answer is `{"error": ...}`, also those axum's extractors make themselves (a path
/// segment that is not UTF-8, say): their plain-text body becomes the message.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json =
        resp.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10).await.map(|b| String::from_utf8_lossy(&b).trim().to_string());
    let msg = match text {
        Ok(t) if !t.is_empty() => t,
        _ => status.canonical_reason().unwrap_or("error").to_string(),
    };
    let mut out = ApiError::new(status, msg).into_response();
    for (k, v) in parts.headers.iter().filter(|(k, _)| *k != header::CONTENT_TYPE && *k != header::CONTENT_LENGTH) {
        out.headers_mut().insert(k.clone(), v.clone());
    }
    out
}

async fn live() -> StatusCode {
    StatusCode::OK
}

async fn ready(State(s): St) -> StatusCode {
    if s.ready.load(Ordering::Acquire) && s.batcher.fault().is_none() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn server_metadata() -> axum::Json<Value> {
    axum::Json(json!({
        "name": "retinaface",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data"],
    }))
}

fn check_model(s: &AppState, name: &str, version: Option<&str>) -> Result<(), ApiError> {
    if name != s.cfg.model_name {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("unknown model `{name}` (this server has `{}`)", s.cfg.model_name),
        ));
    }
    if let Some(v) = version
        && v != "1"
    {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("model `{name}` has no version `{v}` (only 1)")));
    }
    Ok(())
}

async fn model_metadata(State(s): St, Path(name): Path<String>) -> Result<axum::Json<Value>, ApiError> {
    check_model(&s, &name, None)?;
    Ok(axum::Json(json!({
        "name": s.cfg.model_name,
        "versions": ["1"],
        "platform": format!("retinaface_{}", s.network),
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": "num_detections", "datatype": "INT32", "shape": [-1]},
            {"name": "boxes", "datatype": "FP32", "shape": [-1, -1, 4]},
            {"name": "scores", "datatype": "FP32", "shape": [-1, -1]},
            {"name": "landmarks", "datatype": "FP32", "shape": [-1, -1, 10]},
        ],
    })))
}

async fn model_metadata_v(
    st: St,
    Path((name, version)): Path<(String, String)>,
) -> Result<axum::Json<Value>, ApiError> {
    check_model(&st.0, &name, Some(&version))?;
    model_metadata(st, Path(name)).await
}

async fn model_ready(State(s): St, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    check_model(&s, &name, None)?;
    let ready = s.ready.load(Ordering::Acquire) && s.batcher.fault().is_none();
    Ok(if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE })
}

async fn model_ready_v(st: St, Path((name, version)): Path<(String, String)>) -> Result<StatusCode, ApiError> {
    check_model(&st.0, &name, Some(&version))?;
    model_ready(st, Path(name)).await
}

async fn metrics(State(s): St) -> Response {
    let mut text = s.metrics.render(&s.cfg.model_name);
    for (name, help, v) in [
        (
            "retinaface_memory_reserved_bytes",
            "Bytes of --max-memory reserved by requests being served",
            s.budget.used(),
        ),
        ("retinaface_memory_budget_bytes", "--max-memory", s.budget.capacity()),
        ("retinaface_body_bytes_in_flight", "Request body bytes reserved across connections", s.body_bytes.used()),
    ] {
        text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n"));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// Reads the body under the size limit, the body timeout and the limit on body bytes in flight
/// across all connections. A declared Content-Length over the size limit is refused (413) before a
/// byte of the body is read, and one that does not fit beside the bodies in flight (503); a chunked
/// body reserves as it arrives and is cut as soon as it passes either limit.
async fn read_body(s: &AppState, headers: &HeaderMap, body: Body) -> Result<(Bytes, Reservation), ApiError> {
    let limit = s.cfg.max_body_bytes;
    let too_large = |n: String| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body of {n} bytes exceeds the limit of {limit} bytes"),
        )
    };
    let busy = |n: u64| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "server busy: {} of the {} bytes of request bodies allowed in flight (--max-body-bytes-in-flight) are taken; {n} more do not fit",
                s.body_bytes.used(),
                s.body_bytes.capacity()
            ),
        )
    };
    let declared = match headers.get(header::CONTENT_LENGTH) {
        Some(len) => {
            let len: u64 = len
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| ApiError::bad("Content-Length is not a number"))?;
            if len > limit as u64 {
                return Err(too_large(len.to_string()));
            }
            Some(len as usize)
        }
        None => None,
    };
    // A chunked body is collected in pieces and joined at the end, so it briefly takes twice its size.
    let mut held =
        s.body_bytes.reserve(declared.map_or(0, |n| n as u64)).map_err(|_| busy(declared.unwrap_or(0) as u64))?;
    let read = async {
        let mut body = body;
        let mut buf: Vec<u8> = Vec::with_capacity(declared.unwrap_or(0));
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ApiError::bad(format!("reading the request body: {e}")))?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > limit {
                    return Err(too_large(format!("more than {}", buf.len() + data.len())));
                }
                let need = (buf.len() + data.len()) as u64 * if declared.is_some() { 1 } else { 2 };
                if need > held.bytes() {
                    let more = need - held.bytes();
                    s.body_bytes.grow(&mut held, more).map_err(|_| busy(more))?;
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(Bytes::from(buf))
    };
    match tokio::time::timeout(s.cfg.body_read_timeout, read).await {
        Ok(r) => r.map(|b| (b, held)),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!("request body not received within {} ms", s.cfg.body_read_timeout.as_millis()),
        )),
    }
}

/// One decoded request image: the network input and what is needed to report in original pixels.
struct Decoded {
    input: BgrImage,
    scale: f64,
    width: usize,
    height: usize,
}

fn sniff(bytes: &[u8], what: &str) -> Result<(), ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::bad(format!("{what}: empty image")));
    }
    let jpeg = bytes.starts_with(&[0xFF, 0xD8, 0xFF]) || bytes == [0xFF, 0xD8];
    let png = bytes.starts_with(b"\x89PNG\r\n\x1a\n");
    if !jpeg && !png {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("{what}: not a JPEG or PNG image (unrecognised signature)"),
        ));
    }
    Ok(())
}

/// Decodes and resizes on the bounded decode pool, off the async workers.
async fn decode(s: &AppState, bytes: Bytes, what: String) -> Result<Decoded, ApiError> {
    sniff(&bytes, &what)?;
    let permit = s
        .decode_pool
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server is shutting down"))?;
    let limits = s.cfg.decode_limits;
    let mode = s.cfg.detect.resize;
    let large = image_io::probe(&bytes, &what).is_ok_and(|p| p.decode_bytes >= TRIM_AFTER_DECODE_BYTES);
    let task = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let img = image_io::decode(&bytes, &what, &limits).map_err(|e| ApiError::bad(e.to_string()));
        if large {
            memory::return_freed_memory();
        }
        let img = img?;
        let (width, height) = (img.width, img.height);
        let (resized, scale) = image_io::apply_resize(&img, mode);
        let resized = match resized {
            std::borrow::Cow::Owned(o) => Some(o),
            std::borrow::Cow::Borrowed(_) => None,
        };
        Ok(Decoded { input: resized.unwrap_or(img), scale, width, height })
    });
    match task.await {
        Ok(r) => r,
        // A panic inside the image decoder: the input is to blame, the server carries on.
        Err(e) => Err(ApiError::bad(format!("image could not be decoded (decoder failed: {e})"))),
    }
}

/// What is reported of an image besides its detections: its size after EXIF orientation.
struct ImageInfo {
    width: usize,
    height: usize,
}

struct CancelGuard<'a> {
    metrics: &'a Metrics,
    armed: bool,
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.metrics.fail(FailureReason::Canceled);
            tracing::info!("client went away while its images decoded; request dropped before it ran");
        }
    }
}

/// A decode whose buffers take this much is followed by `malloc_trim`: the arenas of the decode
/// threads would otherwise keep the freed memory resident.
const TRIM_AFTER_DECODE_BYTES: u64 = 64 << 20;

/// What one request's images will take in memory, from their headers: every image sniffed and probed
/// (a bad one is refused here with the reason), its size checked against `--max-image-pixels`, and
/// its decoded pixels and forward-pass buffers summed (see `memory::ForwardModel::bytes`).
fn request_cost(s: &AppState, images: &[(Bytes, String)]) -> Result<u64, ApiError> {
    let limits = &s.cfg.decode_limits;
    let mut total = 0u64;
    for (bytes, what) in images {
        sniff(bytes, what)?;
        let p = image_io::probe(bytes, what).map_err(|e| ApiError::bad(format!("cannot read the header of {e}")))?;
        let (w, h) = (p.width, p.height);
        if w > limits.max_dimension || h > limits.max_dimension || u64::from(w) * u64::from(h) > limits.max_pixels {
            return Err(ApiError::bad(format!(
                "{what}: {w}x{h} image exceeds the limits ({} pixels, {} per side)",
                limits.max_pixels, limits.max_dimension
            )));
        }
        let (nw, nh) = memory::network_input(&p, s.cfg.detect.resize);
        total =
            total.saturating_add(memory::decode_bytes(&p, s.cfg.detect.resize)).saturating_add(s.forward.bytes(nh, nw));
    }
    Ok(total)
}

const MIB: f64 = 1024.0 * 1024.0;

/// Admission, decode, queue, wait: the path every image takes. The `n` images of one request are
/// admitted together or not at all, and all decoded before any is queued. Admission takes the
/// request's memory (estimated from the image headers) from `--max-memory`, then its queue slots.
async fn detect_images(
    s: &AppState,
    images: Vec<(Bytes, String)>,
) -> Result<Vec<(ImageInfo, Vec<Detection>)>, ApiError> {
    let admitted_at = Instant::now();
    let cost = request_cost(s, &images)?;
    let memory = s.budget.reserve(cost).map(Arc::new).map_err(|r| match r {
        Refusal::Never => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request needs about {:.0} MiB for its decoded images and forward pass, more than --max-memory ({:.0} MiB)",
                cost as f64 / MIB,
                s.budget.capacity() as f64 / MIB
            ),
        ),
        Refusal::NotNow { used } => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "server busy: request needs about {:.0} MiB, {:.0} of the {:.0} MiB of --max-memory are in use",
                cost as f64 / MIB,
                used as f64 / MIB,
                s.budget.capacity() as f64 / MIB
            ),
        ),
    })?;
    let slots = s.batcher.admit(images.len()).ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("server overloaded: the queue holds its maximum of {} requests", s.cfg.max_queue),
        )
    })?;
    // If the client goes away while its images decode, hyper drops this future: the slots are freed and
    // nothing runs, and this guard counts the request as cancelled. Once queued, the tickets do that.
    let mut cancelled = CancelGuard { metrics: &s.metrics, armed: true };
    let decoded: Vec<Decoded> = join_all(images.into_iter().map(|(b, what)| decode(s, b, what)))
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .inspect_err(|_| cancelled.armed = false)?;
    cancelled.armed = false;
    let mut infos = Vec::with_capacity(decoded.len());
    let mut tickets = Vec::with_capacity(decoded.len());
    for (d, slot) in decoded.into_iter().zip(slots) {
        infos.push(ImageInfo { width: d.width, height: d.height });
        tickets.push(s.batcher.submit(slot, d.input, d.scale, admitted_at, Some(memory.clone())));
    }
    let results = join_all(tickets.into_iter().map(|t| t.wait())).await;
    infos
        .into_iter()
        .zip(results)
        .map(|(info, r)| {
            let dets = r.map_err(|e| match e {
                ExecError::QueueTimeout => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "request timed out in the queue after {} ms",
                        s.cfg.queue_timeout.map_or(0, |t| t.as_millis())
                    ),
                ),
                ExecError::ShuttingDown => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server is shutting down"),
                ExecError::Unhealthy(m) => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the device failed and the server is exiting to be restarted: {m}"),
                ),
                ExecError::Backend(m) => {
                    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("inference failed: {m}"))
                }
            })?;
            Ok((info, dets))
        })
        .collect()
}

/// Counts the outcome in the metrics, logs it, and turns it into a response.
fn finish(s: &AppState, started: Instant, route: &'static str, r: Result<Response, ApiError>) -> Response {
    let us = started.elapsed().as_micros() as u64;
    match r {
        Ok(resp) => {
            s.metrics.request_success.fetch_add(1, Ordering::Relaxed);
            s.metrics.request_duration_us.fetch_add(us, Ordering::Relaxed);
            tracing::debug!(route, status = 200, us, "request done");
            resp
        }
        Err(e) => {
            s.metrics.fail(e.reason);
            if e.status.is_server_error() && e.status != StatusCode::SERVICE_UNAVAILABLE {
                tracing::error!(route, status = e.status.as_u16(), error = %e.msg, "request failed");
            } else {
                tracing::info!(route, status = e.status.as_u16(), error = %e.msg, "request refused");
            }
            e.into_response()
        }
    }
}

fn content_type(headers: &HeaderMap) -> Option<String> {
    headers.get(header::CONTENT_TYPE).map(|v| {
        let v = v.to_str().unwrap_or("");
        v.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
    })
}

async fn detect(
    State(s): St,
    q: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let r = async {
        let q = q.map_err(|e| ApiError::bad(format!("bad query string: {e}")))?;
        match content_type(&headers).as_deref() {
            // The bytes are sniffed anyway; the type only has to not contradict them.
            // `application/x-www-form-urlencoded` is what `curl --data-binary @photo.jpg` sends
            // unless told otherwise: refusing it would fail the most common first try.
            None
            | Some(
                "image/jpeg"
                | "image/jpg"
                | "image/png"
                | "application/octet-stream"
                | "application/x-www-form-urlencoded"
                | "",
            ) => {}
            Some(ct) if ct.starts_with("multipart/") => {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "multipart forms are not accepted: send the image as the raw body (curl --data-binary @photo.jpg)",
                ));
            }
            Some(ct) => {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    format!(
                        "Content-Type {ct} is not supported: send image/jpeg, image/png or application/octet-stream"
                    ),
                ));
            }
        }
        let (bytes, _body_held) = read_body(&s, &headers, body).await?;
        let name = q.0.get("image").cloned().unwrap_or_else(|| "request".to_string());
        let mut res = detect_images(&s, vec![(bytes, "request body".to_string())]).await?;
        let (d, dets) = res.pop().ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "no result"))?;
        let out = json!({ "image": name, "width": d.width, "height": d.height, "detections": dets });
        Ok(axum::Json(out).into_response())
    }
    .await;
    finish(&s, started, "/v1/detect", r)
}

async fn infer(st: St, Path(name): Path<String>, headers: HeaderMap, body: Body) -> Response {
    infer_impl(st, name, None, headers, body).await
}

async fn infer_v(st: St, Path((name, version)): Path<(String, String)>, headers: HeaderMap, body: Body) -> Response {
    infer_impl(st, name, Some(version), headers, body).await
}

const HEADER_LEN: &str = "inference-header-content-length";

/// Parses a v2 request on the blocking pool (a large JSON body takes tens of milliseconds that
/// health checks and other connections must not wait for), under the decode workers' bound.
async fn parse_off_runtime(
    s: &AppState,
    body: Bytes,
    header_len: Option<Vec<u8>>,
) -> Result<v2::InferRequest, ApiError> {
    let permit = s
        .decode_pool
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server is shutting down"))?;
    let max_batch = s.cfg.max_batch;
    let task = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        v2::parse_infer(&body, header_len.as_deref(), max_batch)
    });
    task.await.map_err(|e| ApiError::bad(format!("inference request could not be parsed ({e})")))?
}

async fn infer_impl(State(s): St, name: String, version: Option<String>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let r = async {
        check_model(&s, &name, version.as_deref())?;
        let (bytes, _body_held) = read_body(&s, &headers, body).await?;
        let req = parse_off_runtime(&s, bytes, headers.get(HEADER_LEN).map(|v| v.as_bytes().to_vec())).await?;
        let n = req.images.len();
        let images =
            req.images.into_iter().enumerate().map(|(i, b)| (b, format!("input `image` element {i}"))).collect();
        let res = detect_images(&s, images).await?;
        Ok(infer_response(&s.cfg.model_name, req.id, &req.outputs, n, &res))
    }
    .await;
    finish(&s, started, "/v2/infer", r)
}

/// Outputs for N images padded to the largest detection count K: num_detections [N],
/// boxes [N, K, 4], scores [N, K], landmarks [N, K, 10]; rows past num_detections are zeros.
fn infer_response(
    model: &str,
    id: Option<Value>,
    outputs: &[(&'static str, bool)],
    n: usize,
    res: &[(ImageInfo, Vec<Detection>)],
) -> Response {
    let k = res.iter().map(|(_, d)| d.len()).max().unwrap_or(0);
    let floats = |width: usize, f: &dyn Fn(&Detection) -> Vec<f32>| -> Vec<f32> {
        let mut v = vec![0.0f32; n * k * width];
        for (i, (_, dets)) in res.iter().enumerate() {
            for (j, d) in dets.iter().enumerate() {
                v[(i * k + j) * width..(i * k + j + 1) * width].copy_from_slice(&f(d));
            }
        }
        v
    };
    let boxes = floats(4, &|d| d.bbox.to_vec());
    let scores = floats(1, &|d| vec![d.score]);
    let landmarks = floats(10, &|d| d.landmarks.to_vec());
    let counts: Vec<i32> = res.iter().map(|(_, d)| d.len() as i32).collect();
    let mut binary: Vec<u8> = Vec::new();
    let mut outs = Vec::new();
    for &(name, bin) in outputs {
        let (shape, dtype, json_data, raw): (Vec<usize>, &str, Value, Vec<u8>) = match name {
            "num_detections" => {
                (vec![n], "INT32", json!(counts), counts.iter().flat_map(|c| c.to_le_bytes()).collect())
            }
            "boxes" => (vec![n, k, 4], "FP32", json!(boxes), boxes.iter().flat_map(|c| c.to_le_bytes()).collect()),
            "scores" => (vec![n, k], "FP32", json!(scores), scores.iter().flat_map(|c| c.to_le_bytes()).collect()),
            _ => (vec![n, k, 10], "FP32", json!(landmarks), landmarks.iter().flat_map(|c| c.to_le_bytes()).collect()),
        };
        if bin {
            outs.push(
                json!({"name": name, "datatype": dtype, "shape": shape, "parameters": {"binary_data_size": raw.len()}}),
            );
            binary.extend_from_slice(&raw);
        } else {
            outs.push(json!({"name": name, "datatype": dtype, "shape": shape, "data": json_data}));
        }
    }
    let mut head = json!({"model_name": model, "model_version": "1", "outputs": outs});
    if let Some(id) = id {
        head["id"] = id;
    }
    let head = head.to_string().into_bytes();
    if binary.is_empty() {
        return ([(header::CONTENT_TYPE, "application/json")], head).into_response();
    }
    let hlen = head.len();
    let mut body = head;
    body.extend_from_slice(&binary);
    let mut r = ([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response();
    r.headers_mut().insert(HEADER_LEN, HeaderValue::from(hlen));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffing_tells_unsupported_from_empty() {
        assert_eq!(sniff(b"", "x").err().map(|e| e.status), Some(StatusCode::BAD_REQUEST));
        assert_eq!(sniff(b"GIF89a", "x").err().map(|e| e.status), Some(StatusCode::UNSUPPORTED_MEDIA_TYPE));
        assert!(sniff(b"\x89PNG\r\n\x1a\nrest", "x").is_ok());
        assert!(sniff(&[0xFF, 0xD8, 0xFF, 0xD9], "x").is_ok(), "JPEG-looking: the decoder gives the precise 400");
    }
}
