#!/usr/bin/env python3
"""PEFT interop oracle for `lora-merge uniform`.

Generates the interop fixtures (tiny Llama base + 5 PEFT adapters) in a temp
dir, runs `lora-merge uniform` (exact, weighted exact, svd, linear, dtypes),
and checks every output with PEFT's own code:

  * PeftModel.from_pretrained(base, OUT) loads with no missing / unexpected /
    mismatched LoRA keys, and every LoRA module got exactly the file's tensors;
  * per module, the delta PEFT computes (LoraLayer.get_delta_weight) for the
    output equals sum_i w_i * delta_i of the inputs (each loaded by PEFT):
    exact -> rel. Frobenius error <= 1e-5; svd -> error within 0.1% of the
    optimal rank-R error (float64 SVD of the dense target) and equal to the
    manifest's rel_error; linear -> equal to PEFT's own
    add_weighted_adapter(combination_type="linear");
  * adapter_config.json has use_rslora false;
  * the merged model's logits equal the base model with the summed deltas
    added to its weights by hand.

Usage:
    python tests/python/peft_interop.py [--bin PATH] [--keep] [--workdir DIR]

The binary defaults to $LORA_MERGE_BIN, else <repo>/target/release/lora-merge.
Prints one line per check and ends with `N passed, M failed`; exits 1 on any
failure.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "fixtures"
sys.path.insert(0, str(FIXTURES))

import make_fixtures as mf  # noqa: E402
from loadcheck import capture_warnings, key_problems  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from peft import PeftModel  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

PREFIX = "base_model.model."
EXACT_TOL = 1e-5
SVD_REL_SLACK = 1e-3  # error may exceed the optimum by 0.1% (relative)
SVD_ABS_SLACK = 1e-6  # ... plus this, for modules whose optimum is ~0
MANIFEST_TOL_REL = 1e-3
MANIFEST_TOL_ABS = 1e-5
LOGITS_TOL = 1e-4


# --------------------------------------------------------------------- report
class Report:
    def __init__(self):
        self.passed = 0
        self.failed = 0
        self.failures: list[str] = []

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        if ok:
            self.passed += 1
            print(f"PASS {name}: {detail}" if detail else f"PASS {name}", flush=True)
        else:
            self.failed += 1
            self.failures.append(name)
            print(f"FAIL {name}: {detail}" if detail else f"FAIL {name}", flush=True)
        return ok

    def info(self, name: str, detail: str):
        print(f"INFO {name}: {detail}", flush=True)


R = Report()


# -------------------------------------------------------------------- helpers
def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||_F / ||b||_F (||a||_F when b == 0)."""
    nb = torch.linalg.norm(b).item()
    d = torch.linalg.norm(a - b).item()
    if nb == 0.0:
        return d
    return d / nb


def lora_layers(model, adapter: str) -> dict:
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and adapter in mod.lora_A:
            out[name[len(PREFIX):] if name.startswith(PREFIX) else name] = mod
    return out


def deltas_of(model, adapter: str) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {m: l.get_delta_weight(adapter).double() for m, l in lora_layers(model, adapter).items()}


def ranks_of(model, adapter: str) -> dict[str, int]:
    return {m: l.lora_A[adapter].weight.shape[0] for m, l in lora_layers(model, adapter).items()}


def fmt(x: float) -> str:
    return f"{x:.2e}"


class Env:
    def __init__(self, bin_path: Path, work: Path):
        self.bin = bin_path
        self.work = work
        self.fx = work / "fixtures"
        self.base_dir = self.fx / "base"
        self.adapters = {n: self.fx / "adapters" / n for n in mf.INTEROP_ADAPTERS}
        self._base = None

    def base(self):
        """A fresh copy of the tiny base model (float32, eval)."""
        if self._base is None:
            with capture_warnings():
                self._base = LlamaForCausalLM.from_pretrained(str(self.base_dir), dtype=torch.float32).eval()
        return copy.deepcopy(self._base)


