"""The library seams the server stands on: `tasks.perform` and the `generate=` seam, `tasks.reply_text` read while
a reply is still being made, `Chat(clips=...)` and `Chat.stop_token_ids`. The server's answers are compared with
these functions, so they are pinned here against the functions users already call."""

import io
import re

import pytest
import torch

import qwenaudio
from qwenaudio import AudioError, ConfigError, InputError, tasks
from qwenaudio.chat import Chat
from qwenaudio.core.audio import SAMPLE_RATE, as_waveform
from qwenaudio.core.config import MAX_SEED, GenerationConfig
from qwenaudio.core.generate import choose, process_logits
from qwenaudio.prompts import DEFAULT_SYSTEM, QWEN2_TASKS, QWEN_AUDIO_TASKS
from qwenaudio.testing import make_tiny_checkpoint

from .conftest import ROOT, reference

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
    """Qwen-Audio-Chat stops where the official chat does: <|endoftext|>, <|im_end|> and <|im_start|>."""
    tokenizer = chat_model.tokenizer
    assert set(Chat(chat_model).stop_token_ids) == {tokenizer.eod_id, tokenizer.im_end_id, tokenizer.im_start_id}
    assert instruct.tokenizer.im_end_id in Chat(instruct).stop_token_ids
    assert set(instruct.generation_config.stop_token_ids) <= set(Chat(instruct).stop_token_ids)


def test_chat_refuses_clips_it_cannot_hear(chat_model, wave):
    with pytest.raises(InputError, match="clips must be a mapping of names to 16 kHz waveforms"):
        Chat(chat_model, clips=[wave])
    with pytest.raises(InputError, match="a clip's name must be a str"):
        Chat(chat_model, clips={1: wave})
    with pytest.raises(AudioError, match="upload-2: 10 samples"):
        Chat(chat_model, clips={"upload-2": torch.zeros(10)})


# ------------------------------------------------------------------------------------- what a server's client writes

@pytest.mark.parametrize("path", [str(CLIP), "/no/such/file.wav"])
def test_a_chat_given_clips_opens_no_file(chat_model, wave, path):
    """A region naming a file, in the query (its tag split across parts), in the history or as a Qwen-Audio
    part, is refused before anything is read: no reply heard from the server's disk, and no "no such audio file"
    that would tell a client which files exist."""
    conversation = Chat(chat_model, clips={"upload-1": wave})
    refused = f"the conversation names the clip {path!r}, which is not one of its clips ('upload-1'): a Chat given "
    query = [{"text": "<aud"}, {"text": f"io>{path}</aud"}, {"text": "io>what is this?"}]  # parts: concatenated
    for ask in (lambda: conversation.ask(query, max_new_tokens=3), lambda: conversation.context(query),
                lambda: conversation.ask([{"audio": path}, {"text": "and this?"}], max_new_tokens=3),
                lambda: Chat(chat_model, history=[(f"<audio>{path}</audio>hi", "hello")],
                             clips={"upload-1": wave}).context("hi")):
        with pytest.raises(InputError, match=re.escape(refused)):
            ask()
    assert conversation.history == []
    settings = {"max_new_tokens": 4, "do_sample": False}
    assert conversation.ask([{"audio": "upload-1"}, {"text": "what is this?"}], **settings) == Chat(chat_model).ask(
        [{"audio": str(CLIP)}, {"text": "what is this?"}], **settings)  # its own clips it hears as files


def test_a_qwen2_chat_given_clips_opens_no_file(instruct, wave):
    with pytest.raises(InputError, match=re.escape(f"names the clip {str(CLIP)!r}, which is not one of its clips "
                                                   "('upload-1')")):
        Chat(instruct, clips={"upload-1": wave}).context([{"audio": str(CLIP)}, {"text": "what is this?"}])
    with pytest.raises(InputError, match=re.escape("which is not one of its clips (none)")):
        Chat(instruct, history=[([{"audio": str(CLIP)}], "a tone")], clips={}).context("and now?")


