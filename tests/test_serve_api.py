"""`qwenaudio serve` through the official `openai` client and curl, on live servers over tiny checkpoints of both
families (conftest's `served_v1`, `served_qwen2`).

Every answer is compared with the library called directly on the same model: the server's transcript with
`tasks.transcribe`'s, its subtitles with `qwenaudio transcribe`'s, its chat reply with `chat.Chat(...).ask`'s
(greedy), so a server that answers something else fails. The operations tests (key, 429, 413, timeout, a client
that leaves, SIGTERM) serve other apps on the same engine, or start the command itself (marked slow).
"""

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

import qwenaudio
from qwenaudio import cli, tasks
from qwenaudio.chat import Chat
from qwenaudio.core.audio import SAMPLE_RATE
from qwenaudio.subtitles import to_srt

from .conftest import ROOT, reference, reference_program
from .serving import MAX_NEW_TOKENS, live, wav_bytes

FAST = {"max_new_tokens": MAX_NEW_TOKENS}
LONG_REPLY = 1500  # tokens: a reply still running while a test looks (the tiny model makes ~150 a second)


@pytest.fixture(params=["qwen-audio", "qwen2-audio"])
def served(request):
    return request.getfixturevalue("served_v1" if request.param == "qwen-audio" else "served_qwen2")


@pytest.fixture(scope="module")
def speech(shared_audio):
    return shared_audio / "1272-128104-0000.flac"


@pytest.fixture(scope="module")
def reading(shared_audio):
    return shared_audio / "1089_134686_000007_000004.wav"


def language(served):
    """What a transcription request without `language` asks of the family (Qwen2-Audio detects it)."""
    return "en" if served.model.family.name == "Qwen-Audio" else None


def inline(path: Path) -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(path.read_bytes()).decode(),
                                                   "format": path.suffix[1:]}}


def data_url(path: Path) -> dict:
    return {"type": "audio_url",
            "audio_url": {"url": f"data:audio/{path.suffix[1:]};base64,"
                                 f"{base64.b64encode(path.read_bytes()).decode()}"}}


# ------------------------------------------------------------------------------------------------- transcriptions

def test_transcription_json_and_text(served, speech):
    wave = qwenaudio.load_audio(speech)
    expected = tasks.transcribe(served.model, wave, language=language(served), **FAST)
    client = served.client()
    with speech.open("rb") as f:
        answer = client.audio.transcriptions.create(model=served.name, file=f)
    assert answer.text == expected
    prompt = tasks.task_prompt(served.model.family, "transcribe", language=language(served))
    reply, = tasks.run(served.model, wave, prompt, **FAST)
    assert answer.usage.output_tokens == len(reply) and answer.usage.input_tokens > len(reply)
    with speech.open("rb") as f:
        assert client.audio.transcriptions.create(model=served.name, file=f, response_format="text") == expected + "\n"


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_subtitles_are_what_qwenaudio_transcribe_writes(served_v1, speech, fmt, capsys):
    with speech.open("rb") as f:
        answer = served_v1.client().audio.transcriptions.create(model=served_v1.name, file=f, response_format=fmt)
    code = cli.main(["transcribe", str(speech), "--model", str(served_v1.path), "--format", fmt, "--device", "cpu",
                     "--dtype", "float32", "--max-new-tokens", str(MAX_NEW_TOKENS)])
    assert code == 0 and answer == capsys.readouterr().out


def test_qwen2_subtitles_have_one_cue_per_window(served_qwen2, speech):
    """Qwen2-Audio has no timestamps: a cue holds a window's transcript."""
    wave = qwenaudio.load_audio(speech)
    text = tasks.transcribe(served_qwen2.model, wave, language=None, **FAST)
    with speech.open("rb") as f:
        answer = served_qwen2.client().audio.transcriptions.create(model=served_qwen2.name, file=f,
                                                                   response_format="srt")
    assert answer == to_srt([qwenaudio.subtitles.Word(text, 0.0, len(wave) / SAMPLE_RATE)])


