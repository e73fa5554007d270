"""Both families' official prompts, once: Qwen-Audio's task tags and ChatML, Qwen2-Audio's instructions and chat.

The base model is steered by hierarchical tags after the clip (docs/MODEL.md#tasks): what kind of output
(`<|startoftranscript|>` or `<|startofanalysis|>`), the audio's language, the task, the output language,
timestamps or not, and a style. Each builder here returns the tags and the official evaluation's budget for them
(eval_audio/evaluate_*.py); `tasks` runs them, `evaluation` builds each benchmark's prompt from them, fine-tuning
reads the same. Qwen-Audio-Chat reads ChatML instead (docs/MODEL.md#chat): `render_chat` is the one renderer, for
inference (the official `make_context`) and for training (which ids are learned) alike.

Qwen2-Audio's base model reads a plain instruction after the clip (`Instruction`, `qwen2_asr`, `QWEN2_ANALYSES`)
and its Instruct model the chat template (`render_qwen2_chat`, `render_qwen2_chat_ids`): its names say so, the
others are Qwen-Audio's. `family_tasks` picks a model's family's base-model prompts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from .core.checks import expect, shown
from .core.errors import InputError
from .core.families import QWEN2_AUDIO, QWEN_AUDIO, Family
from .core.model import IGNORE_INDEX
from .core.qwen2_tokenizer import AUDIO, AUDIO_REGION, Qwen2Tokenizer
from .core.tokenizer import AUDIO_SPECIAL_TOKENS, LANGUAGES, SPECIAL_TOKENS, Tokenizer


@dataclass(frozen=True)
class Prompt:
    """A base-model task: the tags the model reads after the clip, and how many tokens the official evaluation lets
    it reply with."""

    tags: str  # what follows `</audio>`
    max_new_tokens: int  # the official evaluation's budget

    def text(self, audio: str | Path) -> str:
        """The whole prompt for the clip `audio` (`audio_prompt`)."""
        return audio_prompt(audio, self.tags)


def audio_prompt(audio: str | Path, tags: str) -> str:
    """A base-model prompt: `<audio>PATH</audio>` then the tags, as the official evaluation's collate_fn writes it
    (the path's tokens are replaced by the clip's audio pads)."""
    return f"<audio>{audio}</audio>{tags}"


def tags(*names: str) -> str:
    """A custom tag sequence: tags("startofanalysis", "en", "keyword") -> "<|startofanalysis|><|en|><|keyword|>"."""
    out = "".join(f"<|{n}|>" for n in names)
    unknown = [n for n in names if f"<|{n}|>" not in SPECIAL_TOKENS]
    if unknown:
        raise InputError(f"unknown tags: {unknown}")
    return out


def check_language(code: str, *, allow_unknown: bool = False) -> str:
    """`code` once Qwen-Audio has a tag for it (`unknown` too where `allow_unknown`), else InputError."""
    if code not in LANGUAGES and not (allow_unknown and code == "unknown"):
        raise InputError(f"language {code!r} has no tag; Qwen-Audio knows {', '.join(LANGUAGES)}")
    return code


def asr(language: str = "en", *, itn: bool = False, timestamps: bool = False) -> Prompt:
    """Speech recognition; `itn` writes numbers and symbols as written ("$5"), `timestamps` times every word."""
    expect(itn, bool, "itn", "True or False")
    expect(timestamps, bool, "timestamps", "True or False")
    lang = check_language(language)
    tail = tags("timestamps", "0.00") if timestamps else tags("notimestamps", "itn" if itn else "wo_itn")
    return Prompt(tags("startoftranscript", lang, "transcribe", lang) + tail, 256)


def translation(source: str = "en", target: str = "zh") -> Prompt:
    """Speech translation from `source` to `target` language (CoVoST2 style)."""
    return Prompt(tags("startoftranscript", check_language(source), "translate", check_language(target),
                       "notimestamps", "itn"), 256)


def question(text: str) -> Prompt:
    """Audio question answering: the question sits between `<|question|>` and `<|answer|>`."""
    expect(text, str, "question", "a str")
    return Prompt(tags("startofanalysis", "en", "question") + text + tags("answer"), 4)


CAPTION_STYLES = ("clotho", "audiocaps", "plain")  # the official caption script's output styles


def caption(style: str = "clotho") -> Prompt:
    """An audio caption in one of `CAPTION_STYLES`."""
    if style not in CAPTION_STYLES:
        raise InputError(f"caption style must be one of {', '.join(CAPTION_STYLES)}, got {style!r}")
    return Prompt(tags("startofanalysis", "unknown", "caption", "en", "notimestamps", f"caption_{style}"), 30)


def _keyword(heard: str, label: str, max_new_tokens: int) -> Prompt:
    return Prompt(tags("startofanalysis", heard, "keyword", "en", "notimestamps", label), max_new_tokens)


ANALYSES: dict[str, Prompt] = {  # the analyses that need nothing but the clip
    "caption": caption(),
    "emotion": _keyword("en", "emotion_recognition", 4),
    "vocal_sound": _keyword("en", "vocal_classification", 4),
    "scene": _keyword("unknown", "scene", 10),
    "note_analysis": _keyword("unknown", "note_analysis", 30),
}

# ------------------------------------------------------------------------------ Qwen2-Audio's base-model instructions
# Qwen2-Audio-7B reads a plain-English instruction after the clip instead of tags (arXiv 2407.10759 §2): its
# official evaluation (QwenLM/Qwen2-Audio eval_audio/evaluate_*.py) writes `"<|audio_bos|><|AUDIO|><|audio_eos|>" +
# data['prompt']` and decodes greedily with max_new_tokens=256, min_new_tokens=1. The caption instruction is the
# model card's; the others are the evaluation's JSONL rows (not in the repository) as the toolkits that read them
# write them: ASR `Detect the language and recognize the speech: <|en|>` (also the paper's Figure 2), emotion and
# vocal sound verbatim. For translation no published copy of covost2_eval.jsonl was found; the form here is the one
# the ASR prompt extends and several fine-tuning and evaluation scripts use (`… translate the speech into German:
# <|en|>`).

# The languages of the official evaluation (ASR: en zh yue fr; CoVoST2: en de zh es fr it): each one's tag in the
# prompt, and the name the translation prompt writes.
QWEN2_LANGUAGES = {"en": "English", "zh": "Chinese", "yue": "Cantonese", "fr": "French", "de": "German",
                   "es": "Spanish", "it": "Italian"}


@dataclass(frozen=True)
class Instruction:
    """A Qwen2-Audio base-model task: the instruction the model reads after the clip, and the official evaluation's
    budget for the reply."""

    instruction: str
    max_new_tokens: int = 256
    min_new_tokens: int = 1  # the evaluation forbids an empty reply

    def text(self, audio: str | Path | None = None) -> str:
        """The whole prompt. The clip is passed beside it (its `<|AUDIO|>` is sized to the clip), so `audio`, the
        name `Prompt.text` writes, is not part of it."""
        return AUDIO_REGION + self.instruction  # no space or newline between


def check_qwen2_language(code: str) -> str:
    """`code` once Qwen2-Audio has a tag for it, else InputError."""
    if code not in QWEN2_LANGUAGES:
        raise InputError(f"language {code!r} has no tag; Qwen2-Audio knows {', '.join(QWEN2_LANGUAGES)}")
    return code


def qwen2_asr(language: str | None = "en", *, itn: bool = False, timestamps: bool = False) -> Instruction:
    """Speech recognition of speech in `language`; None lets the model say the language first (the paper's
    pre-training form, whose reply starts with the tag: `<|zh|>你好。`). Qwen2-Audio has neither timestamps nor an
    ITN switch: asking for them is an InputError, not a silent plain transcript."""
    for wanted, name in ((timestamps, "timestamps"), (itn, "itn")):
        expect(wanted, bool, name, "True or False")
        if wanted:
            raise QWEN2_TASKS.missing(name)
    if language is None:
        return Instruction("Detect the language and recognize the speech:")
    return Instruction(f"Detect the language and recognize the speech: <|{check_qwen2_language(language)}|>")


def qwen2_translation(source: str = "en", target: str = "zh") -> Instruction:
    """Speech translation from `source` to `target` language (CoVoST2)."""
    target = QWEN2_LANGUAGES[check_qwen2_language(target)]
    return Instruction(f"Detect the language and translate the speech into {target}: "
                       f"<|{check_qwen2_language(source)}|>")


QWEN2_ANALYSES: dict[str, Instruction] = {
    "caption": Instruction("Generate the caption in English:"),
    "emotion": Instruction("Recognize the emotion with keywords in English:"),
    "vocal_sound": Instruction("Classify the human vocal sound to VocalSound in English:"),
}
_LANGUAGE_TAG = re.compile(r"\s*<\|([a-z]{2,3})\|>")


def split_language(reply: str) -> tuple[str | None, str]:
    """(the language tag a Qwen2-Audio reply starts with, or None; the rest). A tag that is plain text to the
    tokenizer survives `skip_special_tokens`; the official ASR scoring removes every `<|…|>` (`remove_sp`)."""
    tag = _LANGUAGE_TAG.match(reply)
    return (tag[1], reply[tag.end():]) if tag else (None, reply)


@dataclass(frozen=True)
class FamilyTasks:
    """One family's base-model tasks, as `tasks` and `qwenaudio transcribe` run them: the prompt kind, the builders
    (`asr(language, itn=, timestamps=)`, `translation(source, target)`, `question(text)` or None) and the analyses
    that need nothing but the clip."""

    family: Family
    kind: type
    asr: Callable[..., Prompt | Instruction]
    translation: Callable[[str, str], Prompt | Instruction]
    question: Callable[[str], Prompt] | None
    analyses: dict[str, Prompt | Instruction]
    timestamps: bool  # whether `asr` can time every word

    @property
    def names(self) -> tuple[str, ...]:
        """Every task, as `qwenaudio transcribe --task` and the errors name them."""
        return ("transcribe", "translate", *(("question",) if self.question else ()), *self.analyses)

    def missing(self, what: str) -> InputError:
        """The error for a task or option this family does not have."""
        return InputError(f"{self.family.name} has no {what}; its base-model tasks are {', '.join(self.names)}")

    def analysis(self, name: str) -> Prompt | Instruction:
        if name not in self.analyses:
            raise self.missing(f"task {name!r}")
        return self.analyses[name]


QWEN_AUDIO_TASKS = FamilyTasks(QWEN_AUDIO, Prompt, asr, translation, question, ANALYSES, True)
QWEN2_TASKS = FamilyTasks(QWEN2_AUDIO, Instruction, qwen2_asr, qwen2_translation, None, QWEN2_ANALYSES, False)
FAMILY_TASKS = {tasks.family: tasks for tasks in (QWEN_AUDIO_TASKS, QWEN2_TASKS)}


def family_tasks(family: Family) -> FamilyTasks:
    """The one place that picks a family's base-model prompts (`model.family`)."""
    expect(family, Family, "family", "a core.families.Family (model.family)")
    return FAMILY_TASKS[family]


