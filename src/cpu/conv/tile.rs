//! The micro-tile of the implicit-GEMM convolution, shared by its driver (`igemm`) and its micro-kernels
//! (`igemm_avx512`, `igemm_avx2`), which depend on it and not on each other.

/// Output channels per micro-tile (rows of broadcast weights). Every channel count of these networks is
/// a multiple of 8, so no row of a tile is wasted (12×32 tiles wasted 11% of the 64-channel layers).
pub const MR: usize = 8;
/// Output pixels per micro-tile: three 16-lane AVX-512 registers (`igemm_avx512`), or two columns of three
/// 8-lane AVX2 ones (`igemm_avx2`).
pub const NR: usize = 48;
