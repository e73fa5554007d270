"""The package as users meet it: importing it pulls in no reference package, and the example runs."""

import subprocess
import sys

from .conftest import ROOT


def test_import_pulls_in_no_reference_package():
    code = (
        "import pkgutil, importlib, sys, qwenaudio\n"
        "for m in pkgutil.iter_modules(qwenaudio.__path__): importlib.import_module('qwenaudio.' + m.name)\n"
        "print(sorted({n.split('.')[0] for n in sys.modules} & {'transformers', 'whisper', 'librosa', 'dashscope'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def run_example(*args):
    return subprocess.run([sys.executable, str(ROOT / "examples" / "transcribe.py"), *args],
                          capture_output=True, text=True, timeout=300, check=True).stdout


def test_transcribe_example_on_tiny_checkpoint(tiny_ckpt, shared_audio):
    out = run_example(str(shared_audio / "1272-128104-0000.flac"), "--model", str(tiny_ckpt), "--max-new-tokens", "5")
    header, text = out.split("\n", 1)  # 5.86 s at 16 kHz: 148 prompt tokens for the clip + 6 tags
    assert header.endswith("1272-128104-0000.flac: 5.86 s, 148 audio tokens, 154 prompt ids")
    assert text.strip()  # random weights say something (the real ones transcribe)


def test_transcribe_example_without_weights(tmp_path, shared_audio):
    out = run_example(str(shared_audio / "es.mp3"), "--model", str(tmp_path / "missing"), "--language", "es")
    assert f"model not ready: {tmp_path}/missing/qwen.tiktoken" in out or "model not ready:" in out
    assert "qwenaudio.download('Qwen/Qwen-Audio')" in out
