"""Task prompts (the official evaluation's, written out literally here), word timestamps, and the subtitle writers."""

import json

import pytest
import torch

import qwenaudio
from qwenaudio import InputError, prompts, tasks
from qwenaudio.core.audio import audio_span
from qwenaudio.subtitles import Word, to_json, to_srt, to_vtt

from .conftest import ROOT

CLIP = ROOT / "tests" / "golden" / "clip1.wav"  # 1.3 s: span 34

OFFICIAL_PROMPTS = {  # eval_audio/evaluate_*.py at e81cc26: the tags after </audio>, and the max new tokens
    "transcribe": ("<|startoftranscript|><|en|><|transcribe|><|en|><|notimestamps|><|wo_itn|>", 256),
    "transcribe_zh_itn": ("<|startoftranscript|><|zh|><|transcribe|><|zh|><|notimestamps|><|itn|>", 256),
    "timestamps": ("<|startoftranscript|><|en|><|transcribe|><|en|><|timestamps|><|0.00|>", 256),
    "translate": ("<|startoftranscript|><|en|><|translate|><|zh|><|notimestamps|><|itn|>", 256),
    "caption": ("<|startofanalysis|><|unknown|><|caption|><|en|><|notimestamps|><|caption_clotho|>", 30),
    "question": ("<|startofanalysis|><|en|><|question|>is it raining?<|answer|>", 4),
    "emotion": ("<|startofanalysis|><|en|><|keyword|><|en|><|notimestamps|><|emotion_recognition|>", 4),
    "vocal_sound": ("<|startofanalysis|><|en|><|keyword|><|en|><|notimestamps|><|vocal_classification|>", 4),
    "scene": ("<|startofanalysis|><|unknown|><|keyword|><|en|><|notimestamps|><|scene|>", 10),
    "note_analysis": ("<|startofanalysis|><|unknown|><|keyword|><|en|><|notimestamps|><|note_analysis|>", 30),
}
CALLS = {
    "transcribe": lambda m, a: tasks.transcribe(m, a),
    "transcribe_zh_itn": lambda m, a: tasks.transcribe(m, a, language="zh", itn=True),
    "timestamps": lambda m, a: tasks.transcribe(m, a, timestamps=True),
    "translate": lambda m, a: tasks.translate(m, a, source="en", target="zh"),
    "caption": tasks.caption,
    "question": lambda m, a: tasks.answer(m, a, "is it raining?"),
    "emotion": tasks.emotion,
    "vocal_sound": tasks.vocal_sound,
    "scene": tasks.scene,
    "note_analysis": tasks.note_analysis,
}


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return qwenaudio.load(tiny_ckpt, dtype=torch.float32, progress=False)


@pytest.mark.parametrize("name", OFFICIAL_PROMPTS)
def test_task_builds_the_official_prompt(model, monkeypatch, name):
    seen = {}

    def fake_generate(decoder, tokenizer, input_ids, *, attention_mask, audio, config, **_):
        seen.update(ids=input_ids.tolist(), mask=attention_mask.tolist(), spans=[len(a) for a in audio], config=config)
        return [[]] * input_ids.shape[0]

    monkeypatch.setattr(qwenaudio.core.model, "generate", fake_generate)  # what model.generate runs
    CALLS[name](model, str(CLIP))
    tags, max_new = OFFICIAL_PROMPTS[name]
    expected = model.tokenizer.encode(f"<audio>{CLIP}</audio>{tags}", audio_spans=[34])
    assert seen["ids"] == [expected] and seen["mask"] == [[1] * len(expected)] and seen["spans"] == [34]
    assert seen["config"].max_new_tokens == max_new and not seen["config"].do_sample  # greedy, as evaluated


def test_custom_tags_and_their_errors():
    assert prompts.tags("startofanalysis", "en", "keyword") == "<|startofanalysis|><|en|><|keyword|>"
    with pytest.raises(InputError, match=r"unknown tags: \['klingon'\]"):
        prompts.tags("startofanalysis", "klingon")
    with pytest.raises(InputError, match="language 'xx' has no tag; Qwen-Audio knows en, zh, de, es, ko, fr, ja, it"):
        tasks.asr_task("xx")
    with pytest.raises(InputError, match="unknown task 'karaoke'"):
        tasks.analyse(None, "clip.wav", "karaoke")


