"""Qwen-Audio-Chat: contexts against the official make_context (tests/golden/generation_official.json), the
history window, and reuse of the KV cache across turns."""

import json

import pytest
import soundfile
import torch

import qwenaudio
from qwenaudio import prompts
from qwenaudio.chat import Chat, chat, query_text
from qwenaudio.core import generate
from qwenaudio.core.audio import audio_span
from qwenaudio.testing import make_tiny_checkpoint

from .conftest import GOLDEN, ROOT

OFFICIAL = json.loads((GOLDEN / "generation_official.json").read_text(encoding="utf-8"))["chat"]
CLIP0, CLIP1 = "tests/golden/clip0.wav", "tests/golden/clip1.wav"  # spans 14 and 34; paths as the recording used


def span_of(path):
    return audio_span(len(qwenaudio.load_audio(ROOT / path)))


def test_queries_equal_official():
    assert query_text([{"audio": CLIP0}, {"text": "What do you hear?"}]) == OFFICIAL["turns"][0]["query"]
    assert query_text([{"audio": CLIP1}, "And in this one? Say <|im_start|> and <|en|> literally."]) == (
        OFFICIAL["turns"][1]["query"])


def context(tokenizer, query, history, system, max_window_size, span_of):
    """The official context as the renderer gives it: (ids, clips)."""
    ids, _, clips = prompts.render_chat(tokenizer, system, history, query, span_of=span_of,
                                        max_window_size=max_window_size)
    return ids, clips


@pytest.mark.parametrize("turn", [0, 1])
def test_two_turn_contexts_equal_official(tokenizer, turn):
    t = OFFICIAL["turns"][turn]
    ids, clips = context(tokenizer, t["query"], [tuple(h) for h in t["history"]], OFFICIAL["system"],
                         t["max_window_size"], span_of)
    assert ids == t["context_tokens"]
    assert clips == t["audio_urls"]


def window_cases():
    return [OFFICIAL["window"][0], OFFICIAL["window"][1], *OFFICIAL["window_boundaries"], OFFICIAL["window_break"]]


@pytest.mark.parametrize("case", window_cases(), ids=lambda c: f"window{c['max_window_size']}")
def test_history_window_equals_official(tokenizer, case):
    ids, clips = context(tokenizer, case["query"], [tuple(h) for h in case["history"]], OFFICIAL["system"],
                         case["max_window_size"], span_of)
    assert ids == case["context_tokens"] and clips == (case["audio_urls"] or [])  # None: no audio


@pytest.mark.parametrize("case", [*OFFICIAL["turns"], *window_cases()], ids=lambda c: f"window{c['max_window_size']}")
def test_old_build_context_warns_and_still_gives_the_official_raw_text_and_ids(tokenizer, case):
    from qwenaudio import chat as module

    with pytest.warns(DeprecationWarning, match="chat.build_context is deprecated; use prompts.render_chat"):
        old = module.build_context
    raw, ids = old(tokenizer, case["query"], [tuple(h) for h in case["history"]], OFFICIAL["system"],
                   case["max_window_size"], span_of)
    assert raw == case["raw_text"] and ids == case["context_tokens"]
    assert tokenizer.audio_paths(raw) == (case["audio_urls"] or [])


def test_old_content_ids_warns_and_still_works(tokenizer):
    from qwenaudio import chat as module

    with pytest.warns(DeprecationWarning, match="chat.content_ids is deprecated; use prompts.render_chat"):
        old = module.content_ids
    assert old(tokenizer, "Say <|im_start|>", span_of) == prompts._content(tokenizer, "Say <|im_start|>", span_of)[0]


def test_typed_markers_stay_text_but_tags_do_not(tokenizer):
    ids, _ = context(tokenizer, "Say <|im_start|> and <|en|>", [], "sys", 6144, span_of)
    assert ids.count(tokenizer.im_start_id) == 3  # system, user, assistant: not the typed one
    assert tokenizer.special_ids["<|en|>"] in ids


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, vocab_file):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("chat") / "ckpt", vocab_file=vocab_file, chat=True)
    return qwenaudio.load(path, dtype=torch.float32, progress=False)


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)  # the golden prompts name the clips relative to the repository


