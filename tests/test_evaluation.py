"""`qwenaudio evaluate`: every benchmark's prompt ids and replies against the official evaluation scripts run on the
same tiny checkpoint (tests/golden/record_evaluation.py), resuming after a kill, two processes under torchrun, and
bad data: a missing clip, a malformed line, fields that do not fit the task."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qwenaudio
from qwenaudio import evaluation
from qwenaudio.core.audio import load_audio
from qwenaudio.core.errors import InputError, QwenAudioError
from qwenaudio.core.model import prompt_batch

from .test_cli import qwenaudio_cli, torchrun_cli

GOLDEN = json.loads((Path(__file__).parent / "golden" / "evaluation_official.json").read_text(encoding="utf-8"))
REPO_ROOT = Path(__file__).resolve().parents[1]
SPEECH = "1272-128104-0000.flac"


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return qwenaudio.load(tiny_ckpt, dtype=torch.float32, device="cpu")


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def official_rows(task: str, tmp_path: Path, shared_audio: Path) -> Path:
    """The recorded rows of `task`; their audio paths are relative to the repository root, as recorded."""
    assert (REPO_ROOT / GOLDEN["tasks"][task]["rows"][0]["audio"]).resolve().parent == shared_audio.resolve()
    return write_rows(tmp_path / f"{task}.jsonl", GOLDEN["tasks"][task]["rows"])


@pytest.mark.parametrize("task", evaluation.BENCHMARKS)
def test_prompt_ids_equal_the_official_scripts(task, tokenizer, tmp_path, shared_audio):
    recorded = GOLDEN["tasks"][task]
    examples, problems = evaluation.read_benchmark(task, official_rows(task, tmp_path, shared_audio),
                                                  audio_root=REPO_ROOT)
    assert problems == [] and evaluation.BENCHMARKS[task].max_new_tokens == recorded["max_new_tokens"]
    assert [e.text for e in examples] == recorded["texts"]
    batch = prompt_batch(tokenizer, [e.text for e in examples], [[load_audio(e.path)] for e in examples])
    assert batch.input_ids.tolist() == recorded["input_ids"]
    assert batch.attention_mask.tolist() == recorded["attention_mask"]


@pytest.mark.parametrize("task", evaluation.BENCHMARKS)
def test_replies_equal_the_official_scripts(task, model, tmp_path, shared_audio):
    """The whole run (reading, batching, decoding, decoding the reply, writing): each reply equals the official
    script's on the same batch, except where the official reply holds an id its tokenizer cannot decode (it
    raises there; ours never picks one)."""
    recorded = GOLDEN["tasks"][task]
    rows = recorded["rows"]
    summary = evaluation.evaluate(model, task, official_rows(task, tmp_path, shared_audio), tmp_path / "out",
                                  audio_root=REPO_ROOT, batch_size=len(rows))
    replies = [json.loads(line) for line in (tmp_path / "out" / "examples.jsonl").read_text().splitlines()]
    assert [r["line"] for r in replies] == list(range(1, len(rows) + 1)) and summary["complete"]
    for ours, official, undecodable in zip(replies, recorded["response"], recorded["undecodable_at"]):
        if undecodable is None:
            assert ours["reply"] == official
        else:
            assert official is None and ours["reply"] != ""


def test_every_task_writes_a_summary_that_parses(model, tmp_path, shared_audio):
    for task in evaluation.BENCHMARKS:
        out = tmp_path / task
        evaluation.evaluate(model, task, official_rows(task, tmp_path, shared_audio), out, audio_root=REPO_ROOT,
                            max_new_tokens=4, batch_size=4)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["task"] == task and summary["replied"] == len(GOLDEN["tasks"][task]["rows"])
        assert all(s["scores"] for s in summary["sources"])
        assert (out / "summary.md").read_text().startswith(f"# {task}: ")


def test_scores_per_source_are_the_scoring_functions():
    records = [{"source": "clothoaqa", "reference": ref, "reply": hyp} for ref, hyp in
               [("yes", "yes"), ("No", "no"), ("glass", "glass"), ("dog", "a dog")]]
    scores, notes = evaluation.source_scores("aqa", records)
    assert scores == {"accuracy": 0.5, "yes_no_accuracy": 0.5} and notes == []
    scores, _ = evaluation.source_scores("aqa", [{**r, "source": "other"} for r in records])
    assert scores == {"accuracy": 0.5}  # the official script reports yes/no accuracy for clotho sources only
    asr = [{"source": "s", "reference": "<|en|>Hello , World.", "reply": "hello, world.", "language": "en"}]
    assert evaluation.source_scores("asr", asr) == ({"wer": 0.0}, [])
    empty = [{"source": "s", "reference": "<|en|>", "reply": "x", "language": "en"}]
    scores, notes = evaluation.source_scores("asr", empty)  # undefined: a note, not a crash
    assert scores == {"wer": None} and notes[0].startswith("wer: not computed: the 1 references hold no words")


@pytest.mark.parametrize("task, source, row", [
    ("asr", "librispeech_test_clean", "Librispeech test-clean"),
    ("asr", "LibriSpeech-dev-other", "Librispeech dev-other"),
    ("asr", "aishell1_test", "Aishell1 test"), ("asr", "aishell2_ios_test", "Aishell2 iOS"),
    ("st", "covost2_en_zh_test", "CoVoST2 en-zh"), ("st", "covost2_de_en_test", "CoVoST2 de-en"),
    ("scene", "cochlscene", "Cochlscene"), ("scene", "tut2017", "TUT2017"), ("aqa", "clothoaqa", "ClothoAQA"),
    ("note_analysis", "nsynth", "NSynth"), ("asr", "my_own_set", None), ("st", "covost2_en_ja_test", None)])
def test_sources_get_the_paper_row_they_name(task, source, row):
    found = evaluation.paper_row(task, source)
    assert (found and found[0]) == row


def test_the_language_comes_from_the_row_the_option_or_the_dataset(tmp_path, shared_audio):
    clip = str(shared_audio / SPEECH)
    data = write_rows(tmp_path / "d.jsonl", [
        {"audio": clip, "gt": "a", "source": "aishell1_test"}, {"audio": clip, "gt": "a", "source": "x", "lang": "en"},
        {"audio": clip, "gt": "a", "source": "mine"}])
    examples, problems = evaluation.read_benchmark("asr", data)
    assert [e.language for e in examples] == ["zh", "en"]
    assert examples[0].prompt == "<|startoftranscript|><|zh|><|transcribe|><|zh|><|notimestamps|><|wo_itn|>"
    assert problems == [f"{data}:3: no language: the row has no 'lang' field and its source 'mine' names no dataset "
                        "of known language (librispeech, aishell, industrial); give one (--language)"]
    examples, problems = evaluation.read_benchmark("asr", data, language="en")  # the option before the dataset
    assert [e.language for e in examples] == ["en", "en", "en"] and problems == []


def test_bad_lines_fail_alone_named_by_file_and_line(model, tmp_path, shared_audio):
    clip = str(shared_audio / SPEECH)
    data = write_rows(tmp_path / "aqa.jsonl", [
        {"audio": clip, "question": "what?", "gt": "speech", "source": "clothoaqa"},
        "{not json",
        {"audio": clip, "gt": "speech", "source": "clothoaqa"},
        {"audio": "missing.wav", "question": "q", "gt": "x", "source": "clothoaqa"},
        "",
        {"audio": clip, "question": "q", "gt": ["a", "b"], "source": "clothoaqa"},
        [1, 2],
        {"audio": clip, "question": "who?", "gt": "yes", "source": "clothoaqa"}])
    summary = evaluation.evaluate(model, "aqa", data, tmp_path / "out", max_new_tokens=2)
    assert summary["failed"] == [
        f"{data}:2: not a JSON object (Expecting property name enclosed in double quotes at column 2)",
        f"{data}:3: no 'question' field (a aqa row needs audio, gt, source, question; this one has audio, gt, source)",
        f"{data}:4: audio 'missing.wav': no such audio file",
        f"{data}:6: 'gt' must be a string, got [\"a\", \"b\"]",
        f"{data}:7: expected a JSON object, got list"]
    assert (summary["examples"], summary["replied"], summary["complete"]) == (7, 2, False)
    assert summary["sources"][0]["examples"] == 2  # the good lines are still scored
    assert "Failed examples:" in (tmp_path / "out" / "summary.md").read_text()


def test_a_clip_that_cannot_be_read_fails_alone(model, tmp_path, shared_audio):
    (tmp_path / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really")
    data = write_rows(tmp_path / "d.jsonl", [{"audio": "broken.wav", "gt": "x", "source": "meld"},
                                             {"audio": str(shared_audio / SPEECH), "gt": "x", "source": "meld"}])
    summary = evaluation.evaluate(model, "emotion", data, tmp_path / "out", audio_root=tmp_path)
    assert summary["replied"] == 1 and len(summary["failed"]) == 1
    assert summary["failed"][0].startswith(f"{data}:1: audio 'broken.wav': not a readable audio file")


def test_st_rows_need_a_language_pair_in_the_source(tmp_path, shared_audio):
    data = write_rows(tmp_path / "st.jsonl", [{"audio": str(shared_audio / SPEECH), "gt": "x", "source": "covost2"}])
    _, problems = evaluation.read_benchmark("st", data)
    assert problems == [f"{data}:1: source 'covost2' does not name a language pair the way CoVoST2 sources do "
                        "(NAME_FROM_TO_SPLIT, with FROM and TO among en zh de es ko fr ja it)"]


@pytest.mark.parametrize("old, new", [("TASKS", "BENCHMARKS"), ("Task", "Benchmark"),
                                      ("read_examples", "read_benchmark"), ("Example", "BenchmarkExample")])
def test_old_names_warn_and_still_work(old, new):
    with pytest.warns(DeprecationWarning, match=f"evaluation.{old} is deprecated; use evaluation.{new}"):
        assert getattr(evaluation, old) is getattr(evaluation, new)
    with pytest.warns(DeprecationWarning, match="evaluation.CAPTION_STYLES is deprecated; use prompts.CAPTION_STYLES"):
        assert evaluation.CAPTION_STYLES == ("clotho", "audiocaps", "plain")
    with pytest.raises(AttributeError, match="has no attribute 'TASK'"):
        evaluation.TASK


def test_the_old_reader_still_reads(tmp_path, shared_audio):
    data = write_rows(tmp_path / "d.jsonl", [{"audio": str(shared_audio / SPEECH), "gt": "x", "source": "meld"}])
    with pytest.warns(DeprecationWarning):
        old = evaluation.read_examples("emotion", data)
    assert old == evaluation.read_benchmark("emotion", data)


def test_unknown_task_and_empty_data_are_refused(tmp_path):
    with pytest.raises(InputError, match="unknown task 'wer'; choose from asr, st, srwt"):
        evaluation.read_benchmark("wer", tmp_path / "x.jsonl")
    with pytest.raises(InputError, match="no examples"):
        evaluation.read_benchmark("asr", write_rows(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(InputError, match="cannot read the data file"):
        evaluation.read_benchmark("asr", tmp_path / "absent.jsonl")


def test_a_rerun_does_only_what_is_left_and_a_torn_line_is_redone(model, tmp_path, shared_audio):
    clip = str(shared_audio / SPEECH)
    data = write_rows(tmp_path / "d.jsonl", [{"audio": clip, "gt": str(i), "source": "meld"} for i in range(4)])
    evaluation.evaluate(model, "emotion", data, tmp_path / "out", limit=2)
    part = tmp_path / "out" / "replies" / "rank-0.jsonl"
    assert [json.loads(line)["line"] for line in part.read_text().splitlines()] == [1, 2]
    with open(part, "a") as f:
        f.write('{"line": 3, "audio": "')  # a run killed while writing line 3's record
    run = evaluation.plan("emotion", data, tmp_path / "out", dtype="float32")  # as evaluate() keys it
    assert [e.line for e in run.todo] == [3, 4]
    summary = evaluation.execute(model, run)
    assert [json.loads(line)["line"] for line in part.read_text().splitlines()] == [1, 2, 3, 4]
    assert summary["complete"] and summary["replied"] == 4


def interrupt_at_batch(k: int, monkeypatch):
    """Ctrl-C while the k-th batch is generated; returns the real generate_replies, to put back."""
    real, calls = evaluation.generate_replies, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == k:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(evaluation, "generate_replies", interrupted)
    return real


def test_ctrl_c_keeps_the_replies_and_writes_the_summary(model, tmp_path, shared_audio, monkeypatch):
    data = write_rows(tmp_path / "d.jsonl", [{"audio": str(shared_audio / SPEECH), "gt": "x", "source": "meld"}] * 3)
    real = interrupt_at_batch(2, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        evaluation.evaluate(model, "emotion", data, tmp_path / "out", batch_size=1)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["interrupted"], summary["replied"], summary["complete"]) == (True, 1, False)
    monkeypatch.setattr(evaluation, "generate_replies", real)
    assert evaluation.evaluate(model, "emotion", data, tmp_path / "out", batch_size=1)["replied"] == 3


def test_a_reply_that_cannot_be_written_fails_its_example(model, tmp_path, shared_audio, monkeypatch):
    data = write_rows(tmp_path / "d.jsonl", [{"audio": str(shared_audio / SPEECH), "gt": "x", "source": "meld"}] * 2)

    def disk_full(self, record):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluation.Replies, "append", disk_full)
    summary = evaluation.evaluate(model, "emotion", data, tmp_path / "out")
    assert summary["replied"] == 0 and len(summary["failed"]) == 2
    assert summary["failed"][0].endswith("could not write its output: [Errno 28] No space left on device")


def test_other_settings_are_refused_and_overwrite_starts_again(model, tmp_path, shared_audio):
    data = write_rows(tmp_path / "d.jsonl", [{"audio": str(shared_audio / SPEECH), "gt": "x", "source": "meld"}])
    evaluation.evaluate(model, "emotion", data, tmp_path / "out", model_name="a")
    with pytest.raises(InputError, match=r"holds outputs made with other settings \(model: 'a' then, 'b' now\)"):
        evaluation.plan("emotion", data, tmp_path / "out", model_name="b", dtype="float32")
    assert [e.line for e in evaluation.plan("emotion", data, tmp_path / "out", model_name="b", overwrite=True).todo
            ] == [1]
    evaluation.evaluate(model, "emotion", data, tmp_path / "out", model_name="b")
    write_rows(data, [{"audio": str(shared_audio / SPEECH), "gt": "y", "source": "meld"}])
    with pytest.raises(InputError, match="data_sha256"):
        evaluation.plan("emotion", data, tmp_path / "out", model_name="b", dtype="float32")


@pytest.mark.slow
def test_the_command_resumes_after_a_kill_without_repeating_or_losing_an_example(tiny_ckpt, tmp_path, shared_audio):
    clips = [SPEECH, "1089_134686_000007_000004.wav", "glass-breaking-151256.mp3", "es.mp3"]
    data = write_rows(tmp_path / "d.jsonl", [{"audio": str(shared_audio / clips[i % 4]), "gt": "x", "source": "meld"}
                                             for i in range(8)])
    args = ["evaluate", "emotion", "--data", data, "--output-dir", tmp_path / "out", "--model", tiny_ckpt,
            "--batch-size", "1", "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "QWENAUDIO_HOME": str(tmp_path)}
    part = tmp_path / "out" / "replies" / "rank-0.jsonl"
    first = subprocess.Popen([sys.executable, "-m", "qwenaudio", *map(str, args)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not part.exists() or len(part.read_text().splitlines()) < 3):
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = [json.loads(line)["line"] for line in part.read_text().splitlines() if line.endswith("}")]
    assert 3 <= len(before) < 8
    done = qwenaudio_cli(*args, home=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line)["line"] for line in part.read_text().splitlines()]
    assert sorted(lines) == list(range(1, 9)) and lines[: len(before)] == before  # each example once
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["complete"] and summary["replied"] == 8
    assert "| meld | 8 | accuracy |" in done.stdout


@pytest.mark.slow
def test_torchrun_two_processes_give_the_same_summary(tiny_ckpt, tmp_path, shared_audio):
    clips = [SPEECH, "1089_134686_000007_000004.wav", "glass-breaking-151256.mp3", "es.mp3", "music.wav"]
    data = write_rows(tmp_path / "d.jsonl", [
        {"audio": str(shared_audio / clips[i % 5]), "question": "what is it?", "gt": ["yes", "no", "x"][i % 3],
         "source": ["clothoaqa", "other"][i % 2]} for i in range(9)] + ["broken line"])
    args = ["evaluate", "aqa", "--data", str(data), "--model", str(tiny_ckpt), "--batch-size", "2", "--device", "cpu"]
    single = qwenaudio_cli(*args, "--output-dir", tmp_path / "one", home=tmp_path)
    assert single.returncode == 1
    two = torchrun_cli(*args, "--output-dir", tmp_path / "two", home=tmp_path)
    assert two.returncode == 1, two.stderr
    one, both = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert both["processes"] == 2 and both["sources"] == one["sources"] and both["failed"] == one["failed"]
    assert (tmp_path / "two" / "examples.jsonl").read_text() == (tmp_path / "one" / "examples.jsonl").read_text()
    parts = [len(p.read_text().splitlines()) for p in sorted((tmp_path / "two" / "replies").iterdir())]
    assert len(parts) == 2 and sum(parts) == 9 and min(parts) > 0  # both processes worked, each example once


@pytest.mark.slow
def test_the_command_refuses_bad_arguments_before_loading(tmp_path, shared_audio):
    data = write_rows(tmp_path / "d.jsonl", [{"audio": str(shared_audio / SPEECH), "gt": "x", "source": "meld"}])
    done = qwenaudio_cli("evaluate", "wer", "--data", data, "--output-dir", tmp_path / "o", home=tmp_path)
    assert done.returncode == 2 and "invalid choice: 'wer'" in done.stderr
    done = qwenaudio_cli("evaluate", "emotion", "--data", tmp_path / "none.jsonl", "--output-dir", tmp_path / "o",
                         "--model", tmp_path / "no-model", home=tmp_path)
    assert done.returncode == 2 and "none.jsonl: cannot read the data file" in done.stderr


@pytest.mark.slow
def test_evaluate_example_on_tiny_checkpoint(tiny_ckpt, tmp_path, shared_audio):
    data = write_rows(tmp_path / "d.jsonl", [{"audio": str(shared_audio / SPEECH), "gt": "x", "source": "meld"}] * 2)
    done = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "evaluate.py"), "emotion", str(data),
                           str(tmp_path / "out"), "--model", str(tiny_ckpt), "--limit", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "1 of 1 examples; failed: 0"
    assert done.stdout.startswith("meld accuracy: 0.0 (paper: 0.557)")


def test_a_source_whose_rows_disagree_on_the_language_is_not_scored():
    records = [{"source": "s", "reference": "a", "reply": "a", "language": lang} for lang in ("en", "zh")]
    assert evaluation.source_scores("asr", records) == (
        {}, ["not computed: the source's rows are in several languages (en, zh)"])


def four_rows(task: str, tmp_path: Path, shared_audio: Path) -> Path:
    """Four rows per task from the recorded ones (references varied), so two processes both get work."""
    rows = GOLDEN["tasks"][task]["rows"]
    official_rows(task, tmp_path, shared_audio)  # checks the recorded paths point at the shared recordings
    varied = [{**rows[i % len(rows)], "gt": rows[(i + 1) % len(rows)]["gt"]} if i >= len(rows) else rows[i]
              for i in range(4)]
    return write_rows(tmp_path / f"{task}.jsonl", varied)


@pytest.mark.parametrize("task", evaluation.BENCHMARKS)
def test_every_task_resumes_after_an_interruption_to_the_same_summary(task, model, tmp_path, shared_audio,
                                                                      monkeypatch):
    data = four_rows(task, tmp_path, shared_audio)
    options = {"audio_root": REPO_ROOT, "batch_size": 1, "max_new_tokens": 4}
    whole = evaluation.evaluate(model, task, data, tmp_path / "whole", **options)
    real = interrupt_at_batch(3, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        evaluation.evaluate(model, task, data, tmp_path / "resumed", **options)
    monkeypatch.setattr(evaluation, "generate_replies", real)
    resumed = evaluation.evaluate(model, task, data, tmp_path / "resumed", **options)
    assert resumed["sources"] == whole["sources"] and resumed["complete"]
    part = (tmp_path / "resumed" / "replies" / "rank-0.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["line"] for line in part) == [1, 2, 3, 4]  # each example once
    assert (tmp_path / "resumed" / "examples.jsonl").read_text() == (tmp_path / "whole" / "examples.jsonl").read_text()


DRIVER = """
import sys, torch, qwenaudio
import qwenaudio.runner
from qwenaudio import evaluation
checkpoint, data, audio_root, out = sys.argv[1:]
model = qwenaudio.load(checkpoint, dtype=torch.float32, device="cpu", progress=False)
for task in evaluation.BENCHMARKS:
    evaluation.evaluate(model, task, f"{data}/{task}.jsonl", f"{out}/{task}", audio_root=audio_root, batch_size=1,
                        max_new_tokens=4)