@pytest.mark.parametrize("old, new, value", [("Task", "tasks.Prompt", prompts.Prompt),
                                             ("TASKS", "tasks.ANALYSES", prompts.ANALYSES),
                                             ("tags", "prompts.tags", prompts.tags)])
def test_old_names_warn_and_still_work(old, new, value):
    with pytest.warns(DeprecationWarning, match=f"tasks.{old} is deprecated; use {new}"):
        assert getattr(tasks, old) is value
    with pytest.raises(AttributeError, match="has no attribute 'Tsak'"):
        tasks.Tsak


def test_the_old_custom_task_still_runs(model):
    with pytest.warns(DeprecationWarning):
        old = tasks.Task(tasks.tags("startofanalysis", "en", "keyword", "en", "notimestamps", "event"), 10)
    new = prompts.Prompt(prompts.tags("startofanalysis", "en", "keyword", "en", "notimestamps", "event"), 10)
    assert old == new and tasks.run(model, str(CLIP), old, max_new_tokens=2) == tasks.run(model, str(CLIP), new,
                                                                                            max_new_tokens=2)


def test_batch_returns_one_result_per_clip(model):
    one = tasks.transcribe(model, str(CLIP), max_new_tokens=4)
    two = tasks.transcribe(model, [str(CLIP), load_clip0()], max_new_tokens=4)
    assert isinstance(one, str) and isinstance(two, list) and len(two) == 2
    assert two[0] == one  # the longer clip of the batch is encoded as alone (docs/MODEL.md#batching)


def load_clip0():
    return qwenaudio.load_audio(ROOT / "tests" / "golden" / "clip0.wav")


def test_timestamps_give_words(model):
    words = tasks.transcribe(model, str(CLIP), timestamps=True, max_new_tokens=12)
    assert isinstance(words, list) and all(isinstance(w, Word) for w in words)


def ts(tokenizer, seconds):
    return tokenizer.timestamp_id(seconds)


def test_parse_words_from_the_official_format(tokenizer):
    """The official reply format, <|0.00|><|sil|><|0.54|>word<|0.86|>next<|1.17|>; the prompt supplied the <|0.00|>."""
    reply = [tokenizer.special_ids["<|sil|>"], ts(tokenizer, 0.54), *tokenizer.encode("word"), ts(tokenizer, 0.86),
             *tokenizer.encode("next"), ts(tokenizer, 1.17)]
    assert tasks.parse_words(tokenizer, reply) == [Word("word", 0.54, 0.86), Word("next", 0.86, 1.17)]
    cut = reply[:-1]  # generation stopped before the closing stamp
    assert tasks.parse_words(tokenizer, cut)[-1] == Word("next", 0.86, 0.86)


def test_prompt_span_comes_from_the_clip_length():
    assert audio_span(len(load_clip0())) == 14


WORDS = [Word("hello", 0.54, 0.86), Word("wörld", 61.005, 3723.5)]


def test_srt():
    assert to_srt(WORDS) == ("1\n00:00:00,540 --> 00:00:00,860\nhello\n\n"
                             "2\n00:01:01,005 --> 01:02:03,500\nwörld\n")


def test_vtt():
    assert to_vtt(WORDS) == ("WEBVTT\n\n00:00:00.540 --> 00:00:00.860\nhello\n\n"
                             "00:01:01.005 --> 01:02:03.500\nwörld\n")


def test_a_cue_never_holds_a_blank_line_which_would_end_it():
    said = [Word("one\n\n two", 0.0, 1.0), Word("\nthree\n", 1.0, 2.0)]
    assert to_srt(said) == "1\n00:00:00,000 --> 00:00:01,000\none\ntwo\n\n2\n00:00:01,000 --> 00:00:02,000\nthree\n"
    assert to_vtt(said) == ("WEBVTT\n\n00:00:00.000 --> 00:00:01.000\none\ntwo\n\n"
                            "00:00:01.000 --> 00:00:02.000\nthree\n")


