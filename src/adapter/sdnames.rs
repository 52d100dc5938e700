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
//!
//! kohya files for SDXL name UNet modules after the original (SGM) UNet that
//! sd-scripts trains: `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`
//! is diffusers' `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`.
//! Alignment keys always use diffusers' names ([`sgm_to_diffusers`]), so
//! files of either naming line up; [`diffusers_to_sgm`] is the way back, for
//! kohya output that keeps the inputs' naming.

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

/// UNet layers per block in SD 1.x, 2.x and XL alike. SGM numbers a down
/// block's layers as `LAYERS_PER_BLOCK` slots (a resnet, followed by an
/// attention where the block has them) and one more for the downsampler; an
/// up block's as `LAYERS_PER_BLOCK + 1` slots, the upsampler joining the
/// last. Both make a block three consecutive SGM block numbers, after
/// `input_blocks.0` (`conv_in`) on the way down.
const LAYERS_PER_BLOCK: usize = 2;
const SLOTS: usize = LAYERS_PER_BLOCK + 1;

/// The resnet layers a LoRA can adapt (convs and linears, not the norms):
/// SGM's `ResBlock` names and diffusers' `ResnetBlock2D` names.
const RESNET_LAYERS: &[(&str, &str)] = &[
    ("in_layers_2", "conv1"),
    ("out_layers_3", "conv2"),
    ("emb_layers_1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
];

/// Adaptable modules outside the blocks: (SGM, diffusers).
const TOP_LEVEL: &[(&str, &str)] = &[
    ("input_blocks_0_0", "conv_in"),
    ("out_2", "conv_out"),
    ("time_embed_0", "time_embedding_linear_1"),
    ("time_embed_2", "time_embedding_linear_2"),
    ("label_emb_0_0", "add_embedding_linear_1"),
    ("label_emb_0_2", "add_embedding_linear_2"),
];

/// Starts of SGM UNet names (flat, after `lora_unet_`). No diffusers UNet
/// module name starts like this.
const SGM_STARTS: &[&str] = &[
    "input_blocks_",
    "middle_block_",
    "output_blocks_",
    "time_embed_",
    "label_emb_",
    "out_",
];

/// Is this flat UNet name spelled after the SGM UNet?
pub fn is_sgm(flat: &str) -> bool {
    SGM_STARTS.iter().any(|p| flat.starts_with(p))
}

/// The adaptable layers of an attention block (diffusers'
/// `Transformer2DModel`, SGM's `SpatialTransformer`), named alike in both.
fn is_attention_layer(rest: &str) -> bool {
    rest == "proj_in" || rest == "proj_out" || rest.starts_with("transformer_blocks_")
}

/// `"12_rest"` -> `(12, "rest")`, `"12"` -> `(12, "")`. Plain decimal only
/// (no `012`), so that names map one to one.
fn index(s: &str) -> Option<(usize, &str)> {
    let (n, rest) = match s.split_once('_') {
        Some((_, "")) => return None,
        Some(split) => split,
        None => (s, ""),
    };
    let v: usize = n.parse().ok()?;
    (v.to_string() == n).then_some((v, rest))
}

/// What a layer inside an SGM block slot is, from its name.
enum SgmLayer<'a> {
    /// A resnet layer, by its diffusers name.
    Resnet(&'static str),
    Attention(&'a str),
    Downsampler,
    Upsampler,
}

/// Read the layer at position `j` of an SGM block slot: `[resnet]`,
/// `[resnet, attention]`, `[downsampler]` (`op`), or with an upsampler
/// (`conv`) last. The layer's own name says what it is, so the mapping needs
/// no table of which blocks have attentions.
fn sgm_layer(j: usize, rest: &str) -> Option<SgmLayer<'_>> {
    if j == 0 {
        if rest == "op" {
            return Some(SgmLayer::Downsampler);
        }
        return RESNET_LAYERS
            .iter()
            .find(|(s, _)| *s == rest)
            .map(|(_, d)| SgmLayer::Resnet(d));
    }
    if rest == "conv" && j <= 2 {
        return Some(SgmLayer::Upsampler);
    }
    (j == 1 && is_attention_layer(rest)).then_some(SgmLayer::Attention(rest))
}

/// diffusers' name of an SGM UNet module, both flat (after `lora_unet_`):
/// `input_blocks_4_1_transformer_blocks_0_attn1_to_q` ->
/// `down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`. `None` for
/// a name that is not an adaptable module of the SD 1.x/2.x/XL UNets.
///
/// The same rules as diffusers' `_maybe_map_sgm_blocks_to_diffusers` and
/// `_convert_unet_lora_key`, except that an upsampler is recognised by its
/// name rather than its position (diffusers takes SD 1.x's
/// `output_blocks_2_1_conv` for an attention).
pub fn sgm_to_diffusers(flat: &str) -> Option<String> {
    if let Some((_, d)) = TOP_LEVEL.iter().find(|(s, _)| *s == flat) {
        return Some((*d).to_string());
    }
    if let Some(s) = flat.strip_prefix("input_blocks_") {
        let (i, s) = index(s)?;
        let (j, rest) = index(s)?;
        // input_blocks_0 is conv_in, handled above.
        let (b, l) = (i.checked_sub(1)? / SLOTS, (i - 1) % SLOTS);
        return match sgm_layer(j, rest)? {
            SgmLayer::Resnet(x) if l < LAYERS_PER_BLOCK => {
                Some(format!("down_blocks_{b}_resnets_{l}_{x}"))
            }
            SgmLayer::Attention(x) if l < LAYERS_PER_BLOCK => {
                Some(format!("down_blocks_{b}_attentions_{l}_{x}"))
            }
            SgmLayer::Downsampler if l == LAYERS_PER_BLOCK => {
                Some(format!("down_blocks_{b}_downsamplers_0_conv"))
            }
            _ => None,
        };
    }
    if let Some(s) = flat.strip_prefix("middle_block_") {
        // [resnet, attention, resnet], one layer per slot.
        let (i, rest) = index(s)?;
        return match (i, sgm_layer(usize::from(i == 1), rest)?) {
            (0 | 2, SgmLayer::Resnet(x)) => Some(format!("mid_block_resnets_{}_{x}", i / 2)),
            (1, SgmLayer::Attention(x)) => Some(format!("mid_block_attentions_0_{x}")),
            _ => None,
        };
    }
    if let Some(s) = flat.strip_prefix("output_blocks_") {
        let (i, s) = index(s)?;
        let (j, rest) = index(s)?;
        let (b, l) = (i / SLOTS, i % SLOTS);
        return match sgm_layer(j, rest)? {
            SgmLayer::Resnet(x) => Some(format!("up_blocks_{b}_resnets_{l}_{x}")),
            SgmLayer::Attention(x) => Some(format!("up_blocks_{b}_attentions_{l}_{x}")),
            SgmLayer::Upsampler if l == SLOTS - 1 => {
                Some(format!("up_blocks_{b}_upsamplers_0_conv"))
            }
            _ => None,
        };
    }
    None
}

/// The two UNets whose modules have SGM names. They differ, for naming, in
/// one place: an up block's upsampler follows its attention in the SGM
/// block (slot 2) when the block has attentions, else its resnet (slot 1).
/// SDXL's up blocks 0 and 1 have attentions; SD 1.x/2.x's up block 0 has
/// none (its blocks 1 and 2 do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnetLayout {
    /// SD 1.x and 2.x: four down and up blocks, no attention in up block 0.
    Sd1,
    /// SDXL: three down and up blocks, no attention in down block 0.
    Sdxl,
}

