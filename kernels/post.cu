// post.cu — post-processing on the device, for any number of candidates, so a whole frame (image
// bytes → detections) is a fixed sequence of launches that can be graph-captured: score threshold and
// order-preserving compaction, an LSD radix sort of the candidates by score, anchor generation fused
// with box/landmark decoding, NMS (bitmask for small k, tiled for any k), and the packing of the kept
// detections of all images into one array, so that only they are downloaded. Per image of a batch
// throughout (blockIdx.y, or blockIdx.x for the one-block-per-image kernels); per-image arrays have a
// stride of A (the plan's anchor count), so every buffer is sized once from the plan (n, A).
//
// Reference semantics (src/post): candidates are anchors with face score > threshold, ordered by score
// descending, ties by anchor index ascending (the CPU's stable sort), cut to pre_nms_topk (k); boxes
// decoded in f32 in the reference's order of operations (the *_rn intrinsics forbid FMA contraction so
// the rounding matches the CPU's), divided by the image's resize factor (a device array, one per image);
// NMS with the +1 pixel convention, suppress when IoU > threshold; detections cut to post_nms_topk.
//
// Radix passes (radix_hist, radix_scan, radix_scatter), RadixParams.shift < 0 first (compaction:
// digit = "is a candidate", only candidates kept), then shift 0, 8, 16, 24 on key = ~bits(score)
// (positive floats order like their bits; ~ makes the ascending sort descending). Every pass is stable,
// and the compaction keeps anchor order, so equal scores stay in anchor order, as on the CPU.
// On the detect path the fused heads (kernels/heads.cu heads_fused) have already thresholded and
// decoded: RadixParams.dense = 1 makes the shift-0 pass read their dense [n][A] keys in anchor order
// (skipping NOT_CANDIDATE; value = anchor index) and count the candidates, so that pass is the
// compaction too: 4 passes, 12 launches, and no pass reads conf.
//   radix_hist: grid (tiles = ceil(A / RADIX_TILE), n), 256 threads, RADIX_TILE = 2048 elements per
//     block; counts the tile's digits (warp-aggregated: one shared atomic per distinct digit per warp)
//     into hist [n][256][tiles] (digit-major, so one exclusive scan gives every tile's scatter bases).
//     Reads 8 B per element (4 B of conf + 4 B skipped in the compaction pass), writes 1 KiB per tile.
//   radix_scan: grid (1, n), 256 threads; exclusive scan of the image's 256·tiles counts in place (a
//     serial chunk per thread + a Hillis–Steele scan of the chunk sums). The compaction pass's total is
//     the candidate count; it writes count[i] and kept[i] = min(count, k). ~42 ints per thread at 1080p.
//   radix_scatter: same grid as radix_hist; the tile in rounds of 256 elements: each lane finds the
//     lanes of its warp with the same digit (8 ballots), ranks itself among them, and adds the counts
//     of earlier warps and rounds; writes key and value at base + rank. 8 B read + 8 B written per
//     element; 9 KiB shared. Blocks and rounds past the image's count leave (block-uniform).
//   Work: 5 × (2 reads + 1 write) of 8 B per candidate; 15 launches; O(A) for every count.
// decode_sorted: one thread per kept candidate: its prior (f64, as the reference's Python, rounded to
//   f32) and its decoded box, score and landmarks. Grid (ceil(k/128), n), 128 threads. ~60 FLOPs.
//   Writes boxes [n][A][4], scores [n][A], lands [n][A][10]: three regions of one buffer.
// NMS, bitmask path (k ≤ NMS_BITMASK_MAX):
//   nms_mask: 64×64 tiles, block 64 threads: row i against 64 column boxes held in shared memory;
//     bit j set when j > i and IoU > threshold. Grid (words, words, n). k²/2 IoUs of ~12 FLOPs.
//   nms_reduce: one block (128 threads, one 64-bit word each) per image walks the rows in order; a row
//     not yet removed is kept and ORs its mask into the removed set (one barrier per row), then the kept
//     rows are written to dets [n][max_out][15]. Shared: 256 B + 4·max_out B. Mask: 8·k²/64 B/image.
// NMS, tiled path (any k; memory O(k): the kept detections themselves):
//   nms_tiled: one block of 256 threads per image walks the sorted candidates in tiles of 256. Each
//     candidate of a tile is first tested against every detection kept by earlier tiles (read from
//     dets in chunks of 256 through shared memory; a thread stops at its first suppressor), then the
//     tile's survivors are resolved among themselves: each builds its row of a 256×256 bitmask (8 KiB
//     shared) and one thread walks the 256 rows greedily; the kept ones are appended to dets. Work:
//     k × kept IoUs at most (the CPU's greedy loop does k × kept / 2), on one SM per image.
// compact_dets: grid (ceil(max_out/128), n), 128 threads: image i's det_count[i] rows of dets, copied
//   to out at the sum of the counts of images before it (one [Σ count][15] array, downloaded in one copy).
#include "common.cuh"
#include "candidates.cuh"

