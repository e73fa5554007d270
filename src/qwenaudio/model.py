"""Building the networks from an official checkpoint directory.

Modules are created on the meta device (no memory, no random init) and then take the checkpoint's tensors
directly with `load_state_dict(assign=True)`: the weights are read once, in the requested dtype, and never copied
again. Module attribute paths are the official tensor names with the owner's prefix dropped: the encoder owns
`transformer.audio.*`, the decoder owns the rest of `transformer.*` and `lm_head.*`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .config import QwenAudioConfig
from .decoder import Decoder
from .encoder import AudioEncoder

ENCODER_PREFIX = "transformer.audio."
DECODER_PREFIX = "transformer."  # plus lm_head.*, which keeps its name


def load_encoder(path: str | Path, *, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu") -> AudioEncoder:
    """The audio encoder of a checkpoint, in eval mode, reading only its own tensors (0.6 B of the 8.4 B)."""
    config = QwenAudioConfig.from_json(path)
    state = load_checkpoint(path, config, dtype=dtype, device=device, prefix=ENCODER_PREFIX)
    with torch.device("meta"):
        encoder = AudioEncoder(config.audio)
    encoder.load_state_dict({k.removeprefix(ENCODER_PREFIX): v for k, v in state.items()}, assign=True)
    return encoder.eval()


def load_decoder(path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                 true_positions: bool = False) -> Decoder:
    """The language model of a checkpoint, in eval mode (see `Decoder` for `true_positions`)."""
    config = QwenAudioConfig.from_json(path)
    state = load_checkpoint(path, config, dtype=dtype, device=device)
    with torch.device("meta"):
        decoder = Decoder(config, true_positions=true_positions)
    decoder.load_state_dict({k.removeprefix(DECODER_PREFIX): v for k, v in state.items()
                             if not k.startswith(ENCODER_PREFIX)}, assign=True)
    return decoder.eval()
