"""Audio longer than 30 s: windows cut in silence, recognised in batches, stitched back into one transcript.

The model hears at most 30 s; the official code silently drops the rest. Here a long recording is cut into windows
of at most 30 s. Neighbouring windows overlap by `overlap` seconds, and the overlap goes on the quietest stretch of
that length within the last `search` seconds a window may reach: a pause when there is one, found from frame energy
alone, and otherwise the stretch where a word cut in two still lies whole in one of the windows.

Stitching uses the cut as the seam. With word timestamps, each word is moved to absolute time and kept by the
window on its side of the seam (by its midpoint). Plain text (ASR without timestamps, translation) has no times: a
cut in silence joins the two texts as they are, and a cut through speech drops the longest run of words (characters,
in Chinese and Japanese) that ends the left text and starts the right one (the overlap heard twice).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .core.audio import CHUNK_LENGTH, SAMPLE_RATE
from .core.checks import shown
from .core.errors import InputError
from .subtitles import Word, in_order

FRAME = SAMPLE_RATE // 50  # 20 ms energy frames
MIN_QUIET = 10  # frames: the shortest stretch whose quiet is measured (0.2 s), when the overlap is shorter
SILENCE_DB = -40.0  # a stretch this far below the recording's loudest frame counts as silence
MAX_DUPLICATE_WORDS = 8  # at most this many words (CJK characters) are taken as heard twice across a cut
# Units compared across a seam: each CJK character alone (those scripts write no spaces), else whitespace words.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
UNIT = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")


@dataclass(frozen=True)
class Window:
    start: int  # first sample
    end: int  # one past the last sample
    seam: int  # sample where this window's part of the transcript ends (the cut; `end` for the last window)
    silent_seam: bool  # the cut lies in silence: nothing at the seam was heard twice


@dataclass(frozen=True)
class Segment:
    """What one window contributed after stitching, in absolute seconds."""

    text: str
    start: float
    end: float
    words: list[Word] = field(default_factory=list)


def text_of(segments: Sequence[Segment]) -> str:
    """The whole transcript: the segments' texts, space-joined (empty ones skipped)."""
    return " ".join(s.text for s in segments if s.text)


def words_of(segments: Sequence[Segment]) -> list[Word]:
    """Every timed word of the transcript, in order."""
    return [w for s in segments for w in s.words]