def test_json():
    data = json.loads(to_json("hello wörld", WORDS, file="a.wav"))
    assert data == {"text": "hello wörld", "file": "a.wav",
                    "words": [{"text": "hello", "start": 0.54, "end": 0.86},
                              {"text": "wörld", "start": 61.005, "end": 3723.5}]}


@pytest.mark.parametrize("clip, message", [
    (torch.full((16000,), float("nan")), r"clip 0: the waveform contains NaN or infinite samples"),
    (torch.zeros(2, 16000), r"clip 0: a waveform tensor must be 1-D \[samples\] at 16 kHz, got shape \(2, 16000\); "
                            r"load_audio\(x, source_sr=RATE\) averages channels and resamples"),
    (torch.zeros(0), r"clip 0: the waveform is empty"),
    (torch.zeros(16000, dtype=torch.int16),
     r"clip 0: a waveform tensor must hold floats in \[-1, 1\], got torch.int16"),
])
def test_bad_waveforms_are_refused(model, clip, message):
    with pytest.raises(qwenaudio.AudioError, match=message):
        tasks.transcribe(model, clip)
    with pytest.raises(qwenaudio.AudioError, match=message.replace("clip 0", "clip 1")):
        tasks.caption(model, [torch.zeros(16000), clip])


def test_parse_words_keeps_times_inside_the_clip_and_in_order(tokenizer):
    """Stamps past the clip's end are clamped to it, and a stamp earlier than the one before it is moved up to
    it, so every word has start <= end and no word starts or ends before the previous one."""
    reply = [ts(tokenizer, 0.50), *tokenizer.encode("one"), ts(tokenizer, 2.80), *tokenizer.encode("two"),
             ts(tokenizer, 1.00), *tokenizer.encode("three"), ts(tokenizer, 29.00), *tokenizer.encode("four"),
             ts(tokenizer, 3.00)]
    assert tasks.parse_words(tokenizer, reply, duration=2.5) == [
        Word("one", 0.5, 2.5), Word("two", 2.5, 2.5), Word("three", 2.5, 2.5), Word("four", 2.5, 2.5)]
    assert tasks.parse_words(tokenizer, reply) == [  # without a duration: the 30 s the stamps can name
        Word("one", 0.5, 2.8), Word("two", 2.8, 2.8), Word("three", 2.8, 29.0), Word("four", 29.0, 29.0)]


def test_model_word_times_stay_inside_the_recording(model, monkeypatch, tokenizer):
    """Whatever stamps the model emits (here: every window claims words at 20-29.9 s and one stamp going back),
    the words of a 70 s recording lie inside it, each start <= end, in order; the subtitles run forward."""
    from qwenaudio.longform import plan_windows
    from qwenaudio.subtitles import to_srt

    reply = [ts(tokenizer, 20.0), *tokenizer.encode("a"), ts(tokenizer, 29.9), *tokenizer.encode("b"),
             ts(tokenizer, 12.0), *tokenizer.encode("c"), ts(tokenizer, 25.0)]
    monkeypatch.setattr(tasks, "run", lambda model, clips, task, **_: [reply for _ in clips])
    audio = torch.randn(70 * 16000, generator=torch.Generator().manual_seed(0)) * 0.1
    windows = plan_windows(audio)
    assert windows[-1].end - windows[-1].start < 20 * 16000  # the last window is shorter than the stamps
    words = tasks.transcribe(model, audio, timestamps=True)
    assert words and all(0 <= w.start <= w.end <= 70 for w in words)
    assert all(a.start <= b.start and a.end <= b.end for a, b in zip(words, words[1:]))
    clocks = [line.split(" --> ") for line in to_srt(words).splitlines() if " --> " in line]
    assert all(a <= b for a, b in clocks) and [c[0] for c in clocks] == sorted(c[0] for c in clocks)
    short = tasks.transcribe(model, audio[: 5 * 16000], timestamps=True)  # one window: clamped to its 5 s
    assert short == [Word("a", 5.0, 5.0), Word("b", 5.0, 5.0), Word("c", 5.0, 5.0)]
