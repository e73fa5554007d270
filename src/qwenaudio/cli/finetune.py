"""`qwenaudio finetune`: full fine-tuning or a LoRA adapter on your own examples (checkpoints as it goes; shared
between torchrun's processes)."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import evaluation, finetune, lora
from ..core.errors import InputError, OutputError, QwenAudioError, TrainingError
from ..core.families import QWEN2_AUDIO
from ..core.files import fingerprint, refuse_inputs, writable_directory
from ..core.model import QwenAudio
from ..core.tokenizer import LANGUAGES
from ..hub import family_of_checkpoint, looks_like_path, resolve
from ..progress import eta, say
from .options import Plan, add_model_options, freeze, positive

SHARES_WORK = True  # under torchrun, the processes share each step
PARSER = dict(help="fine-tune Qwen-Audio(-Chat) or Qwen2-Audio(-Instruct) on your own examples",
              description="Full fine-tuning with the official loss on a JSON Lines file (task form, "
                          "chat form or ms-swift form; see README), checkpoints as it goes, the "
                          "fine-tuned model in the official layout at the end.",
              epilog="exit status: 0 done, 1 training stopped (a loss or weights that are not "
                     "finite, a full disk, an unwritable --output-dir; the last checkpoint is "
                     "kept), 2 bad arguments or data (found before the model loads), 3 the model "
                     "could not be loaded, 130 interrupted by Ctrl-C, 143 by SIGTERM (a checkpoint "
                     "of the last whole step is saved first: --resume continues)")


@dataclass(frozen=True, kw_only=True)
class FinetunePlan(Plan):
    """The training settings, the examples read and checked (and the bad lines), and what the run writes."""
    data: Path
    eval_data: Path | None
    output_dir: Path
    resume: bool
    config: finetune.TrainConfig
    examples: list
    bad: list[str]
    eval_examples: list
    result: Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, metavar="FILE.jsonl", help="the training examples")
    parser.add_argument("--eval-data", type=Path, metavar="FILE.jsonl",
                        help="held-out examples (same forms): eval_loss in metrics.jsonl every --eval-every steps")
    parser.add_argument("--eval-every", type=int, default=0, metavar="N",
                        help="steps between evaluations; default: with each checkpoint and at the end")
    parser.add_argument("--eval-task", choices=evaluation.BENCHMARKS, metavar="TASK",
                        help="also reply greedily to the --eval-data prompts and score them as TASK is (e.g. asr: WER)")
    parser.add_argument("--output-dir", required=True, type=Path, metavar="DIR",
                        help="checkpoint/, metrics.jsonl and, at the end, model/ (the fine-tuned checkpoint)")
    parser.add_argument("--task", choices=evaluation.BENCHMARKS, metavar="TASK",
                        help="read rows without a prompt (e.g. the official evaluation files) as this task")
    parser.add_argument("--language", choices=LANGUAGES, metavar="LANG", help="--task asr, srwt: the spoken language")
    parser.add_argument("--train", choices=finetune.PARTS, default="decoder", help="what to train; default decoder")
    parser.add_argument("--steps", type=positive, default=100, metavar="N", help="optimizer steps; default 100")
    parser.add_argument("--batch-size", type=positive, default=4, metavar="N", help="examples per pass; default 4")
    parser.add_argument("--accumulate", type=positive, default=1, metavar="N", help="passes per step; default 1")
    parser.add_argument("--lr", type=float, default=1e-5, help="peak learning rate; default 1e-5")
    parser.add_argument("--warmup-steps", type=int, default=0, metavar="N", help="linear warmup; then cosine to 0")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="clip gradients to this norm; 0: off")
    parser.add_argument("--seed", type=int, default=0, help="the data order")
    parser.add_argument("--save-every", type=int, default=0, metavar="N",
                        help="steps between checkpoints; 0 (default): only at the end, on Ctrl-C and by --save-minutes")
    parser.add_argument("--save-minutes", type=float, default=finetune.TrainConfig.save_minutes, metavar="M",
                        help=f"also save a checkpoint every M minutes of wall time; 0: off; default "
                             f"{finetune.TrainConfig.save_minutes:g}")
    parser.add_argument("--precision", choices=finetune.PRECISIONS, default="auto",
                        help="bf16: forward under bf16 autocast, fp32 weights and optimizer; auto (default): bf16 on "
                             "GPUs that run it, else fp32")
    parser.add_argument("--fsdp", action="store_true",
                        help="under torchrun: shard weights, gradients and optimizer state over the processes "
                             "(full fine-tuning of a model too large for one device)")
    parser.add_argument("--no-activation-checkpointing", action="store_true",
                        help="keep every block's activations (faster, much more memory)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="train on the good lines and list the bad ones at the end (default: refuse the file)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its checkpoint")
    parser.add_argument("--lora-rank", type=int, default=0, metavar="R",
                        help="train a LoRA adapter of rank R instead of --train's weights (0: full fine-tuning)")
    parser.add_argument("--lora-alpha", type=float, metavar="A", help="LoRA's alpha (> 0); default 2 × rank")
    parser.add_argument("--lora-dropout", type=float, metavar="P", help="dropout before A, in [0, 1); default 0")
    parser.add_argument("--lora-targets", nargs="+", metavar="NAME",
                        help=f"decoder linears to adapt; default every linear of each decoder block "
                             f"(Qwen-Audio: {' '.join(lora.DECODER_TARGETS)}; Qwen2-Audio: "
                             f"{' '.join(lora.QWEN2_DECODER_TARGETS)})")
    parser.add_argument("--lora-encoder", action="store_true", help="also adapt the audio encoder's linears")
    parser.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(rank) (rank-stabilized LoRA)")
    add_model_options(parser, "Qwen/Qwen-Audio")


# LoRA's options, which mean nothing without --lora-rank: (option, its attribute, its value when not given).
LORA_OPTIONS = (("--lora-alpha", "lora_alpha", None), ("--lora-dropout", "lora_dropout", None),
                ("--lora-targets", "lora_targets", None), ("--lora-encoder", "lora_encoder", False),
                ("--rslora", "rslora", False))


def plan(args: argparse.Namespace) -> FinetunePlan:
    """Before the model loads: the settings, every data line (all bad ones listed), what the run writes (never one
    of its inputs, into a directory it can write) and, with --resume, that the checkpoint's run is this one."""
    ignored = [option for option, name, unset in LORA_OPTIONS if getattr(args, name) != unset]
    if ignored and not args.lora_rank:
        raise InputError(f"{', '.join(ignored)}: LoRA's options need --lora-rank R (0, the default, is full "
                         "fine-tuning)")
    adapter = args.lora_rank and lora.LoraConfig(  # only an absent alpha defaults: 0 or -4 are refused
        rank=args.lora_rank, alpha=2 * args.lora_rank if args.lora_alpha is None else args.lora_alpha,
        dropout=args.lora_dropout or 0.0, rslora=args.rslora, encoder=args.lora_encoder,
        targets=tuple(args.lora_targets) if args.lora_targets else None)
    config = finetune.TrainConfig(
        lora=adapter or None, steps=args.steps, batch_size=args.batch_size, accumulate=args.accumulate, lr=args.lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
        seed=args.seed, part=args.train, save_every=args.save_every, save_minutes=args.save_minutes,
        activation_checkpointing=not args.no_activation_checkpointing, precision=args.precision, shard=args.fsdp,
        eval_every=args.eval_every, eval_task=args.eval_task)
    if args.adapter:
        raise InputError("--adapter: an adapter's training continues with --resume in its run's --output-dir")
    try:  # the library's rule (train refuses the same), named by the option that asked for the weights
        finetune.check_quantization(config, args.quantize)
    except InputError as e:
        raise InputError(f"--{args.quantize}: {e}") from None
    family = family_of_checkpoint(args.model)  # None where only loading can tell (a repo id not in the cache)
    examples, bad = finetune.read_examples(args.data, task=args.task, language=args.language, family=family)
    eval_examples = _eval_examples(args, family)
    _refuse_tag_prompts(args, [*examples, *eval_examples])
    if bad and not args.skip_bad:
        shown = "\n  ".join(bad[:20]) + (f"\n  … and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise InputError(f"{len(bad)} of {len(bad) + len(examples)} lines cannot be trained on "
                         f"(fix them, or --skip-bad to train on the rest):\n  {shown}")
    if not examples:
        raise InputError(f"{args.data}: no line can be trained on")
    result = args.output_dir / ("adapter" if adapter else "model")
    _check_outputs(args, config, result, examples, eval_examples)
    return freeze(FinetunePlan, args, config=config, examples=examples, bad=bad, eval_examples=eval_examples,
                  result=result, dtype=finetune.weights_dtype(config, args.dtype))


