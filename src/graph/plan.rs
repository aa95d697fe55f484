//! The execution plan of a graph for one (batch, height, width): every tensor's shape, its live range
//! and its place in one arena. Computed once here and used by every executor, so the CPU and the CUDA
//! paths agree on shapes and liveness by construction. Plans are cached per size in a [`PlanCache`]
//! bounded in bytes; evicting a plan hands its buffers back to the executor that owns them.

use super::ir::{Graph, TensorId};
use crate::error::{Error, Result};
use std::ops::Range;
use std::sync::Arc;

/// Arena offsets are multiples of this many elements (256 bytes, cudaMalloc's alignment), so every
/// tensor starts as aligned as a buffer of its own would, for vector loads on either device.
pub const ALIGN_ELEMS: usize = 64;

/// The default byte bound of an executor's cached plans: the arenas of a few large frames, so a server
/// fed many image sizes keeps its recent ones and frees the rest.
pub const DEFAULT_PLAN_CACHE_BYTES: usize = 1 << 30;

/// (batch, height, width, keep_all) of a plan.
pub type PlanKey = (usize, usize, usize, bool);

/// How an executor stores its tensors: each tensor's channels padded (with zeros) to a multiple of
/// `channel_align`, elements of `elem_bytes`. Part of the plan, so the one planner lays out every
/// executor's arena: the CPU's and the CUDA f32 path's ([`Layout::F32`]) and the f16 tensor-core path's
/// ([`Layout::F16`]: 8 channels are one 16-byte vector, the unit of its loads and stores).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Layout {
    pub channel_align: usize,
    pub elem_bytes: usize,
}

impl Layout {
    pub const F32: Layout = Layout { channel_align: 1, elem_bytes: 4 };
    pub const F16: Layout = Layout { channel_align: 8, elem_bytes: 2 };

    /// `c` channels as stored.
    pub fn channels(&self, c: usize) -> usize {
        c.next_multiple_of(self.channel_align.max(1))
    }
}

/// Where each tensor of one forward pass lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    /// Every tensor kept to the end of the pass (else only the taps are).
    pub keep_all: bool,
    /// Per tensor: (channels, height, width) of each image; channels as the graph has them (storage
    /// pads them per `layout`).
    pub shapes: Vec<(usize, usize, usize)>,
    /// How the tensors are stored (channel padding, element size).
    pub layout: Layout,
    /// Per tensor: the step it is first written (0: the input, before op 0; op i is step i + 1) and
    /// the last step it is read, both inclusive. Kept tensors live to the last step.
    pub live: Vec<(usize, usize)>,
    /// Per tensor: its first element in the arena.
    pub offsets: Vec<usize>,
    /// Per tensor: whether the executor never stores it (a fused op's intermediate it keeps in
    /// registers or shared memory, a head map its heads kernel decodes as it goes): no arena space,
    /// [`Plan::elems`] 0.
    pub absent: Vec<bool>,
    /// Elements of the arena: every tensor fits, no two live at once overlap.
    pub arena_elems: usize,
}

impl Plan {
    /// Shapes, live ranges and arena offsets of `graph` for an n×3×h×w input. Tensors are placed
    /// largest first at the lowest aligned offset clear of every placed tensor whose live range meets
    /// theirs (greedy by size, the usual heuristic for activation arenas).
    pub fn new(graph: &Graph, n: usize, h: usize, w: usize, keep_all: bool) -> Result<Plan> {
        Plan::with_layout(graph, n, h, w, keep_all, Layout::F32)
    }

    /// [`Plan::new`] for tensors stored as `layout` says (offsets and sizes count stored elements).
    pub fn with_layout(graph: &Graph, n: usize, h: usize, w: usize, keep_all: bool, layout: Layout) -> Result<Plan> {
        Plan::without(graph, (n, h, w, keep_all), layout, &[])
    }

