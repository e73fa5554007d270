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
inputs each time (hypothesis prints the failing example and the seed that replays it). `--hypothesis-show-statistics`
shows how often each outcome came up.
"""

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import qwenaudio
from qwenaudio import AudioError, CheckpointError, ConfigError, QwenAudioError, Tokenizer, TokenizerError
from qwenaudio.core.audio import load_audio
from qwenaudio.core.checkpoint import INDEX_FILE, load_checkpoint
from qwenaudio.core.config import GenerationConfig, QwenAudioConfig
from qwenaudio.core.tokenizer import AUDIO_END, AUDIO_START, NUM_BPE_RANKS, SPECIAL_TOKENS
from qwenaudio.testing import make_tiny_checkpoint, tiny_config

from .conftest import reference

SCALE = int(os.environ.get("QWENAUDIO_FUZZ", "1"))


def fuzz(examples: int):
    """`examples` derandomized examples (times QWENAUDIO_FUZZ, then random); no deadline: file I/O times vary."""
    return settings(max_examples=examples * SCALE, derandomize=SCALE == 1, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


EXTREMES = [b"\0\0\0\0", b"\xff\xff\xff\xff", b"\xff\xff\xff\x7f", b"\1\0\0\0"]  # a size field's worst cases
EDITS = st.lists(st.tuples(st.sampled_from(["flip", "write", "insert", "cut"]),
                           st.one_of(st.integers(0, 511), st.integers(0, 2**32)),  # mostly in the header
                           st.one_of(st.sampled_from(EXTREMES), st.binary(min_size=1, max_size=16))),
                 min_size=1, max_size=4)


def corrupt(data: bytes, edits: list[tuple[str, int, bytes]], within: int | None = None) -> bytes:
    """`data` after `edits` (kind, position, bytes): a flipped bit, bytes overwritten or inserted, or the end cut
    off. Positions wrap around the length; edits other than cuts land in the first `within` bytes when given.
    (The edits, not the bytes, are what hypothesis draws: a failing example then prints in a few lines.)"""
    out = bytearray(data)
    for kind, at, payload in edits:
        at %= (len(out) if kind == "cut" or within is None else min(within, len(out))) + 1
        if kind == "flip" and at < len(out):
            out[at] ^= 1 << payload[0] % 8
        elif kind == "write":
            out[at:at + len(payload)] = payload
        elif kind == "insert":
            out[at:at] = payload
        elif kind == "cut":
            del out[at:]
    return bytes(out)


class Quiet(dict):
    """A dict that prints as its keys: hypothesis prints a failing example's fixtures too."""

    def __repr__(self) -> str:
        return f"<{', '.join(map(str, self))}>"


# --- load_audio ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def audio_files(shared_audio) -> Quiet:
    """Small files in the formats soundfile writes, plus the first 64 KB of each real recording."""
    t = np.arange(8000) / 16000
    tone = 0.3 * np.sin(2 * np.pi * 440 * t)
    files = Quiet()
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
        event("AudioError")  # --hypothesis-show-statistics counts the outcomes
        return
    event("waveform")
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
@given(draw=st.data(), edits=EDITS, form=st.sampled_from(["bytes", "path", "file"]))
def test_load_audio_corrupted_files(audio_files, draw, edits, form, tmp_path_factory):
    name = draw.draw(st.sampled_from(sorted(audio_files)), label="file")
    waveform_or_audio_error(as_form(corrupt(audio_files[name], edits), form, tmp_path_factory.getbasetemp()))


@pytest.mark.parametrize("rate, match", [(8001, "the exact ratio 16000/8001 needs 16000 filters of 8035 taps"),
                                         (999, "upsampling by more than 16x is refused")])
def test_load_audio_refuses_rates_that_would_exhaust_memory(rate, match):
    """Found by fuzzing: a flipped bit in a header's rate asked the resampler for 1 GB of filters (8001 Hz) or
    made 64 KB of 1 Hz samples into 4 GB of 16 kHz ones; torch raised RuntimeError or the process was killed."""
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(4000), rate, format="WAV")
    with pytest.raises(AudioError, match=f"cannot resample {rate} Hz audio to 16000 Hz: {match}"):
        load_audio(buffer.getvalue())


