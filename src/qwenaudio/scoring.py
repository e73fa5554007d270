"""The evaluation benchmarks' scoring, computed as each family's official scripts (Qwen-Audio's, Qwen2-Audio's) do.

The official repository scores each benchmark in its own script (eval_audio/evaluate_*.py at QwenLM/Qwen-Audio):
word or character error rate for ASR, an average timestamp shift for speech recognition with word timestamps (SRWT),
exact-match accuracy for audio question answering (AQA), speech emotion (SER), vocal sound (VSC) and acoustic
scene (ASC) classification, per-field scores of the note analysis (NSynth) replies, BLEU for speech translation
(S2TT) and CIDEr, SPICE and SPIDEr for audio captions (AAC). Each script decodes the reply with its special tokens
kept, strips surrounding whitespace, groups the examples by their `source` field and scores every group on its own.
This module is those metrics and nothing else, in plain Python so that scoring needs no editdistance, edit_distance or
scikit-learn. Only BLEU and the caption scores run what the official scripts run: sacreBLEU, and the COCO caption
code (from pycocoevalcap) with Java; the `eval` extra installs both packages, imported when those functions are
called. tests/test_scoring.py and tests/test_text_metrics.py check every function against the official functions'
outputs on fixed inputs, recorded by tests/golden/record_scoring.py, record_note_scoring.py and
record_text_metrics.py. `qwenaudio.evaluation` (the `qwenaudio evaluate` command) runs the benchmarks and scores
them with this module.

Qwen2-Audio's scripts (eval_audio/ at QwenLM/Qwen2-Audio) score ASR, S2TT, SER and VSC the same way, with the
reply decoded without its special tokens and not stripped, and the ASR texts normalised before counting: Whisper's
English and basic normalizers (the `eval` extra's whisper-normalizer package), speechio's Chinese one (our
`chinese_tn`) and zhconv for Cantonese (the `eval` extra); the `qwen2_*` functions below. tests/test_scoring_qwen2.py
checks them against the official functions' outputs, recorded by tests/golden/record_qwen2_scoring.py.

Where the official code crashes, these functions give a defined result instead; each docstring says where.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import re
import shutil
import subprocess
import tempfile
import unicodedata
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import chain, groupby, pairwise
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

from . import chinese_tn
from .core.checks import renamed
from .core.errors import InputError, MetricUnavailableError

SCORED_LANGUAGES = ("en", "zh")  # the ASR benchmarks' languages: English is scored by words, Chinese by characters
PUNCTUATION = "!,.?;:"  # marks that `remove_sp` pulls onto the word before them
YES_NO = ("yes", "no")
# The NSynth note qualities the note-analysis scoring knows; any other label in a reply or reference is ignored.
SONIC_LABELS = ("bright", "dark", "distortion", "fast_decay", "long_release", "multiphonic", "nonlinear_env",
                "percussive", "reverb", "tempo-synced")
NO_NUMBER = 128  # the pitch or velocity of a text without a readable one: one past the MIDI range

_TAG = re.compile(r"<\|.*?\|>")
_SPACE_BEFORE_PUNCTUATION = re.compile(rf" ?([{re.escape(PUNCTUATION)}])")
_TIMESTAMP = re.compile(r"<\|\d{1,2}\.\d+\|>")  # one or two digits before the point: <|100.00|> is not a time
_PITCH = re.compile(r"<\|pitch\|><\|midi_pitch_(.*?)\|>")
_VELOCITY = re.compile(r"<\|velocity\|><\|midi_velocity_(.*?)\|>")
_INSTRUMENT = re.compile(r"<\|instrument\|>(.*)")  # `.` stops at a newline, and the value at the next "<"
_SONIC = re.compile(r"<\|sonic\|>(.*)")


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{name} must be a str, got {type(value).__name__}: {value!r:.80}")
    return value


def _sequence(value: Any, name: str) -> Sequence[Any]:
    """`value` if it is a list-like of examples (not a str, which would be read a character at a time)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InputError(f"{name} must be a list, got {type(value).__name__}: {value!r:.80}")
    return value


def _texts(value: Any, name: str) -> Sequence[str]:
    for i, item in enumerate(_sequence(value, name)):
        _text(item, f"{name}[{i}]")
    return value


def _check_language(language: str) -> None:
    if not isinstance(language, str) or language not in SCORED_LANGUAGES:
        raise InputError(f"language must be one of {SCORED_LANGUAGES}, got {language!r}")


def _check_pairs(refs: Sequence[Any], hyps: Sequence[Any]) -> None:
    _sequence(refs, "refs"), _sequence(hyps, "hyps")
    if len(refs) != len(hyps):
        raise InputError(f"{len(refs)} references but {len(hyps)} replies: they must pair up one to one")
    if not refs:
        raise InputError("no examples to score")


def remove_sp(text: str, language: str) -> str:
    """`text` with every `<|...|>` tag turned into a space, whitespace runs collapsed to one space, the space before
    each of `PUNCTUATION` dropped and leading spaces removed; for Chinese, all whitespace removed. A trailing space
    is kept (English), as in the official function of the same name; scoring splits on whitespace, so it is harmless."""
    _text(text, "text")
    _check_language(language)
    return _remove_sp(text, language)


