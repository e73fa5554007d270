"""Many files at once: finding them, ordering them into batches, each process's share of the batches, and the
record a command keeps in its output directory to resume (`qwenaudio.runner` runs the processes).

Files are batched by length (longest first), so a batch wastes little on left padding and the slowest batches
start first. Under `torchrun --nproc-per-node N` every process sees the same batches and takes every N-th one
(`runner.Processes` tells it which), so each file is done exactly once and a batch holds the same files whatever N
is: the outputs do not depend on the number of processes.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import soundfile as sf
from torch import Tensor

from .core.audio import MIN_SAMPLES, QWEN2_MIN_SAMPLES, as_waveform
from .core.checks import whole
from .core.errors import CheckpointError, InputError, OutputError, QwenAudioError
from .core.families import QWEN2_AUDIO, QWEN_AUDIO, Family
from .core.files import fingerprint, refuse_inputs, write_text

R = TypeVar("R")
J = TypeVar("J")  # a Job, or anything with its `path` and `label` (an evaluation example)

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus")  # what load_audio reads (libsndfile)


@dataclass(frozen=True)
class Job:
    path: Path  # the input file
    name: Path  # where its outputs go under the output directory, without the format's suffix

    @property
    def label(self) -> str:
        """How messages name the file."""
        return str(self.path)


def find_inputs(paths: list[Path]) -> list[Job]:
    """Files as given, plus every audio file below each directory (its outputs keep the relative path), in the
    order given; a file found twice is done once. A path that does not exist is an error, found before any work."""
    paths = list(paths) if isinstance(paths, (list, tuple)) else [paths]
    wrong = [p for p in paths if not isinstance(p, (str, os.PathLike))]
    if wrong:
        raise InputError(f"find_inputs takes paths (str or Path), got {wrong[0]!r}")
    paths = [Path(p) for p in paths]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise InputError(f"no such file or directory: {', '.join(missing)}")
    jobs: list[Job] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
            jobs += [Job(p, p.relative_to(path).with_suffix("")) for p in found]
        else:
            jobs.append(Job(path, Path(path.stem)))
    return list({job.path: job for job in jobs}.values())


def check_names(jobs: list[Job]) -> None:
    """Refuse two inputs that would write outputs of the same name (only matters when outputs are written)."""
    if not all(isinstance(job, Job) for job in jobs):
        raise InputError("check_names takes the Jobs find_inputs returns")
    seen: dict[Path, Path] = {}
    for job in jobs:
        if job.name in seen and seen[job.name] != job.path:
            raise InputError(f"{seen[job.name]} and {job.path} would both write outputs named {job.name}")
        seen[job.name] = job.path


def seconds(path: Path) -> float:
    """Length from the file's header (0 when unreadable: the error is reported when the file is loaded)."""
    try:
        return sf.info(str(path)).duration
    except Exception:  # noqa: BLE001 - libsndfile raises several kinds; all mean "cannot tell"
        return 0.0


def plan_batches(jobs: Sequence[J], batch_size: int) -> list[list[J]]:
    """Batches of files of similar length, longest first; equal lengths keep the input order. Every process
    plans the same batches from the same arguments."""
    _count(batch_size, "batch_size", 1)
    if not all(isinstance(getattr(j, "path", None), (str, os.PathLike)) for j in jobs):
        raise InputError("plan_batches takes jobs with a path (Jobs, or evaluation Examples)")
    ordered = sorted(jobs, key=lambda j: -seconds(j.path))  # stable
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def shortest_clip(family: Family | None) -> int:
    """The fewest samples a clip may have for a model of `family` (its encoder's `min_samples`), for checks made
    before the model loads; for an unknown family the smaller minimum, so the model's own check still holds."""
    return {QWEN_AUDIO: MIN_SAMPLES, QWEN2_AUDIO: QWEN2_MIN_SAMPLES}.get(family, min(MIN_SAMPLES, QWEN2_MIN_SAMPLES))


