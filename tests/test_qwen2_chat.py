"""Qwen2-Audio-Instruct chat against transformers 5.25.0 on the tiny Instruct checkpoint: the ids a `Chat` renders
equal the processor's (`apply_chat_template` with its default template, then the `<|AUDIO|>` expansion) for the
conversations it builds, its greedy replies equal `Qwen2AudioForConditionalGeneration.generate` on those ids, the
cached prefix of the previous turn gives the reply a fresh prefill gives, and `qwenaudio chat` runs it."""

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch

import qwenaudio
from qwenaudio import prompts
from qwenaudio.chat import Chat, chat
from qwenaudio.core import generate
from qwenaudio.prompts import DEFAULT_SYSTEM

from .conftest import ROOT, reference

CLIP0, CLIP1 = str(ROOT / "tests/golden/clip0.wav"), str(ROOT / "tests/golden/clip1.wav")
IM_END = 151645


@pytest.fixture(scope="module")
def clip2(tmp_path_factory):
    """A third clip, 3.2 s of a rising tone: longer than both golden clips."""
    path = tmp_path_factory.mktemp("qwen2-chat") / "tone.wav"
    t = np.arange(51_200) / 16_000
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * (220 + 60 * t) * t)).astype(np.float32), 16_000)
    return str(path)


