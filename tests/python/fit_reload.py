#!/usr/bin/env python3
"""Reload check for `lora-merge fit` (causal LM): what it wrote is what it measured.

Loads the base model with transformers (AutoModelForCausalLM, float32, eager
attention, eval mode) and the adapter that `fit` wrote with
PeftModel.from_pretrained(base, OUT), then recomputes, on the held-out shots
that `fit` used (OUT/merge_manifest.json fit.shots.validation: 0-based
indices among the non-blank lines of the shots file), the held-out loss:

    ids  = tok(prompt, add_special_tokens=True) + tok(completion, add_special_tokens=False)
    loss = sum over held-out examples and completion tokens p of
           -log_softmax(logits[p-1])[ids[p]]   /   number of completion tokens

(one sequence per example, no padding; log_softmax in float64 on the float32
logits; {"input", "output"} lines are read as {"prompt", "completion"}).
The tokenizer is the base model's tokenizer.json, read with `tokenizers`.

Two comparisons:
  learned  PEFT model (adapter active)     vs fit.validation.learned.loss
  base     the same model inside model.disable_adapter()
                                           vs fit.validation.base.loss
Each must agree within a relative difference |a - b| / |b| <= 1e-4. Both sides
are float32 forwards of the same weights, but in different implementations
(libtorch kernels driven by lora-merge vs transformers + PEFT, which applies
the adapter as x W^T + s (x A^T) B^T instead of merged weights) with
different summation orders, so they differ by float32 rounding (about 1e-6
relative here); 1e-4 leaves room for that while still catching a wrong
weight, scale, module, token or example (each of which moves the loss by far
more).

The load must also be clean: any warning or log record (python warnings,
transformers/peft loggers, stderr) mentioning missing / unexpected /
mismatched keys while loading is a failure, as is a non-empty missing /
unexpected key list in the result of PeftModel.load_adapter (the adapter is
loaded a second time for that, then deleted), a tensor of
adapter_model.safetensors that is not in the model or not equal to the
loaded one (or a LoRA tensor in the model that is not in the file), or no
LoRA module being loaded at all.

Usage:
    python tests/python/fit_reload.py --base MODEL_DIR --out OUT --shots SHOTS [--json]

Prints one line per comparison (or, with --json, one JSON object with
peft_val_loss, manifest_val_loss, rel_diff, base_val_loss,
manifest_base_loss, base_rel_diff, tolerance, examples, tokens, load_problems,
ok); exits 0 when everything agrees, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from loadcheck import capture_warnings, key_problems

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TOLERANCE = 1e-4
def read_shots(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        prompt = r["prompt"] if "prompt" in r else r["input"]
        completion = r["completion"] if "completion" in r else r["output"]
        rows.append({"prompt": prompt, "completion": completion})
    return rows


def heldout_loss(model, tok, rows) -> tuple[float, int]:
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            p = tok.encode(r["prompt"], add_special_tokens=True).ids
            c = tok.encode(r["completion"], add_special_tokens=False).ids
            ids = torch.tensor([p + c], dtype=torch.int64)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
            logp = torch.log_softmax(logits.double(), dim=-1)
            for j in range(len(p), len(p) + len(c)):
                total -= float(logp[j - 1, ids[0, j]])
            count += len(c)
    return total / count, count


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b != 0 else abs(a - b)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, type=Path, help="base model directory")
    ap.add_argument("--out", required=True, type=Path, help="output directory of `lora-merge fit`")
    ap.add_argument("--shots", required=True, type=Path, help="the shots file given to `fit`")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--all", action="store_true",
                    help="score every example of --shots against --expect-loss and --expect-base-loss "
                         "(for an adapter written by `train`, or with figures from `lora-merge eval`) "
                         "instead of the manifest's held-out split and losses")
    ap.add_argument("--expect-loss", type=float, help="with --all: the adapter's loss to match")
    ap.add_argument("--expect-base-loss", type=float, help="with --all: the base model's loss to match")
    args = ap.parse_args(argv)
    if args.all and (args.expect_loss is None or args.expect_base_loss is None):
        ap.error("--all needs --expect-loss and --expect-base-loss")

    import torch
    import transformers
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_warning()

    manifest = json.loads((args.out / "merge_manifest.json").read_text())
    shots = read_shots(args.shots)
    if args.all:
        fit = None
        rows = shots
    else:
        fit = manifest["fit"]
        val_idx = fit["shots"]["validation"]
        if not val_idx:
            print("FAIL: the manifest lists no held-out shots", file=sys.stderr)
            return 1
        if max(val_idx) >= len(shots):
            print(f"FAIL: validation index {max(val_idx)} beyond {len(shots)} shots", file=sys.stderr)
            return 1
        rows = [shots[i] for i in val_idx]

    tok = Tokenizer.from_file(str(args.base / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()

    problems: list[str] = []
    with capture_warnings() as msgs:
        base = AutoModelForCausalLM.from_pretrained(str(args.base), dtype=torch.float32,
                                                    attn_implementation="eager").eval()
        model = PeftModel.from_pretrained(base, str(args.out)).eval()
    problems += key_problems(msgs)
    # the load result of a second copy (PeftModel.from_pretrained does not return one)
    with capture_warnings() as msgs2:
        res = model.load_adapter(str(args.out), adapter_name="reload_check")
    model.delete_adapter("reload_check")
    model.set_adapter("default")
    problems += key_problems(msgs2)
    if res.missing_keys:
        problems.append(f"missing keys: {res.missing_keys[:3]} ({len(res.missing_keys)})")
    if res.unexpected_keys:
        problems.append(f"unexpected keys: {res.unexpected_keys[:3]} ({len(res.unexpected_keys)})")
    # every tensor of the file is in the model, unchanged, and nothing else was loaded
    file_sd = load_file(str(args.out / "adapter_model.safetensors"))
    params = {k.replace(".default.", "."): v for k, v in model.state_dict().items() if ".default." in k}
    absent = sorted(set(file_sd) - set(params))
    extra = sorted(set(params) - set(file_sd))
    changed = sorted(k for k in set(file_sd) & set(params) if not torch.equal(file_sd[k], params[k]))
    if absent or extra or changed:
        problems.append(f"file vs loaded tensors: absent {absent[:3]} extra {extra[:3]} changed {changed[:3]}")
    n_lora = sum(1 for _, m in model.named_modules() if isinstance(m, LoraLayer) and "default" in m.lora_A)
    if n_lora == 0:
        problems.append("no LoRA module loaded")

    peft_loss, tokens = heldout_loss(model, tok, rows)
    with model.disable_adapter():
        base_loss, _ = heldout_loss(model, tok, rows)

    if fit is None:
        man_learned, man_base = args.expect_loss, args.expect_base_loss
    else:
        man_learned = float(fit["validation"]["learned"]["loss"])
        man_base = float(fit["validation"]["base"]["loss"])
    report = {
        "peft_val_loss": peft_loss,
        "manifest_val_loss": man_learned,
        "rel_diff": rel_diff(peft_loss, man_learned),
        "base_val_loss": base_loss,
        "manifest_base_loss": man_base,
        "base_rel_diff": rel_diff(base_loss, man_base),
        "manifest_uniform_loss": fit["validation"].get("uniform", {}).get("loss") if fit else None,
        "tolerance": TOLERANCE,
        "examples": len(rows),
        "tokens": tokens,
        "lora_modules": n_lora,
        "load_problems": problems,
    }
    ok = report["rel_diff"] <= TOLERANCE and report["base_rel_diff"] <= TOLERANCE and not problems
    report["ok"] = ok

    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"load: {n_lora} LoRA modules, " + ("clean" if not problems else "; ".join(problems)))
        print(f"learned: peft {peft_loss:.8f} manifest {man_learned:.8f} rel {report['rel_diff']:.2e}")
        print(f"base:    peft {base_loss:.8f} manifest {man_base:.8f} rel {report['base_rel_diff']:.2e}")
        print(f"{len(rows)} held-out examples, {tokens} completion tokens, tolerance {TOLERANCE:g}: "
              + ("ok" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