#define NMS_MAX_WORDS (NMS_BITMASK_MAX / 64)
#define NMS_MAX_OUT NMS_BITMASK_MAX

struct RadixParams {
    const float* conf;        // [n][A][2]: read by the compaction pass only
    const unsigned* keys_in;  // [n][A]: the first count[i] are image i's candidates
    const int* vals_in;       // [n][A]: their anchor indices
    unsigned* keys_out;       // [n][A]
    int* vals_out;            // [n][A]
    int* hist;                // [n][256][tiles]: the tiles' digit counts, then (after the scan) their bases
    int* count;               // [n]: candidates per image, written by the compaction pass's scan
    int* kept;                // [n] = min(count, k), written by the compaction pass's scan
    int n, num_anchors, tiles, shift;  // shift < 0: the compaction pass
    int k;
    float threshold;
    int dense;  // keys_in is the fused heads' dense [n][A] (NOT_CANDIDATE under the threshold), values the anchors
    int pad0;
};

struct DecodeParams {
    const int* order;     // [n][A]: anchor indices, best first; the first kept[i] are used
    const int* kept;      // [n]
    const float* loc;     // [n][A][4]
    const float* conf;    // [n][A][2]
    const float* landm;   // [n][A][10]
    const float* resize;  // [n]: the factor each image was resized by before the network
    float* boxes;         // [n][A][4] x1 y1 x2 y2 in pixels of the original image
    float* scores;        // [n][A]
    float* lands;         // [n][A][10]
    int n, num_anchors, img_h, img_w;
};

struct NmsMaskParams {
    const float* boxes;        // [n][stride][4]
    const int* kept;           // [n]
    unsigned long long* mask;  // [n][k][words]: bit j of row i = IoU(i, j) > threshold and j > i
    int n, k, words, stride;
    float threshold;
    int pad0;
};

struct NmsReduceParams {
    const unsigned long long* mask;  // [n][k][words]
    const int* kept;                 // [n]
    const float* boxes;              // [n][stride][4]
    const float* scores;             // [n][stride]
    const float* lands;              // [n][stride][10]
    float* dets;                     // [n][max_out][15]: box, score, landmarks
    int* det_count;                  // [n]
    int n, k, words, stride;
    int max_out, pad0;
};

struct NmsTiledParams {
    const int* kept;      // [n]
    const float* boxes;   // [n][stride][4]
    const float* scores;  // [n][stride]
    const float* lands;   // [n][stride][10]
    float* dets;          // [n][max_out][15]: box, score, landmarks; also the kept boxes later tiles read
    int* det_count;       // [n]
    int n, stride, max_out;
    float threshold;
};

struct CompactParams {
    const float* dets;     // [n][max_out][15]
    const int* det_count;  // [n]
    float* out;            // [Σ det_count][15]
    int n, max_out;
};

