"""Two turns of Qwen-Audio-Chat, a clip per turn: `Chat.ask` returns a whole reply, `Chat.stream` yields one as it
is generated. The second turn sees the first (both clips and the first reply) through the chat's history.

No weights yet? A tiny random checkpoint runs the same code (its replies are gibberish):
    python -c "from qwenaudio.testing import make_tiny_checkpoint as m; m('/tmp/tiny-chat', chat=True)"
    python examples/chat.py --model /tmp/tiny-chat --max-new-tokens 16
"""

import argparse

import qwenaudio
from qwenaudio.chat import Chat


def main() -> None:
    parser = argparse.ArgumentParser(description="Ask Qwen-Audio-Chat about two clips, one turn each.")
    parser.add_argument("speech", nargs="?", default="../shared/audio/1272-128104-0000.flac")
    parser.add_argument("sound", nargs="?", default="../shared/audio/glass-breaking-151256.mp3")
    parser.add_argument("--model", default="Qwen/Qwen-Audio-Chat", help="checkpoint directory or repo id")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="the longest reply, in tokens")
    args = parser.parse_args()

    chat = Chat(qwenaudio.load(args.model))  # a repo id: from the HF cache, downloaded there once
    first = [{"audio": args.speech}, "What does the speaker say?"]
    print(f"> {first[1]}\n{chat.ask(first, max_new_tokens=args.max_new_tokens)}")
    second = [{"audio": args.sound}, "And what happens in this clip?"]
    print(f"> {second[1]}")
    for piece in chat.stream(second, max_new_tokens=args.max_new_tokens):
        print(piece, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
