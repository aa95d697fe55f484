// post.cu — post-processing on the device, so a whole frame (image bytes → detections) is a fixed
// sequence of launches that can be graph-captured: score threshold + candidate compaction, top-k
// ordering, anchor generation fused with box/landmark decoding, NMS as a bitmask, and the greedy
// reduction + compaction of the kept detections. Per image of a batch throughout (blockIdx.y / z).
//
// Reference semantics (src/post): candidates are anchors with face score > threshold, ordered by score
// descending, ties by anchor index ascending (the CPU's stable sort), cut to pre_nms_topk; boxes decoded
// in f32 in the reference's order of operations (the *_rn intrinsics forbid FMA contraction so the
// rounding matches the CPU's); NMS with the +1 pixel convention, suppress when IoU > threshold;
// detections cut to post_nms_topk.
//
// select_candidates: 1-D over n·A (grid.y = image), 256 threads; candidate key = score bits << 32 |
//   (2³² − 1 − anchor) (positive floats order like their bits), compacted with one atomicAdd per
//   candidate (order is irrelevant: the keys are unique and sorted next). 8 B read, ≤ 12 B written.
// topk_rank: the rank of each candidate is the number of larger keys, counted over 256-key tiles in
//   shared memory; rank < k scatters to order[rank]. Grid (ceil(A/256), n), 256 threads; blocks past
//   the candidate count leave before any barrier (block-uniform). O(count²) comparisons: ~10⁹ for
//   40k candidates (≈ 1 ms on Hopper); a radix sort is the upgrade if that ever matters.
// decode_sorted: one thread per kept candidate: its prior (f64, as the reference's Python, rounded to
//   f32) and its decoded box, score and landmarks. Grid (ceil(k/128), n), 128 threads. ~60 FLOPs.
// nms_mask: 64×64 tiles, block 64 threads: row i against 64 column boxes held in shared memory;
//   bit j set when j > i and IoU > threshold. Grid (words, words, n). k²/2 IoUs of ~12 FLOPs.
// nms_reduce: one block (128 threads, one 64-bit word each: k ≤ 8192) per image walks the rows in
//   order; a row not yet removed is kept and ORs its mask into the removed set (one barrier per row),
//   then the kept rows are compacted into dets [max_out][15]. Shared: 1 KiB + 4·max_out B.
#include "common.cuh"

#define NMS_MAX_WORDS (NMS_MAX_CANDIDATES / 64)
#define NMS_MAX_OUT NMS_MAX_CANDIDATES

extern "C" __global__ void __launch_bounds__(256) select_candidates(const SelectParams p) {
    const int a = blockIdx.x * blockDim.x + threadIdx.x;
    const int img = blockIdx.y;
    if (a >= p.num_anchors) return;
    const float s = p.conf[((long long)img * p.num_anchors + a) * 2 + 1];
    if (s > p.threshold) {
        const int slot = atomicAdd(&p.count[img], 1);
        const unsigned long long key = ((unsigned long long)__float_as_uint(s) << 32) | (unsigned long long)(0xffffffffu - (unsigned)a);
        p.keys[(long long)img * p.num_anchors + slot] = key;
    }
}

extern "C" __global__ void __launch_bounds__(256) topk_rank(const TopkParams p) {
    __shared__ unsigned long long tile[256];
    const int img = blockIdx.y;
    const int count = p.count[img];
    if (blockIdx.x == 0 && threadIdx.x == 0) p.kept[img] = min(count, p.k);
    if ((int)(blockIdx.x * blockDim.x) >= count) return;  // uniform over the block
    const unsigned long long* keys = p.keys + (long long)img * p.num_anchors;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    const bool valid = idx < count;
    const unsigned long long mine = valid ? keys[idx] : 0ull;
    int rank = 0;
    for (int t0 = 0; t0 < count; t0 += 256) {
        const int j = t0 + threadIdx.x;
        tile[threadIdx.x] = j < count ? keys[j] : 0ull;
        __syncthreads();
        const int lim = min(256, count - t0);
        for (int q = 0; q < lim; ++q) rank += tile[q] > mine;
        __syncthreads();
    }
    if (valid && rank < p.k) p.order[(long long)img * p.k + rank] = (int)(0xffffffffu - (unsigned)(mine & 0xffffffffull));
}