// Slot i of image img in this pass: whether it holds an element, and its key, value and digit.
__device__ __forceinline__ bool radix_elem(const RadixParams& p, int img, int i, int limit, unsigned& key, int& val,
                                           int& digit) {
    if (i >= limit) return false;
    const long long o = (long long)img * p.num_anchors + i;
    if (p.shift < 0) {
        const float s = p.conf[o * 2 + 1];
        if (!(s > p.threshold)) return false;
        key = ~__float_as_uint(s);
        val = i;
        digit = 0;
        return true;
    }
    key = p.keys_in[o];
    if (p.dense && key == NOT_CANDIDATE) return false;
    val = p.dense ? i : p.vals_in[o];
    digit = (int)((key >> p.shift) & 255u);
    return true;
}

// The lanes of this warp holding an element with the same digit (every lane must call it).
__device__ __forceinline__ unsigned radix_peers(const RadixParams& p, bool valid, int digit) {
    unsigned m = __ballot_sync(0xffffffffu, valid);
    if (p.shift >= 0) {  // the compaction pass has one digit
        for (int b = 0; b < 8; ++b) {
            const unsigned set = __ballot_sync(0xffffffffu, (digit >> b) & 1);
            m &= ((digit >> b) & 1) ? set : ~set;
        }
    }
    return m;
}

__device__ __forceinline__ int radix_limit(const RadixParams& p, int img) {
    return p.shift < 0 || p.dense ? p.num_anchors : p.count[img];
}

extern "C" __global__ void __launch_bounds__(256) radix_hist(const RadixParams p) {
    __shared__ int bins[256];
    const int img = blockIdx.y, t = threadIdx.x, lane = t & 31;
    const int limit = radix_limit(p, img);
    const int tile0 = blockIdx.x * RADIX_TILE;
    bins[t] = 0;
    __syncthreads();
    for (int r = 0; r < RADIX_TILE && tile0 + r < limit; r += 256) {  // uniform over the block
        unsigned key = 0;
        int val = 0, digit = 0;
        const bool valid = radix_elem(p, img, tile0 + r + t, limit, key, val, digit);
        const unsigned m = radix_peers(p, valid, digit);
        if (valid && (m & ((1u << lane) - 1u)) == 0) atomicAdd(&bins[digit], (int)__popcll(m));
    }
    __syncthreads();
    p.hist[((long long)img * 256 + t) * p.tiles + blockIdx.x] = bins[t];
}

extern "C" __global__ void __launch_bounds__(256) radix_scan(const RadixParams p) {
    __shared__ int sums[256];
    const int img = blockIdx.y, t = threadIdx.x;
    int* h = p.hist + (long long)img * 256 * p.tiles;
    const int len = 256 * p.tiles;
    const int per = (len + 255) / 256;
    const int b = min(t * per, len), e = min(b + per, len);
    int s = 0;
    for (int i = b; i < e; ++i) s += h[i];
    sums[t] = s;
    __syncthreads();
    for (int off = 1; off < 256; off <<= 1) {
        const int v = t >= off ? sums[t - off] : 0;
        __syncthreads();
        sums[t] += v;
        __syncthreads();
    }
    int run = sums[t] - s;
    for (int i = b; i < e; ++i) {
        const int c = h[i];
        h[i] = run;
        run += c;
    }
    if ((p.shift < 0 || p.dense) && t == 255) {
        p.count[img] = sums[255];
        p.kept[img] = min(sums[255], p.k);
    }
}

