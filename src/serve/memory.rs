//! The server's memory budget (`--max-memory`): every request reserves what its images will cost
//! (decoded pixels and forward-pass buffers), counted from the image headers before a byte is decoded.
//! A request that does not fit now is refused with 503 at once; one that could never fit gets 413.
//!
//! Also here: the header probe that reads an image's size without decoding it (image_io has no such
//! function, and its decoder may read far past the header before it checks anything), and the memory
//! release after large batches.

use crate::graph::Plan;
use crate::image_io::{self, ResizeMode};
use crate::model::graph::Graph;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// What an image's header says, enough to bound what decoding it allocates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub width: u32,
    pub height: u32,
    /// Bytes per pixel of the decoder's own output buffer (before conversion to BGR).
    pub decoder_bpp: u64,
}

/// Reads width, height and sample layout from a PNG IHDR or a JPEG SOFn segment, touching nothing
/// past it. Errors are plain text; the caller names the image.
pub fn probe(bytes: &[u8]) -> Result<Probe, String> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        probe_png(bytes)
    } else if bytes.starts_with(&[0xFF, 0xD8]) {
        probe_jpeg(bytes)
    } else {
        Err("not a JPEG or PNG image (unrecognised signature)".into())
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn probe_png(b: &[u8]) -> Result<Probe, String> {
    // The PNG spec puts IHDR first: length 13, type, width, height, bit depth, colour type.
    if b.len() < 8 + 8 + 13 || &b[12..16] != b"IHDR" || be32(&b[8..12]) != 13 {
        return Err("PNG without an IHDR chunk first (truncated or corrupt header)".into());
    }
    let (width, height, depth, colour) = (be32(&b[16..20]), be32(&b[20..24]), b[24], b[25]);
    let channels: u64 = match colour {
        0 => 2,     // grey, plus alpha when a tRNS chunk follows
        2 | 3 => 4, // RGB or palette, both expanded to RGBA when tRNS is present
        4 => 2,
        6 => 4,
        c => return Err(format!("PNG colour type {c} is not valid")),
    };
    let bytes_per_sample = if depth == 16 { 2 } else { 1 };
    Ok(Probe { width, height, decoder_bpp: channels * bytes_per_sample })
}

fn probe_jpeg(b: &[u8]) -> Result<Probe, String> {
    let mut i = 2;
    loop {
        // Fill bytes (0xFF runs) may precede a marker.
        while i < b.len() && b[i] == 0xFF && b.get(i + 1) == Some(&0xFF) {
            i += 1;
        }
        if i + 4 > b.len() || b[i] != 0xFF {
            return Err("JPEG without a frame header (SOF) before its data ends".into());
        }
        let marker = b[i + 1];
        if matches!(marker, 0x01 | 0xD0..=0xD7) {
            i += 2;
            continue;
        }
        let len = u16::from_be_bytes([b[i + 2], b[i + 3]]) as usize;
        if len < 2 {
            return Err(format!("JPEG segment 0xFF{marker:02X} has length {len}"));
        }
        let is_sof = matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC);
        if is_sof {
            let s = b.get(i + 4..i + 10).ok_or("JPEG frame header cut short")?;
            let height = u16::from_be_bytes([s[1], s[2]]) as u32;
            let width = u16::from_be_bytes([s[3], s[4]]) as u32;
            let components = s[5] as u64;
            if !(1..=4).contains(&components) {
                return Err(format!("JPEG with {components} colour components"));
            }
            // 12-bit JPEGs decode to 16-bit samples.
            let bytes_per_sample = if s[0] > 8 { 2 } else { 1 };
            return Ok(Probe { width, height, decoder_bpp: components.max(3) * bytes_per_sample });
        }
        if marker == 0xDA || marker == 0xD9 {
            return Err("JPEG without a frame header (SOF) before its data".into());
        }
        i += 2 + len;
    }
}

/// Upper bound on the bytes one image costs from its header to the end of its forward pass, other
/// than the forward pass itself: the decoder's buffer, a second one when EXIF orientation rotates it,
/// a conversion buffer, the BGR image, and the resized network input.
pub fn decode_bytes(p: &Probe, mode: ResizeMode) -> u64 {
    let px = u64::from(p.width) * u64::from(p.height);
    let (nw, nh) = network_input(p, mode);
    px * (2 * p.decoder_bpp + 3 + 3) + (nw * nh * 3) as u64
}

/// The network input size of an image (after `--resize`). Orientation may swap the sides; every
/// estimate here is symmetric in them.
pub fn network_input(p: &Probe, mode: ResizeMode) -> (usize, usize) {
    let (w, h) = (p.width as usize, p.height as usize);
    let r = image_io::resize_factor(mode, h, w);
    if r == 1.0 { (w, h) } else { image_io::resized_dims(w, h, r) }
}