impl UnetLayout {
    /// SD 1.x/2.x when an alignment key names a module only their UNet has
    /// (a fourth down or up block, attentions in down block 0); else SDXL,
    /// the UNet whose kohya files use SGM names.
    pub fn guess<'a>(keys: impl IntoIterator<Item = &'a str>) -> UnetLayout {
        let sd1_only = [
            "down_blocks_3_",
            "up_blocks_3_",
            "down_blocks_0_attentions_",
        ];
        let sd1 = keys.into_iter().any(|k| {
            k.strip_prefix(UNET.kohya)
                .is_some_and(|rest| sd1_only.iter().any(|p| rest.starts_with(p)))
        });
        if sd1 {
            UnetLayout::Sd1
        } else {
            UnetLayout::Sdxl
        }
    }

    fn upsampler_slot(self, up_block: usize) -> usize {
        if self == UnetLayout::Sd1 && up_block == 0 {
            1
        } else {
            2
        }
    }
}

/// The SGM name of a diffusers UNet module, both flat: the inverse of
/// [`sgm_to_diffusers`]. `None` for a module the SGM UNet does not have.
pub fn diffusers_to_sgm(flat: &str, layout: UnetLayout) -> Option<String> {
    if let Some((s, _)) = TOP_LEVEL.iter().find(|(_, d)| *d == flat) {
        return Some((*s).to_string());
    }
    let resnet = |x: &str| RESNET_LAYERS.iter().find(|(_, d)| *d == x).map(|(s, _)| *s);
    // SGM block number `offset` slots into diffusers block `b` (checked:
    // `b` comes from a file).
    let slot = |b: usize, offset: usize| b.checked_mul(SLOTS)?.checked_add(offset);
    // `kind_l_rest` of a block: ("resnets" | "attentions", l, rest).
    let layer = |s: &str| {
        let (kind, s) = s.split_once('_')?;
        let (l, rest) = index(s)?;
        Some((kind.to_string(), l, rest.to_string()))
    };
    if let Some(s) = flat.strip_prefix("down_blocks_") {
        let (b, s) = index(s)?;
        if s == "downsamplers_0_conv" {
            return Some(format!(
                "input_blocks_{}_0_op",
                slot(b, LAYERS_PER_BLOCK + 1)?
            ));
        }
        let (kind, l, rest) = layer(s)?;
        if l >= LAYERS_PER_BLOCK {
            return None;
        }
        let i = slot(b, l + 1)?;
        return match kind.as_str() {
            "resnets" => Some(format!("input_blocks_{i}_0_{}", resnet(&rest)?)),
            "attentions" if is_attention_layer(&rest) => Some(format!("input_blocks_{i}_1_{rest}")),
            _ => None,
        };
    }
    if let Some(s) = flat.strip_prefix("mid_block_") {
        let (kind, l, rest) = layer(s)?;
        return match (kind.as_str(), l) {
            ("resnets", 0 | 1) => Some(format!("middle_block_{}_{}", 2 * l, resnet(&rest)?)),
            ("attentions", 0) if is_attention_layer(&rest) => {
                Some(format!("middle_block_1_{rest}"))
            }
            _ => None,
        };
    }
    if let Some(s) = flat.strip_prefix("up_blocks_") {
        let (b, s) = index(s)?;
        if s == "upsamplers_0_conv" {
            let i = slot(b, SLOTS - 1)?;
            return Some(format!(
                "output_blocks_{i}_{}_conv",
                layout.upsampler_slot(b)
            ));
        }
        let (kind, l, rest) = layer(s)?;
        if l >= SLOTS {
            return None;
        }
        let i = slot(b, l)?;
        return match kind.as_str() {
            "resnets" => Some(format!("output_blocks_{i}_0_{}", resnet(&rest)?)),
            "attentions" if is_attention_layer(&rest) => {
                Some(format!("output_blocks_{i}_1_{rest}"))
            }
            _ => None,
        };
    }
    None
}

