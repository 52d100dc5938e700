#!/usr/bin/env python3
"""diffusers loader oracle for lora-merge's Stable Diffusion outputs.

For the SD 1.5-like and SDXL-like fixtures of fixtures/make_sd_fixtures.py
(real module names, widths divided by 8) this builds tiny diffusers
`UNet2DConditionModel`s and transformers `CLIPTextModel` /
`CLIPTextModelWithProjection`s whose module names and shapes match the
fixture tables (checked module by module), with random weights from a fixed
seed, wraps them in a `StableDiffusionPipeline` / `StableDiffusionXLPipeline`
and then, for every file under test:

  * loads it with diffusers' own code (`pipe.load_lora_weights(path)`:
    `lora_state_dict`, its kohya -> diffusers conversion, the
    `lora_adapter_metadata` LoraConfig, `load_lora_into_unet` /
    `load_lora_into_text_encoder`), with every warning that diffusers, PEFT
    or transformers logs or warns while loading counted as a failure
    (unexpected or missing keys, skipped modules, ...);
  * checks that the LoRA layers PEFT injected are exactly the modules the
    file holds, which are exactly the fixture's modules (nothing skipped);
  * fuses at scale 1 (`pipe.fuse_lora(lora_scale=1.0)`), unloads the LoRA
    layers, and checks that every fused weight minus the original weight
    equals the expected delta (reshaped to the weight's shape for convs),
    and that no other tensor of any component changed (bit for bit).

Files under test:

  * the fixture inputs themselves, kohya and diffusers layouts, adapters a
    and b: expected delta = the fixture's reference (so the fixtures are right);
  * `lora-merge uniform --weights 0.7 -0.4` of adapters a and b, from kohya,
    diffusers and PEFT-on-UNet inputs, written with `--output-format kohya`
    and `--output-format diffusers`: expected delta = 0.7 ref_a - 0.4 ref_b
    (UNet modules only for the PEFT inputs).

SGM-named SDXL (the `sgm` fixture: the whole SDXL UNet structure at widths
8/16/32, every adaptable layer, named after the original SGM UNet as
sd-scripts names SDXL modules): a tiny SDXL UNet of that structure is built
and

  * the SGM-named kohya fixture and its diffusers-named twin load as above
    (diffusers maps the SGM names itself, `_maybe_map_sgm_blocks_to_diffusers`),
    which checks the fixture's two namings against diffusers (the twin less
    add_embedding, whose diffusers-named kohya keys diffusers misreads);
  * `lora-merge uniform --weights 1` of the SGM file, written as kohya,
    diffusers and PEFT: kohya and diffusers load as above; the PEFT adapter
    loads with PEFT's own `PeftModel.from_pretrained` into a module holding
    the pipeline's components under their diffusers names
    (`unet.down_blocks...`, as a PEFT adapter spanning components names
    them), is merged (`merge_and_unload`) and compared the same way;
  * `--weights 0.7 -0.4` of the SGM file and its diffusers-named twin (the
    same deltas), written as kohya and diffusers: one module per layer,
    delta 0.3 ref;
  * the SDXL UNet module list of the benchmark (tests/bench/sd_bench.py:
    the layers sd-scripts' networks.lora adapts) is contained in the
    fixture's, by diffusers name, and equals its attention layers.

Tolerance: relative Frobenius error ||got - want|| / ||want|| <= 1e-5 per
module. `got` is (W + delta) - W taken in float32, as diffusers fuses in the
weight's dtype: the base weights and the deltas have the same magnitude
(both ~ 1/sqrt(fan_in)), so the fused sum's float32 rounding costs ~1e-7
relative; the factors and references are float32 roundings of float64 values
(~6e-8 each) and PEFT's B @ A product is a float32 matmul (~1e-7 over ranks
<= 9). 1e-5 leaves two orders of magnitude of headroom over that, while a
wrong scale (alpha/rank), a transposed or mis-shaped conv kernel, or a module
mapped to the wrong layer gives errors of order 1.

Usage:
    python tests/python/sd_loaders.py --fixtures DIR [--bin PATH] [--workdir DIR]

The binary defaults to $LORA_MERGE_BIN. Without --fixtures the fixtures are
generated into the work directory. Prints one line per check and ends with
`N passed, M failed`; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "fixtures"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "warning")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")

import make_sd_fixtures as msf  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

transformers.utils.logging.disable_progress_bar()

TOL = 1e-5
SEED = 1234
WEIGHTS = (0.7, -0.4)


# --------------------------------------------------------------------- report
class Report:
    def __init__(self, quiet: bool = False):
        self.passed = 0
        self.failed = 0
        self.quiet = quiet
        self.failures: list[str] = []

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        if ok:
            self.passed += 1
        else:
            self.failed += 1
            self.failures.append(name)
        if not self.quiet:
            print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
        return ok


class Collect(logging.Handler):
    """Every record of WARNING or above that the libraries log."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record):
        self.records.append(f"{record.name}: {record.getMessage()}")


