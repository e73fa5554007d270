"""Every exception qwenaudio raises on bad input, in one place.

Each one says which file, tensor, field or argument is at fault, so that a user with a 16 GB checkpoint learns what to
fix from the message alone. They subclass `ValueError` (or `OSError` for files, `RuntimeError` for a metric that cannot
run) so callers that already catch the built-in kinds keep working.
"""


class QwenAudioError(Exception):
    """Base class of every error raised by qwenaudio on bad input."""


class ConfigError(QwenAudioError, ValueError):
    """A `config.json` field is missing, has the wrong type, or holds a value we cannot run."""


class CheckpointError(QwenAudioError, OSError):
    """A checkpoint directory or safetensors file is missing, truncated, or holds the wrong tensors."""


class TokenizerError(QwenAudioError, ValueError):
    """The vocabulary file is missing or corrupt, or text / ids cannot be tokenized as asked."""


class AudioTagError(TokenizerError):
    """Text whose `<audio>` regions are malformed. `problem` says how: "nested" (an `<audio>` inside a region),
    "unopened" (a `</audio>` outside one) or "unclosed"; `regions` are the regions found before it, so that a caller
    with its own messages reports the first problem in the text."""

    def __init__(self, problem: str, message: str, regions: list[str]):
        super().__init__(message)
        self.problem, self.regions = problem, regions


class AudioError(QwenAudioError, ValueError):
    """Audio that cannot be turned into model input: unreadable, empty, non-finite, or too short."""


class InputError(QwenAudioError, ValueError):
    """Arguments and model inputs that do not fit: an unknown dtype or device, token ids outside the vocabulary,
    `<audio>` regions that do not match the encoded clips, positions past the KV cache, or a cached prefix that
    cannot be reused."""


class DownloadError(QwenAudioError, OSError):
    """Checkpoint files could not be fetched (no `huggingface_hub`, offline, or an incomplete download)."""


class MetricUnavailableError(QwenAudioError, RuntimeError):
    """An evaluation metric needs a package or program that is not installed (sacreBLEU, pycocoevalcap, Java); the
    message says what to install."""


class OutputError(QwenAudioError, OSError):
    """An output could not be written (a full disk, a read-only directory), or would replace one of the command's
    own inputs or a file it did not write; nothing half-written is left under a final name."""


class TrainingError(QwenAudioError, RuntimeError):
    """Training cannot go on: a loss that is not finite (the message names the step and the examples)."""
