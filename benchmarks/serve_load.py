"""Load on `qwenaudio serve`: K concurrent clients against one live server, and the same requests one at a time.

    python benchmarks/serve_load.py [--family qwen-audio] [--clients 1 4 8 16 64] [--max-tokens 64] [--weights DIR]
                                    [--decoder-layers 2] [--encoder-layers 2] [--rows 8] [--rounds 2]
                                    [--json out.json] [--tiny]

The server runs as users run it (`python -m qwenaudio serve`, a process of its own) on random weights of full width
(hidden 4096, encoder 1280, the whole vocabulary) and few layers, written in the official layout to a temporary
folder. Every request is the same chat completion: a 5.86 s LibriSpeech clip from ../shared/audio (noise of its
length where that folder is absent, as on a lent GPU) sent as `input_audio` (WAV, base64) and a question, greedy,
`max_tokens` new tokens, streamed, so that each request has a time to first token. The random model rarely stops
early, so each reply is about `max_tokens` long; tokens are counted from the server's `usage`.

For each K in `--clients`, K clients each send requests back to back until K (at least 8) are done; K = 1 is the
baseline, the same requests one at a time. Reported per K: requests/s, completion tokens/s and its ratio to K = 1,
time to first token and latency (p50 / p95 / p99), failed requests, and the server's resident memory after the
round. The largest K then runs `--rounds` more times: its memory after each round shows whether anything grows.
Decoding is bandwidth-bound (each step reads every weight once, whatever the batch), so continuous batching should
approach the number of rows at K >= rows; prefill (encoder + prompt) is per request and does not batch.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import base64
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf
import torch
from json_output import json_path, write_json  # a sibling: --json checked first, written atomically
from recordings import recording  # a sibling: noise where ../shared is absent, as on a lent GPU

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT.parent / "shared" / "audio" / "1272-128104-0000.flac"
CLIP_SECONDS = 5.855  # all of it: 93,680 samples at 16 kHz


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_weights(folder: Path, args) -> Path:
    """Random weights of the family (the chat / Instruct generation config) at full width with the layers asked for
    (`--tiny`: the test model's widths), with Qwen's vocabulary where the dashscope wheel ships it."""
    from qwenaudio.core.qwen2_audio import Qwen2AudioConfig
    from qwenaudio.testing import (OFFICIAL_CONFIG, OFFICIAL_QWEN2_CONFIG, make_tiny_checkpoint,
                                   make_tiny_qwen2_checkpoint)

    dashscope = importlib.util.find_spec("dashscope")
    vocabulary = Path(dashscope.origin).parent / "resources" / "qwen.tiktoken" if dashscope else None
    vocabulary = vocabulary if vocabulary and vocabulary.is_file() else None
    path, shards, device = folder / "weights", 2 * 1000**3, "cuda" if torch.cuda.is_available() else "cpu"
    if args.family == "qwen2-audio":
        official = Qwen2AudioConfig.from_dict(OFFICIAL_QWEN2_CONFIG)
        widths = {} if args.tiny else {
            **{k: getattr(official, k) for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                                 "intermediate_size")},
            **{k: getattr(official.audio, k) for k in ("d_model", "encoder_attention_heads", "encoder_ffn_dim")}}
        return make_tiny_qwen2_checkpoint(path, vocab_file=vocabulary, instruct=True, max_shard_bytes=shards,
                                          draw_on=device, num_hidden_layers=args.decoder_layers,
                                          encoder_layers=args.encoder_layers, **widths)
    widths = {} if args.tiny else {
        **{k: OFFICIAL_CONFIG[k] for k in ("hidden_size", "num_attention_heads", "kv_channels", "intermediate_size")},
        **{k: OFFICIAL_CONFIG["audio"][k] for k in ("n_state", "n_head")}}
    return make_tiny_checkpoint(path, vocab_file=vocabulary, chat=True, max_shard_bytes=shards, draw_on=device,
                                num_hidden_layers=args.decoder_layers, n_layer=args.encoder_layers, **widths)


def server_environment() -> dict[str, str]:
    """This process's environment with the checkout's src/ first on PYTHONPATH and the caller's entries kept after
    it: on a lent GPU the wheels its image lacks are installed aside and reached through PYTHONPATH."""
    paths = [str(ROOT / "src"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


class Server:
    """`python -m qwenaudio serve` on `weights`, started and waited for; stopped with SIGTERM."""

    def __init__(self, weights: Path, args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "qwenaudio", "serve", "--model", str(weights), "--port", str(self.port),
                   "--rows", str(args.rows), "--max-pending", str(4 * max(args.clients)),
                   "--served-model-name", "bench"]
        env = server_environment()
        self.log = tempfile.TemporaryFile()  # a file, not a pipe: a pipe nobody reads fills and stalls the server
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"the server exited: {self.log.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit("the server did not start in 10 minutes")

    def rss_gib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024**2
        return float("nan")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=120)


def request_body(max_tokens: int, audio: np.ndarray, rate: int) -> dict:
    wav = io.BytesIO()
    sf.write(wav, audio, rate, format="WAV")
    clip = base64.b64encode(wav.getvalue()).decode()
    return {"model": "bench", "temperature": 0, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": clip, "format": "wav"}},
                {"type": "text", "text": "What does the speaker say?"}]}]}


async def one_request(client: httpx.AsyncClient, body: dict) -> dict:
    """Send one streamed chat completion; its latency, time to first token and completion tokens (or its error)."""
    start = time.perf_counter()
    first, tokens = None, 0
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return {"error": f"{response.status_code} {(await response.aread()).decode()[:200]}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first is None and any(c["delta"].get("content") for c in chunk.get("choices", [])):
                    first = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        return {"error": repr(e)}
    return {"latency": time.perf_counter() - start, "ttft": first, "tokens": tokens}


async def round_of(server: Server, clients: int, total: int, body: dict) -> dict:
    """`clients` clients sending back to back until `total` requests are done."""
    results: list[dict] = []
    left = iter(range(total))

    async def client_loop(client: httpx.AsyncClient) -> None:
        for _ in left:
            results.append(await one_request(client, body))

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=server.url, timeout=3600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - start
    good = [r for r in results if "error" not in r]
    failed = [r["error"] for r in results if "error" in r]
    return {"clients": clients, "requests": total, "failed": len(failed), "errors": failed[:3], "seconds": wall,
            "requests_per_s": len(good) / wall, "tokens_per_s": sum(r["tokens"] for r in good) / wall,
            "tokens_per_request": statistics.mean(r["tokens"] for r in good) if good else 0,
            **percentiles("ttft", [r["ttft"] for r in good if r["ttft"] is not None]),
            **percentiles("latency", [r["latency"] for r in good]), "server_rss_gib": server.rss_gib()}


def percentiles(name: str, values: list[float]) -> dict:
    if not values:
        return {}
    ranked = sorted(values)
    at = {q: ranked[min(len(ranked) - 1, round(q / 100 * (len(ranked) - 1)))] for q in (50, 95, 99)}
    return {f"{name}_p{q}": v for q, v in at.items()}


def show(row: dict, baseline: float) -> None:
    ratio = row["tokens_per_s"] / baseline if baseline else float("nan")
    print(f"{row['clients']:>7} {row['requests']:>8} {row['failed']:>6} {row['requests_per_s']:>9.3f} "
          f"{row['tokens_per_s']:>9.1f} {ratio:>6.2f}x {row.get('ttft_p50', float('nan')):>9.2f} "
          f"{row.get('latency_p50', float('nan')):>8.2f} {row.get('latency_p95', float('nan')):>8.2f} "
          f"{row.get('latency_p99', float('nan')):>8.2f} {row['server_rss_gib']:>8.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("qwen-audio", "qwen2-audio"), default="qwen-audio")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16, 64])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--decoder-layers", type=int, default=2, help="of 32 in the real model")
    parser.add_argument("--encoder-layers", type=int, default=2, help="of 32 in the real model")
    parser.add_argument("--rows", type=int, default=8, help="the server's --rows (decoding batch)")
    parser.add_argument("--rounds", type=int, default=2, help="extra rounds at the largest K (memory growth)")
    parser.add_argument("--tiny", action="store_true", help="the tiny test model's widths (a smoke run)")
    parser.add_argument("--weights", type=Path, help="serve this checkpoint instead of writing random weights")
    parser.add_argument("--json", type=json_path, help="also write the rows and the setup here")
    args = parser.parse_args()
    if 1 not in args.clients:
        args.clients = [1, *args.clients]
    audio, rate, name = recording(CLIP, CLIP_SECONDS)
    setup = {"family": args.family, "machine": platform.machine(), "processor": platform.processor(),
             "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
             "decoder_layers": args.decoder_layers, "encoder_layers": args.encoder_layers, "rows": args.rows,
             "max_tokens": args.max_tokens, "weights": str(args.weights) if args.weights else
             "tiny" if args.tiny else "full width, random weights",
             "clip": name}
    print(f"# {setup}", flush=True)
    body = request_body(args.max_tokens, audio, rate)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        server = Server(args.weights or write_weights(Path(folder), args), args)
        try:
            asyncio.run(round_of(server, 1, 1, body))  # warm-up: first-call costs stay out of the table
            print(f"{'clients':>7} {'requests':>8} {'failed':>6} {'req/s':>9} {'tok/s':>9} {'ratio':>7} "
                  f"{'ttft p50':>9} {'lat p50':>8} {'lat p95':>8} {'lat p99':>8} {'RSS GiB':>8}")
            for clients in [*args.clients, *[max(args.clients)] * args.rounds]:
                row = asyncio.run(round_of(server, clients, max(clients, 8), body))
                rows.append(row)
                show(row, rows[0]["tokens_per_s"])
        finally:
            server.stop()
    if args.json:
        write_json(args.json, {"setup": setup, "rows": rows})


if __name__ == "__main__":
    main()