# --- the checkpoint reader -----------------------------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=6)


class Pristine:
    """A tiny checkpoint in three shards and its tensors (the stand-in vocabulary keeps `qwenaudio.load` cheap)."""

    def __init__(self, path: Path):
        self.path, self.state = path, load_checkpoint(path)

    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example: not 40 MB of tensors
        return f"Pristine({self.path})"


@pytest.fixture(scope="session")
def pristine(tmp_path_factory) -> Pristine:
    return Pristine(make_tiny_checkpoint(tmp_path_factory.mktemp("pristine") / "ckpt", max_shard_bytes=2**20))


def checkpoint_with(pristine: Pristine, scratch: Path, name: str, data: bytes) -> Path:
    """A copy of the pristine checkpoint at `scratch / "ckpt"` whose file `name` holds `data` instead. The other
    files are hard links, so nothing is copied: change them only by replacing them, as here."""
    work = scratch / "ckpt"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(pristine.path, work, copy_function=os.link)
    (work / name).unlink()
    (work / name).write_bytes(data)
    return work


def same_tensors_or_error(directory: Path, pristine: Pristine, device: str) -> bool:
    """Whether `directory` loaded (with the pristine tensors); False if it raised one of our errors."""
    try:
        state = load_checkpoint(directory, device=device)
    except (CheckpointError, ConfigError) as e:
        event(type(e).__name__)
        return False
    event("loaded")
    assert state.keys() == pristine.state.keys()
    for name, tensor in state.items():
        expected = pristine.state[name]
        assert tensor.dtype == expected.dtype and tensor.shape == expected.shape, name
        assert device == "meta" or torch.equal(tensor, expected), name
    return True


def header_end(shard: bytes) -> int:
    """Bytes up to the end of a safetensors header: an 8-byte little-endian length, then that much JSON."""
    return 8 + int.from_bytes(shard[:8], "little")


def corrupt_file(pristine: Pristine, name: str, edits) -> bytes:
    """A checkpoint file after `edits`; shards only in their header (edits in the data would only change values),
    but cut anywhere."""
    data = (pristine.path / name).read_bytes()
    return corrupt(data, edits, within=header_end(data) if name.endswith(".safetensors") else None)


@fuzz(60)
@given(name=st.sampled_from([f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] + [INDEX_FILE, "config.json"]),
       edits=EDITS, device=st.sampled_from(["meta", "cpu"]))
def test_checkpoint_corrupted_files(pristine, name, edits, device, tmp_path_factory):
    work = checkpoint_with(pristine, tmp_path_factory.getbasetemp(), name, corrupt_file(pristine, name, edits))
    same_tensors_or_error(work, pristine, device)


@st.composite
def ill_typed_index(draw, pristine: Path, work: Path) -> dict:
    """The index of `pristine` for its copy at `work`, with some weight_map entries pointing elsewhere (other files,
    the pristine shards outside `work`, non-strings), some tensors dropped or added, or the whole weight_map or
    index replaced by arbitrary JSON."""
    index = json.loads((pristine / INDEX_FILE).read_text())
    weight_map = index["weight_map"]
    shards = sorted(set(weight_map.values()))
    outside = [str(pristine / s) for s in shards] + [os.path.relpath(pristine / s, work) for s in shards]
    odd = [f"sub/{s}" for s in shards] + [f"{s}/" for s in shards] + [f"./{s}" for s in shards]
    others = ["", ".", "..", "config.json", INDEX_FILE, "qwen.tiktoken", "/dev/zero", "/etc/passwd"]
    elsewhere = st.one_of(JSON, st.sampled_from(shards + outside + odd + others))
    for name in draw(st.lists(st.sampled_from(sorted(weight_map)), max_size=3)):
        weight_map[name] = draw(elsewhere)
    for name in draw(st.lists(st.sampled_from(sorted(weight_map)), max_size=2)):
        weight_map.pop(name, None)
    weight_map |= draw(st.dictionaries(st.text(max_size=8), elsewhere, max_size=2))
    return draw(st.one_of(st.just(index), st.builds(lambda w: {"weight_map": w}, JSON), JSON))


