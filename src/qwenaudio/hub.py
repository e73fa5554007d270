"""Finding and fetching the official checkpoints: local directories, the Hugging Face cache, and downloads.

`load("Qwen/Qwen-Audio")` takes a repo id; `load("weights/Qwen-Audio")` or `load(Path(...))` a directory. A name
that looks like a path is always a path, so a mistyped directory is reported as missing instead of starting a
16.8 GB download of a repo that does not exist. A repo id is looked up where the user's other tools (transformers,
`huggingface-cli download`) keep it: the Hugging Face cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
`~/.cache/huggingface/hub`), and downloaded there when missing, as they do. `$QWENAUDIO_HOME` replaces the cache
with a plain folder of checkpoint directories (`$QWENAUDIO_HOME/Qwen-Audio`), for those who place files by hand.
Both families' official repos are known (`OFFICIAL_REPOS`: Qwen-Audio, Qwen-Audio-Chat, Qwen2-Audio-7B and
Qwen2-Audio-7B-Instruct); config.json says which family a checkpoint is.

Only the files qwenaudio reads are fetched: configs, vocabulary (qwen.tiktoken; Qwen2-Audio's vocab.json and
merges.txt), mel filters and the bf16 safetensors shards (16.8 GB). The official remote code (`*.py`) is not needed
and is skipped. Downloading needs `huggingface_hub` (`pip install huggingface_hub`, also the `hub` extra of
qwenaudio); finding a cached checkpoint does not.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .core import model
from .core.checkpoint import INDEX_FILE, shard_files
from .core.checks import expect, renamed
from .core.errors import CheckpointError, DownloadError, InputError, QwenAudioError
from .core.families import QWEN2_AUDIO, QWEN_AUDIO, Family, family_of, read_config
from .lora import load_adapter, read_adapter
from .progress import loading

OFFICIAL_REPOS = ("Qwen/Qwen-Audio", "Qwen/Qwen-Audio-Chat", "Qwen/Qwen2-Audio-7B", "Qwen/Qwen2-Audio-7B-Instruct")
REPO_FAMILIES = dict(zip(OFFICIAL_REPOS, (QWEN_AUDIO, QWEN_AUDIO, QWEN2_AUDIO, QWEN2_AUDIO)))
FILE_PATTERNS = ["*.json", "*.safetensors", "qwen.tiktoken", "mel_filters.npz", "merges.txt"]
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, as the Hub spells repo ids


def weights_home() -> Path | None:
    """`$QWENAUDIO_HOME` when set: repo ids are then looked up and downloaded there, one directory per repo."""
    home = os.environ.get("QWENAUDIO_HOME")
    return Path(home).expanduser() if home else None


def home_dir(repo_id: str) -> Path | None:
    """Where `$QWENAUDIO_HOME` holds `repo_id` (and downloads it to): the folder of the repo's name; None when
    unset."""
    home = weights_home()
    return home / repo_id.split("/")[1] if home is not None else None


def hf_cache() -> Path:
    """The Hugging Face hub cache, found as huggingface_hub finds it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    return Path(os.environ.get("HF_HOME") or xdg / "huggingface").expanduser() / "hub"


def cached(repo_id: str, revision: str = "main") -> Path | None:
    """The snapshot directory of `repo_id` in the Hugging Face cache, when the cache holds a complete checkpoint
    for `revision` (a branch name or a commit hash), else None."""
    expect(repo_id, str, "repo_id", "a Hugging Face repo id (owner/name)")
    repo = hf_cache() / f"models--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / revision
    commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else revision
    snapshot = repo / "snapshots" / commit
    try:
        shard_files(snapshot)
    except CheckpointError:
        return None
    return snapshot if (snapshot / "config.json").is_file() else None


def download(repo_id: str, local_dir: str | Path | None = None, *, revision: str | None = None) -> Path:
    """Download `repo_id` (e.g. "Qwen/Qwen-Audio") into the Hugging Face cache, or into `local_dir` when given,
    and return the checkpoint directory once every shard named by the index is present.

    Needs `huggingface_hub` and a network; otherwise raises `DownloadError` saying how to place the files by hand.
    """
    local_dir = Path(local_dir) if local_dir is not None else None
    where = local_dir or hf_cache()
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise DownloadError(f"downloading {repo_id} needs huggingface_hub: pip install huggingface_hub\n"
                            + _by_hand(repo_id)) from None
    try:
        path = Path(snapshot_download(repo_id, revision=revision, local_dir=local_dir, allow_patterns=FILE_PATTERNS))
    except Exception as e:  # the hub raises many kinds (offline mode, HTTP, connection); all mean "not fetched"
        raise DownloadError(f"could not download {repo_id} into {where}: {type(e).__name__}: {e}\n"
                            + _by_hand(repo_id)) from e
    try:
        shard_files(path)
    except CheckpointError as e:
        raise DownloadError(f"download of {repo_id} is incomplete: {e}\n" + _by_hand(repo_id)) from e
    return path


