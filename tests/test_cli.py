"""The `qwenaudio` command end to end, as a user runs it: `python -m qwenaudio …` in a subprocess, on tiny
checkpoints and generated WAV files. Each run pays for importing torch (~1.5 s), so checkpoints and audio are made
once per session and every run caps generation with --max-new-tokens.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import qwenaudio
from qwenaudio import tasks
from qwenaudio.chat import Chat
from qwenaudio.testing import make_tiny_checkpoint

FAST = ("--max-new-tokens", "8", "--device", "cpu")


def qwenaudio_cli(*args, stdin: str | None = None, home: Path) -> subprocess.CompletedProcess:
    """Run the command with $QWENAUDIO_HOME at `home` and the hub offline, so nothing is ever downloaded."""
    env = {**os.environ, "QWENAUDIO_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "qwenaudio", *map(str, args)], input=stdin, capture_output=True,
                          text=True, env=env, timeout=120)


def torchrun_cli(*args, home: Path, processes: int = 2) -> subprocess.CompletedProcess:
    """The command under `torchrun --standalone --nproc-per-node N` (gloo on the CPU), one thread per process."""
    env = {**os.environ, "QWENAUDIO_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).parent / "torchrun"
    return subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", str(processes), "-m", "qwenaudio",
                           *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def write_wav(path: Path, seed: int) -> Path:
    """2 s at 16 kHz: a rising tone over a little noise, different per seed."""
    t = np.arange(32000) / 16000
    noise = np.random.default_rng(seed).standard_normal(t.size)
    sf.write(path, (0.3 * np.sin(2 * np.pi * (200 + 100 * seed + 150 * t) * t) + 0.01 * noise).astype(np.float32),
             16000, subtype="PCM_16")
    return path


@pytest.fixture(scope="session")
def audio_dir(tmp_path_factory) -> Path:
    """speech.wav, other.wav, and bad.wav (text, not audio)."""
    root = tmp_path_factory.mktemp("audio")
    write_wav(root / "speech.wav", seed=0)
    write_wav(root / "other.wav", seed=1)
    (root / "bad.wav").write_text("this is not audio\n")
    return root


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt) -> qwenaudio.QwenAudio:
    """The tiny checkpoint loaded here, to predict what the command prints."""
    return qwenaudio.load(tiny_ckpt, device="cpu", progress=False)


@pytest.fixture(scope="session")
def chat_ckpt(tmp_path_factory, vocab_file) -> Path:
    """A tiny Qwen-Audio-Chat checkpoint that decodes greedily, so the command's replies can be predicted."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("chat") / "Qwen-Audio-Chat-tiny", vocab_file=vocab_file,
                                chat=True)
    config = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**config, "do_sample": False}))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["txt", "json", "srt", "vtt"])
