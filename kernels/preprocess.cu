// preprocess.cu — u8 BGR pixels to the network input: out = float(bgr) − mean (B 104, G 117, R 123).
//
// Layout: the upload is OpenCV's HWC BGR, which is already NHWC with c = 3, so element i maps to
//   element i and its channel is i % 3 (no transpose; the CPU path's NCHW planes are a transpose).
// Launch: 1-D, 256 threads per block, one element per thread, grid = ceil(total / 256).
// Cost: per element 1 B read, 4 B written, 1 FLOP — bandwidth bound (n·h·w·15 bytes).
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256) preprocess_bgr(const PreprocessParams p) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= p.total) return;
    const int c = i % 3;
    const float means[3] = BGR_MEAN;
    const float mean = means[c];
    p.dst[i] = (float)p.src[i] - mean;
}
