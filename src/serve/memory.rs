//! The server's memory budget (`--max-memory`): every request reserves what its images will cost
//! (decoded pixels and forward-pass buffers), counted from the image headers before a byte is decoded.
//! A request that does not fit now is refused with 503 at once; one that could never fit gets 413.
//!
//! The image headers are read by [`image_io::probe`], the decoder's own header reader. Also here: the
//! memory release after large batches.

use crate::graph::Plan;
use crate::image_io::{self, ImageInfo, ResizeMode};
use crate::model::graph::Graph;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bound on the bytes one image costs from its header to the end of its forward pass, other
/// than the forward pass itself: the decode's peak (decoder buffers and the BGR image), a second
/// decoder buffer when EXIF orientation rotates it, a conversion buffer, and the resized network input.
pub fn decode_bytes(p: &ImageInfo, mode: ResizeMode) -> u64 {
    let px = u64::from(p.width) * u64::from(p.height);
    let (nw, nh) = network_input(p, mode);
    // Saturating: a header may claim sides whose products overflow; the limits refuse those anyway.
    p.decode_bytes
        .saturating_add(px.saturating_mul(p.decoder_bytes_per_pixel + 3))
        .saturating_add((nw as u64).saturating_mul(nh as u64 * 3))
}

/// The network input size of an image (after `--resize`). Orientation may swap the sides; every
/// estimate here is symmetric in them.
pub fn network_input(p: &ImageInfo, mode: ResizeMode) -> (usize, usize) {
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
