//! The simulation's tensor-core and async-copy instructions (kernels/mma.cuh, kernels/sim/*), checked
//! against the PTX ISA's definitions through the probe kernels of kernels/mma_probe.cu:
//! - mma.sync m16n8k16: fragments placed by the ISA's formulas, written here independently of the
//!   emulation; every (lane, register element) of A, B and C moved alone (one-hot) and a random product
//!   against an f64 matrix product (error bound: f32 accumulation of 16 exact f16 products, 1e-6).
//! - ldmatrix .x1/.x2/.x4 with and without .trans: every lane's registers.
//! - cp.async: destinations poisoned until their group is waited for, zero-fill, alignment trap.
//! - wgmma.mma_async (kernels/wgmma.cuh) m64n64k16 / m64n128k16 from shared-memory descriptors in every
//!   K-major layout (interleaved, 128/64/32-byte swizzles), accumulator fragment placed by the ISA's
//!   formula written here, scale-d 0 and 1, two wgmmas chained in one group; an operand rewritten in
//!   flight traps, registers read before wgmma.wait_group are NaN, a partial warpgroup is an error.
//! - the random thread order between barriers exposes a missing __syncthreads.
//! - the counters: bank conflicts and sectors per request on known access patterns.
#![cfg(feature = "cuda-sim")]

mod rng;
use bytemuck::{Pod, Zeroable};
use retinaface::cuda::conv_f16::{last_sim_counters, set_sim_order_seed};
use retinaface::cuda::params::KernelParams;
use retinaface::cuda::sim::SimRunner;
use retinaface::cuda::{DevBuf, KernelRunner, KernelRunnerExt, LaunchDims};
use rng::Rng;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ProbeParams {
    a: u64,
    b: u64,
    c: u64,
    d: u64,
    src: u64,
    out: u64,
    mode: i32,
    threads: i32,
    misalign: i32,
    token: i32,
}
// SAFETY: repr(C), 6 u64 then 4 i32: no padding.
unsafe impl Zeroable for ProbeParams {}
unsafe impl Pod for ProbeParams {}
impl KernelParams for ProbeParams {}

fn h(v: f32) -> u16 {
    half::f16::from_f32(v).to_bits()
}
fn hf(b: u16) -> f32 {
    half::f16::from_bits(b).to_f32()
}

// The PTX ISA's m16n8k16 fragment formulas (g = lane / 4, t = lane % 4).
fn a_pos(lane: usize, i: usize) -> (usize, usize) {
    (lane / 4 + 8 * ((i / 2) % 2), 2 * (lane % 4) + i % 2 + 8 * (i / 4))
}
fn b_pos(lane: usize, i: usize) -> (usize, usize) {
    (2 * (lane % 4) + i % 2 + 8 * (i / 2), lane / 4)
}
fn c_pos(lane: usize, i: usize) -> (usize, usize) {
    (lane / 4 + 8 * (i / 2), 2 * (lane % 4) + i % 2)
}

/// Runs probe_mma on matrices A [16][16], B [16][8] (f16 values as f32), C [16][8]; returns D [16][8].
fn run_mma(r: &mut SimRunner, a: &[f32], b: &[f32], c: &[f32]) -> Vec<f32> {
    let mut af = vec![0u32; 32 * 4];
    let mut bf = vec![0u32; 32 * 2];
    let mut cf = vec![0f32; 32 * 4];
    for lane in 0..32 {
        for i in 0..8 {
            let (m, k) = a_pos(lane, i);
            af[lane * 4 + i / 2] |= (h(a[m * 16 + k]) as u32) << (16 * (i % 2));
        }
        for i in 0..4 {
            let (k, n) = b_pos(lane, i);
            bf[lane * 2 + i / 2] |= (h(b[k * 8 + n]) as u32) << (16 * (i % 2));
        }
        for i in 0..4 {
            let (m, n) = c_pos(lane, i);
            cf[lane * 4 + i] = c[m * 8 + n];
        }
    }
    let ab = r.alloc(af.len() * 4).unwrap();
    r.upload(ab, 0, bytemuck::cast_slice(&af)).unwrap();
    let bb = r.alloc(bf.len() * 4).unwrap();
    r.upload(bb, 0, bytemuck::cast_slice(&bf)).unwrap();
    let cb = r.alloc_f32(&cf).unwrap();
    let db = r.alloc(32 * 4 * 4).unwrap();
    let p = ProbeParams { a: ab.ptr, b: bb.ptr, c: cb.ptr, d: db.ptr, ..Default::default() };
    r.launch("probe_mma", LaunchDims { grid: [1, 1, 1], block: [32, 1, 1] }, &p).unwrap();
    let df = r.download_f32(db, 32 * 4).unwrap();
    for buf in [ab, bb, cb, db] {
        r.free(buf).unwrap();
    }
    let mut d = vec![f32::NAN; 16 * 8];
    for lane in 0..32 {
        for i in 0..4 {
            let (m, n) = c_pos(lane, i);
            d[m * 8 + n] = df[lane * 4 + i];
        }
    }
    d
}