def test_transcribe_writes_each_format(fmt, tiny_ckpt, tiny_model, audio_dir, tmp_path):
    wav = audio_dir / "speech.wav"
    timed = ["--timestamps"] if fmt == "json" else []  # srt and vtt imply it; txt and json take it
    done = qwenaudio_cli("transcribe", wav, "--model", tiny_ckpt, "--format", fmt, *timed,
                         "--output-dir", tmp_path / "out", *FAST, home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "[1/1] " in done.stderr
    written = (tmp_path / "out" / f"speech.{fmt}").read_text(encoding="utf-8")
    assert done.stdout == written  # one file: stdout is the document itself
    if fmt == "txt":
        assert written == tasks.transcribe(tiny_model, [wav], max_new_tokens=8)[0] + "\n"
    elif fmt == "json":
        record = json.loads(written)
        assert record["file"] == str(wav) and record["task"] == "transcribe"
        assert record["words"] and set(record["words"][0]) == {"text", "start", "end"}
        assert record["text"] == " ".join(w["text"] for w in record["words"])
    elif fmt == "srt":  # the tiny model's timed reply gives at least one cue
        assert any("-->" in line and line.count(",") == 2 for line in written.splitlines()), written
    else:
        assert written.startswith("WEBVTT\n") and "-->" in written, written


@pytest.mark.slow
def test_bad_file_is_reported_and_the_others_go_on(tiny_ckpt, audio_dir, tmp_path):
    files = [audio_dir / "speech.wav", audio_dir / "bad.wav", audio_dir / "other.wav"]
    done = qwenaudio_cli("transcribe", *files, "--batch-size", "2", "--model", tiny_ckpt,
                         "--output-dir", tmp_path / "out", *FAST, home=tmp_path)
    assert done.returncode == 1
    assert f"error: {audio_dir / 'bad.wav'}: " in done.stderr
    assert "[2/3] " in done.stderr and "[3/3] " in done.stderr  # a progress line per batch
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["other.txt", "speech.txt", "summary.json"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["done"] == [str(files[0]), str(files[2])] and summary["skipped"] == []
    assert len(summary["failed"]) == 1 and summary["failed"][0].startswith(str(files[1]))
    assert done.stdout.startswith(f"{files[0]}: ") and f"\n{files[2]}: " in done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("task, options, expected", [
    ("caption", [], lambda model, wav: tasks.caption(model, [wav], max_new_tokens=8)),
    # ja: a target whose tag changes the tiny model's first 8 tokens (most don't), so it shows if ignored
    ("translate", ["--language", "en", "--target-language", "ja"],
     lambda model, wav: tasks.translate(model, [wav], source="en", target="ja", max_new_tokens=8)),
], ids=["caption", "translate"])
def test_other_tasks_run(task, options, expected, tiny_ckpt, tiny_model, audio_dir, tmp_path):
    wav = audio_dir / "speech.wav"
    done = qwenaudio_cli("transcribe", wav, "--task", task, *options, "--format", "json", "--model", tiny_ckpt,
                         *FAST, home=tmp_path)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["task"] == task and record["words"] == []
    assert record["text"] == expected(tiny_model, wav)[0]


@pytest.mark.slow
def test_subtitles_need_the_transcribe_task(tiny_ckpt, audio_dir, tmp_path):
    done = qwenaudio_cli("transcribe", audio_dir / "speech.wav", "--task", "caption", "--format", "srt",
                         "--model", tiny_ckpt, home=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("usage: qwenaudio transcribe") and "--task transcribe" in done.stderr


@pytest.mark.slow
def test_missing_model_says_how_to_get_the_weights(audio_dir, tmp_path):
    done = qwenaudio_cli("transcribe", audio_dir / "speech.wav", "--model", tmp_path / "no-such-model",
                         home=tmp_path)
    assert done.returncode == 3
    assert "no-such-model" in done.stderr and "qwenaudio.download('Qwen/Qwen-Audio')" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_chat_streams_a_reply_per_question(chat_ckpt, audio_dir, tmp_path):
    wav = audio_dir / "speech.wav"
    done = qwenaudio_cli("chat", "--model", chat_ckpt, "--max-new-tokens", "4", "--device", "cpu", home=tmp_path,
                         stdin=f"/audio {wav}\nwhat is it?\nand now?\n/quit\nnot asked\n")
    assert done.returncode == 0, done.stderr
    chat = Chat(qwenaudio.load(chat_ckpt, device="cpu", progress=False))
    first = chat.ask([{"audio": str(wav)}, "what is it?"], max_new_tokens=4)
    second = chat.ask("and now?", max_new_tokens=4)
    assert done.stdout == f"{first}\n{second}\n"  # no "> " prompt: stdin is not a terminal


@pytest.mark.slow
def test_real_recordings_of_two_rates_in_one_batch(tiny_ckpt, shared_audio, tmp_path):
    files = [shared_audio / "1272-128104-0000.flac", shared_audio / "glass-breaking-151256.mp3"]  # 16 and 48 kHz
    done = qwenaudio_cli("transcribe", *files, "--model", tiny_ckpt, *FAST, home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "[2/2] " in done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith(str(shared_audio))]
    assert [line.split(": ")[0] for line in lines] == [str(f) for f in files]


@pytest.mark.slow
def test_quantize_then_transcribe_in_int8(tiny_ckpt, audio_dir, tmp_path):
    """`quantize` writes an int8 checkpoint that `transcribe` loads in int8 with no flag; `--int8` on the original
    quantizes while loading, to the same weights."""
    wav = audio_dir / "speech.wav"
    done = qwenaudio_cli("quantize", tiny_ckpt, tmp_path / "int8", home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "int8" / "config.json").read_text())["quantization"] == "int8-weight-only"
    expected = tasks.transcribe(qwenaudio.load(tiny_ckpt, quantize="int8", progress=False), [wav], max_new_tokens=8)[0]
    stored = qwenaudio_cli("transcribe", wav, "--model", tmp_path / "int8", *FAST, home=tmp_path)
    on_load = qwenaudio_cli("transcribe", wav, "--model", tiny_ckpt, "--int8", *FAST, home=tmp_path)
    assert stored.stdout == on_load.stdout == expected + "\n"
    missing = qwenaudio_cli("quantize", tmp_path / "nowhere", tmp_path / "x", home=tmp_path)
    assert missing.returncode == 3 and "nowhere" in missing.stderr


@pytest.mark.slow
def test_quantize_into_itself_is_refused_and_changes_nothing(tiny_ckpt, tmp_path):
    source = shutil.copytree(tiny_ckpt, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    for args in ([source, source], [source, source, "--overwrite"], [tiny_ckpt, source]):
        done = qwenaudio_cli("quantize", *args, home=tmp_path)
        assert done.returncode == 1 and done.stderr.startswith("error: ")  # OutputError: it would replace an input and "Traceback" not in done.stderr
        assert {p.name: p.read_bytes() for p in source.iterdir()} == before


# --- bad input and the ugly paths: one-line errors, nothing lost, nothing partial counted as done -----------------

NO_MODEL = "/nonexistent/model"  # commands refused before loading never get to notice this


def refused_before_loading(done: subprocess.CompletedProcess, message: str) -> None:
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "no checkpoint" not in done.stderr and done.stdout == ""


@pytest.mark.slow
def test_short_clip_fails_alone_under_its_own_name(tiny_ckpt, tiny_model, shared_audio, tmp_path):
    """A 300-sample file among three real recordings (one default batch of four): only it fails, with its own
    error; the others come out as a batch of the three would; a rerun redoes only the short file."""
    short = tmp_path / "short.wav"
    sf.write(short, np.full(300, 0.1, dtype=np.float32), 16000)
    good = [shared_audio / "1272-128104-0000.flac", shared_audio / "es.mp3",
            shared_audio / "glass-breaking-151256.mp3"]
    run = ("transcribe", short, *good, "--output-dir", tmp_path / "out", "--model", tiny_ckpt, *FAST)
    first = qwenaudio_cli(*run, home=tmp_path)
    assert first.returncode == 1
    errors = [line for line in first.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {short}: 300 samples (0.019 s) is too short: one audio token needs at least 480 "
                      "samples (3 mel frames, 30 ms) at 16000 Hz"]
    longest_first = [good[1], good[0], good[2]]  # 8.3 s, 5.9 s, 4.0 s: the batch order
    expected = tasks.transcribe(tiny_model, longest_first, max_new_tokens=8)
    for path, text in zip(longest_first, expected):
        assert (tmp_path / "out" / f"{path.stem}.txt").read_text() == text + "\n"
    again = qwenaudio_cli(*run, home=tmp_path)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert again.returncode == 1 and summary["done"] == [] and sorted(summary["skipped"]) == sorted(map(str, good))
    assert [line.split(":")[0] for line in summary["failed"]] == [str(short)]


@pytest.mark.slow
def test_inputs_and_output_directory_are_checked_before_loading(audio_dir, tmp_path):
    wav = audio_dir / "speech.wav"
    refused_before_loading(qwenaudio_cli("transcribe", tmp_path / "recordigns", "--model", NO_MODEL, home=tmp_path),
                           f"no such file or directory: {tmp_path / 'recordigns'}")
    (tmp_path / "empty").mkdir()
    refused_before_loading(qwenaudio_cli("transcribe", tmp_path / "empty", "--model", NO_MODEL, home=tmp_path),
                           f"no audio files (.wav, .flac, .mp3, .ogg, .opus) found in {tmp_path / 'empty'}")
    (tmp_path / "file").write_text("I am a file")
    refused_before_loading(qwenaudio_cli("transcribe", wav, "--output-dir", tmp_path / "file", "--model", NO_MODEL,
                                         home=tmp_path), f"--output-dir {tmp_path / 'file'} is a file")
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    shutil.copy(wav, tmp_path / "a" / "x.wav"), shutil.copy(wav, tmp_path / "b" / "x.wav")
    refused_before_loading(qwenaudio_cli("transcribe", tmp_path / "a" / "x.wav", tmp_path / "b" / "x.wav",
                                         "--output-dir", tmp_path / "out", "--model", NO_MODEL, home=tmp_path),
                           "would both write outputs named x")


@pytest.mark.slow
@pytest.mark.parametrize("options, message", [
    (["--task", "scene", "--itn"], "--itn has no effect with --task scene"),
    (["--task", "caption", "--language", "de"], "--language has no effect with --task caption"),
    (["--target-language", "ja"], "--target-language has no effect with word timestamps"),
    (["--itn", "--timestamps"], "--itn has no effect with word timestamps"),
    (["--task", "emotion", "--itn", "--target-language", "ja"],
     "--itn and --target-language have no effect with --task emotion"),
])
def test_options_a_task_ignores_are_refused(audio_dir, tmp_path, options, message):
    done = qwenaudio_cli("transcribe", audio_dir / "speech.wav", *options, "--model", NO_MODEL, home=tmp_path)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_readonly_or_full_output_directory(tiny_ckpt, audio_dir, tmp_path, monkeypatch, capsys):
    """In-process, where a full disk and a read-only directory can be simulated (tests may run as root)."""
    from qwenaudio import cli
    from qwenaudio.core import files

    def unwritable(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    loads = []
    monkeypatch.setattr(cli, "load", lambda *a, **k: loads.append(a))
    with monkeypatch.context() as m:
        m.setattr(files.tempfile, "TemporaryFile", unwritable)
        assert cli.main(["transcribe", str(audio_dir / "speech.wav"), "--output-dir", str(tmp_path / "ro")]) == 1
    assert loads == [] and f"error: --output-dir {tmp_path / 'ro'}: cannot write there (Permission denied)" in \
        capsys.readouterr().err
    monkeypatch.undo()

    files_in = [audio_dir / "speech.wav", audio_dir / "other.wav"]
    real_write = files.write_text

    def disk_full_for_other(path, text):
        if path.name == "other.json":
            (path.parent / f".{path.name}.partial").write_text(text[:10])
            raise OSError(28, "No space left on device")
        real_write(path, text)

    monkeypatch.setattr(cli.transcribe, "write_text", disk_full_for_other)
    args = ["transcribe", *map(str, files_in), "--format", "json", "--output-dir", str(tmp_path / "out"),
            "--model", str(tiny_ckpt), *FAST]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert f"error: {files_in[1]}: could not write its output: [Errno 28] No space left on device" in err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["done"] == [str(files_in[0])] and summary["failed"][0].startswith(f"{files_in[1]}: could not")
    assert not (tmp_path / "out" / "other.json").exists()  # never a partial output under the final name
    monkeypatch.undo()
    for leftover in (tmp_path / "out").glob(".*"):
        leftover.unlink()
    assert cli.main(args) == 0  # the rerun does what failed, and only that
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["done"] == [str(files_in[1])] and summary["skipped"] == [str(files_in[0])]


def _send_sigterm() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def _press_ctrl_c() -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize("interrupt, code", [(_press_ctrl_c, 130), (_send_sigterm, 128 + signal.SIGTERM)])
def test_an_interrupt_keeps_what_is_done_writes_the_summary_and_says_how_to_resume(
        interrupt, code, tiny_ckpt, audio_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C, and SIGTERM taken like it, on the second batch."""
    from qwenaudio import cli

    calls = []
    real_run_task = cli.transcribe.run_task

    def interrupted_on_second_batch(model, jobs, clips, args):
        calls.append(jobs)
        if len(calls) == 2:
            interrupt()
        return real_run_task(model, jobs, clips, args)

    monkeypatch.setattr(cli.transcribe, "run_task", interrupted_on_second_batch)
    files_in = [audio_dir / "speech.wav", audio_dir / "other.wav"]
    args = ["transcribe", *map(str, files_in), "--batch-size", "1", "--output-dir", str(tmp_path / "out"),
            "--model", str(tiny_ckpt), *FAST]
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(args) == code
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handler is back
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["interrupted"] and summary["done"] == [str(files_in[0])] and summary["failed"] == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["speech.txt", "summary.json"]
    err = capsys.readouterr().err
    assert "1 done, 0 skipped (outputs exist), 0 failed, of 2 files (interrupted)" in err
    assert err.rstrip().splitlines()[-1] == "interrupted; rerun the same command to resume: files done are kept"


@pytest.mark.slow
def test_stdout_in_input_order_and_json_lines(tiny_ckpt, tiny_model, audio_dir, shared_audio, tmp_path):
    """Batches run longest first, but stdout follows the command line; several JSON documents are JSON Lines.
    Two files of the same name may print to stdout (they write no files)."""
    (tmp_path / "b").mkdir()
    same_name = shutil.copy(audio_dir / "speech.wav", tmp_path / "b" / "speech.wav")
    files = [audio_dir / "speech.wav", shared_audio / "es.mp3", same_name]  # 2 s, 8.3 s, 2 s
    done = qwenaudio_cli("transcribe", *files, "--format", "json", "--batch-size", "1", "--model", tiny_ckpt, *FAST,
                         home=tmp_path)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["file"] for r in records] == [str(f) for f in files]
    assert [r["text"] for r in records] == [tasks.transcribe(tiny_model, [f], max_new_tokens=8)[0] for f in files]
    batches = [line.split("] ", 1)[1] for line in done.stderr.splitlines() if line.startswith("[")]
    assert batches[0] == str(files[1])  # the longest ran first


@pytest.mark.slow
@pytest.mark.parametrize("prompt, message", [
    ("<audio>missing.wav</audio>hi", "missing.wav: no such audio file"),
    ("<audio>unclosed.wav hi", "unclosed <audio> tag"),
])
def test_trace_errors_are_one_line(tiny_ckpt, tmp_path, prompt, message):
    done = qwenaudio_cli("trace", "--model", tiny_ckpt, "--prompt", prompt, "--out", tmp_path / "t.safetensors",
                         "--device", "cpu", home=tmp_path)
    assert done.returncode == 2 and "error: " in done.stderr and message in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "t.safetensors").exists()


@pytest.mark.slow
def test_a_path_is_never_a_repo_id(audio_dir, tmp_path):
    """`--model weights/Qwen-Audio` where ./weights exists but holds no checkpoint: a missing directory, not a
    download of a repo named "weights/Qwen-Audio"."""
    (tmp_path / "weights").mkdir()
    done = subprocess.run([sys.executable, "-m", "qwenaudio", "transcribe", str(audio_dir / "speech.wav"),
                           "--model", "weights/Qwen-Audio"], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}, timeout=120)
    assert done.returncode == 3 and "error: no checkpoint at weights/Qwen-Audio: no such directory" in done.stderr
    assert "pip install huggingface_hub" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_budget_past_the_context_is_cut_with_a_warning_line(tiny_ckpt, audio_dir, tmp_path):
    """On a copy of the tiny checkpoint whose context is 64 positions (the tiny model never stops by itself)."""
    small = shutil.copytree(tiny_ckpt, tmp_path / "small")
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    done = qwenaudio_cli("transcribe", audio_dir / "speech.wav", "--model", small, "--max-new-tokens", "1000000000",
                         "--device", "cpu", home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert ("warning: max_new_tokens=1000000000 is cut to 6: the prompt's 58 tokens and the new ones must fit the "
            "model's context of 64 (max_position_embeddings)\n") in done.stderr
    assert "UserWarning" not in done.stderr


# --- issue 23: an output is never an input nor someone else's file; outputs keyed on the model and settings --------

def transcribe_args(*args) -> list[str]:
    return ["transcribe", *map(str, args), "--device", "cpu", "--max-new-tokens", "4"]


def test_transcribing_a_folder_into_itself_keeps_the_user_s_files(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """`transcribe DIR --format all --output-dir DIR` where DIR holds the user's own rec1.json and summary.json:
    refused before the model loads, naming them; --overwrite replaces them; a rerun then skips what it wrote."""
    from qwenaudio import cli

    folder = tmp_path / "recordings"
    folder.mkdir()
    write_wav(folder / "rec1.wav", seed=0)
    mine = {"rec1.json": '{"my": "notes"}\n', "summary.json": '{"my": "summary"}\n'}
    for name, text in mine.items():
        (folder / name).write_text(text)
    run = transcribe_args(folder, "--format", "all", "--output-dir", folder, "--model", tiny_ckpt)
    with monkeypatch.context() as m:
        m.setattr(cli, "load", lambda *a, **k: pytest.fail("the model was loaded"))
        assert cli.main(run) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(folder / "summary.json") in err and "--overwrite" in err
        (folder / "summary.json").unlink()
        assert cli.main(run) == 1
        err = capsys.readouterr().err
        assert f"{folder / 'rec1.json'} exists and was not written by qwenaudio transcribe" in err
        assert (folder / "rec1.json").read_text() == mine["rec1.json"]
    assert cli.main([*run, "--overwrite"]) == 0
    assert json.loads((folder / "rec1.json").read_text())["file"] == str(folder / "rec1.wav")
    record = json.loads((folder / "summary.json").read_text())
    assert record["command"] == "transcribe" and sorted(record["outputs"]) == [f"rec1.{f}" for f in
                                                                               ("json", "srt", "txt", "vtt")]
    assert cli.main(run) == 0
    assert json.loads((folder / "summary.json").read_text())["skipped"] == [str(folder / "rec1.wav")]


def test_an_output_that_is_the_model_s_file_is_refused_even_with_overwrite(tiny_ckpt, tmp_path, monkeypatch,
                                                                          capsys):
    from qwenaudio import cli

    model = shutil.copytree(tiny_ckpt, tmp_path / "model")
    before = (model / "config.json").read_bytes()
    (tmp_path / "in" / "model").mkdir(parents=True)
    write_wav(tmp_path / "in" / "model" / "config.wav", seed=0)  # its output: OUT/model/config.json
    monkeypatch.setattr(cli, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    for extra in ([], ["--overwrite"]):
        assert cli.main(transcribe_args(tmp_path / "in", "--format", "json", "--output-dir", tmp_path,
                                        "--model", model, *extra)) == 1
        assert "would replace the input" in capsys.readouterr().err
        # the model's directory itself as --output-dir is refused before any output is named
        assert cli.main(transcribe_args(tmp_path / "in", "--format", "json", "--output-dir", model,
                                        "--model", model, *extra)) == 1
        assert "is the model's directory" in capsys.readouterr().err
    assert (model / "config.json").read_bytes() == before


def test_outputs_of_another_model_or_other_settings_are_refused(tiny_ckpt, tmp_path, vocab_file, capsys):
    """Not "skipped": another task, language, dtype or weights under the same path would mix two runs' outputs."""
    from qwenaudio import cli

    model = shutil.copytree(tiny_ckpt, tmp_path / "model")
    wav, out = write_wav(tmp_path / "a.wav", seed=0), tmp_path / "out"
    run = transcribe_args(wav, "--output-dir", out, "--model", model, "--dtype", "float32")
    assert cli.main(run) == 0
    capsys.readouterr()
    for extra, difference in ((["--language", "de"], "language: 'en' then, 'de' now"),
                              (["--task", "caption"], "task: 'transcribe' then, 'caption' now"),
                              (["--timestamps"], "timestamps: False then, True now"),
                              (["--int8"], "quantization: None then, 'int8' now")):
        assert cli.main([*run, *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("error: ") == 1 and difference in err and "--overwrite" in err, err
    assert cli.main(["bfloat16" if x == "float32" else x for x in run]) == 2
    assert "dtype: 'float32' then, 'bfloat16' now" in capsys.readouterr().err
    shutil.rmtree(model)
    make_tiny_checkpoint(model, seed=1, vocab_file=vocab_file)
    assert cli.main(run) == 2
    assert "model_fingerprint: '" in capsys.readouterr().err
    assert cli.main([*run, "--overwrite"]) == 0
    assert json.loads((out / "summary.json").read_text())["done"] == [str(wav)]


def test_a_killed_run_knows_its_own_outputs(tiny_ckpt, audio_dir, tmp_path, monkeypatch):
    """A run killed before its summary (here: an exception no handler takes) has claimed its outputs in
    summary.json before writing any: the rerun skips them as its own and does the rest."""
    from qwenaudio import cli

    calls, real_run_task = [], cli.transcribe.run_task

    def dies_on_second_batch(model, jobs, clips, args):
        calls.append(jobs)
        if len(calls) == 2:
            raise SystemExit("killed")
        return real_run_task(model, jobs, clips, args)

    files_in = [audio_dir / "speech.wav", audio_dir / "other.wav"]
    run = transcribe_args(*files_in, "--batch-size", "1", "--output-dir", tmp_path / "out", "--model", tiny_ckpt)
    monkeypatch.setattr(cli.transcribe, "run_task", dies_on_second_batch)
    with pytest.raises(SystemExit):
        cli.main(run)
    assert not json.loads((tmp_path / "out" / "summary.json").read_text())["finished"]
    monkeypatch.setattr(cli.transcribe, "run_task", real_run_task)
    assert cli.main(run) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert len(summary["skipped"]) == 1 and len(summary["done"]) == 1 and summary["finished"]


def test_subtitles_of_a_reply_without_timestamps_show_its_text():
    """One cue over the window instead of an empty zero-length one; a last word without a closing stamp lasts to
    the end of its window."""
    from qwenaudio.cli.transcribe import render
    from qwenaudio.longform import Segment
    from qwenaudio.subtitles import Word

    untimed = [Segment("hello world", 0.0, 2.5)]
    assert render("srt", Path("a.wav"), "hello world", [], untimed, "transcribe") == (
        "1\n00:00:00,000 --> 00:00:02,500\nhello world\n")
    assert render("vtt", Path("a.wav"), "", [], [Segment("", 0.0, 2.5)], "transcribe") == "WEBVTT\n\n"
    words = [Word("hello", 0.2, 0.6), Word("world", 0.8, 0.8)]
    timed = [Segment("hello world", 0.0, 2.5, words)]
    assert render("vtt", Path("a.wav"), "hello world", words, timed, "transcribe") == (
        "WEBVTT\n\n00:00:00.200 --> 00:00:00.600\nhello\n\n00:00:00.800 --> 00:00:02.500\nworld\n")


def test_every_module_of_the_command_package_is_a_command_listed_in_commands():
    """Adding a command is cli/NAME.py (PARSER, add_arguments, plan, run) and its module in COMMANDS: README says so.
    The plans are frozen: what a command found before loading cannot change while it runs."""
    import dataclasses
    import inspect
    import pkgutil

    from qwenaudio import cli
    from qwenaudio.cli.options import Plan

    modules = {m.name for m in pkgutil.iter_modules(cli.__path__)} - {"options"}
    assert set(cli.COMMANDS) == modules
    for name, command in cli.COMMANDS.items():
        assert {"help", "description"} <= set(command.PARSER), name
        assert all(callable(getattr(command, f)) for f in ("add_arguments", "plan", "run")), name
        plan = inspect.signature(command.plan).return_annotation
        plans = [v for v in vars(command).values() if inspect.isclass(v) and issubclass(v, Plan) and v is not Plan]
        assert len(plans) == 1 and plans[0].__name__ == plan and plans[0].__dataclass_params__.frozen, name
        assert dataclasses.is_dataclass(plans[0])
