//! Module identity for Stable Diffusion adapters, whatever file layout they
//! came in.
//!
//! The same layer is spelled three ways:
//!
//! - PEFT on the UNet: `down_blocks.0.attentions.0.proj_in` (no component)
//! - diffusers: `unet.down_blocks.0.attentions.0.proj_in`
//! - kohya: `lora_unet_down_blocks_0_attentions_0_proj_in`
//!
//! The kohya spelling is the one every other spelling maps to without loss
//! (replace `.` by `_` after a prefix); the way back is ambiguous, because
//! module names contain `_` themselves. So the alignment key of a Stable
//! Diffusion module is its kohya spelling, with the first text encoder
//! always spelled `lora_te1_` (SD 1.x/2.x files say `lora_te_`; both mean
//! diffusers' `text_encoder`). The dotted path travels beside the key when
//! an input knew it, and is only reconstructed from the key (see
//! [`dotted_from_key`]) when every input was a kohya file.

/// A pipeline component and its two spellings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Component {
    /// diffusers' attribute name, the first segment of its keys.
    pub diffusers: &'static str,
    /// The kohya key prefix used in alignment keys.
    pub kohya: &'static str,
}

pub const UNET: Component = Component {
    diffusers: "unet",
    kohya: "lora_unet_",
};
pub const TEXT_ENCODER: Component = Component {
    diffusers: "text_encoder",
    kohya: "lora_te1_",
};
pub const TEXT_ENCODER_2: Component = Component {
    diffusers: "text_encoder_2",
    kohya: "lora_te2_",
};
pub const COMPONENTS: [Component; 3] = [UNET, TEXT_ENCODER, TEXT_ENCODER_2];

/// The single-text-encoder spelling of SD 1.x/2.x kohya files.
pub const KOHYA_TE_SINGLE: &str = "lora_te_";

/// The component a kohya name starts with, and the rest of the name.
/// `lora_te_` is read as the first text encoder.
pub fn split_kohya(name: &str) -> Option<(Component, &str)> {
    if let Some(rest) = name.strip_prefix(KOHYA_TE_SINGLE) {
        return Some((TEXT_ENCODER, rest));
    }
    COMPONENTS
        .iter()
        .find_map(|c| name.strip_prefix(c.kohya).map(|rest| (*c, rest)))
}

/// The component a diffusers key starts with (`unet.`, `text_encoder.`,
/// `text_encoder_2.`), and the module path after it.
pub fn split_diffusers(name: &str) -> Option<(Component, &str)> {
    let (first, rest) = name.split_once('.')?;
    COMPONENTS
        .iter()
        .find(|c| c.diffusers == first)
        .map(|c| (*c, rest))
}

/// Top-level modules of CLIP's text transformer. transformers 5's
/// `CLIPTextModel` holds them directly; transformers 4 (and kohya names)
/// under `text_model.`.
const CLIP_TEXT_TOP: &[&str] = &["encoder.", "embeddings.", "final_layer_norm."];

/// Does a text-encoder path lack the `text_model.` level (transformers 5)?
fn flat_clip_path(path: &str) -> bool {
    CLIP_TEXT_TOP.iter().any(|p| path.starts_with(p))
}

/// Alignment key of a module path inside a component. Text-encoder paths
/// saved under transformers 5 (`encoder.layers.0...`) get the
/// `text_model.` level back, so they line up with kohya's
/// `lora_te1_text_model_...` and with files saved under transformers 4.
pub fn key(component: Component, path: &str) -> String {
    let text_model = if component != UNET && flat_clip_path(path) {
        "text_model_"
    } else {
        ""
    };
    format!("{}{text_model}{}", component.kohya, path.replace('.', "_"))
}

/// Is `name` an alignment key (as opposed to a plain PEFT module path)?
pub fn is_key(name: &str) -> bool {
    COMPONENTS.iter().any(|c| name.starts_with(c.kohya))
}

/// The component of a PEFT module path, and the path inside it. A path that
/// starts with a component (`unet.`, as lora-merge writes a PEFT adapter
/// spanning several components) says so; otherwise the component is
/// guessed: CLIP's `text_model.` (or, saved under transformers 5, its
/// `encoder.`, `embeddings.` and `final_layer_norm.`, which no UNet has) means
/// the (first) text encoder, anything else the UNet. PEFT adapters name no component, so this is a convention,
/// stated in the CLI help.
pub fn split_peft_path(path: &str) -> (Component, &str) {
    if let Some(split) = split_diffusers(path) {
        return split;
    }
    if path.starts_with("text_model.") || flat_clip_path(path) {
        (TEXT_ENCODER, path)
    } else {
        (UNET, path)
    }
}

