//! lora-merge: merge and compose LoRA adapters.
//!
//! Every merge follows one path: an [`adapter::AdapterSet`] (what), weights
//! (how much), a materializer in [`compose`] (what shape), and the writer in
//! [`output`] (where).

pub mod adapter;
pub mod checkpoint;
pub mod cli;
pub mod commands;
pub mod compose;
pub mod data;
pub mod error;
pub mod exit;
pub mod hash;
pub mod hub;
pub mod layout;
pub mod oom;
pub mod output;
pub mod resources;
pub mod rng;
pub mod search;
pub mod settings;
pub mod source;
pub mod tensors;
pub mod ui;

pub use error::{Error, Result};