/// The alignment key of a kohya module name (its part after the prefix is
/// `rest`), and whether the name was an SGM UNet name (mapped to diffusers'
/// name in the key). SGM-like names that are not adaptable modules of the
/// SD UNets keep their spelling.
pub fn kohya_key(component: Component, rest: &str) -> (String, bool) {
    if component == UNET {
        if let Some(d) = sgm_to_diffusers(rest) {
            return (key(UNET, &d), true);
        }
    }
    (key(component, rest), false)
}

/// The spatial kernel of the Stable Diffusion UNet convolution an alignment
/// key names, for the layers whose kernel is the same in SD 1.x, 2.x and XL:
/// the resnets' `conv1`/`conv2`, the down- and upsamplers' `conv`,
/// `conv_in` and `conv_out` are 3x3, `conv_shortcut` is 1x1. `None` for
/// every other key (linears, and the attentions' `proj_in`/`proj_out`,
/// which are 1x1 convolutions in SD 1.x but linears in 2.x and XL).
///
/// Only needed where a file stores a convolution's factors flattened to
/// `[rank, in * kh * kw]` with nothing that says the kernel (LyCORIS LoHa
/// and LoKr).
pub fn unet_conv_kernel(key: &str) -> Option<[usize; 2]> {
    let rest = key.strip_prefix(UNET.kohya)?;
    let resnet_conv =
        rest.contains("_resnets_") && (rest.ends_with("_conv1") || rest.ends_with("_conv2"));
    let sampler_conv =
        rest.ends_with("_downsamplers_0_conv") || rest.ends_with("_upsamplers_0_conv");
    if resnet_conv || sampler_conv || rest == "conv_in" || rest == "conv_out" {
        Some([3, 3])
    } else if rest.contains("_resnets_") && rest.ends_with("_conv_shortcut") {
        Some([1, 1])
    } else {
        None
    }
}