fn matmul(a: &[f32], b: &[f32], c: &[f32]) -> Vec<f64> {
    let mut d = vec![0f64; 128];
    for m in 0..16 {
        for n in 0..8 {
            d[m * 8 + n] =
                c[m * 8 + n] as f64 + (0..16).map(|k| a[m * 16 + k] as f64 * b[k * 8 + n] as f64).sum::<f64>();
        }
    }
    d
}

#[test]
fn mma_matches_matrix_product_for_every_lane_and_fragment_index() {
    let mut r = SimRunner::new();
    let mut rng = Rng(0x5eed_0001);
    let rnd = |rng: &mut Rng, n: usize| (0..n).map(|_| hf(h(rng.sym(1.0)))).collect::<Vec<f32>>();
    // Random product: every element of every fragment at once.
    for _ in 0..4 {
        let (a, b, c) = (rnd(&mut rng, 256), rnd(&mut rng, 128), rnd(&mut rng, 128));
        let got = run_mma(&mut r, &a, &b, &c);
        let want = matmul(&a, &b, &c);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((*g as f64 - w).abs() < 1e-5, "D[{}][{}]: {g} vs {w}", i / 8, i % 8);
        }
    }
    // One element of A at a time: D is that element times one row of B, in exactly the rows it names.
    let b = rnd(&mut rng, 128);
    let zero_c = vec![0.0f32; 128];
    for lane in 0..32 {
        for i in 0..8 {
            let (m, k) = a_pos(lane, i);
            let mut a = vec![0.0f32; 256];
            a[m * 16 + k] = 1.0;
            let got = run_mma(&mut r, &a, &b, &zero_c);
            for mm in 0..16 {
                for n in 0..8 {
                    let want = if mm == m { b[k * 8 + n] } else { 0.0 };
                    assert_eq!(got[mm * 8 + n], want, "A lane {lane} element {i}: D[{mm}][{n}]");
                }
            }
        }
    }
    // One element of B at a time.
    let a = rnd(&mut rng, 256);
    for lane in 0..32 {
        for i in 0..4 {
            let (k, n) = b_pos(lane, i);
            let mut b = vec![0.0f32; 128];
            b[k * 8 + n] = 1.0;
            let got = run_mma(&mut r, &a, &b, &zero_c);
            for m in 0..16 {
                for nn in 0..8 {
                    let want = if nn == n { a[m * 16 + k] } else { 0.0 };
                    assert_eq!(got[m * 8 + nn], want, "B lane {lane} element {i}: D[{m}][{nn}]");
                }
            }
        }
    }
    // One element of C at a time (A = B = 0): D = C, element for element.
    let z = vec![0.0f32; 256];
    for lane in 0..32 {
        for i in 0..4 {
            let (m, n) = c_pos(lane, i);
            let mut c = vec![0.0f32; 128];
            c[m * 8 + n] = 1.5;
            let got = run_mma(&mut r, &z, &z[..128], &c);
            assert_eq!(got, c, "C lane {lane} element {i}");
        }
    }
}

