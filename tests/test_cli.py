"""The `qwenaudio` command end to end, as a user runs it: `python -m qwenaudio …` in a subprocess, on tiny
checkpoints and generated WAV files. Each run pays for importing torch (~1.5 s), so checkpoints and audio are made
once per session and every run caps generation with --max-new-tokens.
"""

import json
import os
import shutil
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


def test_bad_file_is_reported_and_the_others_go_on(tiny_ckpt, audio_dir, tmp_path):
    files = [audio_dir / "speech.wav", audio_dir / "bad.wav", audio_dir / "other.wav"]
    done = qwenaudio_cli("transcribe", *files, "--batch-size", "2", "--model", tiny_ckpt,
                         "--output-dir", tmp_path / "out", *FAST, home=tmp_path)
    assert done.returncode == 1
    assert f"error: {audio_dir / 'bad.wav'}: " in done.stderr
    assert "[2/3] " in done.stderr and "[3/3] " in done.stderr  # a progress line per batch
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["other.txt", "speech.txt", "summary.json"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["done"] == 2 and len(summary["failed"]) == 1 and summary["failed"][0].startswith(str(files[1]))
    assert done.stdout.startswith(f"{files[0]}: ") and f"\n{files[2]}: " in done.stdout


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


def test_subtitles_need_the_transcribe_task(tiny_ckpt, audio_dir, tmp_path):
    done = qwenaudio_cli("transcribe", audio_dir / "speech.wav", "--task", "caption", "--format", "srt",
                         "--model", tiny_ckpt, home=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("usage: qwenaudio transcribe") and "--task transcribe" in done.stderr


def test_missing_model_says_how_to_get_the_weights(audio_dir, tmp_path):
    done = qwenaudio_cli("transcribe", audio_dir / "speech.wav", "--model", tmp_path / "no-such-model",
                         home=tmp_path)
    assert done.returncode == 3
    assert "no-such-model" in done.stderr and "qwenaudio.download('Qwen/Qwen-Audio')" in done.stderr
    assert "Traceback" not in done.stderr


def test_chat_streams_a_reply_per_question(chat_ckpt, audio_dir, tmp_path):
    wav = audio_dir / "speech.wav"
    done = qwenaudio_cli("chat", "--model", chat_ckpt, "--max-new-tokens", "4", "--device", "cpu", home=tmp_path,
                         stdin=f"/audio {wav}\nwhat is it?\nand now?\n/quit\nnot asked\n")
    assert done.returncode == 0, done.stderr
    chat = Chat(qwenaudio.load(chat_ckpt, device="cpu", progress=False))
    first = chat.ask([{"audio": str(wav)}, "what is it?"], max_new_tokens=4)
    second = chat.ask("and now?", max_new_tokens=4)
    assert done.stdout == f"{first}\n{second}\n"  # no "> " prompt: stdin is not a terminal


def test_real_recordings_of_two_rates_in_one_batch(tiny_ckpt, shared_audio, tmp_path):
    files = [shared_audio / "1272-128104-0000.flac", shared_audio / "glass-breaking-151256.mp3"]  # 16 and 48 kHz
    done = qwenaudio_cli("transcribe", *files, "--model", tiny_ckpt, *FAST, home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "[2/2] " in done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith(str(shared_audio))]
    assert [line.split(": ")[0] for line in lines] == [str(f) for f in files]


def test_quantize_then_transcribe_in_int8(tiny_ckpt, audio_dir, tmp_path):
    """`quantize` writes an int8 checkpoint that `transcribe` loads in int8 with no flag; `--int8` on the original
    quantizes while loading, to the same weights."""
    wav = audio_dir / "speech.wav"
    done = qwenaudio_cli("quantize", tiny_ckpt, tmp_path / "int8", home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "int8" / "config.json").read_text())["quantization"] == "int8-weight-only"
    expected = tasks.transcribe(qwenaudio.load(tiny_ckpt, int8=True, progress=False), [wav], max_new_tokens=8)[0]
    stored = qwenaudio_cli("transcribe", wav, "--model", tmp_path / "int8", *FAST, home=tmp_path)
    on_load = qwenaudio_cli("transcribe", wav, "--model", tiny_ckpt, "--int8", *FAST, home=tmp_path)
    assert stored.stdout == on_load.stdout == expected + "\n"
    missing = qwenaudio_cli("quantize", tmp_path / "nowhere", tmp_path / "x", home=tmp_path)
    assert missing.returncode == 3 and "nowhere" in missing.stderr


def test_quantize_into_itself_is_refused_and_changes_nothing(tiny_ckpt, tmp_path):
    source = shutil.copytree(tiny_ckpt, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    for args in ([source, source], [source, source, "--overwrite"], [tiny_ckpt, source]):
        done = qwenaudio_cli("quantize", *args, home=tmp_path)
        assert done.returncode == 2 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr
        assert {p.name: p.read_bytes() for p in source.iterdir()} == before