def _refuse_tag_prompts(args: argparse.Namespace, examples: list) -> None:
    """--task and rows with "task" build Qwen-Audio's tag prompts: on a Qwen2-Audio model (known from config.json or
    the repo id) they are refused here, before it loads (training would refuse each such row, after)."""
    tagged = [e.where for e in examples if e.task]
    if (args.task or tagged) and family_of_checkpoint(args.model) is QWEN2_AUDIO:
        more = f" (and {len(tagged) - 1} more lines)" if len(tagged) > 1 else ""
        which = "--task" if args.task else f"{tagged[0]}: \"task\"{more}"
        raise InputError(f"{which}: task rows build Qwen-Audio's tag prompts, and {args.model} is a Qwen2-Audio "
                         "model, whose rows need a \"prompt\" (a plain instruction, e.g. \"Detect the language and "
                         "recognize the speech: <|en|>\")")


def resume_hint(args: argparse.Namespace) -> str:
    if not (args.output_dir / "checkpoint").is_dir():  # stopped before step 1
        return "no checkpoint was saved yet: rerun the same command, without --resume, to start"
    return "rerun with --resume to continue from the last checkpoint"


def _eval_examples(args: argparse.Namespace, family) -> list:
    """--eval-data's examples, every line good (a skipped line would change what eval_loss means); none without it,
    and then no --eval-task or --eval-every."""
    if not args.eval_data:
        if args.eval_task or args.eval_every:
            raise InputError("--eval-task and --eval-every need --eval-data")
        return []
    examples, bad = finetune.read_examples(args.eval_data, task=args.task, language=args.language, family=family)
    if bad:
        raise InputError(f"{len(bad)} line(s) of --eval-data cannot be evaluated:\n  " + "\n  ".join(bad[:20]))
    if not examples:
        raise InputError(f"--eval-data {args.eval_data}: no examples")
    if args.eval_task:
        finetune.reply_languages(examples, args.eval_task)
    return examples


