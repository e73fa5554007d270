"""Token generation: greedy or sampled, batched, stoppable, streamable, over a KV cache that generation owns.

gpt-fast's shape: `prefill` feeds the (left-padded) prompts into a `KVCache` once and fixes each row's rotary base,
then `decode_one_token` (compiled by `compile_decoding`) feeds one new token per step. The cache holds only what the
decoder reads; a `Session` keeps it together with what generation fed into it (the ids, the clips, each row's
rotary base). A session kept between calls (a conversation) is reused when it `extends` to the new prompt; `fit` is
the one rule for its cache's size. Each row stops on its own (stop id, stop string or length); finished rows are fed
padding until all are done, as in Hugging Face's generate. The logits pipeline follows the official generate's
order: repetition penalty and min-length suppression, then temperature, top-k and top-p (docs/MODEL.md#generation).

By default only ids the tokenizer can decode are chosen: the embedding has rows 155165–155946 too, but no text maps
to them. The official generate chooses among all rows, so where an extra row scores best (tiny random weights do
that) its ids part from ours at that step. `GenerationConfig(full_vocab=True)` chooses among all rows as the
official code does; the tokenizer shows such an id as `<|id_N|>` (dropped with `skip_special_tokens`, like tags).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .config import GenerationConfig
from .decoder import Decoder, KVCache, positions_and_mask
from .errors import InputError
from .linear import takes_gemv, without_onednn
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
        drop = before >= config.top_p  # keep the smallest prefix reaching top_p...
        drop[:, 0] = False  # ...and always the best token, even where top_p rounds to 0 in float32
        logits = logits.scatter(1, order, ordered.masked_fill(drop, float("-inf")))
    return logits


def choose(logits: Tensor, config: GenerationConfig, generator: torch.Generator | None) -> Tensor:
    """Next id per row: argmax, or a draw from softmax(logits)."""
    if not config.do_sample:
        return logits.argmax(dim=-1)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


@dataclass(eq=False)
class Session:
    """A KV cache and what generation fed into it. The decoder reads none of the rest: generation keeps it to tell
    whether a longer prompt `extends` what the cache holds (a conversation's next turn), and to decode with the
    rotary base the prompt fixed."""

    cache: KVCache
    ids: Tensor = field(init=False)  # [B, length]: the ids fed so far, in slots 0..length-1
    audio: list[Tensor] = field(init=False, default_factory=list)  # the encoded clips spliced into them, in order
    rope_base: Tensor | None = field(init=False, default=None)  # [B] float64, fixed by the prefill from slot 0

    def __post_init__(self) -> None:
        valid = self.cache.valid
        self.ids = torch.zeros(valid.shape[0], 0, dtype=torch.long, device=valid.device)

    @property
    def length(self) -> int:
        return self.ids.shape[1]


@torch.no_grad()
def prefill(decoder: Decoder, session: Session, input_ids: Tensor, attention_mask: Tensor | None = None,
            audio: Sequence[Tensor] = (), start: int = 0) -> Tensor:
    """Feed `input_ids[:, start:]` into the session's cache at slots start.. and return the last slot's logits
    [B, vocab].

    `start` 0 is a new prompt: each row's rotary base is chosen from its real tokens (`attention_mask`) and frozen
    in `session.rope_base` for the decoding steps. `start` > 0 extends what the session holds
    (`input_ids[:, :start]`, as `extends` checks); `audio` holds every clip of the whole prompt, the cached ones first.
    """
    cache = session.cache
    b, s = input_ids.shape
    if s > cache.capacity or b != cache.valid.shape[0]:
        raise InputError(f"a [{b}, {s}] prompt does not fit a KV cache of {cache.valid.shape[0]} rows and "
                         f"{cache.capacity} slots")
    if start not in (0, session.length):
        raise InputError(f"start={start}: a prefill starts at slot 0 or extends the {session.length} ids the cache "
                         "holds")
    slots = torch.arange(start, s, device=input_ids.device)
    cache.valid[:, slots] = True if attention_mask is None else attention_mask[:, start:].bool()
    base = decoder.rope_base(cache.valid[:, :s])
    if start == 0:
        session.rope_base = base
    elif not torch.equal(base, session.rope_base):
        raise InputError(f"extending the cached prefix to {s} tokens would change the NTK rotary base "
                         f"({session.rope_base.tolist()} -> {base.tolist()}): prefill the whole sequence from slot 0")
    x = decoder.embed(input_ids[:, start:], audio[len(session.audio) if start else 0:])
    positions, mask = positions_and_mask(cache.valid, slots, decoder.config.true_positions)
    logits = decoder(x, positions, mask, session.rope_base, cache, slots, last_only=True)[:, -1]
    session.ids, session.audio = input_ids, list(audio)
    return logits


@torch.no_grad()
def decode_one_token(decoder: Decoder, cache: KVCache, ids: Tensor, slot: Tensor, base: Tensor) -> Tensor:
    """Logits [B, vocab] after feeding `ids` [B, 1] at `slot` ([1], shared by the rows, or [B, 1], each row's own:
    a serving batch whose rows joined at different steps) with each row's rotary `base` [B] (the prefill's,
    `Session.rope_base`): plain tensors, fixed shapes and no host synchronisation, the graph `compile_decoding`
    captures. The ids must be valid and the slots inside the cache; generation sees to it."""
    cache.valid[torch.arange(ids.shape[0], device=ids.device)[:, None], slot] = True
    positions, mask = positions_and_mask(cache.valid, slot, decoder.config.true_positions)
    return decoder(ids, positions, mask, base, cache, slot, last_only=True)[:, -1]


Step = Callable[[Decoder, KVCache, Tensor, Tensor, Tensor], Tensor]  # `decode_one_token`, or a compiled copy of it


def compile_decoding(**options) -> Step:
    """`decode_one_token` compiled with `torch.compile(fullgraph=True)` (gpt-fast's --compile), for generation's
    `step=`; nothing else changes. On CUDA, pass mode="reduce-overhead" for CUDA graphs. It recompiles when the
    batch size or cache capacity changes. A bf16 step of one row on a CPU runs with oneDNN off, so that the graph's
    products take ATen's matrix-vector kernel, as eager ones do (core/linear.py)."""
    compiled = torch.compile(decode_one_token, fullgraph=True, dynamic=False, **options)

    def step(decoder: Decoder, cache: KVCache, ids: Tensor, slot: Tensor, base: Tensor) -> Tensor:
        if not takes_gemv(ids.shape[0], cache.k[0].dtype, ids.device):
            return compiled(decoder, cache, ids, slot, base)
        with without_onednn():
            return compiled(decoder, cache, ids, slot, base)

    return step


def extends(decoder: Decoder, session: Session, input_ids: Tensor, audio: Sequence[Tensor] = ()) -> bool:
    """Whether `session` can be extended to `input_ids` (one row per cache row, no padding) with the same logits as
    a fresh prefill: it holds a proper prefix of the ids, the clips spliced there encode the same (to 1e-5 relative)
    as `audio`'s first ones, and the longer sequence keeps every row's rotary base (dynamic NTK)."""
    n = session.length
    if not 0 < n < input_ids.shape[1] or session.ids.shape[0] != input_ids.shape[0]:
        return False
    if not torch.equal(session.ids, input_ids[:, :n]) or len(audio) < len(session.audio):
        return False
    if any((a - b).abs().max() > 1e-5 * b.abs().max() for a, b in zip(session.audio, audio)):
        return False
    all_real = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    return torch.equal(decoder.rope_base(all_real), session.rope_base)


def fit(decoder: Decoder, session: Session | None, batch: int, need: int) -> Session:
    """A session whose cache has `batch` rows and at least `need` slots: `session` itself when it has them; its
    cache grown to twice its size (or `need`), keeping its contents, when too small; a new one when it has another
    batch size."""
    weight = decoder.embedding.weight
    if session is None or session.cache.valid.shape[0] != batch:
        return Session(KVCache(decoder.config, batch, need, weight.dtype, weight.device))
    if session.cache.capacity < need:
        session.cache.grow(max(need, 2 * session.cache.capacity))
    return session


@torch.no_grad()
def generate_steps(
    decoder: Decoder,
    tokenizer: Tokenizer,
    input_ids: Tensor,
    *,
    attention_mask: Tensor | None = None,
    audio: Sequence[Tensor] | None = None,
    config: GenerationConfig = GenerationConfig(),
    session: Session | None = None,
    step: Step = decode_one_token,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (next ids [B], newly finished rows [B] bool) once per step until every row has stopped.

    A row's stop token is yielded in the step it finishes, then padding; callers cut each row at its stop.
    A `session` kept from an earlier call (a conversation's previous turn) is reused: when it `extends` to these ids
    only the new ones are prefilled; its cache grows when too small. Without one, a session is made for this call.
    Each step is handed over as it is made, which streaming needs; `generate` keeps them on the device instead.
    `step` feeds each new token (`decode_one_token`, or `compile_decoding`'s).
    """
    decoding = _Decoding(decoder, tokenizer, input_ids, attention_mask, audio, config, session, step)
    config = decoding.config
    replies: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    for t in range(config.max_new_tokens):
        ids, finished = decoding.choose(t)
        if config.stop_strings:
            for row in (~decoding.done & ~finished).nonzero().flatten().tolist():
                replies[row].append(int(ids[row]))
                finished[row] = stop_string_ends(tokenizer, replies[row], config.stop_strings)
        if t == config.max_new_tokens - 1:
            finished |= ~decoding.done
        yield ids, finished
        decoding.done |= finished
        if decoding.done.all():
            return
        decoding.feed(ids, t)


class _Decoding:
    """What both generation loops share: the prompt prefilled into a session's KV cache, then, per step, the next
    ids and which rows a stop id ends (`choose`), and feeding them back (`feed`). Nothing here waits for the device."""

    def __init__(self, decoder: Decoder, tokenizer: Tokenizer, input_ids: Tensor, attention_mask: Tensor | None,
                 audio: Sequence[Tensor] | None, config: GenerationConfig, session: Session | None, step: Step):
        b, s = input_ids.shape
        device = input_ids.device
        audio = list(audio or [])
        self.decoder, self.tokenizer, self.decode_step = decoder, tokenizer, step
        self.config = config = _fit_context(config, s, decoder.config.context_length)
        self.generator = torch.Generator(device).manual_seed(config.seed) if config.seed is not None else None
        self.stops = torch.tensor(config.stop_token_ids, device=device)
        reuse = session is not None and attention_mask is None and extends(decoder, session, input_ids, audio)
        start = session.length if reuse else 0
        self.session = fit(decoder, session, b, s + config.max_new_tokens)
        self.logits = prefill(decoder, self.session, input_ids, attention_mask, audio, start)
        self.slots = torch.arange(s, s + config.max_new_tokens, device=device)  # made once: no copy per step
        self.done = torch.zeros(b, dtype=torch.bool, device=device)

    def choose(self, step: int) -> tuple[Tensor, Tensor]:
        """(next ids [B], rows a stop id ends now [B]); finished rows get padding."""
        config = self.config
        candidates = self.logits if config.full_vocab else self.logits[:, : len(self.tokenizer)]
        scores = process_logits(candidates.float(), self.session.ids, step, config)
        ids = choose(scores, config, self.generator).masked_fill(self.done, config.pad_token_id)
        return ids, ~self.done & torch.isin(ids, self.stops)

    def feed(self, ids: Tensor, step: int) -> None:
        """Step `step`'s ids into the cache, and the logits of the next step."""
        session = self.session
        session.ids = torch.cat([session.ids, ids[:, None]], dim=1)
        self.logits = self.decode_step(self.decoder, session.cache, ids[:, None], self.slots[step : step + 1],
                                       session.rope_base)


def stop_string_ends(tokenizer: Tokenizer, reply: list[int], stop_strings: Sequence[str]) -> bool:
    """Whether the reply so far ends in (holds) a stop string: its last 64 tokens decoded."""
    text = tokenizer.decode(reply[-64:])
    return any(stop in text for stop in stop_strings)


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


CHECK_EVERY = 8  # decoding steps between `generate`'s looks at what the device made


@torch.no_grad()
def generate(
    decoder: Decoder,
    tokenizer: Tokenizer,
    input_ids: Tensor,
    *,
    attention_mask: Tensor | None = None,
    audio: Sequence[Tensor] | None = None,
    config: GenerationConfig = GenerationConfig(),
    progress: Callable[[int, int], None] | None = None,
    step: Step = decode_one_token,
) -> list[list[int]]:
    """New ids of each row, up to (not including) its stop token.

    The ids stay on the device, and the host looks at them every CHECK_EVERY steps (has every row stopped? has a
    stop string appeared?), so a GPU is never kept waiting for Python between tokens. Rows are independent, so a
    row whose stop string is found a few steps late has only made tokens that are cut away, and the replies equal
    `generate_steps`' step by step; the loop ends at most CHECK_EVERY - 1 steps after the last row stops.
    `progress(steps made, budget)` is called at each of those looks, so a long decode can show that it moves
    without adding a wait of its own (the budget is max_new_tokens after `_fit_context`). `step` is as in
    `generate_steps`.
    """
    decoding = _Decoding(decoder, tokenizer, input_ids, attention_mask, audio, config, None, step)
    config, b = decoding.config, input_ids.shape[0]
    made = torch.empty((b, config.max_new_tokens), dtype=torch.long, device=input_ids.device)
    by_stop_id = torch.empty((b, config.max_new_tokens), dtype=torch.bool, device=input_ids.device)
    rows: list[list[int]] = [[] for _ in range(b)]
    ended = [False] * b
    looked = 0
    for t in range(config.max_new_tokens):
        ids, finished = decoding.choose(t)
        made[:, t], by_stop_id[:, t] = ids, finished
        decoding.done |= finished
        last = t == config.max_new_tokens - 1
        if last or (t + 1) % CHECK_EVERY == 0:
            block = zip(made[:, looked : t + 1].tolist(), by_stop_id[:, looked : t + 1].tolist())
            for row, (tokens, stopped) in enumerate(block):
                for token, stop in zip(tokens, stopped):
                    if ended[row]:
                        break
                    ended[row] = stop
                    if not stop:
                        rows[row].append(token)
                        ended[row] = bool(config.stop_strings) and stop_string_ends(tokenizer, rows[row],
                                                                                  config.stop_strings)
                if ended[row]:
                    decoding.done[row] = True  # padding from now on, as generate_steps would feed it
            looked = t + 1
            if progress is not None:
                progress(looked, config.max_new_tokens)
            if last or all(ended):
                break
        decoding.feed(ids, t)
    return rows


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """Text before the first stop string (generation stops after the token that completes one)."""
    cuts = [text.find(s) for s in stop_strings if s in text]
    return text[: min(cuts)] if cuts else text


@torch.no_grad()
def stream_text(
    decoder: Decoder,
    tokenizer: Tokenizer,
    input_ids: Tensor,
    *,
    audio: Sequence[Tensor] | None = None,
    config: GenerationConfig = GenerationConfig(),
    session: Session | None = None,
    step: Step = decode_one_token,
) -> Iterator[str]:
    """Yield the reply of a single prompt as text pieces, as soon as they decode to whole characters (`session` and
    `step` are as in `generate_steps`)."""
    if input_ids.shape[0] != 1:
        raise InputError("stream_text takes one prompt (a [1, S] batch)")
    reply: list[int] = []
    shown = ""
    for ids, finished in generate_steps(decoder, tokenizer, input_ids, audio=audio, config=config,
                                          session=session, step=step):
        token, last = int(ids[0]), bool(finished[0])
        if not (last and token in config.stop_token_ids):
            reply.append(token)
        text = cut_at_stop(tokenizer.decode(reply, skip_special_tokens=True), config.stop_strings)
        # A multi-byte character may still be incomplete, unless the reply ends here (then it shows as decode does).
        if (last or not text.endswith("\ufffd")) and text != shown:
            yield text[len(shown):]
            shown = text