def test_chat_context_and_history(chat_model, in_repo):
    chat = Chat(chat_model)
    t0, t1 = OFFICIAL["turns"]
    context = chat.context([{"audio": CLIP0}, {"text": "What do you hear?"}])
    assert (context.ids, context.clips) == (t0["context_tokens"], t0["audio_urls"])
    reply = chat.ask([{"audio": CLIP0}, {"text": "What do you hear?"}], max_new_tokens=3, seed=0)
    assert chat.history == [(t0["query"], reply)]
    chat.history = [(t0["query"], "A short tone.")]
    context = chat.context(t1["query"])
    assert (context.ids, context.clips) == (t1["context_tokens"], t1["audio_urls"])


def scripted(monkeypatch, *replies):
    """Make generation emit each reply's ids then <|im_end|>, turn after turn, and record every prefill."""
    prefills, script = [], iter([i for reply in replies for i in reply + [151645]])
    monkeypatch.setattr(generate, "choose", lambda logits, config, generator: torch.tensor([next(script)]))
    original = generate.prefill

    def spy(decoder, session, ids, mask=None, audio=(), start=0):
        logits = original(decoder, session, ids, mask, audio, start)
        prefills.append((start, ids.shape[1], logits))
        return logits

    monkeypatch.setattr(generate, "prefill", spy)
    return prefills


def full_prefill_logits(model, chat, query):
    ids, _, paths = chat.context(query)
    with torch.no_grad():
        return model.decoder.logits(torch.tensor([ids]), audio=model.encode_audio(paths))[:, -1]


def test_second_turn_reuses_the_cache(chat_model, in_repo, monkeypatch):
    reply = chat_model.tokenizer.encode("A short tone.")
    prefills = scripted(monkeypatch, reply, reply, reply)
    chat = Chat(chat_model)
    assert chat.ask([{"audio": CLIP1}, "What do you hear?"]) == "A short tone."
    assert chat.ask("Say it again.") == "A short tone."
    (first, n1, _), (second, n2, logits) = prefills
    assert first == 0 and 0 < second < n2  # only the new turn was prefilled
    expected = full_prefill_logits(chat_model, Chat(chat_model, history=chat.history[:1]), "Say it again.")
    assert ((logits - expected).abs().max() / expected.abs().max()) < 1e-5


def test_cache_is_not_reused_when_earlier_clips_would_encode_differently(chat_model, in_repo, monkeypatch):
    """Turn 2 brings a longer clip: official chat encodes both together, changing the first clip's span."""
    reply = chat_model.tokenizer.encode("A short tone.")
    prefills = scripted(monkeypatch, reply, reply, reply)
    chat = Chat(chat_model)
    chat.ask([{"audio": CLIP0}, "What do you hear?"])
    chat.ask([{"audio": CLIP1}, "And this one?"])
    assert [p[0] for p in prefills] == [0, 0]


def test_each_conversation_keeps_its_own_cache(chat_model, in_repo, monkeypatch):
    reply = chat_model.tokenizer.encode("A short tone.")
    prefills = scripted(monkeypatch, reply, reply, reply)
    chat = Chat(chat_model)
    chat.ask("hello")
    Chat(chat_model).ask("someone else")  # another conversation on the same model
    chat.ask("hello again")
    (first, _, _), (other, _, _), (third, n3, _) = prefills
    assert first == other == 0 and 0 < third < n3


def test_stream_pieces_make_the_reply(chat_model, in_repo, monkeypatch):
    scripted(monkeypatch, chat_model.tokenizer.encode("Glass breaking, 玻璃."))
    chat = Chat(chat_model)
    pieces = list(chat.stream([{"audio": CLIP0}, "What is it?"]))
    assert "".join(pieces) == "Glass breaking, 玻璃." and len(pieces) > 1
    assert chat.history[-1][1] == "Glass breaking, 玻璃."


def test_official_style_chat_returns_reply_and_history(chat_model, in_repo, monkeypatch):
    first, second = chat_model.tokenizer.encode("A tone."), chat_model.tokenizer.encode("Yes.")
    scripted(monkeypatch, first, second)
    reply, history = chat(chat_model, [{"audio": CLIP0}, "What is it?"])
    assert reply == "A tone." and history == [(f"Audio 1:<audio>{CLIP0}</audio>\nWhat is it?", "A tone.")]
    reply, history2 = chat(chat_model, "Sure?", history)
    assert reply == "Yes." and history2 == history + [("Sure?", "Yes.")] and len(history) == 1  # not mutated


