"""The HTTP side of `qwenaudio serve`: a FastAPI app in front of one `Engine`, speaking OpenAI's API.

The app parses (`protocol`), calls the library and formats; it does no model work of its own. A transcription is
`tasks.perform` run in a worker thread with `generate=` answered by the engine, so the windows of a long recording
decode beside other clients' requests; a chat turn is `chat.Chat(...).context(...)` submitted to the engine, its
tokens handed from the engine thread to the event loop (`loop.call_soon_threadsafe`). Every request owns the rows
it submitted (`_Rows`): a client that disconnects, or a request past its timeout, cancels them, so its rows are
free at the next step.

Limits: an upload cap (FastAPI's `max_body_size`: 413), a cap on requests admitted at once (429 with Retry-After),
a timeout per request (504). Every error, FastAPI's own included, is OpenAI's body `{"error": {...}}`; an
unexpected one is a 500 with a generic message, logged with its traceback. One structured access-log line per
request (method, path, status, seconds, tokens: never a body). /metrics is Prometheus' text format from a registry
of this app's own.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import soundfile as sf
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse, format_sse_event
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import tasks
from ..chat import DEFAULT_SYSTEM, Chat
from ..core.audio import N_SAMPLES, SAMPLE_RATE, as_waveform
from ..core.errors import AudioError, QwenAudioError
from ..core.generate import cut_at_stop
from . import protocol
from .engine import Engine, EngineClosed, Reply
from .protocol import ApiError

log = logging.getLogger("qwenaudio.serve")
access_log = logging.getLogger("qwenaudio.serve.access")

MAX_UPLOAD_BYTES = 25 * 1024 * 1024  # OpenAI's and vLLM's cap on an upload
MAX_AUDIO_SECONDS = 3600.0  # the longest clip taken, decoded: an hour is 230 MB of samples
REMOTE_TIMEOUT = 10.0  # seconds to fetch a remote audio_url's body, where the operator allows them
RETRY_AFTER = "1"  # seconds a refused client is told to wait: a slot frees as soon as any request finishes
FORM_LIMITS = {"max_files": 1, "max_fields": 16, "max_part_size": 64 * 1024}


def create_app(engine: Engine, *, served_model_name: str, api_key: str | None = None,
               max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pending: int | None = None,
               request_timeout: float | None = None, allow_remote_audio: bool = False,
               max_new_tokens: int | None = None, max_audio_seconds: float = MAX_AUDIO_SECONDS) -> FastAPI:
    """The app serving `engine`'s model as `served_model_name`. `api_key`: the Bearer token every /v1 request
    must carry (None: no key; /health and /metrics are always open); `max_pending`: requests admitted at once
    (default 4 x the engine's rows), more get 429; `request_timeout`: seconds before a request is cancelled (504);
    `max_new_tokens`: the default budget of a reply (None: the task's own, or the checkpoint's for chat);
    `max_audio_seconds`: the longest clip taken (an upload or a chat clip: decoded, it takes 64 KB a second). The
    engine is started with the app and not closed by it: its owner closes it (`qwenaudio serve` drains it on
    SIGTERM)."""
    server = _Server(engine, served_model_name, api_key, max_pending or 4 * engine.rows, request_timeout,
                     allow_remote_audio, max_new_tokens, max_upload_bytes, max_audio_seconds)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            server.executor.shutdown(wait=False, cancel_futures=True)

    app = _App(title="qwenaudio", max_body_size=max_upload_bytes, form_limits=FORM_LIMITS, lifespan=lifespan,
               docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(QwenAudioError, _library_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.get("/health")(server.health)
    app.get("/metrics")(server.metrics)
    authorized = [Depends(server.authorize)]
    app.get("/v1/models", dependencies=authorized)(server.models)
    app.post("/v1/audio/transcriptions", dependencies=authorized)(server.transcriptions)
    app.post("/v1/audio/translations", dependencies=authorized)(server.translations)
    app.post("/v1/chat/completions", dependencies=authorized)(server.chat_completions)
    return app


class _App(FastAPI):
    """FastAPI with `_Outermost` around everything it does: the access log, and 413s in OpenAI's body."""

    def build_middleware_stack(self) -> ASGIApp:
        return _Outermost(super().build_middleware_stack(), self.state.server)


class _Cancelled(Exception):
    """The request's rows were cancelled (its client left, or it ran out of time): its worker stops here."""


class _Rows:
    """The engine rows one request submits, kept so that a timeout or a client that leaves frees them (`cancel`),
    and counted for its usage."""

    def __init__(self, engine: Engine):
        self.engine, self.replies, self.cancelled = engine, [], False
        self.first_token: float | None = None  # monotonic time the first token of any row came

    def submit(self, ids: Sequence[int], clips: Sequence[torch.Tensor], config,
               on_update: Callable[[Reply], None] | None = None) -> Reply:
        if self.cancelled:
            raise _Cancelled
        return self._keep([self.engine.submit(ids, clips, config, partial(self._update, on_update))])[0]

    def _update(self, on_update: Callable[[Reply], None] | None, reply: Reply) -> None:
        if self.first_token is None and reply.tokens:
            self.first_token = time.monotonic()
        if on_update is not None:
            on_update(reply)

    def generate(self, prompts: Sequence[str], clips: Sequence[Sequence[torch.Tensor]], *,
                 on_update: Callable[[Reply], None] | None = None, **settings) -> list[list[int]]:
        """`Engine.generate` (the `generate=` of `tasks.perform`) with its replies kept: `Engine.submit_prompts`,
        then wait for them; `on_update` follows every row. A budget past a row's room is cut without a warning: it is
        the task's or the operator's default, no client's choice, and a warning per request would only fill the log."""
        if self.cancelled:
            raise _Cancelled
        replies = self._keep(self.engine.submit_prompts(prompts, clips, on_update=partial(self._update, on_update),
                                                        warn=False, **settings))
        out = [reply.wait() for reply in replies]
        if self.cancelled:
            raise _Cancelled
        return out

    def _keep(self, replies: list[Reply]) -> list[Reply]:
        self.replies.extend(replies)
        if self.cancelled:  # cancelled while submitting (from the event loop)
            for reply in replies:
                reply.cancel()
        return replies

    def cancel(self) -> None:
        self.cancelled = True
        for reply in self.replies:
            reply.cancel()

    def usage(self) -> tuple[int, int]:
        """(prompt tokens, tokens made) over every row."""
        return sum(r.prompt_tokens for r in self.replies), sum(len(r.tokens) for r in self.replies)


class _Updates:
    """A stream's `on_update`: the engine thread's news of a reply handed to the event loop, coalesced. A step only
    raises a flag (one wake-up pending at most, however many steps pass while the stream waits on a slow client) and
    the stream reads the reply as it stands when it wakes: nothing queues, and the text is decoded once a wake-up, not
    once a token."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.event, self.scheduled = loop, asyncio.Event(), False
        self.reply: Reply | None = None  # the latest reply that grew

    def __call__(self, reply: Reply) -> None:  # on the engine thread
        self.reply = reply
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon_threadsafe(self.wake)

    def wake(self) -> None:  # on the event loop
        self.scheduled = False
        self.event.set()

    async def wait(self) -> None:
        await self.event.wait()
        self.event.clear()


@dataclass(eq=False)
class _Server:
    """What the routes share: the engine and the settings, requests in flight, the worker threads and metrics."""

    engine: Engine
    name: str
    api_key: str | None
    max_pending: int
    request_timeout: float | None
    allow_remote_audio: bool
    max_new_tokens: int | None
    max_upload_bytes: int
    max_audio_seconds: float

    def __post_init__(self) -> None:
        self.model, self.pending, self.started = self.engine.model, 0, int(time.time())
        self.executor = ThreadPoolExecutor(self.max_pending, thread_name_prefix="qwenaudio-request")
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(self.engine))
        Gauge("qwenaudio_pending_requests", "Requests admitted and not yet answered",
              registry=self.registry).set_function(lambda: self.pending)
        self.latency = Histogram("qwenaudio_request_seconds", "Time from a request's start to its last byte",
                                 ["path"], registry=self.registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.first_token = Histogram("qwenaudio_time_to_first_token_seconds",
                                     "Time from a request's start to its first token", ["path"],
                                     registry=self.registry, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))

    # --------------------------------------------------------------------------------------------- checks

    async def authorize(self, request: Request) -> None:
        """The Bearer token, compared in constant time; 401 in OpenAI's words otherwise."""
        if self.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise ApiError(401, "no API key given: send it as the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "incorrect API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def admit(self) -> Callable[[], None]:
        """Count a request in (429 when `max_pending` are in flight); returns what counts it out, once."""
        if self.pending >= self.max_pending:
            raise ApiError(429, f"the server is busy ({self.max_pending} requests in flight, --max-pending): retry "
                                "after the time Retry-After says", code="rate_limit_exceeded",
                           headers={"Retry-After": RETRY_AFTER})
        self.pending += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released, self.pending = True, self.pending - 1
        return release

    async def work(self, request: Request, function: Callable[[], Any]) -> Any:
        """`function()` on a request's worker thread (work that blocks: decoding audio, fetching it, building a
        prompt), within the request's time limit (504; the thread finishes on its own, nothing waits for it)."""
        done = asyncio.get_running_loop().run_in_executor(self.executor, function)
        try:
            await asyncio.wait([done], timeout=self.time_left(request))
            if not done.done():
                raise self.timed_out()
            return done.result()
        finally:
            done.add_done_callback(_retrieved)

    # ------------------------------------------------------------------------------------------- routes

    async def health(self) -> dict:
        """ok while the engine runs; 503 once it has stopped (a load balancer then sends requests elsewhere)."""
        if not self.engine.running:
            raise ApiError(503, "the model's engine is not running (the server's log says why)")
        return {"status": "ok"}

    async def metrics(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self) -> dict:
        return protocol.models_list(self.name, self.started)

    async def transcriptions(self, request: Request) -> Response:
        return await self.audio(request, translation=False)

    async def translations(self, request: Request) -> Response:
        return await self.audio(request, translation=True)

    async def audio(self, request: Request, *, translation: bool) -> Response:
        release = self.admit()
        try:
            kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
            if kind != "multipart/form-data":
                raise ApiError(400, "this endpoint reads a multipart/form-data body (curl -F file=@clip.wav), got "
                                    f"{kind or 'none'}")
            async with request.form(**FORM_LIMITS) as form:  # its spooled files closed once read
                fields = {name: form.getlist(name) for name in form.keys()}
                asked = protocol.parse_audio_request(fields, family=self.model.family, served=self.name,
                                                     translation=translation)
                upload = fields["file"][0]
                data = await upload.read()
            if not data:
                raise ApiError(400, f"the uploaded file {upload.filename!r} is empty", param="file")
            wave = await self.work(request, partial(_decode, data, upload.filename or "file",
                                                    self.model.encoder.min_samples, self.max_audio_seconds))
            rows = _Rows(self.engine)
            if asked.stream:
                events = self.transcript_events(request, asked, wave, rows, release)
                release = None  # the stream counts itself out when it ends
                return _stream(events)
            result = await self.until_done(request, rows, partial(self.perform, asked, wave, rows))
            body, media = protocol.audio_response(asked, result, len(wave) / SAMPLE_RATE,
                                                  protocol.token_usage(*rows.usage()))
            self.observe(request, rows)
            return JSONResponse(body) if isinstance(body, dict) else Response(body, media_type=media)
        finally:
            if release is not None:
                release()

    def perform(self, asked: protocol.AudioRequest, wave: torch.Tensor, rows: _Rows,
                on_update: Callable[[Reply], None] | None = None) -> tasks.Result:
        """The library's answer to a transcription request (on a worker thread)."""
        budget = {"max_new_tokens": self.max_new_tokens}  # None: the task's own
        result, = tasks.perform(self.model, [wave], asked.task, language=asked.language,
                                target_language=asked.target_language, timestamps=asked.timed,
                                generate=partial(rows.generate, on_update=on_update), **budget,
                                **asked.generation())
        return result

    async def transcript_events(self, request: Request, asked: protocol.AudioRequest, wave: torch.Tensor,
                                rows: _Rows, release: Callable[[], None]) -> AsyncIterator[dict]:
        """transcript.text.delta events as the text grows, then transcript.text.done with the whole text (the
        non-streaming answer's). A clip of up to 30 s streams token by token (the transcript read so far as
        `tasks.reply_text` reads it); a longer recording or an analysis comes as one delta when done."""
        loop = asyncio.get_running_loop()
        updates = _Updates(loop)
        prompt = tasks.task_prompt(self.model.family, asked.task, language=asked.language,
                                   target_language=asked.target_language)
        by_token = len(wave) <= N_SAMPLES and asked.task in ("transcribe", "translate")
        done = loop.run_in_executor(self.executor, partial(self.perform, asked, wave, rows,
                                                           updates if by_token else None))
        done.add_done_callback(lambda _: updates.wake())
        deltas = protocol.Deltas()
        try:
            async with asyncio.timeout(self.time_left(request)):
                while not done.done():
                    await updates.wait()
                    if updates.reply is not None and not done.done():
                        text = tasks.reply_text(self.model, prompt, list(updates.reply.tokens), partial=True)
                        piece = deltas.piece(text)
                        if piece:
                            yield protocol.transcript_delta(piece)
                result = await done
            piece = deltas.piece(result.text, final=True)
            if piece:
                yield protocol.transcript_delta(piece)
            self.observe(request, rows)
            yield protocol.transcript_done(result.text, protocol.token_usage(*rows.usage()))
        except Exception as e:
            yield self.stream_error(request, e).body()
        finally:
            rows.cancel()  # nothing left to stop once done; a client that left frees its rows here
            done.add_done_callback(_retrieved)
            release()

    async def chat_completions(self, request: Request) -> Response:
        release = self.admit()
        try:
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ApiError(400, f"the body is not valid JSON: {e}") from None
            except RecursionError:
                raise ApiError(400, "the body is not valid JSON: it is nested too deeply to read") from None
            asked = protocol.parse_chat(body, family=self.model.family, served=self.name,
                                        context=self.engine.context)
            ids, clips, config = await self.work(request, partial(self.chat_prompt, asked))
            rows, id_ = _Rows(self.engine), protocol.completion_id()
            if asked.stream:
                updates = _Updates(asyncio.get_running_loop())
                reply = rows.submit(ids, clips, config, updates)  # refused here: a status, not an event
                events = self.chat_events(request, asked, config, rows, reply, updates, id_, release)
                release = None  # the stream counts itself out when it ends
                return _stream(events)
            reply = await self.until_done(request, rows, partial(_submit_and_wait, rows, ids, clips, config))
            text = cut_at_stop(self.model.tokenizer.decode(reply.tokens, skip_special_tokens=True),
                               config.stop_strings)
            self.observe(request, rows)
            return JSONResponse(protocol.chat_completion(id_, self.name, text, reply.finish_reason,
                                                         protocol.chat_usage(*rows.usage())))
        finally:
            if release is not None:
                release()

    def chat_prompt(self, asked: protocol.ChatRequest) -> tuple[list[int], list[torch.Tensor], Any]:
        """(ids, clips, settings) of a chat request (on a worker thread): its clips decoded, the conversation as
        `chat.Chat` renders it, the budget the room in a row allows."""
        waves = {clip.name: _decode(self.clip_bytes(clip), clip.where, self.model.encoder.min_samples,
                                    self.max_audio_seconds)
                 for clip in asked.clips}
        system = DEFAULT_SYSTEM if asked.system is None else asked.system
        conversation = Chat(self.model, system, asked.history, clips=waves)
        rendered = conversation.context(asked.query)
        room = self.engine.context - len(rendered.ids)
        if asked.max_tokens is not None and asked.max_tokens > room:
            raise ApiError(400, f"the conversation's {len(rendered.ids)} tokens and max_tokens {asked.max_tokens} "
                                f"exceed the server's context of {self.engine.context} tokens", param="max_tokens")
        if room < 1:
            raise ApiError(400, f"the conversation's {len(rendered.ids)} tokens fill the server's context of "
                                f"{self.engine.context} tokens: shorten it", param="messages")
        default = self.max_new_tokens or self.model.generation_config.max_new_tokens
        config = self.model.generation_config.replace(
            stop_token_ids=conversation.stop_token_ids, max_new_tokens=asked.max_tokens or default,
            **asked.generation())
        if config.min_new_tokens > config.max_new_tokens:
            config = config.replace(min_new_tokens=config.max_new_tokens)
        fitted = self.engine.fit(config, len(rendered.ids))  # a default budget cut to the room (max_tokens fits)
        return rendered.ids, [conversation.clip(name) for name in rendered.clips], fitted

    def clip_bytes(self, clip: protocol.Clip) -> bytes:
        """A chat clip's file: sent inline, or fetched where the operator allows remote URLs (capped in size and
        time)."""
        if clip.data is not None:
            return clip.data
        if not self.allow_remote_audio:
            raise ApiError(400, f"{clip.where}: remote audio URLs are disabled on this server (the operator enables "
                                "them with --allow-remote-audio): send the clip inline, as input_audio or a data: URL",
                           param=clip.where)
        deadline = time.monotonic() + REMOTE_TIMEOUT
        try:
            with _FETCH.open(clip.url, timeout=REMOTE_TIMEOUT) as remote:
                data = bytearray()  # read as it comes, so that a server sending a byte at a time meets the deadline
                while len(data) <= self.max_upload_bytes and (chunk := remote.read1(64 * 1024)):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"it took longer than {REMOTE_TIMEOUT:g} s")
                    data += chunk
        except OSError as e:
            raise ApiError(400, f"{clip.where}: could not fetch {clip.url}: {e}", param=clip.where) from None
        if len(data) > self.max_upload_bytes:
            raise ApiError(400, f"{clip.where}: {clip.url} is larger than the server's upload limit of "
                                f"{self.max_upload_bytes} bytes", param=clip.where)
        return bytes(data)

    async def chat_events(self, request: Request, asked: protocol.ChatRequest, config, rows: _Rows, reply: Reply,
                          updates: _Updates, id_: str, release: Callable[[], None]) -> AsyncIterator[dict | str]:
        """chat.completion.chunk events: the role, the text as it grows, the finish reason, the usage if asked,
        then [DONE]. `updates` wakes the stream when the reply has grown."""
        deltas = protocol.Deltas(config.stop_strings)

        def text(tokens: list[int]) -> str:
            return cut_at_stop(self.model.tokenizer.decode(tokens, skip_special_tokens=True), config.stop_strings)

        try:
            yield protocol.chat_chunk(id_, self.name, {"role": "assistant", "content": ""})
            async with asyncio.timeout(self.time_left(request)):
                while not reply.done:
                    await updates.wait()
                    piece = "" if reply.done else deltas.piece(text(list(reply.tokens)))
                    if piece:
                        yield protocol.chat_chunk(id_, self.name, {"content": piece})
            if reply.error is not None:
                raise reply.error
            piece = deltas.piece(text(reply.tokens), final=True)
            if piece:
                yield protocol.chat_chunk(id_, self.name, {"content": piece})
            yield protocol.chat_chunk(id_, self.name, {}, reply.finish_reason)
            if asked.include_usage:
                yield protocol.chat_chunk(id_, self.name, {}, usage=protocol.chat_usage(*rows.usage()))
            self.observe(request, rows)
            yield "[DONE]"
        except Exception as e:
            yield self.stream_error(request, e).body()
        finally:
            rows.cancel()
            release()

    def stream_error(self, request: Request, error: Exception) -> ApiError:
        """What a stream that fails after its headers went out says in its last event."""
        if isinstance(error, TimeoutError):
            return self.timed_out()
        if isinstance(error, (ApiError, QwenAudioError)):
            return _as_api_error(error)
        log.error("unexpected error while streaming %s", request.url.path, exc_info=error)
        return ApiError(500, "the server failed to answer this request (its log has the details)")

    # ---------------------------------------------------------------------------------------- waiting

    async def until_done(self, request: Request, rows: _Rows, function: Callable[[], Any]) -> Any:
        """`function()` on a worker thread, its rows cancelled if the client disconnects first (the answer is then
        a 499 nobody reads) or if it runs past the request timeout (504)."""
        loop = asyncio.get_running_loop()
        done = loop.run_in_executor(self.executor, function)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            async with asyncio.timeout(self.time_left(request)):
                await asyncio.wait([done, gone], return_when=asyncio.FIRST_COMPLETED)
            if done.done():
                return done.result()
            raise ApiError(499, "the client closed the connection")
        except TimeoutError:
            raise self.timed_out() from None
        finally:
            gone.cancel()
            rows.cancel()  # nothing left to stop once done
            done.add_done_callback(_retrieved)

    def time_left(self, request: Request) -> float | None:
        """Seconds left of the request's time limit, counted from its start (None: no limit): one limit for all it
        does, from reading its audio to its last token."""
        if self.request_timeout is None:
            return None
        return self.request_timeout - (time.monotonic() - request.state.start)

    def timed_out(self) -> ApiError:
        return ApiError(504, f"the request took longer than the server's limit of {self.request_timeout:g} s "
                             "(--request-timeout)", code="timeout")

    def observe(self, request: Request, rows: _Rows) -> None:
        """A finished request's time to first token (metrics) and tokens (the access log)."""
        request.state.tokens = sum(rows.usage())
        if rows.first_token is not None:
            self.first_token.labels(request.url.path).observe(rows.first_token - request.state.start)


class _HttpRedirectsOnly(urllib.request.HTTPRedirectHandler):
    """Follow a remote audio URL's redirects to http(s) only (urllib's own would also follow one to ftp)."""

    def redirect_request(self, request, fp, code, message, headers, new_url):
        if not new_url.startswith(("http://", "https://")):
            raise urllib.error.HTTPError(new_url, code, f"a redirect to {new_url[:60]} is not followed", headers, fp)
        return super().redirect_request(request, fp, code, message, headers, new_url)


_FETCH = urllib.request.build_opener(_HttpRedirectsOnly)


def _submit_and_wait(rows: _Rows, ids: list[int], clips: list[torch.Tensor], config) -> Reply:
    reply = rows.submit(ids, clips, config)
    reply.wait()
    return reply


def _decode(data: bytes, name: str, min_samples: int, max_seconds: float) -> torch.Tensor:
    """An uploaded file as a 16 kHz waveform; AudioError (400) names the upload (`as_waveform` starts with `name`).
    One longer than `max_seconds` is refused from its header, before it is decoded: the upload limit bounds the
    compressed bytes only, and 25 MB of FLAC silence holds days of audio, tens of GB of samples."""
    try:
        seconds = sf.info(io.BytesIO(data)).duration
    except (sf.SoundFileError, RuntimeError):  # not a file soundfile reads: the loader says so below
        seconds = 0.0
    if seconds <= max_seconds:
        wave = as_waveform(data, name, min_samples)
        seconds = len(wave) / SAMPLE_RATE
    if seconds > max_seconds:
        raise AudioError(f"{name}: {seconds:.1f} s of audio, longer than the server takes ({max_seconds:g} s, "
                         "--max-audio-seconds)")
    return wave


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (the body has been read: only that message is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _retrieved(future: asyncio.Future) -> None:
    """Read a finished worker's outcome, so that a cancelled one's error is not reported as never retrieved."""
    if not future.cancelled():
        future.exception()


def _stream(events: AsyncIterator[dict | str]) -> EventSourceResponse:
    """Server-sent events, unbuffered by proxies: each dict as one JSON `data:` event, a str ([DONE]) as it is
    (fastapi.sse's framing). A route that may also answer in JSON cannot be a generator route, so the events are
    framed here rather than by FastAPI's routing."""
    async def frames() -> AsyncIterator[bytes]:
        async for event in events:
            text = event if isinstance(event, str) else json.dumps(event, ensure_ascii=False)
            yield format_sse_event(data_str=text)
    return EventSourceResponse(frames(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _EngineCollector:
    """The engine's numbers at each scrape: queue depth, active rows, tokens made (tokens/s is its rate)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        yield GaugeMetricFamily("qwenaudio_queued_prompts", "Prompts waiting for a decoding row", value=stats.queued)
        yield GaugeMetricFamily("qwenaudio_active_rows", "Decoding rows in use", value=stats.active)
        yield GaugeMetricFamily("qwenaudio_rows", "Decoding rows (the batch size)", value=stats.rows)
        yield CounterMetricFamily("qwenaudio_generated_tokens", "Tokens generated", value=stats.tokens)
        yield CounterMetricFamily("qwenaudio_finished_prompts", "Prompts finished, whatever the reason",
                                  value=stats.prompts)
        yield CounterMetricFamily("qwenaudio_decoding_steps", "Decoding steps run", value=stats.steps)


# ---------------------------------------------------------------------------------------------------------- errors

def _as_api_error(error: Exception) -> ApiError:
    if isinstance(error, ApiError):
        return error
    if isinstance(error, EngineClosed):
        return ApiError(503, "the server is shutting down and takes no new requests")
    return ApiError(400, str(error))


def _respond(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    return _respond(error)


async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """FastAPI's and Starlette's own refusals (no such route, wrong method, a body too large or unparsable)."""
    messages = {404: f"no route {request.method} {request.url.path}",
                405: f"{request.url.path} does not take {request.method}",
                413: "the request body is larger than the server's upload limit (--max-upload-mb)"}
    message = messages.get(error.status_code, str(error.detail))
    if error.status_code == 400:  # the only ones: the form parser's (python-multipart's words)
        message = f"the request body could not be read: {error.detail}"
    codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
    return _respond(ApiError(error.status_code, message, code=codes.get(error.status_code),
                             headers=getattr(error, "headers", None)))


async def _library_error(request: Request, error: QwenAudioError) -> JSONResponse:
    """What the library refuses (a clip it cannot read, a language it has no tag for) is the request's fault."""
    return _respond(_as_api_error(error))


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=error)
    return _respond(ApiError(500, "the server failed to answer this request (its log has the details)"))


class _Outermost:
    """Outside FastAPI's own middleware: one access-log line and the latency metric per request, and Starlette's
    plain-text 413 (its body limit answers before any handler can) replaced by OpenAI's error body."""

    def __init__(self, app: ASGIApp, server: _Server):
        self.app, self.server = app, server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, replaced = time.monotonic(), None, False
        scope.setdefault("state", {})["start"] = start

        async def sending(message: Message) -> None:
            nonlocal status, replaced
            if message["type"] == "http.response.start":
                status = message["status"]
                replaced = status == 413 and _header(message, b"content-type").startswith(b"text/plain")
                if replaced:
                    await _send_json_413(send)
            if not replaced:
                await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            if status != 500:
                raise
            # Starlette re-raises what its ServerErrorMiddleware answered with a 500, for the server to log:
            # `_unexpected` has logged it with its traceback, once is enough
        finally:
            seconds = time.monotonic() - start
            path = scope["path"] if scope.get("route") is not None else "other"
            self.server.latency.labels(path).observe(seconds)
            access_log.info(json.dumps({
                "method": scope["method"], "path": scope["path"], "status": status or 500, "seconds": round(seconds, 4),
                "tokens": scope["state"].get("tokens"), "client": (scope.get("client") or ("", 0))[0]}))


def _header(message: Message, name: bytes) -> bytes:
    return next((v for k, v in message.get("headers", []) if k.lower() == name), b"")


async def _send_json_413(send: Send) -> None:
    body = json.dumps(protocol.error_body(413, "the request body is larger than the server's upload limit "
                                               "(--max-upload-mb)", code="request_too_large")).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
