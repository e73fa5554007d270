"""Qwen2-Audio's tokenizer: Qwen2's byte-level BPE from `vocab.json` + `merges.txt`, plus six special tokens.

The 151,643 regular tokens are qwen.tiktoken's, with the same ids (`vocab.json` spells each token's bytes in
GPT-2's byte-to-unicode alphabet), and the pre-tokenizer splits text with the same pattern (`PAT_STR`). So tiktoken
runs it, with the ids as ranks: tiktoken merges the adjacent pair whose join has the lowest rank, transformers the
pair that comes first in `merges.txt`, and the two agree when each merge is the pair tiktoken would join last in
that token's bytes and the merges are listed in the rank order of the tokens they make (`_check_merges`). Special
tokens are split off before the text is NFC-normalised, as transformers does (Qwen-Audio normalises first).

Audio enters the prompt as `<|audio_bos|><|AUDIO|><|audio_eos|>`: `encode` repeats each `<|AUDIO|>` once per audio
position of its clip (the processor's expansion), and the model later overwrites those rows with the encoded clip.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import tiktoken
import torch

from .checks import expect, whole
from .errors import TokenizerError
from .tokenizer import (
    ENDOFTEXT, IM_END, IM_START, NUM_BPE_RANKS, PAT_STR, AllowedSpecial, Batch, _check_allowed_special, _decode,
    _encode_batch,
)

VOCAB_JSON, MERGES_TXT, TOKENIZER_CONFIG = "vocab.json", "merges.txt", "tokenizer_config.json"
EMBEDDING_ROWS = 156_032  # rows of the checkpoint's embedding; the ids past the tokenizer's 151,649 have no text
AUDIO, AUDIO_BOS, AUDIO_EOS = "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"
AUDIO_REGION = AUDIO_BOS + AUDIO + AUDIO_EOS  # one clip's place in a prompt, as every Qwen2-Audio prompt writes it
# In id order from 151643, all `special` (dropped by skip_special_tokens). The audio ids are the Instruct
# checkpoint's: transformers' integration test of it expects "Audio 1: " then 151647, 151646 × 101, 151648.
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END, AUDIO, AUDIO_BOS, AUDIO_EOS)
MAX_AUDIO_TOKENS = 750  # audio positions of a 30 s clip (3,000 mel frames), the longest the encoder hears


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as one printable character. Printable Latin-1 bytes stand for
    themselves; the other 68 (controls, space, soft hyphen) take the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


class Qwen2Tokenizer:
    """tiktoken BPE over a Qwen2 `vocab.json` with Qwen2-Audio's special tokens.

    By default every special surface form typed in the text is encoded as its special id, as transformers' tokenizer
    does; pass `allowed_special` (a set of special tokens) to treat the others as plain text.
    """

    def __init__(self, directory: str | Path, errors: str = "replace"):
        expect(directory, (str, Path), "directory", f"a checkpoint directory (with {VOCAB_JSON} and {MERGES_TXT})",
               TokenizerError)
        expect(errors, str, "errors", "a bytes.decode error handler name ('replace', 'strict', …)", TokenizerError)
        self.directory = Path(directory)
        self.errors = errors
        ranks = _load_vocab(self.directory / VOCAB_JSON)
        _check_merges(self.directory / MERGES_TXT, ranks)
        self.special_ids = _load_special_ids(self.directory / TOKENIZER_CONFIG)
        self._encoding = tiktoken.Encoding(
            "qwen2-audio", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self.special_ids
        )
        self.eod_id = self.special_ids[ENDOFTEXT]  # end of document; also the padding id
        self.im_start_id = self.special_ids[IM_START]
        self.im_end_id = self.special_ids[IM_END]
        self.audio_id = self.special_ids[AUDIO]
        self.audio_bos_id = self.special_ids[AUDIO_BOS]
        self.audio_eos_id = self.special_ids[AUDIO_EOS]

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Qwen2Tokenizer:
        """Load from a checkpoint directory (its `vocab.json`, `merges.txt` and `tokenizer_config.json`)."""
        expect(path, (str, Path), "path", f"a checkpoint directory (with {VOCAB_JSON} and {MERGES_TXT})",
               TokenizerError)
        return cls(path)

    @property
    def audio_token_id(self) -> int:
        """`<|AUDIO|>`: the token each clip's span replaces a run of."""
        return self.audio_id

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (151,649); the model's embedding has more rows."""
        return self._encoding.n_vocab

    def __len__(self) -> int:
        return self.vocab_size

    def encode(
        self, text: str, *, allowed_special: AllowedSpecial = "all", audio_spans: Sequence[int] | None = None
    ) -> list[int]:
        """Token ids of `text`; each stretch between special tokens is NFC-normalised first.

        Each `<|AUDIO|>` becomes `audio_spans[i]` copies of itself, one entry per `<|AUDIO|>` in order of
        appearance: the clip's number of audio positions. Text containing `<|AUDIO|>` needs `audio_spans`.
        Surrogate code points are read as UTF-16, as in `Tokenizer.encode` (transformers refuses them).
        """
        if audio_spans is not None and not isinstance(audio_spans, Sequence):
            raise TokenizerError(f"audio_spans must be a list of ints (one per clip), got {audio_spans!r}")
        ids = self._encode_plain(text, allowed_special)
        where = [i for i, t in enumerate(ids) if t == self.audio_id]
        if not where:
            if audio_spans:
                raise TokenizerError(f"audio_spans has {len(audio_spans)} entries but the text has no {AUDIO} token")
            return ids
        if audio_spans is None or len(audio_spans) != len(where):
            given = "no audio_spans" if audio_spans is None else f"{len(audio_spans)} audio_spans"
            raise TokenizerError(
                f"text has {len(where)} {AUDIO} token(s) but {given} were given; pass one span per clip (its number "
                "of audio positions)"
            )
        out, end = [], 0
        for at, span in zip(where, audio_spans):
            if not whole(span, 1, MAX_AUDIO_TOKENS):
                raise TokenizerError(f"audio span {span!r} must be an int from 1 to {MAX_AUDIO_TOKENS} (the clip's "
                                     f"audio positions; {MAX_AUDIO_TOKENS} for 30 s)")
            out += ids[end:at] + [self.audio_id] * span
            end = at + 1
        return out + ids[end:]

    def decode(self, ids: Iterable[int] | torch.Tensor, *, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (ints, numpy ints or a 1-D tensor); with `skip_special_tokens`, every id ≥ 151643 is
        dropped. The embedding's rows past the tokenizer's ids (151649–156031) show as `<|id_N|>`, as in
        `Tokenizer.decode`."""
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
        """Encode several prompts and pad them to one length with `<|endoftext|>` (left for generation);
        `audio_spans[i]` serves `texts[i]`."""
        return _encode_batch(self.encode, texts, audio_spans=audio_spans, padding_side=padding_side,
                             allowed_special=allowed_special, pad_id=self.eod_id)

    def _encode_plain(self, text: str, allowed_special: AllowedSpecial) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"text must be a str, got {type(text).__name__}")
        _check_allowed_special(allowed_special, self.special_ids)
        names = self.special_ids if allowed_special == "all" else set(allowed_special)
        if not names:
            return self._encoding.encode_ordinary(unicodedata.normalize("NFC", text))
        split = re.compile("(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True))) + ")")
        ids: list[int] = []
        for n, piece in enumerate(split.split(text)):  # odd pieces are the special tokens
            ids += [self.special_ids[piece]] if n % 2 else self._encoding.encode_ordinary(
                unicodedata.normalize("NFC", piece))
        return ids


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(f"{what} not found: {path}") from None
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}:{e.lineno}: corrupt JSON ({e.msg}, column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read the {what} ({type(e).__name__}: {e})") from None


def _load_vocab(path: Path) -> dict[bytes, int]:
    """Read `vocab.json`: token (byte-level characters) → id, the ids 0..151642 each exactly once."""
    vocab = _read_json(path, "vocabulary file")
    if not isinstance(vocab, dict):
        raise TokenizerError(f"{path}: expected a JSON object of token → id, got {type(vocab).__name__}")
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    for token, rank in vocab.items():
        if not whole(rank, 0) or any(c not in byte_of for c in token):
            raise TokenizerError(f"{path}: corrupt entry {token!r}: {rank!r} (a token must be byte-level "
                                 "characters and its id an int ≥ 0)")
        ranks[bytes(byte_of[c] for c in token)] = rank
    if sorted(ranks.values()) != list(range(NUM_BPE_RANKS)):
        raise TokenizerError(
            f"{path}: expected the {NUM_BPE_RANKS} ids 0..{NUM_BPE_RANKS - 1} of Qwen2's vocabulary, found "
            f"{len(ranks)} tokens; the file is truncated or not Qwen2's"
        )
    missing = [f"{b:#04x}" for b in range(256) if bytes([b]) not in ranks]
    if missing:  # byte-level BPE starts from single bytes: tiktoken would panic on text that needs a missing one
        raise TokenizerError(f"{path}: no token for the single byte(s) {', '.join(missing[:8])}; byte-level BPE needs "
                             "all 256")
    return ranks


def _check_merges(path: Path, ranks: dict[bytes, int]) -> None:
    """Check `merges.txt` against the ranks tiktoken uses: each line joins two tokens into a third, and the lines
    come in the rank order of the tokens they make, so "first merge in the file" and "lowest rank" pick alike.
    Which pair makes a token is not re-derived here (a second per load): it must be the last pair tiktoken joins
    in the token's own bytes, as `testing.write_qwen2_vocab` writes it; another split of the same token (e.g. the
    one whose parts have the lowest ranks) makes transformers' BPE differ from tiktoken's on common text."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TokenizerError(f"merges file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read the merges ({type(e).__name__}: {e})") from None
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    last = -1
    for number, line in enumerate(lines, start=1):
        if not line or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        try:
            left, right = (bytes(byte_of[c] for c in part) for part in parts)
            rank = ranks[left + right] if left in ranks and right in ranks else None
        except (KeyError, ValueError):
            rank = None
        if rank is None:
            raise TokenizerError(f"{path}:{number}: corrupt merge {line[:60]!r} (expected two vocabulary tokens "
                                 "whose join is a token, separated by one space)")
        if rank < last:
            raise TokenizerError(f"{path}:{number}: merge {line[:60]!r} makes id {rank}, after a merge that made id "
                                 f"{last}; the merges must follow the ids' order")
        last = rank