def test_bad_settings_keep_the_conversation(chat_model, in_repo):
    """A setting that cannot run is refused before the turn starts: the history and the next turn are unharmed."""
    chat = Chat(chat_model)
    first = chat.ask("Hello", max_new_tokens=3, seed=0)
    for bad in ({"do_sample": True, "temperature": 0}, {"do_sample": True, "top_p": 0}, {"max_new_tokens": 0}):
        with pytest.raises(qwenaudio.ConfigError):
            chat.ask("And now?", **bad)
        assert chat.history == [("Hello", first)]
    again = Chat(chat_model, history=[("Hello", first)])
    assert chat.ask("And now?", max_new_tokens=3, seed=0) == again.ask("And now?", max_new_tokens=3, seed=0)


def test_a_clip_too_short_is_named_and_the_conversation_kept(chat_model, tmp_path):
    import numpy as np
    import soundfile as sf

    short = tmp_path / "blip.wav"
    sf.write(short, np.zeros(100, dtype=np.float32), 16000)
    chat = Chat(chat_model)
    with pytest.raises(qwenaudio.AudioError, match=f"^{short}: 100 samples .* is too short"):
        chat.ask([{"audio": str(short)}, "what is it?"], max_new_tokens=2)
    assert chat.history == []


def replies_ok(self, query, **generation):
    yield "ok"


def chat_command(monkeypatch, capsys, chat_model, lines, stream=replies_ok):
    """Run `qwenaudio chat` in-process on `lines` of stdin, each reply made by `stream`; returns (exit code, the
    queries sent, stdout, stderr)."""
    import io

    from qwenaudio import cli

    sent = []

    def spy(self, query, **generation):
        sent.append(query)
        return stream(self, query, **generation)

    monkeypatch.setattr(cli, "load", lambda *a, **k: chat_model)
    monkeypatch.setattr(Chat, "stream", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    code = cli.main(["chat", "--max-new-tokens", "2"])
    out, err = capsys.readouterr()
    return code, sent, out, err


def test_chat_commands_never_reach_the_model(chat_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "note.txt").write_text("not audio")
    lines = ["/audio", "/audio   ", "/audio missing.wav", "/audio note.txt", "/unknowncmd hello", "/Audio x",
             "/reset now", "/quit please", "/help", "/tmp/a.wav what is this?", "/ 2 + 2", "//audio is a word"]
    code, sent, out, err = chat_command(monkeypatch, capsys, chat_model, lines)
    assert code == 0 and sent == [["/tmp/a.wav what is this?"], ["/ 2 + 2"], ["/audio is a word"]]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: /audio needs a path: /audio PATH", "error: /audio needs a path: /audio PATH",
        "error: missing.wav: no such audio file (not attached)",
        "error: note.txt: not a readable audio file (Error opening 'note.txt': Format not recognised.) (not attached)",
        "error: unknown command /unknowncmd: the commands are /audio PATH, /reset, /help, /quit; start the line "
        "with // to send it as text",
        "error: unknown command /Audio: the commands are /audio PATH, /reset, /help, /quit; start the line with // "
        "to send it as text",
        "error: /reset takes no argument (start the line with // to send it as text)",
        "error: /quit takes no argument (start the line with // to send it as text)"]
    assert "/audio PATH   attach a clip" in err and out == "ok\n" * 3


def test_chat_attaches_a_good_clip_and_a_refused_one_is_not_sent(chat_model, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    lines = [f"/audio {CLIP0}", "/audio nope.wav", "what is it?", "and now?", "/quit", "not asked"]
    code, sent, out, err = chat_command(monkeypatch, capsys, chat_model, lines)
    assert code == 0 and sent == [[{"audio": CLIP0}, "what is it?"], ["and now?"]]
    seconds = soundfile.info(ROOT / CLIP0).duration
    assert f"attached {CLIP0} ({seconds:.1f} s) to the next question" in err and "nope.wav: no such audio file" in err


def test_ctrl_c_during_a_reply_drops_that_reply_only(chat_model, monkeypatch, capsys):
    from qwenaudio import cli

    calls = []

    def interrupted_once(self, query, **generation):
        calls.append(query)
        yield "half a rep" if len(calls) == 1 else "Yes."
        if len(calls) == 1:
            raise KeyboardInterrupt

    code, sent, out, err = chat_command(monkeypatch, capsys, chat_model, ["tell me a story", "short one?"],
                                        stream=interrupted_once)
    assert code == 0 and len(sent) == 2
    assert out == "half a rep\nYes.\n" and "interrupted: this reply is dropped; /quit or Ctrl-D leaves" in err

    def terminated(self, query, **generation):
        raise cli.Terminated(15)
        yield

    code, *_ = chat_command(monkeypatch, capsys, chat_model, ["hello"], stream=terminated)
    assert code == 143  # SIGTERM still ends the command
