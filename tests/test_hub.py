"""Finding checkpoints: paths stay paths, repo ids come from $QWENAUDIO_HOME or the Hugging Face cache (laid out as
huggingface_hub lays it out) and are downloaded there when missing (through a stand-in hub module), offline mode,
and the missing extra."""

import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import qwenaudio
from qwenaudio.core import model as core_model
from qwenaudio.core.checkpoint import quantization_of
from qwenaudio import CheckpointError, DownloadError, InputError
from qwenaudio.hub import FILE_PATTERNS, hf_cache, resolve, weights_home
from qwenaudio.testing import make_tiny_checkpoint

from .conftest import reference


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path):
    """Every test gets its own empty Hugging Face cache and no $QWENAUDIO_HOME."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("QWENAUDIO_HOME", raising=False)


def fake_hub(monkeypatch, write):
    """A stand-in huggingface_hub whose snapshot_download writes a checkpoint where the real one would: into
    `local_dir`, or into the cache's snapshots/<commit> with refs/<revision> naming the commit."""
    calls = []

    def snapshot_download(repo_id, revision=None, local_dir=None, allow_patterns=None):
        calls.append((repo_id, revision, local_dir, allow_patterns))
        if local_dir is None:
            repo = hf_cache() / f"models--{repo_id.replace('/', '--')}"
            (repo / "refs").mkdir(parents=True, exist_ok=True)
            (repo / "refs" / (revision or "main")).write_text("0123abcd")
            local_dir = repo / "snapshots" / "0123abcd"
        shutil.rmtree(local_dir, ignore_errors=True)  # the real hub fills in what is missing; this one starts over
        write(Path(local_dir))
        return str(local_dir)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    return calls


def test_download_goes_into_the_hugging_face_cache(monkeypatch, tmp_path):
    calls = fake_hub(monkeypatch, make_tiny_checkpoint)
    path = qwenaudio.download("Qwen/Qwen-Audio", revision="main")
    assert path == tmp_path / "hf" / "hub" / "models--Qwen--Qwen-Audio" / "snapshots" / "0123abcd"
    assert calls == [("Qwen/Qwen-Audio", "main", None, FILE_PATTERNS)]
    assert len(qwenaudio.load_checkpoint(path, device="meta")) == 59


def test_download_into_a_directory(monkeypatch, tmp_path):
    calls = fake_hub(monkeypatch, make_tiny_checkpoint)
    assert qwenaudio.download("Qwen/Qwen-Audio", tmp_path / "qa") == tmp_path / "qa"
    assert calls == [("Qwen/Qwen-Audio", None, tmp_path / "qa", FILE_PATTERNS)]


def test_repo_id_found_in_the_cache_is_not_downloaded(monkeypatch, tmp_path):
    fake_hub(monkeypatch, make_tiny_checkpoint)
    first = resolve("Qwen/Qwen-Audio")  # downloads into the cache
    calls = fake_hub(monkeypatch, make_tiny_checkpoint)
    assert resolve("Qwen/Qwen-Audio") == first and calls == []  # what transformers put there is found too
    (first / "model-00002-of-00003.safetensors").unlink()  # an incomplete snapshot is fetched again
    assert resolve("Qwen/Qwen-Audio") == first and len(calls) == 1


def test_qwenaudio_home_replaces_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("QWENAUDIO_HOME", str(tmp_path / "home"))
    assert weights_home() == tmp_path / "home"
    calls = fake_hub(monkeypatch, make_tiny_checkpoint)
    assert resolve("Qwen/Qwen-Audio-Chat") == tmp_path / "home" / "Qwen-Audio-Chat"
    assert resolve("Qwen/Qwen-Audio-Chat") == tmp_path / "home" / "Qwen-Audio-Chat" and len(calls) == 1
    make_tiny_checkpoint(tmp_path / "home" / "Qwen-Audio")  # placed by hand
    assert resolve("Qwen/Qwen-Audio") == tmp_path / "home" / "Qwen-Audio" and len(calls) == 1


@pytest.mark.parametrize("name", ["weights/Qwen-Audio", "./mymodel", "../elsewhere/model", "/abs/path", "~/x",
                                  "a/b/c", Path("Qwen/Qwen-Audio")])
