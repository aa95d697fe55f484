//! PyTorch zip checkpoints (`torch.save` since 1.6), read without Python and without executing pickle
//! code: a restricted pickle machine that knows only the few globals a state dict uses
//! (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`, `torch.*Storage`)
//! and refuses every other.

use super::{StateDict, Tensor};
use crate::error::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::io::{Cursor, Read};
use std::path::Path;

// Every pickle value kind a state dict can hold; some are parsed only to be skipped.
#[allow(dead_code)]
#[derive(Clone, Debug)]
enum V {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<V>),
    List(Vec<V>),
    Dict(Vec<(V, V)>),
    Global(String),
    Storage { dtype: String, key: String },
    Tensor { storage: Box<V>, offset: usize, size: Vec<usize>, stride: Vec<usize> },
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<V>,
    marks: Vec<usize>,
    memo: HashMap<u32, V>,
}

const MAX_ELEMENTS: usize = 1 << 31;

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len()).ok_or("pickle ends early")?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn line(&mut self) -> std::result::Result<String, String> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&c| c == b'\n').ok_or("unterminated line in pickle")?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }
    fn pop(&mut self) -> std::result::Result<V, String> {
        self.stack.pop().ok_or_else(|| "pickle stack underflow".to_string())
    }
    fn pop_mark(&mut self) -> std::result::Result<Vec<V>, String> {
        let m = self.marks.pop().ok_or("pickle MARK missing")?;
        if m > self.stack.len() {
            return Err("pickle MARK beyond stack".into());
        }
        Ok(self.stack.split_off(m))
    }
    fn top_dict(&mut self) -> std::result::Result<&mut Vec<(V, V)>, String> {
        match self.stack.last_mut() {
            Some(V::Dict(d)) => Ok(d),
            _ => Err("SETITEM on something that is not a dict".into()),
        }
    }
    fn text(&mut self, n: usize) -> std::result::Result<V, String> {
        let b = self.take(n)?;
        Ok(V::Str(String::from_utf8(b.to_vec()).map_err(|_| "invalid UTF-8 string in pickle")?))
    }
    fn global(module: &str, name: &str) -> std::result::Result<V, String> {
        let full = format!("{module}.{name}");
        let allowed = matches!(
            full.as_str(),
            "collections.OrderedDict" | "torch._utils._rebuild_tensor_v2" | "torch._utils._rebuild_parameter"
        ) || (module == "torch" && name.ends_with("Storage"));
        if allowed {
            Ok(V::Global(full))
        } else {
            Err(format!("refusing to load global `{full}`: not part of a plain state dict"))
        }
    }

    fn run(&mut self) -> std::result::Result<V, String> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?;
                } // PROTO
                0x95 => {
                    self.take(8)?;
                } // FRAME
                b'.' => return self.pop(), // STOP
                b'(' => self.marks.push(self.stack.len()),
                b'}' => self.stack.push(V::Dict(Vec::new())),
                b']' => self.stack.push(V::List(Vec::new())),
                b')' => self.stack.push(V::Tuple(Vec::new())),
                b'N' => self.stack.push(V::None),
                0x88 => self.stack.push(V::Bool(true)),
                0x89 => self.stack.push(V::Bool(false)),
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(V::Int(v as i64))
                }
                b'M' => {
                    let b = self.take(2)?;
                    self.stack.push(V::Int(u16::from_le_bytes([b[0], b[1]]) as i64))
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(V::Int(v as i64))
                }
                0x8a => {
                    // LONG1
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    if n > 8 {
                        return Err("integer too large in pickle".into());
                    }
                    let mut v: i64 = 0;
                    for (i, &x) in b.iter().enumerate() {
                        v |= (x as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.stack.push(V::Int(v))
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.stack.push(V::Float(f64::from_be_bytes(a)))
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.text(n)?;
                    self.stack.push(v)
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.text(n)?;
                    self.stack.push(v)
                }
                b'U' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(V::Bytes(b))
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(V::Bytes(b))
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(V::Bytes(b))
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    let v = self.stack.last().ok_or("BINPUT on empty stack")?.clone();
                    self.memo.insert(i, v);
                }
                b'r' => {
                    let i = self.u32()?;
                    let v = self.stack.last().ok_or("LONG_BINPUT on empty stack")?.clone();
                    self.memo.insert(i, v);
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    let v = self.stack.last().ok_or("MEMOIZE on empty stack")?.clone();
                    self.memo.insert(i, v);
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    let v = self.memo.get(&i).ok_or("BINGET of an unknown memo slot")?.clone();
                    self.stack.push(v)
                }
                b'j' => {
                    let i = self.u32()?;
                    let v = self.memo.get(&i).ok_or("LONG_BINGET of an unknown memo slot")?.clone();
                    self.stack.push(v)
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Self::global(&module, &name)?)
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (V::Str(m), V::Str(n)) => self.stack.push(Self::global(&m, &n)?),
                        _ => return Err("STACK_GLOBAL needs two strings".into()),
                    }
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(V::Tuple(items))
                }
                0x85 => {
                    let a = self.pop()?;
                    self.stack.push(V::Tuple(vec![a]))
                }
                0x86 => {
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.stack.push(V::Tuple(vec![a, b]))
                }
                0x87 => {
                    let c = self.pop()?;
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.stack.push(V::Tuple(vec![a, b, c]))
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.stack.last_mut() {
                        Some(V::List(l)) => l.push(v),
                        _ => return Err("APPEND on something that is not a list".into()),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.stack.last_mut() {
                        Some(V::List(l)) => l.extend(items),
                        _ => return Err("APPENDS on something that is not a list".into()),
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.top_dict()?.push((k, v));
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err("SETITEMS with an odd number of items".into());
                    }
                    let d = self.top_dict()?;
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        d.push((k, v));
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.stack.push(persistent_load(pid)?)
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    self.stack.push(reduce(f, args)?)
                }
                0x81 => {
                    // NEWOBJ: only OrderedDict() appears in state dicts
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    self.stack.push(reduce(cls, args)?)
                }
                b'b' => {
                    // BUILD: the state of an OrderedDict is its `_metadata`, which the engine does not need.
                    self.pop()?;
                }
                other => return Err(format!("unsupported pickle opcode 0x{other:02x} at byte {}", self.pos - 1)),
            }
        }
    }
}

