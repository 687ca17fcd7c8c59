#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md in one run (under 8 minutes on one H100/H200), JSON under
# bench/results/: gpu.json (UNet throughput, large images, training) and embed_gpu.json (embedding
# end to end against the bare forward). `bench/gpu.sh --dry-run` runs every code path at a tiny
# size on the CPU. Run from the repository root in the project's environment.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
out=bench/results
mkdir -p "$out"
if [ "${1:-}" = "--dry-run" ]; then
  "$python" bench/gpu.py --dry-run --device cpu --out "$out/gpu_dry_run.json"
  "$python" bench/embed.py --device cpu --copies 1 --batch-size 8 --num-workers 0 --decode workers device --out "$out/embed_dry_run.json"
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu_card.txt"
timeout 360 "$python" bench/gpu.py --out "$out/gpu.json"
timeout 120 "$python" bench/embed.py --device cuda --copies 40 --batch-size 256 --num-workers 8 --decode workers device --out "$out/embed_gpu.json"
