//! RetinaFace face detection: a CPU reference engine (the oracle) and CUDA kernels.