def _check_outputs(args: argparse.Namespace, config: finetune.TrainConfig, result: Path, examples: list,
                   eval_examples: list) -> None:
    """What the run writes (checkpoint/, metrics.jsonl, tensorboard/, model/ or adapter/) must replace none of its
    inputs (the data files, the clips, the model) and go to a directory that can be written; a new run starts in a
    directory that holds no run's files, and --resume continues the run the checkpoint records (its settings, data,
    held-out data and model files)."""
    out = args.output_dir
    writes = [finetune.checkpoint_dir(out), out / "metrics.jsonl", out / "tensorboard", result]
    model = _local_model(args.model, resolving=args.resume)
    clips = {path.parent for e in (*examples, *eval_examples) for path in e.audio}
    refuse_inputs(writes, [args.data, *filter(None, [args.eval_data, model]), *clips])
    if model is not None and out.exists() and out.resolve() == model.resolve():
        raise OutputError(f"--output-dir {out} is the model's directory: the run's files would change its files")
    found = [path.name for path in writes if path.exists()]
    if found and not args.resume:
        raise InputError(f"{out} holds a run: --resume continues it, or choose another --output-dir (it holds "
                         f"{', '.join(found)})")
    if args.resume:
        inputs = {"model": fingerprint(model)} if model is not None else {}
        finetune.check_resume(finetune.checkpoint_dir(out), config,
                              finetune.run_inputs(examples, eval_examples, **inputs))
    if result.exists():
        raise InputError(f"{result} exists: this run is finished; choose another --output-dir")
    writable_directory(out)


def _local_model(name: str | Path, *, resolving: bool) -> Path | None:
    """The model's directory when it is named by path or, when `resolving`, found or fetched as loading would;
    else None (a repo id is looked up when the model loads, after the processes have joined)."""
    try:
        return resolve(name) if resolving or looks_like_path(name) else None
    except QwenAudioError:  # loading names the problem (exit 3)
        return None


def run(model: QwenAudio, plan: FinetunePlan) -> int:
    """Train, printing a line per step and one per checkpoint; write the fine-tuned checkpoint to OUTPUT_DIR/model
    (or the adapter to OUTPUT_DIR/adapter)."""
    total, started = plan.config.steps, time.monotonic()
    last, first = [0.0], finetune.steps_done(plan.output_dir) if plan.resume else 0

    def progress(record: dict) -> None:
        done = record["step"]
        left = (time.monotonic() - started) / max(done - first, 1) * (total - done)
        evaluated = "".join(f" {key} {value:.4f}" for key, value in record.items()
                            if key.startswith("eval_") and key != "eval_tokens" and isinstance(value, float))
        say(f"step {done}/{total} loss {record['loss']:.4f} lr {record['lr']:.2e} "
            f"{record['tokens'] / max(record['seconds'] - last[0], 1e-9):.0f} label tokens/s "
            f"ETA {eta(left)}{evaluated}")
        last[0] = record["seconds"]

    def saved(step: int) -> None:
        say(f"checkpoint saved at step {step}/{total}: {finetune.checkpoint_dir(plan.output_dir)}")

    try:
        finetune.train(model, plan.examples, plan.output_dir, plan.config, eval_examples=plan.eval_examples,
                       resume=plan.resume, progress=progress, saved=saved,
                       inputs={"model": fingerprint(resolve(plan.model))})
        # every process takes part (a sharded model is gathered); process 0 writes
        target = finetune.export(model, plan.config, resolve(plan.model), plan.result, base_model=str(plan.model))
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if plan.processes.rank:
        return 0
    print(f"wrote {target}" + (f"; {len(plan.bad)} bad line(s) skipped:\n  " + "\n  ".join(plan.bad)
                               if plan.bad else ""), file=sys.stderr)
    return 0
