"""The GPU check script runs end to end in its CPU smoke mode (tiny widths, one layer), so the first GPU machine
finds it working: every benchmark row it promises is written, for both families. bench.py's Qwen2-Audio peer
computes what our model computes, so its rows compare equal work."""

import argparse
import ast
import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwenaudio.core.generate import Session, decode_one_token, prefill
from qwenaudio.core.decoder import KVCache

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_in_smoke_mode(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_RESULTS": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke"], capture_output=True,
                          text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "all steps passed" in done.stdout
    [check], [finetune] = tmp_path.glob("*-gpu-check.json"), tmp_path.glob("*-gpu-finetune.json")
    [check_qwen2] = tmp_path.glob("*-gpu-check-qwen2-audio.json")
    for path, family in ((check, "qwen-audio"), (check_qwen2, "qwen2-audio")):
        assert json.loads(path.read_text())["setup"]["family"] == family
        assert_gpu_check_rows(json.loads(path.read_text())["rows"])
    finetune = json.loads(finetune.read_text())
    assert finetune["examples_per_s"] > 0 and finetune["base"] == "bf16"
    [forms] = tmp_path.glob("*-gpu-linear-forms.json")
    forms = json.loads(forms.read_text())
    assert {(r["format"], r["rows"]) for r in forms["forms"]} == {(f, n) for f in ("float", "int8", "int4") for n in (1, 16)}
    assert all(ms > 0 for r in forms["forms"] for ms in r["ms"].values()) and set(forms["crossovers"]) >= {"int8", "int4"}
    [serve] = tmp_path.glob("*-gpu-serve.json")
    rows = json.loads(serve.read_text())["rows"]
    assert [r["clients"] for r in rows] == [1, 2] and all(r["failed"] == 0 and r["tokens_per_s"] > 0 for r in rows)


def assert_gpu_check_rows(rows: list[dict]) -> None:
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
    assert all(r["speedup"] > 0 for r in rows if "speedup" in r)


def test_the_gpu_check_reports_a_failed_step_and_runs_the_rest(tmp_path):
    """A step that fails (here every Python step: the interpreter does not exist) is listed at the end, the exit
    status says so, and the steps after it still run."""
    env = {**os.environ, "PYTHON": "no-such-python", "GPU_CHECK_RESULTS": str(tmp_path)}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke"], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == 1
    for name in ("CUDA tests", "bench.py", "bench.py, Qwen2-Audio", "profile", "weights", "LoRA step", "serve load"):
        assert f"== {name}:" in done.stdout and f"FAILED: {name} (exit 127)" in done.stdout


def test_the_serve_load_clip_is_noise_of_its_length_where_the_shared_recordings_are_absent(tmp_path, monkeypatch):
    """A lent GPU gets the checkout without ../shared: the serve-load step of the GPU check must still run there."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    serve_load = importlib.import_module("serve_load")
    audio, rate, name = serve_load.recording(tmp_path / "absent.flac", serve_load.CLIP_SECONDS)
    assert (audio.shape, audio.dtype, rate, name) == ((93_680,), "float32", 16_000, "noise, 5.855 s")
    assert serve_load.request_body(4, audio, rate)["messages"][0]["content"][0]["input_audio"]["format"] == "wav"


def test_the_serve_load_server_keeps_the_callers_python_path(monkeypatch):
    """The GPU check installs soundfile and the serve extra aside (benchmarks/gpu_wheels.py) and reaches them through
    PYTHONPATH; the server the load runs against started with src/ alone and could not import soundfile there."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    serve_load = importlib.import_module("serve_load")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/tmp/site", "/elsewhere"]))
    assert serve_load.server_environment()["PYTHONPATH"].split(os.pathsep) == [str(ROOT / "src"), "/tmp/site",
                                                                                "/elsewhere"]


