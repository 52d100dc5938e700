//! lora-merge: merge and compose LoRA adapters.
//!
//! Every merge follows one path: an [`adapter::AdapterSet`] (what), weights
//! (how much), a materializer in [`compose`] (what shape), and the writer in
//! [`output`] (where).

pub mod adapter;
pub mod cli;
pub mod commands;
pub mod compose;
pub mod data;
pub mod error;
pub mod hub;
pub mod model;
pub mod output;

pub use error::{Error, Result};