/// An alignment key that still spells an SGM UNet name: one with no
/// diffusers counterpart, which PEFT and diffusers output cannot name.
pub fn is_unmapped_sgm_key(key: &str) -> bool {
    key.strip_prefix(UNET.kohya).is_some_and(is_sgm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unet_conv_kernels_by_name() {
        for (k, want) in [
            ("lora_unet_down_blocks_0_resnets_0_conv1", Some([3, 3])),
            ("lora_unet_up_blocks_1_resnets_2_conv2", Some([3, 3])),
            ("lora_unet_mid_block_resnets_1_conv1", Some([3, 3])),
            ("lora_unet_down_blocks_1_downsamplers_0_conv", Some([3, 3])),
            ("lora_unet_up_blocks_0_upsamplers_0_conv", Some([3, 3])),
            ("lora_unet_conv_in", Some([3, 3])),
            ("lora_unet_conv_out", Some([3, 3])),
            (
                "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
                Some([1, 1]),
            ),
            ("lora_unet_down_blocks_0_resnets_0_time_emb_proj", None),
            ("lora_unet_down_blocks_0_attentions_0_proj_in", None),
            ("lora_te1_text_model_encoder_layers_0_mlp_fc1", None),
            ("lora_te1_conv_in", None),
        ] {
            assert_eq!(unet_conv_kernel(k), want, "{k}");
        }
    }

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
    /// Pairs read off the two UNets' structures (SGM's `UNetModel`,
    /// diffusers' `UNet2DConditionModel`) and diffusers' own conversion
    /// (`_maybe_map_sgm_blocks_to_diffusers`, `_convert_unet_lora_key`).
    const SDXL_PAIRS: &[(&str, &str)] = &[
        ("input_blocks_0_0", "conv_in"),
        (
            "input_blocks_1_0_in_layers_2",
            "down_blocks_0_resnets_0_conv1",
        ),
        (
            "input_blocks_2_0_emb_layers_1",
            "down_blocks_0_resnets_1_time_emb_proj",
        ),
        ("input_blocks_3_0_op", "down_blocks_0_downsamplers_0_conv"),
        (
            "input_blocks_4_0_skip_connection",
            "down_blocks_1_resnets_0_conv_shortcut",
        ),
        (
            "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
            "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
        ),
        (
            "input_blocks_5_1_proj_in",
            "down_blocks_1_attentions_1_proj_in",
        ),
        ("input_blocks_6_0_op", "down_blocks_1_downsamplers_0_conv"),
        (
            "input_blocks_8_1_transformer_blocks_9_attn2_to_out_0",
            "down_blocks_2_attentions_1_transformer_blocks_9_attn2_to_out_0",
        ),
        ("middle_block_0_out_layers_3", "mid_block_resnets_0_conv2"),
        (
            "middle_block_1_transformer_blocks_9_ff_net_0_proj",
            "mid_block_attentions_0_transformer_blocks_9_ff_net_0_proj",
        ),
        (
            "middle_block_2_emb_layers_1",
            "mid_block_resnets_1_time_emb_proj",
        ),
        (
            "output_blocks_0_0_skip_connection",
            "up_blocks_0_resnets_0_conv_shortcut",
        ),
        (
            "output_blocks_0_1_proj_out",
            "up_blocks_0_attentions_0_proj_out",
        ),
        (
            "output_blocks_2_1_transformer_blocks_3_ff_net_2",
            "up_blocks_0_attentions_2_transformer_blocks_3_ff_net_2",
        ),
        ("output_blocks_2_2_conv", "up_blocks_0_upsamplers_0_conv"),
        ("output_blocks_5_2_conv", "up_blocks_1_upsamplers_0_conv"),
        (
            "output_blocks_8_0_in_layers_2",
            "up_blocks_2_resnets_2_conv1",
        ),
        ("out_2", "conv_out"),
        ("time_embed_0", "time_embedding_linear_1"),
        ("time_embed_2", "time_embedding_linear_2"),
        ("label_emb_0_0", "add_embedding_linear_1"),
        ("label_emb_0_2", "add_embedding_linear_2"),
    ];

    /// SD 1.x/2.x: four blocks; up block 0 has no attention, so its
    /// upsampler sits in slot 1 of output block 2.
    const SD1_PAIRS: &[(&str, &str)] = &[
        (
            "input_blocks_1_1_proj_in",
            "down_blocks_0_attentions_0_proj_in",
        ),
        ("input_blocks_9_0_op", "down_blocks_2_downsamplers_0_conv"),
        (
            "input_blocks_11_0_emb_layers_1",
            "down_blocks_3_resnets_1_time_emb_proj",
        ),
        ("output_blocks_2_1_conv", "up_blocks_0_upsamplers_0_conv"),
        ("output_blocks_5_2_conv", "up_blocks_1_upsamplers_0_conv"),
        (
            "output_blocks_11_1_transformer_blocks_0_attn2_to_k",
            "up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k",
        ),
    ];

    #[test]
    fn sgm_names_map_both_ways() {
        for (layout, pairs) in [(UnetLayout::Sdxl, SDXL_PAIRS), (UnetLayout::Sd1, SD1_PAIRS)] {
            for (sgm, diffusers) in pairs {
                assert!(is_sgm(sgm), "{sgm}");
                assert!(!is_sgm(diffusers), "{diffusers}");
                assert_eq!(sgm_to_diffusers(sgm).as_deref(), Some(*diffusers), "{sgm}");
                assert_eq!(
                    diffusers_to_sgm(diffusers, layout).as_deref(),
                    Some(*sgm),
                    "{diffusers} ({layout:?})"
                );
            }
        }
        // The rebuilt dotted path is diffusers' module path.
        let (k, sgm) = kohya_key(UNET, "output_blocks_2_2_conv");
        assert!(sgm);
        assert_eq!(
            dotted_from_key(&k).unwrap(),
            "unet.up_blocks.0.upsamplers.0.conv"
        );
        let (k, sgm) = kohya_key(UNET, "label_emb_0_0");
        assert!(sgm);
        assert_eq!(dotted_from_key(&k).unwrap(), "unet.add_embedding.linear_1");
        // Text encoders are never touched, nor diffusers-named UNet modules.
        assert_eq!(
            kohya_key(TEXT_ENCODER_2, "text_model_encoder_layers_0_mlp_fc1"),
            ("lora_te2_text_model_encoder_layers_0_mlp_fc1".into(), false)
        );
        assert_eq!(
            kohya_key(UNET, "down_blocks_1_attentions_0_proj_in"),
            ("lora_unet_down_blocks_1_attentions_0_proj_in".into(), false)
        );
    }

    #[test]
    fn sgm_names_that_are_no_adaptable_layer_stay_unmapped() {
        for flat in [
            "input_blocks_1_0_in_layers_0", // a GroupNorm
            "input_blocks_3_1_proj_in",     // slot 3 of a down block is its downsampler
            "input_blocks_1_0_op",          // ... and only that slot has one
            "input_blocks_4_2_proj_in",     // a down slot holds two layers at most
            "input_blocks_01_0_op",         // not plain decimal
            "input_blocks_1_1_norm",        // a GroupNorm
            "output_blocks_1_1_conv",       // an upsampler ends an up block
            "output_blocks_2_3_conv",
            "output_blocks_2_0_conv",
            "middle_block_3_in_layers_2",
            "middle_block_1_in_layers_2",
            "out_0",
            "time_embed_1",
            "input_blocks_",
        ] {
            assert_eq!(sgm_to_diffusers(flat), None, "{flat}");
            let (k, sgm) = kohya_key(UNET, flat);
            assert!(!sgm && is_unmapped_sgm_key(&k), "{flat}");
        }
        for flat in [
            "down_blocks_0_resnets_2_conv1",
            "down_blocks_0_resnets_0_norm1",
            "down_blocks_0_attentions_0_norm",
            "up_blocks_0_resnets_3_conv1",
            "up_blocks_0_upsamplers_1_conv",
            "mid_block_resnets_2_conv1",
            "mid_block_attentions_1_proj_in",
            "conv_norm_out",
            // Block numbers from a file cannot overflow the arithmetic.
            "down_blocks_18446744073709551615_downsamplers_0_conv",
            "up_blocks_18446744073709551615_resnets_0_conv1",
        ] {
            assert_eq!(diffusers_to_sgm(flat, UnetLayout::Sdxl), None, "{flat}");
        }
    }

    /// Every adaptable layer of the full SDXL and SD 1.x UNets (enumerated
    /// from diffusers' block structure) maps to a distinct SGM name and back.
    #[test]
    fn whole_unets_round_trip() {
        fn unet(layout: UnetLayout) -> Vec<String> {
            // (down blocks with attention, their transformer depth, blocks)
            let (attn_down, depth, blocks): (&[usize], &[usize], usize) = match layout {
                UnetLayout::Sdxl => (&[1, 2], &[1, 2, 10], 3),
                UnetLayout::Sd1 => (&[0, 1, 2], &[1, 1, 1, 1], 4),
            };
            let mut out: Vec<String> = TOP_LEVEL.iter().map(|(_, d)| d.to_string()).collect();
            let attention = |p: String, depth: usize, out: &mut Vec<String>| {
                out.push(format!("{p}_proj_in"));
                out.push(format!("{p}_proj_out"));
                for t in 0..depth {
                    for l in [
                        "attn1_to_q",
                        "attn1_to_k",
                        "attn1_to_v",
                        "attn1_to_out_0",
                        "attn2_to_q",
                        "attn2_to_k",
                        "attn2_to_v",
                        "attn2_to_out_0",
                        "ff_net_0_proj",
                        "ff_net_2",
                    ] {
                        out.push(format!("{p}_transformer_blocks_{t}_{l}"));
                    }
                }
            };
            let resnet = |p: String, out: &mut Vec<String>| {
                for (_, d) in RESNET_LAYERS {
                    out.push(format!("{p}_{d}"));
                }
            };
            for b in 0..blocks {
                for l in 0..2 {
                    resnet(format!("down_blocks_{b}_resnets_{l}"), &mut out);
                    if attn_down.contains(&b) {
                        attention(
                            format!("down_blocks_{b}_attentions_{l}"),
                            depth[b],
                            &mut out,
                        );
                    }
                }
                if b + 1 < blocks {
                    out.push(format!("down_blocks_{b}_downsamplers_0_conv"));
                }
                let down = blocks - 1 - b;
                for l in 0..3 {
                    resnet(format!("up_blocks_{b}_resnets_{l}"), &mut out);
                    if attn_down.contains(&down) {
                        attention(
                            format!("up_blocks_{b}_attentions_{l}"),
                            depth[down],
                            &mut out,
                        );
                    }
                }
                if b + 1 < blocks {
                    out.push(format!("up_blocks_{b}_upsamplers_0_conv"));
                }
            }
            resnet("mid_block_resnets_0".into(), &mut out);
            resnet("mid_block_resnets_1".into(), &mut out);
            attention("mid_block_attentions_0".into(), depth[blocks - 1], &mut out);
            out
        }
        for layout in [UnetLayout::Sdxl, UnetLayout::Sd1] {
            let names = unet(layout);
            let keys: Vec<String> = names.iter().map(|n| key(UNET, n)).collect();
            assert_eq!(UnetLayout::guess(keys.iter().map(String::as_str)), layout);
            let mut seen = std::collections::BTreeSet::new();
            for n in &names {
                let sgm = diffusers_to_sgm(n, layout).unwrap_or_else(|| panic!("{n}"));
                assert!(seen.insert(sgm.clone()), "{sgm} twice");
                assert_eq!(sgm_to_diffusers(&sgm).as_deref(), Some(n.as_str()), "{sgm}");
            }
            println!("{layout:?}: {} UNet layers map both ways", names.len());
        }
    }
}
