"""Continuous batching: many prompts share one model, one decoding step at a time.

Decoding one token reads every weight of the decoder once, whatever the batch, so a step over eight rows costs
little more than a step over one: serving many clients at once is about keeping the batch full. The engine owns the
model and one thread that does all its work. Prompts queue; at each step boundary the queued ones take the lowest
free rows of one static KV cache (rows x context slots, allocated once), each encoded and prefilled alone, a batch
of one, so its numbers are `model.generate`'s for that prompt; then one `decode_one_token` feeds every busy row its
next id, each at its own slot with its own rotary base, over rows[:hi] only (hi: one past the highest busy row)
and the slots up to the longest busy row's (rounded up to WINDOW), since attention reads every slot it is given. A
row that stops (stop id, stop string, budget) or is cancelled is freed before the next step, and the next queued
prompt can take it. Free rows below hi are fed padding and never read. Each row keeps its own settings: sampling
(with its own seeded generator), stops, budgets.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.audio import AudioSource, as_waveform, source_name
from ..core.checks import expect, whole
from ..core.config import GenerationConfig
from ..core.decoder import KVCache
from ..core.errors import InputError, QwenAudioError
from ..core.generate import Session, choose, prefill, process_logits, stop_string_ends
from ..core.model import QwenAudio, expect_model, prompt_batch

log = logging.getLogger(__name__)

WINDOW = 256  # attention reads the slots up to the longest busy row's, rounded up to this (few distinct shapes)


class EngineClosed(QwenAudioError):
    """A prompt was submitted after `Engine.close`."""


@dataclass(frozen=True)
class EngineStats:
    queued: int  # prompts waiting for a row
    active: int  # rows decoding
    rows: int  # the batch's size
    tokens: int  # new tokens made since start
    prompts: int  # prompts finished since start, whatever the reason
    steps: int  # decoding steps run


class Reply:
    """The handle of one submitted prompt. The engine thread appends to `tokens` and sets the rest; any thread may
    read them, `wait` for the end or `cancel`."""

    def __init__(self, prompt_tokens: int, wake: Callable[[], None]):
        self.prompt_tokens = prompt_tokens
        self.tokens: list[int] = []  # new ids so far, the stop id excluded
        self.finish_reason: str | None = None  # "stop", "length", "cancelled" or "error" once done
        self.error: BaseException | None = None  # with finish_reason "error"
        self._done = threading.Event()
        self._cancelled = False
        self._wake = wake

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop this prompt: a queued one never starts, a running one's row is freed at the next step boundary.
        Nothing happens to a reply that is already done."""
        self._cancelled = True
        self._wake()

    def wait(self, timeout: float | None = None) -> list[int]:
        """The new ids once done (raises the reply's error, if it failed); TimeoutError after `timeout` seconds,
        which leaves the prompt running (`cancel` stops it)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"the reply is not done after {timeout} s ({len(self.tokens)} tokens so far)")
        if self.error is not None:
            raise self.error
        return list(self.tokens)


@dataclass(eq=False)
class _Job:
    """A submitted prompt, and while it holds a row, where its decoding stands."""

    reply: Reply
    ids: Tensor  # [1, S] the prompt, on the CPU until admitted (a copy to the GPU would wait for the running step)
    clips: list[Tensor]  # dropped once encoded
    config: GenerationConfig
    on_update: Callable[[Reply], None] | None
    generator: torch.Generator | None = None  # its own draws, seeded by config.seed
    seen: Tensor | None = None  # [1, T] prompt and reply ids, for the repetition penalty
    logits: Tensor | None = None  # [1, vocab] the next id is chosen from
    slot: int = 0  # the slot the next id is fed at


class Engine:
    """Continuous batching over one model: `submit` prompts from any thread, each gets a `Reply`."""

    def __init__(self, model: QwenAudio, *, rows: int = 8, context: int | None = None):
        """`rows`: prompts decoded together (the batch); `context`: KV slots per row, a prompt and its reply
        (default: the model's context length, at most 4096). The cache, rows x context, is allocated by `start`."""
        expect_model(model)
        context = min(model.config.context_length, 4096) if context is None else context
        if not whole(rows, 1):
            raise InputError(f"rows must be an int >= 1, got {rows!r}")
        if not whole(context, 2, model.config.context_length):
            raise InputError(f"context must be an int from 2 to the model's context length "
                             f"({model.config.context_length}), got {context!r}")
        self.model, self.rows, self.context = model, rows, context
        self._lock = threading.Condition()  # guards the queue and `_closed`; wakes the engine thread
        self._queue: deque[_Job] = deque()
        self._active: list[_Job | None] = [None] * rows  # the engine thread's alone
        self._closed, self._thread = False, None
        self._cache: KVCache | None = None
        self._bases = torch.empty(0)
        self._tokens = self._prompts = self._steps = 0

    # --- any thread --------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Allocate the cache and start the engine thread (a daemon); a second call does nothing. A cache the memory
        cannot hold is an InputError naming its size, before anything runs."""
        with self._lock:
            if self._thread is not None or self._closed:
                return
            decoder, device = self.model.decoder, self.model.device
            self._cache = self._allocate(decoder.embedding.weight.dtype, device)
            self._bases = decoder.rope_base(torch.ones(self.rows, 1, dtype=torch.bool, device=device))
            self._thread = threading.Thread(target=self._run, name="qwenaudio-engine", daemon=True)
            self._thread.start()

    def submit(self, input_ids: Sequence[int], clips: Sequence[Tensor] = (), config: GenerationConfig | None = None,
               on_update: Callable[[Reply], None] | None = None) -> Reply:
        """Queue one unpadded prompt (its audio regions sized to `clips`, 16 kHz waveforms in region order) with
        its settings (None: the model's). It runs once the engine is started. `on_update(reply)` is called on the
        engine thread after each step that added a token to it and when it finishes: it must return quickly."""
        config = self.model.generation_config if config is None else config
        expect(config, GenerationConfig, "config", "a GenerationConfig or None")
        ids = input_ids.flatten().tolist() if isinstance(input_ids, Tensor) else input_ids
        expect(ids, (list, tuple), "input_ids", "a list of token ids")
        vocab = self.model.config.vocab_size
        if not ids:
            raise InputError("input_ids is empty: a prompt needs at least one token")
        wrong = [i for i in ids if not whole(i, 0, vocab - 1)]
        if wrong:
            raise InputError(f"input_ids holds {wrong[0]!r}: a token id is an int from 0 to {vocab - 1}")
        if len(ids) + config.max_new_tokens > self.context:
            raise InputError(f"the prompt's {len(ids)} tokens and max_new_tokens={config.max_new_tokens} do not fit "
                             f"the engine's context of {self.context} slots per row")
        waves = [as_waveform(c, source_name(c, i), self.model.encoder.min_samples) for i, c in enumerate(clips)]
        job = _Job(Reply(len(ids), self._wake), torch.tensor([list(ids)]), waves, config, on_update)
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine is closed: it takes no new prompts")
            self._queue.append(job)
            self._lock.notify()
        return job.reply

    def submit_prompts(self, prompts: Sequence[str], clips: Sequence[Sequence[Tensor | AudioSource]] | None = None,
                       *, on_update: Callable[[Reply], None] | None = None, warn: bool = True,
                       **settings) -> list[Reply]:
        """Queue a batch of `QwenAudio.generate`'s prompts (its arguments and checks) without waiting: each prompt a
        row of its own, so the windows of a long recording decode beside other clients' prompts; a `Reply` each.
        A max_new_tokens past the room a prompt leaves in a row is cut to it (with a warning where `warn`: a server,
        whose budgets are defaults no client chose, passes False). Every prompt is checked before any is queued;
        a submission that fails part-way cancels what it queued. They run once the engine is started."""
        expect(prompts, (list, tuple), "prompts", "a list of str (texts with <audio>PATH</audio> regions)")
        clips = [[] for _ in prompts] if clips is None else clips
        numbered = iter(range(sum(len(own) for own in clips)))
        min_samples = self.model.encoder.min_samples
        waves = [[as_waveform(c, source_name(c, next(numbered)), min_samples) for c in own] for own in clips]
        batch = prompt_batch(self.model.tokenizer, prompts, waves, self.model.encoder.span_length)
        config = self.model.generation_config.replace(**settings)
        rows = []  # a loop, not a comprehension: the warning's stacklevel counts frames
        for ids, real, own in zip(batch.input_ids, batch.attention_mask.bool(), waves):
            fitted = self.fit(config, int(real.sum()))
            if warn and fitted is not config:
                warnings.warn(f"max_new_tokens={config.max_new_tokens} is cut to {fitted.max_new_tokens}: the prompt's "
                              f"{int(real.sum())} tokens and the new ones must fit the engine's context of "
                              f"{self.context} slots per row", stacklevel=2)
            rows.append((ids[real].tolist(), own, fitted))
        replies = []
        try:
            for ids, own, fitted in rows:
                replies.append(self.submit(ids, own, fitted, on_update))
        except BaseException:  # closed, or interrupted, part-way: nothing queued for nobody
            for reply in replies:
                reply.cancel()
            raise
        return replies

    def generate(self, prompts: Sequence[str], clips: Sequence[Sequence[Tensor | AudioSource]] | None = None,
                 **settings) -> list[list[int]]:
        """`QwenAudio.generate` through the engine (its arguments, checks and result; it starts the engine):
        `submit_prompts`, then wait for every reply."""
        self.start()
        replies = self.submit_prompts(prompts, clips, **settings)
        try:
            return [reply.wait() for reply in replies]
        finally:  # a failed or interrupted call leaves no rows decoding for nobody
            for reply in replies:
                reply.cancel()

    def fit(self, config: GenerationConfig, prompt_tokens: int) -> GenerationConfig:
        """`config` as a prompt of `prompt_tokens` tokens can run in a row: max_new_tokens (and min_new_tokens) cut to
        the room it leaves, since a budget is a bound, not a promise; InputError when the prompt fills the row. The
        one rule for the library's prompts and the server's."""
        room = self.context - prompt_tokens
        if room < 1:
            raise InputError(f"the prompt's {prompt_tokens} tokens fill the engine's context of {self.context} slots "
                             "per row: shorten it, or give the engine a longer context (--context)")
        if config.max_new_tokens <= room:
            return config
        return config.replace(max_new_tokens=room, min_new_tokens=min(config.min_new_tokens, room))

    def close(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new prompts (EngineClosed), let the queued and running ones finish (`drain`) or cancel them, and
        wait up to `timeout` seconds for the engine thread to end. An engine never started cancels its queue."""
        with self._lock:
            self._closed = True
            if not drain or self._thread is None:
                for job in [*self._queue, *self._active]:
                    if job is not None:
                        job.reply._cancelled = True
            self._lock.notify()
            thread = self._thread
        if thread is None:
            self._boundary()  # finishes the cancelled queue here: there is no engine thread to do it
        elif thread is not threading.current_thread():  # an on_update may close it; the thread ends after the step
            thread.join(timeout)

    @property
    def running(self) -> bool:
        """Whether the engine thread is alive: started, and not ended by `close` or by an error."""
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> EngineStats:
        return EngineStats(queued=len(self._queue), active=sum(job is not None for job in self._active),
                           rows=self.rows, tokens=self._tokens, prompts=self._prompts, steps=self._steps)

    def _allocate(self, dtype: torch.dtype, device: torch.device) -> KVCache:
        """The rows x context cache, its size logged; one that does not fit is said in the options that size it. The
        InputError is raised outside the `except`, so that the allocator's error, and through its traceback what was
        allocated before it, is freed first (a caller may retry with fewer rows)."""
        config = self.model.decoder.config
        per_slot = 2 * config.num_hidden_layers * config.num_attention_heads * config.kv_channels * dtype.itemsize
        gib = self.rows * self.context * per_slot / 2**30
        size = f"{gib:.3g} GiB ({str(dtype).removeprefix('torch.')} on {device})"
        try:
            cache = KVCache(config, self.rows, self.context, dtype, device)
        except RuntimeError as error:  # torch.OutOfMemoryError on CUDA; the CPU allocator's is a plain RuntimeError
            if not (isinstance(error, torch.OutOfMemoryError) or "allocate" in str(error)):
                raise
            cache = None
        if cache is None:
            raise InputError(f"the KV cache of {self.rows} rows x {self.context} slots, {size}, does not fit in "
                             "memory: give fewer rows (--rows) or a shorter context (--context)")
        log.info("KV cache: %d rows x %d slots, %s", self.rows, self.context, size)
        return cache

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify()

    # --- the engine thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        """Until closed with nothing left: at each step boundary free the cancelled rows and fill the free ones from
        the queue, then run one step over the busy rows. Sleeps (no CPU) while there is no work. The work of each
        reply fails that reply alone; an error outside it (a bug) closes the engine and fails every reply left,
        since a thread that died quietly would leave their waiters hanging."""
        try:
            with torch.no_grad():
                while (admitted := self._boundary()) is not None:
                    for row, job in admitted:
                        self._admit(row, job)
                    if any(self._active):
                        self._step()
        except BaseException as error:
            log.error("the engine failed and is closed: every reply left fails with this error", exc_info=error)
            self._abandon(error)
        finally:
            self._cache = None  # the memory goes back once the engine is done

    def _abandon(self, error: BaseException) -> None:
        """Close the engine and fail every queued and running reply with `error`."""
        with self._lock:
            self._closed = True
            left = [*self._queue, *(job for job in self._active if job is not None)]
            self._queue, self._active = deque(), [None] * self.rows
        for job in left:
            if not job.reply.done:
                self._finish(job, "error", error)

    def _boundary(self) -> list[tuple[int, _Job]] | None:
        """Wait for work; then drop the cancelled prompts and give queued ones the lowest free rows, (row, job) each.
        None once closed with nothing queued or running."""
        with self._lock:
            while not self._queue and not any(self._active) and not self._closed:
                self._lock.wait()
            dropped = [job for job in self._queue if job.reply._cancelled]
            dropped += [job for job in self._active if job is not None and job.reply._cancelled]
            self._queue = deque(job for job in self._queue if not job.reply._cancelled)
            self._active = [None if job is None or job.reply._cancelled else job for job in self._active]
            admitted = []
            for row, job in enumerate(self._active):
                if job is None and self._queue:
                    self._active[row] = self._queue.popleft()
                    admitted.append((row, self._active[row]))
            finished = self._closed and not admitted and not any(self._active)
        for job in dropped:
            self._finish(job, "cancelled")
        return None if finished else admitted

    def _admit(self, row: int, job: _Job) -> None:
        """Encode the prompt's clips and prefill it alone into `row` (cleared first); a failure fails this reply
        only."""
        try:
            self._cache.valid[row] = False  # what an earlier prompt left there is not this one's
            job.ids = job.ids.to(self.model.device)
            session = Session(self._window(slice(row, row + 1), job.ids.shape[1]))
            job.logits = prefill(self.model.decoder, session, job.ids, audio=self.model.encode_audio(job.clips))
            job.clips = []
            if job.config.seed is not None:  # torch may refuse a seed the config takes (2**64)
                job.generator = torch.Generator(self.model.device).manual_seed(job.config.seed)
        except Exception as error:
            self._active[row] = None
            self._finish(job, "error", error)
            return
        self._bases[row] = session.rope_base[0]
        job.slot, job.seen = job.ids.shape[1], job.ids

    def _step(self) -> None:
        """Every busy row chooses its next id (and may finish, freeing its row), then one forward over rows[:hi]
        feeds the chosen ids, each at its row's slot, and gives each row its next logits. A failure fails every
        reply it touched; the engine goes on."""
        busy = [(row, job) for row, job in enumerate(self._active) if job is not None]
        try:
            live = [(row, job) for row, job in busy if self._choose(row, job)]
            if not live:
                return
            hi = live[-1][0] + 1
            ids, slots = [self.model.generation_config.pad_token_id] * hi, [0] * hi  # free rows: padding at 0
            for row, job in live:
                ids[row], slots[row] = job.reply.tokens[-1], job.slot
            cache = self._window(slice(0, hi), max(slots) + 1)
            device = self.model.device
            logits = self.model.decode_step(self.model.decoder, cache, torch.tensor(ids, device=device)[:, None],
                                            torch.tensor(slots, device=device)[:, None], self._bases[:hi])
            self._steps += 1
            for row, job in live:
                job.logits, job.slot = logits[row : row + 1], job.slot + 1
        except Exception as error:
            for row, job in busy:
                if self._active[row] is job:
                    self._active[row] = None
                    self._finish(job, "error", error)

    def _choose(self, row: int, job: _Job) -> bool:
        """Choose the row's next id from its logits as `core.generate.generate` does for a batch of one, and stop
        the row on a stop id, a stop string or its budget. Whether it goes on. A failure here comes from this row's
        own settings (a top_p or temperature so small the probabilities are NaN): it fails this reply only."""
        config, reply = job.config, job.reply
        try:
            candidates = job.logits if config.full_vocab else job.logits[:, : len(self.model.tokenizer)]
            scores = process_logits(candidates.float(), job.seen, len(reply.tokens), config)
            token = int(choose(scores, config, job.generator)[0])
            if token in config.stop_token_ids:
                reason = "stop"
            else:
                reply.tokens.append(token)
                self._tokens += 1
                job.seen = torch.cat([job.seen, job.seen.new_tensor([[token]])], dim=1)
                stopped = bool(config.stop_strings) and stop_string_ends(self.model.tokenizer, reply.tokens,
                                                                         config.stop_strings)
                reason = "stop" if stopped else "length" if len(reply.tokens) == config.max_new_tokens else None
        except Exception as error:
            self._active[row] = None
            self._finish(job, "error", error)
            return False
        if reason is None:
            self._notify(job)
            return True
        self._active[row] = None
        self._finish(job, reason)
        return False

    def _window(self, rows: slice, used: int) -> KVCache:
        """The cache's `rows` over their first `used` slots, rounded up to WINDOW: attention reads every slot it is
        given, and over the whole context it would cost a batch of eight about as much as the weights."""
        return self._cache.rows(rows, min(self.context, -(-used // WINDOW) * WINDOW))

    def _finish(self, job: _Job, reason: str, error: BaseException | None = None) -> None:
        job.reply.finish_reason, job.reply.error = reason, error
        job.logits = job.seen = None
        self._prompts += 1
        job.reply._done.set()
        self._notify(job)

    def _notify(self, job: _Job) -> None:
        if job.on_update is not None:
            try:
                job.on_update(job.reply)
            except Exception:
                log.exception("a reply's on_update raised; ignored")