# ----------------------------------------------------------------- the tests
def check_inputs(env: Env):
    """Load every input with PEFT into one model; collect deltas and ranks."""
    names = list(env.adapters)
    with capture_warnings() as msgs:
        pm = PeftModel.from_pretrained(env.base(), str(env.adapters[names[0]]), adapter_name=names[0])
        for n in names[1:]:
            res = pm.load_adapter(str(env.adapters[n]), adapter_name=n)
            R.check(f"inputs/{n}/load", not res.missing_keys and not res.unexpected_keys,
                    f"missing={res.missing_keys[:3]} unexpected={res.unexpected_keys[:3]}")
    probs = key_problems(msgs)
    R.check("inputs/load-warnings", not probs, "; ".join(probs[:3]) or "none")
    pm.eval()
    deltas = {n: deltas_of(pm, n) for n in names}
    ranks = {n: ranks_of(pm, n) for n in names}

    # Sanity of the fixtures (and a record of how PEFT resolves them).
    east = lora_layers(pm, "east")["model.layers.0.self_attn.q_proj"]
    R.check("fixture/rslora-scale", abs(east.scaling["east"] - 16 / math.sqrt(8)) < 1e-12,
            f"east scaling {east.scaling['east']:.6f} == 16/sqrt(8)")
    south = lora_layers(pm, "south")
    got = (ranks["south"]["model.layers.1.mlp.down_proj"], ranks["south"]["model.layers.0.self_attn.k_proj"],
           ranks["south"]["model.layers.0.mlp.down_proj"],
           south["model.layers.0.self_attn.q_proj"].scaling["south"],
           south["model.layers.1.self_attn.q_proj"].scaling["south"],
           south["model.layers.0.mlp.up_proj"].scaling["south"])
    want = (2, 3, 6, 20 / 6, 12 / 6, 5 / 6)
    R.check("fixture/rank+alpha-pattern", all(abs(a - b) < 1e-12 for a, b in zip(got, want)),
            f"(down1 r, k0 r, down0 r, q0 s, q1 s, up0 s) = {tuple(round(x, 4) for x in got)}")
    for n in names:
        R.check(f"fixture/{n}/nonzero", all(torch.linalg.norm(d).item() > 0 for d in deltas[n].values()),
                f"{len(deltas[n])} modules")
    return pm, deltas, ranks


def run_tool(env: Env, label: str, args: list[str], hint: str = "") -> tuple[bool, Path, str]:
    out = env.work / "out" / label
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(env.bin), "uniform", *args, "-o", str(out), "--force", "--json"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    shown = " ".join(a if not a.startswith(str(env.work)) else Path(a).name for a in cmd[1:])
    ok = R.check(f"{label}/run", p.returncode == 0,
                 f"rc={p.returncode} in {dt:.2f}s: lora-merge {shown}"
                 + ("" if p.returncode == 0 else f"\n    stderr: {p.stderr.strip()[-1500:]}"
                    + (f"\n    note: {hint}" if hint else "")))
    if ok:
        files = ["adapter_model.safetensors", "adapter_config.json", "README.md", "merge_manifest.json"]
        missing = [f for f in files if not (out / f).is_file()]
        ok = R.check(f"{label}/files", not missing, f"missing {missing}" if missing else "all 4 present")
        if p.stdout.strip():
            try:
                json.loads(p.stdout)
            except ValueError:
                R.info(f"{label}/json", "--json stdout is not a single JSON document")
    return ok, out, p.stdout


