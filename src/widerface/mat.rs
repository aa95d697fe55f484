//! A small reader for MATLAB 5.0 MAT-files (little-endian), enough for the WIDER FACE ground truth.
//!
//! Supported: the 128-byte header; top-level variables stored plain (`miMATRIX`) or zlib-compressed
//! (`miCOMPRESSED`); the small data element format; arrays of class cell, char and every real
//! numeric class (double, single, int8..uint64, and logical, read as uint8). Not supported (a clear
//! error): big-endian files, MAT 7.3 (HDF5), struct, object, sparse and complex arrays.
//!
//! Bad input never panics and never allocates more than the input justifies: every length is checked
//! against the bytes that remain, element counts are checked before any allocation, nesting is
//! bounded, and a compressed variable may not inflate past [`DEFAULT_MAX_INFLATED`] bytes.

use std::path::Path;

use flate2::{Decompress, FlushDecompress, Status};

use crate::{Error, Result};

/// Largest size one compressed variable may inflate to (the WIDER FACE files inflate to about 1 MB).
pub const DEFAULT_MAX_INFLATED: usize = 256 << 20;

/// Deepest nesting of arrays accepted (the WIDER FACE files nest cells three deep).
const MAX_DEPTH: usize = 32;

const HEADER_LEN: usize = 128;

// Data types (the tag's type field).
const MI_INT8: u32 = 1;
const MI_UINT8: u32 = 2;
const MI_INT16: u32 = 3;
const MI_UINT16: u32 = 4;
const MI_INT32: u32 = 5;
const MI_UINT32: u32 = 6;
const MI_SINGLE: u32 = 7;
const MI_DOUBLE: u32 = 9;
const MI_INT64: u32 = 12;
const MI_UINT64: u32 = 13;
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;
const MI_UTF8: u32 = 16;
const MI_UTF16: u32 = 17;

/// The class of a MATLAB array (`mxCLASS`), for the classes this reader supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatClass {
    Cell,
    Char,
    Double,
    Single,
    Int8,
    UInt8,
    Int16,
    UInt16,
    Int32,
    UInt32,
    Int64,
    UInt64,
}

impl MatClass {
    fn from_code(code: u8) -> std::result::Result<MatClass, String> {
        Ok(match code {
            1 => MatClass::Cell,
            4 => MatClass::Char,
            6 => MatClass::Double,
            7 => MatClass::Single,
            8 => MatClass::Int8,
            9 => MatClass::UInt8,
            10 => MatClass::Int16,
            11 => MatClass::UInt16,
            12 => MatClass::Int32,
            13 => MatClass::UInt32,
            14 => MatClass::Int64,
            15 => MatClass::UInt64,
            2 => return Err("struct arrays are not supported".into()),
            3 => return Err("object arrays are not supported".into()),
            5 => return Err("sparse arrays are not supported".into()),
            16..=18 => return Err(format!("function/opaque arrays (class {code}) are not supported")),
            _ => return Err(format!("unknown array class {code}")),
        })
    }

    fn is_float(self) -> bool {
        matches!(self, MatClass::Double | MatClass::Single)
    }
}

/// The elements of a numeric array, column-major. Float classes hold `Float`, integer classes `Int`.
#[derive(Clone, Debug, PartialEq)]
pub enum Numbers {
    Float(Vec<f64>),
    Int(Vec<i64>),
}

