"""Qwen2-Audio's scoring against the official functions' outputs on fixed inputs, recorded into
tests/golden/qwen2_scoring_official.json by tests/golden/record_qwen2_scoring.py (QwenLM/Qwen2-Audio eval_audio/ at
595360e): each normalizer, the evaluation tokenizer, the items a text is counted in, the corpus WER per source, the
S2TT BLEU and the classification accuracy. Where the official code crashes, the defined result is checked against
what it returns on the same examples arranged so that it does not crash."""

import importlib
import json

import pytest

from qwenaudio import chinese_tn, scoring
from qwenaudio.core.errors import InputError, MetricUnavailableError

from .conftest import GOLDEN, missing_reference

OFFICIAL = json.loads((GOLDEN / "qwen2_scoring_official.json").read_text(encoding="utf-8"))
WER = {case["name"]: case for case in OFFICIAL["compute_wer"]}


def needs(module: str, pip: str) -> None:
    """Skip (fail under CI) unless the `eval` extra's `module` is installed."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError:
        missing_reference(f"{pip} (the eval extra)")


@pytest.fixture
def normalizers():
    needs("whisper_normalizer", "whisper-normalizer")
    needs("zhconv", "zhconv")


def text_id(case: dict) -> str:
    return f"{case.get('language', '')}:{case['text']!r:.40}"


def test_the_golden_was_recorded_from_the_official_code():
    header = OFFICIAL["header"]
    assert "QwenLM/Qwen2-Audio eval_audio/ @ 595360e82b5839c1507492ec83cae5bda6d5c7d4" in header["code"]
    assert header["versions"]["sacrebleu"] == "1.5.1" and header["script"] == "tests/golden/record_qwen2_scoring.py"


@pytest.mark.parametrize("case", OFFICIAL["remove_sp"], ids=text_id)
def test_remove_sp_matches_official(case):
    assert scoring.qwen2_remove_sp(case["text"], case["language"]) == case["out"]


@pytest.mark.parametrize("case", OFFICIAL["chinese"], ids=text_id)
def test_the_chinese_normalizer_matches_speechio_s_as_the_script_builds_it(case):
    assert chinese_tn.normalize(case["text"]) == case["value"]


@pytest.mark.parametrize("case", OFFICIAL["english"], ids=text_id)
def test_the_english_normalizer_matches_whisper_s(case, normalizers):
    assert scoring.whisper_normalizers()[0](case["text"]) == case["value"]


@pytest.mark.parametrize("case", OFFICIAL["basic"], ids=text_id)
def test_the_basic_normalizer_matches_whisper_s(case, normalizers):
    assert scoring.whisper_normalizers()[1](case["text"]) == case["value"]


def test_the_four_contractions_the_package_adds_are_dropped(normalizers):
    """whisper-normalizer 0.1.15 turns "kinda" into "kind of"; Whisper's (and so the official) table does not."""
    english = scoring.whisper_normalizers()[0]
    assert english("I kinda dunno 'cause") == "i kinda dunno cause"
    assert not set(scoring.WHISPER_NORMALIZER_ADDITIONS) & set(english.replacers)
    fresh = importlib.import_module("whisper_normalizer.english").EnglishTextNormalizer()
    assert set(fresh.replacers) - set(english.replacers) == set(scoring.WHISPER_NORMALIZER_ADDITIONS)


@pytest.mark.parametrize("case", OFFICIAL["zhconv"], ids=text_id)
def test_cantonese_is_converted_as_zhconv_converts_it(case, normalizers):
    assert scoring.qwen2_normalize(case["text"], "yue") == scoring.whisper_normalizers()[1](case["value"])


@pytest.mark.parametrize("case", OFFICIAL["tokenize"], ids=text_id)
def test_the_evaluation_tokenizer_with_punctuation_removal_matches_official(case):
    assert scoring.remove_punctuation(case["text"]).lower() == case["value"]