def load_output(env: Env, label: str, out: Path, expect_dtype: torch.dtype = torch.float32):
    """Load OUT with PEFT; check keys, values, config. Return (model, deltas, ranks) or None."""
    cfg = json.loads((out / "adapter_config.json").read_text())
    R.check(f"{label}/config", cfg.get("use_rslora") is False and cfg.get("peft_type") == "LORA"
            and cfg.get("base_model_name_or_path") == mf.BASE_NAME,
            f"use_rslora={cfg.get('use_rslora')!r} peft_type={cfg.get('peft_type')!r} "
            f"base={cfg.get('base_model_name_or_path')!r} r={cfg.get('r')} alpha={cfg.get('lora_alpha')} "
            f"rank_pattern={len(cfg.get('rank_pattern') or {})} alpha_pattern={len(cfg.get('alpha_pattern') or {})}")

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        file_sd = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata() or {}
    R.check(f"{label}/st-metadata", meta.get("format") == "pt", f"metadata={meta}")
    dtypes = sorted({str(t.dtype) for t in file_sd.values()})
    R.check(f"{label}/dtype", dtypes == [str(expect_dtype)], f"file dtypes {dtypes}")

    try:
        with capture_warnings() as msgs:
            pm = PeftModel.from_pretrained(env.base(), str(out), adapter_name="merged")
    except Exception as e:  # noqa: BLE001
        R.check(f"{label}/peft-load", False, f"{type(e).__name__}: {str(e)[:1500]}")
        return None
    probs = key_problems(msgs)
    R.check(f"{label}/peft-load", not probs,
            ("warnings: " + " | ".join(p[:300] for p in probs[:3])) if probs else
            f"PeftModel.from_pretrained ok ({len(msgs)} other warnings)")
    for m in msgs:
        if m not in probs and "deprecated" not in m:
            R.info(f"{label}/peft-load", m[:300])
    pm.eval()

    # every LoRA module got its file tensors, and every file tensor was used
    layers = lora_layers(pm, "merged")
    expected = {}
    for m, l in layers.items():
        expected[f"{PREFIX}{m}.lora_A.weight"] = l.lora_A["merged"].weight
        expected[f"{PREFIX}{m}.lora_B.weight"] = l.lora_B["merged"].weight
    missing = sorted(set(expected) - set(file_sd))
    unexpected = sorted(set(file_sd) - set(expected))
    wrong = [k for k in expected if k in file_sd and not torch.equal(expected[k].detach().to(file_sd[k].dtype), file_sd[k])]
    R.check(f"{label}/keys", not missing and not unexpected and not wrong,
            f"{len(layers)} modules, {len(file_sd)} tensors; missing={missing[:3]} unexpected={unexpected[:3]} "
            f"value-mismatch={wrong[:3]}")

    # second route: load_adapter's own result
    with capture_warnings():
        res = pm.load_adapter(str(out), adapter_name="merged2")
    R.check(f"{label}/load-result", not res.missing_keys and not res.unexpected_keys,
            f"missing={res.missing_keys[:3]} unexpected={res.unexpected_keys[:3]}")
    pm.delete_adapter("merged2")
    pm.set_adapter("merged")
    return pm, deltas_of(pm, "merged"), ranks_of(pm, "merged"), cfg


def target_sum(deltas, names, weights):
    mods = sorted({m for n in names for m in deltas[n]})
    tgt = {}
    for m in mods:
        acc = None
        for n, w in zip(names, weights):
            if m in deltas[n]:
                acc = w * deltas[n][m] if acc is None else acc + w * deltas[n][m]
        tgt[m] = acc
    return tgt


def check_modules(label, out_d, tgt):
    missing = sorted(set(tgt) - set(out_d))
    extra = sorted(set(out_d) - set(tgt))
    extra_nonzero = [m for m in extra if torch.linalg.norm(out_d[m]).item() > 0]
    return R.check(f"{label}/module-set", not missing and not extra_nonzero,
                   f"{len(out_d)} modules in output, {len(tgt)} in target; missing={missing[:3]} "
                   f"extra-nonzero={extra_nonzero[:3]}")


def manifest_modules(out: Path) -> dict:
    man = json.loads((out / "merge_manifest.json").read_text())
    mods = man.get("modules") or {}
    norm = {}
    for k, v in mods.items():
        kk = k[len(PREFIX):] if k.startswith(PREFIX) else k
        norm[kk] = v
    return norm


def check_exact(label, out, out_d, out_r, tgt, in_ranks, names, tol=EXACT_TOL):
    if not check_modules(label, out_d, tgt):
        return
    errs = {m: rel(out_d[m], tgt[m]) for m in tgt}
    worst = max(errs, key=errs.get)
    R.check(f"{label}/deltas", errs[worst] <= tol,
            f"max rel err {fmt(errs[worst])} ({worst}) over {len(errs)} modules, tol {fmt(tol)}")
    want_r = {m: sum(in_ranks[n][m] for n in names if m in in_ranks[n]) for m in tgt}
    bad = [(m, out_r[m], want_r[m]) for m in tgt if out_r[m] != want_r[m]]
    R.check(f"{label}/ranks", not bad, "rank = sum of input ranks per module" if not bad else f"(module, got, want) {bad[:3]}")
    man = manifest_modules(out)
    missing = [m for m in tgt if m not in man]
    if missing:
        R.check(f"{label}/manifest", False, f"modules missing from manifest: {missing[:3]} (have {list(man)[:2]})")
        return
    bad = [(m, man[m].get("rank"), man[m].get("rel_error")) for m in tgt
           if man[m].get("rank") != out_r[m] or not (abs(man[m].get("rel_error", 1.0)) <= 1e-5)]
    R.check(f"{label}/manifest", not bad, "rank matches, rel_error ~0" if not bad else f"(module, rank, rel_error) {bad[:3]}")