LOGGERS = ("diffusers", "peft", "transformers")


# ----------------------------------------------------------------- the models
CLIP_COMMON = dict(vocab_size=1000, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)


def model_path(module: torch.nn.Module, path: str) -> str:
    """`path` as named inside `module`: transformers >= 5 flattens CLIPTextModel
    (no `text_model.` level), and diffusers strips that prefix from LoRA keys."""
    if path.startswith("text_model.") and not hasattr(module, "text_model"):
        return path.removeprefix("text_model.")
    return path

def clip(width: int, heads: int, layers: int = 2, projection: bool = False):
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(
        CLIPTextConfig(
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            projection_dim=width,
            **CLIP_COMMON,
        )
    )


def sdxl_unet(widths, transformer_layers, cross_dim: int, head_dims, time_dim: int):
    """A UNet with SDXL's block structure (and its text_time embedding) at the given sizes."""
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=widths,
        layers_per_block=2,
        transformer_layers_per_block=transformer_layers,
        cross_attention_dim=cross_dim,
        attention_head_dim=head_dims,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + widths[-1],
        norm_num_groups=8,
    )


def sd15_components():
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(40, 80, 160, 160),
        layers_per_block=2,
        cross_attention_dim=96,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return {"unet": unet, "text_encoder": clip(96, 12)}


def sdxl_components():
    unet = sdxl_unet((40, 80, 160), (1, 2, 2), cross_dim=256, head_dims=(5, 10, 20), time_dim=32)
    return {"unet": unet, "text_encoder": clip(96, 12), "text_encoder_2": clip(160, 20, projection=True)}


def tiny_vae():
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )


def sgm_components():
    """An SDXL-structured UNet at widths 8/16/32 (fixtures' SGM_TABLE)."""
    unet = sdxl_unet((8, 16, 32), (1, 2, 10), cross_dim=64, head_dims=(1, 2, 4), time_dim=8)
    return {"unet": unet, "text_encoder": clip(32, 4, layers=1), "text_encoder_2": clip(32, 4, layers=1, projection=True)}


MODELS = {
    "sd15": (msf.SD15, sd15_components, StableDiffusionPipeline),
    "sdxl": (msf.SDXL, sdxl_components, StableDiffusionXLPipeline),
    "sgm": ([row[:5] for row in msf.SGM_TABLE], sgm_components, StableDiffusionXLPipeline),
}


def build_components(model: str):
    torch.manual_seed(SEED)
    comps = MODELS[model][1]()
    for m in comps.values():
        m.eval()
    return comps


def make_pipe(model: str, comps):
    """A pipeline around deep copies of `comps` (no tokenizer: nothing is run)."""
    kw = {k: copy.deepcopy(v) for k, v in comps.items()}
    kw.update(vae=tiny_vae(), scheduler=DDIMScheduler(steps_offset=1, clip_sample=False))
    if model == "sd15":
        return StableDiffusionPipeline(
            tokenizer=None, safety_checker=None, feature_extractor=None, requires_safety_checker=False, **kw
        )
    return StableDiffusionXLPipeline(tokenizer=None, tokenizer_2=None, **kw)


def shape_of(kind: str, fin: int, fout: int):
    return {"linear": (fout, fin), "conv1": (fout, fin, 1, 1), "conv3": (fout, fin, 3, 3)}[kind]


