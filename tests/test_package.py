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
    files = [str(shared_audio / "1272-128104-0000.flac"), str(shared_audio / "es.mp3")]
    out = run_example(*files, "--model", str(tiny_ckpt), "--max-new-tokens", "5")
    assert [line.split(": ")[0] for line in out.splitlines() if line.startswith(str(shared_audio))] == files
    out = run_example(files[0], "--model", str(tiny_ckpt), "--max-new-tokens", "5", "--timestamps")
    assert out.startswith(files[0] + ": ")


def test_transcribe_example_without_weights(tmp_path, shared_audio):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "transcribe.py"), str(shared_audio / "es.mp3"),
                             "--model", str(tmp_path / "missing")], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "no such checkpoint directory" in result.stderr
