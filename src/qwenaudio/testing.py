"""Tiny random checkpoints in the official layout, so every test and example runs without the 16 GB download.

`make_tiny_checkpoint` writes all the files of a real checkpoint directory (docs/MODEL.md#files): config.json with
shrunk dims, generation and tokenizer configs, bf16 safetensors shards with their index, mel_filters.npz and
qwen.tiktoken. The official remote code loads these directories too, which is how golden activations are recorded
(tools/README.md).
Weights come from numpy's PCG64 generator, so the same seed gives the same bytes under any torch version.
"""

from __future__ import annotations

import base64
import json
import math
import shutil
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .core.audio import mel_filters
from .core.checkpoint import tensor_shapes, write_shards
from .core.config import AudioConfig, QwenAudioConfig
from .core.qwen2_audio import Qwen2AudioConfig, Qwen2AudioEncoderConfig
from .core.errors import ConfigError, InputError, TokenizerError
from .core.files import building
from .core.tokenizer import NUM_BPE_RANKS, VOCAB_FILE

# config.json of Qwen/Qwen-Audio on Hugging Face (full size; the Chat checkpoint's is the same).
OFFICIAL_CONFIG: dict[str, Any] = {
    "architectures": ["QWenLMHeadModel"],
    "auto_map": {
        "AutoConfig": "configuration_qwen.QWenConfig",
        "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
    },
    "attn_dropout_prob": 0.0, "bf16": False, "fp16": False, "fp32": False, "emb_dropout_prob": 0.0,
    "intermediate_size": 22016, "initializer_range": 0.02, "kv_channels": 128, "layer_norm_epsilon": 1e-06,
    "model_type": "qwen", "hidden_size": 4096, "num_attention_heads": 32, "num_hidden_layers": 32,
    "max_position_embeddings": 8192, "no_bias": True, "onnx_safe": None, "rotary_emb_base": 10000,
    "rotary_pct": 1.0, "scale_attn_weights": True, "seq_length": 2048, "tie_word_embeddings": False,
    "tokenizer_type": "QWenTokenizer", "transformers_version": "4.31.0", "use_cache": True, "vocab_size": 155947,
    "use_dynamic_ntk": True, "use_logn_attn": True,
    "audio": {
        "n_mels": 80, "n_ctx": 1500, "n_state": 1280, "n_head": 20, "n_layer": 32, "output_dim": 4096,
        "avg_pool": True, "add_audio_bos_eos_token": True, "audio_start_id": 155163,
    },
}

# Small enough to build in a fraction of a second; vocab_size stays full so real prompts' ids are in range.
TINY_DIMS: dict[str, Any] = {
    "hidden_size": 64, "num_attention_heads": 4, "kv_channels": 16, "num_hidden_layers": 2, "intermediate_size": 256,
    "n_state": 64, "n_head": 4, "n_layer": 2,
}

GENERATION_CONFIGS: dict[str, dict[str, Any]] = {
    "base": {
        "chat_format": "raw", "eos_token_id": 151643, "pad_token_id": 151643, "stop_words_ids": [[151643]],
        "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.8, "transformers_version": "4.31.0",
    },
    "chat": {
        "chat_format": "chatml", "eos_token_id": 151643, "pad_token_id": 151643, "max_window_size": 6144,
        "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.5, "transformers_version": "4.31.0",
    },
}

TOKENIZER_CONFIG: dict[str, Any] = {
    "model_max_length": 8192,
    "tokenizer_class": "QWenTokenizer",
    "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
}


def tiny_config(**dims: Any) -> dict[str, Any]:
    """The official config.json with `TINY_DIMS` and then `dims` applied.

    Keys are config.json field names; the audio encoder's (`n_state`, `n_layer`, …) are routed into `"audio"`.
    `audio.output_dim` follows `hidden_size` unless given, since the two must agree.
    """
    raw = json.loads(json.dumps(OFFICIAL_CONFIG))
    audio_keys = {f for f in AudioConfig.__dataclass_fields__ if f != "extra"}
    for key, value in {**TINY_DIMS, **dims}.items():
        if key in audio_keys:
            raw["audio"][key] = value
        elif key in QwenAudioConfig.__dataclass_fields__ and key not in ("audio", "extra"):
            raw[key] = value
        else:
            raise ConfigError(f"make_tiny_checkpoint: unknown dimension {key!r}")
    if "output_dim" not in dims:
        raw["audio"]["output_dim"] = raw["hidden_size"]
    return raw


