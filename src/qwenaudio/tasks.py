"""The official tasks of both families' base models: a clip followed by Qwen-Audio's task tags (docs/MODEL.md#tasks)
or by Qwen2-Audio's plain instruction.

The tags and their official budgets are `qwenaudio.prompts`': `asr_task`, `translate_task` and `question_task` are
second names for its `asr`, `translation` and `question` (kept because README shows them), `ANALYSES` is its
analyses, and `prompts.tags` builds a sequence of one's own. Qwen2-Audio reads plain instructions instead
(`prompts.Instruction`); the functions here pick the model's family's (`prompts.family_tasks`), so the same call
runs either model, and a task or option the family does not have is an InputError that lists those it has.
Every function takes one clip or a list of clips (a batch, left-padded like the official evaluation) and decodes
greedily by default, as the official evaluations do; pass `do_sample=True`, `max_new_tokens=…` or any other
`GenerationConfig` field to change that. `generate=` says who answers the prompts: `model.generate` by default; a
server passes its engine's `generate` (the same arguments and result), so requests share the model's batch.
`perform` runs a task by name, as `qwenaudio transcribe` and `qwenaudio serve` do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import re

import torch

from . import longform
from . import prompts as _prompts
from .core.audio import CHUNK_LENGTH, N_SAMPLES, SAMPLE_RATE, AudioSource, as_waveform, source_name
from .core.checks import expect, renamed, shown
from .core.errors import InputError
from .core.families import QWEN2_AUDIO, Family
from .core.generate import cut_at_stop
from .core.model import QwenAudio, expect_model
from .core.tokenizer import MAX_TIMESTAMP_CS, NUM_BPE_RANKS, SPECIAL_TOKENS, Tokenizer
from .longform import Segment, text_of, words_of
from .prompts import ANALYSES, Instruction, Prompt, family_tasks, split_language
from .subtitles import Word, cues, in_order

asr_task, translate_task, question_task = _prompts.asr, _prompts.translation, _prompts.question  # README's names
Generate = Callable[..., list[list[int]]]  # `QwenAudio.generate`'s arguments and result: who answers the prompts


def prompt_texts(task: Prompt | Instruction, names: Sequence[str]) -> list[str]:
    """`task.text(name)` per clip (the name's tokens are replaced by audio pads)."""
    return [task.text(name) for name in names]


def run(model: QwenAudio, audio: AudioSource | Sequence[AudioSource], task: Prompt | Instruction, *,
        generate: Generate | None = None, **generation) -> list[list[int]]:
    """Run `task` on one clip or a batch (left-padded); the reply ids of each clip, stop token excluded. `generate`
    answers the prompts (default `model.generate`; an engine's `generate` takes the same arguments)."""
    expect_model(model)
    expect(task, (Prompt, Instruction), "task", "a prompts.Prompt (asr_task(), question_task(q), ANALYSES['caption'], "
           "…) or, for Qwen2-Audio, a prompts.Instruction")
    kind = family_tasks(model.family).kind
    if not isinstance(task, kind):
        raise InputError(f"task is a prompts.{type(task).__name__}, but {model.family.name} reads "
                         f"prompts.{kind.__name__}s: build it with prompts.family_tasks(model.family)")
    sources = list(audio) if isinstance(audio, (list, tuple)) else [audio]
    clips = [as_waveform(s, source_name(s, i), model.encoder.min_samples) for i, s in enumerate(sources)]
    names = [str(s) if isinstance(s, str) else f"clip{i}" for i, s in enumerate(sources)]
    chosen = {k: v for k, v in generation.items() if v is not None}  # None: the task's default
    budget = {"max_new_tokens": task.max_new_tokens}
    if isinstance(task, Instruction):  # Qwen2-Audio's evaluation also sets a floor
        budget["min_new_tokens"] = min(task.min_new_tokens, chosen.get("max_new_tokens", task.max_new_tokens))
    answer = model.generate if generate is None else generate
    return answer(prompt_texts(task, names), [[c] for c in clips], **{"do_sample": False, **budget, **chosen})


def _texts(model: QwenAudio, replies: list[list[int]], single: bool, stop_strings: Sequence[str] = ()):
    texts = [cut_at_stop(model.tokenizer.decode(r, skip_special_tokens=True), stop_strings).strip() for r in replies]
    return texts[0] if single else texts


def _single(audio) -> bool:
    return not isinstance(audio, (list, tuple))


def reply_text(model: QwenAudio, task: Prompt | Instruction, reply: Sequence[int], stop_strings: Sequence[str] = (),
               *, partial: bool = False) -> str:
    """A transcript's or translation's text from its reply ids: special tokens dropped, cut at a stop string,
    stripped; a Qwen2-Audio reply loses the language tag it starts with. `partial` reads a reply still being made (a
    stream): a language tag not yet complete reads as nothing so far, so the text only ever grows."""
    text = cut_at_stop(model.tokenizer.decode(reply, skip_special_tokens=True), stop_strings).strip()
    if not isinstance(task, Instruction):
        return text
    if partial and _OPEN_TAG.fullmatch(text):
        return ""
    return split_language(text)[1].strip()


_OPEN_TAG = re.compile(r"<(\|([a-z]{1,3}\|?)?)?")  # the start of a language tag `<|en|>`, unfinished


def segments(model: QwenAudio, audio, task: Prompt | Instruction, *, timed: bool = False,
             progress: Callable[[int, int, int], None] | None = None, generate: Generate | None = None,
             **generation) -> list[list[Segment]]:
    """Per clip, its transcript as `Segment`s in seconds from the clip's start: one for a clip of up to 30 s, one
    per window for a longer one (cut, recognised a batch of windows at a time and stitched: `qwenaudio.longform`).
    `timed` says the task ends in timestamp tags, so segments carry their `Word`s. `progress(clip, done, total)`
    follows the windows of each long clip; `generate` is `run`'s."""
    expect_model(model)
    if progress is not None and not callable(progress):
        raise InputError(f"progress must be a function (clip, done, total) or None, got {shown(progress)}")
    sources = list(audio) if not _single(audio) else [audio]
    clips = [as_waveform(s, source_name(s, i), model.encoder.min_samples) for i, s in enumerate(sources)]
    stops = generation.get("stop_strings", ())

    def replies(batch: list[torch.Tensor]) -> list:
        ids = run(model, batch, task, generate=generate, **generation)
        if not timed:
            return [reply_text(model, task, r, stops) for r in ids]
        return [parse_words(model.tokenizer, r, len(clip) / SAMPLE_RATE) for r, clip in zip(ids, batch)]

    short = [i for i, c in enumerate(clips) if len(c) <= N_SAMPLES]
    results = {}
    for i, reply in zip(short, replies([clips[i] for i in short]) if short else []):
        text = " ".join(w.text for w in reply) if timed else reply
        results[i] = [Segment(text, 0.0, len(clips[i]) / SAMPLE_RATE, reply if timed else [])]
    for i, clip in enumerate(clips):
        if i not in results:
            step = partial(progress, i) if progress else None
            results[i] = longform.transcribe_long(clip, replies, timed=timed, progress=step)
    return [results[i] for i in range(len(clips))]


def recognize(model: QwenAudio, audio, task: Prompt | Instruction, *, timed: bool = False, **generation) -> list:
    """Per clip, the reply as text, or as `Word`s when `timed`; audio of any length (see `segments`)."""
    out = segments(model, audio, task, timed=timed, **generation)
    return [longform.words_of(parts) if timed else longform.text_of(parts) for parts in out]


def transcribe(model: QwenAudio, audio, *, language: str | None = "en", itn: bool = False, timestamps: bool = False,
               **generation) -> str | list[Word] | list:
    """Speech to text; with `timestamps`, a list of `Word(text, start, end)` per clip instead of text. Audio of any
    length: past 30 s it is transcribed in windows and stitched, word times counted from the recording's start.
    Qwen2-Audio has no timestamps and no `itn`; `language=None` lets it detect the language."""
    expect_model(model)
    task = family_tasks(model.family).asr(language, itn=itn, timestamps=timestamps)
    results = recognize(model, audio, task, timed=timestamps, **generation)
    return results[0] if _single(audio) else results


def translate(model: QwenAudio, audio, *, source: str = "en", target: str = "zh", **generation):
    """Speech translation from `source` to `target` language (CoVoST2 style); any length, as `transcribe`."""
    expect_model(model)
    results = recognize(model, audio, family_tasks(model.family).translation(source, target), **generation)
    return results[0] if _single(audio) else results


def detect_language(model: QwenAudio, audio, **generation):
    """The language tag Qwen2-Audio writes before a transcript when not told the language (the paper's
    `Detect the language and recognize the speech:`), per clip; None where the reply starts with none. The first 30 s
    of a clip are heard."""
    expect_model(model)
    known = family_tasks(model.family)
    if known.family is not QWEN2_AUDIO:
        raise known.missing("language detection")
    replies = run(model, audio, known.asr(None), **{"max_new_tokens": 8, **generation})
    codes = [split_language(model.tokenizer.decode(r))[0] for r in replies]  # a tag may be a special token
    return codes[0] if _single(audio) else codes


def answer(model: QwenAudio, audio, question: str, **generation):
    """Answer a question about the clip (ClothoAQA style: a few words)."""
    expect_model(model)
    known = family_tasks(model.family)
    if known.question is None:
        raise known.missing("question answering")
    return _texts(model, run(model, audio, known.question(question), **generation), _single(audio))


def analyse(model: QwenAudio, audio, task: str, **generation):
    """One of the family's analyses: Qwen-Audio's `ANALYSES` (caption, emotion, vocal_sound, scene, note_analysis),
    Qwen2-Audio's `prompts.QWEN2_ANALYSES` (caption, emotion, vocal_sound)."""
    analyses = family_tasks(model.family).analyses if isinstance(model, QwenAudio) else ANALYSES
    if not isinstance(task, str) or task not in {**ANALYSES, **analyses}:
        raise InputError(f"unknown task {task!r}; choose from {', '.join(analyses)}")
    expect_model(model)
    if task == "note_analysis":  # its tags are the answer
        return note_analysis(model, audio, **generation)
    return _texts(model, run(model, audio, family_tasks(model.family).analysis(task), **generation), _single(audio))


def caption(model: QwenAudio, audio, **generation):
    return analyse(model, audio, "caption", **generation)


def emotion(model: QwenAudio, audio, **generation):
    return analyse(model, audio, "emotion", **generation)


def vocal_sound(model: QwenAudio, audio, **generation):
    return analyse(model, audio, "vocal_sound", **generation)


def scene(model: QwenAudio, audio, **generation):
    return analyse(model, audio, "scene", **generation)


def note_analysis(model: QwenAudio, audio, **generation):
    """Musical note: the reply holds `<|pitch|><|midi_pitch_N|>`, `<|velocity|>…`, `<|instrument|>…`, `<|sonic|>…`;
    decoded here with its tags kept."""
    expect_model(model)
    replies = run(model, audio, family_tasks(model.family).analysis("note_analysis"), **generation)
    texts = [model.tokenizer.decode(r).strip() for r in replies]
    return texts[0] if _single(audio) else texts


def task_prompt(family: Family, task: str, *, language: str | None = "en", target_language: str = "zh",
                itn: bool = False, timestamps: bool = False) -> Prompt | Instruction:
    """The prompt of the task named `task` (`FamilyTasks.names`: transcribe, translate or an analysis) for `family`'s
    base model; a task, language or option the family does not have is its InputError."""
    known = family_tasks(family)
    if timestamps and not known.timestamps:
        raise known.missing("timestamps")
    if task == "transcribe":
        return known.asr(language, itn=itn, timestamps=timestamps)
    return known.translation(language, target_language) if task == "translate" else known.analysis(task)


@dataclass(frozen=True)
class Result:
    """One clip's result of `perform`: the text, its timed words (timed transcription only) and the segments it was
    stitched from (one per window; one for a clip of up to 30 s or an analysis)."""

    text: str
    words: list[Word] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)


