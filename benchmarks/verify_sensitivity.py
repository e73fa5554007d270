"""The smallest weight error `qwenaudio verify` catches, per dtype, end to end and with each layer isolated.

    python benchmarks/verify_sensitivity.py [--reference TRACE] [--json out.json]

On the tiny checkpoint (seed 0, the real vocabulary) against a full-size trace of it (default: the committed
official fp32 trace, tests/golden/trace_official_full.safetensors, made by tests/golden/record_trace.py; for a bf16
one, run tools/record_official.py with `--dtype bfloat16` on that script's prompt and checkpoint), for fp32, bf16
and fp16: the unperturbed errors (the noise the default tolerances must clear), then one decoder weight and one
encoder weight scaled in memory by 1 + eps (rounded to the dtype, as a checkpoint in that dtype would hold it) for
eps on a 1-2-5 grid, and the smallest eps from which every larger one is flagged, by the end-to-end rows and by the
isolated rows, each at its default tolerance (None: not even the largest).
"In dtype" is the isolated check with `upcast=False`: each layer computed in the model's own dtype.
Run from the repository root (the trace names its clips relative to it).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from quantization_accuracy import vocab_file  # a sibling script: the real vocabulary, from the dashscope wheel

import qwenaudio
from qwenaudio.testing import make_tiny_checkpoint
from qwenaudio.trace import Trace, compare, isolate, record
from json_output import json_path, write_json  # a sibling: --json checked first, written atomically

REFERENCE = Path("tests/golden/trace_official_full.safetensors")  # run from the repository root
WEIGHTS = {"decoder": "decoder.h.1.mlp.w1.weight", "encoder": "encoder.blocks.1.mlp.0.weight"}
EPS = [float(f"{m}e{e}") for e in range(-7, 0) for m in (1, 2, 5)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def errors(model: qwenaudio.QwenAudio, reference: Trace) -> dict[str, tuple[float, bool]]:
    """(largest rel, all within the default tolerance) end to end, isolated, and isolated in the model's dtype."""
    m = reference.manifest
    runs = {"end to end": compare(record(model, m["prompt"], logits=m["logits"]), reference),
            "isolated": isolate(model, reference), "isolated in dtype": isolate(model, reference, upcast=False)}
    return {k: (max(r.rel for r in rows if not r.name.startswith(("waveform", "mel"))), all(r.ok for r in rows))
            for k, rows in runs.items()}


@torch.no_grad()
def smallest_flagged(model: qwenaudio.QwenAudio, reference: Trace, weight: str) -> dict[str, float | None]:
    """Per check, the smallest eps of EPS from which scaling `weight` by 1 + eps always fails verification."""
    w = model.get_parameter(weight)
    original = w.clone()
    flagged: dict[str, list[bool]] = {}
    for eps in EPS:
        w.copy_((original.float() * (1 + eps)).to(w.dtype))
        for check, (_, ok) in errors(model, reference).items():
            flagged.setdefault(check, []).append(not ok)
    w.copy_(original)
    return {check: next((eps for k, eps in enumerate(EPS) if all(hits[k:])), None) for check, hits in flagged.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, default=REFERENCE, help="the trace to verify against")
    parser.add_argument("--json", type=json_path, help="also write the rows here")
    args = parser.parse_args()
    reference = Trace.load(args.reference)
    path = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny", vocab_file=vocab_file())
    rows = []
    for name, dtype in DTYPES.items():
        model = qwenaudio.load(path, dtype=dtype, progress=False)
        row = {"dtype": name, "noise": {k: rel for k, (rel, _) in errors(model, reference).items()}}
        row |= {f"{part} weight": smallest_flagged(model, reference, w) for part, w in WEIGHTS.items()}
        rows.append(row)
    checks = list(rows[0]["noise"])
    print(f"{'dtype':<6} {'error of the unperturbed model':^53} | smallest eps caught, decoder weight / encoder weight")
    print(f"{'':<6} " + " ".join(f"{c:>17}" for c in checks) + " | " + " ".join(f"{c:>17}" for c in checks))
    for row in rows:
        caught = (f"{row['decoder weight'][c] or '-'} / {row['encoder weight'][c] or '-'}" for c in checks)
        print(f"{row['dtype']:<6} " + " ".join(f"{row['noise'][c]:>17.1e}" for c in checks) + " | " +
              " ".join(f"{x:>17}" for x in caught))
    if args.json:
        write_json(args.json, {"reference": str(args.reference), "weights": WEIGHTS, "eps": EPS, "rows": rows})


if __name__ == "__main__":
    main()
