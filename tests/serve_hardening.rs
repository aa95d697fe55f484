//! Bad and hostile input against a real server on 127.0.0.1: every case a clear 4xx or a correct
//! answer, never a 500 or a crash, memory flat; body limit and slow-client timeouts.

mod serve_util;

use retinaface::image_io::{self, DecodeLimits};
use retinaface::{DetectOptions, Detection, Engine, WeightsSpec};
use serve_util::*;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// A PNG whose header declares `w`x`h` 8-bit RGB, followed by `idat` as image data.
fn png_declaring(w: u32, h: u32, idat: &[u8]) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    png_chunk(&mut out, b"IDAT", idat);
    png_chunk(&mut out, b"IEND", &[]);
    out
}

/// A 96x64 RGB test picture with structure in both directions, so orientation errors show.
fn picture() -> Vec<u8> {
    (0..64u32)
        .flat_map(|y| (0..96u32).flat_map(move |x| [(x * 2) as u8, (y * 3) as u8, ((x + y) % 7 * 30) as u8]))
        .collect()
}

fn jpeg_rgb(rgb: &[u8], w: u32, h: u32) -> Vec<u8> {
    let mut out = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 95),
        rgb,
        w,
        h,
        image::ExtendedColorType::Rgb8,
    )
    .expect("jpeg");
    out
}

/// The JPEG with an EXIF APP1 segment carrying `orientation`, right after SOI.
fn with_exif_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
    let mut tiff = b"II*\0".to_vec();
    tiff.extend_from_slice(&8u32.to_le_bytes());
    tiff.extend_from_slice(&1u16.to_le_bytes());
    tiff.extend_from_slice(&0x0112u16.to_le_bytes());
    tiff.extend_from_slice(&3u16.to_le_bytes());
    tiff.extend_from_slice(&1u32.to_le_bytes());
    tiff.extend_from_slice(&orientation.to_le_bytes());
    tiff.extend_from_slice(&[0, 0]);
    tiff.extend_from_slice(&0u32.to_le_bytes());
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend_from_slice(&tiff);
    let mut out = vec![0xFF, 0xD8, 0xFF, 0xE1];
    out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpeg[2..]);
    out
}

fn png_encode(
    w: u32,
    h: u32,
    color: png::ColorType,
    depth: png::BitDepth,
    palette: Option<Vec<u8>>,
    data: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut e = png::Encoder::new(&mut out, w, h);
        e.set_color(color);
        e.set_depth(depth);
        if let Some(p) = palette {
            e.set_palette(p);
        }
        let mut wr = e.write_header().expect("png header");
        wr.write_image_data(data).expect("png data");
    }
    out
}

fn cmyk_jpeg() -> Vec<u8> {
    let (w, h) = (48u16, 40u16);
    let data: Vec<u8> =
        (0..h as u32).flat_map(|y| (0..w as u32).flat_map(move |x| [(x * 5) as u8, (y * 6) as u8, 40, 20])).collect();
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, 90).encode(&data, w, h, jpeg_encoder::ColorType::Cmyk).expect("cmyk jpeg");
    out
}

/// (name, body, expected status, text the error must contain).
fn bad_inputs() -> Vec<(&'static str, Vec<u8>, u16, &'static str)> {
    let crowd = read_image("crowd.jpg");
    let tiny_idat = [0x78, 0x9c, 0x63, 0x00, 0x00, 0x00, 0x01, 0x00];
    let huge = png_declaring(65535, 65535, &tiny_idat);
    assert_eq!(huge.len(), 65, "the 65-byte PNG of the issue");
    vec![
        ("not an image", b"hello, this is text".to_vec(), 415, "not a JPEG or PNG"),
        ("empty body", Vec::new(), 400, "empty"),
        ("ff d8 ff d9", vec![0xFF, 0xD8, 0xFF, 0xD9], 400, "JPEG"),
        ("0x0 PNG", png_declaring(0, 0, &tiny_idat), 400, "image"),
        ("JPEG cut to 10%", crowd[..crowd.len() / 10].to_vec(), 400, "truncated"),
        ("JPEG cut before its end marker", crowd[..crowd.len() - 2].to_vec(), 400, "truncated"),
        ("65-byte PNG declaring 65535x65535", huge, 400, "exceeds the limits"),
        ("PNG header only", b"\x89PNG\r\n\x1a\n".to_vec(), 400, "image"),
        ("GIF", b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec(), 415, "not a JPEG or PNG"),
    ]
}

