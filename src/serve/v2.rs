//! Parsing of a v2 (KServe / Triton) inference request: JSON alone, or with Triton's binary tensor
//! data extension a JSON header of `Inference-Header-Content-Length` bytes followed by raw bytes.
//!
//! The JSON is read into fixed types, never into a `serde_json::Value` tree: a 20 MiB body of
//! `[0,0,...]` would be ten million values (hundreds of MB). Lists are bounded as they are read
//! (what is past the bound is counted, not kept), nesting is checked before parsing, and the caller
//! runs this off the async runtime.

use super::http::ApiError;
use axum::body::Bytes;
use axum::http::StatusCode;
use base64::Engine as _;
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use std::fmt;

/// Deepest JSON nesting accepted. A request needs 6 levels ({inputs: [{data: [[{b64}]]}]}); the
/// rest is room for clients' extra parameters. serde_json's own limit (128) only guards the stack.
pub const MAX_JSON_DEPTH: usize = 32;
/// Largest JSON header of a binary-extension request (it names tensors; the data follows it).
pub const MAX_BINARY_HEADER_BYTES: usize = 1 << 20;
/// Elements of one list (inputs, outputs, shape, data) that are kept; more are counted and refused.
const MAX_LIST: usize = 256;

pub const OUTPUTS: [(&str, &str); 4] =
    [("num_detections", "INT32"), ("boxes", "FP32"), ("scores", "FP32"), ("landmarks", "FP32")];

#[derive(Debug)]
pub struct InferRequest {
    pub id: Option<Value>,
    pub images: Vec<Bytes>,
    /// Requested outputs in order, each with whether it goes as binary data.
    pub outputs: Vec<(&'static str, bool)>,
}

/// A list read with at most `MAX_LIST` elements kept, and its full length.
struct Bounded<T> {
    items: Vec<T>,
    len: usize,
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Bounded<T> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Bounded<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Bounded<T>, A::Error> {
                let mut b = Bounded { items: Vec::new(), len: 0 };
                loop {
                    if b.items.len() < MAX_LIST {
                        match seq.next_element::<T>()? {
                            Some(x) => b.items.push(x),
                            None => break,
                        }
                    } else if seq.next_element::<IgnoredAny>()?.is_none() {
                        break;
                    }
                    b.len += 1;
                }
                Ok(b)
            }
        }
        d.deserialize_seq(V(std::marker::PhantomData))
    }
}

/// One element of a BYTES tensor's `data`, after flattening nested lists.
#[derive(Debug)]
enum Elem {
    /// A base64 string, or `{"b64": "..."}`.
    B64(String),
    /// Anything else, by what it is ("a number", ...).
    Bad(&'static str),
}

/// The flattened `data` of an input: the first `MAX_LIST` elements and how many there are.
#[derive(Default)]
struct Data {
    elems: Vec<Elem>,
    len: usize,
}

impl Data {
    fn push(&mut self, e: Elem) {
        if self.elems.len() < MAX_LIST {
            self.elems.push(e);
        }
        self.len += 1;
    }
}

struct Flatten<'a>(&'a mut Data);

impl<'de> DeserializeSeed<'de> for Flatten<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Flatten<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("BYTES tensor data")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Flatten(&mut *self.0))?.is_some() {}
        Ok(())
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        // Past the kept elements only the count matters: do not copy the string.
        let e = if self.0.elems.len() < MAX_LIST { Elem::B64(v.to_owned()) } else { Elem::Bad("") };
        self.0.push(e);
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut b64 = None;
        while let Some(k) = map.next_key::<String>()? {
            if k == "b64" {
                b64 = Some(map.next_value::<Value>()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        self.0.push(match b64 {
            Some(Value::String(s)) => Elem::B64(s),
            _ => Elem::Bad("an object without a `b64` string"),
        });
        Ok(())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.0.push(Elem::Bad("a boolean"));
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.0.push(Elem::Bad("a number"));
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.0.push(Elem::Bad("a number"));
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.0.push(Elem::Bad("a number"));
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.0.push(Elem::Bad("null"));
        Ok(())
    }
}

impl<'de> Deserialize<'de> for Data {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut data = Data::default();
        Flatten(&mut data).deserialize(d)?;
        Ok(data)
    }
}