def run_files(jobs: Sequence[J], recognize: Callable[[list[J], list[Tensor]], list[R]],
              write: Callable[[J, R], None], *, min_samples: int, batch_size: int = 8, rank: int = 0, world: int = 1,
              progress: Callable[[int, int, list[J]], None] | None = None) -> Iterator[tuple[J, str | None]]:
    """Recognise `jobs` (`Job`s, or anything with the audio's `path` and a `label` for messages) a batch at a time
    (this process's share of `plan_batches`) and `write` each result, yielding (job, None) for each file done and
    (job, "message") for each that failed, as soon as it is known.

    Each file is read and checked before its batch runs, so a file that cannot be read or is too short fails alone.
    When a batch fails as a whole, its files are tried one at a time, so only a bad one fails, under its own name.
    A result that cannot be written (a full disk) fails its file; the others go on. `progress(finished, total,
    batch)` is called after each batch; `min_samples` is the model's `encoder.min_samples`. Failures are also logged on stderr as `error: label: message`."""
    if not callable(recognize) or not callable(write) or not (progress is None or callable(progress)):
        raise InputError("run_files: recognize and write must be functions (and progress a function or None)")
    for name, value, least in (("batch_size", batch_size, 1), ("rank", rank, 0), ("world", world, 1)):
        _count(value, name, least)
    mine = plan_batches(jobs, batch_size)[rank::world]
    finished, total = 0, sum(len(b) for b in mine)
    for batch in mine:
        loaded: list[tuple[Job, Tensor]] = []
        for job in batch:
            try:
                loaded.append((job, as_waveform(job.path, str(job.path), min_samples)))
            except QwenAudioError as e:
                yield job, _report(job, e)
        for job, outcome in _recognize(loaded, recognize):
            if isinstance(outcome, Exception):
                yield job, _report(job, outcome)
                continue
            try:
                write(job, outcome)
            except OSError as e:
                yield job, _report(job, f"could not write its output: {e}")
                continue
            yield job, None
        finished += len(batch)
        if progress:
            progress(finished, total, batch)


def _count(value: object, name: str, least: int) -> None:
    if not whole(value, least):
        raise InputError(f"{name} must be an int >= {least}, got {value!r}")


RECOVERABLE = (QwenAudioError, RuntimeError)  # library errors, and torch's (out of memory, a failing kernel)


def _recognize(loaded: list[tuple[J, Tensor]], recognize: Callable) -> list[tuple[J, object]]:
    """(job, result) per file: the batch at once, or, if that raises, each file alone (its error as the result)."""
    if not loaded:
        return []
    jobs, clips = [j for j, _ in loaded], [c for _, c in loaded]
    try:
        return list(zip(jobs, recognize(jobs, clips)))
    except RECOVERABLE as e:
        if len(loaded) == 1:
            return [(jobs[0], e)]
    out: list[tuple[J, object]] = []
    for job, clip in loaded:
        try:
            out.append((job, recognize([job], [clip])[0]))
        except RECOVERABLE as e:
            out.append((job, e))
    return out


def _report(job: J, error: Exception | str) -> str:
    """`error: label: message` on stderr, without repeating the path that library messages often start with; the
    line is returned for the summary."""
    message = str(error) if isinstance(error, QwenAudioError | str) else f"{type(error).__name__}: {error}"
    line = f"{job.label}: {message.removeprefix(f'{job.path}: ')}"
    print(f"error: {line}", file=sys.stderr, flush=True)
    return line


# ---------------------------------------------------------------------- what a command wrote into its output directory


def refuse_many_inputs(writes: Iterable[Path], reads: Iterable[Path]) -> None:
    """`files.refuse_inputs` for thousands of files (a folder transcribed into itself): an output can only be an input
    that exists if it exists itself, as the same file, so only outputs sharing a file id with an input are handed to
    that rule (which names them), in linear time instead of outputs × inputs."""
    reads = list(reads)
    ids = {_file_id(r) for r in reads} - {None}
    clashing = [w for w in writes if _file_id(w) in ids]
    if clashing:
        refuse_inputs(clashing, reads)


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def model_identity(checkpoint: str | Path | None, adapter: str | Path | None = None
                   ) -> tuple[list[Path], dict[str, str | None]]:
    """The model's files (inputs no output may replace) and a key of its content: `files.fingerprint` of the
    checkpoint directory (`checkpoint` as `qwenaudio.load` takes it; a repo id is found or downloaded by
    `hub.resolve`) and of the adapter's, so weights replaced under the same path make another key."""
    if checkpoint is None:
        return [], {"model_fingerprint": None, "adapter_fingerprint": None}
    from .hub import resolve  # hub loads models; this only finds them

    places = [resolve(checkpoint), *([Path(adapter)] if adapter is not None else [])]
    for name, place in zip(("model", "adapter"), places):
        if not place.is_dir():
            raise CheckpointError(f"{name} {place}: no such directory")
    files = [p for place in places for p in place.iterdir() if p.is_file()]
    return files, {"model_fingerprint": fingerprint(places[0]),
                   "adapter_fingerprint": fingerprint(places[1]) if len(places) > 1 else None}


