"""The GPU check script runs end to end in its CPU smoke mode (tiny widths, one layer), so the first GPU machine
finds it working: every benchmark row it promises is written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_in_smoke_mode(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_RESULTS": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke"], capture_output=True,
                          text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "all steps passed" in done.stdout
    [check], [finetune] = tmp_path.glob("*-gpu-check.json"), tmp_path.glob("*-gpu-finetune.json")
    rows = json.loads(check.read_text())["rows"]
    names = {(r["benchmark"], r.get("dtype")) for r in rows}
    for dtype in ("bf16", "int8/bf16", "int4/bf16"):
        for row in ("prefill 30 s prompt", "decode batch 1", "decode batch 8", "decode batch 1, compiled"):
            assert (row, dtype) in names, (row, dtype)
        assert ("decode batch 8, compiled", dtype) not in names  # one compile per variant keeps the run short
    for dtype in ("bf16", "int8", "int4"):
        assert ("compiling, batch 1", dtype) in names
    assert ("time to first token (30 s)", "bf16") in names
    traffic = [r for r in rows if r["benchmark"].startswith("weights read, batch 1")]
    assert {r["dtype"] for r in traffic} == {"bf16", "int8", "int4"} and all(r["stream_share"] > 0 for r in traffic)
    finetune = json.loads(finetune.read_text())
    assert finetune["examples_per_s"] > 0 and finetune["base"] == "bf16"


def test_the_gpu_check_reports_a_failed_step_and_runs_the_rest(tmp_path):
    """A step that fails (here every Python step: the interpreter does not exist) is listed at the end, the exit
    status says so, and the steps after it still run."""
    env = {**os.environ, "PYTHON": "no-such-python", "GPU_CHECK_RESULTS": str(tmp_path)}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke"], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == 1
    for name in ("CUDA tests", "bench.py", "profile", "weights", "LoRA step"):
        assert f"== {name}:" in done.stdout and f"FAILED: {name} (exit 127)" in done.stdout


@pytest.mark.slow
def test_the_decoding_profile_runs_and_splits_the_step_into_products_attention_and_the_rest():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_decode.py"), "--tiny", "--layers", "1",
                           "--steps", "2", "--variant", "int4"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert summary.startswith("int4, 1 layers + lm_head,") and "products" in summary and "attention" in summary
    shares = [float(part.split()[-1].rstrip("%")) for part in summary.split(": ")[1].split(", ")]
    assert abs(sum(shares) - 100) < 0.5 and shares[0] > 0  # the int4 kernel's time is counted as products