def test_verbose_json_with_words(served_v1, speech):
    wave = qwenaudio.load_audio(speech)
    words = tasks.transcribe(served_v1.model, wave, timestamps=True, **FAST)
    with speech.open("rb") as f:
        answer = served_v1.client().audio.transcriptions.create(
            model=served_v1.name, file=f, response_format="verbose_json", timestamp_granularities=["word"])
    assert [(w.word, w.start, w.end) for w in answer.words] == [(w.text, w.start, w.end) for w in words]
    assert answer.text == " ".join(w.text for w in words) and answer.language == "en"
    assert answer.duration == len(wave) / SAMPLE_RATE
    assert [(s.id, s.start, s.end, s.text) for s in answer.segments] == [(0, 0.0, answer.duration, answer.text)]


def test_verbose_json_segments_without_words(served_qwen2, speech):
    with speech.open("rb") as f:
        answer = served_qwen2.client().audio.transcriptions.create(model=served_qwen2.name, file=f,
                                                                   response_format="verbose_json")
    expected = tasks.transcribe(served_qwen2.model, qwenaudio.load_audio(speech), language=None, **FAST)
    assert answer.text == expected and answer.segments[0].text == expected and not getattr(answer, "words", None)


def test_translation(served, reading):
    expected = tasks.translate(served.model, qwenaudio.load_audio(reading), source="zh", target="en", **FAST)
    with reading.open("rb") as f:
        assert served.client().audio.translations.create(model=served.name, file=f).text == expected
    with reading.open("rb") as f:  # the source language, and another target, as extra fields
        answer = served.client().audio.translations.create(model=served.name, file=f,
                                                           extra_body={"language": "en", "target_language": "de"})
    assert answer.text == tasks.translate(served.model, qwenaudio.load_audio(reading), source="en", target="de",
                                          **FAST)


def test_analyses_by_field_and_by_alias(served, reading):
    wave = qwenaudio.load_audio(reading)
    client = served.client()
    with reading.open("rb") as f:
        caption = client.audio.transcriptions.create(model=served.name, file=f, extra_body={"task": "caption"})
    assert caption.text == tasks.caption(served.model, wave, **FAST)
    with reading.open("rb") as f:
        emotion = client.audio.transcriptions.create(model=f"{served.name}:emotion", file=f)
    assert emotion.text == tasks.emotion(served.model, wave, **FAST)


def test_note_analysis_keeps_its_tags(served_v1, shared_audio):
    notes = qwenaudio.load_audio(shared_audio / "music.wav")[: 10 * SAMPLE_RATE]
    answer = served_v1.client().audio.transcriptions.create(model=f"{served_v1.name}:note_analysis",
                                                            file=("notes.wav", wav_bytes(notes)))
    assert answer.text == tasks.note_analysis(served_v1.model, notes, **FAST)


def test_streamed_transcription_is_the_same_text(served, speech):
    expected = tasks.transcribe(served.model, qwenaudio.load_audio(speech), language=language(served), **FAST)
    with speech.open("rb") as f:
        events = list(served.client().audio.transcriptions.create(model=served.name, file=f, stream=True))
    deltas = [e.delta for e in events[:-1]]
    assert all(e.type == "transcript.text.delta" for e in events[:-1]) and events[-1].type == "transcript.text.done"
    assert "".join(deltas) == events[-1].text == expected
    assert len(deltas) > 1  # token by token for a clip of up to 30 s
    assert events[-1].usage.output_tokens > 0


@pytest.fixture(scope="module")
def recording(shared_audio, tmp_path_factory):
    """37 s of real recordings end to end (past the 30 s a window holds), as a WAV upload."""
    waves = [qwenaudio.load_audio(shared_audio / name) for name in
             ("1272-128104-0000.flac", "1089_134686_000007_000004.wav", "es.mp3", "music.wav")]
    path = tmp_path_factory.mktemp("long") / "long.wav"
    path.write_bytes(wav_bytes(torch.cat(waves)[: 37 * SAMPLE_RATE]))
    return path


