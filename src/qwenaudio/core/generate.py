"""Token generation over the decoder's static KV cache: greedy or sampled, batched, stoppable, streamable.

One loop serves everything: prefill the (left-padded) prompts once, then one decoding step per new token. Each
row stops on its own (stop id, stop string or length); finished rows are fed padding until all are done, as in
Hugging Face's generate. The logits pipeline follows the official generate's order: repetition penalty and
min-length suppression, then temperature, top-k and top-p (SPEC §9).

By default only ids the tokenizer can decode are chosen: the embedding has rows 155165–155946 too, but no text maps
to them. The official generate chooses among all rows, so where an extra row scores best (tiny random weights do
that) its ids part from ours at that step. `GenerationConfig(full_vocab=True)` chooses among all rows as the
official code does; the tokenizer shows such an id as `<|id_N|>` (dropped with `skip_special_tokens`, like tags).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from .config import GenerationConfig
from .decoder import Decoder
from .errors import InputError
from .tokenizer import Tokenizer


def process_logits(logits: Tensor, seen: Tensor, step: int, config: GenerationConfig) -> Tensor:
    """Apply repetition penalty, min-length suppression, temperature, top-k and top-p to [B, V] fp32 logits.

    `seen` [B, T] holds every id so far (prompt and reply) for the repetition penalty, as Hugging Face counts them.
    """
    if config.repetition_penalty != 1.0:
        previous = logits.gather(1, seen)
        penalised = torch.where(previous > 0, previous / config.repetition_penalty, previous * config.repetition_penalty)
        logits = logits.scatter(1, seen, penalised)
    if step < config.min_new_tokens:
        logits = logits.clone()
        logits[:, [i for i in config.stop_token_ids if i < logits.shape[1]]] = float("-inf")
    if not config.do_sample:
        return logits
    logits = logits / config.temperature
    if config.top_k > 0:
        kth = logits.topk(min(config.top_k, logits.shape[1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the better-ranked tokens
        drop = before >= config.top_p  # keep the smallest prefix reaching top_p (always the best token)
        logits = logits.scatter(1, order, ordered.masked_fill(drop, float("-inf")))
    return logits


def choose(logits: Tensor, config: GenerationConfig, generator: torch.Generator | None) -> Tensor:
    """Next id per row: argmax, or a draw from softmax(logits)."""
    if not config.do_sample:
        return logits.argmax(dim=-1)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


def generate_steps(
    decoder: Decoder,
    tokenizer: Tokenizer,
    input_ids: Tensor,
    *,
    attention_mask: Tensor | None = None,
    audio: Sequence[Tensor] | None = None,
    config: GenerationConfig = GenerationConfig(),
    prefix_len: int = 0,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (next ids [B], newly finished rows [B] bool) once per step until every row has stopped.

    A row's stop token is yielded in the step it finishes, then padding; callers cut each row at its stop.
    `prefix_len` > 0 says the decoder's KV cache already holds `input_ids[:, :prefix_len]` (a previous chat turn):
    only the rest is prefilled, unless the cache is too small or the NTK factor would change (then all is).
    """
    b, s = input_ids.shape
    device = input_ids.device
    config = _fit_context(config, s, decoder.config.context_length)
    generator = torch.Generator(device).manual_seed(config.seed) if config.seed is not None else None
    stops = torch.tensor(config.stop_token_ids, device=device)
    seen = input_ids
    replies: list[list[int]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool, device=device)
    logits = _prefill(decoder, input_ids, attention_mask, list(audio or []), s + config.max_new_tokens, prefix_len)
    for step in range(config.max_new_tokens):
        candidates = logits if config.full_vocab else logits[:, : len(tokenizer)]
        scores = process_logits(candidates.float(), seen, step, config)
        ids = choose(scores, config, generator).masked_fill(done, config.pad_token_id)
        finished = ~done & torch.isin(ids, stops)
        if config.stop_strings:
            for row in (~done & ~finished).nonzero().flatten().tolist():
                replies[row].append(int(ids[row]))
                text = tokenizer.decode(replies[row][-64:])
                finished[row] = any(stop in text for stop in config.stop_strings)
        if step == config.max_new_tokens - 1:
            finished |= ~done
        yield ids, finished
        done |= finished
        if done.all():
            return
        seen = torch.cat([seen, ids[:, None]], dim=1)
        logits = (decoder.compiled_step or decoder.step)(ids[:, None], torch.tensor([s + step], device=device))


