"""Model dimensions read from an official `config.json` (docs/MODEL.md#config), and decoding defaults from
`generation_config.json` (docs/MODEL.md#generation).

The field names are the checkpoint's own, so a reader can hold this file next to `config.json` and see every number.
Only the fields that change the math are required; everything else in the file (`architectures`, `auto_map`, dropout
rates, …) is kept in `extra` so that writing the config back reproduces the original.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checks import expect, finite, whole
from .errors import ConfigError


@dataclass(frozen=True)
class AudioConfig:
    """The Whisper-large-v2 audio encoder: `config.json["audio"]`."""

    n_mels: int  # mel bins of the front end (80)
    n_ctx: int  # frames after the conv stem for 30 s of audio (1500); rows of the positional table
    n_state: int  # encoder width (1280)
    n_head: int  # encoder attention heads (20)
    n_layer: int  # encoder blocks (32)
    output_dim: int  # width of the projected audio features; equals the decoder's hidden_size (4096)
    avg_pool: bool  # halve the frame rate before ln_post (must be true: every checkpoint does)
    add_audio_bos_eos_token: bool  # wrap each clip in learned BOS/EOS rows (must be true likewise)
    audio_start_id: int  # token id of `<audio>`; `</audio>` is the next id
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def audio_end_id(self) -> int:
        return self.audio_start_id + 1

    @property
    def head_dim(self) -> int:
        return self.n_state // self.n_head


@dataclass(frozen=True)
class QwenAudioConfig:
    """The Qwen-7B decoder plus its audio sub-config: one official `config.json`."""

    vocab_size: int  # rows of wte and lm_head (155947; the tokenizer only produces ids < 155165)
    hidden_size: int  # 4096
    num_attention_heads: int  # 32
    kv_channels: int  # head dimension (128)
    num_hidden_layers: int  # 32
    intermediate_size: int  # 22016: twice the MLP width, see `mlp_width`
    layer_norm_epsilon: float  # RMSNorm epsilon (1e-6 in the Hugging Face copies, 1e-5 on GitHub)
    rotary_emb_base: float  # 10000
    rotary_pct: float  # fraction of each head that is rotated (must be 1.0)
    seq_length: int  # 2048: where dynamic NTK and logn scaling start
    use_dynamic_ntk: bool
    use_logn_attn: bool
    no_bias: bool  # c_proj has no bias (must be true; c_attn always has one)
    tie_word_embeddings: bool  # must be false: lm_head is stored separately
    audio: AudioConfig
    # Ours, beside use_dynamic_ntk and use_logn_attn: rotary and logn number each row's positions by its real tokens
    # instead of its slots, so padding changes no logits (docs/MODEL.md#positions). A choice made when loading
    # (`load(..., true_positions=True)`), never read from config.json nor written to it.
    true_positions: bool = field(default=False, metadata={"json": False})
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def quantization(self) -> str | None:
        """"int8-weight-only" or "int4-weight-only" for checkpoints written by `qwenaudio.quantize.save_quantized`,
        else None."""
        return self.extra.get("quantization")

    @property
    def quantization_group_size(self) -> int | None:
        """An int4 checkpoint's group size (inputs sharing a scale and a zero)."""
        return self.extra.get("quantization_group_size")

    @property
    def context_length(self) -> int:
        """Positions the model is built for: `max_position_embeddings` (8192; dynamic NTK stretches the rotary from
        the 2048 it was trained on). A generation's prompt and new tokens must fit in it."""
        return int(self.extra.get("max_position_embeddings", 8192))

    @property
    def audio_token_id(self) -> int:
        """The id the decoder finds a clip's span by: `<audio>`, which opens each audio region."""
        return self.audio.audio_start_id

    @property
    def mlp_width(self) -> int:
        """Width of w1/w2: the official code builds its MLP with `intermediate_size // 2` (11008)."""
        return self.intermediate_size // 2

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> QwenAudioConfig:
        """Build and validate a config; `source` names the file in error messages."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        values = read_fields(cls, raw, source, prefix="", skip={"audio"})
        if "audio" not in raw:
            raise ConfigError(f"{source}: required field 'audio' is missing")
        if not isinstance(raw["audio"], dict):
            raise ConfigError(f"{source}: field 'audio' must be an object, got {raw['audio']!r}")
        audio = AudioConfig(**read_fields(AudioConfig, raw["audio"], source, prefix="audio."))
        config = cls(**values, audio=audio)
        _check_supported(config, source)
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> QwenAudioConfig:
        """Read `config.json` from a file or from a checkpoint directory."""
        expect(path, (str, Path), "path", "a checkpoint directory or its config.json", ConfigError)
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        return cls.from_dict(read_json(path), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The official `config.json` layout, with every field that was read (known or not) written back."""
        out = dict(self.extra)
        for f in _json_fields(type(self)):
            if f.name != "audio":
                out[f.name] = getattr(self, f.name)
        out["audio"] = {**self.audio.extra, **{
            f.name: getattr(self.audio, f.name) for f in dataclasses.fields(self.audio) if f.name != "extra"
        }}
        return out