def one_at_a_time(model):
    """`generate=` answering each prompt alone: what the server promises for each window of a long recording
    (a batch of windows would pad them together, which changes an encoder's numbers slightly)."""
    def generate(prompts, clips, **settings):
        return [model.generate([p], [c], **settings)[0] for p, c in zip(prompts, clips)]
    return generate


def test_a_long_recording_goes_through_the_long_form_path(served_v1, recording):
    wave = qwenaudio.load_audio(recording)
    expected, = tasks.perform(served_v1.model, [wave], "transcribe", generate=one_at_a_time(served_v1.model), **FAST)
    assert len(expected.segments) == 2
    client = served_v1.client()
    with recording.open("rb") as f:
        answer = client.audio.transcriptions.create(model=served_v1.name, file=f, response_format="verbose_json")
    assert answer.text == expected.text and answer.duration == 37.0
    assert [(s.start, s.end, s.text) for s in answer.segments] == [(s.start, s.end, s.text)
                                                                   for s in expected.segments]
    with recording.open("rb") as f:
        events = list(client.audio.transcriptions.create(model=served_v1.name, file=f, stream=True))
    assert [e.type for e in events] == ["transcript.text.delta", "transcript.text.done"]  # one delta when done
    assert events[0].delta == events[1].text == expected.text


# ----------------------------------------------------------------------------------------------------------- chat

def test_chat_two_clips_over_two_turns(served, speech, reading):
    """input_audio in the first turn, a data: audio_url in the second; each reply the library's, greedy."""
    clips = {"one": qwenaudio.load_audio(speech), "two": qwenaudio.load_audio(reading)}
    conversation = Chat(served.model, clips=clips)
    client = served.client()
    first = [inline(speech), {"type": "text", "text": "What do you hear?"}]
    messages = [{"role": "user", "content": first}]
    answer = client.chat.completions.create(model=served.name, messages=messages, temperature=0, max_tokens=6)
    expected = conversation.ask([{"audio": "one"}, {"text": "What do you hear?"}], max_new_tokens=6, do_sample=False)
    assert answer.choices[0].message.content == expected and answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.object == "chat.completion"
    second = [data_url(reading), {"type": "text", "text": "And this one?"}]
    messages += [{"role": "assistant", "content": expected}, {"role": "user", "content": second}]
    query = [{"audio": "two"}, {"text": "And this one?"}]
    prompt_tokens = len(conversation.context(query).ids)
    answer = client.chat.completions.create(model=served.name, messages=messages, temperature=0, max_tokens=6)
    assert answer.choices[0].message.content == conversation.ask(query, max_new_tokens=6, do_sample=False)
    assert answer.usage.prompt_tokens == prompt_tokens
    assert answer.usage.total_tokens == prompt_tokens + answer.usage.completion_tokens


def test_chat_settings(served_v1):
    """A system message, a stop string and a seeded sample, each as the library does them."""
    client = served_v1.client()
    messages = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Say something."}]
    greedy = Chat(served_v1.model, system="Answer in French.").ask("Say something.", max_new_tokens=12,
                                                                   do_sample=False)
    stop = greedy[3:6]
    answer = client.chat.completions.create(model=served_v1.name, messages=messages, temperature=0, max_tokens=12,
                                            stop=[stop])
    assert answer.choices[0].message.content == greedy[: greedy.index(stop)]
    assert answer.choices[0].finish_reason == "stop"
    sampled = Chat(served_v1.model, system="Answer in French.").ask(
        "Say something.", max_new_tokens=8, do_sample=True, temperature=0.9, top_p=0.95, seed=7)
    answer = client.chat.completions.create(model=served_v1.name, messages=messages, temperature=0.9, top_p=0.95,
                                            seed=7, max_completion_tokens=8)
    assert answer.choices[0].message.content == sampled


