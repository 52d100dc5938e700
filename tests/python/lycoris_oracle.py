#!/usr/bin/env python3
"""LyCORIS LoHa and LoKr modules made by LyCORIS itself (the lycoris-lora
package), in a kohya-style file, with the dense deltas LyCORIS applies.

Every module is one of LyCORIS' own `LohaModule`/`LokrModule` on a real
`nn.Linear` or `nn.Conv2d`, its parameters set to random values (rounded to
the file's dtype first), saved under a kohya name with the module's own
`state_dict()`:

  OUT/lycoris_kohya.safetensors   LoHa: linear with alpha, linear without
                                  alpha, a rank r*r above the layer's
                                  min(out, in), 3x3 and 1x1 convs, one in
                                  f16. LoKr: full w1 with factored w2, both
                                  factored, both full (alpha ignored), conv
                                  with a full [b, d, 3, 3] w2, conv with a
                                  factored (flattened) w2, and one without
                                  alpha.
  OUT/lycoris_ref.safetensors     the dense delta of each module, by its key
                                  stem, float64, flattened to [out, in*kh*kw]

The reference is what the module adds to its layer's weight in LyCORIS'
forward (`get_weight(shape) * scalar`, multiplier 1), computed in float64;
this script checks it against the module's actual forward pass (the
adapted layer's output minus the base layer's, on a random input), and
fails if they differ by more than 1e-9 relative. (LyCORIS'
`get_diff_weight`, used by its `merge_to`, multiplies that same delta by
the module's scale a second time; the script prints by how much that
differs, for information. The forward pass is what inference applies.)

Also written, for refusal tests (LyCORIS modules too):

  OUT/tucker_loha.safetensors     LoHa with a Tucker core (hada_t1/hada_t2)
  OUT/tucker_lokr.safetensors     LoKr with a Tucker core (lokr_t2)
  OUT/dora_loha.safetensors       LoHa with weight decomposition (dora_scale)

Usage:
    python tests/python/lycoris_oracle.py --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from safetensors.torch import save_file

SEED = 20240611
TOL = 1e-9


def randomise(module: nn.Module, g: torch.Generator, dtype: torch.dtype) -> None:
    """Every LyCORIS parameter random (LyCORIS zero-initialises one factor),
    rounded to `dtype` so that the file holds exactly the values used."""
    for name, p in module.named_parameters():
        if name.startswith("org_module"):
            continue
        v = torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5
        p.data = v.to(dtype).to(p.dtype)


def make(kind: str, layer: nn.Module, g: torch.Generator, dtype=torch.float32, **kw):
    cls = {"loha": LohaModule, "lokr": LokrModule}[kind]
    module = cls("m", layer, multiplier=1.0, **kw)
    randomise(module, g, dtype)
    return module


def reference(module) -> torch.Tensor:
    """The delta the module's forward adds to the weight, flattened."""
    with torch.no_grad():
        w = module.get_weight(module.shape) * module.scalar
    return w.reshape(w.shape[0], -1)


def forward_check(module, layer: nn.Module, ref: torch.Tensor, g: torch.Generator) -> float:
    """Relative error between the module's real forward delta and
    op(x, ref), on a random input."""
    conv = isinstance(layer, nn.Conv2d)
    if conv:
        x = torch.randn(2, layer.in_channels, 7, 7, generator=g, dtype=torch.float64)
    else:
        x = torch.randn(5, layer.in_features, generator=g, dtype=torch.float64)
    with torch.no_grad():
        base = layer(x)
        module.apply_to()
        adapted = layer(x)
        module.restore()
        if conv:
            expected = F.conv2d(
                x,
                ref.reshape(module.shape),
                stride=layer.stride,
                padding=layer.padding,
                dilation=layer.dilation,
            )
        else:
            expected = x @ ref.T
    got = adapted - base
    return float((got - expected).norm() / expected.norm())