@fuzz(60)
@given(draw=st.data(), device=st.sampled_from(["meta", "cpu"]))
def test_checkpoint_ill_typed_index(pristine, draw, device, tmp_path_factory):
    """Also: a checkpoint never reads a file outside its directory, so success means every shard is a plain name."""
    scratch = tmp_path_factory.getbasetemp()
    index = draw.draw(ill_typed_index(pristine.path, scratch / "ckpt"), label="index")
    work = checkpoint_with(pristine, scratch, INDEX_FILE, json.dumps(index).encode())
    if same_tensors_or_error(work, pristine, device):
        shards = index["weight_map"].values()
        assert all(isinstance(v, str) and v not in ("", "..") and v == Path(v).name for v in shards)


@st.composite
def ill_typed_config(draw, config: dict) -> object:
    """config.json with fields set to arbitrary JSON (huge and non-finite numbers included), or dropped, or the
    whole file replaced by arbitrary JSON."""
    config = json.loads(json.dumps(config))
    value = st.one_of(JSON, st.integers(), st.sampled_from([0, -1, 2**63, 10**30, float("nan"), float("inf")]))
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from([config] + [v for v in config.values() if isinstance(v, dict) and v]))
        key = draw(st.sampled_from(sorted(where)))
        if draw(st.booleans()):
            where[key] = draw(value)
        else:
            del where[key]
    return draw(st.one_of(st.just(config), JSON))


@fuzz(60)
@given(draw=st.data(), device=st.sampled_from(["meta", "cpu"]))
def test_checkpoint_ill_typed_config(pristine, draw, device, tmp_path_factory):
    config = draw.draw(ill_typed_config(json.loads((pristine.path / "config.json").read_text())), label="config")
    work = checkpoint_with(pristine, tmp_path_factory.getbasetemp(), "config.json", json.dumps(config).encode())
    same_tensors_or_error(work, pristine, device)


GENERATION_KEYS = ["chat_format", "eos_token_id", "stop_words_ids", "stop_token_ids", "max_new_tokens", "top_p"]