# The smallest temperature (vLLM's floor too): below it sampling is greedy in effect (a logit gap of 0.001 already
# gives odds of e**100), and far below it logits / temperature overflows float32 and the sampler draws from NaN.
MIN_TEMPERATURE = 1e-5
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes no more


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings; `from_json` reads a checkpoint's generation_config.json (docs/MODEL.md#generation).

    Every setting is checked when the config is made (`replace` and `from_json` included), so a value that cannot
    run (temperature 0 while sampling, top_p 0, a negative top_k) is a `ConfigError` before any work starts rather
    than a crash inside torch halfway through a conversation.
    """

    max_new_tokens: int = 512
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    stop_token_ids: tuple[int, ...] = (151643,)  # <|endoftext|>
    stop_strings: tuple[str, ...] = ()
    pad_token_id: int = 151643
    seed: int | None = None
    chat_format: str = "raw"  # "chatml" for Qwen-Audio-Chat
    max_window_size: int = 6144  # chat history budget in tokens
    full_vocab: bool = False  # choose among all vocab_size rows, as the official generate does (see generate.py)

    def __post_init__(self) -> None:
        for name in ("stop_token_ids", "stop_strings"):  # lists are welcome; one bare string is not a list of stops
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for ok, message in _generation_rules(self):
            if not ok:
                raise ConfigError(message)

    @classmethod
    def from_json(cls, path: str | Path) -> GenerationConfig:
        """Defaults of a checkpoint directory's generation_config.json; missing file or keys keep ours."""
        expect(path, (str, Path), "path", "a checkpoint directory or its generation_config.json", ConfigError)
        path = Path(path)
        path = path / "generation_config.json" if path.is_dir() else path
        if not path.exists():
            return cls()
        raw = read_json(path)
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        words, listed = raw.get("stop_words_ids", []), raw.get("stop_token_ids", [])
        if not (isinstance(words, list) and all(isinstance(w, list) for w in words) and isinstance(listed, list)):
            raise ConfigError(f"{path}: 'stop_words_ids' must be a list of id lists and 'stop_token_ids' a list of ids")
        eos = raw.get("eos_token_id", 151643)  # one id, or (transformers' newer files) a list of them
        stops = [w[0] for w in words if len(w) == 1] + (eos if isinstance(eos, list) else [eos]) + listed
        if raw.get("chat_format") == "chatml":
            stops += [151645, 151644]  # <|im_end|>, <|im_start|>: the official chat stops on both
        wrong = [s for s in stops if not isinstance(s, int) or isinstance(s, bool)]
        if wrong:
            raise ConfigError(f"{path}: stop token ids must be ints, got {wrong[0]!r}")
        known = {f.name for f in dataclasses.fields(cls)} - {"stop_token_ids"}
        values = {k: v for k, v in raw.items() if k in known}
        try:
            return cls(**values, stop_token_ids=tuple(dict.fromkeys(stops)))
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def replace(self, **changes) -> GenerationConfig:
        """A copy with `changes` applied; a None value keeps the current setting."""
        changes = {k: v for k, v in changes.items() if v is not None}
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown generation settings: {sorted(unknown)}")
        return dataclasses.replace(self, **changes)


