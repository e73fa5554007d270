"""qwenaudio: a pure-PyTorch re-implementation of Qwen-Audio (and Qwen-Audio-Chat) and Qwen2-Audio (and
Qwen2-Audio-Instruct) that loads the official checkpoints."""

from .core.audio import load_audio, log_mel_spectrogram
from .core.checkpoint import load_checkpoint, save_checkpoint, tensor_shapes
from .core.config import AudioConfig, GenerationConfig, QwenAudioConfig
from .core.decoder import Decoder
from .core.encoder import AudioEncoder
from .core.errors import (
    AudioError,
    CheckpointError,
    ConfigError,
    DownloadError,
    InputError,
    MetricUnavailableError,
    OutputError,
    QwenAudioError,
    TokenizerError,
)
from .core.families import read_config
from .core.model import QwenAudio, load_decoder, load_encoder
from .core.qwen2_audio import Qwen2AudioConfig, Qwen2AudioEncoder, Qwen2Decoder
from .core.qwen2_tokenizer import Qwen2Tokenizer
from .core.tokenizer import Tokenizer
from .hub import download, load

__version__ = "0.1.0"

__all__ = [
    "AudioConfig", "AudioEncoder", "AudioError", "CheckpointError", "ConfigError", "Decoder", "DownloadError",
    "GenerationConfig", "InputError", "MetricUnavailableError", "OutputError", "Qwen2AudioConfig", "Qwen2AudioEncoder",
    "Qwen2Decoder", "Qwen2Tokenizer", "QwenAudio", "QwenAudioConfig", "QwenAudioError", "Tokenizer", "TokenizerError",
    "download", "load", "load_audio", "load_checkpoint", "load_decoder", "load_encoder", "log_mel_spectrogram",
    "read_config", "save_checkpoint", "tensor_shapes",
]
