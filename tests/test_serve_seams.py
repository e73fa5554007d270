"""The library seams the server stands on: `tasks.perform` and the `generate=` seam, `tasks.reply_text` read while
a reply is still being made, `Chat(clips=...)` and `Chat.stop_token_ids`. The server's answers are compared with
these functions, so they are pinned here against the functions users already call."""

import pytest
import torch

import qwenaudio
from qwenaudio import AudioError, InputError, tasks
from qwenaudio.chat import Chat
from qwenaudio.core.audio import SAMPLE_RATE
from qwenaudio.prompts import QWEN2_TASKS, QWEN_AUDIO_TASKS
from qwenaudio.testing import make_tiny_checkpoint

from .conftest import ROOT

CLIP = ROOT / "tests" / "golden" / "clip1.wav"
FAST = {"max_new_tokens": 5}


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return qwenaudio.load(tiny_ckpt, dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def qwen2(tiny_qwen2_ckpt):
    return qwenaudio.load(tiny_qwen2_ckpt, dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, vocab_file):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("chat") / "ckpt", vocab_file=vocab_file, chat=True)
    return qwenaudio.load(path, dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def instruct(tiny_qwen2_instruct_ckpt):
    return qwenaudio.load(tiny_qwen2_instruct_ckpt, dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def wave():
    return qwenaudio.load_audio(CLIP)


@pytest.fixture(scope="module")
def long_wave(shared_audio):
    """35 s: three real recordings end to end, past the 30 s a window holds."""
    parts = [qwenaudio.load_audio(shared_audio / name) for name in
             ("1272-128104-0000.flac", "1089_134686_000007_000004.wav", "es.mp3", "music.wav")]
    return torch.cat(parts)[: 35 * SAMPLE_RATE]


@pytest.mark.parametrize("task, call", [
    ("transcribe", lambda m, a: tasks.transcribe(m, a, **FAST)),
    ("translate", lambda m, a: tasks.translate(m, a, source="en", target="zh", **FAST)),
    ("caption", lambda m, a: tasks.caption(m, a, **FAST)),
    ("note_analysis", lambda m, a: tasks.note_analysis(m, a, **FAST)),
])
def test_perform_gives_what_the_task_functions_give(model, wave, task, call):
    result, = tasks.perform(model, [wave], task, language="en", target_language="zh", **FAST)
    assert result.text == call(model, wave)
    assert [(s.start, s.end) for s in result.segments] == [(0.0, len(wave) / SAMPLE_RATE)]


def test_perform_times_words_as_transcribe_does(model, wave):
    result, = tasks.perform(model, [wave], "transcribe", timestamps=True, max_new_tokens=12)
    assert result.words == tasks.transcribe(model, wave, timestamps=True, max_new_tokens=12)
    assert result.text == " ".join(w.text for w in result.words)


def test_perform_stitches_a_long_recording_as_transcribe_does(model, long_wave):
    result, = tasks.perform(model, [long_wave], "transcribe", **FAST)
    assert len(result.segments) == 2 and result.segments[-1].end == pytest.approx(35.0)
    assert result.text == tasks.transcribe(model, long_wave, **FAST)


def test_perform_on_qwen2_audio(qwen2, wave):
    transcript, = tasks.perform(qwen2, [wave], "transcribe", language=None, **FAST)
    assert transcript.text == tasks.transcribe(qwen2, wave, language=None, **FAST)
    caption, = tasks.perform(qwen2, [wave], "caption", **FAST)
    assert caption.text == tasks.caption(qwen2, wave, **FAST)


def test_the_generate_seam_answers_the_prompts(model, wave):
    """Whatever `generate=` returns is the reply; given the model's own, the result is the default one, and it is
    asked exactly what `model.generate` would be."""
    asked = []

    def spy(prompts, clips, **settings):
        asked.append((prompts, [[len(c) for c in own] for own in clips], settings))
        return model.generate(prompts, clips, **settings)

    hello = model.tokenizer.encode(" hello world ")
    canned, = tasks.perform(model, [wave], "transcribe", generate=lambda prompts, clips, **_: [hello], **FAST)
    assert canned.text == "hello world"
    for task in ("transcribe", "caption"):
        asked.clear()
        assert tasks.perform(model, [wave, wave], task, generate=spy, **FAST) == tasks.perform(
            model, [wave, wave], task, **FAST)
        assert len(asked) == 1 and asked[0][1] == [[len(wave)], [len(wave)]]
        assert asked[0][2] == {"do_sample": False, "max_new_tokens": 5}


def test_task_prompt_is_the_familys(model, qwen2):
    assert tasks.task_prompt(model.family, "transcribe", language="en") == QWEN_AUDIO_TASKS.asr("en")
    assert tasks.task_prompt(qwen2.family, "translate", language="en", target_language="de") == \
        QWEN2_TASKS.translation("en", "de")
    assert tasks.task_prompt(model.family, "scene") == QWEN_AUDIO_TASKS.analyses["scene"]
    with pytest.raises(InputError, match="Qwen2-Audio has no timestamps; its base-model tasks are transcribe"):
        tasks.task_prompt(qwen2.family, "transcribe", timestamps=True)
    with pytest.raises(InputError, match="Qwen2-Audio has no task 'scene'"):
        tasks.task_prompt(qwen2.family, "scene")
    with pytest.raises(InputError, match="language 'xx' has no tag"):
        tasks.task_prompt(model.family, "transcribe", language="xx")


def test_a_partial_reply_only_ever_grows(qwen2):
    """A Qwen2-Audio transcript starts with a language tag the final text drops; read token by token, the text
    never shows a piece of the tag it would later take back, and ends as the whole reply reads."""
    prompt = QWEN2_TASKS.asr(None)
    reply = qwen2.tokenizer.encode("<|en|> Hello there, world.")
    final = tasks.reply_text(qwen2, prompt, reply)
    assert final == "Hello there, world."
    shown = ""
    for n in range(len(reply) + 1):
        text = tasks.reply_text(qwen2, prompt, reply[:n], partial=True)
        assert text.startswith(shown) and final.startswith(text)
        shown = text
    assert tasks.reply_text(qwen2, prompt, qwen2.tokenizer.encode("<|en"), partial=True) == ""


@pytest.mark.parametrize("family", ["qwen-audio", "qwen2-audio"])
def test_chat_hears_clips_given_in_memory_as_it_hears_files(chat_model, instruct, wave, family):
    model = chat_model if family == "qwen-audio" else instruct
    settings = {"max_new_tokens": 6, "do_sample": False}
    by_path, in_memory = Chat(model), Chat(model, clips={"upload-1": wave})
    for turn in range(2):
        text = "what is this?" if turn == 0 else "and now?"
        theirs = by_path.ask([{"audio": str(CLIP)}, {"text": text}], **settings)
        ours = in_memory.ask([{"audio": "upload-1"}, {"text": text}], **settings)
        assert ours == theirs
    assert in_memory.context("again").ids == by_path.context("again").ids


def test_chat_stop_token_ids(chat_model, instruct):
    assert Chat(chat_model).stop_token_ids == chat_model.generation_config.stop_token_ids
    assert instruct.tokenizer.im_end_id in Chat(instruct).stop_token_ids
    assert set(instruct.generation_config.stop_token_ids) <= set(Chat(instruct).stop_token_ids)


def test_chat_refuses_clips_it_cannot_hear(chat_model, wave):
    with pytest.raises(InputError, match="clips must be a mapping of names to 16 kHz waveforms"):
        Chat(chat_model, clips=[wave])
    with pytest.raises(InputError, match="a clip's name must be a str"):
        Chat(chat_model, clips={1: wave})
    with pytest.raises(AudioError, match="upload-2: 10 samples"):
        Chat(chat_model, clips={"upload-2": torch.zeros(10)})
