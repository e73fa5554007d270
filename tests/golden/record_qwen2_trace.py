"""Record the Qwen2-Audio trace that `qwenaudio verify` checks ours against, from transformers.

What it records: tools/record_transformers.py (transformers' ``Qwen2AudioForConditionalGeneration`` and its
processor, fp32 on CPU, hooks on every stage) on ``qwenaudio.testing.make_tiny_qwen2_checkpoint(seed=0)`` with Qwen's
vocabulary converted to vocab.json + merges.txt (the ``tiny_qwen2_ckpt`` fixture), for PROMPT below with
tests/golden/clip0.wav and clip1.wav: two clips of different lengths, so the encoder runs a padded batch; the last
position's logits; no ``--project``, so every hidden state is kept whole and can be fed back into our layers
(``qwenaudio.trace.isolate``). The manifest names the transformers and torch versions that made it (transformers
5.25.0, torch 2.13.0).

How to run (a venv with transformers, torch, soundfile, safetensors and dashscope, whose wheel ships qwen.tiktoken),
from the repository root:

    PYTHONPATH=src python tests/golden/record_qwen2_trace.py

It writes ``trace_qwen2_transformers.safetensors`` next to this script; the tests only read that file (and record
transformers' trace live where it is installed).
"""

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OUT_PATH = HERE / "trace_qwen2_transformers.safetensors"
PROMPT = ("Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nAudio 2: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
          "Detect the language and recognize the speech: <|en|>")
CLIPS = ["tests/golden/clip0.wav", "tests/golden/clip1.wav"]


def tool():
    """tools/record_transformers.py as a module."""
    spec = importlib.util.spec_from_file_location("record_transformers", ROOT / "tools" / "record_transformers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    import dashscope

    from qwenaudio.testing import make_tiny_qwen2_checkpoint

    vocab = Path(dashscope.__file__).parent / "resources" / "qwen.tiktoken"
    os.chdir(ROOT)  # the clips are named relative to the repository, as the tests run them
    recorder = tool()
    with tempfile.TemporaryDirectory() as work:
        ckpt = make_tiny_qwen2_checkpoint(Path(work) / "Qwen2-Audio-tiny", seed=0, vocab_file=vocab)
        tensors, manifest = recorder.record(str(ckpt), PROMPT, CLIPS)
    recorder.save_trace(tensors, manifest, OUT_PATH)
    print(f"wrote {len(tensors)} tensors, {os.path.getsize(OUT_PATH)} bytes to {OUT_PATH}", file=sys.stderr)


if __name__ == "__main__":
    main()
