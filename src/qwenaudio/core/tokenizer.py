"""Qwen-Audio's tokenizer: Qwen-7B's byte-level BPE (tiktoken) plus 3,522 special tokens for tags
(docs/MODEL.md#tokenizer).

The special tokens are numbered in one fixed order right after the 151,643 BPE ranks, so their ids follow from
the order of `SPECIAL_TOKENS` alone. Audio enters the prompt as `<audio>PATH</audio>`: the tokenizer keeps only the
two tags and replaces everything between them by `span - 2` pad tokens, where `span` is the clip's length in
encoder outputs plus BOS/EOS (see `qwenaudio.audio.audio_span`). The decoder later overwrites those rows with the
encoded clip, so the path text itself never reaches the model.
"""

from __future__ import annotations

import base64
import binascii
import math
import numbers
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import AbstractSet, Literal

import tiktoken
import torch

from .audio import N_SAMPLES, audio_span
from .checks import expect, shown
from .errors import AudioTagError, TokenizerError

VOCAB_FILE = "qwen.tiktoken"
NUM_BPE_RANKS = 151_643
EMBEDDING_ROWS = 155_947  # rows of every checkpoint's embedding; the ids past the tokenizer's 155,165 have no text

# Qwen-7B's split pattern: contractions, letter runs with one leading non-letter, single digits, punctuation
# runs, newline runs, whitespace.
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

LANGUAGES = ("en", "zh", "de", "es", "ko", "fr", "ja", "it")
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
AUDIO_PAD, AUDIO_START, AUDIO_END = "[[[AUDIO:modality]]]", "<audio>", "</audio>"
AUDIO_TAGS = frozenset({AUDIO_START, AUDIO_END})
MAX_TIMESTAMP_CS = 3000  # `<|0.00|>` … `<|30.00|>` in steps of 10 ms
MAX_AUDIO_SPAN = audio_span(N_SAMPLES)  # 752 prompt tokens: a 30 s clip, the longest the encoder hears


def timestamp_token(centiseconds: int) -> str:
    """Surface form of a timestamp tag: 154 cs -> `<|1.54|>`."""
    return f"<|{centiseconds // 100}.{centiseconds % 100:02d}|>"


SPECIAL_TOKENS: tuple[str, ...] = (
    ENDOFTEXT, IM_START, IM_END,
    *(f"<|extra_{i}|>" for i in range(205)),
    AUDIO_PAD,
    "<|startoftranscript|>", "<|startofanalysis|>",  # what kind of output: transcript-like or analysis
    "<|translate|>", "<|transcribe|>", "<|caption|>", "<|keyword|>",  # task
    "<|unknown|>", *(f"<|{lang}|>" for lang in LANGUAGES), "<|zh_tr|>",  # language (zh_tr: traditional Chinese)
    "<|notimestamps|>", "<|sil|>", "<|timestamps|>",
    *(timestamp_token(cs) for cs in range(MAX_TIMESTAMP_CS + 1)),
    "<|caption_audiocaps|>", "<|caption_clotho|>", "<|audioset_ontology|>", "<|caption_plain|>",  # output style
    "<|itn|>", "<|wo_itn|>",  # with / without inverse text normalisation
    "<|startofentityvalue|>", "<|endofentityvalue|>", "<|startofentitytype|>", "<|endofentitytype|>",
    "<|named_entity_recognition|>", "<|audio_grounding|>", "<|startofword|>", "<|endofword|>", "<|delim|>",
    "<|emotion_recognition|>", "<|music_description|>", "<|note_analysis|>",
    "<|pitch|>", *(f"<|midi_pitch_{i}|>" for i in range(128)),
    "<|velocity|>", *(f"<|midi_velocity_{i}|>" for i in range(128)),
    "<|sonic|>", "<|instrument|>", "<|speaker_meta|>", "<|song_meta|>", "<|question|>", "<|answer|>", "<|choice|>",
    "<|scene|>", "<|event|>", "<|vocal_classification|>", "<|speech_understanding|>", "<|scenario|>", "<|action|>",
    "<|entities|>", "<|speech_edit|>",
    AUDIO_START, AUDIO_END,
)

# The special tokens Qwen-Audio added to Qwen-7B's: the only ones ChatML content may contain as tokens (the
# official chat encodes content with these allowed, so a typed "<|im_start|>" stays text but "<|en|>" is a tag).
AUDIO_SPECIAL_TOKENS = frozenset(SPECIAL_TOKENS[SPECIAL_TOKENS.index(AUDIO_PAD):])

