"""The evaluation scoring against the official scripts' functions, recorded on fixed inputs into
tests/golden/scoring_official.json by tests/golden/record_scoring.py and tests/golden/note_scoring_official.json by
tests/golden/record_note_scoring.py, the edit distance against a plain recursive definition and average precision
against a direct transcription of its definition. Where the official code crashes, the defined result is checked
against what the official code returns on the same examples arranged so that it does not crash."""

import json
from functools import cache

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qwenaudio import scoring
from qwenaudio.core.errors import InputError
from qwenaudio.scoring import (
    NO_NUMBER,
    accuracy,
    average_precision,
    average_shift,
    chroma_accuracy,
    edit_distance,
    error_rate,
    evaluation_tokens,
    group_by_source,
    note_info,
    note_scores,
    remove_sp,
    sonic_labels,
    sonic_map,
    yes_no_accuracy,
)

from .conftest import GOLDEN

OFFICIAL = json.loads((GOLDEN / "scoring_official.json").read_text(encoding="utf-8"))
WER = {case["name"]: case for case in OFFICIAL["compute_wer"]}
SHIFT = {case["name"]: case for case in OFFICIAL["average_shift"]}
ACCURACY = {case["name"]: case for case in OFFICIAL["accuracy"]}
NOTE_OFFICIAL = json.loads((GOLDEN / "note_scoring_official.json").read_text(encoding="utf-8"))
NOTES = {case["name"]: case for case in NOTE_OFFICIAL["scores"]}
NOTE_KEYS = {"instrument": "instrument", "velocity": "velocity", "sonic": "sonic", "top1": "pitch", "chroma": "chroma"}


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


@pytest.mark.parametrize("case", NOTE_OFFICIAL["note_info"], ids=lambda c: repr(c["text"])[:40])
def test_note_info_matches_official(case):
    info = note_info(case["text"])
    assert info._asdict() == case["out"]
    assert sonic_labels(info.sonic) == case["sonic_labels"]


@pytest.mark.parametrize("case", [c for c in NOTE_OFFICIAL["scores"] if c["name"] != "empty"], ids=lambda c: c["name"])
def test_note_scores_match_official(case):
    """Every score the official script gives; where its sonic mAP raises ValueError (no known label in the group),
    ours is None and the other scores still match."""
    ours = note_scores(case["refs"], case["hyps"])
    for official_key, key in NOTE_KEYS.items():
        official = case[official_key]
        if "raises" in official:
            assert (official_key, official["raises"]) == ("sonic", "ValueError") and ours[key] is None
        else:
            assert ours[key] == pytest.approx(official["value"], abs=1e-12, rel=0), key


def test_note_scores_official_quirks_are_kept():
    """Chroma by place in the sorted pitches, not by semitones; two unreadable pitches agree; a label only replies
    have scores 0."""
    by_place = NOTES["chroma_by_position"]
    assert by_place["chroma"]["value"] == 1.0 and note_scores(by_place["refs"], by_place["hyps"])["chroma"] == 1.0
    assert chroma_accuracy([40, 41], [52, 41]) == NOTES["chroma_octave_missed"]["chroma"]["value"] == 0.5
    assert note_info("garbage").pitch == NO_NUMBER and NOTES["missing_both_sides"]["top1"]["value"] == 1.0
    assert sonic_map([[], []], [["dark"], []]) == NOTES["one_label_only_in_replies"]["sonic"]["value"] == 0.0


def test_note_scores_bad_input():
    """An empty group makes every official score raise (ValueError, ZeroDivisionError); here it is one InputError."""
    assert {key: NOTES["empty"][key].get("raises") for key in NOTE_KEYS} == {
        "instrument": "ValueError", "velocity": "ValueError", "sonic": "ValueError",
        "top1": "ZeroDivisionError", "chroma": "ZeroDivisionError"}
    with pytest.raises(InputError, match="no examples"):
        note_scores([], [])
    with pytest.raises(InputError, match="2 references but 1 replies"):
        note_scores(["", ""], [""])
    with pytest.raises(InputError, match="mean average precision is undefined"):
        sonic_map([[]], [[]])
    with pytest.raises(InputError, match="2 labels, 1 scores"):
        average_precision([True, False], [1.0])
    with pytest.raises(InputError, match="0 labels, 0 scores"):
        average_precision([], [])


