"""`qwenaudio chat`: talk with Qwen-Audio-Chat or Qwen2-Audio-Instruct about clips on a terminal, a line at a time."""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass

from ..chat import DEFAULT_SYSTEM, Chat
from ..core.audio import SAMPLE_RATE
from ..core.errors import QwenAudioError
from ..core.families import QWEN2_AUDIO
from ..core.model import QwenAudio
from ..prompts import check_qwen2_text
from .options import Plan, Terminated, add_model_options, freeze

PARSER = dict(help="talk with Qwen-Audio-Chat or Qwen2-Audio-Instruct about clips",
              description="Chat on stdin: '/audio PATH' attaches a clip to the next question, "
                          "'/reset' forgets the conversation, '/help' lists the commands, '/quit' "
                          "or end of input leaves; any other /word is refused, not sent (start a "
                          "line with // to send it as text). Ctrl-C during a reply drops it.")


@dataclass(frozen=True, kw_only=True)
class ChatPlan(Plan):
    system: str
    max_new_tokens: int | None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", default=DEFAULT_SYSTEM, help="the system message")
    add_model_options(parser, "Qwen/Qwen-Audio-Chat")


def plan(args: argparse.Namespace) -> ChatPlan:
    return freeze(ChatPlan, args)


CHAT_HELP = """/audio PATH   attach a clip to the next question (checked at once)
/reset        forget the conversation and the attached clips
/help         this list
/quit         leave (so does end of input, Ctrl-D)
A line that starts with // is sent as text, with one / removed; so is any line that starts with / but not with
/word followed by a space or the end (/tmp/a.wav, / 2, /5)."""
CHAT_COMMAND = re.compile(r"/(?P<name>[A-Za-z]\w*)(?:\s+(?P<argument>.*))?")


def run(model: QwenAudio, plan: ChatPlan) -> int:
    """Read stdin a line at a time and stream each reply to stdout. `/word` lines are commands (CHAT_HELP) and never
    reach the model; a bad clip is refused when attached; Ctrl-C during a reply drops that reply only."""
    chat, clips = Chat(model, plan.system), []
    prompt = "> " if sys.stdin.isatty() else ""
    generation = {"max_new_tokens": plan.max_new_tokens} if plan.max_new_tokens else {}
    while True:
        try:
            line = input(prompt).strip()
        except EOFError:
            print(prompt and "\n", end="")  # on a terminal, the shell's prompt starts on a line of its own
            return 0
        command = CHAT_COMMAND.fullmatch(line)
        if command and command["name"] == "quit" and not command["argument"]:
            return 0
        if command:
            error = _chat_command(chat, clips, command["name"], command["argument"])
            if error:
                print(f"error: {error}", file=sys.stderr, flush=True)
        elif line:
            _reply(chat, [*clips, line.removeprefix("/") if line.startswith("//") else line], generation)
            clips.clear()


def _chat_command(chat: Chat, clips: list[dict], name: str, argument: str | None) -> str | None:
    """Run one chat command; the error to show, if any (nothing is sent to the model)."""
    if name == "audio":
        if not argument:
            return "/audio needs a path: /audio PATH"
        try:
            seconds = len(chat.clip(argument)) / SAMPLE_RATE
        except QwenAudioError as e:
            return f"{e} (not attached)"
        clips.append({"audio": argument})
        print(f"attached {argument} ({seconds:.1f} s) to the next question", file=sys.stderr, flush=True)
        return None
    if name in ("reset", "help", "quit") and argument:
        return f"/{name} takes no argument (start the line with // to send it as text)"
    if name == "reset":
        chat.reset()
        clips.clear()
    elif name == "help":
        print(CHAT_HELP, file=sys.stderr, flush=True)
    else:
        return (f"unknown command /{name}: the commands are /audio PATH, /reset, /help, /quit; start the line with "
                "// to send it as text")
    return None


def _reply(chat: Chat, query: list, generation: dict) -> None:
    """Stream the reply to `query`; a bad clip or setting spoils only this question, and Ctrl-C drops this reply
    (the conversation goes on without it; SIGTERM still ends the command). Qwen2-Audio's typed text is checked
    here first, so a clip typed into it is refused in the command's words."""
    try:
        if chat.model.family is QWEN2_AUDIO:
            check_qwen2_text(query[-1], "attach a clip with /audio PATH, then ask")
        for piece in chat.stream(query, **generation):
            print(piece, end="", flush=True)
        print()
    except QwenAudioError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
    except KeyboardInterrupt as e:
        if isinstance(e, Terminated):
            raise
        print(flush=True)
        print("interrupted: this reply is dropped; /quit or Ctrl-D leaves", file=sys.stderr, flush=True)
