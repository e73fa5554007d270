"""Record the full-size (unprojected) official trace that `qwenaudio verify` checks layer by layer in isolation.

What it records: tools/record_official.py (the official QwenLM/Qwen-Audio code at e81cc26 through transformers'
remote code, fp32 on CPU) on ``qwenaudio.testing.make_tiny_checkpoint(seed=0)`` with the official code files beside
it, for PROMPT below: two clips (so the encoder runs a padded batch) and an ASR task, last position's logits, no
``--project``, so every hidden state is kept whole and can be fed back into our layers (``qwenaudio.trace.isolate``).
The manifest of the trace names the code, transformers and torch versions that made it.

How to run (the venv of record_encoder.py, e.g. /work/official/venv with transformers==4.32.0; ffmpeg on PATH for
the official audio loader), from the repository root:

    /work/official/venv/bin/python tests/golden/record_trace.py --official-files DIR

It writes ``trace_official_full.safetensors`` next to this script; the tests only read that file.
(``trace_official.safetensors``, projected with ``--project 32 --logits all``, was made the same way with the
prompt ``<audio>tests/golden/clip1.wav</audio>`` + ASR_TAGS.)
"""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import record_encoder  # noqa: E402  (shared helpers: the tiny checkpoint with the official code, the work directory)

OUT_PATH = os.path.join(HERE, "trace_official_full.safetensors")
ROOT = os.path.join(HERE, "..", "..")
ASR_TAGS = "<|startoftranscript|><|en|><|transcribe|><|en|><|notimestamps|><|wo_itn|>"
PROMPT = "<audio>tests/golden/clip0.wav</audio><audio>tests/golden/clip1.wav</audio>" + ASR_TAGS


def main():
    args = record_encoder.parse_args(__doc__.split("\n\n")[0], OUT_PATH)
    with record_encoder.official_workdir() as work_dir:
        ckpt = record_encoder.official_checkpoint(os.path.abspath(args.official_files), work_dir)
        subprocess.run([sys.executable, os.path.join("tools", "record_official.py"), "--model", ckpt,
                        "--prompt", PROMPT, "--out", os.path.abspath(args.out)], cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
