#!/usr/bin/env bash
# Fuzz every target for SECONDS each (default 60) with cargo-fuzz on the
# nightly toolchain, starting from the seeds. New inputs go to a scratch
# corpus; a crashing input is written to tests/fuzz/regressions/TARGET/,
# where the stable test suite replays it from then on (commit it with the
# fix, renamed to say what it tests: a file still named crash-*, timeout-*
# or oom-* fails this script). Prints libFuzzer's statistics per target.
#   tests/fuzz/run.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(safetensors config hub_ref shots)
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz: the nightly toolchain is not installed (rustup toolchain install nightly)" >&2
  exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  cargo +nightly install cargo-fuzz --locked
fi
cargo +nightly fuzz build --fuzz-dir .
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t"
  echo "== fuzz $t for ${secs}s"
  cargo +nightly fuzz run --fuzz-dir . "$t" "$scratch/$t" "seeds/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
    -artifact_prefix="regressions/$t/" -print_final_stats=1 2>&1 |
    grep -E "^(stat::|#[0-9]+.*DONE|==[0-9]+==|SUMMARY|Done|artifact|INFO: Running|.*panicked)" || true
  if ls "regressions/$t"/crash-* "regressions/$t"/timeout-* "regressions/$t"/oom-* >/dev/null 2>&1; then
    echo "fuzz: $t found a failing input, saved in tests/fuzz/regressions/$t/" >&2
    exit 1
  fi
done
