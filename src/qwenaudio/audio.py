"""Audio front end constants, clip-length arithmetic and the mel filterbank (SPEC §5).

Qwen-Audio hears audio the way Whisper does: 16 kHz mono, at most 30 s, as an 80-bin log-mel spectrogram with a
10 ms hop. The lengths below decide how many `<audio>` pad tokens a clip occupies in the prompt.
"""

from __future__ import annotations

import numpy as np

from .errors import AudioError

SAMPLE_RATE = 16_000
N_FFT = 400  # 25 ms window
HOP_LENGTH = 160  # 10 ms hop: 100 mel frames per second
CHUNK_LENGTH = 30  # seconds the encoder sees at once
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480,000: longer clips are truncated, as the official code does


def mel_length(num_samples: int) -> int:
    """Mel frames a clip contributes (before padding to 30 s): L // 160 with L capped at 30 s."""
    return min(num_samples, N_SAMPLES) // HOP_LENGTH


def frames_after_conv(mel_len: int) -> int:
    """Frames after the conv stem, whose second convolution has stride 2."""
    return (mel_len - 1) // 2 + 1


def audio_tokens(num_samples: int) -> int:
    """Encoder outputs a clip becomes after the stride-2 average pool."""
    return (frames_after_conv(mel_length(num_samples)) - 2) // 2 + 1


def audio_span(num_samples: int) -> int:
    """Prompt tokens a clip occupies: its audio tokens plus the BOS and EOS rows (1 s -> 27, 30 s -> 752)."""
    tokens = audio_tokens(num_samples)
    if tokens < 1:
        raise AudioError(
            f"a clip of {num_samples} samples is too short: one audio token needs at least {3 * HOP_LENGTH} samples "
            f"(3 mel frames) at {SAMPLE_RATE} Hz"
        )
    return tokens + 2


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (librosa's default): linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    linear = f / (200.0 / 3)
    log = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(f >= 1000.0, log, linear)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    linear = m * (200.0 / 3)
    log = 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0))
    return np.where(m >= 15.0, log, linear)


def mel_filters(n_mels: int = 80, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Triangular Slaney-normalised mel filters, float32 [n_mels, n_fft // 2 + 1].

    The same matrix as librosa.filters.mel(sr, n_fft, n_mels) and the checkpoints' `mel_filters.npz`: triangles
    evenly spaced on the mel scale from 0 Hz to Nyquist, each scaled to unit area so loud and quiet bands weigh alike.
    """
    fft_freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    mel_edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), n_mels + 2))
    widths = np.diff(mel_edges)
    ramps = mel_edges[:, None] - fft_freqs[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (mel_edges[2:] - mel_edges[:-2]))[:, None]
    return weights.astype(np.float32)
