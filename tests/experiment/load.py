"""Under load: `train` and `fit` of the few-shot demo (MiniLM, 5 shots per
class, 40 steps) alone and beside one and two busy processes, with the
OpenMP wait policy lora-merge sets (passive) and with libgomp's default
(threads spin before they sleep), which the companion gets when run
directly. Prints a Markdown table of seconds and slowdowns.

  .venv/bin/python tests/experiment/load.py [--repeat N] [--bin PATH]

Run it on an otherwise idle machine; `fewshot.py data` must have run (the
demo does it).
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fewshot as fs  # noqa: E402


def busy(n: int) -> list[subprocess.Popen]:
    # One CPU-bound process each, as a compiler or another job would be.
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"load: failed: {' '.join(cmd)}\n{p.stderr}")
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--bin", type=Path, help="the lora-merge binary (default: the newest in target/)")
    args = ap.parse_args()
    fs.need_data()
    binary = args.bin or fs.default_binary()
    companion = binary.with_name("lora-merge-torch")
    t = fs.Tool(binary, fs.minilm())
    data = fs.shots(5, 0)
    work = fs.WORK / "load"
    ups = [str(p) for p in fs.upstream_adapters()]
    common = t.common() + ["--task", "classify", "--steps", str(fs.STEPS), "--seed", "0", "--force"]
    jobs = {
        "train": ["train", *common, "--data", str(data), "-o", str(work / "train"),
                  "--rank", "8", "--alpha", "16", "--target-modules", "query", "value",
                  "--lr", str(fs.LORA_LR), "--batch-size", "30"],
        "fit": ["fit", *common, "--adapters", *ups, "--shots", str(data), "-o", str(work / "fit"),
                "--lr", str(fs.COMPOSITION_LR), "--batch-size", "30", "--val-fraction", "0"],
    }  # fmt: skip
    policies = {
        # What users get: lora-merge sets OMP_WAIT_POLICY=PASSIVE.
        "passive (default)": ([str(binary)], {}),
        # The companion run directly, as before: libgomp's own default.
        "spinning (libgomp default)": ([str(companion), "cli"], {}),
    }
    rows = []
    for job, jargs in jobs.items():
        for pname, (prefix, extra) in policies.items():
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            env.update(extra)
            secs = []
            for n_busy in (0, 1, 2):
                best = None
                for _ in range(args.repeat):
                    b = busy(n_busy)
                    try:
                        s = timed(prefix + jargs, env)
                    finally:
                        for p in b:
                            p.kill()
                            p.wait()
                    best = s if best is None else min(best, s)
                secs.append(best)
                print(f"{job:5s} {pname:28s} busy={n_busy}: {best:6.1f} s", flush=True)
            rows.append((job, pname, secs))
    print()
    print("| command | OpenMP wait | alone | beside 1 busy | beside 2 busy |")
    print("|---|---|---|---|---|")
    for job, pname, (a, b1, b2) in rows:
        print(f"| `{job}` | {pname} | {a:.1f} s | {b1:.1f} s ({b1 / a:.2f}x) | {b2:.1f} s ({b2 / a:.2f}x) |")


if __name__ == "__main__":
    main()
