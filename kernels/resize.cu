// resize.cu — decoded u8 BGR images (any sizes) to one batch of network inputs on the device, bit-exact
// with the host (src/image_io.rs): OpenCV's INTER_LINEAR in its fixed-point form, its exact-2x area
// path, or a plain copy; each image at the top left of a black canvas (the reference video script's
// letterbox; for the still-image resize modes the canvas is the resized image itself).
//
// Rule (RESIZE_BILINEAR): per destination column and row the host computes OpenCV's two source indices
//   and 11-bit weights (image_io::linear_taps, the same function the CPU resize uses: f64 coordinate,
//   f32 fraction, columns clamped, rows not); here h = s0·a0 + s1·a1 per source row (32-bit sums), then
//   OpenCV's vertical rounding out = (((h0 >> 4)·b0 >> 16) + ((h1 >> 4)·b1 >> 16) + 2) >> 2. All
//   integer: the device's result equals the host's bit for bit. RESIZE_AREA_HALF: the mean of each 2×2
//   block, (Σ + 2) >> 2; a block cut by the edge averages what it has, rounded half to even.
// Layout: src = every image's HWC bytes back to back (src_off[i] bytes in), dst [n][ch][cw][3] (NHWC u8,
//   what preprocess_bgr reads); taps [.][4] = (s0, s1, w0, w1), image i's columns at desc[i][5], rows
//   at desc[i][6].
// Launch: grid (ceil(ch·cw / 256), n), 256 threads, one destination pixel (3 channels) per thread; the
//   padding of a canvas is written too (zeros), so dst needs no memset.
// Cost: per pixel 3 B written; bilinear reads 12 B (mostly from L1/L2: neighbours share them) and
//   16 B of taps, 6 integer multiply-adds per channel. Bandwidth bound, n·ch·cw·3 B out.
#include "common.cuh"

struct ResizeParams {
    const unsigned char* src;  // every image's [h][w][3] bytes, back to back
    const long long* src_off;  // [n]: byte offset of image i in src
    const int* desc;           // [n][8]: src_w, src_h, new_w, new_h, mode, x taps, y taps, 0
    const int* taps;           // [.][4]: s0, s1, w0, w1 (at desc[i][5] + 4·x and desc[i][6] + 4·y)
    unsigned char* dst;        // [n][ch][cw][3]
    int n, cw, ch, pad0;
};

extern "C" __global__ void __launch_bounds__(256) resize_bgr_u8(const ResizeParams p) {
    const int b = blockIdx.y;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= p.n || i >= p.cw * p.ch) return;
    const int x = i % p.cw, y = i / p.cw;
    const int* d = p.desc + 8 * b;
    const int sw = d[0], sh = d[1], nw = d[2], nh = d[3], mode = d[4];
    unsigned char* out = p.dst + ((long long)b * p.ch * p.cw + i) * 3;
    if (x >= nw || y >= nh) {
        out[0] = 0;
        out[1] = 0;
        out[2] = 0;
        return;
    }
    const unsigned char* s = p.src + p.src_off[b];
    if (mode == RESIZE_COPY) {
        const unsigned char* px = s + ((long long)y * sw + x) * 3;
        out[0] = px[0];
        out[1] = px[1];
        out[2] = px[2];
        return;
    }
    if (mode == RESIZE_AREA_HALF) {
        const int y1 = min(2 * y + 2, sh), x1 = min(2 * x + 2, sw);
        for (int c = 0; c < 3; ++c) {
            int sum = 0, count = 0;
            for (int sy = 2 * y; sy < y1; ++sy)
                for (int sx = 2 * x; sx < x1; ++sx) {
                    sum += s[((long long)sy * sw + sx) * 3 + c];
                    ++count;
                }
            int v;
            if (count == 4) v = (sum + 2) >> 2;
            else if (count == 2) v = (sum >> 1) + ((sum & 1) & ((sum >> 1) & 1));  // half to even
            else v = sum;  // count 1 (a block cut on both axes); 0 cannot occur inside the image
            out[c] = (unsigned char)v;
        }
        return;
    }
    const int* xt = p.taps + d[5] + 4 * x;
    const int* yt = p.taps + d[6] + 4 * y;
    const unsigned char* r0 = s + (long long)yt[0] * sw * 3;
    const unsigned char* r1 = s + (long long)yt[1] * sw * 3;
    const int x0 = xt[0] * 3, x1 = xt[1] * 3;
    for (int c = 0; c < 3; ++c) {
        const int h0 = r0[x0 + c] * xt[2] + r0[x1 + c] * xt[3];
        const int h1 = r1[x0 + c] * xt[2] + r1[x1 + c] * xt[3];
        const int t = (((h0 >> 4) * yt[2]) >> 16) + (((h1 >> 4) * yt[3]) >> 16);
        out[c] = (unsigned char)min(max((t + 2) >> 2, 0), 255);
    }
}
