"""Shared fixtures: the real Qwen vocabulary, a tokenizer over it, and a tiny official-layout checkpoint.

The vocabulary comes from the `dashscope` wheel (a test extra, installed by ./scripts/test), which ships Qwen's
qwen.tiktoken; its md5 is checked so a changed upload cannot slip through.
"""

import hashlib
import importlib.util
from pathlib import Path

import pytest

from qwenaudio import Tokenizer
from qwenaudio.testing import make_tiny_checkpoint

VOCAB_MD5 = "f0bffbad8c413a41d51fe6da4a7e99d7"  # qwen.tiktoken of every checkpoint (docs/MODEL.md#bpe)
ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
SHARED_AUDIO = ROOT.parent / "shared" / "audio"


@pytest.fixture(scope="session")
def vocab_file() -> Path:
    spec = importlib.util.find_spec("dashscope")
    if spec is None:
        pytest.fail("the dashscope wheel (test extra) is not installed: run ./scripts/test")
    path = Path(spec.origin).parent / "resources" / "qwen.tiktoken"
    assert hashlib.md5(path.read_bytes()).hexdigest() == VOCAB_MD5, f"{path} is not Qwen's vocabulary"
    return path


@pytest.fixture(scope="session")
def tokenizer(vocab_file) -> Tokenizer:
    return Tokenizer(vocab_file)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, vocab_file) -> Path:
    """A read-only tiny checkpoint shared by the whole session (copy it before changing anything)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "Qwen-Audio-tiny", seed=0, vocab_file=vocab_file)


@pytest.fixture(scope="session")
def shared_audio() -> Path:
    if not SHARED_AUDIO.is_dir():
        pytest.skip(reason="the shared recordings (../shared/audio) are not on this machine")
    return SHARED_AUDIO