def check_tables(rep: Report, model: str, comps) -> None:
    """Every fixture module exists in the tiny model with the fixture's kind and shape."""
    table = MODELS[model][0]
    bad = []
    for comp, path, kind, fin, fout in table:
        try:
            mod = comps[comp].get_submodule(model_path(comps[comp], path))
        except AttributeError:
            bad.append(f"{comp}.{path}: missing")
            continue
        want_cls = torch.nn.Linear if kind == "linear" else torch.nn.Conv2d
        got = tuple(mod.weight.shape)
        if not isinstance(mod, want_cls) or got != shape_of(kind, fin, fout):
            bad.append(f"{comp}.{path}: {type(mod).__name__}{list(got)}, fixture says {kind} {fin}->{fout}")
    rep.check(f"{model}: tiny model has every fixture module with its shape", not bad, "; ".join(bad))


# ------------------------------------------------------------------- checking
def kohya_key(comp: str, path: str) -> str:
    return msf.kohya_name(comp, path, False)


def expected_deltas(fixtures: Path, model: str, comps, coeffs: dict[str, float], unet_only: bool):
    """(component, module path in the model) -> float64 delta shaped like the weight."""
    refs = {a: load_file(str(fixtures / f"{model}_{a}_ref.safetensors")) for a in coeffs}
    out = {}
    for comp, path, kind, fin, fout in MODELS[model][0]:
        if unet_only and comp != "unet":
            continue
        k = kohya_key(comp, path)
        d = sum(c * refs[a][k].double() for a, c in coeffs.items())
        out[(comp, model_path(comps[comp], path))] = d.reshape(shape_of(kind, fin, fout))
    return out


def file_modules(path: Path, comp_of_kohya, comps) -> set:
    """(component, module path in the model) of every LoRA module the file holds."""
    mods = set()
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            if k.endswith(".lora_down.weight"):
                mods.add(comp_of_kohya(k[: -len(".lora_down.weight")]))
            elif k.endswith(".lora_A.weight"):
                comp, rest = k[: -len(".lora_A.weight")].split(".", 1)
                mods.add((comp, rest))
    return {(c, model_path(comps[c], p) if c in comps else p) for c, p in mods}


def kohya_resolver(model: str):
    by_key = {}
    for comp, path, *_ in MODELS[model][0]:
        by_key[msf.kohya_name(comp, path, model == "sd15")] = (comp, path)
        by_key[kohya_key(comp, path)] = (comp, path)
    if model == "sgm":
        for comp, path, *_, sgm in msf.SGM_TABLE:
            if sgm:
                by_key[msf.KOHYA_PREFIX[comp] + sgm.replace(".", "_")] = (comp, path)
    return lambda k: by_key.get(k, ("?", k))


def expected_note(message: str, want: dict) -> bool:
    """diffusers' note that a component got no LoRA keys, for a component the
    file is not meant to adapt (UNet-only files from PEFT inputs). The same
    note for a component that should have been adapted is a failure."""
    m = re.search(r"No LoRA keys associated to \w+ found with the prefix='(\w+)'", message)
    return bool(m) and all(c != m.group(1) for c, _ in want)


def lora_layers(pipe, comps) -> set:
    found = set()
    for comp in comps:
        for name, mod in getattr(pipe, comp).named_modules():
            if isinstance(mod, BaseTunerLayer) and "sut" in getattr(mod, "lora_A", {}):
                found.add((comp, name))
    return found


def load_listening(load):
    """Run a loader; return (its result, the error it raised or None, what
    diffusers/PEFT/transformers logged and warned meanwhile)."""
    col = Collect()
    for n in LOGGERS:
        logging.getLogger(n).addHandler(col)
    result, err = None, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = load()
        except Exception as e:  # a refusal is a failure of the check, not of the script
            err = f"{type(e).__name__}: {e}"
    for n in LOGGERS:
        logging.getLogger(n).removeHandler(col)
    return result, err, col.records + [f"{w.category.__name__}: {w.message}" for w in caught]