def test_streamed_chat(served, speech):
    client = served.client()
    messages = [{"role": "user", "content": [inline(speech), {"type": "text", "text": "Describe it."}]}]
    whole = client.chat.completions.create(model=served.name, messages=messages, temperature=0, max_tokens=8)
    chunks = list(client.chat.completions.create(model=served.name, messages=messages, temperature=0, max_tokens=8,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].object == "chat.completion.chunk"


def test_chat_as_many_tools_send_it(served, speech):
    """Explicit nulls, OpenAI's fields at the values that ask for nothing, and the clip in one user message with the
    question in the next: answered as the library answers the clip and the question as one turn."""
    body = {"model": served.name, "messages": [{"role": "user", "content": [inline(speech)]},
                                               {"role": "user", "content": "What do you hear?"}],
            "temperature": 0, "max_tokens": 6, "stream": None, "n": None, "stop": None, "seed": None, "top_p": None,
            "stream_options": None, "frequency_penalty": 0, "presence_penalty": 0, "logprobs": False,
            "top_logprobs": None, "response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
            "parallel_tool_calls": True, "user": "someone", "metadata": {}, "store": False}
    answer = httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=60)
    expected = Chat(served.model, clips={"c": qwenaudio.load_audio(speech)}).ask(
        [{"audio": "c"}, {"text": "What do you hear?"}], max_new_tokens=6, do_sample=False)
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == expected


def test_a_qwen2_conversation_that_opens_with_the_assistant(served_qwen2, speech):
    """Its turn alone, as transformers' chat template renders it (test_serve_seams checks the ids)."""
    greeting = "Hello! Send me a clip."
    messages = [{"role": "assistant", "content": greeting},
                {"role": "user", "content": [inline(speech), {"type": "text", "text": "What is it?"}]}]
    answer = served_qwen2.client().chat.completions.create(model=served_qwen2.name, messages=messages, temperature=0,
                                                           max_tokens=6)
    conversation = Chat(served_qwen2.model, history=[(None, greeting)], clips={"c": qwenaudio.load_audio(speech)})
    query = [{"audio": "c"}, {"text": "What is it?"}]
    assert answer.usage.prompt_tokens == len(conversation.context(query).ids)
    assert answer.choices[0].message.content == conversation.ask(query, max_new_tokens=6, do_sample=False)


def test_a_top_p_that_rounds_to_0_beside_a_greedy_reply(served_v1):
    """The review's pair: a long greedy reply, and beside it a sampled one whose top_p (1e-300) is 0 in float32.
    Both are answered, each as the library answers it alone: the second keeps only its best token each step."""
    story = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 200, "temperature": 0}
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(httpx.post, f"{served_v1.url}/v1/chat/completions", json=story, timeout=60)
        _until(lambda: served_v1.engine.stats().active == 1)
        tiny = httpx.post(f"{served_v1.url}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 1, "top_p": 1e-300})
        long = long.result()
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["message"]["content"] == Chat(served_v1.model).ask(
        "Hi", max_new_tokens=3, do_sample=False)
    assert long.status_code == 200 and long.json()["usage"]["completion_tokens"] == 200  # still decoding beside it
    assert long.json()["choices"][0]["message"]["content"] == Chat(served_v1.model).ask(
        "Tell me a story.", max_new_tokens=200, do_sample=False)


def test_greedy_replies_are_the_same_alone_and_among_others(served_v1, speech, reading):
    """Six requests at once (more than the engine's four rows: some queue, rows are reused mid-flight), chat and
    transcription, different lengths: each gives what it gives alone."""
    client = served_v1.client()

    def chat(n):
        content = [inline(speech if n % 2 else reading), {"type": "text", "text": f"Question {n}?"}]
        return client.chat.completions.create(model=served_v1.name, messages=[{"role": "user", "content": content}],
                                              temperature=0, max_tokens=4 + 3 * n).choices[0].message.content

    def transcribe(n):
        with (speech if n % 2 else reading).open("rb") as f:
            return client.audio.transcriptions.create(model=served_v1.name, file=f).text

    requests = [(chat, 0), (transcribe, 1), (chat, 1), (chat, 2), (transcribe, 2), (chat, 3)]
    alone = [call(n) for call, n in requests]
    assert served_v1.idle()
    before = served_v1.engine.stats()
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: r[0](r[1]), requests))
    assert together == alone
    after = served_v1.engine.stats()
    tokens, steps, prompts = (getattr(after, k) - getattr(before, k) for k in ("tokens", "steps", "prompts"))
    # One row at a time, every token but each prompt's last is followed by a step of its own: steps >= tokens -
    # prompts. Fewer steps than that: some step decoded several rows, so the requests ran side by side.
    assert prompts == len(requests) and steps < tokens - prompts