def make_tiny_checkpoint(
    path: str | Path,
    seed: int = 0,
    *,
    vocab_file: str | Path | None = None,
    chat: bool = False,
    max_shard_bytes: int = 8 * 1024**2,
    draw_on: str | None = None,
    **dims: Any,
) -> Path:
    """Write a random checkpoint directory in the official layout and return its path.

    `vocab_file` is copied in as qwen.tiktoken (pass the real one for meaningful prompts: every checkpoint holds it,
    and so does the PyPI wheel `dashscope`, as dashscope/resources/qwen.tiktoken); without it a byte-level stand-in
    with the same number of ranks is written, so special-token ids stay exact while text encodes to bytes.
    `chat` selects Qwen-Audio-Chat's generation_config.json. `dims` override config fields (see `tiny_config`).
    The values are numpy's draws from `seed`, the same on every machine (the golden recordings rely on that), or,
    with `draw_on` a torch device, torch's draws there: other values, for full-size benchmarks, where numpy would
    take minutes.
    `path` must be new or empty; the checkpoint is built beside it and renamed into place once complete.
    """
    path = Path(path)
    raw = tiny_config(**dims)
    config = QwenAudioConfig.from_dict(raw, source="make_tiny_checkpoint")
    if vocab_file is not None and not Path(vocab_file).is_file():
        raise TokenizerError(f"make_tiny_checkpoint: vocabulary file not found: {vocab_file}")

    def files(partial: Path) -> None:
        _write_json(partial / "config.json", raw)
        _write_json(partial / "generation_config.json", GENERATION_CONFIGS["chat" if chat else "base"])
        _write_json(partial / "tokenizer_config.json", TOKENIZER_CONFIG)
        np.savez(partial / "mel_filters.npz", mel_80=mel_filters(80))
        if vocab_file is not None:
            shutil.copyfile(vocab_file, partial / VOCAB_FILE)
        else:
            _write_byte_vocab(partial / VOCAB_FILE)

    return _write_checkpoint(path, config, seed, draw_on, max_shard_bytes, files)


# config.json of Qwen/Qwen2-Audio-7B on Hugging Face (full size; the Instruct checkpoint's is the same): transformers'
# layout, where every field left out takes transformers' default.
OFFICIAL_QWEN2_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2AudioForConditionalGeneration"],
    "audio_config": {"model_type": "qwen2_audio_encoder"},
    "audio_token_index": 151646, "ignore_index": -100, "model_type": "qwen2_audio",
    "text_config": {
        "bos_token_id": 151643, "eos_token_id": 151645, "intermediate_size": 11008, "max_position_embeddings": 8192,
        "model_type": "qwen2", "rms_norm_eps": 1e-05, "torch_dtype": "bfloat16", "use_mrope": False,
        "vocab_size": 156032,
    },
    "torch_dtype": "bfloat16", "transformers_version": "4.45.0.dev0",
}

# Qwen2-Audio's tiny dims, by the field names of its two sub-configs.
QWEN2_TINY_DIMS: dict[str, dict[str, Any]] = {
    "text_config": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 2,
                    "intermediate_size": 128},
    "audio_config": {"d_model": 64, "encoder_attention_heads": 4, "encoder_layers": 2, "encoder_ffn_dim": 256},
}

QWEN2_GENERATION_CONFIGS: dict[str, dict[str, Any]] = {
    "base": {"bos_token_id": 151643, "eos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "top_k": 0,
             "top_p": 0.5, "transformers_version": "4.45.0.dev0"},
    "instruct": {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
                 "do_sample": True, "top_k": 0, "top_p": 0.5, "transformers_version": "4.45.0.dev0"},
}

# preprocessor_config.json: transformers' WhisperFeatureExtractor with Whisper-large-v3's 128 mel bins.
QWEN2_PREPROCESSOR_CONFIG: dict[str, Any] = {
    "chunk_length": 30, "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 128, "hop_length": 160,
    "n_fft": 400, "n_samples": 480000, "nb_max_frames": 3000, "padding_side": "right", "padding_value": 0.0,
    "processor_class": "Qwen2AudioProcessor", "return_attention_mask": True, "sampling_rate": 16000,
}


