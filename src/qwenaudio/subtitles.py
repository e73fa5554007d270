"""Timed text as records and as SRT, WebVTT and JSON files.

A `Word` is what Qwen-Audio's timestamp mode gives: a word and the two timestamp tags around it. The writers take
any items with `text`, `start` and `end` (words here, segments for long-form transcription).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol


@dataclass(frozen=True)
class Word:
    text: str
    start: float  # seconds
    end: float


def in_order(words: Sequence[Word], start: float, end: float, after: Word | None = None) -> list[Word]:
    """`words` with every time inside [start, end], each start <= its end, and no start or end earlier than the
    previous word's (or than `after`'s, the word before them): whatever stamps a model emits, cues run forward.
    Times already in order are kept as they are."""
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


def _clock(seconds: float, decimal: str) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{decimal}{ms % 1000:03d}"


def to_srt(items: Sequence[Timed]) -> str:
    """SubRip: numbered cues, `HH:MM:SS,mmm --> HH:MM:SS,mmm`."""
    cues = (f"{i}\n{_clock(x.start, ',')} --> {_clock(x.end, ',')}\n{x.text}\n" for i, x in enumerate(items, 1))
    return "\n".join(cues)


def to_vtt(items: Sequence[Timed]) -> str:
    """WebVTT: a header, then `HH:MM:SS.mmm --> HH:MM:SS.mmm` cues."""
    return "WEBVTT\n\n" + "\n".join(f"{_clock(x.start, '.')} --> {_clock(x.end, '.')}\n{x.text}\n" for x in items)


def to_json(text: str, items: Sequence[Timed] = (), **extra) -> str:
    """`{"text": …, "words": [{"text", "start", "end"}, …], …extra}` as UTF-8 JSON."""
    words = [asdict(x) if isinstance(x, Word) else {"text": x.text, "start": x.start, "end": x.end} for x in items]
    return json.dumps({"text": text, "words": words, **extra}, ensure_ascii=False, indent=2) + "\n"
