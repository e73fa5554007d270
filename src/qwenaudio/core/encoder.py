"""The audio encoder: Whisper-large-v2's encoder plus average pooling and a projection into the LLM
(docs/MODEL.md#encoder).

log-mel [B, 80, 2T] -> conv stem (stride 2) -> + stored positional table -> 32 pre-LN transformer blocks
-> average pool (stride 2) -> ln_post -> proj to the decoder width -> per clip: [BOS, frames, EOS].

Attribute names are the checkpoint's own (under `transformer.audio.`), so loading is `load_state_dict`.
Faithful details (docs/MODEL.md#quirks): LayerNorm runs in the activation dtype, q and k are each scaled by
head_dim^-1/4 before their product, and the positional table is the stored bf16-rounded one. The official attention
rounds its scores and softmax weights to the activation dtype; scaled_dot_product_attention keeps them in fp32 inside,
so the two differ by rounding in bf16 (docs/MODEL.md#encoder-blocks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .audio import MIN_SAMPLES, audio_span, frames_after_conv, mel_length
from .checks import expect, shown, whole
from .config import AudioConfig
from .errors import InputError


class MultiHeadAttention(nn.Module):
    """Whisper's self-attention: the key projection has no bias."""

    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        b, t, c = x.shape
        heads = lambda y: y.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)  # noqa: E731
        scale = (c // self.n_head) ** -0.25  # split between q and k, as the official code rounds it
        q, k, v = heads(self.query(x) * scale), heads(self.key(x) * scale), heads(self.value(x))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        return self.out(y.transpose(1, 2).reshape(b, t, c))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x += attn(ln(x)); x += mlp(ln(x))."""

    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = nn.LayerNorm(n_state)
        self.mlp = nn.Sequential(nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state))
        self.mlp_ln = nn.LayerNorm(n_state)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.attn_ln(x), mask)
        return x + self.mlp(self.mlp_ln(x))


class AudioEncoder(nn.Module):
    """Log-mel spectrograms in, one span of decoder-width vectors per clip out."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        expect(config, AudioConfig, "config", "an AudioConfig (QwenAudioConfig.audio)")
        self.conv1 = nn.Conv1d(config.n_mels, config.n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(config.n_state, config.n_state, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", torch.empty(config.n_ctx, config.n_state))
        self.blocks = nn.ModuleList(ResidualAttentionBlock(config.n_state, config.n_head) for _ in range(config.n_layer))
        self.avg_pooler = nn.AvgPool1d(2, stride=2)
        self.ln_post = nn.LayerNorm(config.n_state)
        self.proj = nn.Linear(config.n_state, config.output_dim)
        self.audio_bos_eos_token = nn.Embedding(2, config.output_dim)  # row 0 BOS, row 1 EOS
        self.activation_checkpointing = False  # training: recompute block activations in backward (see Decoder)

    min_samples = MIN_SAMPLES  # the shortest clip (16 kHz) that gives one audio token

    @property
    def n_mels(self) -> int:
        return self.conv1.in_channels

    def span_length(self, num_samples: int) -> int:
        """Prompt tokens a clip of `num_samples` (16 kHz) fills: its audio tokens plus the BOS and EOS rows."""
        return audio_span(num_samples)

    def forward(self, mel: Tensor, frames: Tensor) -> Tensor:
        """Encode a batch: mel [B, n_mels, ≥ 2·max(frames)], frames [B] = each clip's length after the conv stem.

        Returns [B, max(frames) // 2, output_dim]. In a batch, frames past a clip's own length are zeroed and hidden
        from attention as keys, as the official code does (their queries still run, and the conv stem sees the
        neighbouring padding, which is why a clip encoded in a mixed-length batch differs slightly from alone).
        """
        if mel.ndim != 3 or mel.shape[1] != self.n_mels:
            raise InputError(f"mel must be [clips, {self.n_mels}, frames] log-mel spectrograms (this model's front end "
                             f"has {self.n_mels} mel bins), got shape {tuple(mel.shape)}")
        t = int(frames.max())
        x = mel[:, :, : 2 * t].to(self.conv1.weight.dtype)
        x = F.gelu(self.conv2(F.gelu(self.conv1(x)))).transpose(1, 2)  # [B, T, C]
        x = (x + self.positional_embedding[:t]).to(x.dtype)
        padding = torch.arange(t, device=x.device)[None, :] >= frames.to(x.device)[:, None]  # [B, T]
        mask = None
        if padding.any():
            x = x.masked_fill(padding[..., None], 0.0)
            mask = torch.zeros(padding.shape, dtype=x.dtype, device=x.device).masked_fill(padding, float("-inf"))
            mask = mask[:, None, None, :]  # [B, 1, 1, T]: broadcast over heads and queries
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        x = self.avg_pooler(x.transpose(1, 2)).transpose(1, 2)
        return self.proj(self.ln_post(x))

    def encode(self, mel: Tensor, num_samples: Sequence[int]) -> list[Tensor]:
        """Each clip's span for the decoder: [BOS, its audio tokens, EOS], shape [audio_span(n), output_dim].

        `num_samples` are the clips' lengths at 16 kHz (before padding to 30 s); they set each clip's frames.
        """
        expect(mel, Tensor, "mel", "a torch.Tensor of log-mel spectrograms [B, n_mels, frames]")
        if not isinstance(num_samples, (list, tuple)) or not all(whole(n, 0) for n in num_samples):
            raise InputError(f"num_samples must be a list of ints (each clip's length at 16 kHz), got "
                             f"{shown(num_samples)}")
        spans = [audio_span(n) for n in num_samples]  # raises for clips too short to give one token
        frames = torch.tensor([frames_after_conv(mel_length(n)) for n in num_samples])
        x = self(mel, frames)
        bos, eos = self.audio_bos_eos_token.weight[:, None]
        return [torch.cat([bos, x[i, : span - 2], eos]) for i, span in enumerate(spans)]