def _by_hand(repo_id: str) -> str:
    if REPO_FAMILIES.get(repo_id) is QWEN2_AUDIO:
        files, shards = "preprocessor_config.json, tokenizer_config.json, vocab.json, merges.txt", "00005"
    else:
        files, shards = "tokenizer_config.json, qwen.tiktoken, mel_filters.npz", "00009"
    return (
        f"To place the files by hand, copy from https://huggingface.co/{repo_id} into one directory: config.json, "
        f"generation_config.json, {files}, {INDEX_FILE} and every model-0000N-of-{shards}.safetensors shard it "
        "names (weights/README.md in the qwenaudio repository lists them), and pass that directory."
    )


def looks_like_path(name: str | Path) -> bool:
    """Path objects, and strings that are not an `owner/name` repo id or whose `owner` is a local directory."""
    if isinstance(name, Path) or not REPO_ID.fullmatch(name) or ".." in name:
        return True
    return Path(name).exists() or Path(name.split("/")[0]).is_dir()


def resolve(name: str | Path) -> Path:
    """The checkpoint directory `name` means: a path as it is (it must exist), or a repo id found in
    `$QWENAUDIO_HOME` or the Hugging Face cache, or else downloaded there."""
    if not isinstance(name, (str, Path)) or not str(name):
        raise InputError(f"load() needs a checkpoint directory or a repo id like {OFFICIAL_REPOS[0]!r}, "
                         f"got {name!r}")
    if looks_like_path(name):
        path = Path(name).expanduser()
        if not path.exists():
            repo = OFFICIAL_REPOS[0]
            raise CheckpointError(
                f"no checkpoint at {path}: no such directory (a repo id looks like {repo!r}).\nGet the weights with: "
                f"python -c \"import qwenaudio; print(qwenaudio.download('{repo}'))\" (needs pip install "
                f"huggingface_hub), and pass the directory it prints.\n{_by_hand(repo)}")
        return path
    local = home_dir(name)
    if local is not None and (local / "config.json").exists():
        return local
    try:
        return (local is None and cached(name)) or download(name, local)
    except DownloadError as e:
        raise DownloadError(f"{name}: no such local directory, and as a repo id: {e}") from e


def family_of_checkpoint(name: str | Path) -> Family | None:
    """The family of the checkpoint `name` means, where that is known without downloading: from the config.json of
    a directory, of a repo in $QWENAUDIO_HOME or the cache, else from an official repo id; None when unknown (or
    unreadable: loading it says why). Commands check their options against it before the model loads."""
    if not isinstance(name, (str, Path)) or not str(name):
        return None
    if looks_like_path(name):
        place = Path(name).expanduser()
    else:
        place = home_dir(name) or cached(name)
    try:
        if place is not None and (place / "config.json").is_file():
            return family_of(read_config(place))
    except QwenAudioError:
        return None
    return REPO_FAMILIES.get(str(name))


def load(name: str | Path, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None, *,
         quantize: str | None = None, true_positions: bool = False, adapter: str | Path | None = None,
         progress: bool = True, int8: bool = False, int4: bool = False) -> model.QwenAudio:
    """Load a checkpoint directory or a repo id ("Qwen/Qwen-Audio", "Qwen/Qwen2-Audio-7B-Instruct", …, found in
    $QWENAUDIO_HOME or the Hugging Face cache and downloaded there when missing: `resolve`) onto `device` (default:
    CUDA if available) in `dtype` (a torch dtype or a name like "bf16"; default: bf16 where the CPU or GPU runs it
    natively, else fp32 / fp16). The family (Qwen-Audio or Qwen2-Audio) is config.json's to say.

    `quantize="int8"` quantizes the decoder's linears as they are read: the full model then needs about 10.7 GiB at
    its peak instead of 15.5 in bf16 (BENCHMARKS.md); `quantize="int4"` to int4 (inference only). A checkpoint written
    by `qwenaudio quantize` loads as it was quantized without asking (`int8=True` / `int4=True`: deprecated
    spellings). `adapter` applies a LoRA adapter directory (ours or peft's
    format, `qwenaudio.lora`) unmerged; it is read and checked before the model loads.
    `progress` draws a bar on a terminal (`progress.loading`). The core's `qwenaudio.core.model.load_model` does the
    same from a directory, with a progress callback of your own."""
    device, dtype = model.as_device(device), model.as_dtype(dtype)  # bad arguments fail before any download
    quantize = model.quantize_option(quantize, int8, int4)
    lora = None if adapter is None else read_adapter(adapter)  # a truncated adapter fails before a 16 GB load
    loaded = model.load_model(resolve(name), device, dtype, quantize=quantize, true_positions=true_positions,
                              progress=loading if progress else None)
    return loaded if lora is None else load_adapter(loaded, lora)


__getattr__ = renamed(__name__, {"report_progress": ("progress.loading", loading)})  # evaluation has its own
