//! The plain definition of every operation the executors run: the oracle that every fast path (the CPU
//! engine's SIMD and threaded paths in `crate::cpu`, the CUDA kernels on a GPU and in the simulation) is
//! tested against.
//!
//! Each function is the operation's PyTorch semantics written as loops over NCHW f32 tensors: no SIMD, no
//! unsafe code, no threads, no layout tricks, so that it can be checked by reading it. Speed is not a
//! goal: the engine runs the fast paths, and only the steps cheap enough to need no fast path (the input
//! preprocessing and the heads' split into anchors) run from here. Decoding and NMS are defined by
//! `crate::post`, which the CPU executor runs as is.
//!
//! Sizes that do not match the shapes stated in a function's documentation are a caller's bug (the plan
//! computes every shape), reported by a panic naming the operand.
//!
//! A leaf of the layering: it imports the graph's types and the shared constants only.

mod conv;
mod heads;
mod pool;
mod preprocess;

pub use conv::conv2d;
pub use heads::{heads_to_anchors, softmax2};
pub use pool::{max_pool_3x3s2, nearest_index, upsample_nearest_add};
pub use preprocess::{BGR_MEAN, preprocess};

/// Output size along one axis of a `kernel`-wide convolution or pool with `stride` and `pad` zeros (or
/// −∞ for the pool) on both sides: `⌊(size + 2·pad − kernel) / stride⌋ + 1`, PyTorch's rule without
/// dilation or ceil mode.
pub fn out_size(size: usize, kernel: usize, stride: usize, pad: usize) -> usize {
    (size + 2 * pad - kernel) / stride + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_size_follows_pytorch() {
        // 3x3 pad 1 stride 1 keeps the size; stride 2 halves it rounding up (the networks' rule); the
        // 7x7 stride-2 pad-3 stem on 640 gives 320.
        assert_eq!(out_size(17, 3, 1, 1), 17);
        assert_eq!(out_size(17, 3, 2, 1), 9);
        assert_eq!(out_size(640, 7, 2, 3), 320);
        assert_eq!(out_size(9, 1, 2, 0), 5);
    }
}
