//! Writing results: PEFT adapter files, the provenance manifest, the model
//! card, all staged in a temporary directory and moved into place at once.

pub mod atomic;
pub mod card;
pub mod diffusers;
pub mod kohya;
pub mod manifest;
pub mod peft;
pub mod safetensors;

use sha2::{Digest, Sha256};

pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut s = String::with_capacity(64);
    for b in digest {
        s.push_str(&format!("{b:02x}"));
    }
    s
}