#[test]
fn mma_needs_the_whole_warp() {
    let mut r = SimRunner::new();
    let buf = r.alloc(1024).unwrap();
    let p = ProbeParams { a: buf.ptr, b: buf.ptr, c: buf.ptr, d: buf.ptr, ..Default::default() };
    let e = r.launch("probe_mma", LaunchDims { grid: [1, 1, 1], block: [16, 1, 1] }, &p).unwrap_err();
    assert!(e.to_string().contains("needs all 32 lanes"), "{e}");
}

#[test]
fn ldmatrix_delivers_the_isa_layout() {
    let mut r = SimRunner::new();
    // Element (matrix j, row, col) = j·64 + row·8 + col + 1: all distinct, none zero.
    let src: Vec<u16> = (0..256u16).map(|v| v + 1).collect();
    let sb = r.alloc(512).unwrap();
    r.upload(sb, 0, bytemuck::cast_slice(&src)).unwrap();
    let ob = r.alloc(32 * 4 * 4).unwrap();
    for (num, trans) in [(1, false), (2, false), (4, false), (1, true), (2, true), (4, true)] {
        let mode = num + if trans { 8 } else { 0 };
        let p = ProbeParams { src: sb.ptr, out: ob.ptr, mode, ..Default::default() };
        r.launch("probe_ldmatrix", LaunchDims { grid: [1, 1, 1], block: [32, 1, 1] }, &p).unwrap();
        let c = last_sim_counters();
        assert_eq!(c.bank_conflicts(), 0, "ldmatrix x{num}: the permuted rows are conflict-free");
        assert_eq!(c.shared_ideal, num as u64, "one 128-byte phase per matrix");
        let out: Vec<u32> = bytemuck::cast_slice(&download_all(&mut r, ob)).to_vec();
        for lane in 0..32 {
            for j in 0..4 {
                let got = out[lane * 4 + j];
                if j >= num as usize {
                    assert_eq!(got, 0, "x{num}: register {j} must stay untouched");
                    continue;
                }
                let el = |row: usize, col: usize| (j * 64 + row * 8 + col + 1) as u32;
                let (lo, hi) = if trans {
                    (el(2 * (lane % 4), lane / 4), el(2 * (lane % 4) + 1, lane / 4))
                } else {
                    (el(lane / 4, 2 * (lane % 4)), el(lane / 4, 2 * (lane % 4) + 1))
                };
                assert_eq!(got, lo | (hi << 16), "x{num} trans {trans}: lane {lane} register {j}");
            }
        }
    }
}

fn download_all(r: &mut SimRunner, b: DevBuf) -> Vec<u8> {
    let mut v = vec![0u8; b.bytes];
    r.download(b, 0, &mut v).unwrap();
    v
}

#[test]
fn cp_async_lands_only_at_wait_group_and_zero_fills() {
    let mut r = SimRunner::new();
    let threads = 64usize;
    let src: Vec<u16> = (0..(16 * threads) as u16).map(|v| v.wrapping_mul(7) ^ 0x1234).collect();
    let sb = r.alloc(src.len() * 2).unwrap();
    r.upload(sb, 0, bytemuck::cast_slice(&src)).unwrap();
    let ob = r.alloc(threads * 12 * 4).unwrap();
    for src_bytes in [16, 8, 4, 0] {
        let p =
            ProbeParams { src: sb.ptr, out: ob.ptr, mode: src_bytes, threads: threads as i32, ..Default::default() };
        r.launch("probe_cp_async", LaunchDims { grid: [1, 1, 1], block: [threads as u32, 1, 1] }, &p).unwrap();
        let c = last_sim_counters();
        let out: Vec<u32> = bytemuck::cast_slice(&download_all(&mut r, ob)).to_vec();
        let words = |i: usize| -> Vec<u32> {
            (0..4).map(|q| src[8 * i + 2 * q] as u32 | ((src[8 * i + 2 * q + 1] as u32) << 16)).collect()
        };
        for t in 0..threads {
            let o = &out[t * 12..t * 12 + 12];
            assert_eq!(o[0], 0xffff_ffff, "thread {t}: a destination read before its wait is poisoned");
            let mut want = words(t);
            for (q, w) in want.iter_mut().enumerate() {
                if 4 * q >= src_bytes as usize {
                    *w = 0;
                }
            }
            assert_eq!(&o[1..5], &want[..], "thread {t}: group 0 after wait_group 1 (src bytes {src_bytes})");
            assert_eq!(o[5], 0xffff_ffff, "thread {t}: group 1 is still in flight after wait_group 1");
            assert_eq!(&o[6..10], &words(threads + t)[..], "thread {t}: group 1 after wait_group 0");
        }
        // Two warps × two copy instructions; 16-byte lanes of consecutive addresses: conflict-free, and
        // the second copy reads 512 contiguous bytes per warp (16 sectors); the first src_bytes of each 16.
        assert_eq!(c.bank_conflicts(), 0);
        if src_bytes == 0 {
            assert_eq!((c.global_requests, c.global_sectors), (2, 32), "zero-filled lanes read nothing");
        } else {
            assert_eq!(c.global_requests, 4);
            assert_eq!(c.global_sectors, 64);
            assert_eq!(c.global_bytes, (2 * 32 * src_bytes + 2 * 512) as u64);
        }
    }
    // A misaligned shared destination is an error, not a silent copy.
    let p =
        ProbeParams { src: sb.ptr, out: ob.ptr, mode: 16, threads: threads as i32, misalign: 8, ..Default::default() };
    let e = r.launch("probe_cp_async", LaunchDims { grid: [1, 1, 1], block: [threads as u32, 1, 1] }, &p).unwrap_err();
    assert!(e.to_string().contains("not aligned"), "{e}");
}

