"""The server when something goes wrong inside it or around it: an engine that stopped, a body nested too deeply,
audio that decodes to far more than it weighs, a remote clip that comes a byte at a time, a stream whose client
reads slowly. Each is refused or bounded with its own status and message, and the next good request is answered
as the library answers it."""

import asyncio
import base64
import http.server
import io
import threading
import time

import httpx
import numpy as np
import pytest
import soundfile as sf

from qwenaudio.chat import Chat

from .serving import MAX_NEW_TOKENS, audio_host, live

CHAT = "/v1/chat/completions"


def ask(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}{CHAT}", timeout=60, json={"messages": [{"role": "user", "content": "Hi"}],
                                                        "max_tokens": 4, "temperature": 0, **body})


def answered(served, url: str) -> None:
    """The good request: a greedy chat reply, as `Chat.ask` gives it."""
    reply = ask(url)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == Chat(served.model).ask("Hi", max_new_tokens=4,
                                                                                      do_sample=False)


def silence(seconds: float) -> bytes:
    """A FLAC of digital silence: a few KB for minutes of audio."""
    out = io.BytesIO()
    sf.write(out, np.zeros(int(seconds * 16_000), dtype=np.float32), 16_000, format="FLAC")
    return out.getvalue()


@pytest.fixture
def dripping():
    """An HTTP server on 127.0.0.1 whose /slow.wav announces 12 bytes and sends one every 0.25 s (3 s in all)."""
    class Drip(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "12")
            self.end_headers()
            try:
                for _ in range(12):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.25)
            except OSError:  # the server gave up on it
                pass

        def log_message(self, *args):
            pass

    with audio_host(Drip) as url:
        yield url + "/slow.wav"


def remote(address: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": address}},
                                                      {"type": "text", "text": "What is it?"}]}]}


def test_health_is_503_once_the_engine_has_stopped(served_v1):
    """/health follows the engine: ok while it runs, 503 once it has stopped (closed, or failed), so that a load
    balancer sends requests elsewhere; a request then is a 503 too."""
    from qwenaudio.serve import Engine, create_app

    engine = Engine(served_v1.model, rows=1)
    with live(create_app(engine, served_model_name=served_v1.name)) as url:
        ok = httpx.get(f"{url}/health", timeout=10)
        assert (ok.status_code, ok.json()) == (200, {"status": "ok"})
        engine.close(timeout=30)
        down = httpx.get(f"{url}/health", timeout=10)
        assert down.status_code == 503
        assert down.json()["error"]["message"] == "the model's engine is not running (the server's log says why)"
        refused = ask(url)
        assert refused.status_code == 503
        assert refused.json()["error"]["message"] == "the server is shutting down and takes no new requests"
    answered(served_v1, served_v1.url)


def test_a_body_nested_too_deeply_is_a_400(served_v1):
    deep = httpx.post(f"{served_v1.url}{CHAT}", content=b"[" * 200_000, timeout=60,
                      headers={"content-type": "application/json"})
    assert deep.status_code == 400
    assert deep.json()["error"]["message"] == "the body is not valid JSON: it is nested too deeply to read"
    answered(served_v1, served_v1.url)


def test_audio_longer_than_the_limit_is_refused_before_it_is_decoded(served_v1, monkeypatch):
    """Two minutes of FLAC silence weigh 6 KB: the upload limit does not see them, the audio limit does, from the
    file's header (the loader is never called), for an upload and for a chat clip alike."""
    from qwenaudio.serve import app as app_module
    from qwenaudio.serve import create_app

    def never(*args):
        raise AssertionError("the audio was decoded")

    long = silence(120)
    assert len(long) < 10_000
    monkeypatch.setattr(app_module, "as_waveform", never)
    with live(create_app(served_v1.engine, served_model_name=served_v1.name, max_audio_seconds=60,
                         max_new_tokens=MAX_NEW_TOKENS)) as url:
        upload = httpx.post(f"{url}/v1/audio/transcriptions", files={"file": ("long.flac", long)}, timeout=60)
        assert upload.status_code == 400 and upload.json()["error"]["message"] == (
            "long.flac: 120.0 s of audio, longer than the server takes (60 s, --max-audio-seconds)")
        clip = {"type": "input_audio", "input_audio": {"data": base64.b64encode(long).decode(), "format": "flac"}}
        chat = ask(url, messages=[{"role": "user", "content": [clip, {"type": "text", "text": "What is it?"}]}])
        assert chat.status_code == 400 and chat.json()["error"]["message"] == (
            "messages[0].content[0]: 120.0 s of audio, longer than the server takes (60 s, --max-audio-seconds)")
        monkeypatch.undo()
        answered(served_v1, url)


