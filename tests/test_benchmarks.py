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
    rows = json.loads((tmp_path / "gpu-check.json").read_text())["rows"]
    names = {(r["benchmark"], r.get("dtype")) for r in rows}
    for dtype in ("bf16", "int8/bf16", "int4/bf16"):
        for row in ("prefill 30 s prompt", "decode batch 1", "decode batch 8", "decode batch 1, compiled",
                    "decode batch 8, compiled"):
            assert (row, dtype) in names, (row, dtype)
    assert ("time to first token (30 s)", "bf16") in names
    traffic = [r for r in rows if r["benchmark"].startswith("weights read, batch 1")]
    assert {r["dtype"] for r in traffic} == {"bf16", "int8", "int4"} and all(r["stream_share"] > 0 for r in traffic)
    finetune = json.loads((tmp_path / "gpu-finetune.json").read_text())
    assert finetune["examples_per_s"] > 0 and finetune["base"] == "bf16"