@pytest.fixture(scope="module")
def instruct(tiny_qwen2_instruct_ckpt):
    return qwenaudio.load(tiny_qwen2_instruct_ckpt, dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def theirs(tiny_qwen2_instruct_ckpt):
    """transformers' model and processor on the same checkpoint; the processor's template is transformers' default
    (the published checkpoint has none on main)."""
    transformers = reference("transformers")
    model = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(tiny_qwen2_instruct_ckpt,
                                                                           dtype=torch.float32).eval()
    processor = transformers.Qwen2AudioProcessor(
        feature_extractor=transformers.WhisperFeatureExtractor(feature_size=128, sampling_rate=16000),
        tokenizer=transformers.AutoTokenizer.from_pretrained(tiny_qwen2_instruct_ckpt))
    return model, processor


def messages(system, history, query):
    """transformers' messages for a Chat's conversation: the system message, then (user, assistant) pairs."""
    def content(c):
        return c if isinstance(c, str) else [
            {"type": "audio", "audio_url": p["audio"]} if isinstance(p, dict) and "audio" in p
            else {"type": "text", "text": p if isinstance(p, str) else p["text"]} for p in c]

    turns = [(role, c) for user, reply in history for role, c in (("user", user), ("assistant", reply))]
    return [{"role": "system", "content": system},
            *({"role": role, "content": content(c)} for role, c in [*turns, ("user", query)])]


def their_inputs(processor, system, history, query):
    """The processor's inputs for the conversation: the template's text, then ids with each `<|AUDIO|>` expanded and
    the clips' features, the clips in the order the template numbers them."""
    conversation = messages(system, history, query)
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    clips = [part["audio_url"] for m in conversation if not isinstance(m["content"], str) for part in m["content"]
             if part["type"] == "audio"]
    audio = [qwenaudio.load_audio(c).numpy() for c in clips] or None
    return processor(text=text, audio=audio, sampling_rate=16000, return_tensors="pt"), clips


CONVERSATIONS = {  # (system, history, query): several turns, several clips per turn and across turns
    "one clip": (DEFAULT_SYSTEM, [], [{"audio": CLIP0}, "What do you hear?"]),
    "text only": ("You are a terse assistant.", [], "Hello, who are you?"),
    "two clips in a turn": (DEFAULT_SYSTEM, [], [{"audio": CLIP0}, {"audio": CLIP1}, {"text": "Compare them."}]),
    "clips across turns": (DEFAULT_SYSTEM, [([{"audio": CLIP0}, "What is it?"], "A short tone."),
                                            ("And louder?", "Much louder, 很响."),
                                            ([{"audio": "CLIP2"}, {"audio": CLIP1}], "Two more tones.")],
                           ["Which of the ", {"audio": CLIP1}, " is longer?"]),
    "typed markers": ("Be brief.", [("Say <|im_start|> please", "<|im_end|>?")], "Again: <|im_start|>"),
}


def with_clip2(value, clip2):
    """`value` with the placeholder "CLIP2" replaced by the generated clip's path."""
    if isinstance(value, dict):
        return {k: clip2 if v == "CLIP2" else v for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(with_clip2(v, clip2) for v in value)
    return value


@pytest.fixture(params=CONVERSATIONS)
def conversation(request, clip2):
    return with_clip2(CONVERSATIONS[request.param], clip2)


def test_context_equals_processor(instruct, theirs, conversation):
    system, history, query = conversation
    inputs, clips = their_inputs(theirs[1], system, history, query)
    context = Chat(instruct, system, history).context(query)
    assert context.ids == inputs["input_ids"][0].tolist()
    assert context.clips == clips


def recording_choices(monkeypatch):
    """Every id generation chooses, as chosen (the stop id included)."""
    chosen, original = [], generate.choose

    def record(logits, config, generator):
        ids = original(logits, config, generator)
        chosen.append(int(ids[0]))
        return ids

    monkeypatch.setattr(generate, "choose", record)
    return chosen


GREEDY = dict(do_sample=False, max_new_tokens=12)


def their_reply(theirs, system, history, query):
    model, processor = theirs
    inputs, _ = their_inputs(processor, system, history, query)
    with torch.no_grad():
        out = model.generate(**inputs, **GREEDY)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_greedy_turns_equal_transformers_generate(instruct, theirs, clip2, monkeypatch):
    """Three turns, clips in two of them: each reply's ids (the stop included) equal transformers' on the
    conversation so far, the history holding the replies as decoded, as a transformers user keeps them."""
    chosen = recording_choices(monkeypatch)
    conversation = Chat(instruct)
    for query in ([{"audio": CLIP0}, "What do you hear?"], "Tell me more.", [{"audio": clip2}, "And this?"]):
        expected = their_reply(theirs, DEFAULT_SYSTEM, conversation.history, query)
        chosen.clear()
        reply = conversation.ask(query, **GREEDY, full_vocab=True)
        assert chosen == expected
        assert reply == instruct.tokenizer.decode(expected, skip_special_tokens=True)
    assert len(conversation.history) == 3


def scripted_then_greedy(monkeypatch, reply):
    """Generation emits `reply` then <|im_end|> (the first turn), then chooses as usual; every prefill is recorded
    as (start, length, last logits)."""
    script, original_choose = [*reply, IM_END], generate.choose
    monkeypatch.setattr(generate, "choose", lambda logits, config, generator: torch.tensor([script.pop(0)])
                        if script else original_choose(logits, config, generator))
    prefills, original_prefill = [], generate.prefill

    def spy(decoder, session, ids, mask=None, audio=(), start=0):
        logits = original_prefill(decoder, session, ids, mask, audio, start)
        prefills.append((start, ids.shape[1], logits))
        return logits

    monkeypatch.setattr(generate, "prefill", spy)
    return prefills


@pytest.mark.parametrize("second", ["Say it again.", [{"audio": "CLIP2"}, "And this longer one?"]],
                         ids=["text", "a longer clip"])
def test_second_turn_prefills_only_new_tokens_and_replies_as_a_fresh_prefill(instruct, clip2, monkeypatch, second):
    """Qwen2-Audio's encoder reads each clip alone, so a turn that brings a longer clip reuses the cache too (Qwen-Audio
    recomputes then)."""
    second = with_clip2(second, clip2)
    prefills = scripted_then_greedy(monkeypatch, instruct.tokenizer.encode("A short tone."))
    conversation = Chat(instruct)
    assert conversation.ask([{"audio": CLIP1}, "What do you hear?"]) == "A short tone."
    reply = conversation.ask(second, **GREEDY, full_vocab=True)
    fresh = Chat(instruct, history=conversation.history[:1])
    assert fresh.ask(second, **GREEDY, full_vocab=True) == reply
    (first, n1, _), (start, n2, logits), (fresh_start, fresh_n, expected) = prefills
    assert first == 0 and fresh_start == 0 and start == n1 + len(instruct.tokenizer.encode("A short tone.")) < n2
    assert fresh_n == n2
    assert ((logits - expected).abs().max() / expected.abs().max()) < 1e-5


def test_reply_stops_at_im_end(instruct, monkeypatch):
    script = iter(instruct.tokenizer.encode("Yes.") + [IM_END] + instruct.tokenizer.encode(" and more"))
    monkeypatch.setattr(generate, "choose", lambda logits, config, generator: torch.tensor([next(script)]))
    conversation = Chat(instruct)
    assert conversation.ask("Is it?", max_new_tokens=20) == "Yes."
    assert conversation.history == [("Is it?", "Yes.")]


def test_stream_pieces_make_the_reply(instruct, monkeypatch):
    script = iter(instruct.tokenizer.encode("Glass breaking, 玻璃.") + [IM_END])
    monkeypatch.setattr(generate, "choose", lambda logits, config, generator: torch.tensor([next(script)]))
    conversation = Chat(instruct)
    pieces = list(conversation.stream([{"audio": CLIP0}, "What is it?"]))
    assert "".join(pieces) == "Glass breaking, 玻璃." and len(pieces) > 1
    assert conversation.history == [([{"audio": CLIP0}, "What is it?"], "Glass breaking, 玻璃.")]


def test_history_keeps_the_parts_and_official_style_chat_returns_them(instruct, theirs, monkeypatch):
    first, second = instruct.tokenizer.encode("A tone."), instruct.tokenizer.encode("Yes.")
    script = iter([*first, IM_END, *second, IM_END])
    monkeypatch.setattr(generate, "choose", lambda logits, config, generator: torch.tensor([next(script)]))
    query = [{"audio": CLIP0}, "What is it?"]
    reply, history = chat(instruct, query, system="Be brief.")
    assert reply == "A tone." and history == [(query, "A tone.")]
    query[0]["audio"] = CLIP1  # the caller's parts are copied, not kept
    assert history[0][0][0] == {"audio": CLIP0}
    reply, history2 = chat(instruct, "Sure?", history, system="Be brief.")
    assert reply == "Yes." and history2 == history + [("Sure?", "Yes.")] and len(history) == 1  # not mutated
    inputs, _ = their_inputs(theirs[1], "Be brief.", history, "Again?")
    assert Chat(instruct, "Be brief.", history2[:1]).context("Again?").ids == inputs["input_ids"][0].tolist()


def test_typed_audio_token_is_refused_and_the_conversation_kept(instruct, monkeypatch):
    monkeypatch.setattr(generate, "choose", lambda logits, config, generator: torch.tensor([IM_END]))
    conversation = Chat(instruct)
    conversation.ask("hi")
    for query in ("what is <|AUDIO|>?", [{"audio": CLIP0}, "and <|AUDIO|>"]):
        with pytest.raises(qwenaudio.InputError, match=r"the query's text holds <\|AUDIO\|>.*\{'audio': path\}"):
            conversation.ask(query)
    assert conversation.history == [("hi", "")]


@pytest.mark.parametrize("history, message", [
    ("hi", "history must be a list of"),
    ([("hi",)], "pairs of a query .str or parts. and a reply .str."),
    ([([{"video": "v.mp4"}], "ok")], "pairs of a query"),
    ([("hi", 3)], "pairs of a query"),
])
def test_bad_history_is_refused(instruct, history, message):
    with pytest.raises(qwenaudio.InputError, match=message):
        Chat(instruct, history=history)


def window_chat(instruct, monkeypatch, size, history):
    monkeypatch.setattr(instruct, "generation_config", instruct.generation_config.replace(max_window_size=size))
    return Chat(instruct, history=history)


def test_history_window_keeps_the_newest_turns_that_fit(instruct, theirs, monkeypatch):
    """No window is published for Qwen2-Audio; Qwen-Audio-Chat's rule applies: the system message and the kept
    turns, rendered alone, stay under max_window_size. The kept clips are numbered from "Audio 1"."""
    history = [([{"audio": CLIP1}, "First?"], "One."), ([{"audio": CLIP0}, "Second?"], "Two."), ("Third?", "Three.")]
    tokenizer, span_of = instruct.tokenizer, lambda path: instruct.encoder.span_length(len(qwenaudio.load_audio(path)))

    def alone(kept):
        text = prompts.render_qwen2_chat([(r, c) for u, a in kept for r, c in (("user", u), ("assistant", a))],
                                         add_generation_prompt=False)
        return len(tokenizer.encode(text, audio_spans=[span_of(p) for p in prompts.qwen2_chat_clips(
            [("user", u) for u, _ in kept])] or None))

    for kept in range(4):
        for size, expected in ((alone(history[3 - kept:]) + 1, kept), (alone(history[3 - kept:]), kept - 1)):
            if expected < 0:
                continue
            context = window_chat(instruct, monkeypatch, size, history).context("Now?")
            inputs, clips = their_inputs(theirs[1], DEFAULT_SYSTEM, history[3 - expected:], "Now?")
            assert (context.ids, context.clips) == (inputs["input_ids"][0].tolist(), clips), (size, expected)
    dropped = window_chat(instruct, monkeypatch, alone(history[1:]) + 1, history).context([{"audio": CLIP1}, "Now?"])
    text = tokenizer.decode(dropped.ids)
    assert "Audio 1: <|audio_bos|>" in text and "Audio 2:" in text and "Audio 3:" not in text
    assert dropped.clips == [CLIP0, CLIP1]


def test_base_checkpoint_chats_with_a_warning_and_stops_at_im_end(tiny_qwen2_ckpt, monkeypatch):
    """The base model's generation config does not stop on <|im_end|> (its config.json is the Instruct one's):
    a warning says it was not trained to chat; the chat still ends each reply at <|im_end|>."""
    base = qwenaudio.load(tiny_qwen2_ckpt, dtype=torch.float32, progress=False)
    assert IM_END not in base.generation_config.stop_token_ids
    with pytest.warns(UserWarning, match="does not stop on <\\|im_end\\|>.*base model.*Qwen2-Audio-7B-Instruct"):
        conversation = Chat(base)
    script = iter(base.tokenizer.encode("Hi.") + [IM_END] + base.tokenizer.encode(" more"))
    monkeypatch.setattr(generate, "choose", lambda logits, config, generator: torch.tensor([next(script)]))
    assert conversation.ask("Hello", max_new_tokens=10) == "Hi."


def test_instruct_checkpoint_chats_without_a_warning(instruct, recwarn):
    Chat(instruct)
    assert not [w for w in recwarn if "im_end" in str(w.message)]


# ------------------------------------------------------------------------------------------------ qwenaudio chat

def chat_command(monkeypatch, capsys, model, lines):
    """`qwenaudio chat` in-process on `lines` of stdin with `model` loaded; (exit code, stdout, stderr)."""
    from qwenaudio import cli

    monkeypatch.setattr(cli, "load", lambda *a, **k: model)
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    code = cli.main(["chat", "--max-new-tokens", "3"])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_commands_and_errors_on_instruct(instruct, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "note.txt").write_text("not audio")
    sent = []
    monkeypatch.setattr(Chat, "stream", lambda self, query, **g: sent.append(query) or iter(["ok"]))
    lines = ["/audio", "/audio missing.wav", "/audio note.txt", "/unknowncmd", "/help", f"/audio {CLIP0}",
             "what is it?", "//audio is a word", "/reset", "/quit", "not asked"]
    code, out, err = chat_command(monkeypatch, capsys, instruct, lines)
    assert code == 0 and out == "ok\n" * 2
    assert sent == [[{"audio": CLIP0}, "what is it?"], ["/audio is a word"]]
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        "error: /audio needs a path: /audio PATH", "error: missing.wav: no such audio file (not attached)",
        "error: note.txt: not a readable audio file (Error opening 'note.txt': Format not recognised.) (not attached)",
        "error: unknown command /unknowncmd: the commands are /audio PATH, /reset, /help, /quit; start the line with "
        "// to send it as text"]
    assert "/audio PATH   attach a clip" in err and "warning" not in err


def test_cli_a_refused_query_spoils_only_itself(instruct, monkeypatch, capsys):
    script = iter(instruct.tokenizer.encode("Fine.") + [IM_END])
    monkeypatch.setattr(generate, "choose", lambda logits, config, generator: torch.tensor([next(script)]))
    code, out, err = chat_command(monkeypatch, capsys, instruct, ["say <|AUDIO|>", "hello"])
    assert code == 0 and out == "Fine.\n"
    assert "error: the query's text holds <|AUDIO|>" in err


def test_cli_base_checkpoint_warns_once_and_chats(tiny_qwen2_ckpt, monkeypatch, capsys):
    base = qwenaudio.load(tiny_qwen2_ckpt, dtype=torch.float32, progress=False)
    monkeypatch.setattr(Chat, "stream", lambda self, query, **g: iter(["ok"]))
    code, out, err = chat_command(monkeypatch, capsys, base, ["hello", "again"])
    assert code == 0 and out == "ok\nok\n"
    assert [line.split(":")[0] for line in err.splitlines()] == ["warning"] and "Qwen2-Audio-7B-Instruct" in err


@pytest.mark.slow
def test_cli_chat_subprocess_equals_the_library(tiny_qwen2_instruct_ckpt, tmp_path):
    """`python -m qwenaudio chat` on the tiny Instruct checkpoint (made greedy, so its replies are fixed) streams the
    replies the library gives for the same turns."""
    ckpt = shutil.copytree(tiny_qwen2_instruct_ckpt, tmp_path / "instruct")
    config = json.loads((ckpt / "generation_config.json").read_text())
    (ckpt / "generation_config.json").write_text(json.dumps({**config, "do_sample": False}))
    env = {**os.environ, "QWENAUDIO_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "qwenaudio", "chat", "--model", str(ckpt), "--max-new-tokens", "4",
                           "--device", "cpu", "--dtype", "float32"], capture_output=True, text=True, timeout=120,
                          input=f"/audio {CLIP0}\nwhat is it?\nand now?\n/quit\n", env=env)
    assert done.returncode == 0, done.stderr
    conversation = Chat(qwenaudio.load(ckpt, device="cpu", dtype=torch.float32, progress=False))
    first = conversation.ask([{"audio": CLIP0}, "what is it?"], max_new_tokens=4)
    second = conversation.ask("and now?", max_new_tokens=4)
    assert done.stdout == f"{first}\n{second}\n" and "Traceback" not in done.stderr