def compare_deltas(rep: Report, label: str, verb: str, comps, merged_of, want: dict) -> float:
    """Every weight of `merged_of(comp)` minus the untouched `comps[comp]`
    must be the wanted delta where one is wanted and zero elsewhere."""
    worst, bad, changed_other, seen = 0.0, [], [], set()
    for comp in comps:
        before = comps[comp].state_dict()
        after = merged_of(comp).state_dict()
        if set(before) != set(after):
            changed_other.append(f"{comp}: key sets differ {sorted(set(before) ^ set(after))[:5]}")
            continue
        for key, w0 in before.items():
            path = key[: -len(".weight")] if key.endswith(".weight") else None
            w1 = after[key]
            if (comp, path) in want:
                seen.add((comp, path))
                d = want[(comp, path)]
                got = w1.double() - w0.double()
                e = float((got - d).norm() / d.norm()) if got.shape == d.shape else float("inf")
                worst = max(worst, e)
                if not e <= TOL:
                    bad.append(f"{comp}.{path} {e:.3e}")
            elif not torch.equal(w0, w1):
                changed_other.append(f"{comp}.{key}")
    bad += [f"{c}.{p} not in the model" for c, p in sorted(set(want) - seen)]
    rep.check(
        f"{label}: {verb} delta of {len(seen)} modules = expected, max rel err {worst:.3e} (tol {TOL:g})",
        not bad,
        ", ".join(bad[:10]),
    )
    rep.check(f"{label}: no other weight changed", not changed_other, ", ".join(changed_other[:10]))
    return worst


def check_file(rep: Report, label: str, model: str, comps, weights_file: Path, want: dict) -> None:
    pipe = make_pipe(model, comps)
    _, err, said = load_listening(
        lambda: pipe.load_lora_weights(str(weights_file.parent), weight_name=weights_file.name, adapter_name="sut")
    )
    noise = [n for n in said if not expected_note(n, want)]
    if not rep.check(f"{label}: diffusers loads it", err is None, err or ""):
        return
    rep.check(f"{label}: loaded with no warnings", not noise, " | ".join(noise)[:2000])

    in_file = file_modules(weights_file, kohya_resolver(model), comps)
    injected = lora_layers(pipe, comps)
    expected = set(want)
    rep.check(
        f"{label}: file holds exactly the fixture modules ({len(expected)})",
        in_file == expected,
        f"extra {sorted(in_file - expected)}, missing {sorted(expected - in_file)}",
    )
    rep.check(
        f"{label}: every module in the file got a LoRA layer ({len(injected)})",
        injected == in_file,
        f"not applied {sorted(in_file - injected)}, unexpected {sorted(injected - in_file)}",
    )

    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    return compare_deltas(rep, label, "fused", comps, lambda comp: getattr(pipe, comp), want)


class Components(torch.nn.Module):
    """The pipeline's components as children under their diffusers names, so
    that a PEFT adapter spanning components (`unet.down_blocks...`,
    `text_encoder.text_model...`) finds its modules. Text encoders without
    a `text_model` level (transformers >= 5) get one back, since the paths
    keep it (see model_path)."""

    def __init__(self, comps):
        super().__init__()
        for name, mod in comps.items():
            if name != "unet" and not hasattr(mod, "text_model"):
                holder = torch.nn.Module()
                holder.text_model = mod
                mod = holder
            self.add_module(name, mod)


def check_peft(rep: Report, label: str, model: str, comps, out: Path, want: dict) -> float:
    """Load a PEFT adapter directory with PEFT's own loader, merge it into the
    weights and compare, as check_file does for diffusers' loader."""
    from peft import PeftModel

    copies = {k: copy.deepcopy(v) for k, v in comps.items()}
    holder = Components(copies)
    peft_model, err, noise = load_listening(lambda: PeftModel.from_pretrained(holder, str(out), adapter_name="sut"))
    if not rep.check(f"{label}: PEFT loads it", err is None, err or ""):
        return 0.0
    rep.check(f"{label}: loaded with no warnings", not noise, " | ".join(noise)[:2000])
    injected = set()
    for name, mod in peft_model.base_model.model.named_modules():
        if isinstance(mod, BaseTunerLayer):
            comp, path = name.split(".", 1)
            mod_path = path.removeprefix("text_model.") if comp != "unet" and not hasattr(comps[comp], "text_model") else path
            injected.add((comp, mod_path))
    rep.check(
        f"{label}: PEFT adapted exactly the fixture modules ({len(injected)})",
        injected == set(want),
        f"extra {sorted(injected - set(want))[:5]}, missing {sorted(set(want) - injected)[:5]}",
    )
    peft_model.merge_and_unload()
    return compare_deltas(rep, label, "merged", comps, lambda comp: copies[comp], want)


