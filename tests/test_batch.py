"""Many files and long files through the `qwenaudio` command: every output format for a 5-minute recording, a
folder of 20 mixed files with a corrupt one, resuming, and the same folder under `torchrun --nproc-per-node 2`
(gloo on the CPU) giving the same outputs as one process with each file done exactly once."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import qwenaudio
from qwenaudio import load_audio, tasks
from qwenaudio.batch import Job, check_names, find_inputs, plan_batches, run_files, seconds
from qwenaudio.core.audio import MIN_SAMPLES
from qwenaudio.core.errors import InputError
from qwenaudio.longform import plan_windows

from .test_cli import FAST, qwenaudio_cli, torchrun_cli

RATE = 16000


def speechlike(seconds: float, seed: int, rate: int = RATE, channels: int = 1) -> np.ndarray:
    """Noise bursts of 0.2-0.6 s with short gaps and a 1 s pause every 7 s: cuttable like speech."""
    rng = np.random.default_rng(seed)
    audio = np.zeros((int(seconds * rate), channels), dtype=np.float32)
    t = 0.2
    while t < seconds - 0.7:
        length = rng.uniform(0.2, 0.6)
        a, b = int(t * rate), int((t + length) * rate)
        audio[a:b] = 0.3 * rng.standard_normal((b - a, channels)) * np.hanning(b - a)[:, None]
        t += length + rng.uniform(0.05, 0.15) + (1.0 if int(t / 7) != int((t + length) / 7) else 0.0)
    return audio[:, 0] if channels == 1 else audio


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """20 files in two levels: wav, flac and ogg; 16, 22.05 and 44.1 kHz; mono and stereo; 1 to 40 s (two past
    30 s); and one corrupt file."""
    root = tmp_path_factory.mktemp("folder")
    kinds = [("wav", 16000, 1), ("flac", 22050, 1), ("ogg", 44100, 2), ("wav", 44100, 2)]
    for i in range(19):
        suffix, rate, channels = kinds[i % 4]
        seconds = [1.5, 4, 9, 2, 35, 6, 12, 3, 40, 5, 7, 2.5, 10, 8, 1, 3.5, 6.5, 11, 2][i]
        where = root / ("sub" if i % 3 == 0 else "") / f"clip{i:02d}.{suffix}"
        where.parent.mkdir(exist_ok=True)
        sf.write(where, speechlike(seconds, i, rate, channels), rate)
    (root / "sub" / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really")
    (root / "notes.txt").write_text("not audio, not picked up\n")
    return root


def outputs(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): p.read_text(encoding="utf-8")
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != "summary.json"}


def test_inputs_from_directories_keep_their_relative_names(folder, tmp_path):
    jobs = find_inputs([folder, folder / "clip01.flac"])  # a file found twice is done once
    assert len(jobs) == 20 and Job(folder / "sub" / "broken.wav", Path("sub/broken")) in jobs
    with pytest.raises(InputError, match="would both write outputs named clip01"):
        sf.write(tmp_path / "clip01.wav", speechlike(1, 0), RATE)
        check_names(find_inputs([folder / "clip01.flac", folder / "sub" / "clip00.wav", tmp_path / "clip01.wav"]))
    with pytest.raises(InputError, match=f"no such file or directory: {folder / 'nope'}"):
        find_inputs([folder / "clip01.flac", folder / "nope"])


def test_batches_go_longest_first_and_keep_input_order_on_ties(folder):
    batches = plan_batches(find_inputs([folder]), 4)
    lengths = [seconds(j.path) for b in batches for j in b]
    assert [len(b) for b in batches] == [4, 4, 4, 4, 4] and lengths == sorted(lengths, reverse=True)
    assert batches[-1][-1].path.name == "broken.wav"  # unreadable: length 0, reported when loaded


@pytest.mark.slow
def test_five_minutes_in_every_format(tiny_ckpt, tmp_path):
    wav = tmp_path / "talk.wav"
    sf.write(wav, speechlike(300, seed=5), RATE)
    done = qwenaudio_cli("transcribe", wav, "--model", tiny_ckpt, "--format", "all", "--output-dir",
                         tmp_path / "out", "--dtype", "float32", *FAST, home=tmp_path)
    assert done.returncode == 0, done.stderr
    written = {fmt: (tmp_path / "out" / f"talk.{fmt}").read_text(encoding="utf-8")
               for fmt in ("txt", "json", "srt", "vtt")}
    model = qwenaudio.load(tiny_ckpt, dtype=torch.float32, progress=False)
    audio = load_audio(wav)
    [expected] = tasks.segments(model, [audio], tasks.asr_task("en", timestamps=True), timed=True, max_new_tokens=8)
    record = json.loads(written["json"])
    windows = plan_windows(audio)
    assert len(windows) >= 11 and len(record["segments"]) == len(windows)  # 300 s in windows of at most 30 s
    assert f"{wav}: 8/{len(windows)} windows\n{wav}: {len(windows)}/{len(windows)} windows\n" in done.stderr
    assert [(s["start"], s["end"]) for s in record["segments"]] == [(s.start, s.end) for s in expected]
    assert record["segments"][-1]["end"] == pytest.approx(300.0) and record["segments"][0]["start"] == 0.0
    words = [w for s in expected for w in s.words]
    assert [(w["text"], w["start"], w["end"]) for w in record["words"]] == [(w.text, w.start, w.end) for w in words]
    assert written["txt"] == record["text"] + "\n" == " ".join(w.text for w in words) + "\n"
    assert written["srt"].count(" --> ") == written["vtt"].count(" --> ") == len(words) > 0
    assert written["vtt"].startswith("WEBVTT")


@pytest.mark.slow
def test_folder_with_a_corrupt_file_then_resume(tiny_ckpt, folder, tmp_path):
    run = ("transcribe", folder, "--model", tiny_ckpt, "--output-dir", tmp_path / "out", "--batch-size", "4",
           "--dtype", "float32", *FAST)
    first = qwenaudio_cli(*run, home=tmp_path)
    assert first.returncode == 1
    assert first.stderr.count("error: ") == 1 and "broken.wav" in first.stderr
    written = outputs(tmp_path / "out")
    assert len(written) == 19 and "sub/clip00.txt" in written and "clip01.txt" in written
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["files"], len(summary["done"]), summary["skipped"], len(summary["failed"])) == (20, 19, [], 1)

    again = qwenaudio_cli(*run, home=tmp_path)  # outputs exist: only the corrupt file is tried again
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["done"], len(summary["skipped"]), len(summary["failed"])) == ([], 19, 1)
    assert again.returncode == 1 and outputs(tmp_path / "out") == written

    redo = qwenaudio_cli(*run, "--overwrite", home=tmp_path)  # everything again, to the same outputs
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (len(summary["done"]), summary["skipped"], len(summary["failed"])) == (19, [], 1)
    assert redo.returncode == 1 and outputs(tmp_path / "out") == written


@pytest.mark.slow
def test_format_all_needs_an_output_directory(tmp_path):
    done = qwenaudio_cli("transcribe", tmp_path, "--format", "all", home=tmp_path)
    assert done.returncode == 2 and "--format all writes files: give --output-dir" in done.stderr


@pytest.mark.slow
def test_torchrun_two_processes_give_the_same_outputs_once_each(tiny_ckpt, folder, tmp_path):
    args = ["transcribe", str(folder), "--model", str(tiny_ckpt), "--batch-size", "4", "--dtype", "float32", *FAST]
    single = qwenaudio_cli(*args, "--output-dir", tmp_path / "one", home=tmp_path)
    assert single.returncode == 1
    two = torchrun_cli(*args, "--output-dir", tmp_path / "two", home=tmp_path)
    assert two.returncode != 0 and "broken.wav" in two.stderr  # the corrupt file fails in whichever rank had it
    assert outputs(tmp_path / "two") == outputs(tmp_path / "one")
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (summary["processes"], len(summary["done"]), len(summary["failed"])) == (2, 19, 1)
    assert sorted(summary["done"]) == sorted(json.loads((tmp_path / "one" / "summary.json").read_text())["done"])
    batches = [line for line in two.stderr.splitlines() if re.match(r"rank \d: \[\d+/\d+\] ", line)]
    listed = [name for line in batches for name in line.split("] ", 1)[1].split()]
    assert sorted(listed) == sorted(str(j.path) for j in find_inputs([folder]))  # each file exactly once
    assert {line.split(":")[0] for line in two.stderr.splitlines() if line.startswith("rank ")} == {"rank 0", "rank 1"}


def test_a_failing_batch_is_retried_file_by_file(tmp_path):
    """Recognition that fails for a batch holding one bad clip: its files are tried alone, so the good ones are
    done and only the bad one fails, under its own name and with its own error."""
    paths = []
    for name, length in (("a", 3), ("b", 2), ("poison", 1)):
        sf.write(tmp_path / f"{name}.wav", speechlike(length, 0), RATE)
        paths.append(tmp_path / f"{name}.wav")
    calls = []

    def recognize(jobs, clips):
        calls.append([j.path.stem for j in jobs])
        if any(j.path.stem == "poison" for j in jobs):
            raise qwenaudio.AudioError(f"{jobs[-1].path}: cannot be recognised")
        return [f"text of {j.path.stem}" for j in jobs]

    written = {}
    outcomes = list(run_files(find_inputs(paths), recognize, lambda job, text: written.update({job.path: text}),
                              min_samples=MIN_SAMPLES, batch_size=4))
    assert calls == [["a", "b", "poison"], ["a"], ["b"], ["poison"]]
    assert written == {paths[0]: "text of a", paths[1]: "text of b"}
    assert [(job.path, error) for job, error in outcomes] == [
        (paths[0], None), (paths[1], None), (paths[2], f"{paths[2]}: cannot be recognised")]


@pytest.mark.parametrize("call, message", [
    (lambda: find_inputs([123]), "find_inputs takes paths"),
    (lambda: find_inputs(None), "find_inputs takes paths"),
    (lambda: run_files([], "recognize", print, min_samples=MIN_SAMPLES), "must be functions"),
    (lambda: run_files([], print, print, min_samples=MIN_SAMPLES, batch_size=0), "batch_size must be an int >= 1"),
    (lambda: run_files([], print, print, min_samples=MIN_SAMPLES, world="2"), "world must be an int >= 1"),
    (lambda: plan_batches([Job(Path("a.wav"), Path("a"))], 0), "batch_size must be an int >= 1"),
    (lambda: plan_batches(["a.wav"], 2), "takes jobs with a path"),
    (lambda: check_names(["a.wav"]), "takes the Jobs find_inputs returns"),
])
def test_wrong_types_raise_the_library_s_own_error(call, message):
    with pytest.raises(InputError, match=message):
        result = call()
        list(result or [])


def test_subtitle_writers_refuse_what_is_not_timed_text():
    from qwenaudio.subtitles import Word, cues, in_order, to_json, to_srt, to_vtt

    for call, message in ((lambda: to_srt("hello"), "items must be a list of Words"),
                          (lambda: to_vtt([("a", 0, 1)]), r"items\[0\] must have a str text"),
                          (lambda: to_json(5), "text must be a str"),
                          (lambda: to_srt([Word("a", float("nan"), 1.0)]), r"items\[0\].start must be a finite"),
                          (lambda: in_order([Word("a", 0, 1)], 0, None), "end must be a finite number"),
                          (lambda: cues([], None, 0, 1), "text must be a str")):
        with pytest.raises(InputError, match=message):
            call()


def test_an_output_directory_may_not_be_the_model_s(tiny_weights, tmp_path, capsys):
    """Trial 2: transcribe and evaluate wrote into the model's directory (exit 0), which changed the fingerprint
    every run on that model is keyed on: the same command's rerun was then refused ("would replace the input
    model/run.json") and so were other directories' runs on that model ("other settings: model_fingerprint")."""
    import shutil

    from qwenaudio import cli
    model = shutil.copytree(tiny_weights, tmp_path / "model")
    before = sorted(p.name for p in model.iterdir())
    clip = Path(__file__).parent / "golden" / "clip0.wav"
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"audio": str(clip), "gt": "x", "source": "librispeech"}) + "\n")
    for command in (["transcribe", str(clip)], ["evaluate", "asr", "--data", str(data)]):
        for out in (model, tmp_path / "link"):
            if not out.exists():
                out.symlink_to(model)
            assert cli.main([*command, "--model", str(model), "--output-dir", str(out), "--device", "cpu",
                             "--max-new-tokens", "1"]) == 1
            assert re.search(r"^error: \S+ is the model's directory", capsys.readouterr().err, re.M)
    assert sorted(p.name for p in model.iterdir()) == before
