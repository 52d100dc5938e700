#!/usr/bin/env python3
"""Benchmark: merging SDXL-shaped kohya LoRAs, lora-merge vs a dense-delta SVD merge.

Writes N synthetic kohya LoRA files (float16, random values) with the module
list and shapes sd-scripts' default `networks.lora` gives SDXL: every Linear
in the UNet's transformer blocks (attn1/attn2 q, k, v, out; ff.net.0.proj;
ff.net.2; proj_in/proj_out of each Transformer2DModel) and in both text
encoders (q, k, v, out_proj, fc1, fc2 of every layer). Then for each N it
measures, each run in a fresh subprocess (time of the whole process, peak RSS
from os.wait4 of that child), each started from the same state: the previous
run's output flushed to disk (an exact merge at N=32 leaves 14 GB of dirty
pages, whose writeback would otherwise be timed in the next run) and the
inputs read once, so every run finds them in the page cache:

  lora-merge exact          (lossless; rank = N x 32)
  lora-merge svd --rank 32  (from the factors: the exact routes, or the
                            subspace iteration when the summed rank is large)
  dense svd --rank 32       the way sd-scripts' networks/svd_merge_lora.py
                            does it: per module, the dense delta
                            sum_i ratio_i * alpha_i/r_i * up_i @ down_i in
                            float32, torch.linalg.svd, keep the top R, clamp
                            at the 0.99 quantile, write float16.

--scale K divides every width by K (K=1 is the real SDXL; K=4 keeps the
module list and aspect ratios, 1/16 of the parameters) so the benchmark can
run on small machines; the table says which scale was used.

Usage:
    python tests/bench/sd_bench.py [--bin PATH] [--ns 2,8,32] [--scale 1] [--rank 32]
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# SDXL UNet: (block prefix, channels, transformer blocks per attention, attentions)
SDXL_ATTN = [
    ("down_blocks_1_attentions_{a}", 640, 2, 2),
    ("down_blocks_2_attentions_{a}", 1280, 10, 2),
    ("mid_block_attentions_{a}", 1280, 10, 1),
    ("up_blocks_0_attentions_{a}", 1280, 10, 3),
    ("up_blocks_1_attentions_{a}", 640, 2, 3),
]
CONTEXT = 2048
# (prefix, hidden, layers) of CLIP ViT-L and OpenCLIP ViT-bigG.
TEXT = [("lora_te1_text_model_encoder_layers_{l}", 768, 12), ("lora_te2_text_model_encoder_layers_{l}", 1280, 32)]


def sdxl_modules(scale: int) -> list[tuple[str, int, int]]:
    """(kohya name, fan_in, fan_out) of every module."""
    out = []
    ctx = CONTEXT // scale
    for prefix, ch, blocks, attns in SDXL_ATTN:
        d = ch // scale
        for a in range(attns):
            p = "lora_unet_" + prefix.format(a=a)
            out.append((f"{p}_proj_in", d, d))
            out.append((f"{p}_proj_out", d, d))
            for b in range(blocks):
                t = f"{p}_transformer_blocks_{b}"
                for q in ("to_q", "to_k", "to_v", "to_out_0"):
                    out.append((f"{t}_attn1_{q}", d, d))
                out.append((f"{t}_attn2_to_q", d, d))
                out.append((f"{t}_attn2_to_k", ctx, d))
                out.append((f"{t}_attn2_to_v", ctx, d))
                out.append((f"{t}_attn2_to_out_0", d, d))
                out.append((f"{t}_ff_net_0_proj", d, 8 * d))
                out.append((f"{t}_ff_net_2", 4 * d, d))
    for prefix, hidden, layers in TEXT:
        h = hidden // scale
        for layer in range(layers):
            p = prefix.format(l=layer)
            for q in ("q_proj", "k_proj", "v_proj", "out_proj"):
                out.append((f"{p}_self_attn_{q}", h, h))
            out.append((f"{p}_mlp_fc1", h, 4 * h))
            out.append((f"{p}_mlp_fc2", 4 * h, h))
    return out


def generate(dirpath: Path, n: int, rank: int, scale: int) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    mods = sdxl_modules(scale)
    paths = []
    for i in range(n):
        p = dirpath / f"lora_{i:03d}.safetensors"
        paths.append(p)
        if p.exists():
            continue
        g = torch.Generator().manual_seed(1000 + i)
        sd = {}
        for name, fin, fout in mods:
            sd[f"{name}.lora_down.weight"] = (torch.randn(rank, fin, generator=g) / fin**0.5).half()
            sd[f"{name}.lora_up.weight"] = (torch.randn(fout, rank, generator=g) * 0.01).half()
            sd[f"{name}.alpha"] = torch.tensor(float(rank // 2)).half()
        save_file(sd, str(p), metadata={"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0"})
    return paths


def dense_svd_merge(files: list[str], ratios: list[float], rank: int, out: str) -> None:
    """The sd-scripts way: dense delta per module, full SVD, clamp."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    torch.set_grad_enabled(False)
    deltas: dict[str, torch.Tensor] = {}
    for f, ratio in zip(files, ratios):
        with safe_open(f, "pt") as sf:
            keys = sf.keys()
            for k in keys:
                if not k.endswith(".lora_down.weight"):
                    continue
                name = k[: -len(".lora_down.weight")]
                down = sf.get_tensor(k).float()
                up = sf.get_tensor(f"{name}.lora_up.weight").float()
                alpha = float(sf.get_tensor(f"{name}.alpha")) if f"{name}.alpha" in keys else down.shape[0]
                d = ratio * (alpha / down.shape[0]) * (up @ down)
                if name in deltas:
                    deltas[name] += d
                else:
                    deltas[name] = d
    sd = {}
    for name, mat in deltas.items():
        u, s, vh = torch.linalg.svd(mat)
        u = u[:, :rank] @ torch.diag(s[:rank])
        vh = vh[:rank, :]
        dist = torch.cat([u.flatten(), vh.flatten()])
        hi = torch.quantile(dist.abs() if dist.numel() < 16_000_000 else dist[:16_000_000].abs(), 0.99)
        u = u.clamp(-hi, hi)
        vh = vh.clamp(-hi, hi)
        sd[f"{name}.lora_up.weight"] = u.half().contiguous()
        sd[f"{name}.lora_down.weight"] = vh.half().contiguous()
        sd[f"{name}.alpha"] = torch.tensor(float(rank)).half()
    save_file(sd, out)