def _load_special_ids(path: Path) -> dict[str, int]:
    """The added tokens of the checkpoint's tokenizer_config.json (`added_tokens_decoder`), or without one the six
    Qwen2-Audio needs. The published file lists some 4,400 added tokens in the rows past the BPE ranks (its 638 kB
    say so; their text is not public here), so any set is read, as transformers reads it, provided the six sit at
    their ids 151643–151648 (the model's prompts and stops are built on them) and the ids run on without a gap."""
    expected = {token: NUM_BPE_RANKS + i for i, token in enumerate(SPECIAL_TOKENS)}
    if not path.is_file():
        return expected
    added = _read_json(path, "tokenizer config")
    added = added.get("added_tokens_decoder") if isinstance(added, dict) else None
    if added is None:
        return expected
    try:
        found = {entry["content"]: int(i) for i, entry in added.items()}
    except (AttributeError, KeyError, TypeError, ValueError):
        raise TokenizerError(f"{path}: added_tokens_decoder must map each id to {{'content': token, …}}") from None
    wrong = {token: found.get(token) for token, i in expected.items() if found.get(token) != i}
    if wrong:
        raise TokenizerError(f"{path}: added_tokens_decoder puts {wrong} where Qwen2-Audio's tokenizer has "
                             f"{ {token: expected[token] for token in wrong} }")
    ids = sorted(found.values())
    if ids != list(range(NUM_BPE_RANKS, NUM_BPE_RANKS + len(ids))) or ids[-1] >= EMBEDDING_ROWS:
        raise TokenizerError(f"{path}: added_tokens_decoder's ids must run from {NUM_BPE_RANKS} without a gap or a "
                             f"repeat, inside the model's {EMBEDDING_ROWS} rows")
    return found
