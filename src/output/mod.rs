//! Writing results: PEFT adapter files, the provenance manifest, the model
//! card, all staged in a temporary directory and moved into place at once.

pub mod atomic;
pub mod card;
pub mod describe;
pub mod diffusers;
pub mod guard;
pub mod heatmap;
pub mod kohya;
pub mod manifest;
pub mod peft;
pub mod safetensors;
pub mod verify;
pub mod writer;

use crate::adapter::ModuleKind;
use crate::compose::merge::MergedModule;

/// The stored shapes of a merged module's A and B: matrices in the middle of
/// the program, kernel shapes restored here for every output layout
/// (conv: A [r, in, kh, kw], B [out, r, 1, 1]).
pub fn factor_shapes(m: &MergedModule) -> (Vec<usize>, Vec<usize>) {
    let r = m.factored.rank;
    match &m.kind {
        ModuleKind::Conv { kernel } => {
            let mut a = vec![r];
            a.extend_from_slice(kernel);
            let mut b = vec![m.fan_out, r];
            b.extend(std::iter::repeat_n(1, kernel.len().saturating_sub(1)));
            (a, b)
        }
        ModuleKind::Linear | ModuleKind::Embedding => (vec![r, m.fan_in], vec![m.fan_out, r]),
    }
}
