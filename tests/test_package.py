"""The package as users meet it: importing it pulls in no reference package, the example runs, and `load`
takes the usual spellings of its arguments and names what it cannot take."""

import ast
import os
import shutil
import subprocess
import sys

import pytest
import torch

import qwenaudio

from .conftest import ROOT


@pytest.mark.slow
def test_import_pulls_in_no_reference_package():
    code = (
        "import pkgutil, importlib, sys, qwenaudio\n"
        "for m in pkgutil.iter_modules(qwenaudio.__path__): importlib.import_module('qwenaudio.' + m.name)\n"
        "print(sorted({n.split('.')[0] for n in sys.modules} & {'transformers', 'whisper', 'librosa', 'dashscope',\n"
        "                                                    'sacrebleu', 'pycocoevalcap'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_core_imports_nothing_from_the_product():
    """The core (qwenaudio.core) is what a reader opens to learn the model: it must stand on its own."""
    core = ROOT / "src" / "qwenaudio" / "core"
    for file in sorted(core.glob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                outside = node.level > 1 or (node.level == 0 and (node.module or "").startswith("qwenaudio")
                                             and not node.module.startswith("qwenaudio.core"))
                assert not outside, f"{file.name}:{node.lineno} imports from outside the core"
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("qwenaudio")]
                assert all(n.startswith("qwenaudio.core") for n in names), f"{file.name}:{node.lineno} imports {names}"


def run_example(*args):
    return subprocess.run([sys.executable, str(ROOT / "examples" / "transcribe.py"), *args],
                          capture_output=True, text=True, timeout=300, check=True).stdout


@pytest.mark.slow
def test_transcribe_example_on_tiny_checkpoint(tiny_ckpt, shared_audio):
    files = [str(shared_audio / "1272-128104-0000.flac"), str(shared_audio / "es.mp3")]
    out = run_example(*files, "--model", str(tiny_ckpt), "--max-new-tokens", "5")
    assert [line.split(": ")[0] for line in out.splitlines() if line.startswith(str(shared_audio))] == files
    out = run_example(files[0], "--model", str(tiny_ckpt), "--max-new-tokens", "5", "--timestamps")
    assert out.startswith(files[0] + ": ")


@pytest.mark.slow
def test_transcribe_example_without_weights(tmp_path, shared_audio):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "transcribe.py"), str(shared_audio / "es.mp3"),
                             "--model", str(tmp_path / "missing")], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and f"no checkpoint at {tmp_path / 'missing'}: no such directory" in result.stderr
    assert "To place the files by hand" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("name, dtype", [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                         ("fp16", torch.float16), ("half", torch.float16),
                                         ("fp32", torch.float32), ("float32", torch.float32),
                                         (torch.float32, torch.float32)])
def test_dtype_names(tiny_ckpt, name, dtype):
    model = qwenaudio.load(tiny_ckpt, dtype=name, device="cpu", progress=False)
    assert model.decoder.wte.weight.dtype == model.encoder.conv1.weight.dtype == dtype


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": "float8"}, r"dtype 'float8' is not one of: float32 \(fp32\), bfloat16 \(bf16\), float16 \(fp16, half\)"),
    ({"dtype": torch.int8}, r"dtype torch.int8 is not one of"),
    ({"device": "gpu"}, r"device 'gpu' is not a torch device"),
])
def test_bad_load_arguments(tiny_ckpt, kwargs, message):
    with pytest.raises(qwenaudio.InputError, match=message):
        qwenaudio.load(tiny_ckpt, progress=False, **kwargs)


def test_load_needs_a_name():
    with pytest.raises(qwenaudio.InputError,
                       match=r"load\(\) needs a checkpoint directory or a repo id like 'Qwen/Qwen-Audio', got None"):
        qwenaudio.load(None)


@pytest.mark.slow
def test_transcribe_script_installs_once_and_reads_paths_from_where_it_runs(tmp_path, tiny_ckpt, shared_audio):
    """./scripts/transcribe on a venv whose python logs pip calls (and runs everything else for real): pip runs on
    the first call only, and a relative file argument is found from the caller's directory."""
    venv, log = tmp_path / "venv", tmp_path / "pip-calls"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nif [ "$1 $2" = "-m pip" ]; then echo "$@" >> {log}; exit 0; fi\n'
                      f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    shutil.copy(shared_audio / "1272-128104-0000.flac", tmp_path / "speech.flac")
    for _ in range(2):
        done = subprocess.run([str(ROOT / "scripts" / "transcribe"), "speech.flac", "--model", str(tiny_ckpt),
                               "--max-new-tokens", "3"], cwd=tmp_path, env={**os.environ, "QWENAUDIO_VENV": str(venv)},
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("speech.flac: ")
    assert [line.split()[5:] for line in log.read_text().splitlines()] == [["torch==2.13.0"], ["-e", ".[hub]"]]