def _generation_rules(c: GenerationConfig) -> list[tuple[bool, str]]:
    """(holds, message) for each setting; the messages say what a setting takes, and what to use instead."""
    return [
        (whole(c.max_new_tokens, 1), f"max_new_tokens must be an int >= 1, got {c.max_new_tokens!r}"),
        (whole(c.min_new_tokens, 0), f"min_new_tokens must be an int >= 0, got {c.min_new_tokens!r}"),
        (not whole(c.min_new_tokens, 0) or not whole(c.max_new_tokens, 1) or c.min_new_tokens <= c.max_new_tokens,
         f"min_new_tokens ({c.min_new_tokens}) must not exceed max_new_tokens ({c.max_new_tokens})"),
        (isinstance(c.do_sample, bool), f"do_sample must be True or False, got {c.do_sample!r}"),
        (isinstance(c.full_vocab, bool), f"full_vocab must be True or False, got {c.full_vocab!r}"),
        (finite(c.temperature) and c.temperature > 0,
         f"temperature must be > 0, got {c.temperature!r}; for greedy decoding use do_sample=False"),
        (not finite(c.temperature) or not c.temperature > 0 or c.temperature >= MIN_TEMPERATURE,
         f"temperature must be at least {MIN_TEMPERATURE}, got {c.temperature!r}: below it sampling is greedy in "
         "effect, and logits / temperature can overflow float32; for greedy decoding use do_sample=False"),
        (whole(c.top_k, 0), f"top_k must be an int >= 0 (0: off), got {c.top_k!r}"),
        (finite(c.top_p) and 0 < c.top_p <= 1, f"top_p must be in (0, 1] (1: off), got {c.top_p!r}"),
        (finite(c.repetition_penalty) and c.repetition_penalty > 0,
         f"repetition_penalty must be > 0 (1: off), got {c.repetition_penalty!r}"),
        (isinstance(c.stop_token_ids, tuple) and all(whole(i, 0) for i in c.stop_token_ids),
         f"stop_token_ids must hold ints >= 0, got {c.stop_token_ids!r}"),
        (isinstance(c.stop_strings, tuple) and all(isinstance(t, str) and t for t in c.stop_strings),
         f"stop_strings must hold non-empty strings, got {c.stop_strings!r}"),
        (whole(c.pad_token_id, 0), f"pad_token_id must be an int >= 0, got {c.pad_token_id!r}"),
        (c.seed is None or whole(c.seed, 0), f"seed must be an int >= 0 or None, got {c.seed!r}"),
        (not whole(c.seed, 0) or c.seed <= MAX_SEED,
         f"seed must be at most 2**64 - 1 (torch.Generator's largest), got {c.seed!r}"),
        (c.chat_format in ("raw", "chatml"), f"chat_format must be 'raw' or 'chatml', got {c.chat_format!r}"),
        (whole(c.max_window_size, 1), f"max_window_size must be an int >= 1, got {c.max_window_size!r}"),
    ]


def read_json(path: Path) -> Any:
    """The parsed contents of a JSON file; every way reading it can fail is a ConfigError naming the file."""
    if path.exists() and not (path.is_file() or path.is_dir()):  # reading a pipe or device waits for a writer
        raise ConfigError(f"{path}: not a regular file (a pipe, socket or device): give the checkpoint directory")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:  # a directory, unreadable, ...
        raise ConfigError(f"{path}: cannot read the file ({type(e).__name__}: {e.strerror or e})") from None
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, or nested too deep
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


# What `load(quantize=...)` takes, each with its config.json "quantization" value (ours, not official); and int4's
# "quantization_group_size" values
QUANTIZATION_METHODS = {"int8": "int8-weight-only", "int4": "int4-weight-only"}
INT4_GROUP_SIZES = (32, 64, 128)

