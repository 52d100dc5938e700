#!/usr/bin/env python3
"""How far a truncating merge is from the best possible one, module by module.

For a merge written by `lora-merge uniform --method svd --rank R` (or any
method whose manifest records `rel_error`), this rebuilds each sampled
module's exact weighted delta, sum_i w_i s_i B_i A_i, in float64 from the
inputs the manifest names (PEFT directories or kohya files), takes its
singular values, and prints:

  optimal    the Eckart-Young error of the best rank-R approximation,
             ||dW - best_R|| / ||dW||
  achieved   the error of what was written (the output's factors)
  reported   the manifest's rel_error for the module

and the worst achieved/optimal ratio. The benchmark tables' "error against
the optimum" figures come from here.

Usage:
    python tests/bench/optimum.py OUT [--match REGEX] [--sample N]

OUT is the merge's output directory (merge_manifest.json and one
.safetensors). --match keeps the modules whose name the regular expression
finds; --sample N then checks N of them spread evenly over the sorted
list (default: all); a dense SVD of a 10240 x 1280 delta takes a few
seconds.
"""

from __future__ import annotations

import argparse
import glob
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open


def input_factors(inp: dict, name: str):
    """(B, A, scale) of module `name` in one input, as float64."""
    res = inp["resolved"]
    f = safe_open(res["weights"], "pt")
    keys = set(f.keys())
    if inp["format"] == "peft":
        cfg = json.loads(Path(res["config"]).read_text())
        key = f"base_model.model.{name}"
        a = f.get_tensor(f"{key}.lora_A.weight").double()
        b = f.get_tensor(f"{key}.lora_B.weight").double()
        r = a.shape[0]
        alpha = cfg.get("alpha_pattern", {}).get(name, cfg["lora_alpha"])
        scale = alpha / (r**0.5 if cfg.get("use_rslora") else r)
    else:
        a = f.get_tensor(f"{name}.lora_down.weight").double().flatten(1)
        b = f.get_tensor(f"{name}.lora_up.weight").double().flatten(1)
        r = a.shape[0]
        alpha = float(f.get_tensor(f"{name}.alpha")) if f"{name}.alpha" in keys else r
        scale = alpha / r
    return b, a, scale


def output_factors(out: Path, name: str):
    path = [p for p in glob.glob(str(out / "*.safetensors"))][0]
    f = safe_open(path, "pt")
    keys = set(f.keys())
    if f"base_model.model.{name}.lora_A.weight" in keys:
        key = f"base_model.model.{name}"
        a = f.get_tensor(f"{key}.lora_A.weight").double()
        b = f.get_tensor(f"{key}.lora_B.weight").double()
        return b @ a  # written with scale 1 (lora_alpha = rank)
    a = f.get_tensor(f"{name}.lora_down.weight").double().flatten(1)
    b = f.get_tensor(f"{name}.lora_up.weight").double().flatten(1)
    alpha = float(f.get_tensor(f"{name}.alpha")) if f"{name}.alpha" in keys else a.shape[0]
    return (alpha / a.shape[0]) * (b @ a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--sample", type=int, default=0)
    ap.add_argument("--match", default=None, help="only modules whose name this regular expression finds")
    args = ap.parse_args()
    torch.set_num_threads(1)
    man = json.loads((args.out / "merge_manifest.json").read_text())
    names = sorted(n for n in man["modules"] if args.match is None or re.search(args.match, n))
    if not names:
        raise SystemExit(f"optimum: no module matches {args.match!r}")
    if args.sample and args.sample < len(names):
        step = len(names) / args.sample
        names = [names[int(i * step)] for i in range(args.sample)]
    worst = 0.0
    for name in names:
        info = man["modules"][name]
        delta = None
        for idx, w in zip(info["adapters"], info["weights"]):
            b, a, s = input_factors(man["inputs"][idx], name)
            t = (w * s) * (b @ a)
            delta = t if delta is None else delta + t
        sv = torch.linalg.svdvals(delta)
        r = info["rank"]
        total = sv.pow(2).sum()
        optimal = (sv[r:].pow(2).sum() / total).sqrt().item()
        achieved = ((delta - output_factors(args.out, name)).norm() / total.sqrt()).item()
        ratio = achieved / optimal if optimal > 0 else float("nan")
        worst = max(worst, ratio)
        print(
            f"{name[:64]:64s} {tuple(delta.shape)} rank {r}: optimal {optimal:.6f} achieved {achieved:.6f} "
            f"reported {info['rel_error']:.6f} achieved/optimal-1 {ratio - 1:.1e}"
        )
    print(f"worst achieved/optimal over {len(names)} modules: {worst:.6f}")


if __name__ == "__main__":
    main()
