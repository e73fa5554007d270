"""Qwen-Audio-Chat and Qwen2-Audio-Instruct: multi-turn ChatML conversations about one or more clips
(docs/MODEL.md#chat).

The context is built exactly as the official `make_context` (`prompts.render_chat`): a system piece, as many past
turns as fit in `max_window_size` tokens (newest first), then the new query and `<|im_start|>assistant\\n`. Every
piece is encoded on its own, with only Qwen-Audio's tags allowed as special tokens inside the content, so a user who
types "<|im_start|>" gets text, not a turn marker. The official chat re-runs the whole conversation every turn,
encoding all its clips as one batch; here the KV cache of the previous turn is reused when that gives the same
logits: the new context starts with the cached ids, and the earlier clips encode the same alongside the new ones (a
short clip batched with a longer one comes out slightly different, docs/MODEL.md#batching, and then everything is
recomputed).

Qwen2-Audio-Instruct reads its own ChatML, transformers' chat template (`prompts.render_qwen2_chat_context`):
a query's clips are numbered `Audio n:` across the conversation, the history keeps each query's parts (the
template renders clips from them), and a reply ends at `<|im_end|>`. Special-token strings typed in the text are
read as those tokens, as transformers' tokenizer reads the template's text (a typed `<|AUDIO|>`, a clip with no
audio, is refused). No history window is published for it; Qwen-Audio-Chat's rule (`max_window_size`) is applied.
Its encoder reads each clip alone (padded frames are masked), so earlier clips encode the same beside new ones and
the cache is reused whenever the ids extend it. `_DIALECTS` is the one place the two families' chats differ.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import prompts
from .core.audio import as_waveform
from .core.decoder import KVCache
from .core.checks import expect, renamed, shown
from .core.errors import InputError
from .core.families import QWEN2_AUDIO, QWEN_AUDIO, Family
from .core.generate import Session
from .core.model import QwenAudio, expect_model
from .core.tokenizer import Tokenizer
from .prompts import DEFAULT_SYSTEM, Part, query_text

Query = str | list[Part]  # what a history keeps of a query: Qwen-Audio its text, Qwen2-Audio its text or parts
History = list[tuple[Query | None, str]]  # None: a Qwen2-Audio reply with no question before it


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
    """A conversation with Qwen-Audio-Chat or Qwen2-Audio-Instruct. `history` holds (query, reply) pairs, oldest
    first: the query as Qwen-Audio's text (`query_text`), or for Qwen2-Audio as given (text, or parts, or None for
    a reply with no question before it, as the template renders a conversation that opens with the assistant).

    Each conversation keeps its own KV cache (about 0.5 MB a token for the full model in bf16), so that the next
    turn prefills only what is new.

    `clips` are clips already in memory (16 kHz waveforms), each heard where a part `{"audio": name}` (or
    Qwen-Audio's `<audio>name</audio>`) names it. Given `clips`, a conversation hears only those: any other name is
    an InputError, never a file opened, since a server's clients write the text (a server names the clips its
    requests upload). Without `clips`, a name is a file path, read once and kept."""

    def __init__(self, model: QwenAudio, system: str = DEFAULT_SYSTEM, history: History | None = None,
                 clips: Mapping[str, torch.Tensor] | None = None):
        expect_model(model)
        expect(system, str, "system", "a str (the system message)")
        expect(clips, (Mapping, type(None)), "clips", "a mapping of names to 16 kHz waveforms, or None")
        self.model, self.system = model, system
        self._dialect = _DIALECTS[model.family]
        self._dialect.check(model)
        self.history: History = _checked_history(history, self._dialect)
        self._clips: dict[str, torch.Tensor] = {}
        self._files = clips is None  # whether a name the conversation holds may be a file to open
        for name, wave in (clips or {}).items():
            expect(name, str, "a clip's name", "a str")
            self._clips[name] = as_waveform(wave, name, model.encoder.min_samples)
        self._session = self._new_session()  # the conversation so far, as the decoder has read it

    def reset(self) -> None:
        """Forget the conversation (the clips already read stay cached by path)."""
        self.history, self._session = [], self._new_session()

    def context(self, query: str | Sequence[Part]) -> prompts.Rendered:
        """What the model would read for `query` after the current history: the ids (and labels) and the clips."""
        return self._dialect.context(self, self._dialect.query(query))

    def stream(self, query: str | Sequence[Part], **generation) -> Iterator[str]:
        """Yield the reply in text pieces; the turn joins the history once the reply is complete."""
        query = self._dialect.query(query)
        context = self._dialect.context(self, query)
        pieces: list[str] = []
        for piece in self.model.stream(torch.tensor([context.ids]), [self.clip(p) for p in context.clips],
                                       session=self._session, **{"stop_token_ids": self.stop_token_ids, **generation}):
            pieces.append(piece)
            yield piece
        self.history.append((query, "".join(pieces)))

    def ask(self, query: str | Sequence[Part], **generation) -> str:
        """The whole reply to `query` (see `stream`)."""
        return "".join(self.stream(query, **generation))

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """The ids that end a reply: the family's chat's (Qwen2-Audio: also `<|im_end|>`), else the checkpoint's."""
        return self._dialect.stop_token_ids(self.model) or self.model.generation_config.stop_token_ids

    def _new_session(self) -> Session:
        """An empty session of one row; generation grows its cache as the conversation does."""
        weight = self.model.decoder.embedding.weight
        return Session(KVCache(self.model.config, 1, 0, weight.dtype, weight.device))

    def clip(self, path: str) -> torch.Tensor:
        """The clip at `path` as the conversation hears it, read once and kept by path; a missing or unreadable file
        raises AudioError here, so a caller can check a clip when it is attached, before any question. Given
        `clips`, only their names: any other is an InputError, and nothing is read."""
        expect(path, (str, Path), "path", "a str or Path")
        path = str(path)
        if path not in self._clips and not self._files:
            known = ", ".join(map(repr, self._clips)) or "none"
            raise InputError(f"the conversation names the clip {path!r}, which is not one of its clips ({known}): a "
                             "Chat given clips= hears only those and opens no file")
        if path not in self._clips:
            self._clips[path] = as_waveform(Path(path), path, self.model.encoder.min_samples)
        return self._clips[path]

    def _span(self, path: str) -> int:
        """Prompt positions the clip at `path` fills (its encoder's `span_length`)."""
        return self.model.encoder.span_length(len(self.clip(path)))


