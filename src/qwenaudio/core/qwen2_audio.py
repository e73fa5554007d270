"""Qwen2-Audio (arXiv 2407.10759): what differs from Qwen-Audio, in one place (docs/MODEL.md#qwen2-audio).

The math is the one the rest of the core writes once (RMSNorm, rotary, attention over the static KV cache, SwiGLU,
the log-mel front end); this file holds the family's own dimensions, module names and wiring:

- config.json is transformers' `qwen2_audio` layout: a Qwen2 `text_config` and a Whisper-large-v3 `audio_config`,
  where a field left out means transformers' default for it (the published files leave most of them out);
- the audio tower is Whisper-large-v3's encoder over 128 mel bins, always built for 30 s (1,500 positions) with the
  padded frames hidden from attention, then `AvgPool1d(2, 2)`, `layer_norm`, and a separate projector
  `multi_modal_projector.linear` into the decoder's width. No learned BOS/EOS rows: `<|audio_bos|>` and
  `<|audio_eos|>` are ordinary tokens, and each clip's positions replace a run of `<|AUDIO|>` tokens;
- the decoder is transformers' `qwen2` with Qwen-7B's geometry: separate q/k/v projections with bias, o_proj
  without, a plain rotary (no dynamic NTK, no logn), and positions that count each row's real tokens, as
  transformers' generate numbers a left-padded batch.

Module names are the checkpoint's (`audio_tower.layers.0.self_attn.q_proj`, `language_model.model.layers.0.mlp.
gate_proj`, …) with the `language_model.` prefix dropped for the decoder, so peft adapters over transformers' model
name the same modules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .audio import N_FRAMES, QWEN2_MIN_SAMPLES, feature_frames, frames_after_conv, qwen2_audio_tokens
from .checks import expect, shown, whole
from .config import INT4_GROUP_SIZES, QUANTIZATION_METHODS, read_fields, read_json
from .decoder import RMSNorm, apply_rotary, attend, positions_and_mask, rotary
from .errors import ConfigError, InputError
from .linear import Linear

MODEL_TYPE = "qwen2_audio"


@dataclass(frozen=True)
class Qwen2AudioEncoderConfig:
    """`config.json["audio_config"]`: Whisper-large-v3's encoder (defaults: the values transformers fills in)."""

    num_mel_bins: int = 128
    d_model: int = 1280
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    max_source_positions: int = 1500  # positions after the conv stem: 30 s of 10 ms frames, halved
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def n_layer(self) -> int:  # Qwen-Audio's name, which the checkpoint reader counts tensors with
        return self.encoder_layers