def _remove_sp(text: str, language: str) -> str:
    text = re.sub(r"\s+", " ", _TAG.sub(" ", text))
    text = _SPACE_BEFORE_PUNCTUATION.sub(r"\1", text).lstrip(" ")
    return re.sub(r"\s+", "", text) if language == "zh" else text


def evaluation_tokens(text: str, language: str) -> list[str]:
    """The units an error rate counts: lowercased whitespace-separated words for English, the characters left after
    dropping whitespace for Chinese. This is what the official `EvaluationTokenizer` does with the settings the
    scripts use (no sacreBLEU tokenization, lowercasing, punctuation kept), followed by the scripts' split."""
    _text(text, "text")
    _check_language(language)
    words = text.lower().split()
    return list("".join(words)) if language == "zh" else words


def edit_distance(a: Sequence[Any], b: Sequence[Any]) -> int:
    """The Levenshtein distance: the fewest insertions, deletions and substitutions (each costing 1) from a to b."""
    if not all(isinstance(x, (str, Sequence)) for x in (a, b)):
        raise InputError(f"edit_distance compares two sequences, got {type(a).__name__} and {type(b).__name__}")
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def error_rate(refs: Sequence[str], hyps: Sequence[str], language: str) -> float:
    """Word (English) or character (Chinese) error rate of one group of examples: the summed edit distances over the
    summed reference lengths, counted in `evaluation_tokens`, as the official `compute_wer` computes it. Apply
    `remove_sp` to both sides first, as the scripts do.

    Differences from the official function, all where it crashes:
    - a group whose first reference has no tokens (empty after `remove_sp`) makes `compute_wer` raise IndexError
      while printing a debug line; here that reference simply counts zero length, as it already does in the
      official function when it is not the first;
    - references without a single token in total (the official function raises IndexError, or ZeroDivisionError on
      empty lists) have no defined rate: InputError;
    - lists of different lengths, which the official function silently cuts to the references' length or
      fails on with IndexError: InputError.
    """
    _check_language(language)
    _check_pairs(_texts(refs, "refs"), _texts(hyps, "hyps"))
    errors = length = 0
    for ref, hyp in zip(refs, hyps):
        ref_tokens = evaluation_tokens(ref, language)
        errors += edit_distance(ref_tokens, evaluation_tokens(hyp, language))
        length += len(ref_tokens)
    if length == 0:
        raise InputError(f"the {len(refs)} references hold no {'words' if language == 'en' else 'characters'}: "
                         "an error rate over them is undefined")
    return errors / length


