"""`qwenaudio verify`: compare two traces layer by layer, or record ours from the reference's prompt and compare."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from .. import trace
from ..core.errors import InputError
from ..core.families import QWEN2_AUDIO
from ..core.model import QwenAudio
from ..hub import family_of_checkpoint
from .options import Plan, UsageError, add_model_options, freeze
from .trace import check_trace_out, model_files, readable_clips

PARSER = dict(help="compare two traces layer by layer",
              description="Compare our trace with a reference trace (from tools/record_official.py, or "
                          "tools/record_transformers.py for Qwen2-Audio); "
                          "with one trace and --model, record ours from the reference's prompt and, "
                          "if the reference is not projected, also run each layer on the "
                          "reference's own input to it (the isolated column).",
              epilog="exit status: 0 every tensor both traces hold within tolerance, 1 some "
                     "tensor or isolated layer is not, or the reference holds a stage ours lacks "
                     "or comes from a model of other dimensions, "
                     "or --out cannot be written, 2 unusable trace files or nothing in common, "
                     "3 the model could not be loaded")


@dataclass(frozen=True, kw_only=True)
class VerifyPlan(Plan):
    """The options, the traces loaded, and the dtype to record ours in."""
    traces: list[Path]
    rtol: float | None
    atol: float
    isolated_rtol: float | None
    out: Path | None
    reference: trace.Trace
    ours: trace.Trace | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("traces", nargs="+", type=Path, metavar="TRACE", help="OURS REFERENCE, or REFERENCE --model")
    parser.add_argument("--rtol", type=_tolerance, help="max |ours - ref| / max |ref| per tensor; default by dtype "
                                                   "(1e-5 for fp32, 5e-3 fp16, 3e-2 bf16)")
    parser.add_argument("--atol", type=_tolerance, default=0.0,
                        help="a tensor also passes when max |ours - ref| <= atol")
    parser.add_argument("--isolated-rtol", type=_tolerance, metavar="RTOL",
                        help="with --model: tolerance of each layer run on the reference's input, relative to what the "
                             "layer changes; default by the reference's dtype (1e-5 for fp32, 3e-2 bf16)")
    parser.add_argument("--out", type=Path, help="with --model: also save our trace here")
    add_model_options(parser, None)


def _tolerance(text: str) -> float:
    """verify's --rtol, --atol, --isolated-rtol: a finite number >= 0 (nan would fail every tensor silently)."""
    try:
        value = float(text)
        trace.check_tolerance(value, "tolerance")
    except (ValueError, InputError):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}") from None
    return value


def plan(args: argparse.Namespace) -> VerifyPlan:
    """Before the model loads: both traces (or the reference and the clips of its prompt, which ours is recorded
    from), --out, and the dtype to record in (the reference's, to compare like with like)."""
    if len(args.traces) != (1 if args.model else 2):
        raise UsageError("give OURS and REFERENCE traces, or one REFERENCE trace and --model")
    if args.out and not args.model:
        raise UsageError("--out saves the trace recorded with --model; OURS is already a file")
    reference = trace.Trace.load(args.traces[-1])
    if not args.model:
        return freeze(VerifyPlan, args, reference=reference, ours=trace.Trace.load(args.traces[0]))
    family = family_of_checkpoint(args.model)
    try:  # before loading, where config.json or the repo id says the model's family
        trace.check_family(reference, family)
    except InputError as e:
        raise InputError(f"{args.traces[-1]}: {e}") from None
    manifest = reference.manifest
    try:
        clips = readable_clips(list(dict.fromkeys([*trace.prompt_clips(manifest.get("prompt")),
                                                   *_manifest_clips(manifest)])), family)
    except InputError as e:
        raise InputError(f"{args.traces[-1]}: its prompt cannot be recorded: {e}") from None
    if args.out:
        check_trace_out(args.out, [*args.traces, *clips, *model_files(args.model)])
    dtype = manifest.get("model", {}).get("dtype")
    if not args.dtype and dtype not in trace.RTOL:
        raise InputError(f"{args.traces[-1]}: the reference's dtype {dtype!r} is not one we load: give --dtype")
    return freeze(VerifyPlan, args, reference=reference, dtype=args.dtype or dtype)


def _manifest_clips(manifest: dict) -> list[str]:
    """The clips a reference ran with, as its manifest lists them (a Qwen2-Audio prompt does not name them)."""
    clips = manifest.get("audio") or []
    if not isinstance(clips, list) or not all(isinstance(c, str) for c in clips):
        raise InputError(f"its manifest's audio must be a list of file paths, got {clips!r}")
    return clips


def run(model: QwenAudio | None, plan: VerifyPlan) -> int:
    """Print the per-tensor table of the stages both traces hold and what each lacks; the first tensor out of
    tolerance is where the implementations part. With the model at hand, also each layer on the reference's own
    input (`trace.isolate`), which needs a full-size reference holding every stage; else say what it lacks."""
    reference, isolated, blocker = plan.reference, None, None
    if model is None:
        ours = plan.ours
    else:
        m = reference.manifest
        trace.check_family(reference, model.family)
        ours = trace.record(model, m["prompt"], clips=_manifest_clips(m) if model.family is QWEN2_AUDIO else None,
                            project=m.get("project"), logits=m.get("logits", "last"))
        if plan.out:
            ours.save(plan.out)
        blocker = trace.isolation_blocker(model, reference)
        isolated = None if blocker else trace.isolate(model, reference, rtol=plan.isolated_rtol)
    rows = trace.compare(ours, reference, rtol=plan.rtol, atol=plan.atol)
    lacking, ours_lacking = trace.unmatched(ours, reference)
    print(trace.format_table(rows, isolated))
    failed = [r for r in rows if not r.ok]
    rtol = trace.default_rtol(ours, reference) if plan.rtol is None else plan.rtol
    looser = "".join(f", {r.name} {r.rtol:g}" for r in rows if r.rtol != rtol)
    print(f"\n{len(rows) - len(failed)} of {len(rows)} tensors within rtol {rtol:g}{looser}" +
          (f"; first divergence: {failed[0].name}" if failed else ""))
    if lacking:
        print(f"not in the reference, so not compared: {trace.name_list(lacking)}")
    if ours_lacking:
        print(f"FAIL: the reference has {trace.name_list(ours_lacking)}, ours does not")
    other_model = trace.models_note(ours, reference)
    if other_model:  # whatever the rows say, these are not the same computation
        print(f"FAIL: {other_model}")
    if isolated is not None:
        alone_failed = [r for r in isolated if not r.ok]
        print(f"{len(isolated) - len(alone_failed)} of {len(isolated)} layers within isolated rtol "
              f"{isolated[0].rtol:g} on the reference's own inputs" +
              (f"; first isolated failure: {alone_failed[0].name}" if alone_failed else ""))
    elif model is not None:
        print(f"isolated: not available, {blocker}")
    return 1 if failed or ours_lacking or other_model or any(not r.ok for r in isolated or []) else 0