def check_svd(label, out, out_d, out_r, tgt, rank):
    if not check_modules(label, out_d, tgt):
        return
    man = manifest_modules(out)
    worst_gap, worst_mod, bad, bad_man, bad_rank, bad_energy = -1.0, None, [], [], [], []
    for m, t in tgt.items():
        s = torch.linalg.svdvals(t)
        tn = torch.linalg.norm(t).item()
        tail = s[rank:].pow(2).sum().sqrt().item()
        opt = tail / tn
        err = rel(out_d[m], t)
        gap = err - opt
        if gap > worst_gap:
            worst_gap, worst_mod = gap, (m, err, opt)
        if not (err <= opt * (1 + SVD_REL_SLACK) + SVD_ABS_SLACK and err >= opt * (1 - SVD_REL_SLACK) - SVD_ABS_SLACK):
            bad.append((m, fmt(err), fmt(opt)))
        if out_r[m] > rank:
            bad_rank.append((m, out_r[m]))
        mm = man.get(m)
        if mm is None or abs(mm.get("rel_error", float("nan")) - err) > MANIFEST_TOL_REL * err + MANIFEST_TOL_ABS:
            bad_man.append((m, None if mm is None else mm.get("rel_error"), fmt(err)))
        if mm is not None and "energy" in mm:
            energy = 1.0 - opt * opt  # retained fraction of ||T||_F^2
            if abs(mm["energy"] - energy) > 1e-4:
                bad_energy.append((m, mm["energy"], round(energy, 6)))
    m, err, opt = worst_mod
    R.check(f"{label}/optimal", not bad,
            f"{len(tgt)} modules; worst: {m} err {fmt(err)} vs optimal {fmt(opt)}" if not bad else f"(module, err, optimal) {bad[:3]}")
    R.check(f"{label}/ranks", not bad_rank, f"all <= {rank}" if not bad_rank else f"{bad_rank[:3]}")
    R.check(f"{label}/manifest-rel_error", not bad_man,
            "manifest rel_error == measured error" if not bad_man else f"(module, manifest, measured) {bad_man[:3]}")
    if bad_energy:
        R.info(f"{label}/manifest-energy", f"energy != 1 - opt_err^2 for {len(bad_energy)} modules, e.g. {bad_energy[:2]}")