AllowedSpecial = AbstractSet[str] | Literal["all"]
_AUDIO_TAG = re.compile(f"({AUDIO_START}|{AUDIO_END})")


def audio_regions(text: str) -> list[str]:
    """The text inside each `<audio>…</audio>` region of `text`, in order, read from the text alone (before any
    tokenizer loads) as the tokenizer reads it: the tags are special tokens matched literally, and a region holds no
    other region. Malformed tags are an AudioTagError that says which problem came first."""
    regions: list[str] = []
    inside: str | None = None
    for piece in _AUDIO_TAG.split(text):
        if piece == AUDIO_START:
            if inside is not None:
                raise AudioTagError("nested", "an <audio> region opens inside another", regions)
            inside = ""
        elif piece == AUDIO_END:
            if inside is None:
                raise AudioTagError("unopened", "a </audio> has no matching <audio>", regions)
            regions.append(inside)
            inside = None
        elif inside is not None:
            inside = piece
    if inside is not None:
        raise AudioTagError("unclosed", "an <audio> tag has no </audio>", regions)
    return regions


@dataclass
class Batch:
    """Padded token ids and the matching attention mask (1 = real token, 0 = padding), both [B, S] int64."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


class Tokenizer:
    """tiktoken BPE over `qwen.tiktoken` with Qwen-Audio's special tokens.

    By default every special surface form typed in the text is encoded as its special id, as the official
    tokenizer does; pass `allowed_special` to treat the others as plain text (ChatML content allows only
    `AUDIO_TAGS`).
    """

    def __init__(self, vocab_file: str | Path, errors: str = "replace"):
        expect(vocab_file, (str, Path), "vocab_file", f"a path (the {VOCAB_FILE} file)", TokenizerError)
        expect(errors, str, "errors", "a bytes.decode error handler name ('replace', 'strict', …)", TokenizerError)
        self.vocab_file = Path(vocab_file)
        self.errors = errors
        ranks = _load_ranks(self.vocab_file)
        self.special_ids = {token: NUM_BPE_RANKS + i for i, token in enumerate(SPECIAL_TOKENS)}
        self._encoding = tiktoken.Encoding(
            "qwen-audio", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self.special_ids
        )
        self.eod_id = self.special_ids[ENDOFTEXT]  # end of document; also the padding id
        self.im_start_id = self.special_ids[IM_START]
        self.im_end_id = self.special_ids[IM_END]
        self.audio_pad_id = self.special_ids[AUDIO_PAD]
        self.audio_start_id = self.special_ids[AUDIO_START]
        self.audio_end_id = self.special_ids[AUDIO_END]

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load from a checkpoint directory (its `qwen.tiktoken`) or from the vocabulary file itself."""
        expect(path, (str, Path), "path", f"a checkpoint directory or its {VOCAB_FILE} file", TokenizerError)
        path = Path(path)
        return cls(path / VOCAB_FILE if path.is_dir() else path)

    @property
    def audio_token_id(self) -> int:
        """`<audio>`: the token the decoder finds each clip's span by."""
        return self.audio_start_id

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (155,165); the model's embedding has more rows."""
        return self._encoding.n_vocab

    def __len__(self) -> int:
        return self.vocab_size

    def timestamp_id(self, seconds: float) -> int:
        """Id of the timestamp tag nearest to `seconds` (0 to 30 s, 10 ms steps)."""
        if not isinstance(seconds, numbers.Real) or isinstance(seconds, bool) or not math.isfinite(seconds):
            raise TokenizerError(f"seconds must be a number of seconds from 0 to 30, got {shown(seconds)}")
        cs = round(seconds * 100)
        if not 0 <= cs <= MAX_TIMESTAMP_CS:
            raise TokenizerError(f"timestamp {seconds!r} s is outside the 0.00–30.00 s range of timestamp tags")
        return self.special_ids[timestamp_token(cs)]

    def encode(
        self, text: str, *, allowed_special: AllowedSpecial = "all", audio_spans: Sequence[int] | None = None
    ) -> list[int]:
        """Token ids of `text` after NFC normalisation.

        Each `<audio>…</audio>` region becomes `<audio>`, `span - 2` audio pads and `</audio>`, one entry of
        `audio_spans` per region in order of appearance. Text containing audio regions needs `audio_spans`.
        Surrogate code points are read as UTF-16, as tiktoken and the official tokenizer do: a pair becomes its
        character and a lone one U+FFFD (they are not Unicode characters, and UTF-8 cannot hold them).
        """
        if audio_spans is not None and not isinstance(audio_spans, Sequence):
            raise TokenizerError(f"audio_spans must be a list of ints (one per clip), got {audio_spans!r}")
        ids = self._encode_plain(text, allowed_special)
        regions = self._audio_regions(ids)
        if not regions:
            if audio_spans:
                raise TokenizerError(f"audio_spans has {len(audio_spans)} entries but the text has no <audio> region")
            return ids
        if audio_spans is None or len(audio_spans) != len(regions):
            given = "no audio_spans" if audio_spans is None else f"{len(audio_spans)} audio_spans"
            raise TokenizerError(
                f"text has {len(regions)} <audio>…</audio> region(s) but {given} were given; pass one span per clip "
                "(qwenaudio.audio.audio_span gives it from the clip's length)"
            )
        out, end = [], 0
        for (start, stop), span in zip(regions, audio_spans):
            if not isinstance(span, int) or isinstance(span, bool) or not 2 <= span <= MAX_AUDIO_SPAN:
                raise TokenizerError(f"audio span {span!r} must be an int ≥ 2 (BOS + frames + EOS) and ≤ "
                                     f"{MAX_AUDIO_SPAN} (a 30 s clip)")
            out += ids[end:start] + [self.audio_start_id] + [self.audio_pad_id] * (span - 2) + [self.audio_end_id]
            end = stop + 1
        return out + ids[end:]

    def audio_paths(self, text: str, *, allowed_special: AllowedSpecial = "all") -> list[str]:
        """The text inside each `<audio>…</audio>` region, in order: the clips a prompt refers to."""
        ids = self._encode_plain(text, allowed_special)
        return [self._encoding.decode(ids[a + 1 : b]) for a, b in self._audio_regions(ids)]

    def decode(self, ids: Iterable[int] | torch.Tensor, *, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (ints, numpy ints or a 1-D tensor); with `skip_special_tokens`, every id ≥ 151643 (tags,
        timestamps, pads) is dropped.

        The embedding's rows past the tokenizer's ids (155165–155946) have no text, yet generation may choose them
        (`GenerationConfig.full_vocab`, as the official generate does): each is shown as `<|id_N|>`, where the
        official tokenizer fails. No tag has that form, so it cannot be mistaken for one.
        """
        return _decode(self._encoding, ids, skip_special_tokens=skip_special_tokens, first_special=self.eod_id,
                       embedding_rows=EMBEDDING_ROWS, errors=self.errors)

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        audio_spans: Sequence[Sequence[int] | None] | None = None,
        padding_side: Literal["left", "right"] = "left",
        allowed_special: AllowedSpecial = "all",
    ) -> Batch:
        """Encode several prompts and pad them to one length with `<|endoftext|>`.

        Left padding is what generation needs (every row's last token is real); `audio_spans[i]` serves `texts[i]`.
        """
        return _encode_batch(self.encode, texts, audio_spans=audio_spans, padding_side=padding_side,
                             allowed_special=allowed_special, pad_id=self.eod_id)

    def _encode_plain(self, text: str, allowed_special: AllowedSpecial) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"text must be a str, got {type(text).__name__}")
        _check_allowed_special(allowed_special, self.special_ids)
        text = unicodedata.normalize("NFC", text)
        return self._encoding.encode(text, allowed_special=allowed_special, disallowed_special=())

    def _audio_regions(self, ids: list[int]) -> list[tuple[int, int]]:
        """(start, end) index pairs of each `<audio>` and its `</audio>`; malformed tags are an error, since the
        decoder pairs starts with ends by position and a stray tag would splice a clip into the wrong rows."""
        regions, start = [], None
        for i, t in enumerate(ids):
            if t == self.audio_start_id:
                if start is not None:
                    raise TokenizerError(f"<audio> at token {i} opens inside the <audio> region opened at token {start}")
                start = i
            elif t == self.audio_end_id:
                if start is None:
                    raise TokenizerError(f"</audio> at token {i} has no matching <audio>")
                regions.append((start, i))
                start = None
        if start is not None:
            raise TokenizerError(f"unclosed <audio> tag: the region opened at token {start} has no </audio>")
        return regions


def _check_allowed_special(allowed_special: AllowedSpecial, special_ids: dict[str, int]) -> None:
    """`allowed_special` is "all" or a set of names from `special_ids`; anything else is a TokenizerError."""
    if allowed_special != "all":
        if isinstance(allowed_special, str) or not isinstance(allowed_special, Iterable):
            raise TokenizerError(f"allowed_special must be 'all' or a set of special tokens, "
                                 f"got {allowed_special!r}")
        unknown = set(allowed_special) - special_ids.keys()
        if unknown:
            raise TokenizerError(f"allowed_special names unknown special tokens: {sorted(unknown)}")


def _decode(encoding: tiktoken.Encoding, ids: Iterable[int] | torch.Tensor, *, skip_special_tokens: bool,
            first_special: int, embedding_rows: int, errors: str) -> str:
    """`Tokenizer.decode` for any vocabulary whose special ids start at `first_special` and whose model has
    `embedding_rows` rows: the rows past the tokenizer's ids show as `<|id_N|>`."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    if not isinstance(ids, Iterable) or isinstance(ids, (str, bytes)):
        raise TokenizerError(f"ids must be a sequence of token ids, got {type(ids).__name__}")
    ids = list(ids)
    for i in ids:
        if not isinstance(i, numbers.Integral) or isinstance(i, bool):  # a bool is an int, but never an id
            raise TokenizerError(f"token id {i!r} is not an int")
        if not 0 <= i < embedding_rows:
            raise TokenizerError(f"token id {i!r} is outside the model's range 0..{embedding_rows - 1}")
    ids = [int(i) for i in ids]
    if skip_special_tokens:
        ids = [i for i in ids if i < first_special]
    runs = groupby(ids, key=lambda i: i < encoding.n_vocab)
    return "".join(encoding.decode(list(run), errors=errors) if has_text
                   else "".join(f"<|id_{i}|>" for i in run) for has_text, run in runs)


def _encode_batch(encode: Callable[..., list[int]], texts: Sequence[str], *,
                  audio_spans: Sequence[Sequence[int] | None] | None, padding_side: Literal["left", "right"],
                  allowed_special: AllowedSpecial, pad_id: int) -> Batch:
    """`Tokenizer.encode_batch` for any tokenizer's `encode`, padding with `pad_id`."""
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):  # a str would be split into characters
        raise TokenizerError(f"texts must be a list of str, got {type(texts).__name__}")
    texts = list(texts)
    if padding_side not in ("left", "right"):
        raise TokenizerError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if audio_spans is not None and not isinstance(audio_spans, Sequence):
        raise TokenizerError(f"audio_spans must be a list (one entry per text), got {audio_spans!r}")
    if audio_spans is not None and len(audio_spans) != len(texts):
        raise TokenizerError(f"audio_spans has {len(audio_spans)} entries for {len(texts)} texts")
    rows = [
        encode(t, allowed_special=allowed_special, audio_spans=None if audio_spans is None else audio_spans[i])
        for i, t in enumerate(texts)
    ]
    width = max((len(r) for r in rows), default=0)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        cols = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        input_ids[i, cols] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, cols] = 1
    return Batch(input_ids, attention_mask)


