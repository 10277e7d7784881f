#!/usr/bin/env bash
# Streaming throughput and peak memory on one CUDA device: ctxmem's cache against plain transformers,
# on a 1B-class random-weight Llama config in bfloat16 (see benchmarks/gpu_stream.py for the details).
# Usage: bash benchmarks/gpu.sh [options of gpu_stream.py], e.g. --device cuda:1 or --tokens 50000.
# Without a GPU it exits with an error; `bash benchmarks/gpu.sh --device cpu --tiny` is a dry run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
exec env HF_HUB_OFFLINE=1 timeout 300 "$PYTHON" benchmarks/gpu_stream.py "$@"