def perform(model: QwenAudio, clips: Sequence[AudioSource], task: str, *, language: str | None = "en",
            target_language: str = "zh", itn: bool = False, timestamps: bool = False,
            generate: Generate | None = None, progress: Callable[[int, int, int], None] | None = None,
            **generation) -> list[Result]:
    """The task named `task` on each clip, as `qwenaudio transcribe` and `qwenaudio serve` run it: transcribe and
    translate take audio of any length (`segments`; `progress(clip, done, total)` follows a long clip's windows),
    an analysis hears a clip's first 30 s (`analyse`). `timestamps` times a transcript's words (Qwen-Audio)."""
    expect_model(model)
    prompt = task_prompt(model.family, task, language=language, target_language=target_language, itn=itn,
                         timestamps=timestamps)
    waves = [as_waveform(s, source_name(s, i), model.encoder.min_samples) for i, s in enumerate(clips)]
    if task not in ("transcribe", "translate"):
        return [Result(text, [], [Segment(text, 0.0, len(w) / SAMPLE_RATE)])
                for text, w in zip(analyse(model, waves, task, generate=generate, **generation), waves)]
    out = segments(model, waves, prompt, timed=timestamps, progress=progress, generate=generate, **generation)
    return [Result(text_of(parts), words_of(parts), parts) for parts in out]


