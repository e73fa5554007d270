"""How far int8 and int4 weights move the outputs from fp32, on a tiny random checkpoint and the golden generation
prompts, and how closely int4 reconstructs weights per group size.

    python benchmarks/quantization_accuracy.py [--json out.json]

For each variant (bf16; int8 and int4 with fp32 activations, and with bf16 activations, the fast CPU path) against
fp32:
- logit error: max |variant - fp32| / max |fp32| over every real position of the golden prompts (teacher forced);
- top-1 agreement: the share of those positions where both pick the same next token, and the same share among
  positions whose fp32 top-2 margin is over twice the variant's error there ("decided": where a reduced precision
  cannot excuse a different pick);
- greedy agreement: generated tokens equal to fp32's greedy reply, up to the first divergence, over all prompts.
A random tiny model has nearly flat next-token distributions, so undecided positions flip easily; real weights
are far more peaked. Needs the real vocabulary (the `dashscope` wheel, as in the tests) and tests/golden.

Then int4's weight reconstruction, ||dequantized − w|| / ||w|| over a set of weights, per group size, rounding to
nearest alone and with the least-squares refinement (`int4.quantize_weight`), on 4096 × 4096 Gaussian weights (as
random initialisation makes them) and on a heavy-tailed stand-in for trained ones (Student's t with 3 degrees of
freedom), whose outliers are what rounding between a group's min and max handles worst.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
from pathlib import Path

import torch

import qwenaudio
from qwenaudio import load_audio
from qwenaudio.core import int4
from qwenaudio.core.generate import generate
from qwenaudio.testing import make_tiny_checkpoint
from json_output import json_path, write_json  # a sibling: --json checked first, written atomically

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
VARIANTS = {"bf16": (torch.bfloat16, None), "int8, fp32 activations": (torch.float32, "int8"),
            "int8, bf16 activations": (torch.bfloat16, "int8"), "int4, fp32 activations": (torch.float32, "int4"),
            "int4, bf16 activations": (torch.bfloat16, "int4")}


def vocab_file() -> Path:
    """The real Qwen vocabulary, shipped in the dashscope wheel (docs/MODEL.md#bpe); found without importing it."""
    spec = importlib.util.find_spec("dashscope")
    if spec is None:
        raise SystemExit("needs the dashscope wheel for the real vocabulary: pip install dashscope==2.0.2")
    return Path(spec.origin).parent / "resources" / "qwen.tiktoken"


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=json_path, help="also write the rows here")
    args = parser.parse_args()
    cases = json.loads((GOLDEN / "generation_official.json").read_text(encoding="utf-8"))["generation"]
    path = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny", vocab_file=vocab_file())
    models = {"fp32": qwenaudio.load(path, dtype=torch.float32, progress=False)}
    models |= {name: qwenaudio.load(path, dtype=d, quantize=q, progress=False)
               for name, (d, q) in VARIANTS.items()}

    logits: dict[str, list[torch.Tensor]] = {name: [] for name in models}
    replies: dict[str, list[list[int]]] = {name: [] for name in models}
    for case in cases.values():
        clips = [load_audio(ROOT / u) for urls in case["audio_urls"] for u in urls]
        for name, model in models.items():
            batch = model.tokenizer.encode_batch(case["texts"], audio_spans=case["audio_span_tokens"])
            audio = model.encode_audio(clips)
            out = model.decoder.logits(batch.input_ids, batch.attention_mask, audio)
            logits[name].append(out[batch.attention_mask.bool()].float())
            config = model.generation_config.replace(do_sample=False, max_new_tokens=24)
            replies[name] += generate(model.decoder, model.tokenizer, batch.input_ids,
                                      attention_mask=batch.attention_mask, audio=audio, config=config)

    exact = torch.cat(logits["fp32"])
    top2 = exact.topk(2, dim=-1).values
    rows = []
    print(f"{'variant':<24} {'logit error':>12} {'top-1 agree':>12} {'decided agree':>14} {'greedy agree':>13}")
    for name in VARIANTS:
        ours = torch.cat(logits[name])
        error = (ours - exact).abs().amax(-1)
        same = ours.argmax(-1) == exact.argmax(-1)
        decided = (top2[:, 0] - top2[:, 1]) > 2 * error
        prefix = sum(_common_prefix(a, b) for a, b in zip(replies[name], replies["fp32"]))
        row = {"variant": name, "logit_error": float(error.max() / exact.abs().max()),
               "top1_agreement": float(same.float().mean()), "decided_positions": int(decided.sum()),
               "decided_agreement": float(same[decided].float().mean()), "positions": len(exact),
               "greedy_agreement": prefix / sum(map(len, replies["fp32"]))}
        rows.append(row)
        print(f"{name:<24} {row['logit_error']:>12.2e} {row['top1_agreement']:>12.1%} "
              f"{row['decided_agreement']:>8.1%} of {row['decided_positions']:<3} {row['greedy_agreement']:>12.1%}")
    print(f"({len(exact)} positions over {len(cases)} prompts; greedy replies of up to 24 tokens)")
    torch.manual_seed(0)  # the Student-t sample
    reconstruction = _reconstruction()
    if args.json:
        write_json(args.json, {"variants": rows, "int4_reconstruction": reconstruction})


def _reconstruction() -> list[dict]:
    """int4's relative reconstruction error per weight set and group size, without and with the refinement."""
    generator = torch.Generator().manual_seed(0)
    sets = {"Gaussian, 4096 × 4096": torch.randn(4096, 4096, generator=generator) * 0.02,
            "Student-t(3), 4096 × 4096": torch.distributions.StudentT(3.0).sample((4096, 4096)) * 0.02}
    rows = []
    print(f"\n{'int4 reconstruction':<28} {'group':>5} {'to nearest':>11} {'refined':>9} {'change':>8}")
    for name, w in sets.items():
        for group_size in int4.GROUP_SIZES:
            errors = [_error(w, group_size, refine) for refine in (False, True)]
            rows.append({"weights": name, "group_size": group_size, "nearest": errors[0], "refined": errors[1]})
            print(f"{name:<28} {group_size:>5} {errors[0]:>11.4f} {errors[1]:>9.4f} {errors[1] / errors[0] - 1:>8.1%}")
    return rows


def _error(w: torch.Tensor, group_size: int, refine: bool) -> float:
    """||dequantized − w|| / ||w||."""
    restored = int4.dequantize(*int4.quantize_weight(w, group_size, refine), torch.float64)
    return float((restored - w.double()).norm() / w.double().norm())


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


if __name__ == "__main__":
    main()