def tiny_qwen2_config(**dims: Any) -> dict[str, Any]:
    """Qwen2-Audio's config.json with `QWEN2_TINY_DIMS` and then `dims` applied; `dims` keys are the sub-configs'
    field names (`hidden_size`, `d_model`, …; the encoder's are routed into `audio_config`)."""
    raw = json.loads(json.dumps(OFFICIAL_QWEN2_CONFIG))
    for part, values in QWEN2_TINY_DIMS.items():
        raw[part].update(values)
    audio_keys = {f for f in Qwen2AudioEncoderConfig.__dataclass_fields__ if f != "extra"}
    text_keys = {f for f in Qwen2AudioConfig.__dataclass_fields__ if f not in ("audio", "extra", "text_extra")}
    for key, value in dims.items():
        if key in audio_keys:
            raw["audio_config"][key] = value
        elif key == "audio_token_index":
            raw[key] = value
        elif key in text_keys:
            raw["text_config"][key] = value
        else:
            raise ConfigError(f"make_tiny_qwen2_checkpoint: unknown dimension {key!r}")
    return raw


def make_tiny_qwen2_checkpoint(path: str | Path, seed: int = 0, *, vocab_file: str | Path | None = None,
                               instruct: bool = False, max_shard_bytes: int = 8 * 1024**2,
                               draw_on: str | None = None, **dims: Any) -> Path:
    """A random Qwen2-Audio checkpoint directory in the published layout (config.json, generation and preprocessor
    configs, vocab.json + merges.txt + tokenizer_config.json, safetensors shards with their index), as
    `make_tiny_checkpoint` writes Qwen-Audio's: `vocab_file` is qwen.tiktoken, whose tokens Qwen2's vocabulary
    holds, converted (`write_qwen2_vocab`); `instruct` selects the Instruct checkpoint's generation config and chat
    template; `dims` override config fields (`tiny_qwen2_config`); `seed` and `draw_on` as there."""
    path = Path(path)
    raw = tiny_qwen2_config(**dims)
    config = Qwen2AudioConfig.from_dict(raw, source="make_tiny_qwen2_checkpoint")

    def files(partial: Path) -> None:
        _write_json(partial / "config.json", raw)
        _write_json(partial / "generation_config.json", QWEN2_GENERATION_CONFIGS["instruct" if instruct else "base"])
        _write_json(partial / "preprocessor_config.json", QWEN2_PREPROCESSOR_CONFIG)
        write_qwen2_vocab(partial, vocab_file)

    return _write_checkpoint(path, config, seed, draw_on, max_shard_bytes, files)


