#!/usr/bin/env bash
# Every GPU check of the rollout engine in one command, on a CUDA machine whose Python already has the
# packages (torch, triton, transformers 5.24 or later, accelerate, pytest; mamba-ssm for the prefill baseline):
#
#   bash bench/gpu_checks.sh [OUT_DIR]          # default bench/results/gpu; PYTHON=... picks the interpreter
#                                               # MAMBA_SRC=DIR: the mamba_ssm baseline from a source tree
#
# Steps, most decisive first, each under its own time limit, each writing OUT_DIR/<step>.txt as it runs
# (a run cut short keeps what finished):
#   tests    the CUDA tests: the decode step replayed as CUDA graphs equals the eager step, token for token,
#            and the kernels at Nemotron-H's head shapes with bf16 activations equal their references
#   kernels  the decode-step kernel against the HBM roofline at Nemotron-H-8B shapes, batch 1 to 256, the
#            prefill scan against mamba_ssm's mamba_chunk_scan_combined at batch 4 x 8,192 tokens, and the
#            decode attention against the roofline and its PyTorch reference
#   rollout  the engine against generate(), and against itself without CUDA graphs and reading the tokens
#            back after every decode step, on the Nemotron-H-8B layout at reduced width, bf16, batch 1 and 16
#   decode   end-to-end decode of random Nemotron-Nano-9B-v2-shaped weights, batch 64 at an 8k context,
#            against the roofline (weights, states and KV read once per step), beside its Transformer twin
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-bench/results/gpu}
mkdir -p "$OUT"

step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit $limit s): $PY $*" | tee "$OUT/$name.txt"
    PYTHONUNBUFFERED=1 timeout "$limit" "$PY" "$@" 2>&1 | tee -a "$OUT/$name.txt"
    echo "== $name: exit status ${PIPESTATUS[0]}" | tee -a "$OUT/$name.txt"
}

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" || exit 1
# Limits (600 s in all) from runs on an H200 (2026-12-04): the graph tests took 14 s (the kernel and graph tests
# added since compile more kernels and record more graphs), the kernels 40 s, the decode about 170 s;
# generate() alone takes about 25 s per call of 256 tokens at batch 1 and 34 s at batch 16 on the PyTorch path,
# hence one timed run per batch, and batch 64 (past the limit in that run) left out.
step tests 120 -m pytest -q -p no:cacheprovider tests/test_rollout_graphs.py tests/test_kernels_cuda.py
step kernels 120 -m bench.bench_kernels ${MAMBA_SRC:+--mamba-src "$MAMBA_SRC"}
step rollout 160 -m bench.bench_rollout --layout nemotron-h-8b --hidden 512 --dtype bfloat16 --repeats 1 \
    --batches 1,16
step decode 200 -m bench.bench_hybrid --full --layout nemotron-nano-9b-v2 --shapes 8192/256x64 --out "$OUT/decode"