def group_by_source(examples: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """The examples per value of their `source` field, sources in order of first appearance, examples in input
    order: the groups the official scripts score and report one by one."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    if isinstance(examples, (str, bytes, Mapping)) or not isinstance(examples, Iterable):
        raise InputError(f"group_by_source takes a list of examples (dicts), got {type(examples).__name__}")
    for index, example in enumerate(examples):
        if not isinstance(example, Mapping):
            raise InputError(f"example {index} must be a dict with a 'source' field, got {type(example).__name__}")
        if "source" not in example:
            raise InputError(f"example {index} has no 'source' field (fields: {sorted(example)})")
        groups.setdefault(example["source"], []).append(example)
    return groups


def _timed_segments(text: str) -> tuple[list[str], list[tuple[float, float]]] | None:
    """The text between consecutive timestamp tags and the (start, end) around each, None without a timestamp.

    As in the official parser: the task tags `<|startoftranscript|>` and `<|transcribe|>` and one language tag
    (`<|en|>`, else `<|zh|>`) are deleted first; text before the first timestamp and after the last one is dropped,
    so a reply that continues the prompt's `<|0.00|>` loses its first segment; the segments are joined with tabs and
    split on tabs again, so a tab inside a segment makes more words than time spans (the extra words, at the end,
    get no span)."""
    for tag in ("<|startoftranscript|>", "<|transcribe|>"):
        text = text.replace(tag, "")
    language_tag = next((tag for tag in ("<|en|>", "<|zh|>") if tag in text), None)
    if language_tag:
        text = text.replace(language_tag, "")
    times = [float(tag[2:-2]) for tag in _TIMESTAMP.findall(text)]
    if not times:
        return None
    words = "\t".join(_TIMESTAMP.split(text)[1:-1]).split("\t")
    return words, list(pairwise(times))


def _matches(a: Sequence[str], b: Sequence[str]) -> list[tuple[int, int]]:
    """Index pairs of the elements an edit-distance alignment of a to b keeps unchanged, in order.

    Among equally short edit paths the official scoring's `edit_distance.SequenceMatcher` prefers, walking back from
    the end, a diagonal step (match or substitution), then an insertion, then a deletion; the same choice here gives
    the same pairs, and so the same shift."""
    cost = [[i + j if i == 0 or j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            cost[i][j] = min(cost[i - 1][j - 1] + (a[i - 1] != b[j - 1]), cost[i][j - 1] + 1, cost[i - 1][j] + 1)
    pairs, i, j = [], len(a), len(b)
    while i or j:
        if i and j and cost[i][j] == cost[i - 1][j - 1] + (a[i - 1] != b[j - 1]):
            if a[i - 1] == b[j - 1]:
                pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif j and cost[i][j] == cost[i][j - 1] + 1:
            j -= 1
        else:
            i -= 1
    return pairs[::-1]


def average_shift(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """SRWT's average absolute shift, in seconds, of the start and end of each segment that reference and reply
    share, as the official `AverageShiftCalculator` computes it from raw references and replies with their
    timestamp tags: per example, the segments an edit-distance alignment keeps unchanged are paired and each pair
    adds |start difference| + |end difference|; the sum over all examples is divided by the number of pairs.
    Examples where no segment pairs up count nothing.

    Differences from the official calculator, all where it crashes or pairs the wrong examples:
    - it drops every reference and every reply without a timestamp from its own list and then pairs the lists by
      position, which stops on an assertion when one list loses more than the other (a reply without timestamps)
      and pairs unrelated examples when both lose the same number at different places; here the example is left
      out, so the rest stay paired with their own reference;
    - no pair at all in any example (the official calculator raises ZeroDivisionError): InputError;
    - lists of different lengths: InputError.
    """
    _check_pairs(_texts(refs, "refs"), _texts(hyps, "hyps"))
    shift, pairs = 0.0, 0
    for ref, hyp in zip(refs, hyps):
        ref_parsed, hyp_parsed = _timed_segments(ref), _timed_segments(hyp)
        if ref_parsed is None or hyp_parsed is None:
            continue
        (ref_words, ref_spans), (hyp_words, hyp_spans) = ref_parsed, hyp_parsed
        matched = _matches(ref_words, hyp_words)
        # A matched word past the last span has no time (see _timed_segments); the official code then skips the
        # example when the two sides are left with different numbers of timed words.
        ref_timed = [ref_spans[i] for i, _ in matched if i < len(ref_spans)]
        hyp_timed = [hyp_spans[j] for _, j in matched if j < len(hyp_spans)]
        if len(ref_timed) != len(hyp_timed) or not ref_timed:
            continue
        example_shift = 0.0  # summed per example first, then added, for the official float rounding
        for (ref_start, ref_end), (hyp_start, hyp_end) in zip(ref_timed, hyp_timed):
            example_shift += abs(ref_start - hyp_start) + abs(ref_end - hyp_end)
        shift += example_shift
        pairs += len(ref_timed)
    if pairs == 0:
        raise InputError(f"no segment of the {len(refs)} replies has the same text as its reference's: "
                         "the average shift is undefined")
    return shift / pairs


def accuracy(refs: Sequence[Any], hyps: Sequence[Any]) -> float:
    """The share of replies equal to their reference, character for character: the official AQA, SER, VSC and ASC
    scripts compare the stripped decoded reply with no normalisation, so a different case, a trailing "." or a tag
    left in the reply counts as wrong. Empty or unequal lists: InputError (scikit-learn raises ValueError)."""
    _check_pairs(refs, hyps)
    return sum(ref == hyp for ref, hyp in zip(refs, hyps)) / len(refs)


def yes_no_accuracy(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """`accuracy` over the examples whose reference is "yes" or "no" in any case, the second score the official AQA
    script reports for Clotho-AQA sources. No such example: InputError (scikit-learn raises ValueError)."""
    _check_pairs(_texts(refs, "refs"), hyps)
    kept = [(ref, hyp) for ref, hyp in zip(refs, hyps) if ref.lower() in YES_NO]
    if not kept:
        raise InputError(f"none of the {len(refs)} references is yes or no")
    return accuracy(*zip(*kept))


class NoteInfo(NamedTuple):
    """The fields of a note-analysis reply or reference, read as the official `get_note_info` reads them."""

    pitch: int  # MIDI pitch; NO_NUMBER when missing or unreadable
    velocity: int  # MIDI velocity; NO_NUMBER when missing or unreadable
    instrument: str  # "" when missing
    sonic: str  # the ", "-separated quality labels as written, "" when missing; see `sonic_labels`


def _number(pattern: re.Pattern[str], text: str) -> int:
    """The first match's value as Python's int() reads it (so " 61 ", "+62", "6_4" and Arabic-Indic digits count),
    NO_NUMBER without a match or when int() refuses the first one; a later match is never tried."""
    match = pattern.search(text)
    try:
        return int(match[1]) if match else NO_NUMBER
    except ValueError:
        return NO_NUMBER


def _label(pattern: re.Pattern[str], text: str) -> str:
    """The rest of the line after the first tag, up to the next "<", spaces kept; "" without the tag."""
    match = pattern.search(text)
    return match[1].split("<")[0] if match else ""


def note_info(text: str) -> NoteInfo:
    """The pitch, velocity, instrument and sonic qualities written in `text` with the `<|pitch|><|midi_pitch_N|>`,
    `<|velocity|><|midi_velocity_N|>`, `<|instrument|>NAME` and `<|sonic|>A, B` tags, in any order. A missing or
    malformed field gives its empty value (NO_NUMBER or ""), never an error: replies are scored as they come."""
    _text(text, "text")
    return NoteInfo(_number(_PITCH, text), _number(_VELOCITY, text), _label(_INSTRUMENT, text), _label(_SONIC, text))


def sonic_labels(sonic: str) -> list[str]:
    """The known labels (SONIC_LABELS) of a `NoteInfo.sonic` field, in written order. The field is split on ", "
    exactly, so "bright,dark", "Bright" or a doubled space make labels that are not known and are dropped."""
    _text(sonic, "sonic")
    return [label for label in sonic.split(", ") if label in SONIC_LABELS]


def average_precision(truth: Sequence[bool], scores: Sequence[float]) -> float:
    """Average precision as scikit-learn's `average_precision_score` defines it: with the distinct scores as
    thresholds, from the highest down, the sum of each threshold's precision times the recall it adds. Examples with
    equal scores enter together, so with 0/1 scores (a reply has a label or not) there are at most two steps. No
    positive example: 0.0, as in scikit-learn 1.9 (it warns; older versions gave nan or a different value)."""
    _sequence(truth, "truth"), _sequence(scores, "scores")
    if not all(isinstance(s, (int, float)) for s in scores):
        raise InputError("average_precision: every score must be a number")
    if len(truth) != len(scores) or not truth:
        raise InputError(f"average precision needs as many scores as labels, at least one: {len(truth)} labels, "
                         f"{len(scores)} scores")
    positives = sum(map(bool, truth))
    if positives == 0:
        return 0.0
    total = recall = 0.0
    hits = seen = 0
    ranked = sorted(zip(scores, truth), key=lambda pair: pair[0], reverse=True)
    for _, tied in groupby(ranked, key=lambda pair: pair[0]):
        tied = list(tied)
        hits, seen = hits + sum(bool(t) for _, t in tied), seen + len(tied)
        total += (hits / positives - recall) * hits / seen
        recall = hits / positives
    return total


def sonic_map(refs: Sequence[Sequence[str]], hyps: Sequence[Sequence[str]]) -> float:
    """The macro mean average precision of the label sets in the replies against those in the references, as the
    official note-analysis script computes it: one `average_precision` per label present in any reference or reply,
    the reply scoring 1 where it has the label and 0 elsewhere, and their plain mean. A label only the replies have
    scores 0.0, so it pulls the mean down. No label anywhere (scikit-learn raises ValueError): InputError."""
    _check_pairs(refs, hyps)
    for name, side in (("refs", refs), ("hyps", hyps)):
        for i, labels in enumerate(side):
            _sequence(labels, f"{name}[{i}]")
    labels = sorted(set(chain(*refs, *hyps)))
    if not labels:
        raise InputError(f"none of the {len(refs)} references and replies has a label: the mean average precision "
                         "is undefined")
    return sum(average_precision([label in ref for ref in refs], [float(label in hyp) for hyp in hyps])
               for label in labels) / len(labels)


def chroma_accuracy(refs: Sequence[int], hyps: Sequence[int]) -> float:
    """The official note-analysis "chroma accuracy", quirk included: the share of replies whose pitch and the
    reference's sit a multiple of 12 places apart in the sorted list of the distinct pitches present in the whole
    group (references and replies), not 12 semitones apart. The two agree only when that list holds every pitch
    between them: 40 against 52 counts as wrong when 41 is the only other pitch present, and 40 against 53 counts as
    right in a group with the twelve pitches 41 to 51 and no 52."""
    _check_pairs(refs, hyps)
    if not all(isinstance(p, int) for p in (*refs, *hyps)):
        raise InputError("chroma_accuracy compares MIDI pitches: every one must be an int")
    place = {pitch: i for i, pitch in enumerate(sorted(set(refs) | set(hyps)))}
    return sum(place[ref] % 12 == place[hyp] % 12 for ref, hyp in zip(refs, hyps)) / len(refs)


def unreadable_notes(refs: Sequence[str]) -> list[int]:
    """Indices of the note references in which `note_info` finds no pitch, velocity or instrument (a malformed or
    other tag format): a reply lacking the same field reads the same empty value and agrees with them."""
    notes = [note_info(t) for t in _texts(refs, "refs")]
    return [i for i, n in enumerate(notes) if NO_NUMBER in (n.pitch, n.velocity) or not n.instrument]


def note_scores(refs: Sequence[str], hyps: Sequence[str]) -> dict[str, float | None]:
    """The official note-analysis scores of one group of raw references and replies, each parsed by `note_info`:
    instrument and velocity `accuracy`, the sonic qualities' `sonic_map` over their `sonic_labels` (None where no
    example has a known label: the official script raises ValueError there, and the other scores stand), pitch
    accuracy (the official top-1 accuracy over one-hot pitches, which is pitch equality) and `chroma_accuracy`. Two
    texts without a readable pitch both read NO_NUMBER and so agree, as in the official scoring. That quirk is kept,
    so a reference in another tag format scores 1.0 against any reply lacking the same tags: such references
    (`unreadable_notes`) are counted in a warning."""
    _check_pairs(_texts(refs, "refs"), _texts(hyps, "hyps"))
    ref_notes, hyp_notes = [note_info(t) for t in refs], [note_info(t) for t in hyps]
    unreadable = unreadable_notes(refs)
    if unreadable:
        warnings.warn(f"{len(unreadable)} of {len(refs)} note references lack a readable pitch, velocity or "
                      f"instrument tag (first: {refs[unreadable[0]]!r:.120}); as in the official scoring, any reply "
                      "lacking the same tag agrees with them, so their scores mean little: check the data's tag "
                      "format (<|pitch|><|midi_pitch_N|><|velocity|><|midi_velocity_N|><|instrument|>NAME)",
                      stacklevel=2)

    def field(notes: list[NoteInfo], name: str) -> list[Any]:
        return [getattr(note, name) for note in notes]

    ref_sonic, hyp_sonic = [sonic_labels(n.sonic) for n in ref_notes], [sonic_labels(n.sonic) for n in hyp_notes]
    return {
        "instrument": accuracy(field(ref_notes, "instrument"), field(hyp_notes, "instrument")),
        "velocity": accuracy(field(ref_notes, "velocity"), field(hyp_notes, "velocity")),
        "sonic": sonic_map(ref_sonic, hyp_sonic) if any(ref_sonic + hyp_sonic) else None,
        "pitch": accuracy(field(ref_notes, "pitch"), field(hyp_notes, "pitch")),
        "chroma": chroma_accuracy(field(ref_notes, "pitch"), field(hyp_notes, "pitch")),
    }


# -- Speech translation (S2TT) BLEU and audio-caption scores: these need the `eval` extra, imported only when called.

EVAL_EXTRA = "pip install 'qwenaudio[eval]'"
BLEU_TOKENIZERS = {"ja": "ja-mecab", "zh": "zh"}  # sacreBLEU's tokenizer per target language; any other: "13a"
PTB_LINE_BREAKS = "\n\r\x0b\x0c\u2028\u2029"  # where the Stanford PTB tokenizer ends a line (it keeps lines)
SPICE_MODELS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def _package(module: str, install: str = EVAL_EXTRA) -> ModuleType:
    """`module`, imported now; MetricUnavailableError naming `install` when its package is missing."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or not (module == e.name or module.startswith(f"{e.name}.")):
            raise  # the package is there but one of its own dependencies is not: that error says which
        raise MetricUnavailableError(f"{module} is not installed: {install}") from e