# ------------------------------------------------------------------------------------------ Qwen-Audio-Chat's ChatML

DEFAULT_SYSTEM = "You are a helpful assistant."
Part = str | dict  # "text", {"text": "…"} or {"audio": path}


def query_text(parts: str | Sequence[Part]) -> str:
    """A query from parts: each clip becomes `Audio n:<audio>path</audio>\\n` (n from 1), text is appended as is
    (the official `from_list_format`)."""
    if isinstance(parts, str):
        return parts
    if not isinstance(parts, (list, tuple)):
        raise InputError(f"query must be a str or a list of parts (str, {{'text': …}}, {{'audio': path}}), got "
                         f"{shown(parts)}")
    out, n = "", 0
    for part in parts:
        if isinstance(part, str):
            out += part
        elif isinstance(part, dict) and "audio" in part:
            expect(part["audio"], (str, Path), "an audio part's path", "a str or Path")
            n += 1
            out += f"Audio {n}:<audio>{part['audio']}</audio>\n"
        elif isinstance(part, dict) and "text" in part:
            expect(part["text"], str, "a text part's text", "a str")
            out += part["text"]
        else:
            raise InputError(f"a query part must be a str, {{'text': …}} or {{'audio': path}}, got {part!r}")
    return out


CLIPS_AS_PARTS = "attach clips as {'audio': path} parts"  # how a library caller gives Qwen2-Audio a clip
_QWEN_AUDIO_REGION = re.compile(r"<audio>.*?</audio>", re.DOTALL)


