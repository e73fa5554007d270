"""Live `qwenaudio serve` apps for the tests: uvicorn on a free 127.0.0.1 port in a background thread, stopped (and
its engine closed) however the test ends. conftest.py's `served_v1` / `served_qwen2` keep one per family for the
session; `live` serves another app on the same engine (other limits, a key) for one test."""

from __future__ import annotations

import http.server
import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from qwenaudio.core.audio import SAMPLE_RATE
from qwenaudio.core.model import QwenAudio, load_model

from .conftest import reference

MAX_NEW_TOKENS = 8  # the served apps' reply budget: short replies keep the tests fast
ROWS = 4


@dataclass
class Served:
    """A live app: its URL, the model and engine behind it, the name it serves the model as and its checkpoint."""

    url: str
    model: QwenAudio
    engine: Any
    name: str
    path: Path

    def client(self, **options):
        """The official openai client, pointed at this server."""
        return reference("openai").OpenAI(base_url=f"{self.url}/v1", api_key=options.pop("api_key", "unused"),
                                          max_retries=0, **options)

    def idle(self, timeout: float = 10.0) -> bool:
        """Whether the engine's rows and queue empty within `timeout` seconds."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            stats = self.engine.stats()
            if stats.active == 0 and stats.queued == 0:
                return True
            time.sleep(0.02)
        return False


def http_stack() -> None:
    """Skip (fail under CI) where the serve extra is not installed."""
    for module in ("fastapi", "uvicorn", "python_multipart", "prometheus_client"):
        reference(module)


@contextmanager
def live(app) -> Iterator[str]:
    """Serve `app` on a free 127.0.0.1 port in a background thread; its URL. Stopped on the way out."""
    uvicorn = reference("uvicorn")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        end = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@contextmanager
def audio_host(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """A plain HTTP server with `handler` on a free 127.0.0.1 port in a background thread (a remote audio URL's
    host); its URL. Stopped on the way out."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def serve_checkpoint(path: Path, **options) -> Iterator[Served]:
    """The tiny checkpoint at `path` served as its directory's name, with a short reply budget."""
    http_stack()
    from qwenaudio.serve import Engine, create_app

    model = load_model(path, device="cpu", dtype="float32")
    engine = Engine(model, rows=ROWS)
    app = create_app(engine, served_model_name=path.name, max_new_tokens=MAX_NEW_TOKENS, **options)
    try:
        with live(app) as url:
            yield Served(url, model, engine, path.name, path)
    finally:
        engine.close(drain=False)


def wav_bytes(wave: torch.Tensor) -> bytes:
    """A 16 kHz waveform as the bytes of a 16-bit WAV file (what a client uploads)."""
    out = io.BytesIO()
    sf.write(out, np.asarray(wave, dtype=np.float32), SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return out.getvalue()