#[test]
fn random_thread_order_exposes_a_missing_barrier() {
    let mut r = SimRunner::new();
    let threads = 256usize;
    let ob = r.alloc(threads * 4).unwrap();
    let run = |r: &mut SimRunner, seed: u64, barrier: bool, token: i32| -> usize {
        set_sim_order_seed(seed);
        let p = ProbeParams { out: ob.ptr, mode: barrier as i32, threads: threads as i32, token, ..Default::default() };
        r.launch("probe_barrier", LaunchDims { grid: [1, 1, 1], block: [threads as u32, 1, 1] }, &p).unwrap();
        let out = r.download_i32(ob, threads).unwrap();
        (0..threads).filter(|&i| out[i] != token + i.saturating_sub(1) as i32).count()
    };
    // In index order every thread's left neighbour has already run: the bug hides.
    assert_eq!(run(&mut r, 0, false, 1000), 0);
    // In a random order about half the reads see a stale value.
    let wrong = run(&mut r, 0x1234_5678, false, 2000);
    assert!(wrong > threads / 8, "only {wrong} of {threads} reads were stale");
    // With the barrier every order is right.
    for seed in [1u64, 2, 3, 0xdead_beef] {
        assert_eq!(run(&mut r, seed, true, 3000 + seed as i32), 0, "seed {seed}");
    }
}

/// The m64nNk16 accumulator fragment (PTX ISA, wgmma "Register Fragments"): register 4j + i of thread
/// t of the warpgroup is (row 16·(t/32) + (t%32)/4 + 8·(i/2), column 8j + 2·(t%4) + i%2).
fn wg_pos(t: usize, reg: usize) -> (usize, usize) {
    let (w, l, j, i) = (t / 32, t % 32, reg / 4, reg % 4);
    (16 * w + l / 4 + 8 * (i / 2), 8 * j + 2 * (l % 4) + i % 2)
}