extern "C" __global__ void __launch_bounds__(256) radix_scatter(const RadixParams p) {
    __shared__ int base[256];
    __shared__ int wcount[8][256];
    const int img = blockIdx.y, t = threadIdx.x, lane = t & 31, warp = t >> 5;
    const int limit = radix_limit(p, img);
    const int tile0 = blockIdx.x * RADIX_TILE;
    if (tile0 >= limit) return;  // uniform over the block
    base[t] = p.hist[((long long)img * 256 + t) * p.tiles + blockIdx.x];
    for (int w = 0; w < 8; ++w) wcount[w][t] = 0;
    __syncthreads();
    const long long o = (long long)img * p.num_anchors;
    for (int r = 0; r < RADIX_TILE && tile0 + r < limit; r += 256) {  // uniform over the block
        unsigned key = 0;
        int val = 0, digit = 0;
        const bool valid = radix_elem(p, img, tile0 + r + t, limit, key, val, digit);
        const unsigned m = radix_peers(p, valid, digit);
        const unsigned before = m & ((1u << lane) - 1u);
        if (valid && before == 0) wcount[warp][digit] = (int)__popcll(m);
        __syncthreads();
        if (valid) {
            int pos = base[digit] + (int)__popcll(before);
            for (int w = 0; w < warp; ++w) pos += wcount[w][digit];
            p.keys_out[o + pos] = key;
            p.vals_out[o + pos] = val;
        }
        __syncthreads();
        int tot = 0;
        for (int w = 0; w < 8; ++w) {
            tot += wcount[w][t];
            wcount[w][t] = 0;
        }
        base[t] += tot;
        __syncthreads();
    }
}

// The prior of anchor a for an h×w input: levels of stride 8, 16, 32 with min sizes (16, 32),
// (64, 128), (256, 512); rows, then columns, then the two sizes (src/post/anchors.rs).
__device__ __forceinline__ void prior_of(int a, int h, int w, float pr[4]) {
    const int steps[3] = PRIOR_STEPS;
    for (int l = 0; l < 3; ++l) {
        const int s = steps[l];
        const int fh = (h + s - 1) / s, fw = (w + s - 1) / s;
        const int n = 2 * fh * fw;
        if (a < n || l == 2) {
            const int pix = a / 2;
            prior_at(l, pix / fw, pix % fw, a % 2, h, w, pr);
            return;
        }
        a -= n;
    }
}

extern "C" __global__ void __launch_bounds__(128) decode_sorted(const DecodeParams p) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    const int img = blockIdx.y;
    if (r >= p.kept[img]) return;
    const long long o = (long long)img * p.num_anchors + r;
    const int a = p.order[o];
    float pr[4];
    prior_of(a, p.img_h, p.img_w, pr);
    const long long ga = (long long)img * p.num_anchors + a;
    const float* l = p.loc + ga * 4;
    const float W = (float)p.img_w, H = (float)p.img_h;
    const float resize = p.resize[img];
    // cx = prior.x + loc.x · 0.1 · prior.w, … exactly as src/post/decode.rs orders them.
    const float cx = __fadd_rn(pr[0], __fmul_rn(__fmul_rn(l[0], 0.1f), pr[2]));
    const float cy = __fadd_rn(pr[1], __fmul_rn(__fmul_rn(l[1], 0.1f), pr[3]));
    const float bw = __fmul_rn(pr[2], expf(__fmul_rn(l[2], 0.2f)));
    const float bh = __fmul_rn(pr[3], expf(__fmul_rn(l[3], 0.2f)));
    const float x1 = __fsub_rn(cx, __fdiv_rn(bw, 2.0f));
    const float y1 = __fsub_rn(cy, __fdiv_rn(bh, 2.0f));
    const float x2 = __fadd_rn(bw, x1);
    const float y2 = __fadd_rn(bh, y1);
    p.boxes[o * 4 + 0] = __fdiv_rn(__fmul_rn(x1, W), resize);
    p.boxes[o * 4 + 1] = __fdiv_rn(__fmul_rn(y1, H), resize);
    p.boxes[o * 4 + 2] = __fdiv_rn(__fmul_rn(x2, W), resize);
    p.boxes[o * 4 + 3] = __fdiv_rn(__fmul_rn(y2, H), resize);
    p.scores[o] = p.conf[ga * 2 + 1];
    const float* lm = p.landm + ga * 10;
    for (int q = 0; q < 5; ++q) {
        const float x = __fadd_rn(pr[0], __fmul_rn(__fmul_rn(lm[2 * q], 0.1f), pr[2]));
        const float y = __fadd_rn(pr[1], __fmul_rn(__fmul_rn(lm[2 * q + 1], 0.1f), pr[3]));
        p.lands[o * 10 + 2 * q] = __fdiv_rn(__fmul_rn(x, W), resize);
        p.lands[o * 10 + 2 * q + 1] = __fdiv_rn(__fmul_rn(y, H), resize);
    }
}

