"""`qwenaudio quantize`: write an int8 or int4 copy of a checkpoint directory."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from ..core import int4
from ..progress import loading
from ..quantize import save_quantized
from .options import OVERWRITE_HELP, TARGET_HELP, WRITE_EPILOG, Plan, UsageError, freeze

READS_CHECKPOINT = True  # what `run` cannot read exits 3, as a model that cannot be loaded
PARSER = dict(help="write an int8 or int4 copy of a checkpoint",
              description="Copy checkpoint directory SOURCE to TARGET with the decoder's linears in "
                          "int8 plus per-row scales (9.68 GB on disk for Qwen-Audio instead of "
                          "16.79), or in int4 with per-group scales and zeros (6.56 GB); "
                          "qwenaudio loads it quantized as it is.",
              epilog=WRITE_EPILOG)


@dataclass(frozen=True, kw_only=True)
class QuantizePlan(Plan):
    source: Path
    target: Path
    overwrite: bool
    bits: int
    group_size: int | None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, help="a checkpoint directory in the official layout")
    parser.add_argument("target", type=Path, help=TARGET_HELP)
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    parser.add_argument("--bits", type=int, choices=(8, 4), default=8, help="8 (default) or 4")
    parser.add_argument("--group-size", type=int, choices=int4.GROUP_SIZES,
                        help=f"--bits 4 only: inputs sharing a scale and a zero; default {int4.DEFAULT_GROUP_SIZE}, "
                             "or the largest size below it that divides every layer's inputs (a warning says so)")


def plan(args: argparse.Namespace) -> QuantizePlan:
    if args.group_size is not None and args.bits != 4:
        raise UsageError("--group-size: only with --bits 4 (int8 has a scale per row)")
    return freeze(QuantizePlan, args)


def run(_: None, plan: QuantizePlan) -> int:
    save_quantized(plan.source, plan.target, bits=plan.bits, group_size=plan.group_size, overwrite=plan.overwrite,
                   progress=loading)
    print(f"wrote {plan.target}", file=sys.stderr)
    return 0