def bench_coverage(rep: Report) -> None:
    """The benchmark's SDXL UNet modules (the layers sd-scripts' networks.lora
    adapts: every Linear of the transformer blocks) are all in the SGM
    fixture, which has every other adaptable layer too."""
    sys.path.insert(0, str(REPO / "tests/bench"))
    import sd_bench

    bench = {n for n, _, _ in sd_bench.sdxl_modules(1) if n.startswith("lora_unet_")}
    fixture = {kohya_key(c, p) for c, p, *_ in msf.SGM_TABLE if c == "unet"}
    attention = {kohya_key(c, p) for c, p, *_ in msf.SGM_TABLE if c == "unet" and ".attentions." in p}
    rep.check(
        f"sgm: the fixture holds all {len(bench)} SDXL UNet modules of the benchmark "
        f"({len(fixture)} UNet modules in all)",
        bench <= fixture and bench == attention,
        f"missing {sorted(bench - fixture)[:5]}, attention layers not in the benchmark {sorted(attention - bench)[:5]}",
    )


def sgm_checks(rep: Report, fixtures: Path, work: Path, binary: str) -> float:
    model = "sgm"
    comps = build_components(model)
    check_tables(rep, model, comps)
    bench_coverage(rep)
    worst = 0.0
    one = expected_deltas(fixtures, model, comps, {"a": 1.0}, unet_only=False)
    sgm_file = fixtures / "sgm_a_kohya.safetensors"
    twin = fixtures / "sgm_a_dnames_kohya.safetensors"
    worst = max(worst, check_file(rep, "sgm input a (kohya, SGM names)", model, comps, sgm_file, one) or 0.0)
    # diffusers' kohya converter turns `lora_unet_add_embedding_linear_1` into
    # `add.embedding.linear` (its rule for SDXL "emb" names drops the last
    # index, and only the SGM spelling label_emb_0_N is mapped), so it cannot
    # load those two layers by their diffusers names: the twin is checked
    # without them.
    skip = ("add_embedding.",)
    tensors = {k: v for k, v in load_file(str(twin)).items() if "add_embedding_" not in k}
    trimmed = work / "sgm_a_dnames_kohya-without-add_embedding.safetensors"
    save_file(tensors, str(trimmed))
    part = {k: v for k, v in one.items() if not k[1].startswith(skip)}
    worst = max(worst, check_file(rep, "sgm input a (kohya, diffusers names, less add_embedding)", model, comps, trimmed, part) or 0.0)
    runs = [([sgm_file], ["1"], dst, one) for dst in ("kohya", "diffusers", "peft")]
    mixed = expected_deltas(fixtures, model, comps, {"a": WEIGHTS[0] + WEIGHTS[1]}, unet_only=False)
    runs += [([sgm_file, twin], [str(w) for w in WEIGHTS], dst, mixed) for dst in ("kohya", "diffusers")]
    for inputs, weights, dst, want in runs:
        out = work / f"sgm-{len(inputs)}-to-{dst}"
        cmd = [binary, "uniform", "--adapters", *map(str, inputs), "--weights", *weights,
               "--output-format", dst, "--force", "-o", str(out)]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True)
        what = "SGM file" if len(inputs) == 1 else "SGM file 0.7 + diffusers-named twin -0.4"
        label = f"sgm merge of {what} -> {dst}"
        if not rep.check(f"{label}: lora-merge succeeds", r.returncode == 0, "" if r.returncode == 0 else r.stderr):
            continue
        if dst == "peft":
            e = check_peft(rep, label, model, comps, out, want)
        else:
            e = check_file(rep, label, model, comps, weights_in(out), want)
        worst = max(worst, e or 0.0)
    return worst


