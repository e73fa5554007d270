"""Fuzz tests: random and corrupted bytes into every reader of untrusted input; only our own errors may come out.

What is fuzzed, and the outcomes allowed:
- `load_audio` on random bytes and on real audio (small wav / flac / ogg / mp3 written here, and the first 64 KB of
  each shared recording) with flipped, overwritten, cut and inserted bytes, given as bytes, as a path and as a file
  object: a finite float32 waveform [samples], or `AudioError`.
- the checkpoint reader (`load_checkpoint` on the meta device and on the CPU, and `qwenaudio.load`) on a tiny
  checkpoint with corrupted safetensors headers, cut shards, and corrupted or ill-typed index, config.json and
  generation_config.json: the checkpoint's own tensors, or `CheckpointError` / `ConfigError`.
- the tokenizer on corrupted qwen.tiktoken files (`TokenizerError`, or a vocabulary that still works), and on random
  text, tags, audio spans and token ids: a result or `TokenizerError`.
Any other exception, a crash or a hang is a bug.

Examples are derandomized: every run tries the same inputs, so a CI failure reproduces anywhere. Finding new cases
is the job of a longer, random run: `QWENAUDIO_FUZZ=50` multiplies every example count by 50 and draws fresh
inputs each time (hypothesis prints the failing one, with a `@reproduce_failure` line to replay it).
"""

import io
import json
import os
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qwenaudio
from qwenaudio import AudioError, CheckpointError, ConfigError, QwenAudioError, Tokenizer, TokenizerError
from qwenaudio.audio import load_audio
from qwenaudio.checkpoint import INDEX_FILE, load_checkpoint
from qwenaudio.config import GenerationConfig
from qwenaudio.testing import make_tiny_checkpoint
from qwenaudio.tokenizer import AUDIO_END, AUDIO_START, SPECIAL_TOKENS

SCALE = int(os.environ.get("QWENAUDIO_FUZZ", "1"))


def fuzz(examples: int):
    """`examples` derandomized examples (times QWENAUDIO_FUZZ, then random); no deadline: file I/O times vary."""
    return settings(max_examples=examples * SCALE, derandomize=SCALE == 1, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def corrupted(draw, data: bytes, within: int | None = None) -> bytes:
    """`data` after 1–4 edits: a flipped bit, 4 bytes overwritten by an extreme value (a size field's worst case),
    random bytes inserted, or the end cut off. Edits other than cuts land in the first `within` bytes (the header)
    when given, else mostly in the first 512."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "stamp", "insert", "cut"]))
        limit = len(out) if kind == "cut" or within is None else min(within, len(out))
        at = draw(st.one_of(st.integers(0, 511), st.integers(0, 2**32))) % (limit + 1)
        if kind == "flip" and at < len(out):
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "stamp":
            out[at:at + 4] = draw(st.sampled_from([b"\0\0\0\0", b"\xff\xff\xff\xff", b"\xff\xff\xff\x7f", b"\1\0\0\0"]))
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del out[at:]
    return bytes(out)


# --- load_audio ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def audio_files(shared_audio) -> dict[str, bytes]:
    """Small files in the formats soundfile writes, plus the first 64 KB of each real recording."""
    t = np.arange(8000) / 16000
    tone = 0.3 * np.sin(2 * np.pi * 440 * t)
    files = {}
    for fmt, subtype, rate, channels in [("WAV", "PCM_16", 16000, 1), ("WAV", "FLOAT", 44100, 2),
                                         ("FLAC", "PCM_24", 22050, 1), ("OGG", "VORBIS", 48000, 2),
                                         ("MP3", "MPEG_LAYER_III", 24000, 1)]:
        buffer = io.BytesIO()
        sf.write(buffer, np.stack([tone] * channels, axis=1), rate, format=fmt, subtype=subtype)
        files[f"{fmt}/{subtype}"] = buffer.getvalue()
    for path in sorted(shared_audio.glob("*")):
        if path.suffix in (".wav", ".flac", ".mp3"):
            files[path.name] = path.read_bytes()[:65536]
    return files


def waveform_or_audio_error(source) -> None:
    try:
        audio = load_audio(source)
    except AudioError:
        return
    assert audio.dtype == torch.float32 and audio.ndim == 1 and len(audio) > 0 and torch.isfinite(audio).all()


def as_form(data: bytes, form: str, scratch: Path):
    if form == "path":
        path = scratch / "clip"
        path.write_bytes(data)
        return str(path)
    return data if form == "bytes" else io.BytesIO(data)


@fuzz(60)
@given(data=st.binary(max_size=4096), form=st.sampled_from(["bytes", "path", "file"]))
def test_load_audio_random_bytes(data, form, tmp_path_factory):
    waveform_or_audio_error(as_form(data, form, tmp_path_factory.getbasetemp()))


@fuzz(150)
@given(draw=st.data(), form=st.sampled_from(["bytes", "path", "file"]))
def test_load_audio_corrupted_files(audio_files, draw, form, tmp_path_factory):
    name = draw.draw(st.sampled_from(sorted(audio_files)), label="file")
    data = draw.draw(corrupted(audio_files[name]), label="corrupted")
    waveform_or_audio_error(as_form(data, form, tmp_path_factory.getbasetemp()))


@pytest.mark.parametrize("rate, match", [(8001, "the exact ratio 16000/8001 needs 16000 filters of 8035 taps"),
                                         (999, "upsampling by more than 16x is refused")])
def test_load_audio_refuses_rates_that_would_exhaust_memory(rate, match):
    """Found by fuzzing: a flipped bit in a header's rate asked the resampler for 1 GB of filters (8001 Hz) or
    made 64 KB of 1 Hz samples into 4 GB of 16 kHz ones; torch raised RuntimeError or the process was killed."""
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(4000), rate, format="WAV")
    with pytest.raises(AudioError, match=f"cannot resample {rate} Hz audio to 16000 Hz: {match}"):
        load_audio(buffer.getvalue())
