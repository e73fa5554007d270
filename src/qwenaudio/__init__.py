"""qwenaudio: a pure-PyTorch re-implementation of Qwen-Audio and Qwen-Audio-Chat that loads the official checkpoints."""

from .checkpoint import load_checkpoint, save_checkpoint, tensor_shapes
from .config import AudioConfig, QwenAudioConfig
from .errors import AudioError, CheckpointError, ConfigError, DownloadError, QwenAudioError, TokenizerError
from .hub import download
from .tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "AudioConfig", "AudioError", "CheckpointError", "ConfigError", "DownloadError", "QwenAudioConfig",
    "QwenAudioError", "Tokenizer", "TokenizerError", "download", "load_checkpoint", "save_checkpoint",
    "tensor_shapes",
]