/// Images that must be answered, as the library answers them.
fn good_inputs() -> Vec<(String, Vec<u8>)> {
    let rgb = picture();
    let base = jpeg_rgb(&rgb, 96, 64);
    let mut v: Vec<(String, Vec<u8>)> =
        (1..=8).map(|o| (format!("EXIF orientation {o}"), with_exif_orientation(&base, o))).collect();
    v.push(("CMYK JPEG".into(), cmyk_jpeg()));
    let rgb16: Vec<u8> = rgb.iter().flat_map(|&b| [b, b ^ 0x5A]).collect();
    v.push(("16-bit RGB PNG".into(), png_encode(96, 64, png::ColorType::Rgb, png::BitDepth::Sixteen, None, &rgb16)));
    let grey16: Vec<u8> = rgb.chunks(3).flat_map(|p| [p[1], p[0]]).collect();
    v.push((
        "16-bit grey PNG".into(),
        png_encode(96, 64, png::ColorType::Grayscale, png::BitDepth::Sixteen, None, &grey16),
    ));
    let palette: Vec<u8> = (0..16u8).flat_map(|i| [i * 16, 255 - i * 16, i * 8]).collect();
    let idx: Vec<u8> = (0..64u32).flat_map(|y| (0..96u32).map(move |x| ((x / 6 + y / 4) % 16) as u8)).collect();
    v.push((
        "palette PNG".into(),
        png_encode(96, 64, png::ColorType::Indexed, png::BitDepth::Eight, Some(palette), &idx),
    ));
    let rgba: Vec<u8> = rgb.chunks(3).flat_map(|p| [p[0], p[1], p[2], 128]).collect();
    v.push(("RGBA PNG".into(), png_encode(96, 64, png::ColorType::Rgba, png::BitDepth::Eight, None, &rgba)));
    v
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("rss pages");
    pages * 4096
}

#[test]
fn bad_images_get_clear_4xx_good_ones_the_library_answer_and_memory_stays_flat() {
    let server = start(&[]);
    let a = server.addr();
    let engine = Engine::new(&WeightsSpec::File(real_weights()), None).expect("engine");

    for (name, body, status, text) in bad_inputs() {
        let r = detect(a, &body);
        assert_eq!(r.status, status, "{name}: {}", r.text());
        assert!(r.error().contains(text), "{name}: `{}` should mention `{text}`", r.error());
    }

    for (name, body) in good_inputs() {
        let r = detect(a, &body);
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        let img =
            image_io::decode(&body, &name, &DecodeLimits::default()).expect("library decodes what the server accepted");
        let want = engine.detect(&img, &DetectOptions::default()).expect("detect");
        let v = r.json();
        assert_eq!(
            (v["width"].as_u64(), v["height"].as_u64()),
            (Some(img.width as u64), Some(img.height as u64)),
            "{name}"
        );
        let got: Vec<Detection> = serde_json::from_value(v["detections"].clone()).expect("detections");
        assert!(got == want, "{name}: detections differ from the library's");
        if let Some(o) = name.strip_prefix("EXIF orientation ") {
            // Orientations 5..8 transpose the picture.
            let o: u32 = o.parse().expect("orientation");
            let dims = if o >= 5 { (64, 96) } else { (96, 64) };
            assert_eq!((img.width, img.height), dims, "{name}");
        }
    }
    // The oriented pixels are right, not only the sizes: orientation 6 (rotate 90° clockwise) of the
    // base picture matches the upright base decode rotated by hand, up to JPEG noise.
    let rgb = picture();
    let base = jpeg_rgb(&rgb, 96, 64);
    let up = image_io::decode(&with_exif_orientation(&base, 1), "o1", &DecodeLimits::default()).expect("o1");
    let rot = image_io::decode(&with_exif_orientation(&base, 6), "o6", &DecodeLimits::default()).expect("o6");
    let mut worst = 0i32;
    for y in 0..64 {
        for x in 0..96 {
            // Clockwise: source (x, y) lands at (63 - y, x) in the 64-wide result.
            let (rx, ry) = (63 - y, x);
            for c in 0..3 {
                worst =
                    worst.max((up.data[(y * 96 + x) * 3 + c] as i32 - rot.data[(ry * 64 + rx) * 3 + c] as i32).abs());
            }
        }
    }
    assert!(worst <= 2, "orientation 6 pixels differ by up to {worst}");

    // Memory: the same mix 15 more times must not grow the process (server and test share it).
    let before = rss_bytes();
    for _ in 0..15 {
        for (_, body, status, _) in bad_inputs() {
            assert_eq!(detect(a, &body).status, status);
        }
        for (_, body) in good_inputs() {
            assert_eq!(detect(a, &body).status, 200);
        }
    }
    let grown = rss_bytes().saturating_sub(before);
    assert!(grown < 64 << 20, "RSS grew by {} MiB over 15 rounds", grown >> 20);
    assert_eq!(get(a, "/v2/health/live").status, 200);
    assert_eq!(failures(a, "BACKEND"), 0.0, "no request ever failed inside the engine");
    server.shutdown().expect("shutdown");
}