def check_qwen2_text(text: str, clips: str = CLIPS_AS_PARTS) -> str:
    """`text`, the typed text of a Qwen2-Audio query, once it marks no clip's place itself: a typed `<|AUDIO|>` is
    read as a clip's place with no clip, and Qwen-Audio's `<audio>PATH</audio>` is plain text to Qwen2-Audio's
    tokenizer, so its clip would never be heard. `clips` says how the caller's user gives a clip instead."""
    if AUDIO in text:
        raise InputError(f"the query's text holds {AUDIO}, which stands for a clip's audio: {clips}")
    if _QWEN_AUDIO_REGION.search(text):
        raise InputError("the query's text holds Qwen-Audio's <audio>…</audio>, which Qwen2-Audio reads as plain text "
                         f"(the clip would not be heard): {clips}")
    return text


def _content(tokenizer: Tokenizer, content: str, span_of: Callable[[str], int]) -> tuple[list[int], list[str]]:
    """A message's text as ChatML holds it, and the path of each audio region in it: only Qwen-Audio's audio tags
    are special (a typed "<|im_start|>" stays text), each `<audio>path</audio>` region given its clip's span by
    `span_of(path)`."""
    paths = tokenizer.audio_paths(content, allowed_special=AUDIO_SPECIAL_TOKENS)
    spans = [span_of(p) for p in paths]
    return tokenizer.encode(content, allowed_special=AUDIO_SPECIAL_TOKENS, audio_spans=spans or None), paths


