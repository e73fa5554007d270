#!/usr/bin/env bash
# The GPU check, one short run on a CUDA machine (no network; sized for the 15 minutes of device time a session
# gets, machine start included):
#   1. the CUDA-marked tests (tests/test_cuda.py: int8, int4 and compiled decoding on the GPU against the CPU, and
#      that the compiled step really runs as a CUDA graph);
#   2. benchmarks/bench.py at full size (32 + 32 layers, random weights built on the GPU) in bf16, int8 and int4:
#      prefill and the 30 s clip's time to first token, batch-1 and batch-8 decode eager, batch-1 decode compiled
#      (CUDA graphs; the first compiled run, which compiles, on a row of its own), each batch-1 decode's weight
#      traffic against the GPU's measured copy bandwidth, peak GPU memory, and transformers' Qwen2 / Qwen2-Audio
#      modules on the same weights as the peer;
#   3. the same for Qwen2-Audio (bench.py --family qwen2-audio: random full-size weights in the published layout,
#      drawn on the GPU into a temporary folder, against transformers' Qwen2AudioForConditionalGeneration);
#   4. where an eager decoding step spends its time (benchmarks/profile_decode.py, bf16, 4 layers at full width);
#      and which form computes a product fastest per row count (benchmarks/linear_forms.py: tinygemm against
#      int4 dequantized tile by tile into cuBLAS, int8 tiles, bf16), the crossovers core/linear.py's FORMS["cuda"]
#      should hold;
#   5. full-size random weights written in the official layout (drawn on the GPU), then one LoRA step of the
#      full-size model on them (benchmarks/finetune_step.py, bf16 base, batch 8): load time, examples/s;
#   6. `qwenaudio serve` on those weights under load (benchmarks/serve_load.py: 1, 8 and 64 concurrent streamed chat
#      clients against the same requests one at a time; requests/s, tokens/s, time to first token, latency).
# Every step runs even when an earlier one failed; the failures are listed at the end, and the exit status is 1.
# Writes DATE-gpu-check.json, DATE-gpu-check-qwen2-audio.json, DATE-gpu-linear-forms.json, DATE-gpu-finetune.json
# and DATE-gpu-serve.json into
# $GPU_CHECK_RESULTS
# (default benchmarks/results).
#
#   bash benchmarks/gpu_check.sh            on the GPU machine
#   bash benchmarks/gpu_check.sh --smoke    anywhere, on the CPU: the same steps with the tiny model's widths and
#                                           one layer (tests/test_benchmarks.py runs this, so the script cannot rot)
#
# Needs the runtime packages, the serve extra, transformers and pytest; PYTHON picks the interpreter (default
# python3). The lent GPUs' image lacks soundfile and the serve extra: benchmarks/gpu_wheels.py fetches their wheels
# beforehand (BENCHMARKS.md, "GPU", has the whole command). The weights
# go to a new folder under $TMPDIR (17 GB at full size, each family in turn: /dev/shm is the fast choice where it has
# the room).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
results=${GPU_CHECK_RESULTS:-benchmarks/results}
day=$(date +%F)
failed=()

step() {  # name, command...: run it, timed; a failure is noted and the next step runs
  local name=$1 start=$SECONDS
  shift
  echo "== $name"
  "$@" || failed+=("$name (exit $?)")
  echo "== $name: $((SECONDS - start)) s"
}

if [[ ${1:-} == --smoke ]]; then
  device=cpu
  size=(--tiny --decoder-layers 1 --encoder-layers 1 --decode-steps 2 --repeats 1)
  profile=(--tiny --layers 1 --steps 2)
  forms=(--tiny --rows 1 16 --repeats 1)
  weights="from qwenaudio.testing import make_tiny_checkpoint as write; write(sys.argv[1])"
  training=(--batch-size 2 --steps 2 --new-tokens 8)
  load=(--tiny --clients 1 2 --max-tokens 2 --rounds 0)
else
  device=cuda
  size=(--decoder-layers 32 --encoder-layers 32 --decode-steps 32 --repeats 3)
  profile=(--layers 4 --steps 12)
  forms=(--rows 1 2 4 8 16 32 64 128 758)
  weights="sys.path.insert(0, 'benchmarks'); import full_model; full_model.write_weights(sys.argv[1], 'cuda')"
  training=(--batch-size 8 --steps 3)
  load=(--clients 1 8 64 --max-tokens 32 --rounds 1)
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
fi
folder=$(mktemp -d)
trap 'rm -rf "$folder"' EXIT

step "CUDA tests" "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py
step "bench.py" "$PYTHON" benchmarks/bench.py --device $device --dtypes bfloat16 "${size[@]}" \
  --compiled-batches 1 --json "$results/$day-gpu-check.json"
step "bench.py, Qwen2-Audio" "$PYTHON" benchmarks/bench.py --family qwen2-audio --device $device --dtypes bfloat16 \
  "${size[@]}" --compiled-batches 1 --json "$results/$day-gpu-check-qwen2-audio.json"
step "profile" "$PYTHON" benchmarks/profile_decode.py --device $device "${profile[@]}"
step "linear forms" "$PYTHON" benchmarks/linear_forms.py --device $device "${forms[@]}" \
  --json "$results/$day-gpu-linear-forms.json"
step "weights" "$PYTHON" -c "import sys; $weights" "$folder/weights"
step "LoRA step" "$PYTHON" benchmarks/finetune_step.py --weights "$folder/weights" --device $device --bf16-base \
  "${training[@]}" --json "$results/$day-gpu-finetune.json"
step "serve load" "$PYTHON" benchmarks/serve_load.py --weights "$folder/weights" "${load[@]}" \
  --json "$results/$day-gpu-serve.json"

if ((${#failed[@]})); then
  printf 'FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "all steps passed"