impl Numbers {
    pub fn len(&self) -> usize {
        match self {
            Numbers::Float(v) => v.len(),
            Numbers::Int(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every element as f64 (exact for integers up to 2^53, as numpy's `astype(float)`).
    pub fn to_f64(&self) -> Vec<f64> {
        match self {
            Numbers::Float(v) => v.clone(),
            Numbers::Int(v) => v.iter().map(|&x| x as f64).collect(),
        }
    }
}

/// What an array holds.
#[derive(Clone, Debug, PartialEq)]
pub enum MatData {
    /// Cell array: the elements, column-major.
    Cell(Vec<MatArray>),
    /// Char array: the characters, column-major.
    Char(Vec<char>),
    /// Real numeric array of the given class.
    Numeric { class: MatClass, values: Numbers },
}

/// One MATLAB array: its name (empty inside cells), dimensions and data.
#[derive(Clone, Debug, PartialEq)]
pub struct MatArray {
    pub name: String,
    pub dims: Vec<usize>,
    pub data: MatData,
}

impl MatArray {
    pub fn numel(&self) -> usize {
        match &self.data {
            MatData::Cell(items) => items.len(),
            MatData::Char(chars) => chars.len(),
            MatData::Numeric { values, .. } => values.len(),
        }
    }

    pub fn class(&self) -> MatClass {
        match &self.data {
            MatData::Cell(_) => MatClass::Cell,
            MatData::Char(_) => MatClass::Char,
            MatData::Numeric { class, .. } => *class,
        }
    }

    /// The elements of a cell array; `what` names the array in the error.
    pub fn cell(&self, what: &str) -> Result<&[MatArray]> {
        match &self.data {
            MatData::Cell(items) => Ok(items),
            _ => Err(shape_error(what, format!("expected a cell array, found class {:?}", self.class()))),
        }
    }

    /// A char array that is one row (1xN, or empty) as a string; `what` names the array in the error.
    pub fn string(&self, what: &str) -> Result<String> {
        match &self.data {
            MatData::Char(chars) => {
                if chars.is_empty() || (self.dims.len() == 2 && self.dims[0] == 1) {
                    Ok(chars.iter().collect())
                } else {
                    Err(shape_error(what, format!("expected a one-row char array, found dimensions {:?}", self.dims)))
                }
            }
            _ => Err(shape_error(what, format!("expected a char array, found class {:?}", self.class()))),
        }
    }

    /// The elements of a numeric array; `what` names the array in the error.
    pub fn numbers(&self, what: &str) -> Result<&Numbers> {
        match &self.data {
            MatData::Numeric { values, .. } => Ok(values),
            _ => Err(shape_error(what, format!("expected a numeric array, found class {:?}", self.class()))),
        }
    }
}

fn shape_error(what: &str, msg: String) -> Error {
    Error::WiderFace(format!("{what}: {msg}"))
}

/// A parsed MAT-file: the header text and the top-level variables in file order.
#[derive(Clone, Debug, PartialEq)]
pub struct MatFile {
    pub header_text: String,
    pub variables: Vec<MatArray>,
}

impl MatFile {
    /// Reads and parses a MAT-file.
    pub fn read(path: &Path) -> Result<MatFile> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        MatFile::parse(&bytes, &path.display().to_string())
    }

    /// Parses MAT-file bytes; `source` names them in errors.
    pub fn parse(bytes: &[u8], source: &str) -> Result<MatFile> {
        MatFile::parse_with_limit(bytes, source, DEFAULT_MAX_INFLATED)
    }

    /// As [`MatFile::parse`], with the largest size one compressed variable may inflate to.
    pub fn parse_with_limit(bytes: &[u8], source: &str, max_inflated: usize) -> Result<MatFile> {
        parse_file(bytes, max_inflated)
            .map_err(|(offset, msg)| Error::WiderFace(format!("MAT-file {source}: at byte {offset}: {msg}")))
    }

    /// The top-level variable called `name`.
    pub fn variable(&self, name: &str) -> Result<&MatArray> {
        self.variables.iter().find(|v| v.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.variables.iter().map(|v| v.name.as_str()).collect();
            Error::WiderFace(format!("MAT-file has no variable `{name}` (it has {names:?})"))
        })
    }
}

/// A parse failure: the byte offset (in the file, or in the inflated variable) and what is wrong.
type ParseError = (usize, String);
type PResult<T> = std::result::Result<T, ParseError>;

fn parse_file(bytes: &[u8], max_inflated: usize) -> PResult<MatFile> {
    if bytes.len() < HEADER_LEN {
        return Err((0, format!("file is {} bytes, shorter than the 128-byte header", bytes.len())));
    }
    let text_bytes = &bytes[..116];
    let header_text = String::from_utf8_lossy(text_bytes).trim_end_matches([' ', '\0']).to_string();
    if text_bytes.starts_with(b"MATLAB 7.3") {
        return Err((0, "MAT 7.3 (HDF5) files are not supported".into()));
    }
    if !text_bytes.starts_with(b"MATLAB 5.0 MAT-file") {
        return Err((0, "not a MATLAB 5.0 MAT-file (header text does not start with `MATLAB 5.0 MAT-file`)".into()));
    }
    match &bytes[126..128] {
        b"IM" => {}
        b"MI" => return Err((126, "big-endian MAT-files are not supported".into())),
        other => return Err((126, format!("bad endian indicator {other:?} (expected \"IM\")"))),
    }
    let version = u16::from_le_bytes([bytes[124], bytes[125]]);
    if version != 0x0100 {
        return Err((124, format!("unsupported MAT-file version 0x{version:04x} (expected 0x0100)")));
    }

    let mut reader = Reader { buf: bytes, pos: HEADER_LEN, base: 0 };
    let mut variables = Vec::new();
    while reader.pos < bytes.len() {
        let start = reader.pos;
        let element = reader.element(false)?;
        let array = match element.dtype {
            MI_MATRIX => parse_matrix(element.data, start + 8, 0)?,
            MI_COMPRESSED => {
                let inflated = inflate(element.data, max_inflated).map_err(|msg| (start + 8, msg))?;
                // A failure inside is reported at the variable, with its offset in the inflated bytes.
                let inside = |(o, m): ParseError| {
                    (start, format!("in the compressed variable, at offset {o} of its inflated bytes: {m}"))
                };
                let mut inner = Reader { buf: &inflated, pos: 0, base: 0 };
                let el = inner.element(true).map_err(inside)?;
                if el.dtype != MI_MATRIX {
                    return Err((
                        start,
                        format!("compressed variable holds data type {} (expected miMATRIX)", el.dtype),
                    ));
                }
                parse_matrix(el.data, 8, 0).map_err(inside)?
            }
            other => {
                return Err((
                    start,
                    format!("top-level data element of type {other} (expected miMATRIX or miCOMPRESSED)"),
                ));
            }
        };
        variables.push(array);
    }
    Ok(MatFile { header_text, variables })
}

/// Inflates one zlib stream, requiring its end (and checksum) and at most `max` output bytes.
fn inflate(data: &[u8], max: usize) -> std::result::Result<Vec<u8>, String> {
    let mut z = Decompress::new(true);
    let mut out: Vec<u8> = Vec::with_capacity(data.len().saturating_mul(4).clamp(64, max.max(64)));
    loop {
        if out.len() == out.capacity() {
            if out.len() >= max {
                return Err(format!("compressed variable inflates to more than {max} bytes"));
            }
            let grow = out.len().max(4096).min(max - out.len());
            out.reserve_exact(grow);
        }
        let (in_before, out_before) = (z.total_in(), z.total_out());
        let consumed = usize::try_from(in_before).map_err(|_| "zlib stream too long".to_string())?;
        let input = data.get(consumed..).unwrap_or(&[]);
        let status = z
            .decompress_vec(input, &mut out, FlushDecompress::None)
            .map_err(|e| format!("corrupt zlib stream: {e}"))?;
        if status == Status::StreamEnd {
            return Ok(out);
        }
        let progressed = z.total_in() != in_before || z.total_out() != out_before;
        if !progressed && out.len() < out.capacity() {
            return Err(format!(
                "zlib stream truncated (ends after {} of {} bytes without its end marker)",
                z.total_in(),
                data.len()
            ));
        }
    }
}

struct Element<'a> {
    dtype: u32,
    data: &'a [u8],
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Offset of `buf` in the bytes reported in errors.
    base: usize,
}

impl<'a> Reader<'a> {
    fn offset(&self) -> usize {
        self.base + self.pos
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn u32_at(&self, at: usize) -> PResult<u32> {
        match self.buf.get(at..at + 4) {
            Some(b) => Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            None => Err((self.base + at, "truncated: data element tag cut short".into())),
        }
    }

    /// Reads one data element (either tag format) and moves past it and its padding to 8 bytes.
    /// `pad` is false only for top-level elements, where compressed variables are not padded.
    fn element(&mut self, pad: bool) -> PResult<Element<'a>> {
        let start = self.pos;
        let first = self.u32_at(start)?;
        if first >> 16 != 0 {
            // Small data element: 2-byte type, 2-byte length, up to 4 bytes of data in the tag itself.
            let (dtype, len) = (first & 0xffff, (first >> 16) as usize);
            if len > 4 {
                return Err((self.base + start, format!("small data element claims {len} bytes (at most 4)")));
            }
            if self.remaining() < 8 {
                return Err((self.base + start, "truncated: small data element cut short".into()));
            }
            self.pos = start + 8;
            return Ok(Element { dtype, data: &self.buf[start + 4..start + 4 + len] });
        }
        let len = self.u32_at(start + 4)? as usize;
        let data_start = start + 8;
        if len > self.buf.len() - data_start {
            return Err((
                self.base + start,
                format!(
                    "truncated: data element of type {first} claims {len} bytes, only {} remain",
                    self.buf.len() - data_start
                ),
            ));
        }
        let end = data_start + len;
        let padded = if pad || first != MI_COMPRESSED { end.div_ceil(8) * 8 } else { end };
        // The last element of a buffer may go without its padding.
        self.pos = padded.min(self.buf.len()).max(end);
        Ok(Element { dtype: first, data: &self.buf[data_start..end] })
    }
}

/// Parses the body of a miMATRIX element (`data`, found at byte `offset`).
fn parse_matrix(data: &[u8], offset: usize, depth: usize) -> PResult<MatArray> {
    if depth > MAX_DEPTH {
        return Err((offset, format!("arrays nested deeper than {MAX_DEPTH} levels")));
    }
    if data.is_empty() {
        // An empty miMATRIX stands for an empty (0x0 double) array.
        return Ok(MatArray {
            name: String::new(),
            dims: vec![0, 0],
            data: MatData::Numeric { class: MatClass::Double, values: Numbers::Float(Vec::new()) },
        });
    }
    let mut r = Reader { buf: data, pos: 0, base: offset };

    let at = r.offset();
    let flags = r.element(true)?;
    if flags.dtype != MI_UINT32 || flags.data.len() != 8 {
        return Err((
            at,
            format!(
                "array flags: expected 8 bytes of miUINT32, found {} bytes of type {}",
                flags.data.len(),
                flags.dtype
            ),
        ));
    }
    let flag_word = u32::from_le_bytes([flags.data[0], flags.data[1], flags.data[2], flags.data[3]]);
    let class = MatClass::from_code((flag_word & 0xff) as u8).map_err(|m| (at, m))?;
    if flag_word & 0x0800 != 0 {
        return Err((at, "complex arrays are not supported".into()));
    }

    let at = r.offset();
    let dims_el = r.element(true)?;
    if dims_el.dtype != MI_INT32 || !dims_el.data.len().is_multiple_of(4) || dims_el.data.len() < 8 {
        return Err((
            at,
            format!(
                "dimensions: expected at least two miINT32 values, found {} bytes of type {}",
                dims_el.data.len(),
                dims_el.dtype
            ),
        ));
    }
    let mut dims = Vec::with_capacity(dims_el.data.len() / 4);
    for c in dims_el.data.chunks_exact(4) {
        let d = i32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        dims.push(usize::try_from(d).map_err(|_| (at, format!("negative dimension {d}")))?);
    }
    let numel = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| (at, format!("dimensions {dims:?} overflow")))?;

