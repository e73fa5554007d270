"""The shortest clip a model hears is its family's: a Qwen2-Audio clip of 321-479 samples (under Qwen-Audio's 480)
is taken by every path that reads clips (tasks, the transcribe and trace commands, evaluation, fine-tuning data),
and Qwen-Audio still refuses it with its own count."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch

import qwenaudio
from qwenaudio import evaluation, finetune, tasks
from qwenaudio.finetune.data import batch_inputs
from qwenaudio.core.audio import MIN_SAMPLES, QWEN2_MIN_SAMPLES

from .test_lora import run
from .test_evaluation import write_rows

SHORT = 400  # between Qwen2-Audio's 321 and Qwen-Audio's 480
CPU32 = ("--device", "cpu", "--dtype", "float32", "--max-new-tokens", "2")


@pytest.fixture(scope="module")
def model(tiny_qwen2_ckpt):
    return qwenaudio.load(tiny_qwen2_ckpt, dtype=torch.float32, progress=False)


@pytest.fixture
def short_wav(tmp_path):
    path = tmp_path / "short.wav"
    sf.write(path, 0.1 * np.random.default_rng(0).standard_normal(SHORT).astype(np.float32), 16000, subtype="FLOAT")
    return path


def test_the_minimums_are_what_the_encoders_say(model, tiny_ckpt):
    assert QWEN2_MIN_SAMPLES < SHORT < MIN_SAMPLES
    assert model.encoder.min_samples == QWEN2_MIN_SAMPLES
    assert qwenaudio.load(tiny_ckpt, progress=False).encoder.min_samples == MIN_SAMPLES


def test_tasks_take_it_and_qwen_audio_refuses_it(model, tiny_ckpt, short_wav):
    assert isinstance(tasks.transcribe(model, short_wav, max_new_tokens=2), str)
    v1 = qwenaudio.load(tiny_ckpt, dtype=torch.float32, progress=False)
    with pytest.raises(qwenaudio.AudioError, match=rf"short.wav: {SHORT} samples .* at least {MIN_SAMPLES} samples"):
        tasks.transcribe(v1, short_wav, max_new_tokens=2)


def test_the_transcribe_command_takes_it(tiny_qwen2_ckpt, short_wav, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run(capsys, "transcribe", short_wav, "--model", tiny_qwen2_ckpt, "--format", "json",
                    "--output-dir", out, *CPU32)
    assert code == 0 and "1 done, 0 skipped (outputs exist), 0 failed" in err, err
    assert json.loads((out / "short.json").read_text())["task"] == "transcribe"


def test_the_trace_command_takes_it(tiny_qwen2_ckpt, short_wav, tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    code, err = run(capsys, "trace", "--prompt", "<|audio_bos|><|AUDIO|><|audio_eos|>Generate the caption in English:",
                    "--audio", short_wav, "--out", out, "--model", tiny_qwen2_ckpt, "--dtype", "float32",
                    "--device", "cpu")
    assert code == 0 and out.exists(), err


def test_evaluation_takes_it(model, short_wav, tmp_path):
    data = write_rows(tmp_path / "librispeech.jsonl", [
        {"audio": str(short_wav), "source": "librispeech_a", "gt": "hello",
         "prompt": "Detect the language and recognize the speech: <|en|>"}])
    examples, problems = evaluation.read_benchmark("librispeech", data)
    assert len(examples) == 1 and problems == []
    summary = evaluation.evaluate(model, "librispeech", data, tmp_path / "run", max_new_tokens=2)
    assert summary["complete"] and summary["failed"] == [], summary


def test_finetune_data_takes_it(model, short_wav, tmp_path):
    examples, problems = finetune.read_examples(write_rows(tmp_path / "t.jsonl", [
        {"audio": str(short_wav), "prompt": "Generate the caption in English:", "response": "noise"}]))
    assert len(examples) == 1 and problems == []
    ids, labels, mask, clips = batch_inputs(model, examples)
    assert [len(c) for c in clips] == [SHORT] and ids.shape == labels.shape == mask.shape
