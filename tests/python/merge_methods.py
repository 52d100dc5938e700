#!/usr/bin/env python3
"""Oracle for `lora-merge uniform --method ties|magnitude-prune|dare-linear|dare-ties`.

The inputs are the committed demo adapters (fixtures/adapters): ranks 4, 8
(rsLoRA) and 6 (2 on one module), adapting 2, 4 and 7 of the tiny Llama's
module kinds, so modules are merged from 1, 2 or 3 adapters. PEFT loads
them and computes every input delta dW_i = s_i B_i A_i (get_delta_weight).

With --rank 64, at least min(fan_out, fan_in) of every module, the written
B @ A is the method's dense result itself, so it is compared entry by entry
with PEFT 0.21's own functions (peft.utils.merge_utils) applied to the
inputs' deltas, as PEFT's `*_svd` combinations apply them:

  * ties, magnitude-prune: equal to float precision (max abs error shown);
    with a smaller --rank, the manifest's rel_error is the optimal rank-R
    error of PEFT's result, and the factors achieve it;
  * dare-linear, dare-ties: each adapter's mask is read back from a
    dare-linear run with that adapter alone at weight 1 (kept entries are
    dW_i / density, the others 0; the kept fraction must be close to the
    density); PEFT's dare_linear and dare_ties, given those masks instead
    of torch.bernoulli's, must equal our multi-adapter merges with the same
    seed to float precision (which also shows that an adapter's mask does
    not depend on the other adapters or their weights);
  * the mean of dare-linear over many seeds approaches PEFT's
    task_arithmetic (the plain weighted sum), with the squared error DARE's
    variance predicts;
  * one seed gives byte-identical files, whatever the thread count; two
    seeds give different ones.

Usage:
    python tests/python/merge_methods.py [--bin PATH] [--keep]

The binary defaults to $LORA_MERGE_BIN, else <repo>/target/release/lora-merge.
Prints one line per check and ends with `N passed, M failed`; exits 1 on any
failure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "fixtures"
sys.path.insert(0, str(FIXTURES))

import make_fixtures as mf  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.utils import merge_utils  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

PREFIX = "base_model.model."
ADAPTERS = ["alpha", "beta", "gamma"]
# >= min(fan_out, fan_in) of every module of the tiny Llama (hidden 64):
# the rank-R approximation is the dense result itself.
FULL_RANK = 64
# The output is f32 factors of an f64 SVD: a few f32 roundings of the
# result's largest entries.
REL_TOL = 1e-5
SEED = 7


class Report:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        if ok:
            self.passed += 1
        else:
            self.failed += 1
        word = "PASS" if ok else "FAIL"
        print(f"{word} {name}: {detail}" if detail else f"{word} {name}", flush=True)
        return ok

    def info(self, name: str, detail: str):
        print(f"INFO {name}: {detail}", flush=True)


R = Report()


def fmt(x: float) -> str:
    return f"{x:.2e}"


# ------------------------------------------------------------------ inputs
def input_deltas() -> tuple[dict[str, dict[int, torch.Tensor]], dict]:
    """module -> {adapter index -> dW_i (float64)}, as PEFT computes them."""
    with mf.quiet():
        base = mf.make_base_model()
        model = PeftModel.from_pretrained(base, str(FIXTURES / "adapters" / ADAPTERS[0]), adapter_name="a0")
        for i, name in enumerate(ADAPTERS[1:], 1):
            model.load_adapter(str(FIXTURES / "adapters" / name), adapter_name=f"a{i}")
    # The deltas in float64 from the files' float32 factors, as lora-merge
    # computes them.
    model = model.double()
    deltas: dict[str, dict[int, torch.Tensor]] = {}
    ranks = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        short = name[len(PREFIX):] if name.startswith(PREFIX) else name
        for i in range(len(ADAPTERS)):
            key = f"a{i}"
            if key in mod.lora_A:
                with torch.no_grad():
                    deltas.setdefault(short, {})[i] = mod.get_delta_weight(key)
                ranks.add(mod.lora_A[key].weight.shape[0])
    facts = {
        "ranks": sorted(ranks),
        "rslora": [bool(model.peft_config[f"a{i}"].use_rslora) for i in range(len(ADAPTERS))],
        "sources": sorted({len(v) for v in deltas.values()}),
    }
    return deltas, facts


# -------------------------------------------------------------- lora-merge
class Runner:
    def __init__(self, bin_path: Path, work: Path):
        self.bin = bin_path
        self.work = work
        self.count = 0

    def merge(self, method: str, *flags: str, env: dict | None = None, rank: int = FULL_RANK) -> Path | None:
        self.count += 1
        out = self.work / f"out{self.count:03d}"
        cmd = [
            str(self.bin),
            "uniform",
            "--adapters",
            *[str(FIXTURES / "adapters" / a) for a in ADAPTERS],
            "--method",
            method,
            "--rank",
            str(rank),
            "-o",
            str(out),
            *flags,
        ]
        run_env = dict(os.environ)
        run_env.update(env or {})
        p = subprocess.run(cmd, capture_output=True, text=True, env=run_env)
        if p.returncode != 0:
            R.check(f"run {method} {' '.join(flags)}", False, p.stderr.strip())
            return None
        return out


def out_deltas(out: Path) -> dict[str, torch.Tensor]:
    """module -> B @ A of a written adapter, which has scale 1 everywhere."""
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"], cfg
    assert cfg.get("rank_pattern", {}) == cfg.get("alpha_pattern", {}), cfg
    assert not cfg["use_rslora"], cfg
    sd = load_file(str(out / "adapter_model.safetensors"))
    res = {}
    for k, a in sd.items():
        if k.endswith(".lora_A.weight"):
            mod = k[len(PREFIX) : -len(".lora_A.weight")]
            b = sd[k.replace(".lora_A.", ".lora_B.")]
            res[mod] = b.double() @ a.double()
    return res


def manifest(out: Path) -> dict:
    return json.loads((out / "merge_manifest.json").read_text())


# ---------------------------------------------------------------- expected
def peft_merge(deltas, fn, weights: list[float], **kw) -> dict[str, torch.Tensor]:
    """PEFT's merge_utils function on every module's deltas, with the
    adapters that adapt it and their weights (as _svd_generalized_...)."""
    res = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # prune() warns at density 1
        for mod, per in deltas.items():
            idx = sorted(per)
            w = torch.tensor([weights[i] for i in idx], dtype=torch.float64)
            res[mod] = fn([per[i] for i in idx], w, **kw)
    return res


class FixedMasks:
    """merge_utils.random_pruning replaced by given masks, in call order."""

    def __init__(self, masks: list[torch.Tensor]):
        self.masks = iter(masks)

    def __enter__(self):
        self.orig = merge_utils.random_pruning

        def pruning(tensor, density, rescale):
            out = tensor * next(self.masks)
            return out / density if rescale else out

        merge_utils.random_pruning = pruning
        return self

    def __exit__(self, *exc):
        merge_utils.random_pruning = self.orig


def peft_dare(deltas, masks, fn, weights, **kw) -> dict[str, torch.Tensor]:
    res = {}
    for mod, per in deltas.items():
        idx = sorted(per)
        w = torch.tensor([weights[i] for i in idx], dtype=torch.float64)
        with FixedMasks([masks[(mod, i)] for i in idx]):
            res[mod] = fn([per[i] for i in idx], w, **kw)
    return res


def compare(label: str, got: dict, want: dict) -> None:
    if not R.check(f"{label}/module-set", set(got) == set(want), f"{len(got)} modules"):
        return
    max_abs = 0.0
    max_rel = 0.0
    scale = 0.0
    for mod, w in want.items():
        d = (got[mod] - w).abs().max().item()
        max_abs = max(max_abs, d)
        scale = max(scale, w.abs().max().item())
        nw = torch.linalg.norm(w).item()
        if nw > 0:
            max_rel = max(max_rel, torch.linalg.norm(got[mod] - w).item() / nw)
    R.check(
        f"{label}/vs-peft",
        max_rel <= REL_TOL and max_abs <= REL_TOL * scale,
        f"max abs error {fmt(max_abs)} (largest entry {fmt(scale)}), max rel Frobenius error {fmt(max_rel)}",
    )


# ------------------------------------------------------------------- tests
def test_pruned(run: Runner, deltas) -> None:
    n = len(ADAPTERS)
    cases = [
        ("ties-total", "ties", ["--density", "0.3"], merge_utils.ties, {"density": 0.3, "majority_sign_method": "total"}),
        (
            "ties-frequency-weighted",
            "ties",
            ["--density", "0.5", "--majority-sign", "frequency", "--weights", "0.7", "-0.4", "1.3"],
            merge_utils.ties,
            {"density": 0.5, "majority_sign_method": "frequency"},
        ),
        ("ties-density-1", "ties", ["--density", "1"], merge_utils.ties, {"density": 1.0, "majority_sign_method": "total"}),
        ("magnitude-prune", "magnitude-prune", ["--density", "0.3"], merge_utils.magnitude_prune, {"density": 0.3}),
        (
            "magnitude-prune-weighted",
            "magnitude-prune",
            ["--density", "0.6", "--weights", "0.5", "-1.5", "2"],
            merge_utils.magnitude_prune,
            {"density": 0.6},
        ),
    ]
    for label, method, flags, fn, kw in cases:
        out = run.merge(method, *flags)
        if out is None:
            continue
        man = manifest(out)
        weights = man["weights"]["global"]
        if "--weights" not in flags:
            want_w = [1.0] * n if method == "ties" else [1.0 / n] * n
            R.check(f"{label}/default-weights", weights == want_w, f"{weights}")
        rec = man["method"]
        R.check(
            f"{label}/manifest-method",
            rec["name"] == method
            and rec["density"] == kw["density"]
            and rec.get("majority_sign") == kw.get("majority_sign_method")
            and "seed" not in rec
            and rec["rank"] == FULL_RANK,
            json.dumps(rec),
        )
        compare(label, out_deltas(out), peft_merge(deltas, fn, weights, **kw))
        R.check(
            f"{label}/lossless-rank",
            all(m["rel_error"] == 0.0 for m in man["modules"].values()),
            "rel_error 0 in every module at full rank",
        )

    # A rank below the result's: the optimal rank-R error of PEFT's result.
    r = 8
    out = run.merge("ties", "--density", "0.3", rank=r)
    if out is None:
        return
    man = manifest(out)
    want = peft_merge(deltas, merge_utils.ties, man["weights"]["global"], density=0.3, majority_sign_method="total")
    got = out_deltas(out)
    worst_reported = 0.0
    worst_achieved = 0.0
    for mod, w in want.items():
        s = torch.linalg.svdvals(w)
        optimal = math.sqrt((s[r:] ** 2).sum().item() / (s**2).sum().item())
        rec = man["modules"][mod]
        worst_reported = max(worst_reported, abs(rec["rel_error"] - optimal))
        achieved = (torch.linalg.norm(got[mod] - w) / torch.linalg.norm(w)).item()
        worst_achieved = max(worst_achieved, abs(achieved - optimal))
        if rec["rank"] != min(r, *w.shape):
            R.check("ties-rank-8/ranks", False, f"{mod}: rank {rec['rank']}")
            return
    R.check("ties-rank-8/ranks", True, f"rank {r} everywhere")
    R.check("ties-rank-8/manifest-rel_error", worst_reported < 1e-9, f"max |reported - optimal| {fmt(worst_reported)}")
    R.check("ties-rank-8/optimal", worst_achieved < REL_TOL, f"max |achieved - optimal| {fmt(worst_achieved)}")


def test_dare(run: Runner, deltas) -> None:
    n = len(ADAPTERS)
    density = 0.4
    # Each adapter's mask, alone at weight 1 (the others at 0).
    masks: dict[tuple[str, int], torch.Tensor] = {}
    kept = total = 0
    worst_kept = worst_dropped = 0.0
    for i in range(n):
        weights = ["1" if j == i else "0" for j in range(n)]
        out = run.merge("dare-linear", "--density", str(density), "--seed", str(SEED), "--weights", *weights)
        if out is None:
            return
        got = out_deltas(out)
        for mod, per in deltas.items():
            if i not in per:
                continue
            survivor = per[i] / density
            o = got[mod]
            scale = survivor.abs().max().item()
            mask = (o - survivor).abs() < (o.abs())  # closer to dW/density than to 0
            masks[(mod, i)] = mask.double()
            kept += int(mask.sum().item())
            total += mask.numel()
            worst_kept = max(worst_kept, ((o - survivor).abs() * mask).max().item() / scale)
            worst_dropped = max(worst_dropped, (o.abs() * ~mask).max().item() / scale)
    frac = kept / total
    sigma = math.sqrt(density * (1 - density) / total)
    R.check(
        "dare-masks/kept-fraction",
        abs(frac - density) < 4 * sigma,
        f"{kept} of {total} entries kept: {frac:.4f} vs density {density} (4 sigma = {4 * sigma:.4f})",
    )
    R.check(
        "dare-masks/rescaled",
        worst_kept < REL_TOL and worst_dropped < REL_TOL,
        f"kept entries = dW/density within {fmt(worst_kept)}, dropped entries 0 within {fmt(worst_dropped)} (relative to the largest)",
    )
    three = next(mod for mod, per in deltas.items() if len(per) == 3)
    m0, m1 = masks[(three, 0)], masks[(three, 1)]
    R.check(
        "dare-masks/independent",
        not torch.equal(m0, m1) and 0.3 < (m0 == m1).double().mean().item() < 0.7,
        f"{three}: masks of adapters 0 and 1 agree on {(m0 == m1).double().mean().item():.3f} of entries "
        f"(independent: {density**2 + (1 - density) ** 2:.2f})",
    )

    cases = [
        ("dare-linear", "dare-linear", [], merge_utils.dare_linear, {}),
        (
            "dare-linear-weighted",
            "dare-linear",
            ["--weights", "0.7", "-0.4", "1.3"],
            merge_utils.dare_linear,
            {},
        ),
        ("dare-ties", "dare-ties", [], merge_utils.dare_ties, {"majority_sign_method": "total"}),
        (
            "dare-ties-frequency-weighted",
            "dare-ties",
            ["--majority-sign", "frequency", "--weights", "0.7", "-0.4", "1.3"],
            merge_utils.dare_ties,
            {"majority_sign_method": "frequency"},
        ),
    ]
    for label, method, flags, fn, kw in cases:
        out = run.merge(method, "--density", str(density), "--seed", str(SEED), *flags)
        if out is None:
            continue
        man = manifest(out)
        rec = man["method"]
        R.check(
            f"{label}/manifest-method",
            rec["name"] == method
            and rec["density"] == density
            and rec["seed"] == SEED
            and rec.get("majority_sign") == kw.get("majority_sign_method"),
            json.dumps(rec),
        )
        weights = man["weights"]["global"]
        compare(label, out_deltas(out), peft_dare(deltas, masks, fn, weights, density=density, **kw))

    # The same seed: the same bytes, with 1 thread or 4; another seed: others.
    files = []
    for seed, threads in [(SEED, "1"), (SEED, "4"), (SEED + 1, "4")]:
        out = run.merge(
            "dare-ties",
            "--density",
            str(density),
            "--seed",
            str(seed),
            env={"RAYON_NUM_THREADS": threads},
        )
        if out is None:
            return
        files.append((out / "adapter_model.safetensors").read_bytes())
    R.check("dare-ties/same-seed-same-bytes", files[0] == files[1], "seed 7 with 1 and 4 threads")
    R.check("dare-ties/other-seed-other-bytes", files[0] != files[2], "seeds 7 and 8")


def test_dare_mean(run: Runner, deltas) -> None:
    """Over K seeds, the mean of dare-linear tends to the weighted sum, with
    E||mean - sum||^2 = (1 - d) / (d K) sum_i w_i^2 ||dW_i||^2."""
    density = 0.5
    seeds = 24
    n = len(ADAPTERS)
    weights = [1.0 / n] * n
    want = peft_merge(deltas, merge_utils.task_arithmetic, weights)
    acc = {mod: torch.zeros_like(w) for mod, w in want.items()}
    first_err = None
    for s in range(seeds):
        out = run.merge("dare-linear", "--density", str(density), "--seed", str(100 + s))
        if out is None:
            return
        got = out_deltas(out)
        for mod in acc:
            acc[mod] += got[mod]
        if first_err is None:
            first_err = sum(((got[m] - want[m]) ** 2).sum().item() for m in want)
    measured = sum(((acc[m] / seeds - want[m]) ** 2).sum().item() for m in want)
    var_one = sum(
        sum(weights[i] ** 2 * (d**2).sum().item() for i, d in per.items()) for per in deltas.values()
    ) * (1 - density) / density
    predicted = var_one / seeds
    ratio = measured / predicted
    norm2 = sum((w**2).sum().item() for w in want.values())
    R.info(
        "dare-mean",
        f"relative error of one run {math.sqrt(first_err / norm2):.3f} (predicted {math.sqrt(var_one / norm2):.3f}); "
        f"of the mean of {seeds} runs {math.sqrt(measured / norm2):.4f} (predicted {math.sqrt(predicted / norm2):.4f})",
    )
    R.check(
        "dare-mean/approaches-linear",
        0.8 < ratio < 1.25 and 0.7 < first_err / var_one < 1.4,
        f"squared error of the mean / DARE's predicted variance = {ratio:.3f}; one run: {first_err / var_one:.3f}",
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    bin_path = args.bin or Path(os.environ.get("LORA_MERGE_BIN") or REPO / "target" / "release" / "lora-merge")
    if not bin_path.exists():
        print(f"no binary at {bin_path}", file=sys.stderr)
        return 2
    torch.set_grad_enabled(False)
    work = Path(tempfile.mkdtemp(prefix="lora-merge-methods-"))
    try:
        deltas, facts = input_deltas()
        R.check(
            "setup/inputs",
            len(facts["ranks"]) >= 3 and any(facts["rslora"]) and facts["sources"] == [1, 2, 3],
            f"ranks {facts['ranks']}, rsLoRA {facts['rslora']}, modules merged from {facts['sources']} adapters",
        )
        run = Runner(bin_path, work)
        test_pruned(run, deltas)
        test_dare(run, deltas)
        test_dare_mean(run, deltas)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{R.passed} passed, {R.failed} failed")
    return 0 if R.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
