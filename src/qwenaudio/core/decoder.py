"""The language model: Qwen-7B, a pre-norm rotary transformer (docs/MODEL.md#decoder).

ids -> wte (audio spans written over each `<audio>…</audio>` region) -> N × [x += attn(RMSNorm(x));
x += mlp(RMSNorm(x))] -> RMSNorm -> lm_head.

Beyond a textbook decoder, three inference-time rules of the official code change the numbers
(docs/MODEL.md#dynamic-ntk, #logn-scaling, #positions):
- dynamic NTK: past `seq_length` tokens the rotary base grows by alpha^(d/(d-2)); alpha is chosen at prefill
  (per row under an attention mask) and frozen for all later decoding steps;
- logn scaling: queries at position p ≥ seq_length are multiplied by log(p + 1) / log(seq_length);
- positions are token slots 0..K-1 even under left padding, so a left-padded row starts at position > 0.
  Rotary scores depend only on position differences, so the shift changes nothing until slots pass seq_length;
  from there a padded row's queries get logn scaling that the same prompt unpadded would not get yet.
`config.true_positions` (`Decoder(config, true_positions=True)`) is the one switch away from the official behaviour:
rotary and logn then use each row's real-token count as its position, so a prompt gives the same logits whether or
not it is padded.

There is one forward path, for training and inference alike: ids or embeddings, positions, mask and rotary base in,
logits out, with keys and values written into a `KVCache` when one is given. The cache is gpt-fast's static one:
preallocated [B, H, capacity, head_dim] buffers written at their slots, so a decoding step has fixed shapes.
Generation (generate.py) owns it: `prefill` fills it and fixes each row's rotary base, `decode_one_token` extends
it. Module names follow the checkpoint (`h.0.attn.c_attn`, `ln_f`, …) once its `transformer.` prefix is dropped.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .checks import expect
from .config import QwenAudioConfig

if TYPE_CHECKING:
    from .qwen2_audio import Qwen2AudioConfig
from .errors import InputError
from .linear import Linear


class RMSNorm(nn.Module):
    """x / rms(x), computed in fp32 and cast back before the gain, as the official code does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class MLP(nn.Module):
    """SwiGLU with the SiLU gate on w2: c_proj(w1(x) · silu(w2(x)))."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.w1 = Linear(dim, width, bias=False)
        self.w2 = Linear(dim, width, bias=False)
        self.c_proj = Linear(width, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class KVCache:
    """Each block's keys and values, written in place at their slots (gpt-fast's static cache: a decoding step has
    fixed shapes), and which slots hold real tokens (what the attention mask reads).

    The decoder reads and writes the buffers it is given; generation (generate.py) allocates, grows and reuses them,
    and keeps what the prompt fixed (the ids fed, the clips, each row's rotary base) beside them in a `Session`.
    """

    def __init__(self, config: QwenAudioConfig | Qwen2AudioConfig, batch: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        shape = (batch, config.num_attention_heads, capacity, config.kv_channels)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)  # slot holds a real token
        self._mark_static()

    def _mark_static(self) -> None:
        """On CUDA, tell torch.compile that the buffers a decoding step writes keep their addresses from step to
        step. CUDA graphs replay fixed addresses and refuse a step that writes into an input they would have to copy
        in first, so without this mark the compiled step would run without them. CPUs have no graphs to replay, and
        the mark would cost them the import of torch._dynamo (a second) on every run."""
        if self.valid.is_cuda:
            for t in (*self.k, *self.v, self.valid):
                torch._dynamo.mark_static_address(t)

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    def rows(self, index: slice, capacity: int | None = None) -> KVCache:
        """A KVCache over some rows of this one, and only its first `capacity` slots (None: all), its buffers views
        of these (what is written there lands here): the serving engine prefills one row of its batch on its own,
        and decodes only the rows below the highest busy one over the slots they use (attention reads every slot
        it is given). Not to be grown (a view cannot grow its parent)."""
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise InputError(f"KVCache.rows takes a slice of consecutive rows (so the buffers stay views), got "
                             f"{index!r}")
        view = copy.copy(self)
        view.k, view.v = [t[index, :, :capacity] for t in self.k], [t[index, :, :capacity] for t in self.v]
        view.valid = self.valid[index, :capacity]
        return view

    def grow(self, capacity: int) -> None:
        """Room for `capacity` slots, keeping what the cache holds (so a conversation's prefix stays usable)."""
        for kv in (self.k, self.v):
            for i, t in enumerate(kv):
                kv[i] = torch.cat([t, t.new_zeros(*t.shape[:2], capacity - t.shape[2], t.shape[3])], dim=2)
        self.valid = torch.cat([self.valid, self.valid.new_zeros(self.valid.shape[0], capacity - self.capacity)], 1)
        self._mark_static()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half (NeoX) rotary embedding in fp32: x·cos + [-x2, x1]·sin, cast back to x's dtype."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat((-x2, x1), dim=-1) * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.c_attn = Linear(dim, 3 * dim)  # q | k | v, with bias
        self.c_proj = Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, logn: Tensor, mask: Tensor,
                cache: tuple[Tensor, Tensor] | None = None, slots: Tensor | None = None) -> Tensor:
        """With `cache` (this block's key and value buffers), the new keys and values are written at `slots` and
        the queries attend over all of the buffers' slots (the mask says which); without, within `x`."""
        b, s, d = x.shape
        q, k, v = self.c_attn(x).view(b, s, 3, self.n_head, d // self.n_head).unbind(2)  # each [B, S, H, Dh]
        q = apply_rotary(q, cos, sin) * logn.type_as(q)  # logn after rotary, queries only
        k = apply_rotary(k, cos, sin)
        y = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, cache, slots)
        return self.c_proj(y.transpose(1, 2).reshape(b, s, d))


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, cache: tuple[Tensor, Tensor] | None = None,
           slots: Tensor | None = None) -> Tensor:
    """Scaled dot-product attention of q, k, v [B, H, S, Dh] under `mask`. With `cache` (one block's key and value
    buffers), k and v are first written at `slots` ([S], shared by the rows, or [B, S], each row its own) and the
    queries attend over all of the buffers' slots."""
    if cache is not None:
        rows = torch.arange(k.shape[0], device=k.device)[:, None]  # broadcasts with [S] and [B, S] alike
        cache[0][rows, :, slots], cache[1][rows, :, slots] = k.transpose(1, 2), v.transpose(1, 2)
        k, v = cache
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Block(nn.Module):
    def __init__(self, config: QwenAudioConfig):
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = Attention(config.hidden_size, config.num_attention_heads)
        self.ln_2 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = MLP(config.hidden_size, config.mlp_width)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, logn: Tensor, mask: Tensor,
                cache: tuple[Tensor, Tensor] | None = None, slots: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), cos, sin, logn, mask, cache, slots)
        return x + self.mlp(self.ln_2(x))


