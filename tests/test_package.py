"""The package as users meet it: importing it pulls in no reference package, and the example runs."""

import subprocess
import sys

import pytest

from .conftest import ROOT, SHARED_AUDIO


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
                          capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.mark.skipif(not SHARED_AUDIO.is_dir(), reason="the shared recordings (../shared/audio) are not on this machine")
def test_transcribe_example_on_tiny_checkpoint(tiny_ckpt, tokenizer):
    clip = SHARED_AUDIO / "1272-128104-0000.flac"  # 5.86 s at 16 kHz: 148 prompt tokens
    out = run_example(str(clip), "--model", str(tiny_ckpt))
    assert "5.86 s -> 148 prompt tokens" in out
    ids = tokenizer.encode(f"<audio>{clip}</audio><|startoftranscript|><|en|><|transcribe|><|en|>"
                           "<|notimestamps|><|wo_itn|>", audio_spans=[148])
    assert "59 tensors, 0.020 B parameters" in out and f"{len(ids)} ids: <audio>" in out
    assert "encoder (148, 64) features: BOS + 146 audio tokens + EOS" in out


@pytest.mark.skipif(not SHARED_AUDIO.is_dir(), reason="the shared recordings (../shared/audio) are not on this machine")
def test_transcribe_example_without_weights(tmp_path):
    out = run_example(str(SHARED_AUDIO / "es.mp3"), "--model", str(tmp_path / "missing"), "--language", "es")
    assert "8.32 s -> 210 prompt tokens" in out
    assert f"model   not ready: checkpoint not found: {tmp_path}/missing" in out
