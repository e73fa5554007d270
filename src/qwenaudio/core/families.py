"""The two model families on this core, Qwen-Audio and Qwen2-Audio, and how a checkpoint says which it is.

Everything the shared code needs to tell them apart is one `Family` record: its config class, how its encoder,
decoder and tokenizer are built, and where its modules' tensors sit in its checkpoint. The family comes from
config.json's `model_type` ("qwen" or "qwen2_audio"); a user never names it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .checks import expect
from .config import QwenAudioConfig, read_json
from .decoder import Decoder
from .encoder import AudioEncoder
from .errors import CheckpointError, ConfigError
from .qwen2_audio import Qwen2AudioConfig, Qwen2AudioEncoder, Qwen2Decoder
from .qwen2_tokenizer import Qwen2Tokenizer
from .tokenizer import Tokenizer

Config = QwenAudioConfig | Qwen2AudioConfig


@dataclass(frozen=True)
class Family:
    """One model family. `names` maps checkpoint tensor names to our modules: each rule is (checkpoint prefix,
    owner, attribute prefix), tried in order, so a tensor `checkpoint prefix + rest` is `owner`'s attribute
    `attribute prefix + rest`."""

    name: str  # as the papers write it
    model_type: str  # config.json's
    config: type
    encoder: Callable[[Any], nn.Module]
    decoder: Callable[[Any], nn.Module]
    tokenizer: type
    names: tuple[tuple[str, str, str], ...]

    def official_name(self, owner: str, path: str) -> str:
        """The checkpoint's name for the tensor at attribute `path` of our `owner` ("encoder" or "decoder")."""
        stored, attribute = next((s, a) for s, o, a in self.names if o == owner and path.startswith(a))
        return stored + path.removeprefix(attribute)

    def module_path(self, name: str) -> tuple[str, str]:
        """(owner, attribute path) of a checkpoint tensor name: the inverse of `official_name`."""
        for stored, owner, attribute in self.names:
            if name.startswith(stored):
                return owner, attribute + name.removeprefix(stored)
        starts = ", ".join(dict.fromkeys(s for s, _, _ in self.names))
        raise CheckpointError(f"{name!r} is not an official tensor name of {self.name} (they start with {starts})")

    def prefixes(self, owner: str) -> tuple[str, ...]:
        """The checkpoint prefixes of `owner`'s tensors (what reading only the encoder reads)."""
        return tuple(s for s, o, _ in self.names if o == owner)


QWEN_AUDIO = Family(
    "Qwen-Audio", "qwen", QwenAudioConfig, lambda c: AudioEncoder(c.audio), Decoder, Tokenizer,
    names=(("transformer.audio.", "encoder", ""), ("lm_head.", "decoder", "lm_head."), ("transformer.", "decoder", "")),
)
QWEN2_AUDIO = Family(
    "Qwen2-Audio", "qwen2_audio", Qwen2AudioConfig, Qwen2AudioEncoder, Qwen2Decoder, Qwen2Tokenizer,
    names=(("audio_tower.", "encoder", "audio_tower."), ("multi_modal_projector.", "encoder", "multi_modal_projector."),
           ("language_model.", "decoder", "")),
)
FAMILIES = (QWEN_AUDIO, QWEN2_AUDIO)


def family_of(config: Config | Tokenizer | Qwen2Tokenizer) -> Family:
    """The family a config (or a model's, or a decoder's) or a tokenizer belongs to: the one place that tells them
    apart by class."""
    expect(config, (QwenAudioConfig, Qwen2AudioConfig, Tokenizer, Qwen2Tokenizer), "config",
           "a QwenAudioConfig or Qwen2AudioConfig (or a model's tokenizer)")
    return next(f for f in FAMILIES if isinstance(config, (f.config, f.tokenizer)))


def read_config(path: str | Path) -> Config:
    """The config of a checkpoint directory (or its config.json), of whichever family its `model_type` names."""
    expect(path, (str, Path), "path", "a checkpoint directory or its config.json", ConfigError)
    path = Path(path)
    path = path / "config.json" if path.is_dir() else path
    raw = read_json(path)
    known = " or ".join(f"{f.model_type!r} ({f.name})" for f in FAMILIES)
    if isinstance(raw, dict) and "model_type" not in raw and ("text_config" in raw or "audio_config" in raw):
        # Qwen-Audio's files may lack model_type and are read as its; transformers' layout always has one
        raise ConfigError(f"{path}: model_type is missing (text_config/audio_config are transformers' layout): "
                          f"expected {known}")
    kind = raw.get("model_type", QWEN_AUDIO.model_type) if isinstance(raw, dict) else QWEN_AUDIO.model_type
    family = next((f for f in FAMILIES if f.model_type == kind), None)
    if family is None:
        raise ConfigError(f"{path}: model_type {kind!r} is not a family this library runs: expected {known}")
    return family.config.from_dict(raw, source=str(path))
