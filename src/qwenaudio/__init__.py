"""qwenaudio: a pure-PyTorch re-implementation of Qwen-Audio and Qwen-Audio-Chat that loads the official checkpoints."""

from .audio import load_audio, log_mel_spectrogram
from .checkpoint import load_checkpoint, save_checkpoint, tensor_shapes
from .config import AudioConfig, GenerationConfig, QwenAudioConfig
from .decoder import Decoder
from .encoder import AudioEncoder
from .errors import (
    AudioError, CheckpointError, ConfigError, DownloadError, InputError, QwenAudioError, TokenizerError,
)
from .hub import download
from .model import QwenAudio, load, load_decoder, load_encoder
from .tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "AudioConfig", "AudioEncoder", "AudioError", "CheckpointError", "ConfigError", "Decoder", "DownloadError",
    "GenerationConfig", "InputError", "QwenAudio", "QwenAudioConfig", "QwenAudioError", "Tokenizer",
    "TokenizerError", "download", "load", "load_audio", "load_checkpoint", "load_decoder", "load_encoder",
    "log_mel_spectrogram", "save_checkpoint", "tensor_shapes",
]
