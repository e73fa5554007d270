"""The paper's benchmarks, run as the official evaluation scripts run them (`qwenaudio evaluate TASK`).

The official repository has one script per task (eval_audio/evaluate_*.py at QwenLM/Qwen-Audio): each reads a JSON
Lines file of examples (`audio`, `gt`, `source`, and per task a `question`), puts the clip before a fixed sequence of
task tags, decodes greedily (at least one new token, a per-task budget, left padding, stop at `<|endoftext|>`),
keeps the reply's tags (`decode(skip_special_tokens=False).strip()`) and scores every `source` on its own. This
module does the same on the same files, with `qwenaudio.scoring` for the metrics, and adds what a long run on
one's own machine needs: each reply is appended to a JSON Lines file as soon as it is known, so a run that is
stopped resumes where it stopped; examples run in batches of similar length; processes under torchrun share the
batches; a bad line or a missing clip fails alone, named by file and line.

Qwen2-Audio's evaluation (eval_audio/ at QwenLM/Qwen2-Audio) names its benchmarks by dataset (`QWEN2_BENCHMARKS`:
librispeech, aishell2, cv15_en/zh/yue/fr, fleurs_zh, covost2, meld, vocalsound, airbench_level3). Its rows carry
their prompt, put after `<|audio_bos|><|AUDIO|><|audio_eos|>` (AIR-Bench's query goes into the Instruct model's
chat turn); every script decodes greedily 1 to 256 new tokens from left-padded batches and keeps the reply as
decoded without its special tokens. The model's family picks its table (`PROTOCOLS`, `benchmark`): a benchmark of
the other family is refused before the model loads. AIR-Bench's replies are written for its GPT-4 judge, not
scored here, as the official script leaves them.

Layout of the output directory: `run.json` (the settings the replies were made with, the model's content
fingerprint among them, and the files this command writes there, claimed before they are written; a rerun with
other settings is refused, and so is a file of those names that an earlier run did not write),
`replies/rank-K.jsonl` (each process appends its replies there), then, once every example is done or
the run is stopped, `examples.jsonl` (every reply with its score fields, in the data file's order),
`summary.json` and `summary.md` (the scores per source beside the paper's figures).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from . import prompts, scoring
from .batch import claim_outputs, model_identity, refuse_many_inputs, refuse_model_directory, shortest_clip
from .core.audio import N_SAMPLES, as_waveform
from .core.checkpoint import quantization_of
from .core.checks import as_path, expect, renamed
from .core.errors import AudioError, InputError, OutputError, QwenAudioError
from .core.families import QWEN2_AUDIO, QWEN_AUDIO, Family
from .core.files import append_line, refuse_inputs, writable_directory, write_text
from .core.model import QwenAudio, expect_model
from .core.qwen2_tokenizer import AUDIO_REGION
from .core.tokenizer import LANGUAGES
from .hub import family_of_checkpoint
from .progress import Progress
from .runner import Processes, Report

T = TypeVar("T")


@dataclass(frozen=True)
class Benchmark:
    """One official evaluation script's protocol."""

    name: str
    script: str  # the official script, in eval_audio/
    max_new_tokens: int  # the script's budget: its prompt's, from `prompts`
    fields: tuple[str, ...] = ()  # row fields the prompt needs besides audio, gt and source
    speech: bool = False  # the prompt and the scoring need the spoken language (ASR, SRWT)


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("asr", "evaluate_asr.py", prompts.asr().max_new_tokens, speech=True),
    Benchmark("st", "evaluate_st.py", prompts.translation().max_new_tokens),
    Benchmark("srwt", "evaluate_srwt.py", prompts.asr(timestamps=True).max_new_tokens, speech=True),
    Benchmark("caption", "evaluate_caption.py", prompts.caption().max_new_tokens),
    Benchmark("aqa", "evaluate_aqa.py", prompts.question("").max_new_tokens, fields=("question",)),
    Benchmark("emotion", "evaluate_emotion.py", prompts.ANALYSES["emotion"].max_new_tokens),
    Benchmark("vocal_sound", "evaluate_vocal_sound.py", prompts.ANALYSES["vocal_sound"].max_new_tokens),
    Benchmark("scene", "evaluate_scene.py", prompts.ANALYSES["scene"].max_new_tokens),
    Benchmark("note_analysis", "evaluate_note_analysis.py", prompts.ANALYSES["note_analysis"].max_new_tokens),
)}
# The official ASR and SRWT scripts take the language from the dataset's name; a row's own field comes first here.
DATASET_LANGUAGES = {"librispeech": "en", "aishell": "zh", "industrial": "zh"}


@dataclass(frozen=True)
class Qwen2Benchmark:
    """One dataset of Qwen2-Audio's evaluation (QwenLM/Qwen2-Audio eval_audio/): an official script's `--dataset`.
    Its rows carry their own prompt; every script decodes at most 256 new tokens."""

    name: str  # the script's ds_collections key
    script: str  # the official script, in eval_audio/
    task: str  # how replies are scored: asr, st, emotion, vocal_sound; chat is scored outside (GPT-4, AIR-Bench)
    language: str | None = None  # asr: the dataset's language, the one it is scored in
    max_new_tokens: int = 256

    @property
    def fields(self) -> tuple[str, ...]:
        """The row fields the script reads."""
        return ("audio", "id", "query") if self.task == "chat" else ("audio", "source", "prompt", "gt")


