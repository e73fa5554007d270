"""Download: the huggingface_hub path (with a stand-in hub module), offline mode, and the missing extra."""

import os
import subprocess
import sys
import types

import pytest

import qwenaudio
from qwenaudio import DownloadError
from qwenaudio.hub import FILE_PATTERNS, weights_home
from qwenaudio.testing import make_tiny_checkpoint


def fake_hub(monkeypatch, write):
    calls = []

    def snapshot_download(repo_id, revision=None, local_dir=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        write(local_dir)
        return str(local_dir)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    return calls


def test_download_returns_complete_checkpoint(monkeypatch, tmp_path):
    calls = fake_hub(monkeypatch, lambda d: make_tiny_checkpoint(d))
    path = qwenaudio.download("Qwen/Qwen-Audio", tmp_path / "qa", revision="main")
    assert path == tmp_path / "qa" and (path / "config.json").exists()
    assert calls == [("Qwen/Qwen-Audio", "main", FILE_PATTERNS)]
    assert len(qwenaudio.load_checkpoint(path, device="meta")) == 59


def test_download_defaults_to_weights_home(monkeypatch, tmp_path):
    monkeypatch.setenv("QWENAUDIO_HOME", str(tmp_path / "home"))
    fake_hub(monkeypatch, lambda d: make_tiny_checkpoint(d))
    assert weights_home() == tmp_path / "home"
    assert qwenaudio.download("Qwen/Qwen-Audio-Chat") == tmp_path / "home" / "Qwen-Audio-Chat"


def test_incomplete_download(monkeypatch, tmp_path):
    def write_then_lose_a_shard(d):
        make_tiny_checkpoint(d)
        (d / "model-00002-of-00003.safetensors").unlink()

    fake_hub(monkeypatch, write_then_lose_a_shard)
    with pytest.raises(DownloadError, match="download of Qwen/Qwen-Audio is incomplete: .*model-00002-of-00003"):
        qwenaudio.download("Qwen/Qwen-Audio", tmp_path / "qa")


def test_without_hub_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes `import huggingface_hub` fail
    with pytest.raises(DownloadError, match=r"needs huggingface_hub: pip install 'qwenaudio\[hub\]'") as e:
        qwenaudio.download("Qwen/Qwen-Audio", tmp_path)
    assert "To place the files by hand" in str(e.value) and "weights/README.md" in str(e.value)


def test_offline(tmp_path):
    """The real huggingface_hub in offline mode (set before it is imported, so in a fresh process)."""
    code = (
        "import qwenaudio, sys\n"
        "try:\n    qwenaudio.download('Qwen/Qwen-Audio', sys.argv[1])\n"
        "except qwenaudio.DownloadError as e:\n    print(e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "qa")], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert out.startswith("could not download Qwen/Qwen-Audio:") and "To place the files by hand" in out
