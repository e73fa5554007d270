"""The language model: Qwen-7B, a pre-norm rotary transformer with a static KV cache (SPEC §7, §8, §12).

ids -> wte (audio spans written over each `<audio>…</audio>` region) -> N × [x += attn(RMSNorm(x));
x += mlp(RMSNorm(x))] -> RMSNorm -> lm_head.

Beyond a textbook decoder, three inference-time rules of the official code change the numbers (SPEC §8, §12):
- dynamic NTK: past `seq_length` tokens the rotary base grows by alpha^(d/(d-2)); alpha is chosen at prefill
  (per row under an attention mask) and frozen for all later decoding steps;
- logn scaling: queries at position p ≥ seq_length are multiplied by log(p + 1) / log(seq_length);
- positions are token slots 0..K-1 even under left padding, so a left-padded row starts at position > 0.
  Rotary scores depend only on position differences, so the shift changes nothing until slots pass seq_length;
  from there a padded row's queries get logn scaling that the same prompt unpadded would not get yet.
`Decoder(config, true_positions=True)` is the one switch away from the official behaviour: rotary and logn then
use each row's real-token count as its position, so a prompt gives the same logits whether or not it is padded.

The KV cache is gpt-fast's: preallocated [B, H, max_seq_len, head_dim] buffers written at `input_pos`, so a decoding
step has fixed shapes. Module names follow the checkpoint (`h.0.attn.c_attn`, `ln_f`, …) once its `transformer.`
prefix is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import QwenAudioConfig
from .errors import InputError


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
        self.w1 = nn.Linear(dim, width, bias=False)
        self.w2 = nn.Linear(dim, width, bias=False)
        self.c_proj = nn.Linear(width, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class KVCache(nn.Module):
    """Keys and values of every position so far, written in place at `input_pos`."""

    def __init__(self, batch: int, heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (batch, heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k[:, :, input_pos] = k
        self.v[:, :, input_pos] = v
        return self.k, self.v


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half (NeoX) rotary embedding in fp32: x·cos + [-x2, x1]·sin, cast back to x's dtype."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat((-x2, x1), dim=-1) * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(dim, 3 * dim)  # q | k | v, with bias
        self.c_proj = nn.Linear(dim, dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, logn: Tensor, mask: Tensor, input_pos: Tensor) -> Tensor:
        b, s, d = x.shape
        q, k, v = self.c_attn(x).view(b, s, 3, self.n_head, d // self.n_head).unbind(2)  # each [B, S, H, Dh]
        q = apply_rotary(q, cos, sin) * logn.type_as(q)  # logn after rotary, queries only
        k = apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, Dh]
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    def __init__(self, config: QwenAudioConfig):
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = Attention(config.hidden_size, config.num_attention_heads)
        self.ln_2 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = MLP(config.hidden_size, config.mlp_width)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, logn: Tensor, mask: Tensor, input_pos: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x), cos, sin, logn, mask, input_pos)
        return x + self.mlp(self.ln_2(x))


def ntk_alpha(length: int, seq_length: int) -> int:
    """Dynamic-NTK factor for a sequence of `length` tokens: 1 up to seq_length, then 3, 7, 15, … per doubling."""
    return max(2 ** math.ceil(math.log2(length / seq_length) + 1) - 1, 1)


def logn_scale(positions: Tensor, seq_length: int) -> Tensor:
    """Query scale at 0-based `positions`: log(p + 1) / log(seq_length) past seq_length, else 1 (fp32)."""
    p = positions.double() + 1
    return torch.where(p > seq_length, p.log() / math.log(seq_length), 1.0).float()


class Decoder(nn.Module):
    """Qwen-7B: token ids (and encoded audio spans) in, next-token logits out."""

    def __init__(self, config: QwenAudioConfig, *, true_positions: bool = False):
        super().__init__()
        self.config = config
        self.true_positions = true_positions
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.max_seq_len = 0  # no cache until setup_cache
        self.prefills = 0  # fresh prefills into the cache so far: tells a chat whether its cached prefix survives
        self.rope_base = torch.ones(0)  # per-row base chosen at prefill, frozen while decoding
        self.inv_freq = torch.ones(0)  # [B, head_dim / 2] rotary frequencies from rope_base
        self.compiled_step: Callable[[Tensor, Tensor], Tensor] | None = None  # see compile_step

    def setup_cache(self, batch_size: int, max_seq_len: int) -> None:
        """Allocate the KV cache (in the weights' dtype and device); it lives until the next setup_cache."""
        w, heads, head_dim = self.wte.weight, self.config.num_attention_heads, self.config.kv_channels  # float dtype
        for block in self.h:
            block.attn.kv_cache = KVCache(batch_size, heads, max_seq_len, head_dim, w.dtype).to(w.device)
        self.key_valid = torch.zeros(batch_size, max_seq_len, dtype=torch.bool, device=w.device)
        self.max_seq_len = max_seq_len

    def clear_cache(self) -> None:
        """Free the KV cache; calls then attend within the ids they are given (full-sequence mode)."""
        for block in self.h:
            block.attn.kv_cache = None
        self.max_seq_len = 0

    def forward(
        self,
        input_ids: Tensor,
        input_pos: Tensor | None = None,
        *,
        attention_mask: Tensor | None = None,
        audio: Sequence[Tensor] | None = None,
        last_only: bool = False,
        hidden_states: list[Tensor] | None = None,
    ) -> Tensor:
        """Logits [B, S, vocab_size] for `input_ids` [B, S] placed at slots `input_pos` [S] (default 0..S-1);
        with `last_only`, [B, 1, vocab_size] for the last slot (what generation needs: at 155,947 outputs per
        position, lm_head is a large part of a prefill).

        `attention_mask` [B, S] marks real tokens (1) and padding (0) of these slots. `audio` holds the encoded
        span of every `<audio>…</audio>` region in the ids, in row-major order. With a KV cache, a call starting at
        slot 0 is a prefill, a one-token call is a decoding step, and a longer call past slot 0 extends a cached
        prefix (allowed only if the NTK alpha of the whole sequence stays what the prefix was computed with).
        A `hidden_states` list receives what the official `output_hidden_states` gives: the embeddings (audio
        spliced in), each block's output but the last, and ln_f of the last block's output.
        """
        b, s = input_ids.shape
        device = input_ids.device
        input_pos = torch.arange(s, device=device) if input_pos is None else input_pos
        if attention_mask is None:
            attention_mask = torch.ones(b, s, dtype=torch.bool, device=device)
        new_valid = attention_mask.bool()
        self._check_inputs(input_ids, input_pos)

        x = self.wte(input_ids)
        if s > 1 or int(input_pos[0]) == 0:  # like the official code, decoding steps are never spliced
            x = splice_audio(x, input_ids, audio or [], self.config.audio.audio_start_id)
        if self.max_seq_len:
            self.prefills += int(input_pos[0]) == 0
            self.key_valid[:, input_pos] = new_valid
            valid, key_pos = self.key_valid, torch.arange(self.max_seq_len, device=device)
        else:
            valid, key_pos = new_valid, input_pos
        self._choose_rope_base(valid[:, : int(input_pos[-1]) + 1], first=int(input_pos[0]), step=s == 1)

        if self.true_positions:  # each row counts only its real tokens
            positions = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, input_pos if self.max_seq_len else slice(None)]
        else:  # official: the slot index, padding included
            positions = input_pos[None, :].expand(b, s)
        # Causal and padding mask; each slot may always see itself so padded rows stay finite (never read).
        mask = (key_pos[None, :] <= input_pos[:, None])[None] & valid[:, None, :]
        mask = (mask | (key_pos[None, :] == input_pos[:, None])[None])[:, None]  # [B, 1, S, keys]
        return self._blocks(x, positions, mask, input_pos, last_only, hidden_states)

    def step(self, input_ids: Tensor, input_pos: Tensor) -> Tensor:
        """One decoding step: logits [B, vocab] for `input_ids` [B, 1] at slot `input_pos` [1], on the KV cache of a
        prefill (which chose the rotary base). The same math as `forward`, without its checks or any host
        synchronisation: the fixed-shape graph that `torch.compile` captures (see `compile_step`) and generation
        runs. The ids must be valid and the slot inside the cache; generation guarantees both."""
        self.key_valid[:, input_pos] = True
        key_pos = torch.arange(self.max_seq_len, device=input_ids.device)
        seen = (key_pos <= input_pos)[None, :] & self.key_valid  # [B, keys]; later slots may hold an older reply
        if self.true_positions:
            positions = seen.sum(-1, keepdim=True) - 1
        else:
            positions = input_pos[None, :].expand(input_ids.shape[0], 1)
        mask = seen[:, None, None, :]  # [B, 1, 1, keys]
        return self._blocks(self.wte(input_ids), positions, mask, input_pos, last_only=True)[:, -1]

    def compile_step(self, **options) -> None:
        """Compile `step` with `torch.compile(fullgraph=True)` for generation to use (gpt-fast's decode_one_token).
        On CUDA, pass mode="reduce-overhead" for CUDA graphs. It recompiles when the batch size or cache changes."""
        self.compiled_step = torch.compile(self.step, fullgraph=True, dynamic=False, **options)

    def _blocks(self, x: Tensor, positions: Tensor, mask: Tensor, input_pos: Tensor, last_only: bool,
                hidden_states: list[Tensor] | None = None) -> Tensor:
        """The transformer proper: rotary and logn from `positions` [B, S], then the blocks, ln_f and lm_head."""
        angles = positions.float()[..., None] * self.inv_freq[:, None, :]
        emb = torch.cat((angles, angles), dim=-1)[:, :, None, :]  # [B, S, 1, head_dim]
        cos, sin = emb.cos(), emb.sin()
        if self.config.use_logn_attn and not self.training:
            logn = logn_scale(positions, self.config.seq_length)
        else:
            logn = torch.ones(positions.shape, device=x.device)
        for block in self.h:
            if hidden_states is not None:
                hidden_states.append(x)
            x = block(x, cos, sin, logn[..., None, None], mask, input_pos)
        x = self.ln_f(x[:, -1:] if last_only else x)
        if hidden_states is not None:  # the official tuple ends with ln_f's output, not the last block's
            hidden_states.append(x)
        return self.lm_head(x)

    def _choose_rope_base(self, valid: Tensor, first: int, step: bool) -> None:
        """Set the rotary base of each row from the NTK alpha (SPEC §8); frozen once a prefill has chosen it."""
        length = valid.shape[1]
        if self.training or not self.config.use_dynamic_ntk:
            alphas = [1] * valid.shape[0]
        elif length > self.config.seq_length:  # per row, from its real-token count
            alphas = [ntk_alpha(int(n), self.config.seq_length) for n in valid.sum(-1)]
        else:
            alphas = [1] * valid.shape[0]
        dim = self.config.kv_channels
        base = torch.tensor([self.config.rotary_emb_base * a ** (dim / (dim - 2)) for a in alphas], dtype=torch.float64)
        if self.max_seq_len and first > 0:
            if step:
                return  # decoding: keep the prefill's base
            if not torch.equal(base, self.rope_base):
                raise InputError(
                    f"extending the cached prefix to {length} tokens would change the NTK rotary base "
                    f"({self.rope_base.tolist()} -> {base.tolist()}): prefill the whole sequence from slot 0"
                )
        self.rope_base = base
        # Rotary frequencies per row in fp32, with the official arithmetic: 1 / base ** (2i / dim).
        exponents = torch.arange(0, dim, 2, device=valid.device).float() / dim
        self.inv_freq = torch.stack([1.0 / (float(b) ** exponents) for b in base])  # [B, dim/2]

    def _check_inputs(self, input_ids: Tensor, input_pos: Tensor) -> None:
        bad = (input_ids < 0) | (input_ids >= self.config.vocab_size)
        if bad.any():
            row, col = bad.nonzero()[0].tolist()
            raise InputError(f"token id {int(input_ids[row, col])} at [{row}, {col}] is outside the vocabulary "
                             f"(0..{self.config.vocab_size - 1})")
        if input_pos.shape != input_ids.shape[1:]:
            raise InputError(f"input_pos has shape {tuple(input_pos.shape)}, expected ({input_ids.shape[1]},)")
        if self.max_seq_len and int(input_pos[-1]) >= self.max_seq_len:
            raise InputError(f"position {int(input_pos[-1])} is past the KV cache of {self.max_seq_len} slots: "
                             "call setup_cache with a larger max_seq_len")
        if self.max_seq_len and input_ids.shape[0] != self.key_valid.shape[0]:
            raise InputError(f"batch of {input_ids.shape[0]} rows for a KV cache set up for {self.key_valid.shape[0]}")


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