QWEN2_BENCHMARKS: dict[str, Qwen2Benchmark] = {b.name: b for b in (
    *(Qwen2Benchmark(name, "evaluate_asr.py", "asr", language) for name, language in (
        ("librispeech", "en"), ("aishell2", "zh"), ("cv15_en", "en"), ("cv15_zh", "zh"), ("cv15_yue", "yue"),
        ("cv15_fr", "fr"), ("fleurs_zh", "zh"))),  # the script spells the last key "fluers_zh"
    Qwen2Benchmark("covost2", "evaluate_st.py", "st"),
    Qwen2Benchmark("meld", "evaluate_emotion.py", "emotion"),
    Qwen2Benchmark("vocalsound", "evaluate_vocal_sound.py", "vocal_sound"),
    Qwen2Benchmark("airbench_level3", "evaluate_chat.py", "chat"),
)}
# evaluate_chat.py's conversation (the default system turn, the query as the user's text) through the Instruct chat
# template, as transformers' Qwen2AudioProcessor renders it (tests/test_evaluation_qwen2.py compares them).
CHAT_PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{query}<|im_end|>\n"
               "<|im_start|>assistant\n")


@dataclass(frozen=True)
class Protocol:
    """What differs between the two families' official evaluations, looked up by the model's family (`PROTOCOLS`)."""

    benchmarks: dict[str, Any]  # name -> Benchmark or Qwen2Benchmark
    repository: str  # the official scripts, at the commit followed
    reply: Callable[[Any, list[int]], str]  # (tokenizer, new ids) -> the reply as the scripts decode it


PROTOCOLS = {
    # Qwen-Audio keeps the reply's tags and strips it; Qwen2-Audio drops special tokens and keeps the whitespace.
    QWEN_AUDIO: Protocol(BENCHMARKS, "QwenLM/Qwen-Audio e81cc26",
                         lambda tokenizer, ids: tokenizer.decode(ids, skip_special_tokens=False).strip()),
    QWEN2_AUDIO: Protocol(QWEN2_BENCHMARKS, "QwenLM/Qwen2-Audio 595360e",
                          lambda tokenizer, ids: tokenizer.decode(ids, skip_special_tokens=True)),
}


def benchmark(task: str, family: Family = QWEN_AUDIO) -> Benchmark | Qwen2Benchmark:
    """`task`'s protocol for a model of `family`; a benchmark of the other family, or none, is an InputError
    listing what this family runs."""
    table = PROTOCOLS[family].benchmarks
    if isinstance(task, str) and task in table:
        return table[task]
    owner = next((f.name for f, p in PROTOCOLS.items() if isinstance(task, str) and task in p.benchmarks), None)
    what = f"{task!r} is a {owner} benchmark" if owner else f"unknown benchmark {task!r}"
    raise InputError(f"{what}; a {family.name} model runs {', '.join(table)}")


def _protocol(task: str) -> Protocol:
    """The protocol whose table names `task` (the two families' names differ)."""
    return next(p for p in PROTOCOLS.values() if task in p.benchmarks)


def _optional(value: Any, kind: type, name: str) -> None:
    """InputError unless `value` is None or of `kind` (a positive number, for int)."""
    if value is None:
        return
    if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 1):
        raise InputError(f"{name} must be {'a positive int' if kind is int else f'a {kind.__name__}'} or None, "
                         f"got {value!r}")


def prompt(task: str, row: dict[str, Any], language: str | None = None, caption_style: str = "clotho") -> str:
    """What follows `<audio>PATH</audio>` for a data row, exactly as the official script formats it: the prompt of
    `prompts`, with the settings each script takes from the row (the spoken language, a CoVoST2 source's language
    pair, the question)."""
    if task in ("asr", "srwt"):
        return prompts.asr(language, timestamps=task == "srwt").tags
    if task == "st":
        return prompts.translation(*st_languages(row["source"])).tags
    if task == "caption":
        return prompts.caption(caption_style).tags
    if task == "aqa":
        return prompts.question(row["question"]).tags
    return prompts.ANALYSES[task].tags


def st_languages(source: str) -> tuple[str, str]:
    """(spoken, written) language of a CoVoST2 source such as "covost2_en_de_test": the official script takes the
    third- and second-last "_"-separated parts."""
    parts = source.split("_")
    try:
        return prompts.check_language(parts[-3]), prompts.check_language(parts[-2])
    except (IndexError, InputError):  # fewer than three parts, or one that names no language
        raise InputError(f"source {source!r} does not name a language pair the way CoVoST2 sources do "
                         f"(NAME_FROM_TO_SPLIT, with FROM and TO among {' '.join(LANGUAGES)})") from None


@dataclass(frozen=True)
class BenchmarkExample:
    """One data row of a benchmark, checked and ready to run (fine-tuning's are `finetune.Example`s)."""

    line: int  # 1-based line of the data file
    path: Path  # the clip, resolved against the audio root
    audio: str  # the clip as the data file names it
    reference: str | list[str]
    source: str
    prompt: str  # the text after </audio>
    language: str | None  # scoring language: spoken (asr, srwt) or written (st)
    where: str  # "data.jsonl:7", how messages name the example

    @property
    def label(self) -> str:
        return f"{self.where} ({self.audio})"

    @property
    def text(self) -> str:
        """The whole prompt, as the official scripts' collate_fn writes it."""
        return prompts.audio_prompt(self.audio, self.prompt)


