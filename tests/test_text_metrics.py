"""Speech-translation BLEU and audio-caption scores against the official scripts' outputs, recorded on fixed inputs
into tests/golden/text_metrics_official.json by tests/golden/record_text_metrics.py (sacreBLEU 1.5.1 as the
official evaluation pins it; the caption code of evaluate_caption.py with caption-evaluation-tools). SPICE could not
run where that file was recorded, so SPICE's wiring is checked with a stand-in scorer. Where the official code
crashes or pairs a reply with the wrong clip, the defined result is checked against what the official code returns
on the same examples arranged so that it does not."""

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qwenaudio.core.errors import InputError, MetricUnavailableError
from qwenaudio.scoring import bleu, bleu_tokenizer, caption_scores, coco_tokenize, spice_score, spice_unavailable

from .conftest import GOLDEN, reference, reference_program

OFFICIAL = json.loads((GOLDEN / "text_metrics_official.json").read_text(encoding="utf-8"))
BLEU = {case["name"]: case for case in OFFICIAL["bleu"]}
CAPTION = {case["name"]: case for case in OFFICIAL["caption"]}
TOLERANCE = 1e-9


def target_language(case: dict) -> str:
    return case["source"].split("_")[-2]  # as the official script reads it


def official_bleu_packages(case: dict) -> None:
    reference("sacrebleu")
    if target_language(case) == "ja":
        reference("MeCab")
        reference("ipadic")


def caption_packages() -> None:
    reference("pycocoevalcap")
    reference_program("java")


@pytest.mark.parametrize("case", OFFICIAL["bleu"], ids=lambda c: c["name"])
def test_bleu_tokenizer_matches_official(case):
    assert bleu_tokenizer(target_language(case)) == case["tokenize"]


@pytest.mark.parametrize("case", [c for c in OFFICIAL["bleu"] if "value" in c], ids=lambda c: c["name"])
def test_bleu_matches_official(case):
    official_bleu_packages(case)
    assert bleu(case["refs"], case["hyps"], target_language(case)) == pytest.approx(case["value"], abs=TOLERANCE)


def test_bleu_keeps_official_smoothing_without_any_match():
    """sacreBLEU 2 scores a group without a single matching n-gram 0.0; the official 1.5.1 does not."""
    sacrebleu = reference("sacrebleu")
    case = BLEU["no_match_long"]
    assert case["value"] > 0.5
    if int(sacrebleu.__version__.split(".")[0]) >= 2:
        assert sacrebleu.corpus_bleu(case["hyps"], [case["refs"]]).score == 0.0
    assert bleu(case["refs"], case["hyps"], "en") == pytest.approx(case["value"], abs=TOLERANCE)


def test_bleu_where_official_raises():
    """An empty reference stops sacreBLEU 1.5.1 (EOFError); ours scores it as a reference of no words, which is the
    official score of the same group with a reference of one space."""
    reference("sacrebleu")
    assert BLEU["empty_reference"]["raises"] == "EOFError"
    case, spaced = BLEU["empty_reference"], BLEU["space_reference"]
    assert case["refs"][1] == "" and spaced["refs"][1] == " " and case["hyps"] == spaced["hyps"]
    assert bleu(case["refs"], case["hyps"], "en") == pytest.approx(spaced["value"], abs=TOLERANCE)


def test_bleu_bad_input():
    with pytest.raises(InputError, match="2 references but 1 replies"):
        bleu(["a", "b"], ["a"], "en")
    with pytest.raises(InputError, match="no examples"):
        bleu([], [], "de")


def test_bleu_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # makes `import sacrebleu` fail, installed or not
    with pytest.raises(MetricUnavailableError, match=r"sacrebleu is not installed: pip install 'qwenaudio\[eval\]'"):
        bleu(["a"], ["a"], "en")
    monkeypatch.undo()
    reference("sacrebleu")
    monkeypatch.setitem(sys.modules, "MeCab", None)
    with pytest.raises(MetricUnavailableError, match=r"MeCab is not installed: pip install 'sacrebleu\[ja\]'"):
        bleu(["猫"], ["猫"], "ja")


@pytest.mark.parametrize("case", [c for c in OFFICIAL["caption"] if c["name"] not in ("line_breaks_in_reply",
                                                                                     "string_references")],
                         ids=lambda c: c["name"])
