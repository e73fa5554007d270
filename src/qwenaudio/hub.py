"""Fetching the official checkpoints from the Hugging Face Hub (optional extra `qwenaudio[hub]`).

Only the files qwenaudio reads are fetched: configs, vocabulary, mel filters and the bf16 safetensors shards
(16.8 GB). The official remote code (`*.py`) is not needed and is skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

from .checkpoint import INDEX_FILE, shard_files
from .errors import CheckpointError, DownloadError

OFFICIAL_REPOS = ("Qwen/Qwen-Audio", "Qwen/Qwen-Audio-Chat")
FILE_PATTERNS = ["*.json", "*.safetensors", "qwen.tiktoken", "mel_filters.npz"]


def weights_home() -> Path:
    """Where checkpoints live by default: `$QWENAUDIO_HOME`, else `weights/` under the working directory."""
    return Path(os.environ.get("QWENAUDIO_HOME", "weights"))


def download(repo_id: str, local_dir: str | Path | None = None, *, revision: str | None = None) -> Path:
    """Download `repo_id` (e.g. "Qwen/Qwen-Audio") into `local_dir` (default `weights_home()/<name>`).

    Needs `huggingface_hub` and a network; otherwise raises `DownloadError` saying how to place the files by hand.
    Returns the directory once every shard named by the index is present.
    """
    local_dir = Path(local_dir) if local_dir is not None else weights_home() / repo_id.split("/")[-1]
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise DownloadError(
            f"downloading {repo_id} needs huggingface_hub: pip install 'qwenaudio[hub]'.\n" + _by_hand(repo_id, local_dir)
        ) from None
    try:
        snapshot_download(repo_id, revision=revision, local_dir=local_dir, allow_patterns=FILE_PATTERNS)
    except Exception as e:  # the hub raises many kinds (offline mode, HTTP, connection); all mean "not fetched"
        raise DownloadError(f"could not download {repo_id}: {type(e).__name__}: {e}\n" + _by_hand(repo_id, local_dir)) from e
    try:
        shard_files(local_dir)
    except CheckpointError as e:
        raise DownloadError(f"download of {repo_id} is incomplete: {e}\n" + _by_hand(repo_id, local_dir)) from e
    return local_dir


def _by_hand(repo_id: str, local_dir: Path) -> str:
    return (
        f"To place the files by hand, copy from https://huggingface.co/{repo_id} into {local_dir}/: config.json, "
        f"generation_config.json, tokenizer_config.json, qwen.tiktoken, mel_filters.npz, {INDEX_FILE} and every "
        "model-0000N-of-00009.safetensors shard it names (see weights/README.md)."
    )


def resolve(name: str | Path) -> Path:
    """A checkpoint directory for `name`: an existing directory as is; a repo id ("Qwen/Qwen-Audio") as
    `weights_home()/Qwen-Audio`, downloaded there first when it is not present."""
    path = Path(name)
    if path.is_dir():
        return path
    if isinstance(name, str) and name.count("/") == 1 and not path.exists():
        local = weights_home() / name.split("/")[1]
        return local if (local / "config.json").exists() else download(name, local)
    raise DownloadError(f"{name}: no such checkpoint directory, and not a Hugging Face repo id like "
                        f"{OFFICIAL_REPOS[0]!r}.\n" + _by_hand(OFFICIAL_REPOS[0], path))
