"""What every command shares: the model options, the plan fields they fill and what they mean (`loaded_dtype`,
`quantization`), `positive`, the rules of a command that writes a checkpoint directory, and the two exceptions a
command raises to its entry (`cli.main`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path

from ..core.model import as_device, as_dtype, default_dtype
from ..runner import Processes

# quantize and merge write a checkpoint directory whole: the same rules, said once.
TARGET_HELP = "the directory to write: new or empty, never BASE / SOURCE / ADAPTER, inside or around them"
OVERWRITE_HELP = "replace the checkpoint at TARGET (only a checkpoint directory; it is kept until the new one is whole)"
WRITE_EPILOG = ("exit status: 0 written, 1 TARGET cannot be written (read-only, full disk: nothing is left there) or "
                "would replace an input, 2 bad arguments, 3 the checkpoint or adapter cannot be read")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's kill, `kill PID`), taken like Ctrl-C so every command saves what it has done."""


class UsageError(Exception):
    """Options that do not go together: reported as argparse reports a usage error (usage line, exit 2)."""


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What every command's plan holds: which model to load (None: none) and how, and this process's place among
    torchrun's (`cli.main` joins them for the commands that share their work)."""
    command: str
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    quantize: str | None = None  # --int8 / --int4: the library's `quantize=`
    adapter: Path | None = None
    processes: Processes = Processes()


def freeze(cls: type[Plan], args: argparse.Namespace, **state) -> Plan:
    """The plan `cls` from the parsed options its fields name, and the `state` planning found."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if f.name not in state and hasattr(args, f.name)},
               **state)


def add_model_options(parser: argparse.ArgumentParser, repo: str | None) -> None:
    parser.add_argument("--model", default=repo, metavar="DIR|REPO",
                        help=f"checkpoint directory, or a repo id looked up in $QWENAUDIO_HOME if set, else in the "
                             f"Hugging Face cache, and downloaded there when missing; default {repo or 'none'}")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="default: bfloat16 where the hardware runs it fast (GPUs, AVX-512 CPUs), else float32 "
                             "(float16 on older GPUs); verify: the reference trace's dtype")
    quantized = parser.add_mutually_exclusive_group()
    quantized.add_argument("--int8", action="store_const", dest="quantize", const="int8",
                           help="quantize the decoder's linears to int8 while loading (peak memory 10.7 GiB instead "
                                "of 15.5; on CPUs with AVX-512 also faster decoding); int8 checkpoints load in int8 "
                                "without it")
    quantized.add_argument("--int4", action="store_const", dest="quantize", const="int4",
                           help="quantize the decoder's linears to int4 (groups of 64, or 32 where 64 does not divide "
                                "a layer's inputs) while loading (peak memory 7.95 GiB instead of int8's 10.8), "
                                "inference only; int4 checkpoints (quantize --bits 4) load in int4 without it")
    parser.add_argument("--adapter", type=Path, metavar="DIR",
                        help="a LoRA adapter (qwenaudio finetune's, or peft's for either family) applied on load")
    parser.add_argument("--max-new-tokens", type=positive, metavar="N", help="default: the task's own budget")


def positive(text: str) -> int:
    """An option's N: a whole number above 0."""
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def loaded_dtype(args: argparse.Namespace) -> str:
    """The dtype the model will be loaded in (--dtype, else the device's default), as outputs are keyed on it."""
    return str(as_dtype(args.dtype) or default_dtype(as_device(args.device))).removeprefix("torch.")