fn as_usize(v: &V) -> std::result::Result<usize, String> {
    match v {
        V::Int(i) if *i >= 0 => Ok(*i as usize),
        _ => Err(format!("expected a non-negative integer, found {v:?}")),
    }
}

fn usizes(v: &V) -> std::result::Result<Vec<usize>, String> {
    match v {
        V::Tuple(t) | V::List(t) => t.iter().map(as_usize).collect(),
        _ => Err(format!("expected a tuple of integers, found {v:?}")),
    }
}

fn persistent_load(pid: V) -> std::result::Result<V, String> {
    // ('storage', torch.FloatStorage, key, location, numel)
    let V::Tuple(t) = pid else { return Err("persistent id is not a tuple".into()) };
    match t.as_slice() {
        [V::Str(kind), V::Global(dtype), V::Str(key), _location, _numel, ..] if kind == "storage" => {
            Ok(V::Storage { dtype: dtype.trim_start_matches("torch.").to_string(), key: key.clone() })
        }
        _ => Err(format!("unsupported persistent id {t:?}")),
    }
}

fn reduce(f: V, args: V) -> std::result::Result<V, String> {
    let V::Global(name) = f else { return Err("REDUCE of something that is not an allowed global".into()) };
    let V::Tuple(a) = args else { return Err(format!("REDUCE of {name} without an argument tuple")) };
    match name.as_str() {
        "collections.OrderedDict" => Ok(V::Dict(Vec::new())),
        "torch._utils._rebuild_parameter" => {
            a.into_iter().next().ok_or_else(|| "_rebuild_parameter without data".to_string())
        }
        "torch._utils._rebuild_tensor_v2" => {
            if a.len() < 4 {
                return Err("_rebuild_tensor_v2 with fewer than 4 arguments".into());
            }
            let size = usizes(&a[2])?;
            let stride = usizes(&a[3])?;
            if size.len() != stride.len() {
                return Err(format!("tensor size {size:?} and stride {stride:?} differ in rank"));
            }
            Ok(V::Tensor { storage: Box::new(a[0].clone()), offset: as_usize(&a[1])?, size, stride })
        }
        other => Err(format!("refusing to call `{other}`")),
    }
}

fn storage_to_f32(dtype: &str, b: &[u8]) -> std::result::Result<Vec<f32>, String> {
    use safetensors::Dtype;
    let d = match dtype {
        "FloatStorage" => Dtype::F32,
        "DoubleStorage" => Dtype::F64,
        "HalfStorage" => Dtype::F16,
        "BFloat16Storage" => Dtype::BF16,
        "LongStorage" => Dtype::I64,
        "IntStorage" => Dtype::I32,
        other => return Err(format!("unsupported storage type {other}")),
    };
    super::safetensors_io::to_f32(d, b)
}