def test_a_typed_qwen_audio_region_is_refused_saying_how_clips_are_given(instruct, monkeypatch):
    """Qwen2-Audio's tokenizer reads `<audio>PATH</audio>` as plain text: the clip would never be heard."""
    monkeypatch.setattr(generate, "choose", lambda logits, config, generator: torch.tensor([IM_END]))
    conversation = Chat(instruct)
    conversation.ask([{"audio": CLIP0}, "what is it?"])  # an audio part is a clip, whatever its path
    for query in (f"what is <audio>{CLIP0}</audio>?", [{"audio": CLIP0}, {"text": f"and <audio>{CLIP1}</audio>"}]):
        with pytest.raises(qwenaudio.InputError, match=r"Qwen-Audio's <audio>…</audio>, which Qwen2-Audio reads as "
                                                       r"plain text .*: attach clips as \{'audio': path\} parts"):
            conversation.ask(query)
    assert conversation.history == [([{"audio": CLIP0}, "what is it?"], "")]


def test_cli_a_typed_clip_is_refused_in_the_command_s_words(instruct, monkeypatch, capsys):
    sent = []
    monkeypatch.setattr(Chat, "stream", lambda self, query, **g: sent.append(query) or iter(["ok"]))
    code, out, err = chat_command(monkeypatch, capsys, instruct, [
        f"/audio {CLIP0}", f"hear <audio>{CLIP1}</audio>", "say <|AUDIO|>", "hello"])
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 0 and out == "ok\n" and sent == [["hello"]]
    assert len(errors) == 2 and all(e.endswith(": attach a clip with /audio PATH, then ask") for e in errors), errors
    assert "Qwen-Audio's <audio>…</audio>" in errors[0] and "<|AUDIO|>" in errors[1]
