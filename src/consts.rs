//! The constants the kernels and the host share, defined once in kernels/constants.cuh and mirrored
//! here by build.rs (priors, input means, the device NMS limit, activation codes). The lowest layer:
//! src/post, src/cpu and src/cuda all read them from here.

include!(concat!(env!("OUT_DIR"), "/kernel_constants.rs"));