#[test]
fn content_types_other_than_an_image_are_415() {
    let server = start(&[]);
    let jpg = read_image("trio.jpg");
    for ct in ["text/plain", "application/json", "multipart/form-data; boundary=x"] {
        let r = post(server.addr(), "/v1/detect", ct, &jpg);
        assert_eq!(r.status, 415, "{ct}");
        assert!(r.error().contains("raw body") || r.error().contains("not supported"), "{}", r.error());
    }
    // curl --data-binary sends form-urlencoded by default: accepted, the bytes decide.
    for ct in
        ["image/jpeg", "image/png", "application/octet-stream; charset=binary", "application/x-www-form-urlencoded"]
    {
        assert_eq!(post(server.addr(), "/v1/detect", ct, &jpg).status, 200, "{ct}");
    }
    server.shutdown().expect("shutdown");
}

#[test]
fn requests_hyper_cannot_parse_get_json_errors_too() {
    let server = start(&[]);
    let a = server.addr();
    let raw = |req: &[u8]| {
        let mut s = connect(a);
        s.write_all(req).expect("send");
        read_response(&mut s)
    };
    // Bytes outside ASCII in the request line, a bad method token, a header line without a colon.
    for (req, what) in [
        (&b"GET /v2/h\xffalth/ready HTTP/1.1\r\nHost: t\r\n\r\n"[..], "non-ASCII path"),
        (&b"G\x01T /v2/health/ready HTTP/1.1\r\nHost: t\r\n\r\n"[..], "control byte in the method"),
        (&b"GET /v2/health/ready HTTP/1.1\r\nno colon here\r\n\r\n"[..], "bad header line"),
    ] {
        let r = raw(req);
        assert_eq!(r.status, 400, "{what}");
        assert_eq!(r.header("content-type"), Some("application/json"), "{what}");
        assert!(r.error().contains("malformed HTTP request"), "{what}: {}", r.error());
    }
    // More header lines than hyper parses (100) is 431, also as JSON. (Few bytes, so the server has
    // read all of them when it answers and closes.)
    let many: String = (0..120).map(|i| format!("X-H{i}: v\r\n")).collect();
    let r = raw(format!("GET /v2/health/ready HTTP/1.1\r\nHost: t\r\n{many}\r\n").as_bytes());
    assert_eq!(r.status, 431);
    assert!(r.error().contains("too large"), "{}", r.error());
    // The server is unharmed and its own 400s keep their messages.
    assert_eq!(get(a, "/v2/health/ready").status, 200);
    let r = post(a, "/v1/detect", "image/png", b"not an image");
    assert!(r.status >= 400 && r.status < 500 && !r.error().contains("malformed HTTP"), "{}", r.error());
    server.shutdown().expect("shutdown");
}