def check_auto(label, out, out_d, out_r, tgt, cfg, energy=None, tol=None, max_rank=None):
    """--rank auto: each module's rank (as PEFT loaded it, from rank_pattern) is the
    smallest meeting the target (at most max_rank), and its error is the optimum for
    that rank, as the manifest says."""
    if not check_modules(label, out_d, tgt):
        return
    man = manifest_modules(out)
    need = energy if energy is not None else 1.0 - tol * tol
    bad_rank, bad_err, bad_man, ranks = [], [], [], set()
    for m, t in tgt.items():
        s2 = torch.linalg.svdvals(t).pow(2)
        total = s2.sum().item()
        cum = torch.cumsum(s2, 0) / total
        # smallest r with cum[r-1] >= need; where the spectrum sits within 1e-5 of the
        # target at the boundary, either neighbour is right to rounding.
        want = int((cum < need - 1e-12).sum().item()) + 1
        ok_r = {want}
        if want - 2 >= 0 and abs(cum[want - 2].item() - need) < 1e-5:
            ok_r.add(want - 1)
        if want - 1 < len(cum) and abs(cum[want - 1].item() - need) < 1e-5:
            ok_r.add(want + 1)
        if max_rank is not None:
            ok_r = {min(r, max_rank) for r in ok_r}
        r = out_r[m]
        ranks.add(r)
        if r not in ok_r:
            bad_rank.append((m, r, sorted(ok_r)))
        opt = math.sqrt(max(0.0, total - s2[:r].sum().item()) / total)
        err = rel(out_d[m], t)
        if not (err <= opt * (1 + SVD_REL_SLACK) + SVD_ABS_SLACK and err >= opt * (1 - SVD_REL_SLACK) - SVD_ABS_SLACK):
            bad_err.append((m, fmt(err), fmt(opt)))
        mm = man.get(m)
        if mm is None or mm.get("rank") != r or abs(mm.get("rel_error", float("nan")) - err) > MANIFEST_TOL_REL * err + MANIFEST_TOL_ABS:
            bad_man.append((m, None if mm is None else (mm.get("rank"), mm.get("rel_error")), r, fmt(err)))
    R.check(f"{label}/auto-ranks", not bad_rank and len(ranks) > 1,
            f"{len(tgt)} modules, ranks {sorted(ranks)}, rank_pattern {len(cfg.get('rank_pattern') or {})}"
            if not bad_rank and len(ranks) > 1 else f"(module, ours, smallest meeting the target) {bad_rank[:3]}; ranks {sorted(ranks)}")
    R.check(f"{label}/optimal", not bad_err,
            "error = optimum at each module's rank" if not bad_err else f"(module, err, optimal) {bad_err[:3]}")
    R.check(f"{label}/manifest-rel_error", not bad_man,
            "manifest rank and rel_error == measured" if not bad_man else f"{bad_man[:3]}")


def check_forward(env: Env, label, pm, tgt):
    """Merged model logits == base weights + summed deltas added by hand."""
    torch.manual_seed(0)
    ids = torch.randint(0, mf.TINY_LLAMA["vocab_size"], (2, 12))
    ref = env.base()
    with torch.no_grad():
        mods = dict(ref.named_modules())
        for m, t in tgt.items():
            w = mods[m].weight
            w.copy_((w.double() + t).to(w.dtype))
        want = ref(ids).logits.double()
        got = pm(input_ids=ids).logits.double()
    e = rel(got, want)
    R.check(f"{label}/forward", e <= LOGITS_TOL, f"logits rel err {fmt(e)} (tol {fmt(LOGITS_TOL)})")


def peft_combo(pm, names, weights, combo, new_name, **kw):
    with capture_warnings():
        pm.add_weighted_adapter(names, weights, new_name, combination_type=combo, **kw)
    layers = lora_layers(pm, new_name)
    with torch.no_grad():
        d = {m: l.get_delta_weight(new_name).double() for m, l in layers.items()}
        # the factors alone (PEFT intends scale 1: r == lora_alpha for the new adapter)
        ba = {m: (l.lora_B[new_name].weight @ l.lora_A[new_name].weight).double() for m, l in layers.items()}
    scal = sorted({round(l.scaling[new_name], 6) for l in layers.values()})
    return d, ba, scal, pm.peft_config[new_name]


