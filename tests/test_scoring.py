"""The evaluation scoring against the official scripts' functions, recorded on fixed inputs into
tests/golden/scoring_official.json by tests/golden/record_scoring.py, and the edit distance against a plain recursive
definition. Where the official code crashes, the defined result is checked against what the official code returns on
the same examples arranged so that it does not crash."""

import json
from functools import cache

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qwenaudio.core.errors import InputError
from qwenaudio.scoring import (
    accuracy,
    average_shift,
    edit_distance,
    error_rate,
    evaluation_tokens,
    group_by_source,
    remove_sp,
    yes_no_accuracy,
)

from .conftest import GOLDEN

OFFICIAL = json.loads((GOLDEN / "scoring_official.json").read_text(encoding="utf-8"))
WER = {case["name"]: case for case in OFFICIAL["compute_wer"]}
SHIFT = {case["name"]: case for case in OFFICIAL["average_shift"]}
ACCURACY = {case["name"]: case for case in OFFICIAL["accuracy"]}


def clean_error_rate(case: dict) -> float:
    """`error_rate` on the case's lists after `remove_sp`, the way the official script calls `compute_wer`."""
    lang = case["language"]
    return error_rate([remove_sp(r, lang) for r in case["refs"]], [remove_sp(h, lang) for h in case["hyps"]], lang)


@pytest.mark.parametrize("case", OFFICIAL["remove_sp"], ids=lambda c: f"{c['language']}:{c['text']!r}")
def test_remove_sp_matches_official(case):
    assert remove_sp(case["text"], case["language"]) == case["out"]


@pytest.mark.parametrize("case", OFFICIAL["tokenize"], ids=lambda c: repr(c["text"]))
def test_evaluation_tokens_match_official_tokenizer_and_split(case):
    words = case["out"].split()
    assert evaluation_tokens(case["text"], "en") == words
    assert evaluation_tokens(case["text"], "zh") == list("".join(words))


@pytest.mark.parametrize("case", [c for c in OFFICIAL["compute_wer"] if "value" in c], ids=lambda c: c["name"])
def test_error_rate_matches_official(case):
    assert clean_error_rate(case) == pytest.approx(case["value"], abs=1e-12, rel=0)


def test_error_rate_where_official_raises_index_error():
    """A first reference empty after clean-up crashes `compute_wer`; ours counts it as zero length, which gives the
    official value for the same lists with that reference moved away from the front."""
    assert {c["name"]: c.get("raises") for c in OFFICIAL["compute_wer"] if "raises" in c} == {
        "en_first_ref_empty": "IndexError", "en_first_ref_tags_only": "IndexError",
        "zh_first_ref_empty": "IndexError", "empty_lists": "ZeroDivisionError"}
    assert clean_error_rate(WER["en_first_ref_empty"]) == WER["en_first_ref_empty_moved"]["value"]
    assert clean_error_rate(WER["en_first_ref_tags_only"]) == 0.0  # "" vs "" and "a" vs "a"
    assert clean_error_rate(WER["zh_first_ref_empty"]) == 0.0  # "" vs "" and 中文 vs 中文
    with pytest.raises(InputError, match="no examples"):
        clean_error_rate(WER["empty_lists"])


def test_error_rate_bad_input():
    with pytest.raises(InputError, match="hold no words"):
        error_rate(["", " "], ["a", ""], "en")
    with pytest.raises(InputError, match="hold no characters"):
        error_rate([""], ["中"], "zh")
    with pytest.raises(InputError, match="2 references but 1 replies"):
        error_rate(["a", "b"], ["a"], "en")
    with pytest.raises(InputError, match="language must be one of"):
        error_rate(["a"], ["a"], "fr")
    with pytest.raises(InputError, match="language must be one of"):
        remove_sp("a", "EN")


@pytest.mark.parametrize("case", [c for c in OFFICIAL["average_shift"] if "value" in c and c["name"] != "misaligned"],
                         ids=lambda c: c["name"])
def test_average_shift_matches_official(case):
    assert average_shift(case["refs"], case["hyps"]) == pytest.approx(case["value"], abs=1e-12, rel=0)


def test_average_shift_where_official_fails():
    """A reply without timestamps stops the official calculator on an assertion, and an example dropped on each side
    at different places makes it pair unrelated examples; ours leaves such examples out, which gives the official
    value on the remaining examples."""
    assert {c["name"]: c.get("raises") for c in OFFICIAL["average_shift"] if "raises" in c} == {
        "all_skipped": "ZeroDivisionError", "reply_without_timestamps": "AssertionError",
        "reply_without_timestamps_among_others": "AssertionError"}
    among = SHIFT["reply_without_timestamps_among_others"]
    assert average_shift(among["refs"], among["hyps"]) == SHIFT["reply_without_timestamps_left_out"]["value"]
    misaligned = SHIFT["misaligned"]
    ours = average_shift(misaligned["refs"], misaligned["hyps"])
    assert ours == SHIFT["misaligned_left_out"]["value"] != pytest.approx(misaligned["value"])
    for name in ("all_skipped", "reply_without_timestamps"):
        with pytest.raises(InputError, match="average shift is undefined"):
            average_shift(SHIFT[name]["refs"], SHIFT[name]["hyps"])
    with pytest.raises(InputError, match="1 references but 2 replies"):
        average_shift(["<|0.00|>a<|1.00|>"], ["<|0.00|>a<|1.00|>"] * 2)


@pytest.mark.parametrize("metric", [accuracy, yes_no_accuracy], ids=lambda f: f.__name__)
@pytest.mark.parametrize("case", OFFICIAL["accuracy"], ids=lambda c: c["name"])
def test_accuracy_matches_official(case, metric):
    """Official ValueErrors (no examples, no yes/no reference) are InputErrors here, which are ValueErrors too."""
    official = case[metric.__name__]
    if "raises" in official:
        assert official["raises"] == "ValueError"
        with pytest.raises(InputError):
            metric(case["refs"], case["hyps"])
    else:
        assert metric(case["refs"], case["hyps"]) == official["value"]


def test_accuracy_unequal_lists():
    with pytest.raises(InputError, match="3 references but 2 replies"):
        accuracy(["a", "b", "c"], ["a", "b"])


def test_group_by_source_keeps_first_appearance_order():
    examples = [{"source": "b", "i": 0}, {"source": "a", "i": 1}, {"source": "b", "i": 2}]
    groups = group_by_source(examples)
    assert list(groups) == ["b", "a"]
    assert [e["i"] for e in groups["b"]] == [0, 2] and [e["i"] for e in groups["a"]] == [1]
    with pytest.raises(InputError, match="example 1 has no 'source' field"):
        group_by_source([{"source": "a"}, {"gt": "x"}])


def reference_distance(a, b) -> int:
    """The edit distance by its recursive definition."""
    @cache
    def d(i: int, j: int) -> int:
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))
    return d(len(a), len(b))


small_lists = st.lists(st.sampled_from("abc"), max_size=8)


@given(small_lists, small_lists)
def test_edit_distance_matches_definition(a, b):
    assert edit_distance(a, b) == reference_distance(a, b) == edit_distance(b, a)


@given(st.lists(st.lists(st.sampled_from("甲乙丙"), min_size=1, max_size=5), min_size=1, max_size=4))
def test_average_shift_of_identical_timings_is_zero(utterances):
    texts = []
    for words in utterances:
        stamps = [f"<|{t / 10:.2f}|>" for t in range(len(words) + 1)]
        texts.append(stamps[0] + "".join(w + s for w, s in zip(words, stamps[1:])))
    assert average_shift(texts, texts) == 0.0