def settle(inputs: list[str]) -> None:
    """Untimed: flush what earlier runs wrote, then read the inputs once."""
    os.sync()
    for path in inputs:
        with open(path, "rb") as f:
            while f.read(8 << 20):
                pass


def timed(cmd: list[str]) -> tuple[float, float]:
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode() if p.stderr else ""
    if status != 0:
        raise SystemExit(f"{cmd[:3]} failed: {err}")
    return wall, ru.ru_maxrss / 1024  # ru_maxrss is KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.environ.get("LORA_MERGE_BIN", str(REPO / "target/release/lora-merge")))
    ap.add_argument("--ns", default="2,8,32")
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--work", type=Path, default=None, help="keep generated files here")
    ap.add_argument("--dense-child", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--generate-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate_child is not None:
        generate(Path(args.generate_child[0]), int(args.generate_child[1]), args.rank, args.scale)
        return
    if args.dense_child is not None:
        out, *files = args.dense_child
        dense_svd_merge(files, [1.0 / len(files)] * len(files), args.rank, out)
        return

    ns = [int(x) for x in args.ns.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="sd-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"generating {max(ns)} SDXL-shaped LoRAs (scale 1/{args.scale}, rank {args.rank}, "
          f"{len(sdxl_modules(args.scale))} modules each) in {work}", file=sys.stderr)
    # Generated in a child: this driver never imports torch, so children's
    # ru_maxrss is not inflated by a big parent at fork time.
    subprocess.run([sys.executable, __file__, "--rank", str(args.rank), "--scale", str(args.scale),
                    "--generate-child", str(work), str(max(ns))], check=True)
    files = [str(work / f"lora_{i:03d}.safetensors") for i in range(max(ns))]
    size = os.path.getsize(files[0]) / 2**20
    rows = []
    for n in ns:
        inp = files[:n]
        for label, cmd in [
            ("lora-merge exact", [args.bin, "uniform", "--adapters", *inp, "--force", "-o", str(work / "out-exact")]),
            ("lora-merge svd", [args.bin, "uniform", "--adapters", *inp, "--method", "svd", "--rank", str(args.rank),
                                "--force", "-o", str(work / "out-svd")]),
            ("dense svd (sd-scripts way)", [sys.executable, __file__, "--rank", str(args.rank), "--dense-child",
                                            str(work / "dense.safetensors"), *inp]),
        ]:
            print(f"N={n}: {label}", file=sys.stderr)
            settle(inp)
            wall, rss = timed(cmd)
            rows.append((n, label, wall, rss))
            # Each row as soon as it is measured: a long run stopped part-way
            # still leaves its figures.
            print(f"   {wall:.2f} s, peak RSS {rss:.0f} MiB", file=sys.stderr, flush=True)
    print(f"\nSDXL-shaped kohya LoRAs, scale 1/{args.scale}, rank {args.rank}, "
          f"{len(sdxl_modules(args.scale))} modules, {size:.1f} MiB each (f16); "
          f"{platform.machine()}, {os.cpu_count()} CPUs\n")
    print("| N | method | time (s) | peak RSS (MiB) |")
    print("|---|---|---|---|")
    for n, label, wall, rss in rows:
        print(f"| {n} | {label} | {wall:.2f} | {rss:.0f} |")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    json.dump([dict(n=n, method=m, seconds=w, peak_rss_mib=r) for n, m, w, r in rows], sys.stderr)


if __name__ == "__main__":
    main()