/// The graph's ops and tensor shapes (its weights dropped), enough to bound a forward pass's memory at
/// any input size with the executors' own buffer plan ([`Plan`]).
#[derive(Clone, Debug)]
pub struct ForwardModel {
    skeleton: Arc<Graph>,
    /// (channels, stride) of every tensor.
    tensors: Vec<(u64, u64)>,
}

impl ForwardModel {
    pub fn new(graph: &Graph) -> ForwardModel {
        use crate::model::graph::Op;
        let mut skeleton = graph.clone();
        for op in &mut skeleton.ops {
            if let Op::Conv(c) | Op::Heads { conv: c, .. } = op {
                c.weight = Vec::new();
                c.bias = Vec::new();
            }
        }
        // The CPU executor's graph: its plan is the one this bounds.
        let skeleton = crate::passes::fuse(&skeleton, crate::passes::Fusions::CPU);
        ForwardModel {
            skeleton: Arc::new(skeleton),
            tensors: graph.tensors.iter().map(|t| (t.channels as u64, t.stride as u64)).collect(),
        }
    }

    /// f32 values of one image's activation arena: the plan every executor runs with (shapes, liveness,
    /// offsets), or, should no plan be possible at this size, every tensor with a buffer of its own.
    fn allocated(&self, h: u64, w: u64) -> u64 {
        match Plan::new(&self.skeleton, 1, h as usize, w as usize, false) {
            Ok(plan) => plan.arena_bytes() as u64 / 4,
            Err(_) => (0..self.tensors.len()).map(|t| self.size(t, h, w)).sum(),
        }
    }

    fn size(&self, t: usize, h: u64, w: u64) -> u64 {
        let (c, s) = self.tensors[t];
        c * h.div_ceil(s) * w.div_ceil(s)
    }

    /// Forward-pass bytes of one image at h×w; a batch of n takes n times it (every buffer scales
    /// with n, so the plan is the same).
    ///
    /// Rule: the executors' plan arena (see `allocated`: each tensor is
    /// `channels·ceil(h/stride)·ceil(w/stride)` f32, placed in one arena by liveness; without reuse this
    /// would be the sum of all tensors, with it typically a third of that), plus one padded copy of the largest tensor (the
    /// convolutions' scratch: (h'+2)(w'+2) per channel), and the raw outputs and decoded candidates,
    /// 16 f32 per anchor, twice.
    pub fn bytes(&self, h: usize, w: usize) -> u64 {
        let (h, w) = (h as u64, w as u64);
        let padded =
            self.tensors.iter().map(|&(c, s)| c * (h.div_ceil(s) + 2) * (w.div_ceil(s) + 2)).max().unwrap_or(0);
        let anchors = crate::post::anchors::num_anchors(h as usize, w as usize) as u64;
        4 * (self.allocated(h, w) + padded + 2 * 16 * anchors)
    }

    /// The sum of every tensor at h×w, in bytes: what a pass would take with no buffer ever reused.
    pub fn all_tensors_bytes(&self, h: usize, w: usize) -> u64 {
        let (h, w) = (h as u64, w as u64);
        4 * (0..self.tensors.len()).map(|t| self.size(t, h, w)).sum::<u64>()
    }
}

/// `RETINAFACE_MACHINE_MEMORY` (a byte count, K/M/G/T suffixes): the memory to plan for where the cgroup
/// files do not show a container's limit. `Err` names a value that does not parse.
pub fn machine_memory_override() -> Result<Option<u64>, String> {
    match std::env::var("RETINAFACE_MACHINE_MEMORY") {
        Ok(v) => super::config::parse_bytes(&v).map(Some).map_err(|e| format!("RETINAFACE_MACHINE_MEMORY={e}")),
        Err(_) => Ok(None),
    }
}

/// The memory this machine offers: `RETINAFACE_MACHINE_MEMORY` when set, else the cgroup limit when one
/// is set, else physical memory.
pub fn machine_memory() -> Option<u64> {
    if let Ok(Some(m)) = machine_memory_override() {
        return Some(m);
    }
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .or_else(|| {
            std::fs::read_to_string("/sys/fs/cgroup/memory/memory.limit_in_bytes")
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                // cgroup v1 reports "no limit" as a number near 2^63.
                .filter(|&v| v < 1 << 60)
        });
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    match (cgroup, total) {
        (Some(c), Some(t)) => Some(c.min(t)),
        (c, t) => c.or(t),
    }
}

/// `--max-memory`'s default: half of what the machine offers (the rest is for the weights, the
/// runtime, the in-flight request bodies and whatever else runs there); 2 GiB where it cannot be read.
pub fn default_max_memory() -> u64 {
    machine_memory().map_or(2 << 30, |m| m / 2)
}