    /// [`Plan::with_layout`] for an executor that never stores the tensors `absent`: they get no arena
    /// space, so the arena is laid out from the tensors that exist on it alone.
    pub fn without(graph: &Graph, key: PlanKey, layout: Layout, absent: &[TensorId]) -> Result<Plan> {
        let (n, h, w, keep_all) = key;
        let nt = graph.tensors.len();
        let mut is_absent = vec![false; nt];
        for &t in absent {
            *is_absent.get_mut(t).ok_or_else(|| Error::Graph(format!("absent tensor {t} is not in the graph")))? = true;
        }
        let shapes: Vec<(usize, usize, usize)> =
            graph.tensors.iter().map(|t| (t.channels, t.height(h), t.width(w))).collect();
        let last_step = graph.ops.len();
        let mut live: Vec<Option<(usize, usize)>> = vec![None; nt];
        live[graph.input] = Some((0, 0));
        for (i, op) in graph.ops.iter().enumerate() {
            let step = i + 1;
            for t in op.reads() {
                let r = live[t].as_mut().ok_or_else(|| {
                    Error::Graph(format!("op {i} reads tensor {} before any op writes it", graph.tensors[t].name))
                })?;
                r.1 = step;
            }
            for out in op.writes() {
                match &mut live[out] {
                    Some(r) => r.1 = r.1.max(step),
                    slot @ None => *slot = Some((step, step)),
                }
            }
        }
        let mut ranges = Vec::with_capacity(nt);
        for (t, r) in live.into_iter().enumerate() {
            let (first, last) =
                r.ok_or_else(|| Error::Graph(format!("tensor {} is never written", graph.tensors[t].name)))?;
            let kept = keep_all || graph.is_tap(t);
            ranges.push((first, if kept { last_step } else { last }));
        }
        let elems: Vec<usize> = shapes
            .iter()
            .zip(&is_absent)
            .map(|(&(c, th, tw), &gone)| {
                if gone {
                    return Ok(0);
                }
                n.checked_mul(layout.channels(c))
                    .and_then(|v| v.checked_mul(th))
                    .and_then(|v| v.checked_mul(tw))
                    .ok_or_else(|| Error::InvalidArgument(format!("a {n}x3x{h}x{w} batch overflows tensor sizes")))
            })
            .collect::<Result<_>>()?;

        let mut order: Vec<TensorId> = (0..nt).collect();
        order.sort_by_key(|&t| (std::cmp::Reverse(elems[t]), t));
        let mut offsets = vec![0usize; nt];
        let mut placed: Vec<TensorId> = Vec::with_capacity(nt);
        let mut arena_elems = 0usize;
        for &t in &order {
            let (a0, a1) = ranges[t];
            // Address ranges of placed tensors alive at the same time, by start.
            let mut busy: Vec<(usize, usize)> = placed
                .iter()
                .filter(|&&u| ranges[u].0 <= a1 && a0 <= ranges[u].1)
                .map(|&u| (offsets[u], offsets[u] + elems[u]))
                .collect();
            busy.sort_unstable();
            let mut at = 0usize;
            for (s, e) in busy {
                if at + elems[t] <= s {
                    break;
                }
                at = at.max(e.next_multiple_of(ALIGN_ELEMS));
            }
            offsets[t] = at;
            arena_elems = arena_elems.max(at + elems[t]);
            placed.push(t);
        }
        Ok(Plan { n, h, w, keep_all, shapes, layout, live: ranges, offsets, arena_elems, absent: is_absent })
    }

    /// Elements of tensor `t` for the whole batch, as stored (padded channels included; 0 if absent).
    pub fn elems(&self, t: TensorId) -> usize {
        if self.absent[t] {
            return 0;
        }
        let (_, h, w) = self.shapes[t];
        self.n * self.stored_channels(t) * h * w
    }

    /// Channels of tensor `t` as stored: its channels padded per the layout.
    pub fn stored_channels(&self, t: TensorId) -> usize {
        self.layout.channels(self.shapes[t].0)
    }

    /// The arena elements of tensor `t`.
    pub fn range(&self, t: TensorId) -> Range<usize> {
        self.offsets[t]..self.offsets[t] + self.elems(t)
    }

    /// Bytes of the arena.
    pub fn arena_bytes(&self) -> usize {
        self.layout.elem_bytes * self.arena_elems
    }

    /// Bytes the tensors would take with a buffer each (what the arena saves, for logs and tests).
    pub fn unshared_bytes(&self) -> usize {
        (0..self.shapes.len()).map(|t| self.layout.elem_bytes * self.elems(t)).sum()
    }
}

/// An executor's buffers for one plan, and the bytes they hold.
pub trait PlanBuffers {
    fn bytes(&self) -> usize;
}

struct Entry<B> {
    key: PlanKey,
    plan: Arc<Plan>,
    bufs: B,
    last_used: u64,
}