# ------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bin_pos", nargs="?", help="lora-merge binary (same as --bin)")
    ap.add_argument("--bin", help="lora-merge binary (default $LORA_MERGE_BIN or <repo>/target/release/lora-merge)")
    ap.add_argument("--workdir", type=Path, help="use this directory instead of a temp dir (kept)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args(argv)

    bin_path = Path(args.bin or args.bin_pos or os.environ.get("LORA_MERGE_BIN") or REPO / "target/release/lora-merge")
    bin_path = bin_path.resolve()
    if not bin_path.is_file() or not os.access(bin_path, os.X_OK):
        print(f"FAIL setup: lora-merge binary not found or not executable: {bin_path}")
        print("0 passed, 1 failed")
        return 1

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    t_start = time.perf_counter()

    if args.workdir:
        work = args.workdir.resolve()
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="lora-merge-interop-"))
    try:
        p = subprocess.run([sys.executable, str(FIXTURES / "make_fixtures.py"), "--out", str(work / "fixtures"),
                            "--interop", "-q"], capture_output=True, text=True)
        if not R.check("setup/fixtures", p.returncode == 0, p.stderr.strip()[-1000:] or "base + 5 adapters"):
            print(f"{R.passed} passed, {R.failed} failed")
            return 1
        env = Env(bin_path, work)
        names = list(env.adapters)
        paths = [str(env.adapters[n]) for n in names]
        pm_in, deltas, in_ranks = check_inputs(env)

        # ---- exact, default weights (1/N)
        w_def = [1.0 / len(names)] * len(names)
        w_exp = [0.5, -0.3, 1.2, 0.25, 0.7]
        runs = [
            ("exact-default", ["--adapters", *paths], names, w_def, "exact", None),
            ("exact-weighted", ["--adapters", *paths, "--weights", *map(repr, w_exp)], names, w_exp, "exact", None),
            ("exact-method-flag", ["--adapters", *paths, "--method", "exact"], names, w_def, "exact", None),
            ("svd-r4", ["--adapters", *paths, "--method", "svd", "--rank", "4"], names, w_def, "svd", 4),
            ("svd-r4-weighted", ["--adapters", *paths, "--method", "svd", "--rank", "4", "--weights", *map(repr, w_exp)],
             names, w_exp, "svd", 4),
            ("svd-r12", ["--adapters", *paths, "--method", "svd", "--rank", "12"], names, w_def, "svd", 12),
            ("svd-auto-energy", ["--adapters", *paths, "--method", "svd", "--rank", "auto", "--energy", "0.9"],
             names, w_def, "auto", {"energy": 0.9}),
            ("svd-auto-tolerance", ["--adapters", *paths, "--method", "svd", "--rank", "auto", "--tolerance", "0.2",
                                    "--max-rank", "6", "--weights", *map(repr, w_exp)],
             names, w_exp, "auto", {"tol": 0.2, "max_rank": 6}),
        ]
        exact_outputs = {}
        for label, cli, ns, ws, method, rank in runs:
            ok, out, _ = run_tool(env, label, cli)
            if not ok:
                continue
            loaded = load_output(env, label, out)
            if loaded is None:
                continue
            pm, out_d, out_r, cfg = loaded
            tgt = target_sum(deltas, ns, ws)
            if method == "exact":
                check_exact(label, out, out_d, out_r, tgt, in_ranks, ns)
                check_forward(env, label, pm, tgt)
                exact_outputs[label] = out_d
            elif method == "auto":
                check_auto(label, out, out_d, out_r, tgt, cfg, **rank)
            else:
                check_svd(label, out, out_d, out_r, tgt, rank)
            del pm

        # ---- dtypes (exact): reloaded deltas within the dtype's precision
        for dt, tdt, tol in (("f16", torch.float16, 2e-3), ("bf16", torch.bfloat16, 1.5e-2)):
            label = f"exact-{dt}"
            ok, out, _ = run_tool(env, label, ["--adapters", *paths, "--dtype", dt])
            if ok:
                loaded = load_output(env, label, out, expect_dtype=tdt)
                if loaded is not None:
                    pm, out_d, out_r, cfg = loaded
                    tgt = target_sum(deltas, names, w_def)
                    if check_modules(label, out_d, tgt):
                        errs = {m: rel(out_d[m], tgt[m]) for m in tgt}
                        worst = max(errs, key=errs.get)
                        R.check(f"{label}/deltas", errs[worst] <= tol,
                                f"max rel err {fmt(errs[worst])} ({worst}), tol {fmt(tol)}")

        # ---- PEFT's own cat / svd against the same targets (for the record)
        tgt_def = target_sum(deltas, names, w_def)
        cat_d, cat_ba, cat_s, _ = peft_combo(pm_in, names, w_def, "cat", "peft_cat")
        e_cat = max(rel(cat_d[m], tgt_def[m]) for m in tgt_def)
        R.check("peft-cat/vs-target", e_cat <= EXACT_TOL,
                f"PEFT add_weighted_adapter cat: max rel err vs sum w_i delta_i {fmt(e_cat)} (scaling {cat_s})")
        if "exact-default" in exact_outputs:
            e = max(rel(exact_outputs["exact-default"][m], cat_d[m]) for m in tgt_def)
            R.check("exact-default/vs-peft-cat", e <= EXACT_TOL, f"max rel diff lora-merge exact vs PEFT cat {fmt(e)}")
        svd_d, _, svd_s, _ = peft_combo(pm_in, names, w_def, "svd", "peft_svd", svd_rank=4)
        gaps = []
        for m, t in tgt_def.items():
            s = torch.linalg.svdvals(t)
            opt = s[4:].pow(2).sum().sqrt().item() / torch.linalg.norm(t).item()
            gaps.append((rel(svd_d[m], t) - opt, m))
        g, m = max(gaps)
        R.info("peft-svd", f"PEFT svd rank 4: worst excess over optimal error {fmt(g)} ({m}); scaling {svd_s}")

        # ---- linear on the equal-rank subset, vs PEFT add_weighted_adapter("linear")
        sub = list(mf.INTEROP_LINEAR_SUBSET)
        sub_paths = [str(env.adapters[n]) for n in sub]
        neg_hint = ("PEFT's add_weighted_adapter 'linear' accepts negative weights: it uses "
                    "sign(w*s)*sqrt(|w*s|) on A and sqrt(|w*s|) on B")
        for label, ws, extra in (
            ("linear-default", [1.0 / len(sub)] * len(sub), []),
            ("linear-weighted", [0.6, -0.4, 1.1], ["--weights", "0.6", "-0.4", "1.1"]),
        ):
            peft_d, peft_ba, peft_s, peft_cfg = peft_combo(pm_in, sub, ws, "linear", f"peft_{label}")
            if peft_s != [1.0]:
                R.info(label, f"PEFT's merged adapter has scaling {peft_s} (use_rslora={peft_cfg.use_rslora}); "
                              "comparing against its factors B'A' (intended scale 1)")
            ok, out, _ = run_tool(env, label, ["--adapters", *sub_paths, "--method", "linear", *extra],
                                  hint=neg_hint if any(w < 0 for w in ws) else "")
            if not ok:
                continue
            loaded = load_output(env, label, out)
            if loaded is None:
                continue
            pm, out_d, out_r, cfg = loaded
            tgt = target_sum(deltas, sub, ws)
            if not check_modules(label, out_d, tgt):
                continue
            errs = {m: rel(out_d[m], peft_ba[m]) for m in tgt}
            worst = max(errs, key=errs.get)
            R.check(f"{label}/vs-peft-linear", errs[worst] <= EXACT_TOL,
                    f"max rel diff vs PEFT linear {fmt(errs[worst])} ({worst}) over {len(errs)} modules")
            dev = max(rel(out_d[m], tgt[m]) for m in tgt)
            R.info(label, f"linear vs exact weighted sum (cross terms): max rel err {dev:.3f}")
            bad_r = [m for m in tgt if out_r[m] != 4]
            R.check(f"{label}/ranks", not bad_r, "all rank 4" if not bad_r else f"{bad_r[:3]}")

        # ---- the committed demo fixtures, merged exactly (same base: same config + seed)
        demo = FIXTURES / "adapters"
        if demo.is_dir():
            dnames = sorted(p.name for p in demo.iterdir() if (p / "adapter_config.json").is_file())
            with capture_warnings():
                dpm = PeftModel.from_pretrained(env.base(), str(demo / dnames[0]), adapter_name=dnames[0])
                for n in dnames[1:]:
                    dpm.load_adapter(str(demo / n), adapter_name=n)
            ddeltas = {n: deltas_of(dpm, n) for n in dnames}
            dranks = {n: ranks_of(dpm, n) for n in dnames}
            label = "demo-exact"
            ok, out, _ = run_tool(env, label, ["--adapters", *[str(demo / n) for n in dnames]])
            if ok:
                loaded = load_output(env, label, out)
                if loaded is not None:
                    pm, out_d, out_r, cfg = loaded
                    tgt = target_sum(ddeltas, dnames, [1.0 / len(dnames)] * len(dnames))
                    check_exact(label, out, out_d, out_r, tgt, dranks, dnames)
                    check_forward(env, label, pm, tgt)
    except Exception as e:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        R.check("harness", False, f"unexpected {type(e).__name__}: {e}")
    finally:
        if args.workdir or args.keep:
            print(f"(work dir kept: {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)

    print(f"({time.perf_counter() - t_start:.1f}s)")
    if R.failures:
        print("failed: " + ", ".join(R.failures))
    print(f"{R.passed} passed, {R.failed} failed")
    return 1 if R.failed else 0


if __name__ == "__main__":
    sys.exit(main())
