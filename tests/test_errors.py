"""README: every error on bad input is a `QwenAudioError` that names the argument at fault. Each public entry point
of tasks, chat, trace, the tokenizer, audio and the configs is called with a wrong type (or an impossible value)
and must raise one, never a TypeError or AttributeError from inside."""

import os

import numpy as np
import pytest
import torch

import qwenaudio
from qwenaudio import (AudioError, GenerationConfig, InputError, QwenAudioConfig, QwenAudioError, Tokenizer, load_audio,
                       tasks, trace)
from qwenaudio.chat import Chat, chat, query_text
from qwenaudio.core.audio import MIN_SAMPLES, as_waveform, log_mel_spectrogram
from qwenaudio.longform import plan_windows
from qwenaudio.testing import make_tiny_checkpoint

from .conftest import GOLDEN

CLIP = str(GOLDEN / "clip0.wav")
REFERENCE = GOLDEN / "trace_official.safetensors"
WAVE = load_audio(CLIP)


@pytest.fixture(scope="module")
def models(tmp_path_factory, vocab_file):
    """(base, chat) tiny models in fp32."""
    root = tmp_path_factory.mktemp("errors")
    return tuple(qwenaudio.load(make_tiny_checkpoint(root / name, vocab_file=vocab_file, chat=name == "chat"),
                                dtype=torch.float32, progress=False) for name in ("base", "chat"))