def reference_average_precision(truth, scores) -> float:
    """The definition read literally: sum over distinct thresholds t, highest first, of precision(t) times
    recall(t) - recall(previous t), counting every example with score >= t; 0 without positives."""
    positives = sum(truth)
    total = before = 0
    for t in sorted(set(scores), reverse=True):
        kept = [y for y, s in zip(truth, scores) if s >= t]
        total += (sum(kept) / positives - before) * sum(kept) / len(kept) if positives else 0
        before = sum(kept) / positives if positives else 0
    return total


@given(st.lists(st.tuples(st.booleans(), st.sampled_from([0.0, 0.25, 0.5, 1.0])), min_size=1, max_size=12))
def test_average_precision_matches_definition(pairs):
    truth, scores = [t for t, _ in pairs], [s for _, s in pairs]
    assert average_precision(truth, scores) == pytest.approx(reference_average_precision(truth, scores), abs=1e-12)


@pytest.mark.parametrize("call, message", [
    (lambda: scoring.remove_sp(123, "en"), "text must be a str"),
    (lambda: scoring.remove_sp("a", 1), "language must be one of"),
    (lambda: scoring.evaluation_tokens(None, "en"), "text must be a str"),
    (lambda: scoring.edit_distance(1, [2]), "compares two sequences"),
    (lambda: scoring.error_rate("abc", ["a", "b", "c"], "en"), "refs must be a list"),
    (lambda: scoring.error_rate([1], ["a"], "en"), r"refs\[0\] must be a str"),
    (lambda: scoring.average_shift(["a"], [None]), r"hyps\[0\] must be a str"),
    (lambda: scoring.accuracy(3, [3]), "refs must be a list"),
    (lambda: scoring.yes_no_accuracy([1], ["yes"]), r"refs\[0\] must be a str"),
    (lambda: scoring.group_by_source("abc"), "takes a list of examples"),
    (lambda: scoring.group_by_source([1]), "example 0 must be a dict"),
    (lambda: scoring.note_info(b"<|pitch|>"), "text must be a str"),
    (lambda: scoring.sonic_labels(None), "sonic must be a str"),
    (lambda: scoring.average_precision([True], ["1"]), "every score must be a number"),
    (lambda: scoring.sonic_map([1], [["bright"]]), r"refs\[0\] must be a list"),
    (lambda: scoring.chroma_accuracy([60.5], [60]), "every one must be an int"),
    (lambda: scoring.note_scores([None], ["x"]), r"refs\[0\] must be a str"),
    (lambda: scoring.bleu(["a"], ["a"], 7), "target_language must be a str"),
    (lambda: scoring.bleu_tokenizer(None), "target_language must be a str"),
    (lambda: scoring.caption_scores([["a dog"]], [3]), r"hyps\[0\] must be a str"),
    (lambda: scoring.caption_scores([[3]], ["a"]), r"refs\[0\]\[0\] must be a str"),
    (lambda: scoring.unreadable_notes("x"), "refs must be a list"),
])
def test_wrong_types_raise_the_library_s_own_error(call, message):
    """Every public scoring function refuses a wrong-typed argument with InputError (a QwenAudioError), never a
    TypeError or AttributeError from deep inside."""
    with pytest.raises(InputError, match=message):
        call()


def test_malformed_note_references_warn_and_keep_the_official_scores():
    """References in another tag format read no pitch, velocity or instrument, so a gibberish reply "agrees" with
    them and scores 1.0, as the official scoring gives; a warning says so and how many."""
    refs = ["pitch: 60, velocity: 100, instrument: keyboard", "<|pitch|><|midi_pitch_60|>"]
    with pytest.warns(UserWarning, match=r"2 of 2 note references lack a readable pitch, velocity or instrument"):
        scores = scoring.note_scores(refs, ["gibberish", "<|pitch|><|midi_pitch_60|>"])
    assert scores["instrument"] == scores["velocity"] == scores["pitch"] == 1.0  # the official quirk, kept
    assert scoring.unreadable_notes([*refs, "<|pitch|><|midi_pitch_1|><|velocity|><|midi_velocity_2|>"
                                            "<|instrument|>bass"]) == [0, 1]


def test_the_old_name_of_the_scored_languages_warns_and_still_works():
    with pytest.warns(DeprecationWarning, match="scoring.LANGUAGES is deprecated; use scoring.SCORED_LANGUAGES"):
        assert scoring.LANGUAGES is scoring.SCORED_LANGUAGES == ("en", "zh")
    with pytest.raises(AttributeError, match="module 'qwenaudio.scoring' has no attribute 'LANGUAGE'"):
        scoring.LANGUAGE
