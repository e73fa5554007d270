"""`qwenaudio serve`: the model behind an OpenAI-compatible HTTP API (qwenaudio.serve), many clients sharing it
through continuous batching. It binds 127.0.0.1 unless told otherwise; SIGTERM stops taking connections, lets the
requests in flight finish (uvicorn's graceful shutdown), drains the engine and exits 0."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from ..core.errors import InputError
from ..core.model import QwenAudio
from .options import Plan, UsageError, add_model_options, freeze, positive

API_KEY_VARIABLE = "QWENAUDIO_API_KEY"
PACKAGES = ("fastapi", "uvicorn", "python_multipart", "prometheus_client")  # the `serve` extra, by import name
PARSER = dict(help="serve a model over an OpenAI-compatible HTTP API",
              description="Serve /v1/audio/transcriptions, /v1/audio/translations, /v1/chat/completions, /v1/models, "
                          "/health and /metrics, with continuous batching over one model.",
              epilog="exit status: 0 stopped (on SIGTERM, once the requests in flight are answered), 1 the server "
                     "could not start, 2 bad arguments, the address cannot be listened on or the serve extra is "
                     "missing, 3 the model could not be loaded, 130 interrupted")


@dataclass(frozen=True, kw_only=True)
class ServePlan(Plan):
    host: str
    port: int
    api_key: str | None
    served_model_name: str
    rows: int
    context: int | None
    max_pending: int | None
    max_upload_mb: float
    max_audio_seconds: float
    request_timeout: float | None
    allow_remote_audio: bool
    max_new_tokens: int | None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="the address to listen on; default 127.0.0.1 (this machine only); 0.0.0.0 for every "
                             "interface, with --api-key")
    parser.add_argument("--port", type=int, default=8000, help="default 8000; 0 picks a free one (logged)")
    parser.add_argument("--api-key", metavar="KEY",
                        help=f"the key clients must send (Authorization: Bearer KEY); default ${API_KEY_VARIABLE}, "
                             "else none. The variable keeps the key out of the process list")
    parser.add_argument("--served-model-name", metavar="NAME",
                        help="the model name clients send and /v1/models lists; default the checkpoint's directory "
                             "name")
    parser.add_argument("--rows", type=positive, default=8, metavar="N",
                        help="requests decoded together (the batch); default 8")
    parser.add_argument("--context", type=positive, metavar="N",
                        help="tokens per row, a prompt and its reply; default the model's, at most 4096")
    parser.add_argument("--max-pending", type=positive, metavar="N",
                        help="requests admitted at once, running or queued; more get 429; default 4 x --rows")
    parser.add_argument("--max-upload-mb", type=_positive_number, default=25.0, metavar="MB",
                        help="the largest request body (an upload, a chat with inline clips); default 25")
    parser.add_argument("--max-audio-seconds", type=_positive_number, default=3600.0, metavar="SECONDS",
                        help="the longest clip taken, an upload or a chat clip (decoded, 64 KB a second: the upload "
                             "limit bounds compressed bytes only); default 3600")
    parser.add_argument("--request-timeout", type=_positive_number, metavar="SECONDS",
                        help="cancel a request still running after this long (504); default none")
    parser.add_argument("--allow-remote-audio", action="store_true",
                        help="let chat requests name http(s) audio URLs, which the server then fetches; off by default")
    add_model_options(parser, None)


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def plan(args: argparse.Namespace) -> ServePlan:
    """Everything checked before the model loads: a model named, the serve extra installed, the address free."""
    if args.model is None:
        raise UsageError("give --model: a checkpoint directory or repo id (Qwen/Qwen-Audio to transcribe, "
                         "Qwen/Qwen2-Audio-7B-Instruct to chat)")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be from 0 to 65535, got {args.port}")
    missing = [name for name in PACKAGES if find_spec(name) is None]
    if missing:
        raise InputError(f"qwenaudio serve needs {', '.join(missing)}: pip install 'qwenaudio[serve]'")
    _listen(args.host, args.port).close()  # a taken port is said now, not after minutes of loading
    name = args.served_model_name or Path(str(args.model).rstrip("/")).name
    return freeze(ServePlan, args, api_key=args.api_key or os.environ.get(API_KEY_VARIABLE) or None,
                  served_model_name=name)


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (IPv6 where the host is one); InputError if it cannot be."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def run(model: QwenAudio, plan: ServePlan) -> int:
    """Start the engine, serve until SIGTERM (or Ctrl-C), then drain the engine. uvicorn re-raises the signal it
    stopped for once it has stopped: for SIGTERM that is the clean end asked for, so it is taken as done (exit 0)."""
    import uvicorn

    from ..serve import Engine, create_app

    _log_to_stderr()
    if plan.host not in ("127.0.0.1", "localhost", "::1") and plan.api_key is None:
        logging.getLogger("qwenaudio.serve").warning(
            "serving on %s without an API key: anyone who can reach the port can use the model", plan.host)
    engine = Engine(model, rows=plan.rows, context=plan.context)
    engine.start()  # the KV cache now: one that does not fit is an `error:` line, before anything listens
    app = create_app(engine, served_model_name=plan.served_model_name, api_key=plan.api_key,
                     max_upload_bytes=int(plan.max_upload_mb * 1024 * 1024), max_pending=plan.max_pending,
                     request_timeout=plan.request_timeout, allow_remote_audio=plan.allow_remote_audio,
                     max_new_tokens=plan.max_new_tokens, max_audio_seconds=plan.max_audio_seconds)
    server = uvicorn.Server(uvicorn.Config(app, host=plan.host, port=plan.port, access_log=False, log_level="info",
                                           lifespan="on"))
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # what uvicorn re-raises after draining
    try:
        server.run()  # logs the address it listens on (the port it picked, for --port 0)
    finally:
        engine.close(drain=True)
        signal.signal(signal.SIGTERM, previous)
    return 0 if server.started else 1


def _log_to_stderr() -> None:
    """The server's log (an access line per request, errors with their tracebacks) on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("qwenaudio.serve")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