def subtitle_cues(parts: Sequence[Segment]) -> list[Word]:
    """The cues SRT and WebVTT show of a result's segments: its timed words, or, for a segment without timestamps,
    one cue of its text over its window (`subtitles.cues`)."""
    return [cue for s in parts for cue in cues(s.words, s.text, s.start, s.end)]


def parse_words(tokenizer: Tokenizer, reply: Sequence[int], duration: float = CHUNK_LENGTH) -> list[Word]:
    """Words between timestamp tags. The prompt ends with `<|0.00|>`, so the reply continues
    `<|sil|><|0.54|>word<|0.86|>next<|1.17|>`: each text run lies between the stamps around it; `<|sil|>` runs
    (silence) are dropped, and a last run with no closing stamp ends where it starts. A model may stamp past the
    clip's `duration` (seconds) or go back in time: times are clamped to the clip and kept in order."""
    first, last = NUM_BPE_RANKS + SPECIAL_TOKENS.index("<|0.00|>"), NUM_BPE_RANKS + SPECIAL_TOKENS.index("<|30.00|>")
    assert last - first == MAX_TIMESTAMP_CS
    words, start, run_ids = [], 0.0, []

    def close(end: float) -> None:
        text = tokenizer.decode(run_ids, skip_special_tokens=True).strip()
        if text:
            words.append(Word(text, start, end))

    for token in reply:
        if first <= token <= last:
            close((token - first) / 100)
            start, run_ids = (token - first) / 100, []
        else:
            run_ids.append(token)
    close(start)
    return in_order(words, 0.0, duration)


__getattr__ = renamed(__name__, {  # the names this module had before `prompts` held every prompt
    "Task": ("tasks.Prompt", Prompt), "TASKS": ("tasks.ANALYSES", ANALYSES), "tags": ("prompts.tags", _prompts.tags)})