def read_benchmark(task: str, data: str | Path, *, audio_root: str | Path | None = None,
                   language: str | None = None, caption_style: str = "clotho", limit: int | None = None,
                   check_audio: bool = True) -> tuple[list[BenchmarkExample], list[str]]:
    """The examples of an official-format JSON Lines file, and a message per line that cannot run (not JSON, a
    field missing or of the wrong type, a clip the model cannot hear: `check_clips`), each naming the file and
    line; blank lines are not examples. `limit` keeps the first that many examples. Clip paths are relative to
    `audio_root`, else to the current directory, as the official scripts open them. `check_audio=False` leaves the
    clips unread (`plan` checks only the clips still to be replied to). `task` may be a Qwen-Audio task
    (`BENCHMARKS`) or a Qwen2-Audio dataset (`QWEN2_BENCHMARKS`, whose rows bring their prompt; no `language`)."""
    data = as_path(data, "data")
    audio_root = None if audio_root is None else as_path(audio_root, "audio_root")
    _optional(limit, int, "limit")
    if isinstance(task, str) and task in QWEN2_BENCHMARKS:
        spec = QWEN2_BENCHMARKS[task]
        if language is not None:
            raise InputError(f"language: {task} rows are scored in {spec.language or 'the language they hold'}, as "
                             f"the official {spec.script} scores them; give no language")
        examples, problems = read_lines(data, lambda row, number, where: _qwen2_example(
            spec, row, number, where, audio_root), limit)
        return (examples, problems) if not check_audio else _checked(data, examples, problems, QWEN2_AUDIO)
    if not isinstance(task, str) or task not in BENCHMARKS:
        raise InputError(f"unknown task {task!r}; choose from {', '.join(BENCHMARKS)} (Qwen-Audio), "
                         f"{', '.join(QWEN2_BENCHMARKS)} (Qwen2-Audio)")
    prompts.caption(caption_style)  # the style's check
    if language is not None:
        prompts.check_language(language)
    examples, problems = read_lines(data, lambda row, number, where: _example(task, row, number, where, audio_root,
                                                                            language, caption_style), limit)
    return (examples, problems) if not check_audio else _checked(data, examples, problems, QWEN_AUDIO)


def _checked(data: Path, examples: list[BenchmarkExample], problems: list[str], family: Family
             ) -> tuple[list[BenchmarkExample], list[str]]:
    examples, bad = check_clips(examples, shortest_clip(family))
    return examples, by_line(data, [*problems, *bad])


def check_clips(examples: Sequence[BenchmarkExample], min_samples: int
                ) -> tuple[list[BenchmarkExample], list[str]]:
    """The examples whose clip the model can hear, and a message per other one naming its file:line: each clip is
    read and checked as `as_waveform` checks it when its batch runs (no such file, a directory, not audio, empty,
    NaN or infinite samples, shorter than one audio token: `min_samples`), so a bad clip is reported before any model loads. This
    decodes every clip once more: measured on a 2-core CPU, 16 kHz FLAC or WAV at 2,000-10,000x real time, 48 kHz
    MP3 (resampled) at 350-700x, so about 1 to 10 s per hour of audio (LibriSpeech test-clean, 5.4 h, in seconds)."""
    good, bad = [], []
    for example in examples:
        try:
            as_waveform(example.path, str(example.path), min_samples)
        except AudioError as e:
            looked = "" if str(example.path) == example.audio else f" (looked for {example.path})"
            bad.append(f"{example.where}: audio {example.audio!r}: {str(e).removeprefix(f'{example.path}: ')}{looked}")
        else:
            good.append(example)
    return good, bad


def by_line(data: Path, messages: Iterable[str]) -> list[str]:
    """Messages that start with `data`'s "FILE:LINE: ", in line order."""
    return sorted(messages, key=lambda m: int(m[len(f"{data}:"):].split(":", 1)[0]))


def read_lines(path: Path, parse: Callable[[Any, int, str], T], limit: int | None = None
               ) -> tuple[list[T], list[str]]:
    """`parse(row, line number, "file:line")` of every non-blank line of a JSON Lines file, and a message for each
    line that is not JSON or that `parse` refuses with InputError, naming the file and line, so one bad line
    never hides the others. `limit` stops after that many lines, good or bad."""
    path = as_path(path, "path")
    if not callable(parse):
        raise InputError(f"read_lines: parse must be a function, got {parse!r}")
    _optional(limit, int, "limit")

    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a BOM (Windows editors) is not data
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the data file ({e})") from None
    parsed: list[T] = []
    problems: list[str] = []
    for number, text in enumerate(lines, 1):
        if limit is not None and len(parsed) + len(problems) >= limit:
            break
        if not text.strip():
            continue
        where = f"{path}:{number}"
        try:
            parsed.append(parse(json.loads(text), number, where))
        except json.JSONDecodeError as e:
            problems.append(f"{where}: not a JSON object ({e.msg} at column {e.colno})")
        except InputError as e:
            problems.append(f"{where}: {e}")
    if not parsed and not problems:
        raise InputError(f"{path}: no examples")
    return parsed, problems


def _example(task: str, row: Any, line: int, where: str, audio_root: Path | None, language: str | None,
             caption_style: str) -> BenchmarkExample:
    spec = BENCHMARKS[task]
    if not isinstance(row, dict):
        raise InputError(f"expected a JSON object, got {type(row).__name__}")
    needed = ("audio", "gt", "source", *spec.fields)
    missing = [name for name in needed if name not in row]
    if missing:
        raise InputError(f"no {', '.join(map(repr, missing))} field (a {task} row needs {', '.join(needed)}; "
                         f"this one has {', '.join(sorted(row)) or 'none'})")
    for name in ("audio", "source", *spec.fields):
        if not isinstance(row[name], str):
            raise InputError(f"{name!r} must be a string, got {type(row[name]).__name__}")
    reference = row["gt"]
    captions = task == "caption" and isinstance(reference, list) and reference
    if not (isinstance(reference, str) or captions and all(isinstance(r, str) for r in reference)):
        kind = "a string or a non-empty list of strings" if task == "caption" else "a string"
        raise InputError(f"'gt' must be {kind}, got {json.dumps(reference, ensure_ascii=False)[:80]}")
    if spec.speech:
        language = scored_language(task, spoken_language(row, language))
    elif task == "st":
        language = st_languages(row["source"])[1]
    else:
        language = None
    path = Path(row["audio"])
    resolved = path if path.is_absolute() or audio_root is None else audio_root / path
    return BenchmarkExample(line, resolved, row["audio"], reference, row["source"],
                   prompt(task, row, language, caption_style), language, where)