qwenaudio.runner.leave_process_group()
"""


@pytest.mark.slow
def test_every_task_under_torchrun_gives_one_process_s_summary(tiny_ckpt, model, tmp_path, shared_audio):
    """All nine tasks through the library under `torchrun --nproc-per-node 2`, against one process in this one."""
    for task in evaluation.BENCHMARKS:
        evaluation.evaluate(model, task, four_rows(task, tmp_path, shared_audio), tmp_path / "one" / task,
                            audio_root=REPO_ROOT, batch_size=1, max_new_tokens=4)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2",
                           str(driver), str(tiny_ckpt), str(tmp_path), str(REPO_ROOT), str(tmp_path / "two")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for task in evaluation.BENCHMARKS:
        one, two = (json.loads((tmp_path / d / task / "summary.json").read_text()) for d in ("one", "two"))
        assert (two["processes"], two["sources"], two["failed"]) == (2, one["sources"], one["failed"]), task
        parts = sorted((tmp_path / "two" / task / "replies").iterdir())
        assert [len(p.read_text().splitlines()) for p in parts] == [2, 2], task  # each process did half, once


def test_the_command_evaluates_with_an_adapter_and_records_it(tiny_ckpt, tmp_path, shared_audio):
    from qwenaudio import cli, lora

    model = qwenaudio.load(tiny_ckpt, dtype=torch.float32, device="cpu", progress=False)
    lora.apply_lora(model, lora.LoraConfig(rank=2))
    lora.save_adapter(model, tmp_path / "adapter")
    data = write_rows(tmp_path / "d.jsonl", [{"audio": str(shared_audio / SPEECH), "gt": "x", "source": "meld"}])
    run = ["evaluate", "emotion", "--data", str(data), "--output-dir", str(tmp_path / "out"), "--model", str(tiny_ckpt),
           "--device", "cpu"]
    assert cli.main([*run, "--adapter", str(tmp_path / "adapter")]) == 0
    settings = json.loads((tmp_path / "out" / "run.json").read_text())["settings"]
    assert settings["adapter_fingerprint"] and settings["model"] == f"{tiny_ckpt} + adapter {(tmp_path / 'adapter').resolve()}"
    assert cli.main(run) == 2  # the same directory without the adapter: other settings, refused before loading


# --- issue 23: nothing lost, nothing silent ------------------------------------------------------------------------

def one_row(tmp_path: Path, shared_audio: Path, name: str = "d.jsonl", rows: int = 1) -> Path:
    return write_rows(tmp_path / name, [{"audio": str(shared_audio / SPEECH), "gt": "x", "source": "meld"}] * rows)


def evaluate_cli(*args) -> list[str]:
    return ["evaluate", "emotion", *map(str, args), "--device", "cpu", "--max-new-tokens", "2"]


def test_bad_clips_are_named_by_line_on_stderr_before_the_model_loads(tiny_ckpt, tmp_path, shared_audio,
                                                                      monkeypatch, capsys):
    """A 10 ms clip, an empty one, an all-NaN one and a directory given as a clip: each line named file:line with
    the reason (as as_waveform gives it) on stderr before the model loads, and listed under failed."""
    import numpy as np
    import soundfile as sf

    from qwenaudio import cli

    sf.write(tmp_path / "short.wav", np.full(160, 0.1, dtype=np.float32), 16000)
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    sf.write(tmp_path / "nan.wav", np.full(16000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    (tmp_path / "folder.wav").mkdir()
    names = ["short.wav", "empty.wav", "nan.wav", "folder.wav"]
    data = write_rows(tmp_path / "d.jsonl", [{"audio": str(shared_audio / SPEECH), "gt": "x", "source": "meld"},
                                             *({"audio": n, "gt": "x", "source": "meld"} for n in names)])
    seen_before_loading = []
    real_load = cli.load

    def load(*args, **kwargs):
        seen_before_loading.append(capsys.readouterr().err)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(cli, "load", load)
    code = cli.main(evaluate_cli("--data", data, "--output-dir", tmp_path / "out", "--model", tiny_ckpt,
                                 "--audio-root", tmp_path))
    assert code == 1
    errors = [line for line in seen_before_loading[0].splitlines() if line.startswith("error: ")]
    reasons = ["160 samples (0.010 s) is too short", "the audio is empty", "NaN or infinite samples",
               "is a directory, not an audio file"]
    assert len(errors) == 4
    for line, (name, reason) in enumerate(zip(names, reasons), 2):
        assert errors[line - 2].startswith(f"error: {data}:{line}: audio {name!r}: ") and reason in errors[line - 2]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [f.split(": audio")[0] for f in summary["failed"]] == [f"{data}:{i}" for i in range(2, 6)]
    assert summary["replied"] == 1


def test_an_output_is_never_an_input_under_any_name(tiny_ckpt, tmp_path, shared_audio, monkeypatch, capsys):
    """`--data examples.jsonl --output-dir .` (and the same through a symlink, or with the data as summary.md):
    refused with exit 1 before the model loads, the data file untouched."""
    from qwenaudio import cli

    monkeypatch.setattr(cli, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.chdir(tmp_path)
    for name in ("examples.jsonl", "summary.md", "summary.json", "run.json"):
        data = one_row(tmp_path, shared_audio, name)
        before = data.read_bytes()
        for out in (".", str(tmp_path), "link"):
            if out == "link" and not Path("link").exists():
                Path("link").symlink_to(tmp_path)
            for extra in ([], ["--overwrite"]):
                assert cli.main(evaluate_cli("--data", name, "--output-dir", out, "--model", tiny_ckpt, *extra)) == 1
                err = capsys.readouterr().err
                assert err.startswith("error: ") and "would replace the input" in err and name in err, err
                assert data.read_bytes() == before
        data.unlink()


def test_files_the_command_did_not_write_are_refused_unless_overwrite(tiny_ckpt, tmp_path, shared_audio, capsys):
    from qwenaudio import cli

    data = one_row(tmp_path, shared_audio)
    out = tmp_path / "out"
    out.mkdir()
    for name, text in (("summary.json", '{"mine": true}\n'), ("run.json", "{}\n"), ("summary.md", "# notes\n")):
        (out / name).write_text(text)
        assert cli.main(evaluate_cli("--data", data, "--output-dir", out, "--model", tiny_ckpt)) == 1
        err = capsys.readouterr().err
        assert f"{out / name}" in err and "--overwrite" in err and "Traceback" not in err
        assert (out / name).read_text() == text
        (out / name).unlink()
    (out / "replies").mkdir()
    assert cli.main(evaluate_cli("--data", data, "--output-dir", out, "--model", tiny_ckpt)) == 1
    assert f"{out / 'replies'} exists and was not written by qwenaudio evaluate" in capsys.readouterr().err
    (out / "summary.md").write_text("# notes\n")
    assert cli.main(evaluate_cli("--data", data, "--output-dir", out, "--model", tiny_ckpt, "--overwrite")) == 0
    assert (out / "summary.md").read_text().startswith("# emotion: 1 of 1")
    assert cli.main(evaluate_cli("--data", data, "--output-dir", out, "--model", tiny_ckpt)) == 0  # ours: resumes
    record = json.loads((out / "run.json").read_text())
    assert record["command"] == "evaluate" and set(record["outputs"]) == {"replies", "examples.jsonl",
                                                                         "summary.json", "summary.md"}


def test_weights_replaced_under_the_same_path_or_another_dtype_are_refused(tiny_ckpt, tmp_path, shared_audio,
                                                                          vocab_file, capsys):
    """The run is keyed on the checkpoint's content, the adapter's, the dtype and the quantization, not the path."""
    import shutil

    from qwenaudio import cli
    from qwenaudio.testing import make_tiny_checkpoint

    model = shutil.copytree(tiny_ckpt, tmp_path / "model")
    data, out = one_row(tmp_path, shared_audio), tmp_path / "out"
    run = evaluate_cli("--data", data, "--output-dir", out, "--model", model, "--dtype", "float32")
    assert cli.main(run) == 0
    capsys.readouterr()
    other = ["bfloat16" if x == "float32" else x for x in run]
    assert cli.main(other) == 2
    assert "dtype: 'float32' then, 'bfloat16' now" in capsys.readouterr().err
    assert cli.main([*run, "--int8"]) == 2
    assert "quantization: None then, 'int8' now" in capsys.readouterr().err
    shutil.rmtree(model)
    make_tiny_checkpoint(model, seed=1, vocab_file=vocab_file)
    assert cli.main(run) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "model_fingerprint: '" in err and "--overwrite" in err
    assert cli.main([*run, "--overwrite"]) == 0


def test_sigterm_writes_the_summary_and_says_how_to_resume(tiny_ckpt, tmp_path, shared_audio, monkeypatch, capsys):
    from qwenaudio import cli

    data = one_row(tmp_path, shared_audio, rows=3)
    real, calls = evaluation.generate_replies, []

    def killed_on_second_batch(*args):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(evaluation, "generate_replies", killed_on_second_batch)
    run = evaluate_cli("--data", data, "--output-dir", tmp_path / "out", "--model", tiny_ckpt, "--batch-size", "1")
    assert cli.main(run) == 128 + signal.SIGTERM
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["interrupted"] and summary["replied"] in (1, 2) and not summary["complete"]
    assert capsys.readouterr().err.rstrip().splitlines()[-1] == (
        "interrupted; rerun the same command to resume: the replies so far are kept")
    monkeypatch.setattr(evaluation, "generate_replies", real)
    assert cli.main(run) == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["replied"] == 3


def test_progress_moves_while_a_batch_decodes(tiny_ckpt, tmp_path, shared_audio, monkeypatch, capsys):
    """A large budget (the tiny model never stops by itself) reports the tokens made as it decodes."""
    from qwenaudio import cli

    monkeypatch.setattr(cli.evaluate, "DECODING_EVERY_S", 0.0)
    data = one_row(tmp_path, shared_audio)
    run = ["evaluate", "emotion", "--data", str(data), "--output-dir", str(tmp_path / "out"), "--model",
           str(tiny_ckpt), "--device", "cpu", "--max-new-tokens", "20"]
    assert cli.main(run) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("decoding a batch: ")]
    assert lines == ["decoding a batch: 8/20 new tokens", "decoding a batch: 16/20 new tokens",
                     "decoding a batch: 20/20 new tokens"]


def test_generate_reports_its_steps_where_it_looks_anyway(model):
    from qwenaudio.core.generate import CHECK_EVERY, generate

    seen = []
    batch = model.tokenizer.encode_batch(["hello", "a longer prompt here"])
    config = model.generation_config.replace(do_sample=False, max_new_tokens=2 * CHECK_EVERY + 3)
    generate(model.decoder, model.tokenizer, batch.input_ids, attention_mask=batch.attention_mask, config=config,
             progress=lambda steps, budget: seen.append((steps, budget)))
    budget = config.max_new_tokens
    assert seen[:2] == [(CHECK_EVERY, budget), (2 * CHECK_EVERY, budget)] and seen[-1][0] <= budget


def test_malformed_note_references_are_warned_about_and_counted(model, tmp_path, shared_audio):
    clip = str(shared_audio / "music.wav")
    good = "<|pitch|><|midi_pitch_60|><|velocity|><|midi_velocity_100|><|instrument|>keyboard"
    data = write_rows(tmp_path / "d.jsonl", [{"audio": clip, "gt": g, "source": "nsynth"} for g in
                                             (good, "pitch: 60, velocity: 100, instrument: keyboard", "<|pitch|>60")])
    with pytest.warns(UserWarning, match="2 of 3 note references lack a readable pitch, velocity or instrument"):
        summary = evaluation.evaluate(model, "note_analysis", data, tmp_path / "out", max_new_tokens=4)
    [source] = summary["sources"]
    assert source["unreadable_references"] == 2
    assert any(note.startswith("2 of 3 references lack a readable") for note in source["notes"])


@pytest.mark.parametrize("call, message", [
    (lambda m, p: evaluation.evaluate(m, "asr", 123, p), "data must be a path"),
    (lambda m, p: evaluation.evaluate(m, "asr", p / "d.jsonl", None), "output_dir must be a path"),
    (lambda m, p: evaluation.evaluate("notamodel", "asr", p / "d.jsonl", p), "model must be a QwenAudio model"),
    (lambda m, p: evaluation.evaluate(m, 5, p / "d.jsonl", p), "unknown task 5"),
    (lambda m, p: evaluation.evaluate(m, "emotion", p / "d.jsonl", p, limit="3"), "limit must be a positive int"),
    (lambda m, p: evaluation.evaluate(m, "emotion", p / "d.jsonl", p, max_new_tokens=0), "max_new_tokens must be"),
    (lambda m, p: evaluation.evaluate(m, "emotion", p / "d.jsonl", p, audio_root=1), "audio_root must be a path"),
    (lambda m, p: evaluation.evaluate(m, "emotion", p / "d.jsonl", p, batch_size="8"), "batch_size must be an int"),
    (lambda m, p: evaluation.read_benchmark("emotion", 123), "data must be a path"),
    (lambda m, p: evaluation.read_lines(p / "d.jsonl", "parse"), "parse must be a function"),
    (lambda m, p: evaluation.generate_replies(m, ["x"], [[]], "8"), "max_new_tokens must be"),
    (lambda m, p: evaluation.execute(m, "run"), "a Run from evaluation.plan"),
])
def test_wrong_types_raise_the_library_s_own_error(call, message, model, tmp_path, shared_audio):
    one_row(tmp_path, shared_audio)
    with pytest.raises(QwenAudioError, match=message):
        call(model, tmp_path)


def fuzz_evaluate_inputs(root: Path, shared_audio: Path) -> dict[str, Path]:
    """The files the fuzz below draws each path option from."""
    junk = root / "junk.bin"
    junk.write_bytes(bytes(range(256)) * 4)
    (root / "empty.jsonl").write_text("")
    (root / "a-dir").mkdir(exist_ok=True)
    mixed = write_rows(root / "mixed.jsonl", [
        {"audio": str(shared_audio / SPEECH), "gt": "x", "source": "meld"}, "{torn", {"audio": "a-dir", "gt": "x",
                                                                                      "source": "meld"},
        {"audio": str(junk), "gt": "x", "source": "meld"}, {"audio": str(shared_audio / "music.wav"), "gt": 3}])
    good = one_row(root, shared_audio, "good.jsonl", rows=2)
    return {"good": good, "mixed": mixed, "empty": root / "empty.jsonl", "junk": junk, "dir": root / "a-dir",
            "missing": root / "missing.jsonl", "bom": root / "bom.jsonl"}


# Mostly usable values, so most runs get as far as the model: the bad ones are refused before it loads.
NUMBERS = st.one_of(st.none(), st.integers(1, 5).map(str), st.integers(1, 5).map(str),
                    st.sampled_from(["0", "-1", "1e3", "nan", "", "10" * 12, "٣", "999999999999"]))


def test_fuzz_the_command_line_options(tiny_ckpt, tmp_path_factory, shared_audio, monkeypatch, capsys):
    """Random values for each numeric option and random files for each path of `evaluate`: every run ends in exit
    0 or 1 with a summary that accounts for every example, or in exit 1, 2 or 3 with one `error:` line; never a
    traceback. Few examples: each loads the tiny model."""
    from qwenaudio import cli

    import shutil

    root = tmp_path_factory.mktemp("fuzz")
    files = fuzz_evaluate_inputs(root, shared_audio)
    small = shutil.copytree(tiny_ckpt, root / "model")  # a context of 96: an absurd budget is cut to a few tokens
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 96}))
    files["bom"].write_bytes(b"\xef\xbb\xbf" + files["good"].read_bytes())
    paths = st.sampled_from(["good", "mixed", "good", "mixed", *sorted(files)])
    runs = [0]

    @settings(max_examples=10, derandomize=True, database=None, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(data=paths, out=st.sampled_from(["new", "new", "new", "file", "same-as-data-dir", "dir"]),
           root_dir=st.sampled_from([None, None, "dir", "missing", "junk"]), limit=NUMBERS, batch=NUMBERS,
           budget=NUMBERS, overwrite=st.booleans())
    def run(data, out, root_dir, limit, batch, budget, overwrite):
        runs[0] += 1
        output = {"new": root / f"out{runs[0]}", "file": files["junk"], "same-as-data-dir": files[data].parent,
                  "dir": root / "a-dir"}[out]
        args = ["evaluate", "emotion", "--data", str(files[data]), "--output-dir", str(output), "--model",
                str(small), "--device", "cpu"]
        for option, value in (("--limit", limit), ("--batch-size", batch), ("--max-new-tokens", budget)):
            if value is not None:
                args += [option, value]
        if root_dir is not None:
            args += ["--audio-root", str(files[root_dir])]
        code = cli.main(args + ["--overwrite"] * overwrite)
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        if code in (0, 1) and (output / "summary.json").exists() and "error: " not in err.splitlines()[-1]:
            summary = json.loads((output / "summary.json").read_text())
            assert summary["replied"] + len(summary["failed"]) == summary["examples"], summary
            assert summary["complete"] == (code == 0)
        else:
            assert code in (1, 2, 3), (code, err)
            errors = [line for line in err.splitlines() if line.startswith(("error: ", "qwenaudio evaluate: error"))]
            assert len(errors) == 1, err

    monkeypatch.setattr(cli.evaluate, "DECODING_EVERY_S", 0.0)
    with monkeypatch.context() as m:
        m.setattr("qwenaudio.cli.evaluate.evaluation.BENCHMARKS", {**evaluation.BENCHMARKS, "emotion": evaluation.Benchmark(
            "emotion", "evaluate_emotion.py", 2)})  # the task's own budget, cut for speed
        run()