def oracle_self_test(rep: Report, fixtures: Path, work: Path, comps) -> None:
    """The checks above can fail: broken copies of an SD 1.5 kohya fixture must be caught."""
    src = fixtures / "sd15_a_kohya.safetensors"
    want = expected_deltas(fixtures, "sd15", comps, {"a": 1.0}, unet_only=False)
    base = load_file(str(src))
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    broken = {
        "alpha of one conv doubled": {**base, f"{conv}.alpha": base[f"{conv}.alpha"] * 2},
        "a module the model lacks": {
            **base,
            "lora_unet_down_blocks_0_resnets_7_conv1.lora_down.weight": base[f"{conv}.lora_down.weight"].clone(),
            "lora_unet_down_blocks_0_resnets_7_conv1.lora_up.weight": base[f"{conv}.lora_up.weight"].clone(),
            "lora_unet_down_blocks_0_resnets_7_conv1.alpha": base[f"{conv}.alpha"].clone(),
        },
        "one module left out": {k: v for k, v in base.items() if not k.startswith(conv)},
    }
    for what, tensors in broken.items():
        f = work / f"broken-{what.replace(' ', '-')}.safetensors"
        save_file(tensors, str(f))
        sub = Report(quiet=True)
        check_file(sub, what, "sd15", comps, f, want)
        rep.check(f"oracle self-test: {what} is caught", sub.failed > 0, "" if sub.failed else "all checks passed")
        if sub.failed:
            print(f"    caught by: {'; '.join(sub.failures)}")


# ----------------------------------------------------------------------- main
def input_path(fixtures: Path, stem: str, layout: str) -> Path:
    if layout == "kohya":
        return fixtures / f"{stem}_kohya.safetensors"
    return fixtures / f"{stem}_{layout}"


def weights_in(out: Path) -> Path:
    for n in ("lora.safetensors", "pytorch_lora_weights.safetensors"):
        if (out / n).exists():
            return out / n
    raise FileNotFoundError(f"no weights file in {out}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", type=Path, help="output of make_sd_fixtures.py (default: generate)")
    ap.add_argument("--bin", default=os.environ.get("LORA_MERGE_BIN"), help="lora-merge binary")
    ap.add_argument("--workdir", type=Path, help="keep merged outputs here (default: a temp dir)")
    args = ap.parse_args()
    if not args.bin:
        ap.error("pass --bin or set LORA_MERGE_BIN")
    tmp = tempfile.TemporaryDirectory()
    work = args.workdir or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    fixtures = args.fixtures
    if fixtures is None:
        fixtures = work / "fixtures"
        subprocess.run([sys.executable, str(REPO / "fixtures/make_sd_fixtures.py"), "--out", str(fixtures)], check=True)

    rep = Report()
    worst_in, worst_merged = 0.0, 0.0
    for model in ("sd15", "sdxl"):
        comps = build_components(model)
        check_tables(rep, model, comps)
        if model == "sd15":
            oracle_self_test(rep, fixtures, work, comps)
        for adapter in ("a", "b"):
            want = expected_deltas(fixtures, model, comps, {adapter: 1.0}, unet_only=False)
            for layout in ("kohya", "diffusers"):
                p = input_path(fixtures, f"{model}_{adapter}", layout)
                f = p if p.is_file() else weights_in(p)
                e = check_file(rep, f"{model} input {adapter} ({layout})", model, comps, f, want)
                worst_in = max(worst_in, e or 0.0)
        for src in ("kohya", "diffusers", "peft"):
            want = expected_deltas(fixtures, model, comps, dict(zip("ab", WEIGHTS)), unet_only=src == "peft")
            for dst in ("kohya", "diffusers"):
                out = work / f"{model}-{src}-to-{dst}"
                cmd = [
                    args.bin, "uniform",
                    "--adapters", str(input_path(fixtures, f"{model}_a", src)), str(input_path(fixtures, f"{model}_b", src)),
                    "--weights", *map(str, WEIGHTS),
                    "--output-format", dst, "--force", "-o", str(out),
                ]  # fmt: skip
                r = subprocess.run(cmd, capture_output=True, text=True)
                label = f"{model} merge {WEIGHTS[0]} a {WEIGHTS[1]:+} b, {src} -> {dst}"
                if not rep.check(f"{label}: lora-merge succeeds", r.returncode == 0, "" if r.returncode == 0 else r.stderr):
                    continue
                e = check_file(rep, label, model, comps, weights_in(out), want)
                worst_merged = max(worst_merged, e or 0.0)
    worst_sgm = sgm_checks(rep, fixtures, work, args.bin)
    print(f"max relative error: fixture inputs {worst_in:.3e}, merges {worst_merged:.3e}, "
          f"SGM-named SDXL {worst_sgm:.3e} (tolerance {TOL:g})")
    print(f"{rep.passed} passed, {rep.failed} failed")
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