def test_a_qwen2_conversation_may_open_with_the_assistant(instruct, tiny_qwen2_instruct_ckpt, wave):
    """A history pair (None, reply) is the assistant's turn alone, as transformers' chat template renders a
    conversation that opens with the assistant."""
    transformers = reference("transformers")
    processor = transformers.Qwen2AudioProcessor(
        feature_extractor=transformers.WhisperFeatureExtractor(feature_size=128, sampling_rate=16000),
        tokenizer=transformers.AutoTokenizer.from_pretrained(tiny_qwen2_instruct_ckpt))
    conversation = [{"role": "assistant", "content": "Hello! Send me a clip."},
                    {"role": "user", "content": [{"type": "audio", "audio_url": "upload-1"},
                                                 {"type": "text", "text": "What is it?"}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert text.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>assistant\nHello!")
    theirs = processor(text=text, audio=[wave.numpy()], sampling_rate=16000, return_tensors="pt")["input_ids"]
    ours = Chat(instruct, history=[(None, "Hello! Send me a clip.")], clips={"upload-1": wave}).context(
        [{"audio": "upload-1"}, {"text": "What is it?"}])
    assert ours.ids == theirs[0].tolist() and ours.clips == ["upload-1"]


def test_a_qwen_audio_history_needs_a_question_before_each_reply(chat_model):
    with pytest.raises(InputError, match="history must be a list of \\(query, reply\\) pairs of str"):
        Chat(chat_model, history=[(None, "Hello!")])


def test_an_upload_that_is_not_audio_is_named_without_its_address(model):
    """soundfile names a file object by its repr ("<_io.BytesIO object at 0x…>"): the error names the upload."""
    for source in (b"just text, not a sound" * 20, io.BytesIO(b"just text, not a sound" * 20)):
        with pytest.raises(AudioError) as caught:
            as_waveform(source, "notes.wav", model.encoder.min_samples)
        assert str(caught.value) == "notes.wav: not a readable audio file (Format not recognised.)"


# ------------------------------------------------------------------------------------------- sampling settings

def test_a_top_p_that_rounds_to_0_keeps_the_best_token(model, wave):
    """top_p 1e-300 is 0 in float32: the best token alone is kept, so sampling is greedy, not a draw from NaN."""
    config = GenerationConfig(do_sample=True, top_p=1e-300)
    kept = process_logits(torch.tensor([[0.5, 3.0, -1.0, 2.9]]), torch.zeros(1, 0, dtype=torch.long), 0, config)
    assert torch.isfinite(kept).tolist() == [[False, True, False, False]]
    assert choose(kept, config, torch.Generator().manual_seed(0)).tolist() == [1]
    prompt = QWEN_AUDIO_TASKS.asr("en")
    assert tasks.run(model, wave, prompt, do_sample=True, top_p=1e-300, seed=3, **FAST) == tasks.run(
        model, wave, prompt, do_sample=False, **FAST)


@pytest.mark.parametrize("settings, message", [
    ({"do_sample": True, "temperature": 1e-40}, "temperature must be at least 1e-05, got 1e-40: below it sampling is "
     "greedy in effect, and logits / temperature can overflow float32; for greedy decoding use do_sample=False"),
    ({"temperature": 5e-324}, "temperature must be at least 1e-05, got 5e-324"),
    ({"seed": MAX_SEED + 1}, "seed must be at most 2**64 - 1 (torch.Generator's largest), got 18446744073709551616"),
])
def test_settings_the_sampler_cannot_run_are_refused(settings, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        GenerationConfig(**settings)


def test_the_bounds_are_the_samplers(model, wave):
    """The smallest temperature samples finite logits; the largest seed is torch's, and one more is not."""
    config = GenerationConfig(do_sample=True, temperature=1e-5, seed=MAX_SEED)
    logits = process_logits(torch.tensor([[30.0, -30.0, 29.9]]), torch.zeros(1, 0, dtype=torch.long), 0, config)
    assert torch.isfinite(logits).all()
    torch.Generator().manual_seed(config.seed)
    with pytest.raises((RuntimeError, ValueError), match="Overflow"):
        torch.Generator().manual_seed(MAX_SEED + 1)
    reply, = tasks.run(model, wave, QWEN_AUDIO_TASKS.asr("en"), do_sample=True, seed=MAX_SEED, **FAST)
    assert len(reply) > 0
