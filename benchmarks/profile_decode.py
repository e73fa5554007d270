"""Where a decoding step spends its time: torch.profiler over batch-1 steps of a full-width decoder.

    python benchmarks/profile_decode.py [--layers 4] [--variant bf16|int8|int4] [--steps 12] [--device cuda] [--tiny]

The decoder has random weights at full width (hidden 4096, vocabulary 155,947) and `--layers` blocks; it prefills
the 758-token prompt of a 30 s clip, warms up for 4 steps, then profiles `--steps` eager steps of
`decode_one_token` (`--tiny`: the tiny test model's widths, a smoke run). Printed: the profiler's table of
operators by their own time, then their shares grouped as the linears' products (matmul and the int8 / int4
kernels), attention, and everything else (norms, rotary, masks, Python's dispatch). BENCHMARKS.md, "Which kernel
bounds decoding", reads it beside bench.py's "one layer alone".
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from qwenaudio import QwenAudioConfig
from qwenaudio.core.decoder import Decoder, KVCache
from qwenaudio.core.generate import Session, decode_one_token, prefill
from qwenaudio.core.int4 import quantize_int4
from qwenaudio.core.int8 import quantize_int8
from qwenaudio.testing import tiny_config

PROMPT_TOKENS = 758
PRODUCTS = ("aten::mm", "aten::addmm", "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu",
            "aten::_weight_int4pack_mm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--variant", choices=("bf16", "int8", "int4"), default="bf16")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)

    full_width = {} if args.tiny else {"hidden_size": 4096, "num_attention_heads": 32, "kv_channels": 128,
                                       "intermediate_size": 22016}
    config = QwenAudioConfig.from_dict(tiny_config(**full_width, num_hidden_layers=args.layers))
    with torch.device("meta"):
        decoder = Decoder(config)
    decoder.to_empty(device=device).to(torch.bfloat16).eval()
    for p in decoder.parameters():
        torch.nn.init.normal_(p, std=0.02)
    {"int8": quantize_int8, "int4": quantize_int4}.get(args.variant, lambda m: m)(decoder)

    session = Session(KVCache(config, 1, PROMPT_TOKENS + args.steps + 5, torch.bfloat16, device))
    ids = torch.randint(0, 151643, (1, 1), device=device)
    slots = [torch.tensor([PROMPT_TOKENS + t], device=device) for t in range(args.steps + 4)]
    with torch.no_grad():
        prefill(decoder, session, torch.randint(0, 151643, (1, PROMPT_TOKENS), device=device))
        for slot in slots[:4]:
            decode_one_token(decoder, session.cache, ids, slot, session.rope_base)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            for slot in slots[4:]:
                decode_one_token(decoder, session.cache, ids, slot, session.rope_base)
            if device.type == "cuda":
                torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    events = prof.key_averages()
    own = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=own, row_limit=15))
    total = sum(getattr(e, own) for e in events)
    shares = {"products": 0.0, "attention": 0.0, "other": 0.0}
    for e in events:
        group = "products" if e.key in PRODUCTS else "attention" if "attention" in e.key else "other"
        shares[group] += getattr(e, own) / total
    print(f"{args.variant}, {args.layers} layers + lm_head, {seconds * 1000:.1f} ms a step (profiled): "
          + ", ".join(f"{name} {share:.1%}" for name, share in shares.items()))


if __name__ == "__main__":
    main()