@fuzz(100)
@given(data=st.one_of(
    st.binary(max_size=64),
    EDITS.map(lambda e: corrupt(b'{"chat_format": "chatml", "eos_token_id": 151643, "stop_words_ids": [[1]]}', e)),
    st.builds(json.dumps, st.one_of(JSON, st.dictionaries(st.sampled_from(GENERATION_KEYS),
                                                          st.one_of(JSON, st.lists(st.lists(JSON, max_size=2)))))),
))
def test_generation_config_corrupted(data, tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "generation_config.json"
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    try:
        GenerationConfig.from_json(path)
    except ConfigError:
        pass


@pytest.mark.slow
@fuzz(15)
@given(name=st.sampled_from(["config.json", "generation_config.json", INDEX_FILE, "model-00002-of-00003.safetensors",
                             "qwen.tiktoken"]), edits=EDITS)
def test_load_corrupted_checkpoint(pristine, name, edits, tmp_path_factory):
    """`qwenaudio.load` reads every file of a checkpoint directory: any one of them corrupted."""
    work = checkpoint_with(pristine, tmp_path_factory.getbasetemp(), name, corrupt_file(pristine, name, edits))
    try:
        model = qwenaudio.load(work, device="cpu", dtype=torch.float32, progress=False)
    except QwenAudioError:
        return
    assert torch.equal(model.decoder.lm_head.weight, pristine.state["lm_head.weight"].float())


# Regressions the fuzzers found (or would find only in a long run), stated once each.

@pytest.mark.parametrize("where", ["absolute", "relative", "subdirectory", "number"])
def test_index_cannot_name_files_outside_the_checkpoint(pristine, tmp_path, where):
    """Before: an absolute or ../ shard path was read wherever it pointed (here: an identical copy, so the load
    succeeded), and a number became the file name "3"."""
    index = json.loads((pristine.path / INDEX_FILE).read_text())
    shard = index["weight_map"]["lm_head.weight"]
    index["weight_map"]["lm_head.weight"] = named = {
        "absolute": str(tmp_path / "outside" / shard), "relative": f"../outside/{shard}",
        "subdirectory": f"sub/{shard}", "number": 3}[where]
    work = checkpoint_with(pristine, tmp_path, INDEX_FILE, json.dumps(index).encode())
    for directory in (tmp_path / "outside", work / "sub"):
        directory.mkdir()
        os.link(work / shard, directory / shard)
    with pytest.raises(CheckpointError, match=rf"{INDEX_FILE}: weight_map\['lm_head.weight'\] must name a shard file "
                                              rf"in the checkpoint directory, got {named!r}"):
        load_checkpoint(work, device="meta")


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_shard_that_is_not_a_file(pristine, tmp_path, kind):
    """Before: a FIFO named like a shard hung the loader forever (safetensors opened it and waited for a writer)."""
    name = "model-00002-of-00003.safetensors"
    work = checkpoint_with(pristine, tmp_path, name, b"")
    (work / name).unlink()
    if kind == "fifo" and not hasattr(os, "mkfifo"):
        pytest.skip(reason="no FIFOs on this platform")
    os.mkfifo(work / name) if kind == "fifo" else (work / name).mkdir()
    with pytest.raises(CheckpointError, match=f"missing shard file.s. named in {INDEX_FILE}: {name}"):
        load_checkpoint(work, device="meta")


def safetensors_file(header: dict, data: bytes = b"\0\0") -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


@pytest.mark.parametrize("data", [
    b"\xff" * 8,
    (2**40).to_bytes(8, "little") + b"{}",
    safetensors_file({"x": {"dtype": "BF16", "shape": [2**40, 2**40], "data_offsets": [0, 2]}}),
    safetensors_file({"x": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2**62]}}),
], ids=["header of 2**64-1 bytes", "header of 1 TB", "tensor of 2**80 elements", "data offset 2**62"])
def test_safetensors_header_claiming_huge_sizes(tmp_path, data):
    """Sizes are checked against the file before anything is allocated (safetensors does; this pins it)."""
    (tmp_path / "model.safetensors").write_bytes(data)
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read safetensors header"):
        load_checkpoint(tmp_path / "model.safetensors", device="meta")


BROKEN_JSON = {"a directory": None, "nested too deep": b"[" * 100_000, "not UTF-8": b'{"\xff": 1}',
               "an integer of 5000 digits": b"{\"a\": " + b"9" * 5000 + b"}"}


@pytest.mark.parametrize("broken", sorted(BROKEN_JSON))
@pytest.mark.parametrize("name, read, error", [
    (INDEX_FILE, lambda d: load_checkpoint(d, device="meta"), CheckpointError),
    ("config.json", QwenAudioConfig.from_json, ConfigError),
    ("generation_config.json", GenerationConfig.from_json, ConfigError),
])
def test_unreadable_json_files(pristine, tmp_path, broken, name, read, error):
    """Before: IsADirectoryError, RecursionError, and (generation_config.json) UnicodeDecodeError escaped."""
    work = checkpoint_with(pristine, tmp_path, name, b"")
    if BROKEN_JSON[broken] is None:
        (work / name).unlink()
        (work / name).mkdir()
    else:
        (work / name).write_bytes(BROKEN_JSON[broken])
    with pytest.raises(error, match=re.escape(str(work / name))):
        read(work)


@pytest.mark.slow
@pytest.mark.parametrize("name", [INDEX_FILE, "config.json", "generation_config.json", "qwen.tiktoken",
                                  "model-00002-of-00003.safetensors"])