def test_a_remote_clip_that_comes_a_byte_at_a_time_meets_the_fetch_deadline(served_v1, dripping, monkeypatch):
    """Each byte comes well within the socket's timeout; the fetch as a whole still ends at its deadline."""
    from qwenaudio.serve import app as app_module
    from qwenaudio.serve import create_app

    monkeypatch.setattr(app_module, "REMOTE_TIMEOUT", 1.0)
    with live(create_app(served_v1.engine, served_model_name=served_v1.name, allow_remote_audio=True,
                         max_new_tokens=MAX_NEW_TOKENS)) as url:
        slow = ask(url, **remote(dripping))
        assert slow.status_code == 400 and slow.json()["error"]["message"] == (
            f"messages[0].content[0]: could not fetch {dripping}: it took longer than 1 s")
        answered(served_v1, url)


def test_the_request_timeout_counts_the_time_spent_fetching_a_clip(served_v1, dripping, monkeypatch):
    """--request-timeout bounds all a request does, not only its decoding: a clip still coming after it is a 504."""
    from qwenaudio.serve import app as app_module
    from qwenaudio.serve import create_app

    monkeypatch.setattr(app_module, "REMOTE_TIMEOUT", 30.0)
    with live(create_app(served_v1.engine, served_model_name=served_v1.name, allow_remote_audio=True,
                         request_timeout=1, max_new_tokens=MAX_NEW_TOKENS)) as url:
        slow = ask(url, **remote(dripping))
        assert slow.status_code == 504 and slow.json()["error"]["message"] == (
            "the request took longer than the server's limit of 1 s (--request-timeout)")
        answered(served_v1, url)


def test_stream_updates_are_coalesced():
    """A thousand steps while the event loop is busy leave one wake-up pending, not a thousand copies of the reply;
    the stream then reads the reply as it stands."""
    pytest.importorskip("fastapi")
    from qwenaudio.serve.app import _Updates

    class Reply:
        tokens = list(range(1000))

    async def main():
        loop = asyncio.get_running_loop()
        scheduled = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda callback, *args: scheduled.append(real(callback, *args))
        updates = _Updates(loop)
        reply = Reply()
        steps = threading.Thread(target=lambda: [updates(reply) for _ in range(1000)])
        steps.start()
        steps.join()  # the loop is blocked meanwhile: nothing it was handed has run
        assert len(scheduled) == 1
        await asyncio.wait_for(updates.wait(), timeout=10)
        assert updates.reply is reply and not updates.event.is_set()
        updates(reply)  # the next step wakes the stream again
        await asyncio.wait_for(updates.wait(), timeout=10)
        assert len(scheduled) == 2

    asyncio.run(main())


def test_an_upload_is_closed_once_read(served_v1, monkeypatch):
    """The form's spooled files are closed when the request has read them, answered or refused, not left to the
    garbage collector."""
    from starlette.datastructures import UploadFile

    closed, real = [], UploadFile.close

    async def close(self):
        closed.append(self.filename)
        await real(self)

    monkeypatch.setattr(UploadFile, "close", close)
    upload = silence(2)
    bad = httpx.post(f"{served_v1.url}/v1/audio/transcriptions", files={"file": ("bad.flac", upload)},
                     data={"response_format": "xml"}, timeout=60)
    assert bad.status_code == 400 and "response_format" in bad.json()["error"]["message"]
    good = httpx.post(f"{served_v1.url}/v1/audio/transcriptions", files={"file": ("good.flac", upload)}, timeout=60)
    assert good.status_code == 200 and closed == ["bad.flac", "good.flac"]