def ntk_alpha(length: int, seq_length: int) -> int:
    """Dynamic-NTK factor for a sequence of `length` tokens: 1 up to seq_length, then 3, 7, 15, … per doubling."""
    return max(2 ** math.ceil(math.log2(length / seq_length) + 1) - 1, 1)


def rope_base(config: QwenAudioConfig, valid: Tensor, dynamic_ntk: bool) -> Tensor:
    """Each row's rotary base [B] (float64) for a sequence whose real tokens `valid` [B, L] marks: the configured
    base, times alpha^(d / (d - 2)) under dynamic NTK once the L slots pass seq_length, alpha from the row's own
    real-token count (a padded row counts only its tokens)."""
    if dynamic_ntk and valid.shape[1] > config.seq_length:
        alphas = [ntk_alpha(int(n), config.seq_length) for n in valid.sum(-1)]
    else:
        alphas = [1] * valid.shape[0]
    d = config.kv_channels
    return torch.tensor([config.rotary_emb_base * a ** (d / (d - 2)) for a in alphas], dtype=torch.float64,
                        device=valid.device)


def rotary(positions: Tensor, base: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """cos and sin [B, S, 1, dim] at `positions` [B, S] with each row's `base` [B]: angle = p / base^(2i / dim),
    in fp32 with the official arithmetic (the base rounded to fp32 before the power)."""
    inv_freq = 1.0 / base.float()[:, None] ** (torch.arange(0, dim, 2, device=base.device).float() / dim)
    angles = positions.float()[..., None] * inv_freq[:, None, :]
    emb = torch.cat((angles, angles), dim=-1)[:, :, None, :]
    return emb.cos(), emb.sin()


def logn_scale(positions: Tensor, seq_length: int) -> Tensor:
    """Query scale at 0-based `positions`: log(p + 1) / log(seq_length) past seq_length, else 1 (fp32)."""
    p = positions.double() + 1
    return torch.where(p > seq_length, p.log() / math.log(seq_length), 1.0).float()


def positions_and_mask(valid: Tensor, slots: Tensor, true_positions: bool = False) -> tuple[Tensor, Tensor]:
    """Positions [B, S] and attention mask [B, 1, S, K] for queries at `slots` over K keys, `valid` [B, K]
    marking the real ones. `slots` is [S], the same for every row (a batch prefilled or decoded together), or
    [B, S], each row at its own (rows that joined a batch at different times). A query sees the real keys at or
    before its slot, and always itself (so a padding slot stays finite; it is never read). Positions are the slots
    (official), or with `true_positions` the count of real tokens before the slot (padding then changes nothing)."""
    keys = torch.arange(valid.shape[1], device=valid.device)
    at = slots[..., None]  # [S, 1] or [B, S, 1]: either broadcasts against the keys to [B, S, K]
    seen = (keys <= at) & valid[:, None, :]
    mask = seen | (keys == at)
    if true_positions:
        positions = (seen.sum(-1) - 1).clamp(min=0)
    else:
        positions = slots.expand(valid.shape[0], -1)
    return positions, mask[:, None]


class Decoder(nn.Module):
    """Qwen-7B: token ids (or their embeddings, audio spliced in) in, next-token logits out."""

    def __init__(self, config: QwenAudioConfig, *, true_positions: bool | None = None):
        """`true_positions` sets `config.true_positions` (None keeps it)."""
        super().__init__()
        expect(config, QwenAudioConfig, "config", "a QwenAudioConfig")
        self.config = config if true_positions is None else dataclasses.replace(config, true_positions=true_positions)
        # Training: recompute each block's activations in the backward pass instead of keeping them, so a long
        # example fits in memory (costs one more forward); the gradients are the same.
        self.activation_checkpointing = False
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def embedding(self) -> nn.Embedding:
        """The token embedding, whatever a family names it (`wte` here): its dtype is the activations'."""
        return self.wte

    @property
    def blocks(self) -> nn.ModuleList:
        return self.h

    def forward(self, x: Tensor, positions: Tensor, mask: Tensor, base: Tensor, cache: KVCache | None = None,
                slots: Tensor | None = None, *, last_only: bool = False, select: Tensor | None = None,
                hidden_states: list[Tensor] | None = None) -> Tensor:
        """Logits [B, S, vocab_size] for `x`: ids [B, S], or their embeddings [B, S, hidden_size] (`embed`).

        `positions` [B, S] and `mask` [B, 1, S, K] come from `positions_and_mask`, `base` [B] from `rope_base`.
        With a `cache`, the keys and values are written at `slots` ([S], or [B, S] with each row at its own: see
        `positions_and_mask`) and K is the cache's capacity; without, K is S. Logn scaling is on in eval mode only,
        as in the official model. `last_only` gives [B, 1, vocab_size] for the last slot (what generation needs: at
        155,947 outputs per position, lm_head is a large part of a prefill); `select` [B, S] (bool) gives
        [N, vocab_size] for the N positions it marks (what a loss over a few label tokens needs). A `hidden_states`
        list receives what the official `output_hidden_states` gives: the embeddings, each block's output but the
        last, and ln_f of the last block's output.
        """
        if not x.is_floating_point():
            x = self.wte(x)
        cos, sin = rotary(positions, base, self.config.kv_channels)
        if self.config.use_logn_attn and not self.training:
            logn = logn_scale(positions, self.config.seq_length)
        else:
            logn = torch.ones(positions.shape, device=x.device)
        for i, block in enumerate(self.h):
            if hidden_states is not None:
                hidden_states.append(x)
            if self.activation_checkpointing and cache is None and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, logn[..., None, None], mask, use_reentrant=False)
            else:
                layer_cache = (cache.k[i], cache.v[i]) if cache is not None else None
                x = block(x, cos, sin, logn[..., None, None], mask, layer_cache, slots)
        x = self.ln_f(x[:, -1:] if last_only else x)
        if hidden_states is not None:  # the official tuple ends with ln_f's output, not the last block's
            hidden_states.append(x)
        return self.lm_head(x if select is None else x[select])

    def embed(self, input_ids: Tensor, audio: Sequence[Tensor] = ()) -> Tensor:
        """Token embeddings [B, S, hidden_size], each `<audio>…</audio>` region replaced by its clip's span."""
        bad = (input_ids < 0) | (input_ids >= self.config.vocab_size)
        if bad.any():
            row, col = bad.nonzero()[0].tolist()
            raise InputError(f"token id {int(input_ids[row, col])} at [{row}, {col}] is outside the vocabulary "
                             f"(0..{self.config.vocab_size - 1})")
        return splice_audio(self.wte(input_ids), input_ids, audio, self.config.audio.audio_start_id)

    def rope_base(self, valid: Tensor) -> Tensor:
        """Each row's rotary base for a sequence whose real tokens `valid` marks; dynamic NTK in eval mode only."""
        return rope_base(self.config, valid, self.config.use_dynamic_ntk and not self.training)

    def logits(self, input_ids: Tensor, attention_mask: Tensor | None = None, audio: Sequence[Tensor] = (), *,
               last_only: bool = False, select: Tensor | None = None,
               hidden_states: list[Tensor] | None = None) -> Tensor:
        """The official model's forward over whole sequences, no cache: logits [B, S, vocab_size] for `input_ids`
        [B, S], `attention_mask` [B, S] marking real tokens (1) and padding (0), and `audio`, the encoded span of
        every `<audio>…</audio>` region in row-major order."""
        expect(input_ids, Tensor, "input_ids", "a torch.Tensor of token ids [B, S]")
        expect(attention_mask, (Tensor, type(None)), "attention_mask", "a torch.Tensor [B, S] or None")
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else \
            attention_mask.to(input_ids.device, torch.bool)  # a tokenizer's mask is on the host
        slots = torch.arange(input_ids.shape[1], device=input_ids.device)
        positions, mask = positions_and_mask(valid, slots, self.config.true_positions)
        return self(self.embed(input_ids, audio), positions, mask, self.rope_base(valid),
                    last_only=last_only, select=select, hidden_states=hidden_states)