@dataclass(frozen=True)
class Qwen2Example(BenchmarkExample):
    """A Qwen2-Audio data row: `prompt` is the whole text the script builds (`AUDIO_REGION` + the row's prompt,
    or the chat turn around the row's query); `row_id` is a chat row's `id`, kept with its reply for the judge."""

    row_id: Any = None

    @property
    def text(self) -> str:
        return self.prompt


def _qwen2_example(spec: Qwen2Benchmark, row: Any, line: int, where: str, audio_root: Path | None) -> Qwen2Example:
    if not isinstance(row, dict):
        raise InputError(f"expected a JSON object, got {type(row).__name__}")
    missing = [name for name in spec.fields if name not in row]
    if missing:
        raise InputError(f"no {', '.join(map(repr, missing))} field (a {spec.name} row needs "
                         f"{', '.join(spec.fields)}; this one has {', '.join(sorted(row)) or 'none'})")
    for name in (f for f in spec.fields if f != "id"):
        if not isinstance(row[name], str):
            raise InputError(f"{name!r} must be a string, got {type(row[name]).__name__}")
    chat = spec.task == "chat"
    text = CHAT_PROMPT.format(query=row["query"]) if chat else AUDIO_REGION + row["prompt"]
    if text.count("<|AUDIO|>") != 1:  # the processor would refuse the row: one clip, one placeholder
        raise InputError(f"{'query' if chat else 'prompt'} {row['query' if chat else 'prompt']!r:.80}: the prompt "
                         f"must hold <|AUDIO|> exactly once (the row's one clip), it holds it "
                         f"{text.count('<|AUDIO|>')} times")
    language = spec.language if spec.task == "asr" else scoring.covost2_target(row["source"]) if spec.task == "st" \
        else None
    path = Path(row["audio"])
    resolved = path if path.is_absolute() or audio_root is None else audio_root / path
    return Qwen2Example(line, resolved, row["audio"], None if chat else row["gt"],
                        spec.name if chat else row["source"], text, language, where, row["id"] if chat else None)


def spoken_language(row: dict[str, Any], default: str | None) -> str:
    """The spoken language an ASR or SRWT prompt names: the row's `lang` (or `language`) field, else `default`
    (--language), else the dataset its `source` names, as the official scripts take it from the dataset."""
    language = row.get("lang", row.get("language", default))
    if language is None:
        source = row.get("source", "")
        known = [lang for name, lang in DATASET_LANGUAGES.items() if name in str(source).lower()]
        if not known:
            raise InputError(f"no language: the row has no 'lang' field and its source {source!r} names no dataset "
                             f"of known language ({', '.join(DATASET_LANGUAGES)}); give one (--language)")
        language = known[0]
    return prompts.check_language(language)


def scored_language(task: str, language: str) -> str:
    """`language` once `task`'s score is defined in it (the ASR and SRWT error rates: en or zh), else InputError."""
    if language not in scoring.SCORED_LANGUAGES:
        raise InputError(f"{task} is scored in {' or '.join(scoring.SCORED_LANGUAGES)} only, not {language!r}")
    return language


def example_scores(task: str, example: BenchmarkExample, reply: str) -> dict[str, Any]:
    """Per-example score fields: an error count and reference length for ASR and SRWT (the WER of a source is their
    sums' ratio), correctness for the exact-match tasks and the note fields; nothing for the corpus scores (BLEU,
    CIDEr)."""
    if task in QWEN2_BENCHMARKS:
        return _qwen2_example_scores(QWEN2_BENCHMARKS[task], example, reply)
    if task in ("asr", "srwt"):
        ref = scoring.evaluation_tokens(scoring.remove_sp(example.reference, example.language), example.language)
        hyp = scoring.evaluation_tokens(scoring.remove_sp(reply, example.language), example.language)
        return {"errors": scoring.edit_distance(ref, hyp), "reference_length": len(ref)}
    if task in ("aqa", "emotion", "vocal_sound", "scene"):
        return {"correct": reply == example.reference}
    if task == "note_analysis":
        ours, theirs = scoring.note_info(reply), scoring.note_info(example.reference)
        return {f"{name}_correct": getattr(ours, name) == getattr(theirs, name)
                for name in ("pitch", "velocity", "instrument")}
    return {}


def _qwen2_example_scores(spec: Qwen2Benchmark, example: BenchmarkExample, reply: str) -> dict[str, Any]:
    """A Qwen2-Audio example's fields: ASR's error count and reference length (none without the `eval` extra's
    normalizers: the summary says so), the classifications' correctness, a chat row's id."""
    if spec.task == "asr":
        try:
            errors, length = scoring.qwen2_asr_counts(example.reference, reply, spec.language)
        except QwenAudioError:
            return {}
        return {"errors": errors, "reference_length": length}
    if spec.task in ("emotion", "vocal_sound"):
        return {"correct": reply.lstrip() == example.reference}
    return {"id": example.row_id} if spec.task == "chat" else {}