def _load_ranks(path: Path) -> dict[bytes, int]:
    """Read `qwen.tiktoken`: one `base64(token) rank` pair per line, ranks 0..151642 each exactly once."""
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        raise TokenizerError(f"vocabulary file not found: {path}") from None
    except IsADirectoryError:
        raise TokenizerError(f"vocabulary path is a directory, expected the {VOCAB_FILE} file: {path}") from None
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read the vocabulary ({type(e).__name__}: {e.strerror or e})") from None
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise TokenizerError(f"{path}:{number}: corrupt vocabulary line {line[:60]!r}") from None
    if sorted(ranks.values()) != list(range(NUM_BPE_RANKS)):
        raise TokenizerError(
            f"{path}: expected the {NUM_BPE_RANKS} ranks 0..{NUM_BPE_RANKS - 1} of Qwen's vocabulary, "
            f"found {len(ranks)} tokens; the file is truncated or not qwen.tiktoken"
        )
    missing = [f"{b:#04x}" for b in range(256) if bytes([b]) not in ranks]
    if missing:  # byte-level BPE starts from single bytes: tiktoken would panic on text that needs a missing one
        raise TokenizerError(f"{path}: no token for the single byte(s) {', '.join(missing[:8])}; byte-level BPE needs "
                             "all 256 (the file is corrupt or not qwen.tiktoken)")
    return ranks
