#!/usr/bin/env python3
"""Benchmark: `lora-merge uniform` vs PEFT `add_weighted_adapter`.

Builds N synthetic PEFT LoRA adapters for a Llama-shaped model (every linear
layer targeted: q, k, v, o, gate, up, down), written directly with
safetensors, then for each N measures, each run in a fresh subprocess:

  lora-merge exact   vs  PEFT combination_type="cat"   (both lossless)
  lora-merge svd -R  vs  PEFT combination_type="svd", svd_rank=R

Columns: merge time alone (lora-merge: `timings.merge_s` from --json; PEFT:
the add_weighted_adapter call), end to end (whole process: lora-merge reads,
merges, writes; PEFT imports, loads the base model from disk, loads N
adapters with load_adapter, merges, saves), and peak RSS of the process
(os.wait4 rusage of that child; this driver process never imports torch, so
the child's ru_maxrss is not inflated by a big parent at fork time).

Usage:
    python tests/bench/merge_bench.py [--bin PATH] [--ns 4,16,64] [--quick]

The binary defaults to $LORA_MERGE_BIN, else <repo>/target/release/lora-merge.
The Markdown table goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BASE_NAME = "lora-merge/bench-llama"

FULL = dict(hidden=1024, intermediate=2816, layers=2, heads=16, kv_heads=16, vocab=4096, rank=16, alpha=32,
            svd_rank=32, ns="4,16,64")
QUICK = dict(hidden=128, intermediate=352, layers=2, heads=4, kv_heads=4, vocab=512, rank=8, alpha=16,
             svd_rank=8, ns="2,4")
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ fixtures
def module_shapes(s: dict) -> dict[str, tuple[int, int]]:
    """module path -> (fan_out, fan_in) for every targeted linear layer."""
    h, i = s["hidden"], s["intermediate"]
    kv = s["kv_heads"] * (h // s["heads"])
    per = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
           "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    return {f"model.layers.{l}.{k}": v for l in range(s["layers"]) for k, v in per.items()}


def write_adapters(s: dict, n: int, root: Path) -> list[Path]:
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    shapes = module_shapes(s)
    r = s["rank"]
    paths = []
    for k in range(n):
        d = root / f"a{k:03d}"
        paths.append(d)
        if (d / "adapter_model.safetensors").is_file():
            continue
        d.mkdir(parents=True, exist_ok=True)
        sd = {}
        for m, (fo, fi) in shapes.items():
            g = torch.Generator().manual_seed(zlib.crc32(f"{k}/{m}".encode()))
            sd[f"base_model.model.{m}.lora_A.weight"] = torch.randn(r, fi, generator=g) / fi**0.5
            sd[f"base_model.model.{m}.lora_B.weight"] = torch.randn(fo, r, generator=g) * 0.02
        save_file(sd, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
        cfg = LoraConfig(r=r, lora_alpha=s["alpha"], target_modules=list(MODULES), lora_dropout=0.0, bias="none",
                         task_type="CAUSAL_LM", base_model_name_or_path=BASE_NAME)
        cfg.save_pretrained(str(d))
    return paths


def write_base(s: dict, dest: Path):
    if (dest / "config.json").is_file():
        return
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                      num_key_value_heads=s["kv_heads"], max_position_embeddings=256, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(str(dest), safe_serialization=True)


# ------------------------------------------------------------- PEFT worker
def peft_worker(args) -> int:
    """Runs inside the measured subprocess: load, merge, save; print timings."""
    import warnings

    warnings.simplefilter("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    transformers.logging.set_verbosity_error()
    t0 = time.perf_counter()
    base = LlamaForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    names = [f"a{k}" for k in range(len(args.adapters))]
    pm = PeftModel.from_pretrained(base, args.adapters[0], adapter_name=names[0])
    for name, path in zip(names[1:], args.adapters[1:]):
        pm.load_adapter(path, adapter_name=name)
    t1 = time.perf_counter()
    kw = {"svd_rank": args.svd_rank} if args.combo == "svd" else {}
    with torch.no_grad():
        pm.add_weighted_adapter(names, [1.0 / len(names)] * len(names), "merged", combination_type=args.combo, **kw)
    t2 = time.perf_counter()
    pm.save_pretrained(args.out, selected_adapters=["merged"])
    t3 = time.perf_counter()
    print(json.dumps({"load_s": t1 - t0, "merge_s": t2 - t1, "save_s": t3 - t2, "rank": pm.peft_config["merged"].r}))
    return 0


# ---------------------------------------------------------------- measuring
def measure(cmd: list[str], timeout: float, log_path: Path) -> dict:
    """Run cmd in a fresh child; wall time, peak RSS (wait4 rusage) and stdout."""
    with open(log_path.with_suffix(".out"), "w") as out, open(log_path.with_suffix(".err"), "w") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err)
        status, ru = None, None
        while True:
            pid, st, rus = os.wait4(p.pid, os.WNOHANG)
            if pid == p.pid:
                status, ru = st, rus
                break
            if time.perf_counter() - t0 > timeout:
                p.kill()
                _, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    timed_out = wall > timeout
    stdout = log_path.with_suffix(".out").read_text()
    return {"rc": p.returncode, "wall_s": wall, "rss_mib": ru.ru_maxrss / 1024.0, "stdout": stdout,
            "stderr": log_path.with_suffix(".err").read_text()[-2000:], "timed_out": timed_out}


def parse_json(text: str) -> dict | None:
    text = text.strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        pass
    for line in reversed(text.splitlines()):
        try:
            v = json.loads(line)
            if isinstance(v, dict):
                return v
        except ValueError:
            continue
    return None


def find(d, key):
    """First value under `key` anywhere in a nested JSON dict."""
    if isinstance(d, dict):
        if key in d:
            return d[key]
        for v in d.values():
            r = find(v, key)
            if r is not None:
                return r
    return None


def out_rank(out: Path) -> str:
    cfgs = list(out.rglob("adapter_config.json"))
    if not cfgs:
        return "?"
    c = json.loads(cfgs[0].read_text())
    ranks = {c.get("r")} | set((c.get("rank_pattern") or {}).values())
    return "/".join(str(x) for x in sorted(r for r in ranks if r is not None))


def fmt_s(x) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


# --------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", help="lora-merge binary (default $LORA_MERGE_BIN or <repo>/target/release/lora-merge)")
    ap.add_argument("--ns", help="comma-separated adapter counts (default 4,16,64; quick: 2,4)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    ap.add_argument("--svd-rank", type=int, help="rank for the svd runs (default 32; quick: 8)")
    ap.add_argument("--layers", type=int, help="override the number of layers (default 2; quick: 2)")
    ap.add_argument("--hidden", type=int, help="override hidden size (default 1024)")
    ap.add_argument("--intermediate", type=int, help="override intermediate size (default 2816)")
    ap.add_argument("--rank", type=int, help="override the adapters' rank (default 16)")
    ap.add_argument("--workdir", type=Path, help="keep adapters/outputs here (reused between runs)")
    ap.add_argument("--timeout", type=float, default=900.0, help="per measured run, seconds")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--skip-lora-merge", action="store_true")
    # hidden: PEFT worker mode
    ap.add_argument("--_peft-worker", dest="peft_worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_generate", dest="generate", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--combo", help=argparse.SUPPRESS)
    ap.add_argument("--adapters", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.peft_worker:
        return peft_worker(args)
    if args.generate:
        spec, n, adir, bdir = args.generate
        spec = json.loads(spec)
        write_adapters(spec, int(n), Path(adir))
        if bdir:
            write_base(spec, Path(bdir))
        import peft
        import torch
        import transformers

        print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                          "peft": peft.__version__}))
        return 0

    s = dict(QUICK if args.quick else FULL)
    for k in ("layers", "hidden", "intermediate", "rank"):
        if getattr(args, k):
            s[k] = getattr(args, k)
    if args.rank:
        s["alpha"] = 2 * args.rank
    ns = [int(x) for x in (args.ns or s["ns"]).split(",") if x.strip()]
    svd_rank = args.svd_rank or s["svd_rank"]
    bin_path = Path(args.bin or os.environ.get("LORA_MERGE_BIN") or REPO / "target/release/lora-merge").resolve()
    have_bin = bin_path.is_file() and os.access(bin_path, os.X_OK)
    if not have_bin and not args.skip_lora_merge:
        log(f"warning: lora-merge binary not found ({bin_path}); lora-merge rows will be skipped")

    work = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="lora-merge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        tag = "{hidden}x{intermediate}x{layers}-h{heads}-kv{kv_heads}-v{vocab}-r{rank}-a{alpha}".format(**s)
        t0 = time.perf_counter()
        log(f"generating {max(ns)} adapters + base model ({tag} sizes) ...")
        # Generate in a child so this process never imports torch: a child
        # forked from a big parent inherits its RSS into ru_maxrss.
        gen = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_generate", json.dumps(s),
                              str(max(ns)), str(work / f"adapters-{tag}"),
                              "" if args.skip_peft else str(work / f"base-{tag}")],
                             capture_output=True, text=True)
        if gen.returncode != 0:
            log(gen.stderr[-3000:])
            return 2
        versions = json.loads(gen.stdout.strip().splitlines()[-1])
        adapters = [work / f"adapters-{tag}" / f"a{k:03d}" for k in range(max(ns))]
        log(f"  done in {time.perf_counter() - t0:.1f}s")

        rows = []
        for n in ns:
            paths = [str(p) for p in adapters[:n]]
            plan = []
            if have_bin and not args.skip_lora_merge:
                plan.append(("lora-merge", "exact", [str(bin_path), "uniform", "--adapters", *paths]))
            if not args.skip_peft:
                plan.append(("PEFT", "cat", [sys.executable, str(Path(__file__).resolve()), "--_peft-worker",
                                             "--base", str(work / f"base-{tag}"), "--combo", "cat", "--adapters", *paths]))
            if have_bin and not args.skip_lora_merge:
                plan.append(("lora-merge", f"svd r={svd_rank}", [str(bin_path), "uniform", "--adapters", *paths,
                                                                 "--method", "svd", "--rank", str(svd_rank)]))
            if not args.skip_peft:
                plan.append(("PEFT", f"svd r={svd_rank}", [sys.executable, str(Path(__file__).resolve()),
                                                           "--_peft-worker", "--base", str(work / f"base-{tag}"),
                                                           "--combo", "svd", "--svd-rank", str(svd_rank),
                                                           "--adapters", *paths]))
            for tool, method, cmd in plan:
                label = f"n{n}-{tool}-{method.split()[0]}"
                out = work / "out" / label
                if out.exists():
                    shutil.rmtree(out)
                if tool == "lora-merge":
                    cmd = cmd + ["-o", str(out), "--force", "--json"]
                else:
                    cmd = cmd + ["--out", str(out)]
                log(f"N={n:3d} {tool:10s} {method:10s} ...")
                res = measure(cmd, args.timeout, work / f"{label}.log")
                j = parse_json(res["stdout"]) or {}
                merge_s = find(j, "merge_s")
                ok = res["rc"] == 0 and not res["timed_out"]
                note = "" if ok else ("timeout" if res["timed_out"] else f"rc={res['rc']}")
                if not ok:
                    log(f"   FAILED ({note}): {res['stderr'].strip()[-800:]}")
                rows.append(dict(n=n, tool=tool, method=method, merge_s=merge_s if ok else None,
                                 e2e_s=res["wall_s"], rss=res["rss_mib"], rank=out_rank(out) if ok else "-",
                                 note=note, load_s=find(j, "load_s")))
                log(f"   merge {fmt_s(merge_s)} s, end-to-end {res['wall_s']:.2f} s, peak RSS {res['rss_mib']:.0f} MiB"
                    + (f" [{note}]" if note else ""))

        shapes = module_shapes(s)
        print(f"Synthetic Llama-shaped adapters: hidden {s['hidden']}, intermediate {s['intermediate']}, "
              f"{s['layers']} layers, {len(shapes)} target modules (q,k,v,o,gate,up,down), rank {s['rank']}, "
              f"alpha {s['alpha']}, float32; uniform weights 1/N; svd rank {svd_rank}. "
              f"{os.cpu_count()} CPUs ({platform.machine()}), torch {versions['torch']}, "
              f"transformers {versions['transformers']}, peft {versions['peft']}.")
        print()
        print("| N | tool | method | output rank | merge (s) | end to end (s) | peak RSS (MiB) | note |")
        print("|---:|---|---|---:|---:|---:|---:|---|")
        for r in rows:
            print(f"| {r['n']} | {r['tool']} | {r['method']} | {r['rank']} | {fmt_s(r['merge_s'])} | "
                  f"{fmt_s(r['e2e_s'])} | {r['rss']:.0f} | {r['note']} |")
        return 0 if all(not r["note"] for r in rows) else 1
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