def bleu_tokenizer(target_language: str) -> str:
    """The sacreBLEU tokenizer the official S2TT script scores a target language with: MeCab words for Japanese,
    characters for Chinese, and mteval-v13a's words and punctuation for every other language."""
    _text(target_language, "target_language")
    return BLEU_TOKENIZERS.get(target_language, "13a")


def _unmatched_bleu(totals: Sequence[int], sys_len: int, ref_len: int) -> float:
    """sacreBLEU 1.x's BLEU of a corpus where no n-gram of any reply is in its reference (2.x gives 0.0 there): its
    "exp" smoothing (mteval-v13a's) scores the n-th order's precision as 100 / (2^n * totals[n-1]), so the score
    stays above 0 as long as every order has an n-gram; an order without any scores log(0), which makes it 0."""
    if 0 in totals:
        return 0.0
    brevity = math.exp(1 - ref_len / sys_len) if sys_len < ref_len else 1.0
    log_precisions = (math.log(100.0 / (2.0**n * total)) for n, total in enumerate(totals, 1))
    return brevity * math.exp(sum(log_precisions) / len(totals))


def bleu(refs: Sequence[str], hyps: Sequence[str], target_language: str) -> float:
    """Corpus BLEU, 0 to 100, of one group of translations with one reference each, as the official S2TT script
    scores it: `sacrebleu.corpus_bleu(hyps, [refs], tokenize=bleu_tokenizer(target_language)).score` with sacreBLEU's
    defaults (case kept, "exp" smoothing), on the replies as decoded: tags are not removed, so `<|en|>` counts as
    the words "<", "|", "en", "|", ">".

    The official script ran sacreBLEU 1.5.1; sacreBLEU 2.2 and later, which the `eval` extra installs, count the
    same n-grams, and the score is 1.5.1's in every case, including the two where 2.x differs:
    - no n-gram of any reply is in its reference: 2.x returns 0.0, 1.5.1's smoothing a small positive score, which
      is computed here (`_unmatched_bleu`);
    - an empty reference: 1.5.1 raises EOFError ("No valid references for a sentence!") and the script stops; 2.2+
      count it as a reference of no words, which is 1.5.1's result for a reference of one space. That is ours.
    Japanese needs MeCab: `pip install 'sacrebleu[ja]'`.
    """
    _check_pairs(_texts(refs, "refs"), _texts(hyps, "hyps"))
    _text(target_language, "target_language")
    sacrebleu = _package("sacrebleu")
    tokenize = bleu_tokenizer(target_language)
    if tokenize == "ja-mecab":
        for module in ("MeCab", "ipadic"):
            _package(module, "pip install 'sacrebleu[ja]'")
    score = sacrebleu.corpus_bleu(list(hyps), [list(refs)], tokenize=tokenize)
    return score.score if any(score.counts) else _unmatched_bleu(score.totals, score.sys_len, score.ref_len)