def test_the_serve_load_noise_is_as_long_as_the_recording_it_stands_for(shared_audio, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    serve_load = importlib.import_module("serve_load")
    audio, rate, name = serve_load.recording(serve_load.CLIP, serve_load.CLIP_SECONDS)
    assert (audio.shape, rate, name) == ((93_680,), 16_000, serve_load.CLIP.name)  # the whole recording


def test_the_gpu_wheels_are_soundfile_and_the_serve_extra_with_all_they_require_but_numpy(monkeypatch):
    """benchmarks/gpu_wheels.py's list for the lent GPU's image: nothing the serve stack imports may be missing there
    (fastapi's opentelemetry-api and pydantic's core were, in the list BENCHMARKS.md gave by hand)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    gpu_wheels = importlib.import_module("gpu_wheels")
    assert set(gpu_wheels.serve_extra()) == {"fastapi", "uvicorn", "python-multipart", "prometheus-client"}
    pins = gpu_wheels.closure(gpu_wheels.ROOTS + gpu_wheels.serve_extra(), "3.12")
    assert {"soundfile", "cffi", "fastapi", "starlette", "pydantic", "pydantic-core", "opentelemetry-api",
            "uvicorn", "python-multipart", "prometheus-client"} <= set(pins) and "numpy" not in pins
    for name, version in pins.items():
        assert importlib.metadata.version(name) == version
        for text in importlib.metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"python_version": "3.12", "extra": ""}):
                assert canonicalize_name(requirement.name) in set(pins) | {"numpy"}, (name, text)


SCRIPTS_WITH_JSON = ["bench", "evaluation_speed", "finetune_step", "full_model", "linear_forms",
                     "quantization_accuracy", "serve_load", "verify_sensitivity"]


def test_a_json_path_is_checked_when_the_arguments_are_read_and_written_whole(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    json_output = importlib.import_module("json_output")
    path = json_output.json_path(str(tmp_path / "new" / "deeper" / "out.json"))
    assert path.parent.is_dir()  # made at once, not after the measuring
    json_output.write_json(path, {"rows": [1, 2]})
    assert json.loads(path.read_text()) == {"rows": [1, 2]} and [p.name for p in path.parent.iterdir()] == ["out.json"]
    (tmp_path / "a file").write_text("")
    for bad, says in ((tmp_path / "a file" / "out.json", "is a file"), (tmp_path, "is a directory")):
        with pytest.raises(argparse.ArgumentTypeError, match=says):
            json_output.json_path(str(bad))


def test_every_benchmark_takes_its_json_path_through_json_output():
    """Each script's --json is parsed by json_path (checked before measuring) and its results leave through
    write_json (atomic): no script opens the path itself."""
    for script in SCRIPTS_WITH_JSON:
        tree = ast.parse((ROOT / "benchmarks" / f"{script}.py").read_text())
        options = [call for call in ast.walk(tree) if isinstance(call, ast.Call) and call.args
                   and isinstance(call.args[0], ast.Constant) and call.args[0].value == "--json"]
        assert [ast.unparse(k.value) for call in options for k in call.keywords if k.arg == "type"] == ["json_path"], \
            script
        uses = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Call)
                and any(isinstance(a, ast.Attribute) and a.attr == "json" for a in node.args)]
        assert uses and all(use.startswith("write_json(args.json") for use in uses), (script, uses)


@pytest.mark.slow  # a process
def test_a_benchmark_refuses_an_unwritable_json_path_before_measuring(tmp_path):
    (tmp_path / "a file").write_text("")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "linear_forms.py"), "--json",
                           str(tmp_path / "a file" / "out.json")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 2 and "argument --json: its folder" in done.stderr and \
        "is a file, not a directory" in done.stderr, done.stderr[-2000:]


@pytest.mark.slow
def test_the_decoding_profile_runs_and_splits_the_step_into_products_attention_and_the_rest():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_decode.py"), "--tiny", "--layers", "1",
                           "--steps", "2", "--variant", "int4"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert summary.startswith("int4, 1 layers + lm_head,") and "products" in summary and "attention" in summary
    shares = [float(part.split()[-1].rstrip("%")) for part in summary.split(": ")[1].split(", ")]
    assert abs(sum(shares) - 100) < 0.5 and shares[0] > 0  # the int4 kernel's time is counted as products


def test_the_qwen2_audio_peer_holds_our_tensors_and_computes_our_logits(tmp_path, monkeypatch):
    """bench.py's transformers Qwen2AudioForConditionalGeneration takes our modules' tensors by name (no copies) and
    gives our encoder output and logits (prefill and a decoding step through its cache), so the rows time equal
    work on equal weights."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = importlib.import_module("bench")
    args = argparse.Namespace(tiny=True, decoder_layers=2, encoder_layers=2)
    sides = bench.qwen2_audio(torch.float32, args, bench.qwen2_checkpoint(tmp_path, args))
    peer = bench.qwen2_peer(tmp_path / "weights", sides.encoder, sides.decoder)
    assert peer.lm_head.weight.data_ptr() == sides.decoder.lm_head.weight.data_ptr()
    for seconds in (5, 30):
        samples = seconds * 16000
        mel = bench.log_mel_spectrogram(torch.randn(samples, generator=torch.Generator().manual_seed(0)) * 0.1,
                                        128)[None]
        [ours] = sides.encoder.encode(mel, [samples])
        torch.testing.assert_close(sides.peer_encode(mel, samples)[0], ours, rtol=1e-5, atol=1e-5)
    ids = torch.randint(0, 151643, (1, 24), generator=torch.Generator().manual_seed(0))
    session = Session(KVCache(sides.decoder.config, 1, 25, torch.float32))
    ours = prefill(sides.decoder, session, ids)
    theirs = peer(input_ids=ids, use_cache=True)
    torch.testing.assert_close(theirs.logits[:, -1], ours, rtol=1e-5, atol=1e-5)
    step = decode_one_token(sides.decoder, session.cache, ids[:, :1], torch.tensor([24]), session.rope_base)
    torch.testing.assert_close(peer(input_ids=ids[:, :1], cache=theirs.cache, use_cache=True).logits[:, -1], step,
                               rtol=1e-5, atol=1e-5)