def _fit_context(config: GenerationConfig, prompt: int, context: int) -> GenerationConfig:
    """`config` with max_new_tokens cut (with a warning) to what fits the model's context after a `prompt`-token
    prompt: a budget like 10**9 means "until a stop", not a KV cache of a billion positions."""
    room = context - prompt
    if room < 1:
        raise InputError(f"the prompt's {prompt} tokens fill the model's context of {context} positions "
                         "(max_position_embeddings): shorten it")
    if config.max_new_tokens <= room:
        return config
    warnings.warn(f"max_new_tokens={config.max_new_tokens} is cut to {room}: the prompt's {prompt} tokens and the "
                  f"new ones must fit the model's context of {context} (max_position_embeddings)", stacklevel=3)
    return config.replace(max_new_tokens=room, min_new_tokens=min(config.min_new_tokens, room))


def _prefill(decoder: Decoder, input_ids: Tensor, attention_mask: Tensor | None, audio: list[Tensor],
             capacity: int, prefix_len: int) -> Tensor:
    """Last-position logits after feeding the prompt, reusing a cached prefix when it is valid. The cache is
    reallocated only when it is too small (or of another batch size)."""
    if decoder.max_seq_len < capacity or decoder.key_valid.shape[0] != input_ids.shape[0]:
        decoder.setup_cache(input_ids.shape[0], capacity)
        prefix_len = 0
    if 0 < prefix_len < input_ids.shape[1]:
        chunk = input_ids[:, prefix_len:]
        cached_clips = int((input_ids[:, :prefix_len] == decoder.config.audio.audio_start_id).sum())
        try:
            return decoder(chunk, torch.arange(prefix_len, input_ids.shape[1], device=input_ids.device),
                           audio=audio[cached_clips:], last_only=True)[:, -1]
        except InputError:  # the longer sequence needs another NTK factor: recompute everything
            pass
    return decoder(input_ids, attention_mask=attention_mask, audio=audio, last_only=True)[:, -1]


def generate(
    decoder: Decoder,
    tokenizer: Tokenizer,
    input_ids: Tensor,
    *,
    attention_mask: Tensor | None = None,
    audio: Sequence[Tensor] | None = None,
    config: GenerationConfig = GenerationConfig(),
) -> list[list[int]]:
    """New ids of each row, up to (not including) its stop token."""
    rows: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    done = [False] * len(rows)
    for ids, finished in generate_steps(decoder, tokenizer, input_ids, attention_mask=attention_mask, audio=audio,
                                        config=config):
        for row, (token, end) in enumerate(zip(ids.tolist(), finished.tolist())):
            if not done[row] and not (end and token in config.stop_token_ids):
                rows[row].append(token)
            done[row] = done[row] or end
    return rows


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """Text before the first stop string (generation stops after the token that completes one)."""
    cuts = [text.find(s) for s in stop_strings if s in text]
    return text[: min(cuts)] if cuts else text


def stream_text(
    decoder: Decoder,
    tokenizer: Tokenizer,
    input_ids: Tensor,
    *,
    audio: Sequence[Tensor] | None = None,
    config: GenerationConfig = GenerationConfig(),
    prefix_len: int = 0,
    reply: list[int] | None = None,
) -> Iterator[str]:
    """Yield the reply of a single prompt as text pieces, as soon as they decode to whole characters.

    The reply's ids are appended to `reply` if given (the stop token excluded)."""
    if input_ids.shape[0] != 1:
        raise InputError("stream_text takes one prompt (a [1, S] batch)")
    reply = [] if reply is None else reply
    shown = ""
    for ids, finished in generate_steps(decoder, tokenizer, input_ids, audio=audio, config=config,
                                        prefix_len=prefix_len):
        token, last = int(ids[0]), bool(finished[0])
        if not (last and token in config.stop_token_ids):
            reply.append(token)
        text = cut_at_stop(tokenizer.decode(reply, skip_special_tokens=True), config.stop_strings)
        # A multi-byte character may still be incomplete, unless the reply ends here (then it shows as decode does).
        if (last or not text.endswith("\ufffd")) and text != shown:
            yield text[len(shown):]
            shown = text