def test_coco_tokenize_matches_official(case):
    caption_packages()
    assert coco_tokenize(case["refs"], case["hyps"]) == (case["tokenized_refs"], case["tokenized_hyps"])


@pytest.mark.parametrize("case", [c for c in OFFICIAL["caption"] if c["name"] not in ("line_breaks_in_reply",
                                                                                     "string_references")],
                         ids=lambda c: c["name"])
def test_caption_scores_match_official(case):
    caption_packages()
    scores = caption_scores(case["refs"], case["hyps"])
    assert scores["CIDEr"] == pytest.approx(case["CIDEr"], abs=TOLERANCE)
    if "value" in case["compute_caption"]:  # recorded where SPICE could run
        assert scores == pytest.approx(case["compute_caption"]["value"], abs=TOLERANCE)
    else:
        assert case["compute_caption"] == {"raises": "CalledProcessError"}  # SPICE's Java process, without CoreNLP
        if spice_unavailable() is not None:
            assert scores["SPICE"] is None and scores["SPIDEr"] is None


def test_caption_line_breaks_keep_replies_with_their_clips():
    """A "\\r" or U+2028 in a reply makes the official tokenizer start a new line, so each later reply is scored
    against the clip before it; ours gives the official result of the replies with those characters as spaces."""
    caption_packages()
    broken, replaced = CAPTION["line_breaks_in_reply"], CAPTION["line_breaks_replaced"]
    assert broken["tokenized_hyps"][1] == "as cars pass"  # the official pairing, one clip off
    assert coco_tokenize(broken["refs"], broken["hyps"])[1] == replaced["tokenized_hyps"]
    assert caption_scores(broken["refs"], broken["hyps"])["CIDEr"] == pytest.approx(replaced["CIDEr"], abs=TOLERANCE)


def test_caption_references_as_one_string_are_refused():
    """The official code takes each character of a string as one reference; ours asks for a list."""
    case = CAPTION["string_references"]
    assert case["tokenized_refs"][1][:3] == ["a", "", "d"]
    with pytest.raises(InputError, match=r"refs\[1\] is one string, not a list of reference captions"):
        caption_scores(case["refs"], case["hyps"])
    with pytest.raises(InputError, match=r"refs\[0\] holds no reference caption"):
        caption_scores([[]], ["a dog"])
    with pytest.raises(InputError, match="1 references but 2 replies"):
        caption_scores([["a dog"]], ["a dog", "a cat"])


@dataclass
class StandInSpice:
    """Stands in for SPICE's Java process (`subprocess.run` of spice-1.0.jar): records the clips it is handed and
    writes a fixed score for each, or fails with `returncode`; any other command runs for real."""

    score: float = 0.25
    returncode: int = 0
    calls: list = field(default_factory=list)

    def __call__(self, command, **kwargs):
        if "-jar" not in command:
            return REAL_RUN(command, **kwargs)
        self.calls.append((command, json.loads(Path(command[4]).read_text())))
        if not self.returncode:
            out = Path(command[command.index("-out") + 1])
            out.write_text(json.dumps([{"image_id": c["image_id"], "scores": {"All": {"f": self.score}}}
                                       for c in self.calls[-1][1]]))
        return subprocess.CompletedProcess(command, self.returncode)


REAL_RUN = subprocess.run


def test_caption_scores_hand_spice_the_official_tokens(monkeypatch):
    caption_packages()
    spice = StandInSpice()
    monkeypatch.setattr("qwenaudio.scoring.subprocess.run", spice)
    monkeypatch.setattr("qwenaudio.scoring.spice_unavailable", lambda: None)
    case = CAPTION["clotho_like"]
    scores = caption_scores(case["refs"], case["hyps"])
    [(command, clips)] = spice.calls
    assert command[:4] == ["java", "-jar", "-Xmx8G", command[3]] and command[3].endswith("spice-1.0.jar")
    assert command[5:] == ["-cache", command[6], "-out", command[8], "-subset", "-silent"]
    assert clips == [{"image_id": i, "test": hyp, "refs": refs} for i, (refs, hyp) in
                     enumerate(zip(case["tokenized_refs"], case["tokenized_hyps"]))]  # pycocoevalcap's input
    assert scores == pytest.approx({"CIDEr": case["CIDEr"], "SPICE": 0.25, "SPIDEr": (case["CIDEr"] + 0.25) / 2},
                                   abs=TOLERANCE)