def refuse_model_directory(output_dir: Path, model_files: Iterable[Path]) -> None:
    """An output directory may not be the model's or the adapter's (`model_identity`'s files' folders): what is
    written there changes the fingerprint every run on that model is keyed on, so this run's rerun and other runs
    on the model would be refused as another model's."""
    for place in {path.parent for path in model_files}:
        if os.path.realpath(output_dir) == os.path.realpath(place):
            raise OutputError(f"{output_dir} is the model's directory ({place}): its files would change the "
                              "model's files; choose another output directory")


def read_record(path: Path, command: str, *, overwrite: bool) -> dict[str, Any] | None:
    """The record a command keeps in its output directory (`path`: run.json, summary.json): `{"command": …,
    "settings": …, "outputs": [names relative to the directory, claimed before they are written]}`, None where
    there is none. A file of that name that is not this command's record (a user's own summary.json) would be
    replaced: refused unless `overwrite`, when it counts as absent."""
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        ours = (isinstance(record, dict) and record.get("command") == command and
                isinstance(record.get("settings"), dict) and isinstance(record.get("outputs"), list))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        ours = False
    if ours:
        return record
    if overwrite:
        return None
    raise OutputError(f"{path} was not written by qwenaudio {command}: it would be replaced; choose another "
                      "--output-dir, or --overwrite to replace it")


def check_settings(record: Mapping[str, Any] | None, settings: Mapping[str, Any], directory: Path, *,
                   overwrite: bool) -> None:
    """Refuse (InputError) to add to outputs made with other settings (another model, dtype, task, language, …),
    naming each difference: a resumed run must not mix two runs' results. `overwrite` starts again instead."""
    if record is None or overwrite:
        return
    before = record["settings"]
    changed = [k for k in sorted({*before, *settings}) if before.get(k) != settings.get(k)]
    if changed:
        raise InputError(f"{directory} holds outputs made with other settings ("
                         f"{'; '.join(f'{k}: {before.get(k)!r} then, {settings.get(k)!r} now' for k in changed)}); "
                         "choose another --output-dir, or --overwrite to start again")


def check_outputs(record_file: Path, command: str, names: Iterable[str], *, overwrite: bool
                  ) -> tuple[dict[str, Any] | None, set[str]]:
    """The command's record in `record_file` (`read_record`) and the names among `names` (relative to its
    directory) that exist and that the record claims: an earlier run's work, to skip or replace. One that exists
    unclaimed is someone else's file: refused (OutputError, naming up to five) unless `overwrite`. The files are
    looked at before the record is read, so a process of the same run that claims and creates them meanwhile
    (torchrun) is never taken for someone else."""
    directory = record_file.parent
    existing = [name for name in names if (directory / name).exists()]
    record = read_record(record_file, command, overwrite=overwrite)
    claimed = set(record["outputs"]) if record else set()
    foreign = [name for name in existing if name not in claimed]
    if foreign and not overwrite:
        shown = ", ".join(str(directory / name) for name in foreign[:5])
        more, one = (f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""), len(foreign) == 1
        raise OutputError(f"{shown}{more} {'exists' if one else 'exist'} and {'was' if one else 'were'} not written "
                          f"by qwenaudio {command}: choose another --output-dir, or --overwrite to replace "
                          f"{'it' if one else 'them'}")
    return record, {name for name in existing if name in claimed}


def claim_outputs(record_file: Path, command: str, names: Sequence[str], settings: Mapping[str, Any], *,
                  overwrite: bool, resumes: Callable[[set[str]], bool] = bool, **fields: Any) -> dict[str, Any]:
    """How a resumable command claims its output directory, the one rule for transcribe (summary.json) and evaluate
    (run.json): a file of an output's name that no run of `command` wrote is refused (`check_outputs`); where
    `resumes(the claimed outputs that exist)` says this run adds to earlier work, other settings are refused
    (`check_settings`); both unless `overwrite`. Then the settings and every output (earlier claims kept) are recorded
    in `record_file`, with `fields`, before any output is written, so a run killed at any point knows its own files
    on the rerun. Returns the claim: {"command", "settings", "outputs"}."""
    record, ours = check_outputs(record_file, command, names, overwrite=overwrite)
    if resumes(ours):
        check_settings(record, settings, record_file.parent, overwrite=overwrite)
    claim = {"command": command, "settings": dict(settings),
             "outputs": sorted({*(record["outputs"] if record else []), *names})}
    write_record(record_file, {**claim, **fields})
    return claim


def write_record(path: Path, record: Mapping[str, Any]) -> None:
    """Write a command's record (see `read_record`) atomically, before the outputs it claims are written, so a run
    killed at any point knows its own files on the rerun."""
    try:
        write_text(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    except OSError as e:
        raise OutputError(f"{path}: cannot write the run's record ({e.strerror or e})") from None