@dataclass(frozen=True)
class Qwen2AudioConfig:
    """The Qwen2 decoder (`config.json["text_config"]`, flattened here) plus the audio tower's config."""

    vocab_size: int = 151936  # 156,032 in the published checkpoints
    hidden_size: int = 4096
    intermediate_size: int = 22016  # the MLP width itself (11,008 in the published checkpoints)
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    audio: Qwen2AudioEncoderConfig = field(default_factory=Qwen2AudioEncoderConfig)
    audio_token_index: int = 151646  # `<|AUDIO|>`
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # top-level keys not read
    text_extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # text_config's likewise

    # What the shared code (KV cache, generation) reads under Qwen-Audio's names.
    true_positions = True  # transformers numbers a padded row's positions by its real tokens
    use_dynamic_ntk = False

    @property
    def audio_token_id(self) -> int:
        """`<|AUDIO|>`: each clip's span replaces a run of it."""
        return self.audio_token_index

    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings

    @property
    def quantization(self) -> str | None:
        return self.extra.get("quantization")

    @property
    def quantization_group_size(self) -> int | None:
        return self.extra.get("quantization_group_size")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> Qwen2AudioConfig:
        """Build and validate a config from transformers' layout; `source` names the file in error messages."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        if raw.get("model_type") != MODEL_TYPE:
            raise ConfigError(f"{source}: model_type must be {MODEL_TYPE!r}, got {raw.get('model_type')!r}")
        parts = {}
        for key in ("text_config", "audio_config"):
            if not isinstance(raw.get(key, {}), dict):
                raise ConfigError(f"{source}: field {key!r} must be an object, got {raw[key]!r}")
            parts[key] = dict(raw.get(key, {}))
        text = parts["text_config"]
        if "rope_theta" not in text and isinstance(text.get("rope_parameters"), dict):  # transformers 5's spelling
            text["rope_theta"] = text["rope_parameters"].get("rope_theta", cls.rope_theta)
        audio = Qwen2AudioEncoderConfig(**read_fields(
            Qwen2AudioEncoderConfig, _defaults(Qwen2AudioEncoderConfig, parts["audio_config"]), source,
            prefix="audio_config."))
        own = {"audio", "audio_token_index", "text_extra"}
        values = read_fields(cls, _defaults(cls, text, skip=own), source, prefix="text_config.", skip=own)
        text_extra = values.pop("extra")
        audio_token_index = raw.get("audio_token_index", cls.audio_token_index)
        if not whole(audio_token_index, 0):
            raise ConfigError(f"{source}: field 'audio_token_index' must be an int >= 0, got {audio_token_index!r}")
        extra = {k: v for k, v in raw.items() if k not in ("text_config", "audio_config", "audio_token_index")}
        config = cls(**values, audio=audio, audio_token_index=audio_token_index, extra=extra,
                     text_extra=text_extra)
        _check_supported(config, source)
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> Qwen2AudioConfig:
        """Read `config.json` from a file or from a checkpoint directory."""
        expect(path, (str, Path), "path", "a checkpoint directory or its config.json", ConfigError)
        path = Path(path)
        path = path / "config.json" if path.is_dir() else path
        return cls.from_dict(read_json(path), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """transformers' config.json layout, with every field that was read (known or not) written back."""
        text = {**self.text_extra, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                                      if f.name not in ("audio", "audio_token_index", "extra", "text_extra")}}
        audio = {**self.audio.extra, **{f.name: getattr(self.audio, f.name) for f in dataclasses.fields(self.audio)
                                        if f.name != "extra"}}
        return {**self.extra, "audio_config": audio, "text_config": text, "audio_token_index": self.audio_token_index}


def _defaults(cls: type, raw: dict[str, Any], skip: set[str] = frozenset()) -> dict[str, Any]:
    """`raw` with each dataclass field it leaves out set to its default, as transformers fills a missing key."""
    filled = dict(raw)
    for f in dataclasses.fields(cls):
        if f.name not in skip and f.name != "extra" and f.name not in filled:
            filled[f.name] = f.default
    return filled


def _check_supported(c: Qwen2AudioConfig, source: str) -> None:
    text = c.text_extra
    rules = [
        (c.hidden_size % c.num_attention_heads == 0 and c.kv_channels % 2 == 0,
         f"hidden_size ({c.hidden_size}) must be num_attention_heads ({c.num_attention_heads}) × an even head size"),
        (c.num_key_value_heads == c.num_attention_heads,
         f"num_key_value_heads ({c.num_key_value_heads}) must equal num_attention_heads ({c.num_attention_heads}): "
         "Qwen2-Audio has no grouped-query attention, and neither do our modules"),
        (not text.get("tie_word_embeddings", False), "text_config.tie_word_embeddings true is not supported"),
        (not text.get("use_sliding_window", False), "text_config.use_sliding_window true is not supported"),
        (text.get("hidden_act", "silu") == "silu", f"text_config.hidden_act {text.get('hidden_act')!r}: only silu"),
        (text.get("rope_scaling") is None and (text.get("rope_parameters") or {}).get("rope_type", "default")
         == "default", "only the default rotary is supported (no rope_scaling)"),
        (c.audio.d_model % c.audio.encoder_attention_heads == 0,
         f"audio_config.d_model ({c.audio.d_model}) must be divisible by encoder_attention_heads "
         f"({c.audio.encoder_attention_heads})"),
        (c.audio.max_source_positions * 2 == N_FRAMES,
         f"audio_config.max_source_positions must be {N_FRAMES // 2} (30 s of audio), got "
         f"{c.audio.max_source_positions}"),
        (c.audio.extra.get("activation_function", "gelu") == "gelu", "audio_config.activation_function: only gelu"),
        (not c.audio.extra.get("scale_embedding", False), "audio_config.scale_embedding true is not supported"),
        (c.audio_token_index < c.vocab_size,
         f"audio_token_index ({c.audio_token_index}) is outside vocab_size ({c.vocab_size})"),
        (c.quantization in (None, *QUANTIZATION_METHODS.values()),
         f"quantization {c.quantization!r} is not supported (only {', '.join(QUANTIZATION_METHODS.values())})"),
        (c.quantization != QUANTIZATION_METHODS["int4"] or c.quantization_group_size in INT4_GROUP_SIZES,
         f"quantization_group_size {c.quantization_group_size!r} must be one of "
         f"{', '.join(map(str, INT4_GROUP_SIZES))} for int4"),
    ]
    for ok, message in rules:
        if not ok:
            raise ConfigError(f"{source}: {message}")


