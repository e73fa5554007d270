#!/usr/bin/env bash
# The GPU check, one short run on a CUDA machine (no network, under 8 minutes on an H100/H200-class GPU):
#   1. the CUDA-marked tests (tests/test_cuda.py: int8, int4 and compiled decoding on the GPU against the CPU);
#   2. benchmarks/bench.py at full size (32 + 32 layers, random weights built on the GPU) in bf16, int8 and int4:
#      prefill and the 30 s clip's time to first token, batch-1 and batch-8 decode eager and compiled (CUDA graphs),
#      each decode's weight traffic against the GPU's measured copy bandwidth, peak GPU memory, and transformers'
#      Qwen2 / Qwen2-Audio modules on the same weights as the peer;
#   3. one LoRA step of the full-size model (benchmarks/finetune_step.py, bf16 base, batch 8): examples/s.
# Writes benchmarks/results/DATE-gpu-check.json and DATE-gpu-finetune.json and prints the tables.
#
#   bash benchmarks/gpu_check.sh            on the GPU machine
#   bash benchmarks/gpu_check.sh --smoke    anywhere, on the CPU: the same steps with the tiny model's widths and
#                                           one layer (tests/test_benchmarks.py runs this, so the script cannot rot)
#
# Needs the runtime packages and transformers and pytest; PYTHON picks the interpreter (default python3). Images
# without soundfile need its wheel installed first (the device tool's README says how to carry wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
day=$(date +%F)

if [[ ${1:-} == --smoke ]]; then
  results=${GPU_CHECK_RESULTS:-$(mktemp -d)}
  "$PYTHON" benchmarks/bench.py --device cpu --tiny --dtypes bfloat16 --decoder-layers 1 --encoder-layers 1 \
    --decode-steps 2 --repeats 1 --json "$results/gpu-check.json"
  weights=$(mktemp -d)/tiny
  "$PYTHON" -c "import sys; from qwenaudio.testing import make_tiny_checkpoint; make_tiny_checkpoint(sys.argv[1])" \
    "$weights"
  "$PYTHON" benchmarks/finetune_step.py --weights "$weights" --bf16-base --batch-size 2 --steps 2 --new-tokens 8 \
    --json "$results/gpu-finetune.json"
  exit 0
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py
"$PYTHON" benchmarks/bench.py --device cuda --dtypes bfloat16 --decoder-layers 32 --encoder-layers 32 \
  --decode-steps 32 --repeats 3 --json "benchmarks/results/$day-gpu-check.json"
weights=$(mktemp -d)/random-full-size
"$PYTHON" -c "import sys, pathlib; sys.path.insert(0, 'benchmarks'); import full_model
full_model.write_weights(pathlib.Path(sys.argv[1]))" "$weights"
"$PYTHON" benchmarks/finetune_step.py --weights "$weights" --device cuda --bf16-base --batch-size 8 --steps 3 \
  --json "benchmarks/results/$day-gpu-finetune.json"
