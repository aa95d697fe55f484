//! The server's KServe v2 request parser: JSON bodies and the binary data extension. An input that
//! starts with 8 ASCII digits and a newline carries the Inference-Header-Content-Length value there
//! (the layout of tests/serve_util/fuzz_v2/*.bin); any other input is a JSON body. Every input is a
//! request within its bounds or a 4xx with a message.
#![no_main]
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use retinaface::serve::v2;

fuzz_target!(|data: &[u8]| {
    let has_header = data.len() >= 9 && data[..8].iter().all(u8::is_ascii_digit) && data[8] == b'\n';
    let (header, body) = if has_header { (Some(&data[..8]), &data[9..]) } else { (None, data) };
    let max_batch = 8;
    match v2::parse_infer(&Bytes::copy_from_slice(body), header, max_batch) {
        Ok(req) => assert!(req.images.len() <= max_batch),
        Err(e) => assert!(e.status.is_client_error(), "{e:?}"),
    }
});
