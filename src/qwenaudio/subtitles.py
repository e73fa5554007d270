"""Timed text as records and as SRT, WebVTT and JSON files.

A `Word` is what Qwen-Audio's timestamp mode gives: a word and the two timestamp tags around it. The writers take
any items with `text`, `start` and `end` (words here, segments for long-form transcription).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from .core.errors import InputError


@dataclass(frozen=True)
class Word:
    text: str
    start: float  # seconds
    end: float


def in_order(words: Sequence[Word], start: float, end: float, after: Word | None = None) -> list[Word]:
    """`words` with every time inside [start, end], each start <= its end, and no start or end earlier than the
    previous word's (or than `after`'s, the word before them): whatever stamps a model emits, cues run forward.
    Times already in order are kept as they are."""
    _check_timed(words, "words")
    _check_times(start=start, end=end)
    if after is not None:
        _check_timed([after], "after")
    out, last = [], after or Word("", start, start)
    for w in words:
        first = min(max(w.start, start, last.start), end)
        last = Word(w.text, first, min(max(w.end, first, last.end), end))
        out.append(last)
    return out


class Timed(Protocol):
    text: str
    start: float
    end: float


def _check_times(**times: Any) -> None:
    for name, value in times.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"{name} must be a finite number of seconds, got {value!r}")


def _check_timed(items: Any, name: str) -> None:
    """InputError unless `items` is a list of things with a str `text` and finite `start` and `end` (a Word)."""
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise InputError(f"{name} must be a list of Words (text, start, end), got {type(items).__name__}")
    for i, x in enumerate(items):
        if not isinstance(getattr(x, "text", None), str):
            raise InputError(f"{name}[{i}] must have a str text, a start and an end (a Word), got {x!r:.80}")
        _check_times(**{f"{name}[{i}].start": getattr(x, "start", None), f"{name}[{i}].end": getattr(x, "end", None)})


def cues(words: Sequence[Word], text: str, start: float, end: float) -> list[Word]:
    """The subtitle cues of one stretch of audio [start, end] transcribed as `text` with timed `words`: a word the
    model gave no length (a last word without a closing timestamp) lasts until the next word starts, or `end`; a
    reply without any timestamp is one cue of its text over the whole stretch; a cue without text is dropped. So a
    subtitle never shows an empty or zero-length cue while the transcript has words."""
    _check_timed(words, "words")
    if not isinstance(text, str):
        raise InputError(f"text must be a str, got {type(text).__name__}")
    _check_times(start=start, end=end)
    if not words:
        return [Word(text.strip(), start, end)] if text.strip() else []
    following = [w.start for w in words[1:]] + [end]
    return [w if w.end > w.start else Word(w.text, w.start, max(w.start, until))
            for w, until in zip(words, following) if w.text.strip()]


def _clock(seconds: float, decimal: str) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{decimal}{ms % 1000:03d}"


def _cue_text(text: str) -> str:
    """A cue's text without blank lines: in both formats a blank line ends the cue, so a reply holding one would
    turn the rest of its text into a broken cue."""
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


def to_srt(items: Sequence[Timed]) -> str:
    """SubRip: numbered cues, `HH:MM:SS,mmm --> HH:MM:SS,mmm`."""
    _check_timed(items, "items")
    cues = (f"{i}\n{_clock(x.start, ',')} --> {_clock(x.end, ',')}\n{_cue_text(x.text)}\n"
            for i, x in enumerate(items, 1))
    return "\n".join(cues)


def to_vtt(items: Sequence[Timed]) -> str:
    """WebVTT: a header, then `HH:MM:SS.mmm --> HH:MM:SS.mmm` cues."""
    _check_timed(items, "items")
    return "WEBVTT\n\n" + "\n".join(f"{_clock(x.start, '.')} --> {_clock(x.end, '.')}\n{_cue_text(x.text)}\n"
                                     for x in items)


def to_json(text: str, items: Sequence[Timed] = (), **extra) -> str:
    """`{"text": …, "words": [{"text", "start", "end"}, …], …extra}` as UTF-8 JSON."""
    if not isinstance(text, str):
        raise InputError(f"text must be a str, got {type(text).__name__}")
    _check_timed(items, "items")
    words = [asdict(x) if isinstance(x, Word) else {"text": x.text, "start": x.start, "end": x.end} for x in items]
    return json.dumps({"text": text, "words": words, **extra}, ensure_ascii=False, indent=2) + "\n"