def test_paths_are_paths(monkeypatch, tmp_path, name):
    """A name that looks like a path never starts a download: "weights/Qwen-Audio" is a path because ./weights is a
    directory here, "./mymodel" because of its "./"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    calls = fake_hub(monkeypatch, make_tiny_checkpoint)
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*: no such directory"):
        resolve(name)
    assert calls == []


def test_unknown_repo_id_says_it_is_no_directory_either(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)

    def snapshot_download(repo_id, **_):
        raise RuntimeError("404 Repository Not Found")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    with pytest.raises(DownloadError, match=r"weights/Qwen-Audio: no such local directory, and as a repo id: could "
                                            r"not download weights/Qwen-Audio into .*404 Repository Not Found"):
        resolve("weights/Qwen-Audio")


@pytest.mark.parametrize("name", [None, 3, ""])
def test_a_name_is_needed(name):
    with pytest.raises(InputError, match="load\\(\\) needs a checkpoint directory or a repo id"):
        resolve(name)


def test_incomplete_download(monkeypatch, tmp_path):
    def write_then_lose_a_shard(d):
        make_tiny_checkpoint(d)
        (d / "model-00002-of-00003.safetensors").unlink()

    fake_hub(monkeypatch, write_then_lose_a_shard)
    with pytest.raises(DownloadError, match="download of Qwen/Qwen-Audio is incomplete: .*model-00002-of-00003"):
        qwenaudio.download("Qwen/Qwen-Audio", tmp_path / "qa")


def test_without_hub_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes `import huggingface_hub` fail
    with pytest.raises(DownloadError, match=r"needs huggingface_hub: pip install huggingface_hub\n") as e:
        qwenaudio.download("Qwen/Qwen-Audio", tmp_path)
    assert "To place the files by hand" in str(e.value) and "weights/README.md" in str(e.value)


@pytest.mark.slow
def test_offline(tmp_path):
    """The real huggingface_hub in offline mode (set before it is imported, so in a fresh process)."""
    reference("huggingface_hub")
    code = (
        "import qwenaudio, sys\n"
        "try:\n    qwenaudio.download('Qwen/Qwen-Audio', sys.argv[1])\n"
        "except qwenaudio.DownloadError as e:\n    print(e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "qa")], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert out.startswith("could not download Qwen/Qwen-Audio into") and "To place the files by hand" in out


def test_an_adapter_is_read_before_the_model_loads(monkeypatch, tmp_path):
    """A truncated or missing adapter is found in a second, not after a 16 GB checkpoint has loaded."""
    loads = []
    monkeypatch.setattr(qwenaudio.hub.model, "load_model", lambda *a, **k: loads.append(a))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"peft_type": "LO')
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 8)
    for adapter, message in ((tmp_path / "none", "no adapter directory"), (tmp_path / "adapter", "truncated")):
        with pytest.raises(CheckpointError, match=message):
            qwenaudio.load(tmp_path / "ckpt", device="cpu", progress=False, adapter=adapter)
    with pytest.raises(InputError, match="adapter"):
        qwenaudio.load(tmp_path / "ckpt", device="cpu", progress=False, adapter=123)
    assert loads == []


# --- load's arguments ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantize_replaces_the_old_booleans_which_warn(tiny_weights, method):
    new = qwenaudio.load(tiny_weights, dtype=torch.float32, device="cpu", quantize=method, progress=False)
    with pytest.warns(DeprecationWarning, match=f"{method}=True is deprecated: pass quantize='{method}'"):
        old = qwenaudio.load(tiny_weights, dtype=torch.float32, device="cpu", progress=False, **{method: True})
    with pytest.warns(DeprecationWarning, match=f"{method}=True is deprecated"):
        decoder = qwenaudio.load_decoder(tiny_weights, dtype=torch.float32, **{method: True})
    assert quantization_of(new) == quantization_of(old) == quantization_of(decoder) == method
    ids = torch.randint(0, 151643, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(new.decoder.logits(ids), old.decoder.logits(ids))
    with pytest.raises(InputError, match="quantize='int2': choose one of 'int8', 'int4' or None"):
        qwenaudio.load(tiny_weights, device="cpu", quantize="int2", progress=False)


def test_core_load_is_renamed_load_model_and_the_old_name_warns(tiny_weights):
    with pytest.warns(DeprecationWarning, match="use core.model.load_model"):
        old = core_model.load
    assert old is core_model.load_model
    assert quantization_of(old(tiny_weights, "cpu", torch.float32)) is None


def test_hub_report_progress_is_renamed_progress_loading_and_the_old_name_warns(capsys):
    from qwenaudio import hub

    with pytest.warns(DeprecationWarning, match="use progress.loading"):
        hub.report_progress(2, 2)
    assert capsys.readouterr().err == "loaded 2 weight tensors\n"