// IoU(a, b) > threshold with the reference's +1 convention and its order of operations (a is the
// higher-scored, kept box: src/post/nms.rs computes area_a + area_b − inter in that order).
__device__ __forceinline__ bool iou_above(float a0, float a1, float a2, float a3, float b0, float b1, float b2,
                                          float b3, float threshold) {
    const float area_a = __fmul_rn(__fadd_rn(__fsub_rn(a2, a0), 1.0f), __fadd_rn(__fsub_rn(a3, a1), 1.0f));
    const float area_b = __fmul_rn(__fadd_rn(__fsub_rn(b2, b0), 1.0f), __fadd_rn(__fsub_rn(b3, b1), 1.0f));
    const float iw = fmaxf(__fadd_rn(__fsub_rn(fminf(a2, b2), fmaxf(a0, b0)), 1.0f), 0.0f);
    const float ih = fmaxf(__fadd_rn(__fsub_rn(fminf(a3, b3), fmaxf(a1, b1)), 1.0f), 0.0f);
    const float inter = __fmul_rn(iw, ih);
    return __fdiv_rn(inter, __fsub_rn(__fadd_rn(area_a, area_b), inter)) > threshold;
}

extern "C" __global__ void __launch_bounds__(64) nms_mask(const NmsMaskParams p) {
    __shared__ float cb[64][4];
    const int img = blockIdx.z;
    const int kept = p.kept[img];
    const int row0 = blockIdx.y * 64, col0 = blockIdx.x * 64;
    if (row0 >= kept || col0 >= kept || col0 + 63 < row0) return;  // uniform: nothing to compare or j < i everywhere
    const float* boxes = p.boxes + (long long)img * p.stride * 4;
    const int t = threadIdx.x;
    if (col0 + t < kept)
        for (int q = 0; q < 4; ++q) cb[t][q] = boxes[(long long)(col0 + t) * 4 + q];
    __syncthreads();
    const int i = row0 + t;
    if (i >= kept) return;
    const float a0 = boxes[(long long)i * 4 + 0], a1 = boxes[(long long)i * 4 + 1];
    const float a2 = boxes[(long long)i * 4 + 2], a3 = boxes[(long long)i * 4 + 3];
    unsigned long long bits = 0;
    const int ncol = min(64, kept - col0);
    for (int c = 0; c < ncol; ++c) {
        const int j = col0 + c;
        if (j <= i) continue;
        if (iou_above(a0, a1, a2, a3, cb[c][0], cb[c][1], cb[c][2], cb[c][3], p.threshold)) bits |= 1ull << c;
    }
    p.mask[((long long)img * p.k + i) * p.words + blockIdx.x] = bits;
}

// One detection (box, score, landmarks) of candidate row `src` of an image into dets row `dst`.
__device__ __forceinline__ void write_det(const float* boxes, const float* scores, const float* lands, long long src,
                                          float* d) {
    for (int q = 0; q < 4; ++q) d[q] = boxes[src * 4 + q];
    d[4] = scores[src];
    for (int q = 0; q < 10; ++q) d[5 + q] = lands[src * 10 + q];
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
    const long long src0 = (long long)img * p.stride;
    for (int r = t; r < nk; r += blockDim.x)
        write_det(p.boxes, p.scores, p.lands, src0 + keep[r], p.dets + ((long long)img * p.max_out + r) * 15);
}