# --------------------------------------------------------------------------------------------- the other endpoints

def test_models_health_and_metrics(served_v1, speech):
    client = served_v1.client()
    assert [m.id for m in client.models.list()] == [served_v1.name]
    assert httpx.get(f"{served_v1.url}/health").json() == {"status": "ok"}
    before = _metric(served_v1.url, "qwenaudio_generated_tokens_total")
    with speech.open("rb") as f:
        client.audio.transcriptions.create(model=served_v1.name, file=f)
    text = httpx.get(f"{served_v1.url}/metrics").text
    assert _metric(served_v1.url, "qwenaudio_generated_tokens_total") > before
    for name in ("qwenaudio_queued_prompts", "qwenaudio_active_rows", "qwenaudio_pending_requests",
                 'qwenaudio_request_seconds_count{path="/v1/audio/transcriptions"}',
                 'qwenaudio_time_to_first_token_seconds_count{path="/v1/audio/transcriptions"}'):
        assert name in text, name
    assert _metric(served_v1.url, "qwenaudio_rows") == 4


def _metric(url: str, name: str) -> float:
    line = next(ln for ln in httpx.get(f"{url}/metrics").text.splitlines() if ln.startswith(name + " "))
    return float(line.split()[-1])


def test_the_access_log_has_no_bodies(served_v1, speech, caplog):
    caplog.set_level("INFO", logger="qwenaudio.serve.access")
    secret = inline(speech)["input_audio"]["data"]
    served_v1.client().chat.completions.create(
        model=served_v1.name, messages=[{"role": "user", "content": [inline(speech), {"type": "text",
                                                                                     "text": "private words"}]}],
        temperature=0, max_tokens=3)

    def logged() -> list[dict]:  # written once the answer has gone out: it may come a moment after
        lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "qwenaudio.serve.access"]
        return [x for x in lines if x["path"] == "/v1/chat/completions"]

    _until(logged, 5)
    line, = logged()
    assert (line["method"], line["status"], line["client"]) == ("POST", 200, "127.0.0.1")
    assert line["tokens"] > 3 and line["seconds"] > 0
    assert not any(secret[:40] in r.getMessage() or "private words" in r.getMessage() for r in caplog.records)


def test_an_unexpected_error_is_a_logged_500_and_the_server_goes_on(served_v1, speech, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(tasks, "perform", broken)
    with speech.open("rb") as f:
        response = httpx.post(f"{served_v1.url}/v1/audio/transcriptions", files={"file": f})
    assert response.status_code == 500
    assert response.json()["error"] == {"message": "the server failed to answer this request (its log has the "
                                                   "details)", "type": "server_error", "param": None, "code": None}
    assert any(r.exc_info and "a bug" in str(r.exc_info[1]) for r in caplog.records if r.name == "qwenaudio.serve")
    monkeypatch.undo()
    expected = tasks.transcribe(served_v1.model, qwenaudio.load_audio(speech), **FAST)
    with speech.open("rb") as f:
        assert served_v1.client().audio.transcriptions.create(model=served_v1.name, file=f).text == expected


# ----------------------------------------------------------------------------------------------------- operations

def other_app(served, **options):
    """Another app on `served`'s engine, with other settings."""
    from qwenaudio.serve import create_app
    return live(create_app(served.engine, served_model_name=served.name, max_new_tokens=MAX_NEW_TOKENS, **options))


def test_the_api_key(served_v1, speech):
    openai = reference("openai")
    expected = tasks.transcribe(served_v1.model, qwenaudio.load_audio(speech), **FAST)
    with other_app(served_v1, api_key="s3cret-key") as url:
        missing = httpx.post(f"{url}/v1/audio/transcriptions", files={"file": speech.read_bytes()})
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["error"]["message"] == ("no API key given: send it as the header 'Authorization: "
                                                      "Bearer KEY'")
        assert missing.json()["error"]["code"] == "invalid_api_key"
        client = reference("openai").OpenAI(base_url=f"{url}/v1", api_key="s3cret-kez", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as wrong:
            client.models.list()
        assert wrong.value.status_code == 401 and wrong.value.body["message"] == "incorrect API key"
        assert httpx.get(f"{url}/health").status_code == 200 and httpx.get(f"{url}/metrics").status_code == 200
        client = reference("openai").OpenAI(base_url=f"{url}/v1", api_key="s3cret-key", max_retries=0)
        with speech.open("rb") as f:
            assert client.audio.transcriptions.create(model=served_v1.name, file=f).text == expected


def long_chat(client, name, **options):
    return client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Tell me a story."}],
                                          temperature=0, max_tokens=LONG_REPLY, **options)


def test_a_full_server_answers_429_with_retry_after(served_v1, speech):
    openai = reference("openai")
    with other_app(served_v1, max_pending=1) as url:
        client = reference("openai").OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        stream = long_chat(client, served_v1.name, stream=True)
        next(iter(stream))  # admitted and decoding
        busy = httpx.post(f"{url}/v1/audio/transcriptions", files={"file": speech.read_bytes()})
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["message"].startswith("the server is busy (1 requests in flight, --max-pending)")
        assert busy.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model=served_v1.name, messages=[{"role": "user", "content": "Hi"}])
        stream.close()
        assert served_v1.idle()
        with speech.open("rb") as f:
            assert client.audio.transcriptions.create(model=served_v1.name, file=f).text == tasks.transcribe(
                served_v1.model, qwenaudio.load_audio(speech), **FAST)


