//! Weights and materializers: turning sum_i w_i * s_i * B_i A_i into one
//! adapter. Pure Rust; no libtorch here.

pub mod math;
pub mod merge;
pub mod spill;
pub mod weights_file;