#[test]
fn body_over_the_limit_is_413_before_it_is_read() {
    let server = start(&["--max-body-bytes", "100000"]);
    let a = server.addr();
    for path in ["/v1/detect", "/v2/models/retinaface/infer"] {
        // Headers only, declaring 50 MB: the answer must come without a byte of body sent.
        let mut s = connect(a);
        let t0 = Instant::now();
        s.write_all(format!("POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 50000000\r\n\r\n").as_bytes())
            .expect("head");
        let r = read_response(&mut s);
        assert_eq!(r.status, 413, "{path}: {}", r.text());
        assert!(r.error().contains("100000"), "names the limit: {}", r.error());
        assert!(t0.elapsed() < Duration::from_secs(5));
    }
    // Chunked, no length declared: cut as soon as it passes the limit.
    let mut s = connect(a);
    s.write_all(b"POST /v1/detect HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        .expect("head");
    let piece = vec![0xFFu8; 60000];
    for _ in 0..2 {
        let _ = s.write_all(format!("{:x}\r\n", piece.len()).as_bytes());
        let _ = s.write_all(&piece);
        let _ = s.write_all(b"\r\n");
    }
    let r = read_response(&mut s);
    assert_eq!(r.status, 413, "{}", r.text());
    // Under the limit still works.
    assert_eq!(detect(a, &read_image("trio.jpg")).status, 200);
    server.shutdown().expect("shutdown");
}

#[test]
fn slow_clients_are_cut_by_the_header_and_body_timeouts() {
    let server = start(&["--header-read-timeout-ms", "500", "--body-read-timeout-ms", "800"]);
    let a = server.addr();

    // Headers trickled one byte per 50 ms would take ~10 s; the server must close within ~0.5 s.
    let mut s = connect(a);
    s.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
    let head = format!("POST /v1/detect HTTP/1.1\r\nHost: t\r\n{}", "X-Slow: aaaaaaaaaaaaaaaaaaaaaaaa\r\n".repeat(8));
    let t0 = Instant::now();
    let mut closed_at = None;
    for b in head.bytes() {
        if s.write_all(&[b]).is_err() {
            closed_at = Some(t0.elapsed());
            break;
        }
        let mut buf = [0u8; 512];
        match s.read(&mut buf) {
            Ok(_) => {
                // EOF (0) or a 408 from hyper: either way the connection is being cut.
                closed_at = Some(t0.elapsed());
                break;
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => {
                closed_at = Some(t0.elapsed());
                break;
            }
        }
    }
    let closed_at = closed_at.expect("server never cut the trickled headers");
    assert!(closed_at >= Duration::from_millis(400) && closed_at < Duration::from_secs(3), "cut after {closed_at:?}");

    // An idle keep-alive connection is closed by the same header timer (it runs while hyper waits
    // for the next request's head), so idle sockets cannot pile up.
    let mut s = connect(a);
    s.write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n").expect("request");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).expect("response");
        assert!(n > 0, "closed before answering");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));
    let t0 = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "no more bytes: the server closes the idle connection");
    assert!(
        t0.elapsed() >= Duration::from_millis(400) && t0.elapsed() < Duration::from_secs(3),
        "closed after {:?}",
        t0.elapsed()
    );

    // Body trickled: 100 bytes per 100 ms of a declared 100000 → 408 after ~0.8 s.
    let mut s = connect(a);
    s.write_all(b"POST /v1/detect HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\nContent-Type: image/jpeg\r\n\r\n")
        .expect("head");
    let t0 = Instant::now();
    let writer = {
        let mut w = s.try_clone().expect("clone");
        std::thread::spawn(move || {
            for _ in 0..50 {
                if w.write_all(&[0xFF; 100]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let r = read_response(&mut s);
    let took = t0.elapsed();
    assert_eq!(r.status, 408, "{}", r.text());
    assert!(r.error().contains("800 ms"), "{}", r.error());
    assert!(took >= Duration::from_millis(700) && took < Duration::from_secs(3), "answered after {took:?}");
    writer.join().expect("writer");
    // The server is fine afterwards.
    assert_eq!(detect(a, &read_image("trio.jpg")).status, 200);
    server.shutdown().expect("shutdown");
}