def test_a_request_past_its_timeout_is_cancelled_with_504(served_v1):
    with other_app(served_v1, request_timeout=0.5) as url:
        made = served_v1.engine.stats().tokens
        late = httpx.post(f"{url}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": LONG_REPLY})
        assert late.status_code == 504
        assert late.json()["error"] == {"message": "the request took longer than the server's limit of 0.5 s "
                                                   "(--request-timeout)", "type": "timeout_error", "param": None,
                                        "code": "timeout"}
        assert served_v1.idle(5) and served_v1.engine.stats().tokens - made < LONG_REPLY  # its row was freed
        quick = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                              "max_tokens": 3, "temperature": 0})
        assert quick.status_code == 200
        assert quick.json()["choices"][0]["message"]["content"] == Chat(served_v1.model).ask(
            "Hi", max_new_tokens=3, do_sample=False)


def test_an_upload_over_the_limit_is_413(served_v1, speech):
    wave = qwenaudio.load_audio(speech)
    small, large = wav_bytes(wave[:8000]), wav_bytes(wave)  # 16 KB, 187 KB
    with other_app(served_v1, max_upload_bytes=100_000) as url:
        declared = httpx.post(f"{url}/v1/audio/transcriptions", files={"file": ("a.wav", large)})
        body = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n' + large +
                b"\r\n--b--\r\n")
        chunked = httpx.post(f"{url}/v1/audio/transcriptions",
                             headers={"content-type": "multipart/form-data; boundary=b"},
                             content=(body[i : i + 4096] for i in range(0, len(body), 4096)))  # no Content-Length
        for response in (declared, chunked):
            assert response.status_code == 413
            assert response.json()["error"] == {
                "message": "the request body is larger than the server's upload limit (--max-upload-mb)",
                "type": "invalid_request_error", "param": None, "code": "request_too_large"}
        fine = httpx.post(f"{url}/v1/audio/transcriptions", files={"file": ("a.wav", small)})
        assert fine.json()["text"] == tasks.transcribe(served_v1.model, wave[:8000], **FAST)


def test_a_client_that_leaves_frees_its_row(served_v1):
    """A streaming client that stops reading, and one that gives up waiting: each one's row is freed at once."""
    made = served_v1.engine.stats().tokens
    stream = long_chat(served_v1.client(), served_v1.name, stream=True)
    chunks = iter(stream)
    next(chunks), next(chunks)
    assert served_v1.engine.stats().active == 1
    stream.close()
    assert served_v1.idle(5) and served_v1.engine.stats().tokens - made < LONG_REPLY
    made = served_v1.engine.stats().tokens
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{served_v1.url}/v1/chat/completions", timeout=0.5, json={
            "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": LONG_REPLY})
    assert served_v1.idle(5) and served_v1.engine.stats().tokens - made < LONG_REPLY