# (what is called, a regex the message must match); `m` is the base model, `c` the chat model, `tok` a tokenizer.
CASES = {
    "transcribe model": (lambda m, c, tok: tasks.transcribe("notamodel", CLIP), r"model must be a QwenAudio model.*"
                                                                                 r"qwenaudio.load\('notamodel'\)"),
    "transcribe clip": (lambda m, c, tok: tasks.transcribe(m, 123), r"audio source must be a path.*got int 123"),
    "transcribe clip in a batch": (lambda m, c, tok: tasks.transcribe(m, [CLIP, None]), r"audio source must be"),
    "transcribe language": (lambda m, c, tok: tasks.transcribe(m, CLIP, language=1), r"language 1 has no tag"),
    "transcribe language list": (lambda m, c, tok: tasks.transcribe(m, CLIP, language=["en"]), r"language"),
    "transcribe itn": (lambda m, c, tok: tasks.transcribe(m, CLIP, itn="yes"), r"itn must be True or False"),
    "transcribe timestamps": (lambda m, c, tok: tasks.transcribe(m, CLIP, timestamps=1), r"timestamps must be True"),
    "transcribe budget": (lambda m, c, tok: tasks.transcribe(m, CLIP, max_new_tokens="5"), r"max_new_tokens"),
    "transcribe unknown setting": (lambda m, c, tok: tasks.transcribe(m, CLIP, beams=2), r"unknown generation"),
    "translate target": (lambda m, c, tok: tasks.translate(m, CLIP, target=None), r"language None has no tag"),
    "answer question": (lambda m, c, tok: tasks.answer(m, CLIP, 123), r"question must be a str"),
    "answer model": (lambda m, c, tok: tasks.answer(None, CLIP, "why?"), r"model must be a QwenAudio"),
    "analyse task": (lambda m, c, tok: tasks.analyse(m, CLIP, ["caption"]), r"unknown task \['caption'\]"),
    "caption model": (lambda m, c, tok: tasks.caption("m", CLIP), r"model must be a QwenAudio"),
    "note_analysis model": (lambda m, c, tok: tasks.note_analysis(3, CLIP), r"model must be a QwenAudio"),
    "run task": (lambda m, c, tok: tasks.run(m, CLIP, "caption"), r"task must be a prompts.Prompt"),
    "segments progress": (lambda m, c, tok: tasks.segments(m, CLIP, tasks.asr_task(), progress=5),
                          r"progress must be a function"),
    "question_task": (lambda m, c, tok: tasks.question_task(b"why"), r"question must be a str"),
    "Chat model": (lambda m, c, tok: Chat("Qwen/Qwen-Audio-Chat"), r"model must be a QwenAudio"),
    "Chat system": (lambda m, c, tok: Chat(c, system=5), r"system must be a str"),
    "Chat history": (lambda m, c, tok: Chat(c, history="hi"), r"history must be a list of \(query, reply\)"),
    "ask query": (lambda m, c, tok: Chat(c).ask(123), r"query must be a str or a list of parts .*got int 123"),
    "ask part": (lambda m, c, tok: Chat(c).ask([{"audio": 5}, "hi"]), r"an audio part's path must be a str"),
    "ask text part": (lambda m, c, tok: Chat(c).ask([{"text": None}]), r"a text part's text must be a str"),
    "ask missing clip": (lambda m, c, tok: Chat(c).ask([{"audio": "missing.wav"}, "hi"]), r"missing.wav: no such"),
    "ask budget": (lambda m, c, tok: Chat(c).ask("hi", max_new_tokens=0), r"max_new_tokens must be an int >= 1"),
    "stream query": (lambda m, c, tok: next(Chat(c).stream(None)), r"query must be a str"),
    "chat history": (lambda m, c, tok: chat(c, "hi", history=[("only a query",)]), r"history must be a list of"),
    "chat history types": (lambda m, c, tok: chat(c, "hi", history=[(1, 2)]), r"history must be a list of"),
    "chat model": (lambda m, c, tok: chat("c", "hi"), r"model must be a QwenAudio"),
    "query_text": (lambda m, c, tok: query_text(5), r"query must be a str or a list of parts"),
    "record prompt": (lambda m, c, tok: trace.record(m, 123), r"prompt must be text.*got int 123"),
    "record model": (lambda m, c, tok: trace.record("m", "hi"), r"model must be a QwenAudio"),
    "record project": (lambda m, c, tok: trace.record(m, "hi", project="8"), r"project must be a positive int"),
    "compare": (lambda m, c, tok: trace.compare("ours", "ref"), r"ours must be a Trace"),
    "compare rtol": (lambda m, c, tok: trace.compare(trace.Trace.load(REFERENCE), trace.Trace.load(REFERENCE),
                                                     rtol=float("nan")), r"rtol must be a finite number >= 0"),
    "compare atol": (lambda m, c, tok: trace.compare(trace.Trace.load(REFERENCE), trace.Trace.load(REFERENCE),
                                                     atol="0"), r"atol must be a finite number >= 0"),
    "isolate": (lambda m, c, tok: trace.isolate(m, "ref.safetensors"), r"reference must be a Trace"),
    "Trace.load": (lambda m, c, tok: trace.Trace.load(123), r"path must be a trace file's path"),
    "Tokenizer path": (lambda m, c, tok: Tokenizer(123), r"vocab_file must be a path"),
    "Tokenizer.from_pretrained": (lambda m, c, tok: Tokenizer.from_pretrained(None), r"path must be"),
    "encode": (lambda m, c, tok: tok.encode(123), r"text must be a str"),
    "encode spans": (lambda m, c, tok: tok.encode("<audio>a</audio>", audio_spans=["5"]), r"audio span '5'"),
    "decode": (lambda m, c, tok: tok.decode("abc"), r"ids must be a sequence of token ids"),
    "timestamp_id": (lambda m, c, tok: tok.timestamp_id("1.5"), r"seconds must be a number"),
    "timestamp_id nan": (lambda m, c, tok: tok.timestamp_id(float("nan")), r"seconds must be a number"),
    "audio_paths": (lambda m, c, tok: tok.audio_paths(None), r"text must be a str"),
    "encode_batch": (lambda m, c, tok: tok.encode_batch([1]), r"text must be a str"),
    "load_audio int": (lambda m, c, tok: load_audio(123), r"audio source must be a path.*got int 123"),
    "load_audio None": (lambda m, c, tok: load_audio(None), r"audio source must be a path"),
    "load_audio list": (lambda m, c, tok: load_audio([0.0] * 800), r"audio source must be a path"),
    "load_audio rate": (lambda m, c, tok: load_audio(np.zeros(800), source_sr="16000"), r"sample rate"),
    "as_waveform": (lambda m, c, tok: as_waveform(1.5, "clip 0", MIN_SAMPLES), r"audio source must be a path"),
    "log_mel_spectrogram": (lambda m, c, tok: log_mel_spectrogram(CLIP), r"audio must be a torch.Tensor"),
    "plan_windows": (lambda m, c, tok: plan_windows(CLIP), r"audio must be a 1-D torch.Tensor"),
    "GenerationConfig": (lambda m, c, tok: GenerationConfig(top_k="5"), r"top_k must be an int"),
    "GenerationConfig.from_json": (lambda m, c, tok: GenerationConfig.from_json(5), r"path must be"),
    "QwenAudioConfig.from_json": (lambda m, c, tok: QwenAudioConfig.from_json(None), r"path must be"),
    "QwenAudioConfig.from_dict": (lambda m, c, tok: QwenAudioConfig.from_dict([1, 2]), r"expected a JSON object"),
    "load_checkpoint": (lambda m, c, tok: qwenaudio.load_checkpoint(123), r"path must be a path.*got int 123"),
    "load_checkpoint config": (lambda m, c, tok: qwenaudio.load_checkpoint(CLIP, config={}), r"config must be a Qwen"),
    "save_checkpoint state": (lambda m, c, tok: qwenaudio.save_checkpoint([1], "unused"), r"state must be a dict"),
    "save_checkpoint tensors": (lambda m, c, tok: qwenaudio.save_checkpoint({"w": 1}, "unused"),
                                r"state\['w'\] must be a torch.Tensor"),
    "save_checkpoint directory": (lambda m, c, tok: qwenaudio.save_checkpoint({}, 123), r"directory must be a path"),
    "save_checkpoint shard size": (lambda m, c, tok: qwenaudio.save_checkpoint({}, "unused", max_shard_bytes=0),
                                   r"max_shard_bytes must be an int >= 1"),
    "tensor_shapes": (lambda m, c, tok: qwenaudio.tensor_shapes(123), r"config must be a QwenAudioConfig"),
    "QwenAudio config": (lambda m, c, tok: qwenaudio.QwenAudio("config", tok, m.generation_config),
                         r"config must be a QwenAudioConfig"),
    "QwenAudio tokenizer": (lambda m, c, tok: qwenaudio.QwenAudio(m.config, None, m.generation_config),
                            r"tokenizer must be a qwenaudio Tokenizer"),
    "Decoder config": (lambda m, c, tok: qwenaudio.Decoder(m.config.audio), r"config must be a QwenAudioConfig"),
    "AudioEncoder config": (lambda m, c, tok: qwenaudio.AudioEncoder(m.config), r"config must be an AudioConfig"),
    "encode_audio int": (lambda m, c, tok: m.encode_audio(123), r"clips must be a list of clips.*got int 123"),
    "encode_audio one path": (lambda m, c, tok: m.encode_audio(CLIP), r"clips must be a list of clips.*got str"),
    "encoder.encode": (lambda m, c, tok: m.encoder.encode("mel", [16000]), r"mel must be a torch.Tensor"),
    "encoder.encode lengths": (lambda m, c, tok: m.encoder.encode(torch.zeros(1, 80, 3000), 16000),
                       r"num_samples must be a list of ints"),
    "logits": (lambda m, c, tok: m.decoder.logits("x"), r"input_ids must be a torch.Tensor.*got str 'x'"),
    "logits mask": (lambda m, c, tok: m.decoder.logits(torch.tensor([[1]]), [1]), r"attention_mask must be"),
    "loss": (lambda m, c, tok: m.loss([1, 2], None), r"input_ids must be a torch.Tensor"),
    "loss labels": (lambda m, c, tok: m.loss(torch.tensor([[1]]), None), r"labels must be a torch.Tensor"),
    "forward": (lambda m, c, tok: m(None), r"input_ids must be a torch.Tensor"),
    "hub.cached": (lambda m, c, tok: qwenaudio.hub.cached(None), r"repo_id must be a Hugging Face repo id"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_wrong_type_is_a_qwenaudio_error_naming_the_argument(models, tokenizer, case):
    call, message = CASES[case]
    with pytest.raises(QwenAudioError, match=message):
        call(*models, tokenizer)


def test_an_integer_source_is_never_read_as_a_file_descriptor():
    """soundfile takes an int as an open file descriptor (load_audio(0) would read stdin): a wrong type that would
    silently read whatever file the number happens to name."""
    fd = os.open(CLIP, os.O_RDONLY)
    try:
        with pytest.raises(AudioError, match=f"audio source must be a path.*got int {fd}"):
            load_audio(fd)
    finally:
        os.close(fd)
    assert torch.equal(as_waveform(WAVE, "clip 0", MIN_SAMPLES), WAVE)  # a waveform still passes


def test_the_readme_examples_are_input_errors(models):
    with pytest.raises(InputError, match="model must be a QwenAudio model"):
        tasks.transcribe("notamodel", CLIP)
    with pytest.raises(InputError, match="query must be a str or a list of parts"):
        Chat(models[1]).ask(123)