def splice_audio(x: Tensor, input_ids: Tensor, audio: Sequence[Tensor], start_id: int) -> Tensor:
    """Replace the embeddings of each `<audio>`…`</audio>` region (tags included) by its clip's encoded span.

    Regions are matched to clips in row-major order, as the official code does; every mismatch is an error,
    because a clip spliced into the wrong rows would silently corrupt the prompt.
    """
    starts = (input_ids == start_id).nonzero().tolist()
    ends = (input_ids == start_id + 1).nonzero().tolist()
    if not starts and not ends and not audio:
        return x
    pairs = list(zip(starts, ends))
    if len(starts) != len(ends) or any(s[0] != e[0] or s[1] > e[1] for s, e in pairs) or any(
            p[1][0] == n[0][0] and n[0][1] < p[1][1] for p, n in zip(pairs, pairs[1:])):
        raise InputError(f"unbalanced audio tags: <audio> at {starts}, </audio> at {ends} (as [row, column])")
    if len(audio) != len(pairs):
        raise InputError(f"the ids hold {len(pairs)} <audio>…</audio> region(s) but {len(audio)} encoded clip(s) "
                         "were given")
    x = x.clone()
    for k, (((row, a), (_, b)), span) in enumerate(zip(pairs, audio)):
        if span.shape != (b - a + 1, x.shape[-1]):
            raise InputError(f"audio region {k} (row {row}, columns {a}..{b}) holds {b - a + 1} tokens but clip {k}'s "
                             f"encoding has shape {tuple(span.shape)}; expected ({b - a + 1}, {x.shape[-1]})")
        x[row, a : b + 1] = span.to(x.dtype)
    return x