/// Module names of the diffusers UNet, the CLIP text encoders and the
/// original (SGM) UNet that sd-scripts uses for SDXL, which themselves
/// contain `_`. Longest first, so that `time_emb_proj` wins over `time_emb`.
const COMPOUNDS: &[&str] = &[
    "time_emb_proj",
    "final_layer_norm",
    "skip_connection",
    "encoder_hid_proj",
    "class_embedding",
    "add_embedding",
    "time_embedding",
    "conv_norm_out",
    "conv_shortcut",
    "transformer_blocks",
    "single_transformer_blocks",
    "text_projection",
    "position_embedding",
    "token_embedding",
    "down_blocks",
    "up_blocks",
    "mid_block",
    "input_blocks",
    "output_blocks",
    "middle_block",
    "time_embed",
    "label_emb",
    "emb_layers",
    "in_layers",
    "out_layers",
    "text_model",
    "self_attn",
    "layer_norm1",
    "layer_norm2",
    "add_k_proj",
    "add_v_proj",
    "add_q_proj",
    "to_add_out",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "proj_in",
    "proj_out",
    "conv_in",
    "conv_out",
    "norm_out",
    "linear_1",
    "linear_2",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
];

/// Rebuild a dotted module path from the part of a kohya name after its
/// prefix: `down_blocks_0_attentions_0_proj_in` ->
/// `down_blocks.0.attentions.0.proj_in`. Exact for the module names of the
/// SD 1.x/2.x/XL UNets and CLIP text encoders (the [`COMPOUNDS`] list); a
/// module name with `_` that is not in the list comes back split at its `_`.
pub fn dotted_from_flat(flat: &str) -> String {
    let tokens: Vec<&str> = flat.split('_').collect();
    let mut segs: Vec<String> = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let mut taken = 1;
        let mut best = tokens[i].to_string();
        // A compound has at most 4 tokens (`single_transformer_blocks` has 3).
        for n in (2..=4).rev() {
            if i + n > tokens.len() {
                continue;
            }
            let joined = tokens[i..i + n].join("_");
            if COMPOUNDS.contains(&joined.as_str()) {
                best = joined;
                taken = n;
                break;
            }
        }
        segs.push(best);
        i += taken;
    }
    segs.join(".")
}

/// The diffusers dotted path (with component) of an alignment key.
pub fn dotted_from_key(key: &str) -> Option<String> {
    let (c, rest) = split_kohya(key)?;
    Some(format!("{}.{}", c.diffusers, dotted_from_flat(rest)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_from_every_spelling_agree() {
        let p = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0";
        let k = key(UNET, p);
        assert_eq!(
            k,
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
        );
        assert_eq!(dotted_from_key(&k).unwrap(), format!("unet.{p}"));
        let full = format!("unet.{p}");
        let (c, rest) = split_diffusers(&full).unwrap();
        assert_eq!((c, rest), (UNET, p));
        let (c, rest) = split_diffusers("text_encoder_2.text_model.x").unwrap();
        assert_eq!((c, rest), (TEXT_ENCODER_2, "text_model.x"));
        assert!(split_diffusers("transformer.x").is_none());
    }

    #[test]
    fn text_encoder_spellings() {
        let (c, rest) = split_kohya("lora_te_text_model_encoder_layers_0_mlp_fc1").unwrap();
        assert_eq!(c, TEXT_ENCODER);
        assert_eq!(
            dotted_from_flat(rest),
            "text_model.encoder.layers.0.mlp.fc1"
        );
        let (c, _) = split_kohya("lora_te2_text_model_x").unwrap();
        assert_eq!(c, TEXT_ENCODER_2);
        assert_eq!(
            dotted_from_key("lora_te1_text_model_encoder_layers_11_self_attn_out_proj").unwrap(),
            "text_encoder.text_model.encoder.layers.11.self_attn.out_proj"
        );
        assert!(split_kohya("lora_vae_x").is_none());
    }

    #[test]
    fn compounds_and_sgm_names() {
        for p in [
            "down_blocks.1.resnets.0.time_emb_proj",
            "down_blocks.1.resnets.0.conv_shortcut",
            "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
            "up_blocks.1.upsamplers.0.conv",
            "input_blocks.4.1.transformer_blocks.0.attn2.to_k",
            "output_blocks.2.0.skip_connection",
            "middle_block.0.emb_layers.1",
        ] {
            assert_eq!(dotted_from_flat(&p.replace('.', "_")), p);
        }
    }

    #[test]
    fn peft_component_guess() {
        assert_eq!(
            split_peft_path("text_model.encoder.x"),
            (TEXT_ENCODER, "text_model.encoder.x")
        );
        assert_eq!(
            split_peft_path("down_blocks.0.x"),
            (UNET, "down_blocks.0.x")
        );
        assert_eq!(
            split_peft_path("text_encoder_2.text_model.x"),
            (TEXT_ENCODER_2, "text_model.x")
        );
    }

    #[test]
    fn transformers5_text_encoder_paths_align_with_kohya() {
        let (c, rest) = split_diffusers("text_encoder.encoder.layers.0.self_attn.q_proj").unwrap();
        assert_eq!(
            key(c, rest),
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
        );
        let (c, rest) =
            split_kohya("lora_te_text_model_encoder_layers_0_self_attn_q_proj").unwrap();
        assert_eq!(
            key(c, rest),
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
        );
        let (c, rest) = split_peft_path("encoder.layers.3.mlp.fc1");
        assert_eq!(key(c, rest), "lora_te1_text_model_encoder_layers_3_mlp_fc1");
        // The UNet is never touched.
        let (c, rest) = split_peft_path("down_blocks.0.attentions.0.proj_in");
        assert_eq!(key(c, rest), "lora_unet_down_blocks_0_attentions_0_proj_in");
    }
}