/// The request `id`: a string (the protocol's type) or, leniently, a number; echoed back as given.
struct Id(Value);

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Id;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string `id`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Id, E> {
                Ok(Id(Value::String(v.to_owned())))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Id, E> {
                Ok(Id(Value::from(v)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Id, E> {
                Ok(Id(Value::from(v)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Id, E> {
                Ok(Id(Value::from(v)))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
struct RequestJson {
    id: Option<Id>,
    inputs: Option<Bounded<InputJson>>,
    outputs: Option<Bounded<OutputJson>>,
    parameters: Option<RequestParams>,
}

#[derive(Deserialize)]
struct RequestParams {
    binary_data_output: Option<bool>,
}

#[derive(Deserialize)]
struct InputJson {
    name: Option<String>,
    datatype: Option<String>,
    shape: Option<Bounded<serde_json::Number>>,
    parameters: Option<InputParams>,
    data: Option<Data>,
}

#[derive(Deserialize)]
struct InputParams {
    binary_data_size: Option<u64>,
}

#[derive(Deserialize)]
struct OutputJson {
    name: Option<String>,
    parameters: Option<OutputParams>,
}

#[derive(Deserialize)]
struct OutputParams {
    binary_data: Option<bool>,
}

/// The deepest nesting of arrays and objects in `json`, stopping once past `limit`. Strings are
/// skipped (brackets in them do not count), escapes included.
pub fn json_depth(json: &[u8], limit: usize) -> usize {
    let (mut depth, mut max, mut in_str, mut esc) = (0usize, 0usize, false, false);
    for &c in json {
        if in_str {
            match (esc, c) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
                if max > limit {
                    return max;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, msg)
}

/// Parses a v2 inference request. `header_len` is the `Inference-Header-Content-Length` header
/// (binary data extension); `max_batch` bounds the images per request.
pub fn parse_infer(body: &Bytes, header_len: Option<&[u8]>, max_batch: usize) -> Result<InferRequest, ApiError> {
    let (json_part, mut binary) = match header_len {
        Some(v) => {
            let n: usize = std::str::from_utf8(v)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| bad("Inference-Header-Content-Length is not a number"))?;
            if n > body.len() {
                return Err(bad(format!(
                    "Inference-Header-Content-Length {n} exceeds the body's {} bytes",
                    body.len()
                )));
            }
            if n > MAX_BINARY_HEADER_BYTES {
                return Err(bad(format!(
                    "Inference-Header-Content-Length {n}: the JSON header of a binary request may have at most {MAX_BINARY_HEADER_BYTES} bytes"
                )));
            }
            (body.slice(..n), body.slice(n..))
        }
        None => (body.clone(), Bytes::new()),
    };
    let depth = json_depth(&json_part, MAX_JSON_DEPTH);
    if depth > MAX_JSON_DEPTH {
        return Err(bad(format!("inference request JSON nests deeper than {MAX_JSON_DEPTH} levels")));
    }
    let req: RequestJson = serde_json::from_slice(&json_part).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => bad(format!("inference request: {e}")),
        _ => bad(format!("inference request is not valid JSON: {e}")),
    })?;
    let inputs = req.inputs.ok_or_else(|| bad("inference request has no `inputs` array"))?;
    if inputs.len != 1 {
        return Err(bad(format!("expected exactly one input (`image`), got {}", inputs.len)));
    }
    let Some(input) = inputs.items.into_iter().next() else {
        return Err(bad("expected exactly one input (`image`), got 0"));
    };
    let iname = input.name.as_deref().unwrap_or("");
    if iname != "image" {
        return Err(bad(format!("unknown input `{iname}`: this model takes one BYTES input named `image`")));
    }
    let dtype = input.datatype.as_deref().unwrap_or("");
    if dtype != "BYTES" {
        return Err(bad(format!(
            "input `image` has datatype `{dtype}`, expected BYTES (the encoded JPEG or PNG file)"
        )));
    }
    let shape = input.shape.ok_or_else(|| bad("input `image` has no `shape`"))?;
    let dims: Vec<i64> = shape.items.iter().map(|d| d.as_i64().unwrap_or(-1)).collect();
    if dims.is_empty() || shape.len > 8 || dims.iter().any(|&d| d < 1) {
        return Err(bad(format!("input `image` has shape {dims:?}; expected [N] or [N, 1] with N >= 1")));
    }
    let n = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d as usize)).unwrap_or(usize::MAX);
    if n > max_batch {
        return Err(bad(format!("input `image` holds {n} images; at most {max_batch} (--max-batch) per request")));
    }
    let bin_size = input.parameters.and_then(|p| p.binary_data_size);
    let images: Vec<Bytes> = match bin_size {
        Some(sz) => {
            let sz = usize::try_from(sz).unwrap_or(usize::MAX);
            if sz > binary.len() {
                return Err(bad(format!(
                    "input `image` declares {sz} bytes of binary data, the body holds {}",
                    binary.len()
                )));
            }
            let data = binary.split_to(sz);
            split_bytes_tensor(data, n)?
        }
        None => {
            let data = input.data.ok_or_else(|| bad("input `image` has neither `data` nor binary_data_size"))?;
            if data.len != n {
                return Err(bad(format!("input `image` has {} elements, its shape says {n}", data.len)));
            }
            data.elems
                .into_iter()
                .enumerate()
                .map(|(i, e)| match e {
                    Elem::B64(s) => base64::engine::general_purpose::STANDARD.decode(s.trim()).map(Bytes::from).map_err(|e| {
                        bad(format!("input `image` element {i}: JSON BYTES elements must be the base64 of the image file ({e}); or send raw bytes with the binary data extension"))
                    }),
                    Elem::Bad(what) => Err(bad(format!(
                        "input `image` element {i} is {what}: JSON BYTES elements must be base64 strings of the image file"
                    ))),
                })
                .collect::<Result<_, _>>()?
        }
    };
    if !binary.is_empty() {
        return Err(bad(format!("{} bytes of binary data follow the inputs they were declared for", binary.len())));
    }
    let default_binary = req.parameters.and_then(|p| p.binary_data_output).unwrap_or(false);
    let outputs = match req.outputs {
        None => OUTPUTS.iter().map(|(n, _)| (*n, default_binary)).collect(),
        Some(list) => {
            if list.len > OUTPUTS.len() {
                return Err(bad(format!("{} outputs requested; this model has {}", list.len, OUTPUTS.len())));
            }
            list.items
                .into_iter()
                .map(|o| {
                    let name = o.name.as_deref().unwrap_or("");
                    let known = OUTPUTS.iter().find(|(n, _)| *n == name).ok_or_else(|| {
                        bad(format!("unknown output `{name}` (outputs: num_detections, boxes, scores, landmarks)"))
                    })?;
                    let bin = o.parameters.and_then(|p| p.binary_data).unwrap_or(default_binary);
                    Ok((known.0, bin))
                })
                .collect::<Result<_, ApiError>>()?
        }
    };
    Ok(InferRequest { id: req.id.map(|i| i.0), images, outputs })
}

/// A BYTES tensor in binary form is its elements each preceded by a 4-byte little-endian length
/// (what Triton clients send). A lone raw JPEG/PNG (no length prefix) is accepted too, for clients
/// that send the file as is: its first bytes can never be read as a matching length.
pub fn split_bytes_tensor(mut data: Bytes, n: usize) -> Result<Vec<Bytes>, ApiError> {
    let prefixed =
        data.len() >= 4 && u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize <= data.len() - 4;
    if n == 1 && !prefixed {
        return Ok(vec![data]);
    }
    let mut out = Vec::with_capacity(n.min(MAX_LIST));
    for i in 0..n {
        if data.len() < 4 {
            return Err(bad(format!("binary BYTES element {i}: missing its 4-byte length")));
        }
        let len = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
        let _ = data.split_to(4);
        if len > data.len() {
            return Err(bad(format!("binary BYTES element {i}: declares {len} bytes, {} remain", data.len())));
        }
        out.push(data.split_to(len));
    }
    if !data.is_empty() {
        return Err(bad(format!("binary BYTES tensor: {} bytes left after its {n} elements", data.len())));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_tensor_elements_with_and_without_length_prefix() {
        let jpeg = Bytes::from_static(&[0xFF, 0xD8, 0xFF, 0xE0, 1, 2, 3]);
        assert_eq!(split_bytes_tensor(jpeg.clone(), 1).expect("raw"), vec![jpeg.clone()]);
        let mut two = Vec::new();
        for e in [&b"abc"[..], &b"de"[..]] {
            two.extend_from_slice(&(e.len() as u32).to_le_bytes());
            two.extend_from_slice(e);
        }
        let got = split_bytes_tensor(Bytes::from(two.clone()), 2).expect("two");
        assert_eq!(got, vec![Bytes::from_static(b"abc"), Bytes::from_static(b"de")]);
        // One element short, or bytes left over: errors that say so.
        let e = split_bytes_tensor(Bytes::from(two.clone()), 3).expect_err("short");
        assert!(e.msg.contains("element 2"), "{}", e.msg);
        two.push(0);
        let e = split_bytes_tensor(Bytes::from(two), 2).expect_err("extra");
        assert!(e.msg.contains("left after"), "{}", e.msg);
    }

    fn parse(json: &str) -> Result<InferRequest, ApiError> {
        parse_infer(&Bytes::from(json.to_string()), None, 8)
    }

    #[test]
    fn a_number_as_a_data_element_is_named_as_such() {
        let e = parse(r#"{"inputs":[{"name":"image","shape":[2],"datatype":"BYTES","data":["/9j/",7]}]}"#)
            .expect_err("refused");
        assert!(e.msg.contains("element 1 is a number"), "{}", e.msg);
        let e = parse(r#"{"inputs":[{"name":"image","shape":[1],"datatype":"BYTES","data":[{"x":1}]}]}"#)
            .expect_err("refused");
        assert!(e.msg.contains("element 0 is an object without a `b64` string"), "{}", e.msg);
    }

    #[test]
    fn huge_flat_data_is_counted_not_kept_and_deep_nesting_is_refused() {
        let zeros = format!(
            r#"{{"inputs":[{{"name":"image","shape":[1],"datatype":"BYTES","data":[{}0]}}]}}"#,
            "0,".repeat(1_000_000)
        );
        let e = parse(&zeros).expect_err("refused");
        assert!(e.msg.contains("has 1000001 elements, its shape says 1"), "{}", e.msg);
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let e = parse(&deep).expect_err("refused");
        assert!(e.msg.contains("deeper than 32"), "{}", e.msg);
        // Brackets inside strings do not count.
        assert_eq!(json_depth(br#"{"a":"[[[[\"[[["}"#, 32), 1);
    }

    #[test]
    fn ids_are_strings_or_numbers() {
        let ok = r#"{"id":"r1","inputs":[{"name":"image","shape":[1],"datatype":"BYTES","data":["/9j/"]}]}"#;
        assert_eq!(parse(ok).expect("parses").id, Some(Value::String("r1".into())));
        let e = parse(r#"{"id":[[1]],"inputs":[]}"#).expect_err("refused");
        assert!(e.msg.contains("string `id`"), "{}", e.msg);
    }
}
