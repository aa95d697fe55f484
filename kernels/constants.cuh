// constants.cuh — the constants the kernels and the host share, each defined once: build.rs mirrors
// every #define here into Rust (src/cuda/params.rs `consts`, used by src/post, src/cpu and the CUDA
// executor). Values: integers become usize, numbers with a point f32, {a, b, ...} arrays.
#pragma once

// Activation codes of ConvParams::act.
#define ACT_NONE 0
#define ACT_LEAKY 1
#define ACT_RELU6 2

// The reference's input normalisation: out = float(bgr) − mean, per channel B, G, R.
#define BGR_MEAN {104.0f, 117.0f, 123.0f}

// Priors: the pyramid levels' strides and, per level, the two anchor sizes in input pixels.
#define PRIOR_STEPS {8, 16, 32}
#define PRIOR_MIN_SIZES {16, 32, 64, 128, 256, 512}

// The bitmask NMS's limit on candidates per image (kernels/post.cu nms_mask + nms_reduce): its mask is
// k²/64 words (512 KiB per image at 2048, held in every plan's buffers); the tiled NMS takes any count.
#define NMS_BITMASK_MAX 2048
// Elements per block of the radix passes (256 threads × 8 rounds).
#define RADIX_TILE 2048
// Sorted candidates per tile of the tiled NMS, one per thread of its block (4 mask words per row).
#define NMS_TILE 256

// How kernels/resize.cu makes an image's pixels (ResizeParams::desc, per image).
#define RESIZE_BILINEAR 0
#define RESIZE_AREA_HALF 1
#define RESIZE_COPY 2