@pytest.mark.parametrize("case", OFFICIAL["items"], ids=text_id)
def test_the_items_a_text_is_counted_in_match_official(case, normalizers):
    """The official compute_wer prints the first reference's items; it raises IndexError there when it has none."""
    ours = scoring.qwen2_asr_items(case["text"], case["language"])
    assert ours == case["value"] if "value" in case else (ours == [] and case["raises"] == "IndexError")


@pytest.mark.parametrize("name", [n for n, c in WER.items() if "value" in c])
def test_the_error_rate_matches_official(name, normalizers):
    case = WER[name]
    assert scoring.qwen2_error_rate(case["refs"], case["hyps"], case["language"]) == case["value"]


def test_a_first_reference_without_items_counts_zero_as_official_counts_it_later(normalizers):
    """The official function raises IndexError printing the first reference's first item; ours counts it as it
    counts the same reference in second place (en_fillers_only_later: 0.5)."""
    for name in ("en_first_ref_empty", "en_first_ref_fillers", "zh_first_ref_empty"):
        assert WER[name]["raises"] == "IndexError"
    case = WER["en_first_ref_fillers"]
    swapped = scoring.qwen2_error_rate(case["refs"][::-1], case["hyps"][::-1], "en")
    assert scoring.qwen2_error_rate(case["refs"], case["hyps"], "en") == swapped == 0.0
    empty = WER["en_first_ref_empty"]  # the reply "x" to the empty reference adds an error, no length
    assert scoring.qwen2_error_rate(empty["refs"], empty["hyps"], "en") == 0.5
    assert scoring.qwen2_error_rate(["", "中文"], ["", "中文"], "zh") == 0.0


def test_undefined_rates_and_unpaired_lists_are_refused(normalizers):
    assert WER["empty_lists"]["raises"] == "ZeroDivisionError"
    with pytest.raises(InputError, match="no examples"):
        scoring.qwen2_error_rate([], [], "en")
    with pytest.raises(InputError, match="hold no words"):
        scoring.qwen2_error_rate(["uh", "!"], ["a", "b"], "en")
    with pytest.raises(InputError, match="2 references but 1 replies"):
        scoring.qwen2_error_rate(["a", "b"], ["a"], "en")
    with pytest.raises(InputError, match="language must be one of"):
        scoring.qwen2_asr_items("a", "de")


def test_per_example_counts_add_up_to_the_source_s_rate(normalizers):
    case = WER["fr_basic"]
    counts = [scoring.qwen2_asr_counts(r, h, "fr") for r, h in zip(case["refs"], case["hyps"])]
    assert sum(e for e, _ in counts) / sum(n for _, n in counts) == case["value"]


@pytest.mark.parametrize("case", OFFICIAL["bleu"], ids=lambda c: c["name"])
def test_bleu_per_source_matches_the_official_script(case):
    needs("sacrebleu", "sacrebleu")
    target = scoring.covost2_target(case["source"])
    assert scoring.bleu_tokenizer(target) == case["tokenize"]
    assert scoring.bleu(case["refs"], case["hyps"], target) == case["value"]


def test_a_source_without_a_target_language_is_refused():
    with pytest.raises(InputError, match="no '_'-separated target language"):
        scoring.covost2_target("covost2")


@pytest.mark.parametrize("case", OFFICIAL["accuracy"], ids=lambda c: c["name"])
def test_accuracy_of_lstripped_replies_matches_official(case):
    assert scoring.accuracy(case["refs"], [h.lstrip() for h in case["hyps"]]) == case["value"]


def test_a_missing_normalizer_package_says_how_to_install_it(monkeypatch):
    scoring.whisper_normalizers.cache_clear()
    real = importlib.import_module

    def missing(name, *args):
        if name.startswith("whisper_normalizer"):
            raise ModuleNotFoundError(f"No module named {name!r}", name="whisper_normalizer")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", missing)
    try:
        with pytest.raises(MetricUnavailableError, match=r"pip install 'qwenaudio\[eval\]'"):
            scoring.qwen2_asr_items("a", "en")
    finally:
        scoring.whisper_normalizers.cache_clear()