def _qwen2_source_scores(spec: Qwen2Benchmark, records: list[dict[str, Any]],
                         attempt: Callable[[str, Callable[[], Any]], Any]) -> dict[str, float | None]:
    """A Qwen2-Audio source's scores, as its script prints them: WER (a fraction), BLEU (points), accuracy."""
    refs, hyps = [r["reference"] for r in records], [r["reply"] for r in records]
    if spec.task == "asr":
        return {"wer": attempt("wer", lambda: scoring.qwen2_error_rate(refs, hyps, spec.language))}
    if spec.task == "st":
        return {"bleu": attempt("bleu", lambda: scoring.bleu(refs, hyps, records[0]["language"]))}
    return {"accuracy": scoring.accuracy(refs, [h.lstrip() for h in hyps])}


def source_scores(task: str, records: list[dict[str, Any]]) -> tuple[dict[str, float | None], list[str]]:
    """The official scores of one source's records (reference, reply, language), and a note per score that could
    not be computed (a missing package, an undefined value) instead of failing the whole summary."""
    refs, hyps = [r["reference"] for r in records], [r["reply"] for r in records]
    languages = sorted({str(r.get("language")) for r in records})
    language = records[0].get("language")
    notes: list[str] = []
    if len(languages) > 1:  # rows' own `lang` fields disagree: one rate over two tokenizations means nothing
        return {}, [f"not computed: the source's rows are in several languages ({', '.join(languages)})"]

    def attempt(name: str, compute: Callable[[], Any]) -> Any:
        try:
            return compute()
        except QwenAudioError as e:
            notes.append(f"{name}: not computed: {e}")
            return None

    if task in QWEN2_BENCHMARKS:
        spec = QWEN2_BENCHMARKS[task]
        if spec.task == "chat":
            return {}, ["scored outside: AIR-Bench's GPT-4 judge reads the replies in examples.jsonl (with each row's "
                        "id), as the official evaluate_chat.py leaves them"]
        return _qwen2_source_scores(spec, records, attempt), notes

    if task in ("asr", "srwt"):
        clean = [scoring.remove_sp(t, language) for t in refs], [scoring.remove_sp(t, language) for t in hyps]
        scores = {"wer": attempt("wer", lambda: scoring.error_rate(*clean, language))}
        if task == "srwt":
            scores["aas"] = attempt("aas", lambda: scoring.average_shift(refs, hyps))
        return scores, notes
    if task == "st":
        return {"bleu": attempt("bleu", lambda: scoring.bleu(refs, hyps, language))}, notes
    if task == "caption":  # each score that can be computed is kept: a failing SPICE leaves CIDEr
        listed = [r if isinstance(r, list) else [r] for r in refs]
        tokens = attempt("cider, spice, spider", lambda: scoring.coco_tokenize(listed, hyps))
        cider = tokens and attempt("cider", lambda: scoring.cider_score(*tokens))
        spice = tokens and attempt("spice, spider", lambda: scoring.spice_score(*tokens))
        both = cider is not None and spice is not None
        return {"cider": cider, "spice": spice, "spider": (cider + spice) / 2 if both else None}, notes
    if task == "note_analysis":
        unreadable = scoring.unreadable_notes(refs)
        if unreadable:
            notes.append(f"{len(unreadable)} of {len(refs)} references lack a readable pitch, velocity or instrument "
                         "tag: any reply lacking it agrees with them (the official quirk), check their format")
        return scoring.note_scores(refs, hyps), notes
    scores = {"accuracy": scoring.accuracy(refs, hyps)}
    if task == "aqa" and records[0]["source"].startswith("clotho"):  # as the official script: Clotho-AQA only
        scores["yes_no_accuracy"] = attempt("yes_no_accuracy", lambda: scoring.yes_no_accuracy(refs, hyps))
    return scores, notes


# The Qwen-Audio figures of the official README's tables ("Evaluation" section, QwenLM/Qwen-Audio @ e81cc26), in the
# units the scripts compute: WER as a fraction, BLEU in points, the average shift in seconds. A source gets a row's
# figure when its name matches the row's pattern (lower-cased, "-" read as "_").
PAPER: dict[str, list[tuple[str, str, dict[str, float]]]] = {
    "asr": [
        (r"librispeech.*dev_?clean", "Librispeech dev-clean", {"wer": 0.018}),
        (r"librispeech.*dev_?other", "Librispeech dev-other", {"wer": 0.040}),
        (r"librispeech.*test_?clean", "Librispeech test-clean", {"wer": 0.020}),
        (r"librispeech.*test_?other", "Librispeech test-other", {"wer": 0.042}),
        (r"aishell_?1.*dev", "Aishell1 dev", {"wer": 0.012}),
        (r"aishell_?1.*test", "Aishell1 test", {"wer": 0.013}),
        (r"aishell_?2.*mic", "Aishell2 Mic", {"wer": 0.033}),
        (r"aishell_?2.*ios", "Aishell2 iOS", {"wer": 0.031}),
        (r"aishell_?2.*android", "Aishell2 Android", {"wer": 0.033}),
    ],
    "st": [(rf"covost.*_{a}_{b}_", f"CoVoST2 {a}-{b}", {"bleu": score}) for (a, b), score in {
        ("en", "de"): 25.1, ("de", "en"): 33.9, ("en", "zh"): 41.5, ("zh", "en"): 15.7, ("es", "en"): 39.7,
        ("fr", "en"): 38.5, ("it", "en"): 36.0}.items()],
    "srwt": [(r"industrial", "Industrial Data", {"aas": 0.0515})],
    "caption": [(r"clotho", "Clotho", {"cider": 0.441, "spice": 0.136, "spider": 0.288})],
    "aqa": [(r"clotho", "ClothoAQA", {"accuracy": 0.579, "yes_no_accuracy": 0.749})],
    "emotion": [(r"meld", "Meld", {"accuracy": 0.557})],
    "vocal_sound": [(r"vocal", "VocalSound", {"accuracy": 0.9289})],
    "scene": [(r"cochl", "Cochlscene", {"accuracy": 0.795}), (r"tut", "TUT2017", {"accuracy": 0.649})],
    "note_analysis": [(r"nsynth", "NSynth", {"sonic": 0.4742, "instrument": 0.7882})],
}