/// Gathers a strided view of `storage` into a contiguous tensor.
fn gather(storage: &[f32], offset: usize, size: &[usize], stride: &[usize]) -> std::result::Result<Vec<f32>, String> {
    let n = size
        .iter()
        .try_fold(1usize, |a, &s| a.checked_mul(s))
        .filter(|&n| n <= MAX_ELEMENTS)
        .ok_or("tensor too large")?;
    if n == 0 {
        return Ok(Vec::new());
    }
    let max_index = offset + size.iter().zip(stride).map(|(&s, &st)| (s - 1) * st).sum::<usize>();
    if max_index >= storage.len() {
        return Err(format!(
            "tensor view (offset {offset}, size {size:?}, stride {stride:?}) reaches past its storage of {} elements",
            storage.len()
        ));
    }
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; size.len()];
    for _ in 0..n {
        out.push(storage[offset + idx.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>()]);
        for d in (0..size.len()).rev() {
            idx[d] += 1;
            if idx[d] < size[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Ok(out)
}

/// The tensors of a state dict (found at the top level, or under `state_dict` / `model`).
fn find_state_dict(v: V) -> Option<Vec<(V, V)>> {
    let V::Dict(items) = v else { return None };
    if items.iter().any(|(_, v)| matches!(v, V::Tensor { .. })) {
        return Some(items);
    }
    items
        .into_iter()
        .find(|(k, v)| {
            matches!(k, V::Str(s) if s == "state_dict" || s == "model" || s == "net") && matches!(v, V::Dict(_))
        })
        .and_then(|(_, v)| find_state_dict(v))
}

/// Runs one pickle starting at `pos`; returns its value and where it ended.
fn unpickle_at(data: &[u8], pos: usize) -> std::result::Result<(V, usize), String> {
    let mut m = Machine { data, pos, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new() };
    let v = m.run()?;
    Ok((v, m.pos))
}

/// Turns the state dict's tensor entries into f32 tensors, reading storages through `storage_bytes`.
fn collect_tensors(
    items: Vec<(V, V)>,
    mut storage_bytes: impl FnMut(&str) -> Result<Vec<u8>>,
    path: &Path,
) -> Result<BTreeMap<String, Tensor>> {
    let mut storages: HashMap<String, Vec<f32>> = HashMap::new();
    let mut tensors = BTreeMap::new();
    for (k, v) in items {
        let V::Str(name) = k else {
            return Err(Error::WeightsFormat { path: path.into(), msg: "a state-dict key is not a string".into() });
        };
        let V::Tensor { storage, offset, size, stride } = v else { continue };
        let V::Storage { dtype, key } = *storage else {
            return Err(Error::WeightsFormat { path: path.into(), msg: format!("tensor `{name}` has no storage") });
        };
        if !storages.contains_key(&key) {
            let raw = storage_bytes(&key)?;
            let data = storage_to_f32(&dtype, &raw).map_err(|msg| Error::TensorData { name: name.clone(), msg })?;
            storages.insert(key.clone(), data);
        }
        let data = gather(&storages[&key], offset, &size, &stride)
            .map_err(|msg| Error::TensorData { name: name.clone(), msg })?;
        tensors.insert(name, Tensor { shape: size, data });
    }
    Ok(tensors)
}

/// The pre-1.6 `torch.save` format (the older project's `mobilenet0.25_Final.pth`): pickles of the magic
/// number, the protocol version, system info, the state dict, the list of storage keys; then each
/// storage in that order as an 8-byte element count followed by its raw little-endian elements.
fn parse_legacy(bytes: &[u8], path: &Path) -> Result<StateDict> {
    let bad = |msg: String| Error::WeightsFormat { path: path.into(), msg };
    // The magic number 0x1950a86a20f9469cfc6c is a 10-byte LONG1, wider than the machine's integers: compare its bytes.
    const MAGIC_PICKLE: [u8; 15] =
        [0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e];
    if !bytes.starts_with(&MAGIC_PICKLE) {
        return Err(bad("neither a zip checkpoint nor a legacy torch.save file (bad magic number)".into()));
    }
    let mut pos = MAGIC_PICKLE.len();
    let (version, p) = unpickle_at(bytes, pos).map_err(|e| bad(format!("protocol version: {e}")))?;
    if !matches!(version, V::Int(1001)) {
        return Err(bad(format!("unsupported legacy protocol version {version:?}")));
    }
    let (_sys_info, p) = unpickle_at(bytes, p).map_err(|e| bad(format!("system info: {e}")))?;
    let (root, p) = unpickle_at(bytes, p).map_err(|e| bad(format!("state dict pickle: {e}")))?;
    let (keys, p) = unpickle_at(bytes, p).map_err(|e| bad(format!("storage key list: {e}")))?;
    pos = p;
    let V::List(keys) = keys else { return Err(bad("storage key list is not a list".into())) };
    let items = find_state_dict(root).ok_or_else(|| bad("the pickle holds no dict of tensors".into()))?;
    // Element sizes per storage, from the tensors that use them.
    let mut elem_size: HashMap<String, usize> = HashMap::new();
    for (_, v) in &items {
        if let V::Tensor { storage, .. } = v
            && let V::Storage { dtype, key } = storage.as_ref()
        {
            let size = match dtype.as_str() {
                "DoubleStorage" | "LongStorage" => 8,
                "HalfStorage" | "BFloat16Storage" => 2,
                _ => 4,
            };
            elem_size.insert(key.clone(), size);
        }
    }
    let mut blobs: HashMap<String, Vec<u8>> = HashMap::new();
    for k in keys {
        let V::Str(key) = k else { return Err(bad("a storage key is not a string".into())) };
        let count_bytes =
            bytes.get(pos..pos + 8).ok_or_else(|| bad(format!("storage {key}: file ends before its size")))?;
        let mut a = [0u8; 8];
        a.copy_from_slice(count_bytes);
        let count = u64::from_le_bytes(a) as usize;
        let size = elem_size.get(&key).copied().unwrap_or(4);
        let len = count.checked_mul(size).ok_or_else(|| bad(format!("storage {key}: size overflows")))?;
        let data = bytes
            .get(pos + 8..pos + 8 + len)
            .ok_or_else(|| bad(format!("storage {key}: file ends inside its {count} elements (truncated?)")))?;
        blobs.insert(key, data.to_vec());
        pos += 8 + len;
    }
    let tensors = collect_tensors(
        items,
        |key| blobs.remove(key).ok_or_else(|| bad(format!("storage {key} is not in the file"))),
        path,
    )?;
    Ok(StateDict { tensors, network: None })
}

pub fn parse_checkpoint(bytes: &[u8], path: &Path) -> Result<StateDict> {
    if !bytes.starts_with(b"PK\x03\x04") {
        return parse_legacy(bytes, path);
    }
    let bad = |msg: String| Error::WeightsFormat { path: path.into(), msg };
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| bad(format!("not a readable PyTorch zip checkpoint: {e}")))?;
    let names: Vec<String> = zip.file_names().filter_map(|n| n.ok().map(|n| n.into_owned())).collect();
    let pkl = names
        .iter()
        .find(|n| n.ends_with("data.pkl") && n.matches('/').count() <= 1)
        .ok_or_else(|| bad("no data.pkl in the archive".into()))?
        .clone();
    let prefix = pkl.trim_end_matches("data.pkl").to_string();
    let mut read_entry = |name: &str| -> Result<Vec<u8>> {
        let mut f = zip.by_name(name).map_err(|e| bad(format!("archive entry {name}: {e}")))?;
        let mut buf = Vec::with_capacity(f.size().min(1 << 30) as usize);
        f.read_to_end(&mut buf).map_err(|e| bad(format!("archive entry {name}: {e}")))?;
        Ok(buf)
    };
    if names.contains(&format!("{prefix}byteorder")) {
        let order = read_entry(&format!("{prefix}byteorder"))?;
        if order != b"little" {
            return Err(bad(format!("byte order {:?} is not supported", String::from_utf8_lossy(&order))));
        }
    }
    let pickle = read_entry(&pkl)?;
    let mut m = Machine { data: &pickle, pos: 0, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new() };
    let root = m.run().map_err(|e| bad(format!("{pkl}: {e}")))?;
    let items = find_state_dict(root).ok_or_else(|| bad("the pickle holds no dict of tensors".into()))?;

    let tensors = collect_tensors(items, |key| read_entry(&format!("{prefix}data/{key}")), path)?;
    Ok(StateDict { tensors, network: None })
}
