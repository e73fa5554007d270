"""Shared fixtures and the rule for reference packages.

The tests need only the core dependencies (torch, numpy, safetensors, tiktoken, soundfile) plus pytest and
hypothesis: the encoder and decoder recordings in tests/golden/ are compared with those alone. Live comparisons need
the reference packages of the `test` extra (openai-whisper, transformers, scipy, dashscope, huggingface_hub) and the
ffmpeg program, the translation and caption scores need the `eval` extra's packages (sacreBLEU with MeCab for
Japanese, pycocoevalcap) and the java program, the live-server tests the `serve` extra's packages and the official
`openai` client, and every test that tokenizes text needs Qwen's vocabulary, which comes with dashscope. A test
asks for one with `reference(...)` or `reference_program(...)`, never at import time, so a missing one affects only
the tests that use it: they are skipped, with the package named, or, under CI=true, fail, so CI cannot pass by
skipping. ./scripts/test installs them all.
"""

import hashlib
import importlib
import json
import os
import shutil
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest
import torch

from qwenaudio import Tokenizer, load_audio
from qwenaudio.testing import make_tiny_checkpoint, make_tiny_qwen2_checkpoint

VOCAB_MD5 = "f0bffbad8c413a41d51fe6da4a7e99d7"  # qwen.tiktoken of every checkpoint (docs/MODEL.md#bpe)
ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
SHARED_AUDIO = ROOT.parent / "shared" / "audio"

# The pip name of each reference package, by the name it is imported as.
REFERENCES = {"whisper": "openai-whisper", "transformers": "transformers", "scipy": "scipy",
              "dashscope": "dashscope", "huggingface_hub": "huggingface_hub", "sacrebleu": "sacrebleu",
              "MeCab": "mecab-python3", "ipadic": "ipadic", "pycocoevalcap": "pycocoevalcap",
              "peft": "peft", "openai": "openai", "fastapi": "fastapi", "uvicorn": "uvicorn",
              "python_multipart": "python-multipart", "prometheus_client": "prometheus-client"}


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker takes its share of the cores for torch's threads, and so do the processes it
    starts (the command line, the examples, the scripts), unless OMP_NUM_THREADS says otherwise.

    Each process would otherwise take every core: two workers on two cores run four OpenMP threads, whose barriers
    wait on threads that are not running, and a training step took 7-10x as long as with one thread each."""
    workers = getattr(config, "workerinput", {}).get("workercount")
    if workers and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, torch.get_num_threads() // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


def missing_reference(what: str) -> NoReturn:
    """Skip the running test because `what` is not installed; under CI=true, fail it instead."""
    message = (f"{what} is not installed: it is a reference the tests compare against; ./scripts/test installs it "
               "(the `test` extra)")
    if in_ci():
        pytest.fail(f"{message}. CI=true, so a missing reference fails instead of skipping", pytrace=False)
    pytest.skip(reason=message)


def reference(module: str) -> ModuleType:
    """Import a reference package (or one of its submodules, e.g. "scipy.signal") for the calling test.

    Only the absence of `module` or a package on its path counts as missing: a reference that is installed but
    fails to import something else (its own dependency) raises that error.
    """
    package = module.partition(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if not (module == e.name or module.startswith(f"{e.name}.")):
            raise
        name = REFERENCES[package]
        missing_reference(name if name == module else f"{name} (import {module})")


def reference_program(name: str) -> str:
    """The path of a reference program on $PATH (ffmpeg: the official audio loader runs it)."""
    path = shutil.which(name)
    if path is None:
        missing_reference(f"the {name} program")
    return path


def qwen_vocabulary() -> Path:
    """Qwen's vocabulary, as the `dashscope` wheel ships it (dashscope/resources/qwen.tiktoken); its md5 is checked
    so a changed upload cannot slip through."""
    path = Path(reference("dashscope").__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        missing_reference(f"Qwen's vocabulary ({path}, part of the dashscope wheel)")
    assert hashlib.md5(path.read_bytes()).hexdigest() == VOCAB_MD5, f"{path} is not Qwen's vocabulary"
    return path


@pytest.fixture(scope="session")
def vocab_file() -> Path:
    return qwen_vocabulary()


@pytest.fixture(scope="session")
def tokenizer(vocab_file) -> Tokenizer:
    return Tokenizer(vocab_file)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, vocab_file) -> Path:
    """A read-only tiny checkpoint shared by the whole session (copy it before changing anything)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "Qwen-Audio-tiny", seed=0, vocab_file=vocab_file)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """tiny_ckpt's weights (they depend on the seed alone) with the byte-level stand-in vocabulary, for tests that
    feed token ids, mels or waveforms and never text, so they run without dashscope. Read-only, like tiny_ckpt."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-weights") / "Qwen-Audio-tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2_ckpt(tmp_path_factory, vocab_file) -> Path:
    """A tiny random Qwen2-Audio (base) checkpoint in the published layout, with Qwen's real vocabulary converted to
    vocab.json + merges.txt. Read-only: tests that change files copy it first."""
    return make_tiny_qwen2_checkpoint(tmp_path_factory.mktemp("tiny-qwen2") / "Qwen2-Audio-tiny", seed=0,
                                      vocab_file=vocab_file)


@pytest.fixture(scope="session")
def tiny_qwen2_instruct_ckpt(tmp_path_factory, vocab_file) -> Path:
    """The same, with the Instruct checkpoint's generation config (stops on <|im_end|>). Read-only."""
    return make_tiny_qwen2_checkpoint(tmp_path_factory.mktemp("tiny-qwen2-instruct") / "Qwen2-Audio-Instruct-tiny",
                                      seed=1, vocab_file=vocab_file, instruct=True)


@pytest.fixture(scope="session")
def served_v1(tmp_path_factory, vocab_file):
    """A live server (tests/serving.py) on a tiny Qwen-Audio-Chat checkpoint, shared by the session."""
    from .serving import serve_checkpoint
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("served") / "Qwen-Audio-Chat-tiny", vocab_file=vocab_file,
                                chat=True)
    with serve_checkpoint(path) as served:
        yield served


@pytest.fixture(scope="session")
def served_qwen2(tiny_qwen2_instruct_ckpt):
    """A live server on the tiny Qwen2-Audio-Instruct checkpoint, shared by the session."""
    from .serving import serve_checkpoint
    with serve_checkpoint(tiny_qwen2_instruct_ckpt) as served:
        yield served


@pytest.fixture(scope="session")
def shared_audio() -> Path:
    if not SHARED_AUDIO.is_dir():
        pytest.skip(reason="the shared recordings (../shared/audio) are not on this machine")
    return SHARED_AUDIO


def golden_prompt_logits(case: str, *models) -> list[torch.Tensor]:
    """Each model's logits at the real positions of a golden generation prompt (teacher forced), [positions, vocab]:
    how the quantization tests compare variants of one checkpoint."""
    c = json.loads((GOLDEN / "generation_official.json").read_text(encoding="utf-8"))["generation"][case]
    clips = [load_audio(ROOT / u) for urls in c["audio_urls"] for u in urls]
    batch = models[0].tokenizer.encode_batch(c["texts"], audio_spans=c["audio_span_tokens"])
    real = batch.attention_mask.bool()
    with torch.no_grad():
        return [m.decoder.logits(batch.input_ids, batch.attention_mask, m.encode_audio(clips))[real] for m in models]