# --- the audio tower and projector ------------------------------------------------------------------------------

class Qwen2AudioAttention(nn.Module):
    """Whisper's self-attention (key without bias); q is scaled by head_dim^-1/2 before the product, as
    transformers does."""

    def __init__(self, dim: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        b, t, c = x.shape
        heads = lambda y: y.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)  # noqa: E731
        q = heads(self.q_proj(x) * (c // self.n_head) ** -0.5)
        y = F.scaled_dot_product_attention(q, heads(self.k_proj(x)), heads(self.v_proj(x)), attn_mask=mask, scale=1.0)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, c))


class Qwen2AudioEncoderLayer(nn.Module):
    """Pre-LN Whisper block: x += attn(ln(x)); x += fc2(gelu(fc1(ln(x))))."""

    def __init__(self, dim: int, n_head: int, ffn: int):
        super().__init__()
        self.self_attn = Qwen2AudioAttention(dim, n_head)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class AudioTower(nn.Module):
    """Whisper-large-v3's encoder with Qwen2-Audio's average pool: log-mel [B, 128, frames] in, [B, T/2, 1280] out."""

    def __init__(self, config: Qwen2AudioEncoderConfig):
        super().__init__()
        dim = config.d_model
        self.conv1 = nn.Conv1d(config.num_mel_bins, dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(config.max_source_positions, dim)  # stored sinusoids, never trained
        self.layers = nn.ModuleList(Qwen2AudioEncoderLayer(dim, config.encoder_attention_heads, config.encoder_ffn_dim)
                                    for _ in range(config.encoder_layers))
        self.layer_norm = nn.LayerNorm(dim)
        self.avg_pooler = nn.AvgPool1d(2, stride=2)


class MultiModalProjector(nn.Module):
    def __init__(self, audio_width: int, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(audio_width, hidden_size)


class Qwen2AudioEncoder(nn.Module):
    """Log-mel spectrograms in, one span of decoder-width vectors per clip out (`audio_tower` then
    `multi_modal_projector`, the checkpoint's two top-level modules)."""

    def __init__(self, config: Qwen2AudioConfig):
        super().__init__()
        expect(config, Qwen2AudioConfig, "config", "a Qwen2AudioConfig")
        self.audio_tower = AudioTower(config.audio)
        self.multi_modal_projector = MultiModalProjector(config.audio.d_model, config.hidden_size)
        self.activation_checkpointing = False  # training: recompute block activations in backward

    min_samples = QWEN2_MIN_SAMPLES  # the shortest clip (16 kHz) that gives one audio position

    @property
    def n_mels(self) -> int:
        return self.audio_tower.conv1.in_channels

    @property
    def blocks(self) -> nn.ModuleList:
        return self.audio_tower.layers

    def span_length(self, num_samples: int) -> int:
        """Decoder positions a clip of `num_samples` (16 kHz) fills: its run of `<|AUDIO|>` tokens (750 for 30 s)."""
        return qwen2_audio_tokens(num_samples)

    def forward(self, mel: Tensor, frames: Tensor) -> Tensor:
        """Encode a batch: mel [B, 128, 3000], `frames` [B] = each clip's valid mel frames (the feature extractor's
        attention mask). Returns [B, T // 2, hidden_size], T the positions after the conv stem of the longest clip.

        transformers runs all 1,500 positions and hides those past each clip's length from attention as keys. A
        valid position never reads a hidden one, and the conv stem's last valid output reads mel frames up to
        2·T, so the frames past that are cut first: the same numbers for the valid positions, far less work for
        short clips (the positions past a clip's own length, kept in a batch, are never read either)."""
        tower = self.audio_tower
        if mel.ndim != 3 or mel.shape[1] != self.n_mels:
            raise InputError(f"mel must be [clips, {self.n_mels}, frames] log-mel spectrograms (this model's front end "
                             f"has {self.n_mels} mel bins), got shape {tuple(mel.shape)}")
        lengths = torch.tensor([frames_after_conv(int(f)) for f in frames.tolist()], device=mel.device)
        t = int(lengths.max())
        x = mel[:, :, : min(mel.shape[2], 2 * t + 2)].to(tower.conv1.weight.dtype)
        x = F.gelu(tower.conv2(F.gelu(tower.conv1(x)))).transpose(1, 2)[:, :t]
        x = x + tower.embed_positions.weight[:t]
        keys = torch.arange(t, device=x.device)[None, :] < lengths[:, None]  # [B, T]
        mask = None if keys.all() else keys[:, None, None, :]
        for layer in tower.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
        x = tower.avg_pooler(x.transpose(1, 2)).transpose(1, 2)
        return self.multi_modal_projector.linear(tower.layer_norm(x))

    def encode(self, mel: Tensor, num_samples: Sequence[int]) -> list[Tensor]:
        """Each clip's span for the decoder, [span_length(n), hidden_size]; `num_samples` are the clips' lengths at
        16 kHz (before padding to 30 s)."""
        expect(mel, Tensor, "mel", "a torch.Tensor of log-mel spectrograms [B, n_mels, frames]")
        if not isinstance(num_samples, (list, tuple)) or not all(whole(n, 0) for n in num_samples):
            raise InputError(f"num_samples must be a list of ints (each clip's length at 16 kHz), got "
                             f"{shown(num_samples)}")
        spans = [self.span_length(n) for n in num_samples]  # raises for clips too short to give one position
        frames = torch.tensor([feature_frames(n) for n in num_samples])
        x = self(mel, frames)
        return [x[i, :span] for i, span in enumerate(spans)]


# --- the language model ---------------------------------------------------------------------------------------

class Qwen2Attention(nn.Module):
    def __init__(self, dim: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.q_proj = Linear(dim, dim)
        self.k_proj = Linear(dim, dim)
        self.v_proj = Linear(dim, dim)
        self.o_proj = Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache: tuple[Tensor, Tensor] | None = None,
                slots: Tensor | None = None) -> Tensor:
        b, s, d = x.shape
        heads = lambda y: y.view(b, s, self.n_head, d // self.n_head)  # noqa: E731
        q = apply_rotary(heads(self.q_proj(x)), cos, sin).transpose(1, 2)
        k = apply_rotary(heads(self.k_proj(x)), cos, sin).transpose(1, 2)
        y = attend(q, k, heads(self.v_proj(x)).transpose(1, 2), mask, cache, slots)
        return self.o_proj(y.transpose(1, 2).reshape(b, s, d))


class Qwen2MLP(nn.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) · up_proj(x))."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.gate_proj = Linear(dim, width, bias=False)
        self.up_proj = Linear(dim, width, bias=False)
        self.down_proj = Linear(width, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, config: Qwen2AudioConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Qwen2Attention(config.hidden_size, config.num_attention_heads)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Qwen2MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache: tuple[Tensor, Tensor] | None = None,
                slots: Tensor | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, slots)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, config: Qwen2AudioConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Qwen2Decoder(nn.Module):
    """Qwen2: token ids (or their embeddings, audio scattered in) in, next-token logits out. The same interface as
    Qwen-Audio's `Decoder`, which generation and training call."""

    def __init__(self, config: Qwen2AudioConfig):
        super().__init__()
        expect(config, Qwen2AudioConfig, "config", "a Qwen2AudioConfig")
        self.config = config
        self.activation_checkpointing = False
        self.model = Qwen2Model(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def embedding(self) -> nn.Embedding:
        return self.model.embed_tokens

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    def forward(self, x: Tensor, positions: Tensor, mask: Tensor, base: Tensor, cache=None,
                slots: Tensor | None = None, *, last_only: bool = False, select: Tensor | None = None,
                hidden_states: list[Tensor] | None = None) -> Tensor:
        """As `Decoder.forward` (no logn scaling: Qwen2 has none)."""
        if not x.is_floating_point():
            x = self.model.embed_tokens(x)
        cos, sin = rotary(positions, base, self.config.kv_channels)
        for i, layer in enumerate(self.model.layers):
            if hidden_states is not None:
                hidden_states.append(x)
            if self.activation_checkpointing and cache is None and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, (cache.k[i], cache.v[i]) if cache is not None else None, slots)
        x = self.model.norm(x[:, -1:] if last_only else x)
        if hidden_states is not None:
            hidden_states.append(x)
        return self.lm_head(x if select is None else x[select])

    def embed(self, input_ids: Tensor, audio: Sequence[Tensor] = ()) -> Tensor:
        """Token embeddings [B, S, hidden_size], each run of `<|AUDIO|>` replaced by its clip's span."""
        bad = (input_ids < 0) | (input_ids >= self.config.vocab_size)
        if bad.any():
            row, col = bad.nonzero()[0].tolist()
            raise InputError(f"token id {int(input_ids[row, col])} at [{row}, {col}] is outside the vocabulary "
                             f"(0..{self.config.vocab_size - 1})")
        return scatter_audio(self.model.embed_tokens(input_ids), input_ids, audio, self.config.audio_token_index)

    def rope_base(self, valid: Tensor) -> Tensor:
        """Each row's rotary base [B]: rope_theta for every row (Qwen2 has no dynamic NTK)."""
        return torch.full((valid.shape[0],), float(self.config.rope_theta), dtype=torch.float64, device=valid.device)

    def logits(self, input_ids: Tensor, attention_mask: Tensor | None = None, audio: Sequence[Tensor] = (), *,
               last_only: bool = False, select: Tensor | None = None,
               hidden_states: list[Tensor] | None = None) -> Tensor:
        """transformers' forward over whole sequences, no cache, with positions counted by real tokens (as its
        generate passes them): logits [B, S, vocab_size]."""
        expect(input_ids, Tensor, "input_ids", "a torch.Tensor of token ids [B, S]")
        expect(attention_mask, (Tensor, type(None)), "attention_mask", "a torch.Tensor [B, S] or None")
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else \
            attention_mask.to(input_ids.device, torch.bool)
        slots = torch.arange(input_ids.shape[1], device=input_ids.device)
        positions, mask = positions_and_mask(valid, slots, true_positions=True)
        return self(self.embed(input_ids, audio), positions, mask, self.rope_base(valid),
                    last_only=last_only, select=select, hidden_states=hidden_states)


def scatter_audio(x: Tensor, input_ids: Tensor, audio: Sequence[Tensor], audio_id: int) -> Tensor:
    """Write each clip's span over one run of `<|AUDIO|>` tokens, runs matched to clips in row-major order (as
    transformers' masked_scatter does); a run whose length is not its clip's is an error, since a span written
    across two runs would silently corrupt both prompts."""
    runs = _runs(input_ids == audio_id)
    if not runs and not audio:
        return x
    if len(runs) != len(audio):
        raise InputError(f"the ids hold {len(runs)} run(s) of <|AUDIO|> tokens but {len(audio)} encoded clip(s) were "
                         "given")
    x = x.clone()
    for k, ((row, start, length), span) in enumerate(zip(runs, audio)):
        if span.shape != (length, x.shape[-1]):
            raise InputError(f"<|AUDIO|> run {k} (row {row}, columns {start}..{start + length - 1}) holds {length} "
                             f"tokens but clip {k}'s encoding has shape {tuple(span.shape)}; expected "
                             f"({length}, {x.shape[-1]})")
        x[row, start : start + length] = span.to(x.dtype)
    return x


def _runs(marked: Tensor) -> list[tuple[int, int, int]]:
    """(row, start, length) of each run of True in a [B, S] bool tensor, in row-major order."""
    out = []
    for row, line in enumerate(marked.tolist()):
        start = None
        for col, on in enumerate([*line, False]):
            if on and start is None:
                start = col
            elif not on and start is not None:
                out.append((row, start, col - start))
                start = None
    return out

