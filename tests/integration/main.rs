//! Every integration test in one binary, as ripgrep does: the library and
//! its dependencies are linked into one test executable instead of seven,
//! which is most of what a fresh `cargo test` spends on 2 cores. Each
//! module is one area; `common` is what they share.
//!
//! `cargo test --test integration cli::` runs one area.

mod common;

mod bounds;
mod cli;
mod commit;
#[cfg(feature = "torch")]
mod fewshot;
mod fuzz_replay;
#[cfg(feature = "hub")]
mod hostile;
#[cfg(feature = "hub")]
mod hub;
mod interop;
mod layering;
mod lycoris;
mod man;
mod methods;
#[cfg(feature = "torch")]
mod model;
mod sd;