# Qwen2-Audio's figures from its README's second table (the model "after converting huggingface", which these
# weights are), QwenLM/Qwen2-Audio @ 595360e, in the same units.
QWEN2_PAPER: dict[str, list[tuple[str, str, dict[str, float]]]] = {
    "librispeech": [(rf"{split}_?{kind}", f"Librispeech {split}-{kind}", {"wer": wer}) for (split, kind), wer in {
        ("dev", "clean"): 0.017, ("dev", "other"): 0.036, ("test", "clean"): 0.017, ("test", "other"): 0.040}.items()],
    "aishell2": [(device.lower(), f"Aishell2 {device}", {"wer": wer}) for device, wer in
                 (("Mic", 0.032), ("iOS", 0.031), ("Android", 0.029))],
    **{f"cv15_{lang}": [("", f"Common Voice 15 {lang}", {"wer": wer})] for lang, wer in
       (("en", 0.087), ("zh", 0.065), ("yue", 0.059), ("fr", 0.096))},
    "fleurs_zh": [("", "Fleurs zh", {"wer": 0.070})],
    "covost2": [(rf"_{a}_{b}_", f"CoVoST2 {a}-{b}", {"bleu": score}) for (a, b), score in {
        ("en", "de"): 29.6, ("de", "en"): 33.6, ("en", "zh"): 45.6, ("zh", "en"): 24.0, ("es", "en"): 38.7,
        ("fr", "en"): 37.2, ("it", "en"): 35.2}.items()],
    "meld": [("", "Meld", {"accuracy": 0.535})],
    "vocalsound": [("", "VocalSound", {"accuracy": 0.9395})],
    "airbench_level3": [],
}


def paper_row(task: str, source: str) -> tuple[str, dict[str, float]] | None:
    """(row name, figures) of the official README's result for a source (Qwen-Audio's, or Qwen2-Audio's for its
    benchmarks), or None."""
    name = source.lower().replace("-", "_") + "_"
    rows = QWEN2_PAPER[task] if task in QWEN2_PAPER else PAPER[task]
    return next(((row, figures) for pattern, row, figures in rows if re.search(pattern, name)), None)


# ---------------------------------------------------------------------------------------------- running a benchmark


@dataclass(frozen=True)
class Run:
    """A benchmark run planned before the model loads: the examples, the lines that cannot run, and the examples
    that earlier runs into the same directory have not replied to yet."""

    task: str
    output_dir: Path
    settings: dict[str, Any]
    examples: list[BenchmarkExample]
    problems: list[str]
    todo: list[BenchmarkExample]


OUTPUTS = ("replies", "examples.jsonl", "summary.json", "summary.md")  # what a run writes besides run.json


def plan(task: str, data: str | Path, output_dir: str | Path, *, audio_root: str | Path | None = None,
         language: str | None = None, caption_style: str = "clotho", limit: int | None = None,
         max_new_tokens: int | None = None, model_name: str = "", checkpoint: str | Path | None = None,
         adapter: str | Path | None = None, dtype: str | None = None, quantization: str | None = None,
         overwrite: bool = False, family: Family | None = None) -> Run:
    """Read the data, check every clip still to be replied to, check the output directory, and find the replies an
    earlier run with the same settings left there (`overwrite` discards them). Everything here is checked before any
    model loads.

    The run is keyed on what its replies depend on: the data file's content, the task's settings, and the model:
    `checkpoint` (a directory, or a repo id `qwenaudio.hub.resolve` finds or downloads) and `adapter` by a
    fingerprint of their files' content, `dtype` and `quantization` ("int8", "int4") as loaded. A rerun that
    differs in any of them is refused, naming the difference, rather than mixing two models' replies. No output
    may be one of the run's inputs (the data file, a clip, the model's files), whatever names they are given, and
    a file of an output's name that no earlier run wrote is refused unless `overwrite`.

    `task` must be a benchmark of the model's family (`family`, else the one `checkpoint`'s config.json names, else
    `task_family`): Qwen-Audio's are `BENCHMARKS`, Qwen2-Audio's `QWEN2_BENCHMARKS`."""
    data, output_dir = as_path(data, "data"), as_path(output_dir, "output_dir")
    audio = None if audio_root is None else as_path(audio_root, "audio_root")
    _optional(max_new_tokens, int, "max_new_tokens")
    for name, value in (("model_name", model_name), ("dtype", dtype), ("quantization", quantization)):
        _optional(value, str, name)
    if audio is not None and not audio.is_dir():
        raise InputError(f"--audio-root {audio}: no such directory")
    examples, problems = read_benchmark(task, data, audio_root=audio, language=language,
                                        caption_style=caption_style, limit=limit, check_audio=False)
    model_files, key = model_identity(checkpoint, None if adapter is None else as_path(adapter, "adapter"))
    spec = benchmark(task, family or family_of_checkpoint(checkpoint) or task_family(task))
    settings = {"task": task, "data": str(data.resolve()), "data_sha256": hashlib.sha256(data.read_bytes()).hexdigest(),
                "audio_root": None if audio is None else str(audio.resolve()), "language": language,
                "caption_style": caption_style, "max_new_tokens": max_new_tokens or spec.max_new_tokens,
                "model": model_name, **key, "dtype": dtype, "quantization": quantization}
    reads = [data, *([audio] if audio else []), *model_files]
    refuse_model_directory(output_dir, model_files)
    refuse_inputs([output_dir / "run.json", *(output_dir / name for name in OUTPUTS)], reads)
    refuse_many_inputs([output_dir / "run.json", *(output_dir / name for name in OUTPUTS)],
                       [e.path for e in examples])
    _claim_output_directory(output_dir, settings, overwrite)
    replied = _read_replies(output_dir, {e.line: e for e in examples})
    todo, bad = check_clips([e for e in examples if e.line not in replied],
                            shortest_clip(QWEN2_AUDIO if task in QWEN2_BENCHMARKS else QWEN_AUDIO))
    if bad:
        problems = by_line(data, [*problems, *bad])
        runnable = {*replied, *(e.line for e in todo)}
        examples = [e for e in examples if e.line in runnable]
    return Run(task, output_dir, settings, examples, problems, todo)