// The prior of anchor a for an h×w input: levels of stride 8, 16, 32 with min sizes (16, 32),
// (64, 128), (256, 512); rows, then columns, then the two sizes (src/post/anchors.rs).
__device__ __forceinline__ void prior_of(int a, int h, int w, float pr[4]) {
    const int steps[3] = PRIOR_STEPS;
    const int sizes[3][2] = PRIOR_MIN_SIZES;
    for (int l = 0; l < 3; ++l) {
        const int s = steps[l];
        const int fh = (h + s - 1) / s, fw = (w + s - 1) / s;
        const int n = 2 * fh * fw;
        if (a < n || l == 2) {
            const int pix = a / 2, j = a % 2;
            const int row = pix / fw, col = pix % fw;
            const double ms = (double)sizes[l][j];
            pr[0] = (float)__ddiv_rn(__dmul_rn(__dadd_rn((double)col, 0.5), (double)s), (double)w);
            pr[1] = (float)__ddiv_rn(__dmul_rn(__dadd_rn((double)row, 0.5), (double)s), (double)h);
            pr[2] = (float)__ddiv_rn(ms, (double)w);
            pr[3] = (float)__ddiv_rn(ms, (double)h);
            return;
        }
        a -= n;
    }
}

extern "C" __global__ void __launch_bounds__(128) decode_sorted(const DecodeParams p) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    const int img = blockIdx.y;
    if (r >= p.kept[img]) return;
    const int a = p.order[(long long)img * p.k + r];
    float pr[4];
    prior_of(a, p.img_h, p.img_w, pr);
    const long long ga = (long long)img * p.num_anchors + a;
    const float* l = p.loc + ga * 4;
    const float W = (float)p.img_w, H = (float)p.img_h;
    // cx = prior.x + loc.x · 0.1 · prior.w, … exactly as src/post/decode.rs orders them.
    const float cx = __fadd_rn(pr[0], __fmul_rn(__fmul_rn(l[0], 0.1f), pr[2]));
    const float cy = __fadd_rn(pr[1], __fmul_rn(__fmul_rn(l[1], 0.1f), pr[3]));
    const float bw = __fmul_rn(pr[2], expf(__fmul_rn(l[2], 0.2f)));
    const float bh = __fmul_rn(pr[3], expf(__fmul_rn(l[3], 0.2f)));
    const float x1 = __fsub_rn(cx, __fdiv_rn(bw, 2.0f));
    const float y1 = __fsub_rn(cy, __fdiv_rn(bh, 2.0f));
    const float x2 = __fadd_rn(bw, x1);
    const float y2 = __fadd_rn(bh, y1);
    const long long o = (long long)img * p.k + r;
    p.boxes[o * 4 + 0] = __fdiv_rn(__fmul_rn(x1, W), p.resize);
    p.boxes[o * 4 + 1] = __fdiv_rn(__fmul_rn(y1, H), p.resize);
    p.boxes[o * 4 + 2] = __fdiv_rn(__fmul_rn(x2, W), p.resize);
    p.boxes[o * 4 + 3] = __fdiv_rn(__fmul_rn(y2, H), p.resize);
    p.scores[o] = p.conf[ga * 2 + 1];
    const float* lm = p.landm + ga * 10;
    for (int q = 0; q < 5; ++q) {
        const float x = __fadd_rn(pr[0], __fmul_rn(__fmul_rn(lm[2 * q], 0.1f), pr[2]));
        const float y = __fadd_rn(pr[1], __fmul_rn(__fmul_rn(lm[2 * q + 1], 0.1f), pr[3]));
        p.lands[o * 10 + 2 * q] = __fdiv_rn(__fmul_rn(x, W), p.resize);
        p.lands[o * 10 + 2 * q + 1] = __fdiv_rn(__fmul_rn(y, H), p.resize);
    }
}