class Rendered(NamedTuple):
    """A conversation as the model reads it."""

    ids: list[int]
    labels: list[int]  # the id where the model learns it (each reply and its <|im_end|>), else IGNORE_INDEX
    clips: list[str]  # the path of each `<audio>` region, in the order the ids hold them


def render_chat(tokenizer: Tokenizer, system: str, turns: Sequence[tuple[str, str]], query: str | None = None, *,
                span_of: Callable[[str], int], max_window_size: int | None = None) -> Rendered:
    """ChatML of a system message and (user, assistant) `turns`, then, when there is a `query`, that query and
    `<|im_start|>assistant\\n` for the reply to follow: the official `make_context`. Each message is encoded on its
    own (`_content`). With `max_window_size`, turns are kept newest first while the system message, the turn and
    those kept so far stay under it; the first that does not fit drops it and all older ones (the query and the
    assistant prefix are not counted). Without a query (training) every turn is kept and its replies are learned."""
    nl = tokenizer.encode("\n")

    def head(role: str) -> list[int]:
        return [tokenizer.im_start_id] + tokenizer.encode(role) + nl

    def message(role: str, content: str) -> Rendered:
        body, paths = _content(tokenizer, content, span_of)
        said = body + [tokenizer.im_end_id]
        learned = said if role == "assistant" else [IGNORE_INDEX] * len(said)
        return Rendered(head(role) + said, [IGNORE_INDEX] * len(head(role)) + learned, paths)

    def join(*pieces: Rendered | list[int]) -> Rendered:
        """Pieces in order; a plain id list (a newline, a role's head) is never learned and holds no clip."""
        out = Rendered([], [], [])
        for piece in pieces:
            piece = piece if isinstance(piece, Rendered) else Rendered(piece, [IGNORE_INDEX] * len(piece), [])
            out = Rendered(out.ids + piece.ids, out.labels + piece.labels, out.clips + piece.clips)
        return out

    start = message("system", system)
    kept = Rendered([], [], [])
    for user, reply in reversed(turns):
        turn = join(nl, message("user", user), nl, message("assistant", reply))
        if max_window_size is not None and len(start.ids) + len(turn.ids) + len(kept.ids) >= max_window_size:
            break
        kept = join(turn, kept)
    if query is None:
        return join(start, kept)
    return join(start, kept, nl, message("user", query), nl, head("assistant"))