# ------------------------------------------------------------------------------ what differs between the families

@dataclass(frozen=True)
class _Dialect:
    """How one family's chat works: what the history keeps of a query (`query` also checks it), how a history's
    query is checked (and what it is, for the error), how the conversation is rendered, which ids end a reply
    (None: the checkpoint's), and what is said about a checkpoint not made for chat."""

    query: Callable[[str | Sequence[Part]], Query]
    history_query: Callable[[object], bool]
    history_form: str
    context: Callable[[Chat, Query], prompts.Rendered]
    stop_token_ids: Callable[[QwenAudio], tuple[int, ...] | None]
    check: Callable[[QwenAudio], None]


def _qwen_audio_context(chat: Chat, query: str) -> prompts.Rendered:
    return prompts.render_chat(chat.model.tokenizer, chat.system, chat.history, query,
                               span_of=chat._span,
                               max_window_size=chat.model.generation_config.max_window_size)


def _qwen2_query(query: str | Sequence[Part]) -> Query:
    """A Qwen2-Audio query as the history keeps it: the text, or a copy of the parts, once `query_text` reads
    them. Typed text that marks a clip's place itself is refused (`prompts.check_qwen2_text`)."""
    query_text(query)  # the same parts, the same errors
    typed = [query] if isinstance(query, str) else [p if isinstance(p, str) else p["text"] for p in query
                                                     if isinstance(p, str) or "audio" not in p]
    prompts.check_qwen2_text("".join(typed))
    return query if isinstance(query, str) else [dict(p) if isinstance(p, dict) else p for p in query]


def _qwen2_history_query(query: object) -> bool:
    """Whether a history's query is one `_qwen2_query` takes, or None: a reply with no question before it (a
    conversation that opens with the assistant's words), which the template renders as that turn alone."""
    if query is None:
        return True
    try:
        _qwen2_query(query)
    except InputError:
        return False
    return True


def _qwen2_context(chat: Chat, query: Query) -> prompts.Rendered:
    window = chat.model.generation_config.max_window_size
    return prompts.render_qwen2_chat_context(chat.model.tokenizer, chat.system, chat.history, query,
                                             span_of=chat._span, max_window_size=window)


def _qwen2_stops(model: QwenAudio) -> tuple[int, ...]:
    """The checkpoint's stop ids and `<|im_end|>`, which closes every turn of the template."""
    return tuple(dict.fromkeys((*model.generation_config.stop_token_ids, model.tokenizer.im_end_id)))


def _qwen2_check(model: QwenAudio) -> None:
    """Warn where the checkpoint's generation config does not stop on `<|im_end|>`: the Instruct model's does, the
    base model's (Qwen2-Audio-7B) does not, and the base model was not trained to chat. It still runs: a warning,
    not an error, since only the generation config tells the two apart (their config.json files are the same)."""
    if model.tokenizer.im_end_id not in model.generation_config.stop_token_ids:
        warnings.warn("this checkpoint's generation config does not stop on <|im_end|>, as the base model "
                      "Qwen2-Audio-7B's does not: the base model was not trained to chat and may not answer; chat "
                      "with Qwen2-Audio-7B-Instruct", stacklevel=3)


_DIALECTS: dict[Family, _Dialect] = {
    QWEN_AUDIO: _Dialect(query_text, lambda q: isinstance(q, str), "str", _qwen_audio_context,
                         stop_token_ids=lambda model: None, check=lambda model: None),
    QWEN2_AUDIO: _Dialect(_qwen2_query, _qwen2_history_query, "a query (str or parts) and a reply (str)",
                          _qwen2_context, stop_token_ids=_qwen2_stops, check=_qwen2_check),
}


def _checked_history(history: History | None, dialect: _Dialect) -> History:
    """A copy of `history` once it is known to be (query, reply) pairs as `chat` returns them: the query as the
    family's chat keeps it (`dialect.history_query`), the reply a str."""
    pairs = list(history) if isinstance(history, (list, tuple)) else None
    if history is not None and (pairs is None or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and dialect.history_query(p[0]) and isinstance(p[1], str)
            for p in pairs)):
        raise InputError(f"history must be a list of (query, reply) pairs of {dialect.history_form}, as chat() "
                         f"returns it, got {shown(history)}")
    return [tuple(p) for p in pairs or []]


def chat(model: QwenAudio, query: str | Sequence[Part], history: History | None = None, *,
         system: str = DEFAULT_SYSTEM, **generation) -> tuple[str, History]:
    """One turn the official way, `model.chat(tokenizer, query, history)` (for Qwen2-Audio: the template's
    conversation, generated): returns (reply, new history). Keep a `Chat` instead to reuse the KV cache between
    turns."""
    conversation = Chat(model, system, history)
    reply = conversation.ask(query, **generation)
    return reply, conversation.history