def _check_captions(refs: Sequence[Sequence[str]], hyps: Sequence[str]) -> None:
    _check_pairs(refs, _texts(hyps, "hyps"))
    for i, clip in enumerate(refs):
        if isinstance(clip, str):
            raise InputError(f"refs[{i}] is one string, not a list of reference captions (the official script would "
                             f"take each of its {len(clip)} characters as a reference)")
        if not _texts(clip, f"refs[{i}]"):
            raise InputError(f"refs[{i}] holds no reference caption")


def _caption_tools() -> None:
    """Raise MetricUnavailableError unless pycocoevalcap and Java, which caption scoring runs, are both there."""
    _package("pycocoevalcap")
    if shutil.which("java") is None:
        raise MetricUnavailableError("caption scoring runs the Stanford PTB tokenizer and SPICE, Java programs, and "
                                     "no `java` is on PATH: install a Java runtime (e.g. apt-get install "
                                     "default-jre-headless; the official setup uses OpenJDK 8)")


def coco_tokenize(refs: Sequence[Sequence[str]], hyps: Sequence[str]) -> tuple[list[list[str]], list[str]]:
    """The references (several per clip) and replies as the official caption scoring hands them to its scorers:
    through pycocoevalcap's Stanford PTB tokenizer (Java), one caption per line, lowercased, split into words with
    punctuation marks as words of their own, and the marks in pycocoevalcap's list dropped ("-lrb-" for "(" stays,
    as do marks outside the list such as "!!" or "。"). Returns (refs, hyps) with the words joined by spaces.

    The official code turns "\\n" in a caption into a space, but the tokenizer also ends a line at "\\r", "\\v",
    "\\f", U+2028 and U+2029, and then every later caption is paired with the clip before it; here all of them
    become spaces, which gives the official result of the captions with those characters replaced. A clip's
    references given as one string are refused (InputError): the official code takes each character as a
    reference. pycocoevalcap's `PTBTokenizer` writes the captions to a temporary file beside its jar, which fails
    where site-packages is read-only; here the same jar runs the same command on a file in a temporary directory."""
    _check_captions(refs, hyps)
    _caption_tools()
    ptb = _package("pycocoevalcap.tokenizer.ptbtokenizer")
    one_line = str.maketrans(dict.fromkeys(PTB_LINE_BREAKS, " "))

    def tokenized(clips: Sequence[Sequence[str]]) -> list[list[str]]:
        lines = iter(_ptb_lines([c.translate(one_line) for clip in clips for c in clip], ptb))
        words = (" ".join(w for w in line.rstrip().split(" ") if w not in ptb.PUNCTUATIONS) for line in lines)
        return [[next(words) for _ in clip] for clip in clips]

    return tokenized(refs), [clip[0] for clip in tokenized([[hyp] for hyp in hyps])]