# (kind, kohya stem, layer, dtype, LyCORIS arguments, keep the alpha tensor)
def cases():
    return [
        ("loha", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
         nn.Linear(32, 24), torch.float32, dict(lora_dim=4, alpha=2.0), True),
        ("loha", "lora_te1_text_model_encoder_layers_0_mlp_fc1",
         nn.Linear(16, 40), torch.float32, dict(lora_dim=2, alpha=0), False),
        ("loha", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k",
         nn.Linear(6, 10), torch.float32, dict(lora_dim=4, alpha=3.0), True),
        ("loha", "lora_unet_down_blocks_0_resnets_0_conv1",
         nn.Conv2d(8, 12, 3, padding=1), torch.float32, dict(lora_dim=3, alpha=1.5), True),
        ("loha", "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
         nn.Conv2d(8, 16, 1), torch.float32, dict(lora_dim=2, alpha=1.0), True),
        ("loha", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v",
         nn.Linear(32, 24), torch.float16, dict(lora_dim=2, alpha=1.0), True),
        ("lokr", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2",
         nn.Linear(64, 48), torch.float32, dict(lora_dim=2, alpha=4.0), True),
        ("lokr", "lora_unet_down_blocks_0_attentions_0_proj_in",
         nn.Linear(64, 48), torch.float32, dict(lora_dim=2, alpha=3.0, decompose_both=True), True),
        ("lokr", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
         nn.Linear(24, 20), torch.float32, dict(lora_dim=4, alpha=3.0, full_matrix=True), True),
        ("lokr", "lora_unet_down_blocks_1_resnets_0_conv2",
         nn.Conv2d(16, 12, 3, padding=1), torch.float32, dict(lora_dim=8, alpha=2.0), True),
        ("lokr", "lora_unet_up_blocks_0_upsamplers_0_conv",
         nn.Conv2d(64, 32, 3, padding=1), torch.float32, dict(lora_dim=2, alpha=5.0), True),
        ("lokr", "lora_unet_down_blocks_0_attentions_0_proj_out",
         nn.Linear(64, 48), torch.float32, dict(lora_dim=2, alpha=0), False),
    ]


def state(module, stem: str, dtype: torch.dtype, keep_alpha: bool) -> dict:
    out = {}
    for k, v in module.state_dict().items():
        if k == "alpha":
            if keep_alpha:
                out[f"{stem}.alpha"] = v.detach().float().clone()
            continue
        out[f"{stem}.{k}"] = v.detach().to(dtype).contiguous().clone()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)

    tensors, refs, summary = {}, {}, {}
    worst_forward, worst_merge_to, worst_twice = 0.0, 0.0, 0.0
    for kind, stem, layer, dtype, kw, keep_alpha in cases():
        layer = layer.double()
        module = make(kind, layer, g, dtype, **kw).double()
        part = state(module, stem, dtype, keep_alpha)
        ref = reference(module)
        err = forward_check(module, layer, ref, g)
        worst_forward = max(worst_forward, err)
        with torch.no_grad():
            merged = module.get_diff_weight(multiplier=1.0)[0].reshape(ref.shape)
        worst_merge_to = max(worst_merge_to, float((merged - ref).norm() / ref.norm()))
        twice = ref * module.scale
        worst_twice = max(worst_twice, float((merged - twice).norm() / twice.norm()))
        tensors.update(part)
        refs[stem] = ref.contiguous()
        summary[stem] = {
            "kind": kind,
            "scale": float(module.scale),
            "tensors": {k.split(".")[-1]: list(v.shape) for k, v in part.items()},
        }
        print(f"{kind} {stem}: scale {float(module.scale):g}, "
              f"{ {k.split('.')[-1]: list(v.shape) for k, v in part.items()} }, "
              f"forward vs reference {err:.2e}")
    save_file(tensors, str(args.out / "lycoris_kohya.safetensors"))
    save_file(refs, str(args.out / "lycoris_ref.safetensors"))
    (args.out / "lycoris_cases.json").write_text(json.dumps(summary, indent=1))
    print(f"forward pass vs reference: worst relative error {worst_forward:.2e}")
    print(f"get_diff_weight (merge_to) vs the reference: worst relative difference "
          f"{worst_merge_to:.2e}; vs the reference times the scale: {worst_twice:.2e}")
    if not worst_forward < TOL:
        raise SystemExit(f"the reference deltas disagree with LyCORIS' forward: {worst_forward:.2e}")

    # Refused networks, made by LyCORIS too.
    conv = lambda: nn.Conv2d(16, 12, 3, padding=1)  # noqa: E731
    refused = {
        "tucker_loha": ("loha", "lora_unet_down_blocks_0_resnets_0_conv1", conv(),
                        dict(lora_dim=2, alpha=1.0, use_tucker=True)),
        "tucker_lokr": ("lokr", "lora_unet_down_blocks_0_resnets_0_conv2", nn.Conv2d(64, 32, 3, padding=1),
                        dict(lora_dim=2, alpha=1.0, use_tucker=True)),
        "dora_loha": ("loha", "lora_unet_down_blocks_0_attentions_0_proj_in", nn.Linear(16, 8),
                      dict(lora_dim=2, alpha=1.0, weight_decompose=True)),
    }
    for file, (kind, stem, layer, kw) in refused.items():
        module = make(kind, layer, g, **kw)
        part = state(module, stem, torch.float32, True)
        parts = sorted(k.split(".")[-1] for k in part)
        want = {"tucker_loha": "hada_t1", "tucker_lokr": "lokr_t2", "dora_loha": "dora_scale"}[file]
        if want not in parts:
            raise SystemExit(f"{file}: LyCORIS wrote {parts}, without {want}")
        save_file(part, str(args.out / f"{file}.safetensors"))
        print(f"{file}: {stem} {parts}")


if __name__ == "__main__":
    main()