# ------------------------------------------------------------------------------------ Qwen2-Audio-Instruct's ChatML

QWEN2_ROLES = ("system", "user", "assistant")
Qwen2Turn = tuple[str, str | Sequence[Part]]  # (role, content): content is text, or parts as in `query_text`


def render_qwen2_chat(turns: Sequence[Qwen2Turn], *, system: str = DEFAULT_SYSTEM,
                      add_generation_prompt: bool = True) -> str:
    """The text Qwen2-Audio-Instruct's chat template renders for `turns` (ChatML).

    A system turn with `system` comes first unless the first turn is one. A content given as text is written as is;
    given as parts, each clip becomes `Audio n: <|audio_bos|><|AUDIO|><|audio_eos|>\\n` (n counts the clips of the
    whole conversation from 1) and text parts are appended as they are. `add_generation_prompt` ends with
    `<|im_start|>assistant\\n` for the reply to follow. The tokenizer then repeats each `<|AUDIO|>` once per audio
    position of its clip (`Qwen2Tokenizer.encode`'s `audio_spans`, in the order of `qwen2_chat_clips`).
    """
    return "".join(_qwen2_messages(turns, system, add_generation_prompt)[1])


def render_qwen2_chat_ids(tokenizer: Qwen2Tokenizer, turns: Sequence[Qwen2Turn], *, audio_spans: Sequence[int] = (),
                          system: str = DEFAULT_SYSTEM, add_generation_prompt: bool = False) -> Rendered:
    """`render_qwen2_chat`'s text as the model reads it: the ids of the whole text with each `<|AUDIO|>` repeated
    `audio_spans[i]` times (what transformers' processor gives), and for training the labels: each reply of the
    assistant and its `<|im_end|>` are learned. A reply's first token is not learned when it also holds the
    newline after `assistant` (a reply starting with a newline or spaces: the text tokenizes as one piece there)."""
    roles, messages = _qwen2_messages(turns, system, add_generation_prompt)
    ids = tokenizer.encode("".join(messages), audio_spans=list(audio_spans) or None)
    labels: list[int] = []
    spans = list(audio_spans)
    for role, text in zip(roles, messages):  # messages meet at special tokens: each encodes as it does in the whole
        n = text.count(AUDIO)
        said = tokenizer.encode(text, audio_spans=spans[:n] or None)
        spans = spans[n:]
        start = _reply_start(tokenizer, said) if role == "assistant" and text.endswith("<|im_end|>\n") else None
        labels += [IGNORE_INDEX] * len(said) if start is None else \
            [IGNORE_INDEX] * start + said[start:-1] + [IGNORE_INDEX]  # the reply and <|im_end|>, not the newline
    return Rendered(ids, labels, qwen2_chat_clips(turns))


def qwen2_chat_clips(turns: Sequence[Qwen2Turn]) -> list[str | Path]:
    """The audio path of each clip in `turns`, in the order `render_qwen2_chat` numbers them."""
    return [part["audio"] for _, content in _qwen2_turns(turns) if not isinstance(content, str)
            for part in content if isinstance(part, dict) and "audio" in part]


def _reply_start(tokenizer: Qwen2Tokenizer, said: list[int]) -> int:
    """Where the reply's tokens start in an assistant message's ids: after `<|im_start|>assistant\\n`, or one
    further when the newline and the reply's start are one token."""
    head = tokenizer.encode("<|im_start|>assistant\n")
    same = next((n for n, (a, b) in enumerate(zip(head, said)) if a != b), len(head))
    return same + (same < len(head))