def _ptb_lines(captions: Sequence[str], ptb: ModuleType) -> list[str]:
    """The Stanford PTB tokenizer's output lines for `captions` (one per line), as pycocoevalcap runs it:
    `java -cp stanford-corenlp-3.4.1.jar edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase FILE`."""
    jar = Path(ptb.__file__).parent / ptb.STANFORD_CORENLP_3_4_1_JAR
    with tempfile.TemporaryDirectory(prefix="qwenaudio-ptb-") as work:
        source = Path(work) / "captions.txt"
        source.write_bytes("\n".join(captions).encode())
        done = subprocess.run(["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                               "-lowerCase", str(source)], cwd=work, stdout=subprocess.PIPE, check=False)
    if done.returncode:
        raise MetricUnavailableError(f"the Stanford PTB tokenizer failed (java exit status {done.returncode}, its "
                                     "message above)")
    return done.stdout.decode().split("\n")


def spice_unavailable() -> str | None:
    """Why SPICE cannot run here, or None when it can. pycocoevalcap ships SPICE but not the Stanford CoreNLP 3.6.0
    parser it needs; it downloads that (from the Stanford NLP site, no package registry) the first time its `Spice`
    is built. Scoring never starts that download: the message says how to."""
    _caption_tools()
    lib = Path(_package("pycocoevalcap.spice.spice").__file__).parent / "lib"
    missing = [name for name in SPICE_MODELS if not (lib / name).is_file()]
    if not missing:
        return None
    return (f"SPICE needs Stanford CoreNLP 3.6.0 and {lib} lacks {' and '.join(missing)}; pycocoevalcap downloads it "
            "with: python -c 'from pycocoevalcap.spice.get_stanford_models import get_stanford_models as g; g()'")


def caption_scores(refs: Sequence[Sequence[str]], hyps: Sequence[str]) -> dict[str, float | None]:
    """CIDEr, SPICE and SPIDEr of one group of audio captions (refs: the reference captions of each clip; hyps: one
    reply per clip), as the official caption script's `compute_caption` computes them with caption-evaluation-tools,
    here with pycocoevalcap, the same code and jars: both sides through `coco_tokenize`, then pycocoevalcap's `Cider`
    (CIDEr-D: n-grams up to 4, idf over the group's clips, so one clip alone scores 0) and `Spice`, and
    SPIDEr = (CIDEr + SPICE) / 2. The scores are fractions, not percentages as BLEU is.

    SPICE and SPIDEr are None where SPICE cannot run (`spice_score` raises; a warning says why), and CIDEr, computed
    first, is kept: the official script loses it with SPICE."""
    ref_tokens, hyp_tokens = coco_tokenize(refs, hyps)
    cider = cider_score(ref_tokens, hyp_tokens)
    try:
        spice = spice_score(ref_tokens, hyp_tokens)
    except MetricUnavailableError as e:
        warnings.warn(f"SPICE and SPIDEr not computed: {e}", stacklevel=2)
        return {"CIDEr": cider, "SPICE": None, "SPIDEr": None}
    return {"CIDEr": cider, "SPICE": spice, "SPIDEr": (cider + spice) / 2}


def cider_score(ref_tokens: Sequence[Sequence[str]], hyp_tokens: Sequence[str]) -> float:
    """pycocoevalcap's CIDEr-D of `coco_tokenize`'s output (see `caption_scores`)."""
    gts, res = dict(enumerate(ref_tokens)), {i: [hyp] for i, hyp in enumerate(hyp_tokens)}
    return float(_package("pycocoevalcap.cider.cider").Cider().compute_score(gts, res)[0])


def spice_score(ref_tokens: Sequence[Sequence[str]], hyp_tokens: Sequence[str]) -> float:
    """SPICE of `coco_tokenize`'s output as pycocoevalcap's `Spice` computes it: `java -jar -Xmx8G spice-1.0.jar
    IN -cache DIR -out OUT -subset -silent`, then the mean of every clip's "All" F-score. pycocoevalcap writes IN,
    OUT and the cache beside the jar (a read-only site-packages fails) and starts a download when CoreNLP is
    missing; here they go to a temporary directory, and a missing CoreNLP raises MetricUnavailableError saying how
    to fetch it (`spice_unavailable`), as does a failing SPICE (1.0 is reported to fail on Java 17 and later; the
    official setup uses Java 8)."""
    why = spice_unavailable()
    if why is not None:
        raise MetricUnavailableError(why)
    jar = Path(_package("pycocoevalcap.spice.spice").__file__).parent / "spice-1.0.jar"
    clips = [{"image_id": i, "test": hyp, "refs": list(refs)} for i, (refs, hyp) in
             enumerate(zip(ref_tokens, hyp_tokens))]
    with tempfile.TemporaryDirectory(prefix="qwenaudio-spice-") as work:
        source, out = Path(work) / "in.json", Path(work) / "out.json"
        source.write_text(json.dumps(clips, indent=2))
        command = ["java", "-jar", "-Xmx8G", str(jar), str(source), "-cache", str(Path(work) / "cache"),
                   "-out", str(out), "-subset", "-silent"]
        done = subprocess.run(command, cwd=work, check=False)
        if done.returncode:
            raise MetricUnavailableError(f"SPICE failed (java exit status {done.returncode}, its message above); it "
                                         "needs Java 8 or 11 and 8 GB of memory")
        results = json.loads(out.read_text())
    return float(sum(_float(r["scores"]["All"]["f"]) for r in results) / len(results))


def _float(value: Any) -> float:
    """As pycocoevalcap's `Spice.float_convert`: a value that is not a number is NaN."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# -- Qwen2-Audio (QwenLM/Qwen2-Audio eval_audio/ at 595360e): ASR normalised before counting. Its other scores are
# the functions above: `bleu` with the target language taken from the source name (`covost2_target`), `accuracy`
# of the replies with leading whitespace removed (evaluate_emotion.py, evaluate_vocal_sound.py).

QWEN2_ASR_LANGUAGES = ("en", "zh", "yue", "fr")  # evaluate_asr.py's datasets' languages
CHARACTER_LANGUAGES = ("zh", "yue")  # scored by characters
# What the `whisper-normalizer` package (a copy of openai/whisper's normalizers, which the official scripts also copy)
# adds to Whisper's English contractions; removed here, so that the rest is the official table in its order.
WHISPER_NORMALIZER_ADDITIONS = (r"\bkinda\b", r"\bsorta\b", r"\bdunno\b", r"\bcause\b")


@functools.cache
def whisper_normalizers() -> tuple[Callable[[str], str], Callable[[str], str]]:
    """Whisper's `EnglishTextNormalizer()` and `BasicTextNormalizer()`, the two the official ASR scoring builds,
    from the `eval` extra's whisper-normalizer package (0.1.15: its number, spelling and basic normalizers are
    Whisper's code; its English contraction table has four entries more, dropped here)."""
    english = _package("whisper_normalizer.english").EnglishTextNormalizer()
    english.replacers = {k: v for k, v in english.replacers.items() if k not in WHISPER_NORMALIZER_ADDITIONS}
    return english, _package("whisper_normalizer.basic").BasicTextNormalizer()


def _check_qwen2_language(language: str) -> None:
    if not isinstance(language, str) or language not in QWEN2_ASR_LANGUAGES:
        raise InputError(f"language must be one of {QWEN2_ASR_LANGUAGES}, got {language!r}")


def qwen2_remove_sp(text: str, language: str) -> str:
    """Qwen2-Audio's `remove_sp`, the same function as Qwen-Audio's (`remove_sp`) over its four languages: only
    Chinese ("zh", not "yue") loses all whitespace."""
    _text(text, "text")
    _check_qwen2_language(language)
    return _remove_sp(text, language)


def qwen2_normalize(text: str, language: str) -> str:
    """`text` (after `remove_sp`) as the official `compute_wer` normalises it, in its order: Cantonese converted to
    simplified Chinese (zhconv), English through Whisper's English normalizer, then Chinese through speechio's
    (`chinese_tn.normalize`) and every other language through Whisper's basic one: English goes through both
    Whisper normalizers, as the official if / if-else chain does."""
    _text(text, "text")
    _check_qwen2_language(language)
    if language == "yue":
        text = _package("zhconv").convert(text, "zh-cn")
    if language == "en":
        text = whisper_normalizers()[0](text)
    return chinese_tn.normalize(text) if language == "zh" else whisper_normalizers()[1](text)


def remove_punctuation(text: str) -> str:
    """The official `EvaluationTokenizer.remove_punctuation`: the text split at single spaces, each piece made only of
    Unicode punctuation (P*) dropped, an empty piece included (so runs of spaces shrink), joined by single spaces."""
    return " ".join(t for t in text.split(" ") if not all(unicodedata.category(c)[0] == "P" for c in t))


def qwen2_asr_items(text: str, language: str) -> list[str]:
    """The units the official Qwen2-Audio WER counts in a raw reference or reply: `remove_sp`, `qwen2_normalize`,
    `EvaluationTokenizer(tokenizer_type="none", lowercase=True, punctuation_removal=True)`, split on whitespace;
    for Chinese and Cantonese, the characters of the words joined."""
    words = remove_punctuation(qwen2_normalize(qwen2_remove_sp(text, language), language)).lower().split()
    return list("".join(words)) if language in CHARACTER_LANGUAGES else words


def qwen2_asr_counts(ref: str, hyp: str, language: str) -> tuple[int, int]:
    """(edit distance, reference length) of one raw reference and reply in `qwen2_asr_items`, the two numbers the
    official `compute_wer` adds up over a source (it counts with `editdistance.eval`, the same Levenshtein
    distance)."""
    ref_items = qwen2_asr_items(ref, language)
    return edit_distance(ref_items, qwen2_asr_items(hyp, language)), len(ref_items)


def qwen2_error_rate(refs: Sequence[str], hyps: Sequence[str], language: str) -> float:
    """Word (en, fr) or character (zh, yue) error rate of one source's raw references and replies, as Qwen2-Audio's
    evaluate_asr.py scores it (`remove_sp` then `compute_wer`): the summed `qwen2_asr_counts`.

    Where the official function crashes: a source whose first reference has no items (IndexError while printing a
    debug line) counts it as zero length, as it counts any later one; references without a single item in total
    (ZeroDivisionError) and lists of different lengths are InputError."""
    _check_qwen2_language(language)
    _check_pairs(_texts(refs, "refs"), _texts(hyps, "hyps"))
    counts = [qwen2_asr_counts(ref, hyp, language) for ref, hyp in zip(refs, hyps)]
    errors, length = sum(c[0] for c in counts), sum(c[1] for c in counts)
    if length == 0:
        unit = "characters" if language in CHARACTER_LANGUAGES else "words"
        raise InputError(f"the {len(refs)} references hold no {unit}: an error rate over them is undefined")
    return errors / length


def covost2_target(source: str) -> str:
    """The target language Qwen2-Audio's evaluate_st.py reads from a source name: its second-last "_"-separated
    part, as written ("covost2_en_de_test" -> "de"); `bleu_tokenizer` maps it to sacreBLEU's tokenizer."""
    parts = _text(source, "source").split("_")
    if len(parts) < 2:
        raise InputError(f"source {source!r} has no '_'-separated target language (as in covost2_en_de_test)")
    return parts[-2]


__getattr__ = renamed(__name__, {"LANGUAGES": ("scoring.SCORED_LANGUAGES", SCORED_LANGUAGES)})  # one name, one meaning