_KINDS = {"int": int, "float": float, "bool": bool}


def read_fields(cls: type, raw: dict[str, Any], source: str, prefix: str, skip: set[str] = frozenset()) -> dict:
    """Take the dataclass's fields out of `raw` with type checks; the rest goes to `extra`."""
    names = [f for f in _json_fields(cls) if f.name not in skip]
    values: dict[str, Any] = {}
    for f in names:
        where = f"{source}: field '{prefix}{f.name}'"
        if f.name not in raw:
            raise ConfigError(f"{where} is missing")
        value, kind = raw[f.name], f.type
        # bool is a subclass of int in Python, so check it first and never accept it as a number.
        if kind == "bool":
            ok = isinstance(value, bool)
        elif kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise ConfigError(f"{where} must be {kind}, got {value!r}")
        try:
            value = _KINDS[kind](value)
        except OverflowError:  # an integer past the float range
            value = math.inf
        if kind == "float" and not math.isfinite(value):  # JSON has no NaN or Infinity, but Python's json reads them
            raise ConfigError(f"{where} must be finite, got {value!r}")
        if kind in ("int", "float") and value <= 0:
            raise ConfigError(f"{where} must be positive, got {value!r}")
        values[f.name] = value
    known = {"extra", *(f.name for f in _json_fields(cls))}
    values["extra"] = {k: v for k, v in raw.items() if k not in known}
    return values


def _json_fields(cls: type) -> list[dataclasses.Field]:
    """The dataclass's fields that config.json holds by name: all but `extra` and our own choices
    (`true_positions`)."""
    return [f for f in dataclasses.fields(cls) if f.name != "extra" and f.metadata.get("json", True)]


def _check_supported(c: QwenAudioConfig, source: str) -> None:
    """Reject consistent-looking configs that the official checkpoints never use and our modules do not implement."""
    rules = [
        (c.hidden_size == c.num_attention_heads * c.kv_channels,
         f"hidden_size ({c.hidden_size}) must equal num_attention_heads × kv_channels "
         f"({c.num_attention_heads} × {c.kv_channels})"),
        (c.kv_channels % 2 == 0, f"kv_channels ({c.kv_channels}) must be even for rotary embeddings"),
        (c.intermediate_size % 2 == 0, f"intermediate_size ({c.intermediate_size}) must be even (MLP width is half)"),
        (c.rotary_pct == 1.0, f"rotary_pct {c.rotary_pct} is not supported (only 1.0: full-head rotary)"),
        (c.no_bias, "no_bias false is not supported (official checkpoints have no c_proj bias)"),
        (not c.tie_word_embeddings, "tie_word_embeddings true is not supported (lm_head is stored separately)"),
        (c.audio.n_state % c.audio.n_head == 0,
         f"audio.n_state ({c.audio.n_state}) must be divisible by audio.n_head ({c.audio.n_head})"),
        (c.audio.output_dim == c.hidden_size,
         f"audio.output_dim ({c.audio.output_dim}) must equal hidden_size ({c.hidden_size})"),
        (c.audio.avg_pool, "audio.avg_pool false is not supported"),
        (c.quantization in (None, *QUANTIZATION_METHODS.values()),
         f"quantization {c.quantization!r} is not supported (only {', '.join(QUANTIZATION_METHODS.values())})"),
        (c.quantization != QUANTIZATION_METHODS["int4"] or c.quantization_group_size in INT4_GROUP_SIZES,
         f"quantization_group_size {c.quantization_group_size!r} must be one of "
         f"{', '.join(map(str, INT4_GROUP_SIZES))} for int4"),
        (c.audio.add_audio_bos_eos_token, "audio.add_audio_bos_eos_token false is not supported"),
        (c.audio.audio_end_id < c.vocab_size,
         f"audio.audio_start_id ({c.audio.audio_start_id}) leaves `</audio>` outside vocab_size ({c.vocab_size})"),
    ]
    for ok, message in rules:
        if not ok:
            raise ConfigError(f"{source}: {message}")