/// Runs probe_wgmma: A [64][16], B [n][16] (K-major, f16 values as f32), C [64][n]; returns D [64][n]
/// (or the launch's error) and `out`.
fn run_wgmma(
    r: &mut SimRunner,
    (a, b, c): (&[f32], &[f32], &[f32]),
    n: usize,
    layout: i32,
    scale_d: bool,
    mode: i32,
) -> Result<(Vec<f32>, Vec<u32>), String> {
    let src: Vec<u16> = a.iter().chain(b).map(|&v| h(v)).collect();
    let mut cf = vec![0f32; 128 * n / 2];
    for t in 0..128 {
        for reg in 0..n / 2 {
            let (m, col) = wg_pos(t, reg);
            cf[t * n / 2 + reg] = c[m * n + col];
        }
    }
    let sb = r.alloc(src.len() * 2).unwrap();
    r.upload(sb, 0, bytemuck::cast_slice(&src)).unwrap();
    let cb = r.alloc_f32(&cf).unwrap();
    let db = r.alloc(cf.len() * 4).unwrap();
    let ob = r.alloc(128 * 4).unwrap();
    let p = ProbeParams {
        c: cb.ptr,
        d: db.ptr,
        src: sb.ptr,
        out: ob.ptr,
        mode: layout,
        threads: n as i32,
        misalign: mode,
        token: scale_d as i32,
        ..Default::default()
    };
    let res = r.launch("probe_wgmma", LaunchDims { grid: [1, 1, 1], block: [128, 1, 1] }, &p);
    let out = res.as_ref().ok().map(|_| {
        let df = r.download_f32(db, cf.len()).unwrap();
        let o: Vec<u32> = bytemuck::cast_slice(&download_all(r, ob)).to_vec();
        let mut d = vec![f32::NAN; 64 * n];
        for t in 0..128 {
            for reg in 0..n / 2 {
                let (m, col) = wg_pos(t, reg);
                d[m * n + col] = df[t * n / 2 + reg];
            }
        }
        (d, o)
    });
    for buf in [sb, cb, db, ob] {
        r.free(buf).unwrap();
    }
    match (res, out) {
        (Ok(()), Some(v)) => Ok(v),
        (Err(e), _) => Err(e.to_string()),
        (Ok(()), None) => unreachable!(),
    }
}

#[test]
fn wgmma_matches_matrix_product_in_every_layout() {
    let mut r = SimRunner::new();
    let mut rng = Rng(0x9_6a3a);
    for n in [64usize, 128] {
        let a = rng.vec16(64 * 16, 1.0);
        let b = rng.vec16(n * 16, 1.0);
        let c = rng.vec(64 * n, 4.0);
        for layout in 0..4 {
            for (scale_d, times) in [(true, 1), (false, 1), (true, 2)] {
                let (d, _) = run_wgmma(&mut r, (&a, &b, &c), n, layout, scale_d, (times == 2) as i32).unwrap();
                for m in 0..64 {
                    for col in 0..n {
                        let ab: f64 = (0..16).map(|k| a[m * 16 + k] as f64 * b[col * 16 + k] as f64).sum();
                        let want = if scale_d { c[m * n + col] as f64 } else { 0.0 } + times as f64 * ab;
                        let got = d[m * n + col] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "n {n} layout {layout} scale-d {scale_d} x{times}: D[{m}][{col}] = {got}, want {want}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn wgmma_in_flight_hazards_show() {
    let mut r = SimRunner::new();
    let a = vec![0.5f32; 64 * 16];
    let b = vec![0.25f32; 64 * 16];
    let c = vec![1.0f32; 64 * 64];
    // Shared memory under an operand rewritten before the wait: the retiring wait traps.
    let e = run_wgmma(&mut r, (&a, &b, &c), 64, 2, true, 2).unwrap_err();
    assert!(e.contains("changed before wgmma.wait_group"), "{e}");
    // Accumulator registers read before the wait are poisoned; after it they hold the result.
    let (d, out) = run_wgmma(&mut r, (&a, &b, &c), 64, 2, true, 3).unwrap();
    assert!(out.iter().all(|&w| f32::from_bits(w).is_nan()), "registers read in flight: {:?}", &out[..4]);
    assert!(d.iter().all(|&v| v == 1.0 + 16.0 * 0.125), "{:?}", &d[..4]);
    // A warpgroup instruction needs all 128 threads.
    let buf = r.alloc(1 << 16).unwrap();
    let p =
        ProbeParams { c: buf.ptr, d: buf.ptr, src: buf.ptr, out: buf.ptr, mode: 2, threads: 64, ..Default::default() };
    let e = r.launch("probe_wgmma", LaunchDims { grid: [1, 1, 1], block: [96, 1, 1] }, &p).unwrap_err();
    assert!(e.to_string().contains("warpgroup"), "{e}");
}
