"""The evaluation benchmarks' scoring, computed as the official Qwen-Audio scripts compute it.

The official repository scores each benchmark in its own script (eval_audio/evaluate_*.py at QwenLM/Qwen-Audio):
word or character error rate for ASR, an average timestamp shift for speech recognition with word timestamps (SRWT),
and exact-match accuracy for audio question answering (AQA), speech emotion (SER), vocal sound (VSC) and acoustic
scene (ASC) classification. Each script decodes the reply with its special tokens kept, strips surrounding
whitespace, groups the examples by their `source` field and scores every group on its own. This module is those
metrics and nothing else, in plain Python so that scoring needs no editdistance, edit_distance or scikit-learn.
tests/test_scoring.py checks every function against the official functions' outputs on fixed inputs, recorded by
tests/golden/record_scoring.py. The `qwenaudio evaluate` command that will run the benchmarks on top of this module
does not exist yet.

Where the official code crashes, these functions give a defined result instead; each docstring says where.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from itertools import pairwise
from typing import Any

from .core.errors import InputError

LANGUAGES = ("en", "zh")  # the ASR benchmarks' languages: English is scored by words, Chinese by characters
PUNCTUATION = "!,.?;:"  # marks that `remove_sp` pulls onto the word before them
YES_NO = ("yes", "no")

_TAG = re.compile(r"<\|.*?\|>")
_SPACE_BEFORE_PUNCTUATION = re.compile(rf" ?([{re.escape(PUNCTUATION)}])")
_TIMESTAMP = re.compile(r"<\|\d{1,2}\.\d+\|>")  # one or two digits before the point: <|100.00|> is not a time


def _check_language(language: str) -> None:
    if language not in LANGUAGES:
        raise InputError(f"language must be one of {LANGUAGES}, got {language!r}")


def _check_pairs(refs: Sequence[str], hyps: Sequence[str]) -> None:
    if len(refs) != len(hyps):
        raise InputError(f"{len(refs)} references but {len(hyps)} replies: they must pair up one to one")
    if not refs:
        raise InputError("no examples to score")


def remove_sp(text: str, language: str) -> str:
    """`text` with every `<|...|>` tag turned into a space, whitespace runs collapsed to one space, the space before
    each of `PUNCTUATION` dropped and leading spaces removed; for Chinese, all whitespace removed. A trailing space
    is kept (English), as in the official function of the same name; scoring splits on whitespace, so it is harmless."""
    _check_language(language)
    text = re.sub(r"\s+", " ", _TAG.sub(" ", text))
    text = _SPACE_BEFORE_PUNCTUATION.sub(r"\1", text).lstrip(" ")
    return re.sub(r"\s+", "", text) if language == "zh" else text


def evaluation_tokens(text: str, language: str) -> list[str]:
    """The units an error rate counts: lowercased whitespace-separated words for English, the characters left after
    dropping whitespace for Chinese. This is what the official `EvaluationTokenizer` does with the settings the
    scripts use (no sacreBLEU tokenization, lowercasing, punctuation kept), followed by the scripts' split."""
    _check_language(language)
    words = text.lower().split()
    return list("".join(words)) if language == "zh" else words


def edit_distance(a: Sequence[Any], b: Sequence[Any]) -> int:
    """The Levenshtein distance: the fewest insertions, deletions and substitutions (each costing 1) from a to b."""
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
    _check_pairs(refs, hyps)
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
    for index, example in enumerate(examples):
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
    _check_pairs(refs, hyps)
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


def accuracy(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """The share of replies equal to their reference, character for character: the official AQA, SER, VSC and ASC
    scripts compare the stripped decoded reply with no normalisation, so a different case, a trailing "." or a tag
    left in the reply counts as wrong. Empty or unequal lists: InputError (scikit-learn raises ValueError)."""
    _check_pairs(refs, hyps)
    return sum(ref == hyp for ref, hyp in zip(refs, hyps)) / len(refs)


def yes_no_accuracy(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """`accuracy` over the examples whose reference is "yes" or "no" in any case, the second score the official AQA
    script reports for Clotho-AQA sources. No such example: InputError (scikit-learn raises ValueError)."""
    _check_pairs(refs, hyps)
    kept = [(ref, hyp) for ref, hyp in zip(refs, hyps) if ref.lower() in YES_NO]
    if not kept:
        raise InputError(f"none of the {len(refs)} references is yes or no")
    return accuracy(*zip(*kept))