    let at = r.offset();
    let name_el = r.element(true)?;
    if name_el.dtype != MI_INT8 && name_el.dtype != MI_UINT8 {
        return Err((at, format!("array name: expected miINT8, found type {}", name_el.dtype)));
    }
    let name =
        std::str::from_utf8(name_el.data).map_err(|_| (at, "array name is not ASCII/UTF-8".to_string()))?.to_string();

    let data = match class {
        MatClass::Cell => {
            // Every element needs at least an 8-byte tag: check before allocating.
            if numel > r.remaining() / 8 {
                return Err((
                    r.offset(),
                    format!(
                        "cell array of {numel} elements (dimensions {dims:?}) but only {} bytes remain",
                        r.remaining()
                    ),
                ));
            }
            let mut items = Vec::with_capacity(numel);
            for k in 0..numel {
                let at = r.offset();
                let el = r.element(true)?;
                if el.dtype != MI_MATRIX {
                    return Err((at, format!("cell element {k}: expected miMATRIX, found data type {}", el.dtype)));
                }
                items.push(parse_matrix(el.data, at + 8, depth + 1)?);
            }
            MatData::Cell(items)
        }
        MatClass::Char => {
            let at = r.offset();
            let chars = if numel == 0 && r.remaining() == 0 {
                Vec::new()
            } else {
                decode_chars(&r.element(true)?).map_err(|m| (at, m))?
            };
            if chars.len() != numel {
                return Err((
                    at,
                    format!("char array has {} characters, dimensions {dims:?} need {numel}", chars.len()),
                ));
            }
            MatData::Char(chars)
        }
        _ => {
            let at = r.offset();
            let el = r.element(true)?;
            let values = decode_numbers(&el, class).map_err(|m| (at, m))?;
            if values.len() != numel {
                return Err((
                    at,
                    format!("numeric array has {} elements, dimensions {dims:?} need {numel}", values.len()),
                ));
            }
            MatData::Numeric { class, values }
        }
    };
    Ok(MatArray { name, dims, data })
}