def frame_levels(audio: Tensor) -> Tensor:
    """Energy of each 20 ms frame in dB relative to the loudest frame (0 = loudest, digital silence ≈ -200)."""
    frames = audio[: len(audio) // FRAME * FRAME].reshape(-1, FRAME).double()
    power = frames.pow(2).mean(-1) + 1e-20
    return 10 * torch.log10(power / power.max())


def plan_windows(audio: Tensor, *, max_seconds: float = CHUNK_LENGTH, search: float = 8.0, overlap: float = 1.0
                 ) -> list[Window]:
    """Windows of at most `max_seconds` covering a 16 kHz `audio`, cut at the quietest stretch available."""
    if not isinstance(audio, Tensor) or audio.ndim != 1:
        raise InputError(f"audio must be a 1-D torch.Tensor of 16 kHz samples (load_audio gives one), got "
                         f"{shown(audio) if not isinstance(audio, Tensor) else f'shape {tuple(audio.shape)}'}")
    n, limit, half = len(audio), int(max_seconds * SAMPLE_RATE), int(overlap * SAMPLE_RATE) // 2
    if n <= limit:
        return [Window(0, n, n, True)]
    levels = frame_levels(audio)
    span = max(int(overlap * SAMPLE_RATE) // FRAME, MIN_QUIET)  # frames of the stretch that will be heard twice
    quiet = torch.nn.functional.avg_pool1d(levels[None, None], span, stride=1)[0, 0]  # mean of frames f..f+span-1
    windows, start = [], 0
    while n - start > limit:
        latest = start + limit - half  # the cut plus half the overlap must stay inside the window
        lo = max(latest - int(search * SAMPLE_RATE), start + half) // FRAME
        hi = min(latest // FRAME - span // 2, len(quiet) - 1)
        f = lo + int(torch.argmin(quiet[lo : hi + 1])) if hi >= lo else latest // FRAME - span // 2
        cut = (f + span // 2) * FRAME  # the middle of the quietest stretch
        windows.append(Window(start, cut + half, cut, bool(quiet[f] < SILENCE_DB)))
        start = cut - half
    windows.append(Window(start, n, n, True))
    return windows


def stitch_words(windows: Sequence[Window], words: Sequence[Sequence[Word]]) -> list[Segment]:
    """Move each window's words (timed from the window's start) to absolute time and keep, per window, those whose
    midpoint lies between the previous seam and its own (the last window keeps everything after its start seam).
    Times are clamped into their window and kept in order (`subtitles.in_order`), so the words lie inside the
    recording and never run backwards, whatever times the recogniser gave."""
    segments, previous, last = [], 0.0, None
    for k, (window, own) in enumerate(zip(windows, words)):
        offset, seam = window.start / SAMPLE_RATE, window.seam / SAMPLE_RATE
        upper = math.inf if k == len(windows) - 1 else seam
        moved = in_order([Word(w.text, w.start + offset, w.end + offset) for w in own], offset,
                         window.end / SAMPLE_RATE)  # a model's stamps may lie past the window or go back
        kept = in_order([w for w in moved if previous <= (w.start + w.end) / 2 < upper], offset,
                        window.end / SAMPLE_RATE, after=last)  # a kept word may straddle the seam
        segments.append(Segment(" ".join(w.text for w in kept), previous, seam, kept))
        previous, last = seam, (kept[-1] if kept else last)
    return segments


def stitch_texts(windows: Sequence[Window], texts: Sequence[str]) -> list[Segment]:
    """Join per-window texts; across a seam cut through speech, drop the words heard on both sides."""
    segments, previous, last_units = [], 0.0, []
    for k, (window, text) in enumerate(zip(windows, texts)):
        units = list(UNIT.finditer(text))
        if k and not windows[k - 1].silent_seam:
            drop = _heard_twice([u.group() for u in last_units], [u.group() for u in units])
            text, units = (text[units[drop].start():] if drop < len(units) else ""), units[drop:]
        seam = window.seam / SAMPLE_RATE
        segments.append(Segment(" ".join(text.split()), previous, seam))
        previous, last_units = seam, units
    return segments


def _heard_twice(left: list[str], right: list[str]) -> int:
    """Length of the longest run of units that ends `left` and starts `right` (compared without case and
    punctuation), up to MAX_DUPLICATE_WORDS."""
    def key(unit: str) -> str:
        return re.sub(r"[^\w]", "", unit.lower())

    for k in range(min(len(left), len(right), MAX_DUPLICATE_WORDS), 0, -1):
        if [key(w) for w in left[-k:]] == [key(w) for w in right[:k]]:
            return k
    return 0


Recognizer = Callable[[list[Tensor]], list]  # clips -> per clip a text, or a list of Words when timestamps are on


def transcribe_long(audio: Tensor, recognize: Recognizer, *, timed: bool, batch_size: int = 8,
                    max_seconds: float = CHUNK_LENGTH, overlap: float = 1.0,
                    progress: Callable[[int, int], None] | None = None) -> list[Segment]:
    """Plan windows over `audio`, recognise them `batch_size` at a time with `recognize`, and stitch the results.
    `timed` says whether `recognize` returns words with times (then they are stitched by time) or text.
    `progress(done, total)` is called after each batch of windows."""
    windows = plan_windows(audio, max_seconds=max_seconds, overlap=overlap)
    results: list = []
    for i in range(0, len(windows), batch_size):
        results += recognize([audio[w.start : w.end] for w in windows[i : i + batch_size]])
        if progress:
            progress(len(results), len(windows))
    return stitch_words(windows, results) if timed else stitch_texts(windows, results)