/// Bytes reserved by admitted requests, against a fixed capacity.
pub struct Budget {
    used: Arc<AtomicU64>,
    capacity: u64,
}

/// A request's share of the budget, given back on drop (when its answer is ready, or it fails).
pub struct Reservation {
    used: Arc<AtomicU64>,
    bytes: u64,
}

impl Reservation {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

pub enum Refusal {
    /// More than the whole budget: it can never run.
    Never,
    /// Does not fit beside what is admitted now.
    NotNow { used: u64 },
}

impl Budget {
    pub fn new(capacity: u64) -> Budget {
        Budget { used: Arc::new(AtomicU64::new(0)), capacity }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    pub fn reserve(&self, bytes: u64) -> Result<Reservation, Refusal> {
        self.take(bytes)?;
        Ok(Reservation { used: self.used.clone(), bytes })
    }

    /// Adds `more` bytes to a reservation made here.
    pub fn grow(&self, r: &mut Reservation, more: u64) -> Result<(), Refusal> {
        self.take(more)?;
        r.bytes += more;
        Ok(())
    }

    fn take(&self, bytes: u64) -> Result<(), Refusal> {
        if bytes > self.capacity {
            return Err(Refusal::Never);
        }
        let mut cur = self.used.load(Ordering::Acquire);
        loop {
            if cur.saturating_add(bytes) > self.capacity {
                return Err(Refusal::NotNow { used: cur });
            }
            match self.used.compare_exchange_weak(cur, cur + bytes, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(()),
                Err(v) => cur = v,
            }
        }
    }
}

/// Hands freed heap memory back to the OS. glibc keeps freed blocks below its mmap threshold (which
/// rises up to 32 MiB as large blocks are freed) in its arenas, so after a large batch the resident
/// size would stay at its peak; `malloc_trim` releases them.
pub fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own arenas under their locks; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The resident set size of this process in bytes (Linux), for logs and tests.
pub fn resident_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb =
        s.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse::<u64>().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_and_jpeg_headers_give_size_and_layout() {
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        png.extend_from_slice(&13u32.to_be_bytes());
        png.extend_from_slice(b"IHDR");
        png.extend_from_slice(&4096u32.to_be_bytes());
        png.extend_from_slice(&2048u32.to_be_bytes());
        png.extend_from_slice(&[16, 6, 0, 0, 0]);
        assert_eq!(probe(&png), Ok(Probe { width: 4096, height: 2048, decoder_bpp: 8 }));
        // SOI, an APP0 segment, fill bytes, then SOF2 (progressive) 8-bit 640x480 with 3 components.
        let mut jpeg = vec![0xFF, 0xD8, 0xFF, 0xE0, 0, 4, 1, 2, 0xFF, 0xFF];
        jpeg.extend_from_slice(&[0xC2, 0, 17, 8, 0x01, 0xE0, 0x02, 0x80, 3]);
        assert_eq!(probe(&jpeg), Ok(Probe { width: 640, height: 480, decoder_bpp: 3 }));
        // DHT (0xC4) is not a frame header; a scan before any frame header is an error.
        let bad = [0xFF, 0xD8, 0xFF, 0xC4, 0, 2, 0xFF, 0xDA, 0, 2];
        assert!(probe(&bad).unwrap_err().contains("SOF"));
        assert!(probe(&png[..20]).is_err());
        assert!(probe(b"GIF89a").is_err());
    }

    #[test]
    fn forward_estimate_lies_between_the_largest_tensor_and_all_tensors() {
        for (net, seed) in [(crate::network::Network::MobileNetV1_025, 1), (crate::network::Network::ResNet50, 2)] {
            let g = crate::model::build(net, &mut crate::weights::synthetic::SyntheticSource { seed }).expect("graph");
            let m = ForwardModel::new(&g);
            for (h, w) in [(360, 540), (1280, 1280), (3000, 4000)] {
                let (est, all) = (m.bytes(h, w), m.all_tensors_bytes(h, w));
                let biggest = g.tensors.iter().map(|t| 4 * (t.channels * t.height(h) * t.width(w)) as u64).max();
                eprintln!("{net} {w}x{h}: estimate {} MiB, all tensors {} MiB", est >> 20, all >> 20);
                assert!(biggest.is_some_and(|b| est > 2 * b), "{net} {w}x{h}");
                assert!(est < all + all / 2, "{net} {w}x{h}");
            }
        }
    }

    #[test]
    fn budget_refuses_what_never_fits_and_what_does_not_fit_now() {
        let b = Budget::new(100);
        assert!(matches!(b.reserve(101), Err(Refusal::Never)));
        let r = b.reserve(60).ok().expect("fits");
        assert!(matches!(b.reserve(50), Err(Refusal::NotNow { used: 60 })));
        drop(r);
        assert_eq!(b.used(), 0);
        assert!(b.reserve(100).is_ok());
    }
}
