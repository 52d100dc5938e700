"""Scale soak: N generated PEFT adapters (mixed ranks 2 to 16, four
layers of q/k/v/o 512x512, rsLoRA on some) merged with `uniform --method
exact` and `--method svd --rank 16`, for N = 100, 250, 500: wall time,
peak anonymous memory and peak RSS of each run, and that `verify` passes. Prints a Markdown
table; time per adapter should stay flat (linear in N).

  .venv/bin/python tests/bench/soak.py [--bin PATH] [--n 100 250 500]
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[2]
DIM = 512
LAYERS = 4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def make_adapter(d: Path, i: int, rng: np.random.Generator) -> None:
    d.mkdir(parents=True, exist_ok=True)
    r = int(rng.choice([2, 4, 8, 16]))
    rslora = i % 5 == 0
    tensors = {}
    for layer in range(LAYERS):
        for t in TARGETS:
            p = f"base_model.model.model.layers.{layer}.self_attn.{t}"
            tensors[f"{p}.lora_A.weight"] = (rng.standard_normal((r, DIM)) * 0.02).astype(np.float32)
            tensors[f"{p}.lora_B.weight"] = (rng.standard_normal((DIM, r)) * 0.02).astype(np.float32)
    save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "soak/base",
        "r": r, "lora_alpha": 2 * r, "target_modules": TARGETS, "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": rslora, "use_dora": False,
    }  # fmt: skip
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def run(cmd: list[str]) -> tuple[float, float, float]:
    """Wall seconds, peak RSS and peak anonymous memory in MiB of `cmd`,
    measured in a fresh process of its own (a process's children's peak is
    the largest of all of them, so each run gets its own parent). RSS also
    counts pages of the inputs' memory maps, which are clean page cache the
    kernel can drop at any time (and on kernels that cache files in large
    folios, touching one tensor maps its neighbours too); the anonymous
    part (RssAnon, sampled every 5 ms) is what the merge itself holds."""
    probe = (
        "import resource, subprocess, sys, time\n"
        "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)\n"
        "anon = 0\n"
        "while p.poll() is None:\n"
        "    try:\n"
        "        for line in open(f'/proc/{p.pid}/status'):\n"
        "            if line.startswith('RssAnon:'):\n"
        "                anon = max(anon, int(line.split()[1]))\n"
        "    except OSError:\n"
        "        pass\n"
        "    time.sleep(0.005)\n"
        "sys.stderr.write(p.stderr.read())\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, anon)\n"
        "sys.exit(p.returncode)\n"
    )
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True)
    secs = time.monotonic() - t0
    if p.returncode != 0:
        sys.exit(f"soak: failed: {' '.join(cmd[:6])} ...\n{p.stderr}")
    rss, anon = (int(x) / 1024 for x in p.stdout.split())
    return secs, rss, anon


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", type=Path, default=ROOT / "target" / "debug" / "lora-merge")
    ap.add_argument("--n", type=int, nargs="+", default=[100, 250, 500])
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        top = max(args.n)
        dirs = [tmp / "adapters" / f"a{i:04d}" for i in range(top)]
        for i, d in enumerate(dirs):
            make_adapter(d, i, rng)
        rows = []
        for method in (["--method", "exact"], ["--method", "svd", "--rank", "16"]):
            for n in sorted(args.n):
                lst = tmp / f"list-{n}.txt"
                lst.write_text("".join(f"{d}\n" for d in dirs[:n]))
                out = tmp / f"out-{method[1]}-{n}"
                secs, rss, anon = run([str(args.bin), "uniform", "--adapters-file", str(lst), "-o", str(out), *method])
                v = subprocess.run([str(args.bin), "verify", str(out)], capture_output=True, text=True)
                if v.returncode != 0:
                    sys.exit(f"soak: verify failed for {out}: {v.stderr}")
                size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
                rows.append((method[1], n, secs, rss, anon, size))
                print(
                    f"{method[1]:5s} N={n:4d}: {secs:6.1f} s, peak RSS {rss:7.0f} MiB "
                    f"(anonymous {anon:5.0f} MiB), output {size:6.1f} MiB",
                    flush=True,
                )
                shutil.rmtree(out)
    print()
    print("| method | N | seconds | ms per adapter | peak anonymous memory | peak RSS (with mapped inputs) | output |")
    print("|---|---|---|---|---|---|---|")
    for m, n, s, rss, anon, size in rows:
        print(f"| {m} | {n} | {s:.1f} | {1000 * s / n:.0f} | {anon:.0f} MiB | {rss:.0f} MiB | {size:.0f} MiB |")


if __name__ == "__main__":
    main()
