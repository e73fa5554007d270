"""Qwen-Audio's official prompts, once: the task tags and budgets of the base model, and Qwen-Audio-Chat's ChatML.

The base model is steered by hierarchical tags after the clip (docs/MODEL.md#tasks): what kind of output
(`<|startoftranscript|>` or `<|startofanalysis|>`), the audio's language, the task, the output language,
timestamps or not, and a style. Each builder here returns the tags and the official evaluation's budget for them
(eval_audio/evaluate_*.py); `tasks` runs them, `evaluation` builds each benchmark's prompt from them, fine-tuning
reads the same. Qwen-Audio-Chat reads ChatML instead (docs/MODEL.md#chat): `render_chat` is the one renderer, for
inference (the official `make_context`) and for training (which ids are learned) alike.

Every name here is Qwen-Audio's. Another family's prompts (Qwen2-Audio: plain instructions in ChatML) are its own
and sit beside these under their own names, leaving these untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from .core.checks import expect, shown
from .core.errors import InputError
from .core.model import IGNORE_INDEX
from .core.qwen2_tokenizer import AUDIO, AUDIO_BOS, AUDIO_EOS, Qwen2Tokenizer
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
                body += f"Audio {clips}: {AUDIO_BOS}{AUDIO}{AUDIO_EOS}\n"
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
                              turns: Sequence[tuple[str | Sequence[Part], str]], query: str | Sequence[Part], *,
                              span_of: Callable[[str], int], max_window_size: int | None = None) -> Rendered:
    """A Qwen2-Audio-Instruct chat's next prompt (`render_qwen2_chat_ids`): the system message, the (user,
    assistant) `turns`, the `query` and the generation prompt, each clip's `<|AUDIO|>` sized by `span_of(path)`.

    Qwen2-Audio publishes no history window (transformers renders whatever it is given, and the model reads 8,192
    positions); `max_window_size` applies Qwen-Audio-Chat's rule instead (`render_chat`): the newest turns are kept
    while the system message and the kept turns, rendered alone, stay under it (the query and the reply are not
    counted), and the first that does not fit drops it and all older ones. Clips are numbered from "Audio 1" in
    what is kept, as the template numbers any conversation it is given.
    """

    def flat(pairs: Sequence[tuple[str | Sequence[Part], str]]) -> list[Qwen2Turn]:
        return [turn for user, reply in pairs for turn in (("user", user), ("assistant", reply))]

    def rendered(conversation: list[Qwen2Turn], generation_prompt: bool) -> Rendered:
        spans = [span_of(str(path)) for path in qwen2_chat_clips(conversation)]
        return render_qwen2_chat_ids(tokenizer, conversation, audio_spans=spans, system=system,
                                     add_generation_prompt=generation_prompt)

    kept = 0
    while kept < len(turns) and (max_window_size is None or
                                 len(rendered(flat(turns[len(turns) - kept - 1:]), False).ids) < max_window_size):
        kept += 1
    return rendered([*flat(turns[len(turns) - kept:]), ("user", query)], True)