# ---------------------------------------------------------------------------------------------- the README's curl

CURL_MARKER = "<!-- serve-curl -->"


def readme_curl_commands() -> list[str]:
    """The commands between the README's two `<!-- serve-curl -->` markers, one a paragraph (a command may span
    lines: a heredoc, `\\` line ends). QWENAUDIO_SERVE_DOCS names another file to read them from (a draft of
    the README's serving section)."""
    path = Path(os.environ.get("QWENAUDIO_SERVE_DOCS", ROOT / "README.md"))
    parts = path.read_text(encoding="utf-8").split(CURL_MARKER)
    assert len(parts) == 3, f"{path} must hold the serving section's curl examples between two {CURL_MARKER} lines"
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", parts[1], re.DOTALL)
    assert block, f"no fenced code block between the {CURL_MARKER} markers of {path}"
    return [c.strip() for c in re.split(r"\n\s*\n", block[1]) if c.strip()]


def test_the_readmes_curl_examples_run(served_v1, reading, tmp_path):
    """Each example answers 200 with what its request asks for: the library's transcript, translation or analysis
    in the format asked for (SRT cues, verbose JSON and its words, server-sent events that add up to the
    transcript), a chat completion of the prompt the library renders, the model list."""
    curl = reference_program("curl")
    commands = readme_curl_commands()
    assert len(commands) >= 5 and all(c.startswith("curl ") for c in commands), commands
    (tmp_path / "clip.wav").write_bytes(reading.read_bytes())
    wave = qwenaudio.load_audio(reading)
    for command in commands:
        shown = command.replace("http://localhost:8000", served_v1.url).replace(
            "curl ", f"{curl} -sS -w '\\n%{{http_code}}' ", 1)
        done = subprocess.run(["bash", "-c", shown], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        out, _, status = done.stdout.rpartition("\n")
        assert done.returncode == 0 and status == "200", (command, done.stdout, done.stderr)
        _check_curl_answer(served_v1, wave, command, out)


def _check_curl_answer(served, wave, command: str, out: str) -> None:
    if "/v1/models" in command:
        body = json.loads(out)
        assert body["object"] == "list" and [m["id"] for m in body["data"]] == [served.name]
    elif "/v1/chat/completions" in command:
        body = json.loads(out)
        choice, usage = body["choices"][0], body["usage"]
        assert body["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
        assert isinstance(choice["message"]["content"], str) and choice["finish_reason"] in ("stop", "length")
        question = re.search(r'"type": "text", "text": "([^"]*)"', command)[1]
        prompt = Chat(served.model, clips={"clip": wave}).context([{"audio": "clip"}, {"text": question}])
        assert usage["prompt_tokens"] == len(prompt.ids)
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    else:
        _check_audio_answer(served, wave, command, out)


def _check_audio_answer(served, wave, command: str, out: str) -> None:
    fields = dict(re.findall(r'-F "?([\w\[\]]+)=([^"\s@]+)"?', command))
    translation = "/v1/audio/translations" in command
    task = "translate" if translation else fields.get("task", "transcribe")
    fmt = fields.get("response_format", "json")
    timed = task == "transcribe" and (fmt in ("srt", "vtt") or fields.get("timestamp_granularities[]") == "word")
    language = fields.get("language", "zh" if translation else "en")
    expected, = tasks.perform(served.model, [wave], task, language=language,
                              target_language=fields.get("target_language", "en"), timestamps=timed, **FAST)
    assert expected.text
    if fields.get("stream") == "true":
        events = [json.loads(line[len("data: "):]) for line in out.splitlines() if line.startswith("data: ")]
        assert {e["type"] for e in events[:-1]} == {"transcript.text.delta"}
        assert events[-1]["type"] == "transcript.text.done"
        assert "".join(e["delta"] for e in events[:-1]) == events[-1]["text"] == expected.text
    elif fmt == "json":
        assert json.loads(out)["text"] == expected.text
    elif fmt == "srt":
        head, *cues = re.split(r"(?m)^(\d+)\n\d\d:\d\d:\d\d,\d{3} --> \d\d:\d\d:\d\d,\d{3}\n", out)
        numbers, texts = cues[::2], cues[1::2]
        assert head == "" and numbers == [str(n) for n in range(1, len(numbers) + 1)] and numbers
        assert " ".join(texts).split() == expected.text.split()
    elif fmt == "verbose_json":
        body = json.loads(out)
        assert (body["task"], body["text"], body["duration"]) == (task, expected.text, len(wave) / SAMPLE_RATE)
        assert [(s["start"], s["end"], s["text"]) for s in body["segments"]] == [
            (s.start, s.end, s.text) for s in expected.segments]
        if timed:
            assert [(w["word"], w["start"], w["end"]) for w in body["words"]] == [
                (w.text, w.start, w.end) for w in expected.words]
    else:
        raise AssertionError(f"no check for the README's example {command!r}: add one")


# ----------------------------------------------------------------------------------------------- the command line

def test_the_command_checks_before_loading(tmp_path, monkeypatch, capsys):
    assert cli.main(["serve"]) == 2
    assert "give --model: a checkpoint directory or repo id" in capsys.readouterr().err
    with __import__("socket").socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--model", str(tmp_path), "--port", str(port)]) == 2
        assert f"error: cannot listen on 127.0.0.1:{port}: Address already in use" in capsys.readouterr().err
    from qwenaudio.cli import serve
    monkeypatch.setattr(serve, "find_spec", lambda name: None if name == "uvicorn" else object())
    assert cli.main(["serve", "--model", str(tmp_path)]) == 2
    assert "error: qwenaudio serve needs uvicorn: pip install 'qwenaudio[serve]'" in capsys.readouterr().err


@pytest.mark.slow
def test_qwenaudio_imports_without_the_http_stack():
    """The serve extra is optional: without it `import qwenaudio`, the engine and the command line still load."""
    blocked = ["fastapi", "uvicorn", "starlette", "multipart", "python_multipart", "prometheus_client"]
    code = (f"import sys; sys.modules.update(dict.fromkeys({blocked})); import qwenaudio, qwenaudio.serve, "
            "qwenaudio.cli; print(qwenaudio.serve.Engine.__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0 and done.stdout == "Engine\n", done.stderr


@pytest.mark.slow
def test_sigterm_finishes_the_request_in_flight_and_exits_0(served_v1, tmp_path):
    """`qwenaudio serve` in its own process: SIGTERM while a request decodes. The request is answered in full, new
    connections are refused at once, and the command exits 0."""
    server = subprocess.Popen([sys.executable, "-m", "qwenaudio", "serve", "--model", str(served_v1.path), "--port",
                               "0", "--device", "cpu", "--dtype", "float32"], stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    try:
        url = _started(server)
        answers = []
        story = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 400, "temperature": 0}
        ask = threading.Thread(target=lambda: answers.append(httpx.post(f"{url}/v1/chat/completions", json=story,
                                                                        timeout=120)))
        ask.start()
        _until(lambda: _metric(url, "qwenaudio_active_rows") == 1)
        server.send_signal(signal.SIGTERM)
        _until(lambda: _refused(url))
        ask.join(120)
        assert answers[0].status_code == 200
        reply = answers[0].json()
        assert reply["usage"]["completion_tokens"] == 400 and reply["choices"][0]["finish_reason"] == "length"
        assert server.wait(60) == 0
    finally:
        server.kill()
        server.wait()


def _started(server: subprocess.Popen) -> str:
    for line in server.stderr:
        found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
        if found:
            threading.Thread(target=server.stderr.read, daemon=True).start()  # keep the pipe drained
            return found[1]
    raise AssertionError("the server never said where it listens")


def _until(condition, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def _refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=1)
    except httpx.ConnectError:
        return True
    return False