extern "C" __global__ void __launch_bounds__(NMS_TILE) nms_tiled(const NmsTiledParams p) {
    __shared__ float kb[NMS_TILE][4];                             // a chunk of kept boxes
    __shared__ float tb[NMS_TILE][4];                             // the tile's boxes
    __shared__ unsigned long long rows[NMS_TILE][NMS_TILE / 64];  // row i: later survivors i suppresses
    __shared__ int alive[NMS_TILE];
    __shared__ int pick[NMS_TILE];
    __shared__ int nkeep, npick;
    const int img = blockIdx.x, t = threadIdx.x;
    const int kept = p.kept[img];
    const long long src0 = (long long)img * p.stride;
    const float* boxes = p.boxes + src0 * 4;
    float* dets = p.dets + (long long)img * p.max_out * 15;
    if (t == 0) nkeep = 0;
    __syncthreads();
    for (int t0 = 0; t0 < kept; t0 += NMS_TILE) {
        const int nk0 = nkeep;  // read after a barrier: uniform
        if (nk0 >= p.max_out) break;
        const int i = t0 + t;
        bool live = i < kept;
        float b[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (live)
            for (int q = 0; q < 4; ++q) b[q] = boxes[(long long)i * 4 + q];
        // 1. Against every detection kept by earlier tiles (in keep order; any suppressor suffices).
        for (int c0 = 0; c0 < nk0; c0 += NMS_TILE) {
            if (c0 + t < nk0)
                for (int q = 0; q < 4; ++q) kb[t][q] = dets[(long long)(c0 + t) * 15 + q];
            __syncthreads();
            const int lim = min(NMS_TILE, nk0 - c0);
            for (int c = 0; live && c < lim; ++c)
                live = !iou_above(kb[c][0], kb[c][1], kb[c][2], kb[c][3], b[0], b[1], b[2], b[3], p.threshold);
            __syncthreads();
        }
        for (int q = 0; q < 4; ++q) tb[t][q] = b[q];
        alive[t] = live;
        __syncthreads();
        // 2. The tile's survivors among themselves: row t holds the later survivors t would suppress.
        for (int w = 0; w < NMS_TILE / 64; ++w) {
            unsigned long long bits = 0;
            for (int c = 0; live && c < 64; ++c) {
                const int j = w * 64 + c;
                if (j > t && alive[j] && iou_above(b[0], b[1], b[2], b[3], tb[j][0], tb[j][1], tb[j][2], tb[j][3], p.threshold))
                    bits |= 1ull << c;
            }
            rows[t][w] = bits;
        }
        __syncthreads();
        // 3. The greedy walk over the tile, in score order: 256 rows of 4 words, one thread.
        if (t == 0) {
            unsigned long long removed[NMS_TILE / 64] = {0ull, 0ull, 0ull, 0ull};
            const int room = p.max_out - nk0;
            int np = 0;
            for (int j = 0; j < NMS_TILE && np < room; ++j) {
                if (!alive[j] || ((removed[j >> 6] >> (j & 63)) & 1ull)) continue;
                pick[np++] = j;
                for (int w = 0; w < NMS_TILE / 64; ++w) removed[w] |= rows[j][w];
            }
            npick = np;
        }
        __syncthreads();
        const int np = npick;
        if (t < np) write_det(p.boxes, p.scores, p.lands, src0 + t0 + pick[t], dets + (long long)(nk0 + t) * 15);
        __syncthreads();  // the new detections are visible to the block before the next tile reads them
        if (t == 0) nkeep = nk0 + np;
        __syncthreads();
    }
    if (t == 0) p.det_count[img] = nkeep;
}

extern "C" __global__ void __launch_bounds__(128) compact_dets(const CompactParams p) {
    const int img = blockIdx.y;
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= p.det_count[img]) return;
    long long base = 0;
    for (int j = 0; j < img; ++j) base += p.det_count[j];
    const float* s = p.dets + ((long long)img * p.max_out + r) * 15;
    float* d = p.out + (base + r) * 15;
    for (int q = 0; q < 15; ++q) d[q] = s[q];
}