/// Plans and their buffers by size, least recently used evicted first once the buffers pass `budget`
/// bytes. The newest entry always stays, so one frame larger than the budget still runs.
pub struct PlanCache<B> {
    budget: usize,
    /// The layout of every plan made here (one executor stores its tensors one way).
    layout: Layout,
    /// The tensors this executor never stores (see [`Plan::absent`]).
    absent: Vec<TensorId>,
    clock: u64,
    entries: Vec<Entry<B>>,
}

impl<B: PlanBuffers> PlanCache<B> {
    pub fn new(budget: usize) -> PlanCache<B> {
        PlanCache::with_layout(budget, Layout::F32)
    }

    /// A cache whose plans store tensors as `layout` says.
    pub fn with_layout(budget: usize, layout: Layout) -> PlanCache<B> {
        PlanCache { budget, layout, absent: Vec::new(), clock: 0, entries: Vec::new() }
    }

    /// A cache whose plans give the tensors `absent` no arena space (see [`Plan::without`]).
    pub fn without(budget: usize, layout: Layout, absent: Vec<TensorId>) -> PlanCache<B> {
        PlanCache { absent, ..PlanCache::with_layout(budget, layout) }
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Changes the bound; returns the entries' buffers now over it (least recently used first) for
    /// the executor to free.
    #[must_use = "evicted buffers must be freed by their executor"]
    pub fn set_budget(&mut self, budget: usize) -> Vec<B> {
        self.budget = budget;
        self.evict(0)
    }

    /// Bytes held by every cached plan's buffers.
    pub fn held_bytes(&self) -> usize {
        self.entries.iter().map(|e| e.bufs.bytes()).sum()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The plan of `key` and its buffers: cached, or computed from `graph` with buffers from `alloc`.
    /// `alloc` first receives the buffers of the entries evicted to make room for the new one, so an
    /// executor frees them before it allocates (device memory is then never held twice).
    pub fn get(
        &mut self,
        graph: &Graph,
        key: PlanKey,
        alloc: impl FnOnce(&Plan, Vec<B>) -> Result<B>,
    ) -> Result<(Arc<Plan>, &mut B)> {
        self.clock += 1;
        let i = match self.entries.iter().position(|e| e.key == key) {
            Some(i) => i,
            None => {
                let plan = Arc::new(Plan::without(graph, key, self.layout, &self.absent)?);
                let evicted = self.evict(plan.arena_bytes());
                let bufs = alloc(&plan, evicted)?;
                self.entries.push(Entry { key, plan, bufs, last_used: 0 });
                self.entries.len() - 1
            }
        };
        let e = &mut self.entries[i];
        e.last_used = self.clock;
        Ok((e.plan.clone(), &mut e.bufs))
    }

    /// The buffers of `key`'s entry if it is still cached (a concurrent pass may have evicted it).
    pub fn buffers(&mut self, key: PlanKey) -> Option<&mut B> {
        self.entries.iter_mut().find(|e| e.key == key).map(|e| &mut e.bufs)
    }

    /// The plan and buffers of `key` if cached, without marking it used.
    pub fn peek(&self, key: PlanKey) -> Option<(&Arc<Plan>, &B)> {
        self.entries.iter().find(|e| e.key == key).map(|e| (&e.plan, &e.bufs))
    }

    /// Removes least-recently-used entries until `incoming` more bytes fit in the budget.
    fn evict(&mut self, incoming: usize) -> Vec<B> {
        let mut out = Vec::new();
        while !self.entries.is_empty() && self.held_bytes() + incoming > self.budget {
            let oldest = (0..self.entries.len()).min_by_key(|&i| self.entries[i].last_used).unwrap_or(0);
            out.push(self.entries.swap_remove(oldest).bufs);
        }
        out
    }

    /// Removes every entry; returns their buffers for the executor to free.
    #[must_use = "evicted buffers must be freed by their executor"]
    pub fn clear(&mut self) -> Vec<B> {
        self.entries.drain(..).map(|e| e.bufs).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::Network;
    use crate::weights::synthetic::SyntheticSource;

    /// For every network: tensors alive at the same step never share arena memory, every offset is
    /// aligned, the arena holds every tensor, and an op's output never overlaps its inputs.
    #[test]
    fn live_tensors_never_overlap() {
        for net in Network::ALL {
            let g = crate::model::build(net, &mut SyntheticSource { seed: 1 }).unwrap();
            for (n, h, w, keep_all) in [(1, 203, 301, false), (2, 33, 17, true)] {
                let p = Plan::new(&g, n, h, w, keep_all).unwrap();
                for t in 0..g.tensors.len() {
                    assert_eq!(p.offsets[t] % ALIGN_ELEMS, 0);
                    assert!(p.range(t).end <= p.arena_elems);
                    for u in 0..t {
                        let (a, b) = (p.live[t], p.live[u]);
                        let (rt, ru) = (p.range(t), p.range(u));
                        if a.0 <= b.1 && b.0 <= a.1 {
                            assert!(rt.end <= ru.start || ru.end <= rt.start, "{net}: tensors {t} and {u} overlap");
                        }
                    }
                }
                // Sharing pays: without keep_all the arena is smaller than a buffer per tensor.
                assert!(keep_all || p.arena_bytes() < p.unshared_bytes(), "{net}: no memory shared");
            }
        }
    }

    /// The f16 layout: every tensor's stored channels are a multiple of 8, offsets stay aligned, live
    /// tensors still never overlap, and the arena is the f32 one's size in halves or less (padding aside).
    #[test]
    fn f16_layout_pads_channels_to_8() {
        for net in Network::ALL {
            let g = crate::model::build(net, &mut SyntheticSource { seed: 1 }).unwrap();
            let p = Plan::with_layout(&g, 2, 45, 37, false, Layout::F16).unwrap();
            let f = Plan::new(&g, 2, 45, 37, false).unwrap();
            assert_eq!(p.shapes, f.shapes);
            for t in 0..g.tensors.len() {
                let c = p.stored_channels(t);
                assert!(c.is_multiple_of(8) && c >= p.shapes[t].0 && c < p.shapes[t].0 + 8, "{net}: tensor {t}");
                assert_eq!(p.offsets[t] % ALIGN_ELEMS, 0);
                for u in 0..t {
                    let (a, b) = (p.live[t], p.live[u]);
                    let (rt, ru) = (p.range(t), p.range(u));
                    if a.0 <= b.1 && b.0 <= a.1 {
                        assert!(rt.end <= ru.start || ru.end <= rt.start, "{net}: tensors {t} and {u} overlap");
                    }
                }
            }
            assert_eq!(p.elems(g.input), 2 * 8 * 45 * 37);
            assert!(p.arena_bytes() < f.arena_bytes(), "{net}: {} vs {}", p.arena_bytes(), f.arena_bytes());
        }
    }

    struct Bytes(usize);
    impl PlanBuffers for Bytes {
        fn bytes(&self) -> usize {
            self.0
        }
    }

    /// The least recently used plan goes first; the newest stays even past the budget.
    #[test]
    fn cache_evicts_least_recently_used_within_the_budget() {
        let g = crate::model::build(Network::MobileNetV1_025, &mut SyntheticSource { seed: 1 }).unwrap();
        let arena = |h: usize| Plan::new(&g, 1, h, 64, false).unwrap().arena_bytes();
        let (a1, a2, a3) = (arena(32), arena(40), arena(48));
        assert!(a2 <= a3);
        // Room for sizes 32 and 48 together, not for all three.
        let mut c: PlanCache<Bytes> = PlanCache::new(a1 + a3);
        let mut freed = Vec::new();
        let mut get = |c: &mut PlanCache<Bytes>, h: usize| {
            c.get(&g, (1, h, 64, false), |p, ev| {
                freed.extend(ev.iter().map(|b: &Bytes| b.0));
                Ok(Bytes(p.arena_bytes()))
            })
            .unwrap();
        };
        get(&mut c, 32);
        get(&mut c, 40);
        get(&mut c, 32); // a hit: size 40 is now the least recently used
        assert_eq!(c.len(), 2);
        get(&mut c, 48);
        assert!(c.peek((1, 40, 64, false)).is_none() && c.peek((1, 32, 64, false)).is_some());
        assert_eq!(freed, vec![a2]);
        assert_eq!(c.held_bytes(), a1 + a3);
        // A budget below one plan: everything goes, and the next plan still gets made.
        assert_eq!(c.set_budget(1).len(), 2);
        assert!(c.is_empty());
        c.get(&g, (1, 32, 64, false), |p, _| Ok(Bytes(p.arena_bytes()))).unwrap();
        assert_eq!(c.len(), 1);
    }
}
