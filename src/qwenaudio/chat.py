"""Qwen-Audio-Chat: multi-turn ChatML conversations about one or more clips (docs/MODEL.md#chat).

The context is built exactly as the official `make_context` (`prompts.render_chat`): a system piece, as many past
turns as fit in `max_window_size` tokens (newest first), then the new query and `<|im_start|>assistant\\n`. Every
piece is encoded on its own, with only Qwen-Audio's tags allowed as special tokens inside the content, so a user who
types "<|im_start|>" gets text, not a turn marker. The official chat re-runs the whole conversation every turn,
encoding all its clips as one batch; here the KV cache of the previous turn is reused when that gives the same
logits: the new context starts with the cached ids, and the earlier clips encode the same alongside the new ones (a
short clip batched with a longer one comes out slightly different, docs/MODEL.md#batching, and then everything is
recomputed).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from . import prompts
from .core.audio import as_waveform, audio_span
from .core.decoder import KVCache
from .core.checks import expect, renamed, shown
from .core.errors import InputError
from .core.generate import Session
from .core.model import QwenAudio, expect_model
from .core.tokenizer import Tokenizer
from .prompts import DEFAULT_SYSTEM, Part, query_text

History = list[tuple[str, str]]


def _build_context(tokenizer: Tokenizer, query: str, history: History, system: str, max_window_size: int,
                   span_of) -> tuple[str, list[int]]:
    """The official chat context: (raw text, ids). Deprecated: `prompts.render_chat` gives the ids and the clips."""
    ids, _, _ = prompts.render_chat(tokenizer, system, history, query, span_of=span_of,
                                    max_window_size=max_window_size)
    kept = history[len(history) - (ids.count(tokenizer.im_start_id) - 3) // 2:]  # system, query, assistant: 3
    turns = "".join(f"\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{r}<|im_end|>" for q, r in kept)
    raw = (f"<|im_start|>system\n{system}<|im_end|>{turns}"
           f"\n<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n")
    return raw, ids


def _content_ids(tokenizer: Tokenizer, content: str, span_of) -> list[int]:
    """A message's ids as ChatML holds them. Deprecated: `prompts.render_chat` encodes every message."""
    return prompts._content(tokenizer, content, span_of)[0]


__getattr__ = renamed(__name__, {  # the renderer's old names (`prompts.render_chat` is the one renderer)
    "build_context": ("prompts.render_chat", _build_context), "content_ids": ("prompts.render_chat", _content_ids)})


class Chat:
    """A conversation with Qwen-Audio-Chat. `history` holds (query text, reply) pairs, oldest first.

    Each conversation keeps its own KV cache (about 0.5 MB a token for the full model in bf16), so that the next
    turn prefills only what is new."""

    def __init__(self, model: QwenAudio, system: str = DEFAULT_SYSTEM, history: History | None = None):
        expect_model(model)
        expect(system, str, "system", "a str (the system message)")
        self.model, self.system = model, system
        self.history: History = _checked_history(history)
        self._clips: dict[str, torch.Tensor] = {}
        self._session = self._new_session()  # the conversation so far, as the decoder has read it

    def reset(self) -> None:
        """Forget the conversation (the clips already read stay cached by path)."""
        self.history, self._session = [], self._new_session()

    def context(self, query: str | Sequence[Part]) -> prompts.Rendered:
        """What the model would read for `query` after the current history: the ids (and labels) and the clips."""
        return prompts.render_chat(self.model.tokenizer, self.system, self.history, query_text(query),
                                   span_of=lambda path: audio_span(len(self.clip(path))),
                                   max_window_size=self.model.generation_config.max_window_size)

    def stream(self, query: str | Sequence[Part], **generation) -> Iterator[str]:
        """Yield the reply in text pieces; the turn joins the history once the reply is complete."""
        text = query_text(query)
        ids, _, paths = self.context(text)
        pieces: list[str] = []
        for piece in self.model.stream(torch.tensor([ids]), [self.clip(p) for p in paths], session=self._session,
                                       **generation):
            pieces.append(piece)
            yield piece
        self.history.append((text, "".join(pieces)))

    def ask(self, query: str | Sequence[Part], **generation) -> str:
        """The whole reply to `query` (see `stream`)."""
        return "".join(self.stream(query, **generation))

    def _new_session(self) -> Session:
        """An empty session of one row; generation grows its cache as the conversation does."""
        weight = self.model.decoder.wte.weight
        return Session(KVCache(self.model.config, 1, 0, weight.dtype, weight.device))

    def clip(self, path: str) -> torch.Tensor:
        """The clip at `path` as the conversation hears it, read once and kept by path; a missing or unreadable file
        raises AudioError here, so a caller can check a clip when it is attached, before any question."""
        expect(path, (str, Path), "path", "a str or Path")
        path = str(path)
        if path not in self._clips:
            self._clips[path] = as_waveform(Path(path), path)
        return self._clips[path]


def _checked_history(history: History | None) -> History:
    """A copy of `history` once it is known to be (query, reply) pairs of text, as `chat` returns it."""
    pairs = list(history) if isinstance(history, (list, tuple)) else None
    if history is not None and (pairs is None or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs)):
        raise InputError(f"history must be a list of (query, reply) pairs of str, as chat() returns it, got "
                         f"{shown(history)}")
    return [tuple(p) for p in pairs or []]


def chat(model: QwenAudio, query: str | Sequence[Part], history: History | None = None, *,
         system: str = DEFAULT_SYSTEM, **generation) -> tuple[str, History]:
    """One turn the official way, `model.chat(tokenizer, query, history)`: returns (reply, new history).
    Keep a `Chat` instead to reuse the KV cache between turns."""
    conversation = Chat(model, system, history)
    reply = conversation.ask(query, **generation)
    return reply, conversation.history
