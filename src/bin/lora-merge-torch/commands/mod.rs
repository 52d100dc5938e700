//! The commands that need libtorch. Each wires validated settings to the
//! engine, the training loop and the library's writer; none reaches into
//! another.

pub mod bench;
pub mod eval;
pub mod fit;
pub mod train;