def _qwen2_messages(turns: Sequence[Qwen2Turn], system: str,
                    add_generation_prompt: bool) -> tuple[list[str], list[str]]:
    """The role and the ChatML text of each message the template writes, the generation prompt last (role
    "assistant", open); joined, they are `render_qwen2_chat`'s text."""
    expect(system, str, "system", "a str")
    expect(add_generation_prompt, bool, "add_generation_prompt", "True or False")
    turns = _qwen2_turns(turns)
    if not turns or turns[0][0] != "system":
        turns = [("system", system), *turns]
    roles, messages, clips = [], [], 0
    for role, content in turns:
        body = ""
        for part in [content] if isinstance(content, str) else content:
            if isinstance(part, dict) and "audio" in part:
                clips += 1
                body += f"Audio {clips}: {AUDIO_REGION}\n"
            else:
                body += part if isinstance(part, str) else part["text"]
        roles.append(role)
        messages.append(f"<|im_start|>{role}\n{body}<|im_end|>\n")
    if add_generation_prompt:
        roles.append("assistant")
        messages.append("<|im_start|>assistant\n")
    return roles, messages


def _qwen2_turns(turns: Sequence[Qwen2Turn]) -> list[Qwen2Turn]:
    """`turns` checked: (role, content) pairs with a known role and content as `query_text` reads it."""
    if isinstance(turns, (str, bytes)) or not isinstance(turns, Sequence):
        raise InputError(f"turns must be a list of (role, content) pairs, got {shown(turns)}")
    for n, turn in enumerate(turns):
        if not (isinstance(turn, (tuple, list)) and len(turn) == 2 and turn[0] in QWEN2_ROLES):
            raise InputError(f"turn {n} must be a (role, content) pair with role one of {', '.join(QWEN2_ROLES)}, "
                             f"got {shown(turn)}")
        if not isinstance(turn[1], str):
            query_text(turn[1])  # the same parts, the same errors
    return list(turns)



def render_qwen2_chat_context(tokenizer: Qwen2Tokenizer, system: str,
                              turns: Sequence[tuple[str | Sequence[Part] | None, str]], query: str | Sequence[Part], *,
                              span_of: Callable[[str], int], max_window_size: int | None = None) -> Rendered:
    """A Qwen2-Audio-Instruct chat's next prompt (`render_qwen2_chat_ids`): the system message, the (user,
    assistant) `turns` (a user None: the assistant's turn alone), the `query` and the generation prompt, each clip's
    `<|AUDIO|>` sized by `span_of(path)`.

    Qwen2-Audio publishes no history window (transformers renders whatever it is given, and the model reads 8,192
    positions); `max_window_size` applies Qwen-Audio-Chat's rule instead (`render_chat`): the newest turns are kept
    while the system message and the kept turns, rendered alone, stay under it (the query and the reply are not
    counted), and the first that does not fit drops it and all older ones. Clips are numbered from "Audio 1" in
    what is kept, as the template numbers any conversation it is given.
    """

    def flat(pairs: Sequence[tuple[str | Sequence[Part] | None, str]]) -> list[Qwen2Turn]:
        return [turn for user, reply in pairs for turn in (("user", user), ("assistant", reply)) if turn[1] is not None]

    def rendered(conversation: list[Qwen2Turn], generation_prompt: bool) -> Rendered:
        spans = [span_of(str(path)) for path in qwen2_chat_clips(conversation)]
        return render_qwen2_chat_ids(tokenizer, conversation, audio_spans=spans, system=system,
                                     add_generation_prompt=generation_prompt)

    kept = 0
    while kept < len(turns) and (max_window_size is None or
                                 len(rendered(flat(turns[len(turns) - kept - 1:]), False).ids) < max_window_size):
        kept += 1
    return rendered([*flat(turns[len(turns) - kept:]), ("user", query)], True)