extern "C" __global__ void __launch_bounds__(64) nms_mask(const NmsMaskParams p) {
    __shared__ float cb[64][4];
    const int img = blockIdx.z;
    const int kept = p.kept[img];
    const int row0 = blockIdx.y * 64, col0 = blockIdx.x * 64;
    if (row0 >= kept || col0 >= kept || col0 + 63 < row0) return;  // uniform: nothing to compare or j < i everywhere
    const float* boxes = p.boxes + (long long)img * p.k * 4;
    const int t = threadIdx.x;
    if (col0 + t < kept)
        for (int q = 0; q < 4; ++q) cb[t][q] = boxes[(long long)(col0 + t) * 4 + q];
    __syncthreads();
    const int i = row0 + t;
    if (i >= kept) return;
    const float a0 = boxes[(long long)i * 4 + 0], a1 = boxes[(long long)i * 4 + 1];
    const float a2 = boxes[(long long)i * 4 + 2], a3 = boxes[(long long)i * 4 + 3];
    const float area_a = __fmul_rn(__fadd_rn(__fsub_rn(a2, a0), 1.0f), __fadd_rn(__fsub_rn(a3, a1), 1.0f));
    unsigned long long bits = 0;
    const int ncol = min(64, kept - col0);
    for (int c = 0; c < ncol; ++c) {
        const int j = col0 + c;
        if (j <= i) continue;
        const float area_b = __fmul_rn(__fadd_rn(__fsub_rn(cb[c][2], cb[c][0]), 1.0f), __fadd_rn(__fsub_rn(cb[c][3], cb[c][1]), 1.0f));
        const float iw = fmaxf(__fadd_rn(__fsub_rn(fminf(a2, cb[c][2]), fmaxf(a0, cb[c][0])), 1.0f), 0.0f);
        const float ih = fmaxf(__fadd_rn(__fsub_rn(fminf(a3, cb[c][3]), fmaxf(a1, cb[c][1])), 1.0f), 0.0f);
        const float inter = __fmul_rn(iw, ih);
        const float iou = __fdiv_rn(inter, __fsub_rn(__fadd_rn(area_a, area_b), inter));
        if (iou > p.threshold) bits |= 1ull << c;
    }
    p.mask[((long long)img * p.k + i) * p.words + blockIdx.x] = bits;
}

extern "C" __global__ void __launch_bounds__(128) nms_reduce(const NmsReduceParams p) {
    __shared__ unsigned long long removed[NMS_MAX_WORDS];
    __shared__ int keep[NMS_MAX_OUT];
    __shared__ int nkeep;
    const int img = blockIdx.x;
    const int t = threadIdx.x;
    const int kept = p.kept[img];
    const unsigned long long* mask = p.mask + (long long)img * p.k * p.words;
    const int kw = (kept + 63) / 64;  // words past the last candidate are never written by nms_mask
    if (t < NMS_MAX_WORDS) removed[t] = 0ull;
    if (t == 0) nkeep = 0;
    __syncthreads();
    for (int i = 0; i < kept; ++i) {
        // Every thread reads the same bit and the same nkeep, so the branch is block-uniform.
        const bool alive = !((removed[i >> 6] >> (i & 63)) & 1ull);
        const int nk = nkeep;
        if (nk >= p.max_out) break;
        if (alive) {
            // Bits of row i are only set for j > i, so ORing while others test bit i is race-free.
            for (int wd = (i >> 6) + t; wd < kw; wd += blockDim.x) removed[wd] |= mask[(long long)i * p.words + wd];
        }
        __syncthreads();
        if (alive && t == 0) { keep[nk] = i; nkeep = nk + 1; }
        __syncthreads();
    }
    const int nk = nkeep;
    if (t == 0) p.det_count[img] = nk;
    for (int r = t; r < nk; r += blockDim.x) {
        const long long src = (long long)img * p.k + keep[r];
        float* d = p.dets + ((long long)img * p.max_out + r) * 15;
        for (int q = 0; q < 4; ++q) d[q] = p.boxes[src * 4 + q];
        d[4] = p.scores[src];
        for (int q = 0; q < 10; ++q) d[5 + q] = p.lands[src * 10 + q];
    }
}