def task_family(task: str) -> Family:
    """The family whose benchmarks name `task`: what a run is planned for when its checkpoint's family is unknown
    (`hub.family_of_checkpoint`: no checkpoint, or a config the loader will refuse anyway, and say why)."""
    return QWEN2_AUDIO if task in QWEN2_BENCHMARKS else QWEN_AUDIO


def _claim_output_directory(output_dir: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Claim the output directory: refuse files of the outputs' names an earlier run did not write and, where
    replies exist, other settings; then record the settings and the outputs in run.json, and make replies/."""
    writable_directory(output_dir)
    run_file = output_dir / "run.json"

    def resumes(ours: set[str]) -> bool:  # replies of an earlier run are there to be added to
        return "replies" in ours and any(p.stat().st_size for p in (output_dir / "replies").glob("rank-*.jsonl"))

    claim_outputs(run_file, "evaluate", OUTPUTS, settings, overwrite=overwrite, resumes=resumes)
    try:
        (output_dir / "replies").mkdir(exist_ok=True)
        if overwrite:
            for part in (output_dir / "replies").glob("rank-*.jsonl"):
                part.unlink()
    except OSError as e:
        raise OutputError(f"--output-dir {output_dir}: cannot write there ({e.strerror or e})") from None


def _read_replies(output_dir: Path, examples: dict[int, BenchmarkExample]) -> dict[int, dict[str, Any]]:
    """Every complete record in replies/*.jsonl; a torn last line (a run killed while writing it) is not a reply.
    A record whose line holds another clip in today's data file means the directory is another run's."""
    replies: dict[int, dict[str, Any]] = {}
    for part in sorted((output_dir / "replies").glob("rank-*.jsonl")):
        for text in part.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                continue  # only a last line can be torn: every record is written whole, then its newline
            example = examples.get(record.get("line"))
            if example is not None and (record.get("audio"), record.get("reference")) != (example.audio,
                                                                                          example.reference):
                raise InputError(f"{part}: the reply for line {record['line']} is for {record.get('audio')!r}, but "
                                 f"that line of the data file is {example.audio!r}; --overwrite to start again")
            replies[record["line"]] = record
    return replies


class Replies:
    """This process's replies file, appended to one whole record at a time and synced, so a killed run loses at most
    the record it was writing (a torn last line, cut off here before appending)."""

    def __init__(self, output_dir: Path, rank: int):
        self.path = output_dir / "replies" / f"rank-{rank}.jsonl"
        if self.path.exists():
            content = self.path.read_bytes()
            if content and not content.endswith(b"\n"):
                with open(self.path, "r+b") as f:
                    f.truncate(content.rfind(b"\n") + 1)

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            append_line(f, record)


def generate_replies(model: QwenAudio, texts: Sequence[str], clips: Sequence[Sequence[torch.Tensor]],
                     max_new_tokens: int, decoding: Callable[[int, int], None] | None = None) -> list[str]:
    """The official scripts' decoding for one batch of prompts (`BenchmarkExample.text`, or any
    `<audio>PATH</audio>…` text with its clips): greedy, at least one and at most `max_new_tokens` new tokens, cut
    at the stop, decoded as the model's family's scripts decode (`PROTOCOLS`: Qwen-Audio's with the tags kept and
    stripped, Qwen2-Audio's without special tokens). Clips past 30 s are cut to 30 s, as the official model hears them.
    `decoding(steps, budget)` is called every few decoding steps (`generate`'s progress)."""
    expect_model(model)
    _optional(max_new_tokens, int, "max_new_tokens")
    clips = [[c[:N_SAMPLES] for c in own] for own in clips]  # as heard anyway, without log_mel's warning per clip
    ids = model.generate(texts, clips, progress=decoding, do_sample=False, min_new_tokens=1,
                         max_new_tokens=max_new_tokens)
    reply = PROTOCOLS[model.family].reply
    return [reply(model.tokenizer, row) for row in ids]


def summarize(run: Run, failed: Iterable[str] = (), *, interrupted: bool = False, seconds: float | None = None,
              processes: int = 1) -> dict[str, Any]:
    """Write examples.jsonl (every reply in data order), summary.json and summary.md from the replies on disk (every
    process's), and return the summary. Scores cover the examples replied to; those that failed are listed."""
    replied = _read_replies(run.output_dir, {e.line: e for e in run.examples})
    records = [replied[e.line] for e in run.examples if e.line in replied]
    failures = [*run.problems, *failed]
    sources = []
    for source, group in scoring.group_by_source(records).items():
        scores, notes = source_scores(run.task, group)
        paper = paper_row(run.task, source)
        sources.append({"source": source, "examples": len(group), "scores": scores, "notes": notes,
                        "paper": paper and {"row": paper[0], **paper[1]},
                        **({"unreadable_references": len(scoring.unreadable_notes([r["reference"] for r in group]))}
                           if run.task == "note_analysis" else {})})
    total = len(run.examples) + len(run.problems)
    summary = {"task": run.task, "script": f"eval_audio/{_protocol(run.task).benchmarks[run.task].script}", **{
        k: run.settings[k] for k in ("data", "model", "max_new_tokens")},
        "examples": total, "replied": len(records), "failed": failures, "complete": len(records) == total,
        "interrupted": interrupted, "processes": processes, "seconds": seconds, "sources": sources}
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    write_text(run.output_dir / "examples.jsonl", lines)
    write_text(run.output_dir / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    write_text(run.output_dir / "summary.md", markdown(summary))
    return summary


def markdown(summary: dict[str, Any]) -> str:
    """The summary as a Markdown table: per source and score, ours beside the official README's figure."""
    out = [f"# {summary['task']}: {summary['replied']} of {summary['examples']} examples replied"
           f"{'' if summary['complete'] else ' (incomplete)'}", "",
           f"Data {summary['data']}, model {summary['model'] or '(not named)'}, protocol of "
           f"{summary['script']} at {_protocol(summary['task']).repository}.", "",
           "| source | examples | score | qwenaudio | paper | paper row |", "|---|---:|---|---:|---:|---|"]
    for s in summary["sources"]:
        paper = s["paper"] or {}
        for name, value in s["scores"].items():
            out.append(f"| {s['source']} | {s['examples']} | {name} | {_number(value)} | "
                       f"{_number(paper.get(name))} | {paper.get('row', '') if name in paper else ''} |")
    notes = [f"- {s['source']}: {note}" for s in summary["sources"] for note in s["notes"]]
    failed = [f"- {line}" for line in summary["failed"]]
    for title, items in (("Not computed", notes), ("Failed examples", failed)):
        if items:
            out += ["", f"{title}:", "", *items]
    return "\n".join(out) + "\n"


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def evaluate(model: QwenAudio, task: str, data: str | Path, output_dir: str | Path, *, batch_size: int = 8,
             progress: Callable[[int, int, float], None] | None = None, **options: Any) -> dict[str, Any]:
    """Run benchmark `task` on an official-format JSON Lines file and score it as the official script does; returns
    the summary (also written to `output_dir`, with every reply). A rerun into the same directory resumes: examples
    replied to already are not run again. `options` go to `plan` (audio_root, language, caption_style, limit,
    max_new_tokens, model_name, checkpoint, adapter, overwrite; dtype and quantization default to the model's: pass
    `checkpoint` too, to key the run on the weights' content). Under torchrun every process calls this and takes its
    share."""
    expect_model(model)
    options.setdefault("dtype", str(model.decoder.embedding.weight.dtype).removeprefix("torch."))
    options.setdefault("quantization", quantization_of(model.decoder))
    options.setdefault("family", model.family)
    return execute(model, plan(task, data, output_dir, **options), batch_size=batch_size,
                   processes=Processes.join(str(model.device)), progress=progress)


def execute(model: QwenAudio, run: Run, *, batch_size: int = 8, processes: Processes = Processes(),
            progress: Callable[[int, int, float], None] | None = None,
            decoding: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Reply to this process's share of `run.todo` (`Processes.run`: batches of similar length, longest first),
    appending each record as it is known, and, in process 0, write the summary, also after Ctrl-C or SIGTERM taken
    as KeyboardInterrupt (then with `"interrupted": true`, and the interrupt is raised again). An example that fails
    (an unreadable clip, a failing batch retried example by example) is listed in the summary. Other processes
    return {}. `progress(done, total, seconds)` follows the batches, `decoding(steps, budget)` the tokens of the
    batch being decoded."""
    expect_model(model)
    expect(run, Run, "run", "a Run from evaluation.plan")
    benchmark(run.task, model.family)  # a run planned for a model of the other family
    replies, started = Replies(run.output_dir, processes.rank), time.monotonic()
    max_new_tokens = run.settings["max_new_tokens"]

    def reply(batch: list[BenchmarkExample], clips: list[torch.Tensor]) -> list[str]:
        return generate_replies(model, [e.text for e in batch], [[c] for c in clips], max_new_tokens, decoding)

    def write(example: BenchmarkExample, reply: str) -> None:
        replies.append({"line": example.line, "audio": example.audio, "source": example.source,
                        "reference": example.reference, "reply": reply, "language": example.language,
                        **example_scores(run.task, example, reply)})

    def summary(reports: list[Report], interrupted: bool) -> dict[str, Any]:
        return summarize(run, [line for report in reports for line in report.failed], interrupted=interrupted,
                         seconds=time.monotonic() - started, processes=processes.world)

    written, _ = processes.run(
        run.todo, reply, write, summary, min_samples=model.encoder.min_samples, batch_size=batch_size,
        progress=progress and (lambda k, n, _: progress(k, n, time.monotonic() - started)),
        different="the processes found different examples to do; is the output directory shared?")
    return written or {}


def report_progress(done: int, total: int, seconds: float, rank: int = 0, world: int = 1) -> None:
    """`40/100 examples, 2.3/s, ETA 0:26` on stderr after each batch; on a terminal, a bar in front of it."""
    Progress("examples", rank, world).rate(done, total, seconds)


__getattr__ = renamed(__name__, {  # the names this module had before each meant one thing
    "TASKS": ("evaluation.BENCHMARKS", BENCHMARKS), "Task": ("evaluation.Benchmark", Benchmark),
    "Example": ("evaluation.BenchmarkExample", BenchmarkExample),
    "read_examples": ("evaluation.read_benchmark", read_benchmark),
    "CAPTION_STYLES": ("prompts.CAPTION_STYLES", prompts.CAPTION_STYLES)})