def test_spice_unavailable_names_the_missing_models(monkeypatch, tmp_path):
    caption_packages()
    spice_module = reference("pycocoevalcap.spice.spice")
    monkeypatch.setattr(spice_module, "__file__", str(tmp_path / "spice.py"))
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "stanford-corenlp-3.6.0.jar").touch()
    assert spice_unavailable().startswith(f"SPICE needs Stanford CoreNLP 3.6.0 and {tmp_path / 'lib'} lacks "
                                          "stanford-corenlp-3.6.0-models.jar; pycocoevalcap downloads it with: ")
    (tmp_path / "lib" / "stanford-corenlp-3.6.0-models.jar").touch()
    assert spice_unavailable() is None


def test_spice_failure_says_what_it_needs_and_cider_is_kept(monkeypatch):
    """The official script loses CIDEr when SPICE fails; caption_scores keeps it and warns why SPICE is missing."""
    caption_packages()
    monkeypatch.setattr("qwenaudio.scoring.subprocess.run", StandInSpice(returncode=1))
    monkeypatch.setattr("qwenaudio.scoring.spice_unavailable", lambda: None)
    case = CAPTION["clotho_like"]
    with pytest.raises(MetricUnavailableError, match="SPICE failed .java exit status 1.*Java 8 or 11"):
        spice_score(*coco_tokenize(case["refs"], case["hyps"]))
    with pytest.warns(UserWarning, match="SPICE and SPIDEr not computed: SPICE failed .java exit status 1"):
        scores = caption_scores(case["refs"], case["hyps"])
    assert scores == {"CIDEr": pytest.approx(case["CIDEr"], abs=TOLERANCE), "SPICE": None, "SPIDEr": None}


def test_caption_scores_run_with_a_read_only_pycocoevalcap(monkeypatch, tmp_path):
    """pycocoevalcap's tokenizer and SPICE write temporary files beside their jars; ours run from a read-only copy
    of the package and write nothing there (an audit hook sees every file opened for writing, as root, whom the
    permissions do not stop, would not notice otherwise)."""
    caption_packages()
    import importlib
    import os
    import shutil
    import stat

    package = Path(reference("pycocoevalcap.tokenizer.ptbtokenizer").__file__).parents[1]
    copy = shutil.copytree(package, tmp_path / "pycocoevalcap", ignore=shutil.ignore_patterns("__pycache__"))
    writable = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
    for path in [copy, *copy.rglob("*")]:
        path.chmod(path.stat().st_mode & ~writable)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.split(".")[0] == "pycocoevalcap"]:
        monkeypatch.delitem(sys.modules, name)
    assert Path(importlib.import_module("pycocoevalcap.tokenizer.ptbtokenizer").__file__).parents[1] == copy
    written, watching = [], [True]

    def audit(event, args):
        if watching[0] and event == "open" and isinstance(args[0], (str, Path)) and str(args[0]).startswith(str(copy)):
            if isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                written.append(args[0])

    sys.addaudithook(audit)  # hooks cannot be removed: `watching` ends it
    case = CAPTION["clotho_like"]
    try:
        scores = caption_scores(case["refs"], case["hyps"])
    finally:
        watching[0] = False
        for path in [copy, *copy.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
    assert scores["CIDEr"] == pytest.approx(case["CIDEr"], abs=TOLERANCE) and written == []


def test_caption_scores_name_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)
    with pytest.raises(MetricUnavailableError, match=r"pycocoevalcap is not installed: pip install 'qwenaudio\[eval"):
        caption_scores([["a dog"]], ["a dog"])
    monkeypatch.undo()
    reference("pycocoevalcap")
    monkeypatch.setenv("PATH", "")
    with pytest.raises(MetricUnavailableError, match="no `java` is on PATH: install a Java runtime"):
        caption_scores([["a dog"]], ["a dog"])


def test_caption_scores_write_nothing_in_the_working_directory(monkeypatch, tmp_path):
    """The official CocoTokenizer writes tmp/ref.json and tmp/pred.json in the working directory; ours does not."""
    caption_packages()
    monkeypatch.chdir(tmp_path)
    case = CAPTION["clotho_like"]
    caption_scores(case["refs"], case["hyps"])
    assert list(tmp_path.iterdir()) == []