fn decode_chars(el: &Element) -> std::result::Result<Vec<char>, String> {
    match el.dtype {
        MI_UINT16 | MI_UTF16 => {
            if !el.data.len().is_multiple_of(2) {
                return Err(format!("UTF-16 char data of odd length {}", el.data.len()));
            }
            let units = el.data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]));
            char::decode_utf16(units)
                .collect::<std::result::Result<Vec<char>, _>>()
                .map_err(|e| format!("invalid UTF-16 char data: {e}"))
        }
        MI_UTF8 => std::str::from_utf8(el.data)
            .map(|s| s.chars().collect())
            .map_err(|e| format!("invalid UTF-8 char data: {e}")),
        MI_UINT8 | MI_INT8 => Ok(el.data.iter().map(|&b| char::from(b)).collect()),
        other => Err(format!("char data of unsupported type {other}")),
    }
}

fn decode_numbers(el: &Element, class: MatClass) -> std::result::Result<Numbers, String> {
    let d = el.data;
    let size = match el.dtype {
        MI_INT8 | MI_UINT8 => 1,
        MI_INT16 | MI_UINT16 => 2,
        MI_INT32 | MI_UINT32 | MI_SINGLE => 4,
        MI_DOUBLE | MI_INT64 | MI_UINT64 => 8,
        other => return Err(format!("numeric data of unsupported type {other}")),
    };
    if !d.len().is_multiple_of(size) {
        return Err(format!("numeric data of {} bytes is not a whole number of {size}-byte values", d.len()));
    }
    // Integer storage types read as i64 (u64 beyond i64 is an error), float ones as f64.
    let ints: Option<Vec<i64>> = match el.dtype {
        MI_INT8 => Some(d.iter().map(|&b| i64::from(b as i8)).collect()),
        MI_UINT8 => Some(d.iter().map(|&b| i64::from(b)).collect()),
        MI_INT16 => Some(d.chunks_exact(2).map(|c| i64::from(i16::from_le_bytes([c[0], c[1]]))).collect()),
        MI_UINT16 => Some(d.chunks_exact(2).map(|c| i64::from(u16::from_le_bytes([c[0], c[1]]))).collect()),
        MI_INT32 => Some(d.chunks_exact(4).map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect()),
        MI_UINT32 => Some(d.chunks_exact(4).map(|c| i64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect()),
        MI_INT64 => Some(
            d.chunks_exact(8).map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])).collect(),
        ),
        MI_UINT64 => Some(
            d.chunks_exact(8)
                .map(|c| {
                    let v = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
                    i64::try_from(v).map_err(|_| format!("uint64 value {v} too large"))
                })
                .collect::<std::result::Result<Vec<i64>, String>>()?,
        ),
        _ => None,
    };
    let floats = || -> Vec<f64> {
        match el.dtype {
            MI_SINGLE => d.chunks_exact(4).map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect(),
            _ => d
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
        }
    };
    Ok(match (class.is_float(), ints) {
        (true, Some(ints)) => Numbers::Float(ints.into_iter().map(|x| x as f64).collect()),
        (true, None) => Numbers::Float(floats()),
        (false, Some(ints)) => Numbers::Int(ints),
        (false, None) => {
            let mut out = Vec::with_capacity(d.len() / size);
            for x in floats() {
                // Integer classes stored as floats: accept only exact integers.
                if x.fract() != 0.0 || !(-9.2e18..9.2e18).contains(&x) {
                    return Err(format!("{class:?} array holds the non-integer value {x}"));
                }
                out.push(x as i64);
            }
            Numbers::Int(out)
        }
    })
}