def test_unreadable_files(pristine, tmp_path, name):
    """chmod 000: PermissionError escaped. Root reads such files anyway, so as root the load runs in a process
    without the capabilities that override file permissions (setpriv, from util-linux)."""
    work = checkpoint_with(pristine, tmp_path, name, (pristine.path / name).read_bytes())
    (work / name).chmod(0)
    if not os.access(work / name, os.R_OK):
        with pytest.raises(QwenAudioError, match=re.escape(str(work / name))):
            qwenaudio.load(work, device="cpu", progress=False)
        return
    code = ("import sys, qwenaudio\ntry:\n    qwenaudio.load(sys.argv[1], device='cpu', progress=False)\n"
            "except qwenaudio.QwenAudioError as e:\n    print('refused:', e)\n")
    drop = "-dac_override,-dac_read_search"
    done = subprocess.run(["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", sys.executable, "-c", code,
                           str(work)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("refused: ") and str(work / name) in done.stdout, done


def test_absurd_layer_count_is_refused_quickly(pristine, tmp_path):
    """Before: num_hidden_layers 10**9 made load_checkpoint build a table of 8 billion expected tensors."""
    config = json.loads((pristine.path / "config.json").read_text()) | {"num_hidden_layers": 10**9}
    work = checkpoint_with(pristine, tmp_path, "config.json", json.dumps(config).encode())
    with pytest.raises(CheckpointError, match="the config asks for 1000000000 decoder and 2 encoder layers, "
                                              "but the checkpoint holds 59 tensors"):
        load_checkpoint(work, device="meta")


@pytest.mark.parametrize("field, text, shown", [("layer_norm_epsilon", "NaN", "nan"),
                                                ("rotary_emb_base", "Infinity", "inf"),
                                                pytest.param("rotary_emb_base", "1" + "0" * 400, "inf", id="10**400")])
def test_config_numbers_must_be_finite(field, text, shown):
    """Before: NaN and infinity were accepted (a silently broken model); a 400-digit integer raised OverflowError."""
    raw = json.loads(json.dumps(tiny_config()).replace(f'"{field}": ', f'"{field}": {text}, "_was": '))
    with pytest.raises(ConfigError, match=f"field '{field}' must be finite, got {shown}"):
        QwenAudioConfig.from_dict(raw)


@pytest.mark.parametrize("text, match", [
    ("[]", "expected a JSON object, got list"),
    ('{"stop_words_ids": 3}', "'stop_words_ids' must be a list of id lists"),
    ('{"stop_words_ids": [3]}', "'stop_words_ids' must be a list of id lists"),
    ('{"eos_token_id": [[1]]}', r"stop token ids must be ints, got \[1\]"),  # a list of ids is fine (transformers')
    ('{"stop_words_ids": [[true]]}', "stop token ids must be ints, got True"),
])
def test_generation_config_shapes(tmp_path, text, match):
    """Before: AttributeError, TypeError ('int' object is not iterable, unhashable type: 'list')."""
    (tmp_path / "generation_config.json").write_text(text)
    with pytest.raises(ConfigError, match=match):
        GenerationConfig.from_json(tmp_path)


def test_generation_config_stop_token_ids_key(tmp_path):
    """Our own field name in the file: before, TypeError (stop_token_ids given twice); now its ids stop too."""
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 1, "stop_token_ids": [7, 1]}')
    assert GenerationConfig.from_json(tmp_path).stop_token_ids == (1, 7)


# --- the tokenizer -------------------------------------------------------------------------------------------

SAMPLE_TEXT = "".join(map(chr, range(256))) + " Hello, 世界! <|en|> <audio>"


LINE_EDITS = st.lists(st.tuples(st.one_of(st.integers(0, 299), st.integers(0, NUM_BPE_RANKS - 1)),  # single bytes first
                                st.sampled_from(["drop", "no rank", "extra field", "bad base64", "cut token",
                                                 "other token", "other rank", "copy of the next"]),
                                st.binary(max_size=3), st.integers()),
                      min_size=1, max_size=3)


def edit_lines(lines: list[bytes], edits) -> list[bytes]:
    """qwen.tiktoken's lines after `edits` (line, kind, another token, another rank)."""
    out = list(lines)
    for i, kind, other_token, other_rank in edits:
        token, rank = lines[i].split()
        out[i] = {"drop": b"", "no rank": token, "extra field": token + b" " + rank + b" 7",
                  "bad base64": b"*" + token + b" " + rank, "cut token": token[:-1] + b" " + rank,
                  "other token": base64.b64encode(other_token) + b" " + rank,
                  "other rank": token + b" " + str(other_rank).encode(),
                  "copy of the next": lines[(i + 1) % len(lines)]}[kind]
    return out


@fuzz(10)
@given(line_edits=LINE_EDITS, edits=st.one_of(st.just([]), EDITS))
def test_vocab_corrupted(vocab_file, line_edits, edits, tmp_path_factory):
    """A corrupt vocabulary is refused; one that loads (ranks swapped, say) still round-trips every byte."""
    path = tmp_path_factory.getbasetemp() / "qwen.tiktoken"
    path.write_bytes(corrupt(b"\n".join(edit_lines(vocab_file.read_bytes().splitlines(), line_edits)), edits))
    try:
        tokenizer = Tokenizer(path)
    except TokenizerError:
        return
    assert tokenizer.decode(tokenizer.encode(SAMPLE_TEXT, allowed_special=set())) == SAMPLE_TEXT


def as_utf16(text: str) -> str:
    """What the tokenizer promises to read for text with surrogate code points: a pair is its character, a lone
    one U+FFFD."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


@fuzz(200)
@given(st.text(st.characters(codec=None, exclude_categories=())))
@example("a\ud800b \ud83d\ude00")  # a lone surrogate and a pair (😀)
def test_encode_any_text_including_surrogates(tokenizer, text):
    ids = tokenizer.encode(text, allowed_special=set())
    assert tokenizer.decode(ids) == as_utf16(unicodedata.normalize("NFC", text))


def test_surrogates_as_the_official_tokenizer(tokenizer, vocab_file):
    """dashscope's Qwen tokenizer (Qwen's own, on tiktoken like the official one) reads them the same way."""
    theirs = reference("dashscope.tokenizers.qwen_tokenizer").QwenTokenizer(str(vocab_file))
    text = "a\ud800b \ud83d\ude00 \udcff.wav\udbff"
    assert tokenizer.encode(text) == theirs.encode(text)
    assert tokenizer.decode(tokenizer.encode(text)) == "a\ufffdb 😀 \ufffd.wav\ufffd"


PIECES = st.one_of(st.text(max_size=6), st.sampled_from(SPECIAL_TOKENS[:300] + SPECIAL_TOKENS[-60:]),
                   st.sampled_from([AUDIO_START, AUDIO_END]))
NOT_IDS = st.one_of(st.floats(), st.booleans(), st.none(), st.text(max_size=2), st.lists(st.integers(), max_size=2))
SPANS = st.one_of(st.none(), st.integers(), NOT_IDS, st.lists(st.one_of(st.integers(-5, 1000), st.integers(), NOT_IDS),
                                                              max_size=4))
ALLOWED = st.one_of(st.just("all"), st.just(set()), st.just({AUDIO_START, AUDIO_END}), st.text(max_size=4),
                    st.integers(), st.frozensets(st.one_of(st.text(max_size=4), st.sampled_from(SPECIAL_TOKENS))))


@fuzz(200)
@given(pieces=st.lists(PIECES, max_size=8), spans=SPANS, allowed=ALLOWED)
def test_encode_random_tags_and_spans(tokenizer, pieces, spans, allowed):
    try:
        ids = tokenizer.encode("".join(pieces), audio_spans=spans, allowed_special=allowed)
    except TokenizerError:
        return
    assert all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids)


@fuzz(100)
@given(texts=st.one_of(st.lists(st.lists(PIECES, max_size=4).map("".join), max_size=3), PIECES, NOT_IDS),
       spans=st.one_of(SPANS, st.lists(SPANS, max_size=3)), padding_side=st.sampled_from(["left", "right", "up", 0]))
def test_encode_batch_random(tokenizer, texts, spans, padding_side):
    try:
        batch = tokenizer.encode_batch(texts, audio_spans=spans, padding_side=padding_side)
    except TokenizerError:
        return
    assert batch.input_ids.shape == batch.attention_mask.shape and batch.input_ids.shape[0] == len(texts)


@fuzz(200)
@given(ids=st.lists(st.one_of(st.integers(0, 155164), st.integers(), NOT_IDS), max_size=6),
       form=st.sampled_from([list, tuple, np.array, iter]))
def test_decode_random_ids(tokenizer, ids, form):
    """Valid ids (ints, numpy ints; never bools) decode, anything else is a TokenizerError."""
    valid = all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < tokenizer.vocab_size for i in ids)
    if form is np.array:
        if not valid:
            return  # numpy would make floats, strings or objects of them; covered as lists
        assert tokenizer.decode(np.array(ids, dtype=np.int64)) == tokenizer.decode(ids)
    elif valid:
        assert isinstance(tokenizer.decode(form(ids)), str)
    else:
        with pytest.raises(TokenizerError):
            tokenizer.decode(form(ids))


def test_vocab_without_a_single_byte(vocab_file, tmp_path):
    """Before: the file loaded, then encoding text that needs the byte raised pyo3's PanicException (a
    BaseException, so `except Exception` did not stop it)."""
    lines = vocab_file.read_bytes().splitlines()
    lines = [b"KiE= " + line.split()[1] if base64.b64decode(line.split()[0]) == b"h" else line for line in lines]
    (tmp_path / "qwen.tiktoken").write_bytes(b"\n".join(lines))
    with pytest.raises(TokenizerError, match="no token for the single byte.s. 0x68; byte-level BPE needs all 256"):
        Tokenizer(tmp_path / "qwen.tiktoken")


def test_vocab_path_through_a_file(tmp_path):
    """Before: NotADirectoryError (and PermissionError for an unreadable file)."""
    (tmp_path / "file").write_text("")
    with pytest.raises(TokenizerError, match="file/qwen.tiktoken: cannot read the vocabulary .NotADirectoryError"):
        Tokenizer(tmp_path / "file" / "qwen.tiktoken")


@pytest.mark.parametrize("call, match", [
    (lambda t: t.decode(5), "ids must be a sequence of token ids, got int"),
    (lambda t: t.decode([True, False]), "token id True is not an int"),
    (lambda t: t.encode("<audio>a.wav</audio>", audio_spans=[10**12]), "audio span 1000000000000 must be an int ≥ 2"),
    (lambda t: t.encode("<audio>a.wav</audio>", audio_spans=27), "audio_spans must be a list of ints"),
    (lambda t: t.encode_batch("a prompt"), "texts must be a list of str, got str"),
    (lambda t: t.encode_batch(["a"], audio_spans=1), "audio_spans must be a list"),
    (lambda t: t.encode("x", allowed_special=5), "allowed_special must be 'all' or a set of special tokens, got 5"),
], ids=["decode(5)", "decode(bools)", "span 10**12", "spans not a list", "batch of a str", "batch spans not a list",
        "allowed_special=5"])
def test_tokenizer_arguments(tokenizer, call, match):
    """Before: TypeError, MemoryError (10**12 pads), a decoded bool mask, and a str batched character by character."""
    with pytest.raises(TokenizerError, match=match):
        call(tokenizer)


def test_decode_numpy_ids(tokenizer):
    """Before: numpy ints were refused as "outside the tokenizer's range"."""
    ids = tokenizer.encode("Hello world")
    assert tokenizer.decode(np.array(ids)) == tokenizer.decode(ids) == "Hello world"