def _write_checkpoint(path: Path, config: Any, seed: int, draw_on: str | None, max_shard_bytes: int,
                      files: Callable[[Path], None]) -> Path:
    """Random bf16 tensors for every tensor `config`'s modules hold, in checkpoint order, one shard at a time, and
    `files(directory)` for the rest, built beside `path` and renamed into place once complete."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise InputError(f"make_tiny_checkpoint: {path} exists and is not an empty directory")
    rng = np.random.Generator(np.random.PCG64(seed)) if draw_on is None else \
        torch.Generator(draw_on).manual_seed(seed)
    shapes = tensor_shapes(config)  # made in this order, one shard at a time: full size needs no 17 GB of RAM
    layout = {name: (shape, torch.bfloat16) for name, shape in shapes.items()}
    with building(path) as partial:
        write_shards(layout, lambda name: _random_tensor(name, shapes[name], rng), partial,
                     max_shard_bytes=max_shard_bytes)
        files(partial)
    return path


def _random_tensor(name: str, shape: tuple[int, ...], rng: np.random.Generator | torch.Generator) -> torch.Tensor:
    """Values of the right scale for each kind of tensor, so activations neither vanish nor explode. The scaling is
    done in place, in float32 (numpy's or torch's), so no second copy of a large tensor is made."""
    if name.endswith(("positional_embedding", "embed_positions.weight")):
        return torch.from_numpy(_sinusoids(*shape)).to(torch.bfloat16)
    if isinstance(rng, torch.Generator):
        values = torch.randn(shape, generator=rng, device=rng.device)
    else:
        values = rng.standard_normal(shape, dtype=np.float32)
    if name.endswith(".bias"):
        values *= 0.1
    elif len(shape) == 1:  # norm gains
        values *= 0.1
        values += 1.0
    elif not name.endswith(("wte.weight", "embed_tokens.weight", "audio_bos_eos_token.weight")):  # embeddings: unit;
        values /= math.sqrt(math.prod(shape[1:]))  # projections: variance-preserving
    return torch.as_tensor(values).to("cpu", torch.bfloat16)


def _sinusoids(length: int, channels: int) -> np.ndarray:
    """Whisper's positional table: sin then cos of position × geometric frequencies from 1 down to 1/10000."""
    increments = np.log(10_000) / (channels // 2 - 1)
    inv_timescales = np.exp(-increments * np.arange(channels // 2))
    angles = np.arange(length)[:, None] * inv_timescales[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def _write_byte_vocab(path: Path) -> None:
    """A stand-in qwen.tiktoken: the 256 single bytes, then unreachable filler ranks up to 151,643."""
    tokens = [bytes([b]) for b in range(256)]
    tokens += [b"\xff\xfe" + i.to_bytes(3, "big") for i in range(256, NUM_BPE_RANKS)]
    lines = (f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens))
    path.write_text("".join(lines), encoding="ascii")


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------ Qwen2-Audio: the tokenizer's files

# The tokenizer_config.json fields that shape tokenization, with the values Qwen2 checkpoints publish (no copy of
# Qwen2-Audio's own file was at hand to compare; its special tokens' ids are confirmed, see qwen2_tokenizer.py).
QWEN2_TOKENIZER_CONFIG: dict[str, Any] = {
    "tokenizer_class": "Qwen2Tokenizer", "model_max_length": 32768, "errors": "replace",
    "bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": None,
    "clean_up_tokenization_spaces": False, "split_special_tokens": False,
}


def write_qwen2_vocab(directory: str | Path, tiktoken_file: str | Path | None = None) -> Path:
    """Write Qwen2-Audio's `vocab.json`, `merges.txt` and `tokenizer_config.json` into `directory`; return it.

    The regular tokens come from `tiktoken_file` (the real qwen.tiktoken: the `dashscope` wheel ships it), or,
    without one, from a byte-level stand-in of the same size (see `_write_byte_vocab`). Each multi-byte token gets
    one merge: the last pair tiktoken joins when it encodes the token's own bytes, listed in rank order, so that
    transformers' BPE (first merge in the file wins) picks what tiktoken's (lowest rank wins) picks.
    """
    from .core.qwen2_tokenizer import MERGES_TXT, SPECIAL_TOKENS, TOKENIZER_CONFIG, VOCAB_JSON

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab_json, merges_txt = _qwen2_bpe_files(None if tiktoken_file is None else str(Path(tiktoken_file).resolve()))
    (directory / VOCAB_JSON).write_text(vocab_json, encoding="utf-8")
    (directory / MERGES_TXT).write_text(merges_txt, encoding="utf-8")
    added = {str(NUM_BPE_RANKS + i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                                      "single_word": False, "special": True} for i, token in enumerate(SPECIAL_TOKENS)}
    _write_json(directory / TOKENIZER_CONFIG, {"added_tokens_decoder": added,
                                               "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
                                               **QWEN2_TOKENIZER_CONFIG})
    return directory


@lru_cache(maxsize=2)
def _qwen2_bpe_files(tiktoken_file: str | None) -> tuple[str, str]:
    """The texts of vocab.json and merges.txt converted from `tiktoken_file` (or the stand-in), made once per
    process: the conversion walks 151k tokens in Python (seconds), and a test session writes several checkpoints."""
    import tempfile  # this section's imports stay in it, beside the other family's

    from .core.qwen2_tokenizer import bytes_to_unicode
    from .core.tokenizer import _load_ranks

    if tiktoken_file is None:
        with tempfile.TemporaryDirectory() as scratch:
            _write_byte_vocab(Path(scratch) / VOCAB_FILE)
            ranks = _load_ranks(Path(scratch) / VOCAB_FILE)
    else:
        ranks = _load_ranks(Path(tiktoken_file))
    alphabet = bytes_to_unicode()

    def spelled(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    tokens = sorted(ranks, key=ranks.__getitem__)
    merges = [f"{spelled(left)} {spelled(right)}" for left, right in
              filter(None, (_last_merge(t, ranks) for t in tokens if len(t) > 1))]
    vocab = json.dumps({spelled(t): ranks[t] for t in tokens}, indent=2, ensure_ascii=False) + "\n"
    return vocab, "".join(f"{line}\n" for line in ["#version: 0.2", *merges])


def _last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """The pair tiktoken joins last when it encodes `token`'s bytes alone, or None when it cannot join them into
    one token (the stand-in's fillers: qwen.tiktoken has none). Inside any longer text, a token is only ever made by this same pair: the merges
    within its bytes happen in the same order as they do alone."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        joins = [(ranks.get(a + b), i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in ranks]
        if not joins:
            return None
        _, i = min(joins)
        pair = parts[i], parts[i + 1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return pair
