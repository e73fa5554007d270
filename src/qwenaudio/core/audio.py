"""Audio in, log-mel out: loading, resampling to 16 kHz, and the Whisper front end (docs/MODEL.md#front-end).

Qwen-Audio hears audio the way Whisper does: 16 kHz mono, at most 30 s, as an 80-bin log-mel spectrogram with a
10 ms hop. The official code decodes with the ffmpeg CLI; here soundfile decodes (wav, flac, ogg, mp3) and a
windowed-sinc resampler in torch converts the rate, so no external program is needed. The clip lengths below decide
how many `<audio>` pad tokens a clip occupies in the prompt.

Qwen2-Audio hears the same front end with 128 mel bins (Whisper-large-v3's): `log_mel_spectrogram(audio, 128)`
equals transformers' WhisperFeatureExtractor(feature_size=128). Only its count of real frames differs (ceiling, not
floor), which `feature_frames` and `qwen2_audio_tokens` give.
"""

from __future__ import annotations

import io
import math
import warnings
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import torch

from .checks import expect, shown
from .errors import AudioError

SAMPLE_RATE = 16_000
N_FFT = 400  # 25 ms window
HOP_LENGTH = 160  # 10 ms hop: 100 mel frames per second
CHUNK_LENGTH = 30  # seconds the encoder sees at once
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480,000: longer clips are truncated, as the official code does
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3,000 mel frames per 30 s window
# Limits of `resample`, so that a corrupt header's sample rate cannot ask for more memory than the machine has: the
# filter bank of a common rate stays far below MAX_FILTER_BANK (44,056 Hz, the worst, needs 11 M coefficients), and
# no real recording is upsampled more than MAX_UPSAMPLING times (1 kHz -> 16 kHz).
MAX_FILTER_BANK = 2**24
MAX_UPSAMPLING = 16

AudioSource = str | Path | bytes | BinaryIO | np.ndarray | torch.Tensor


def mel_length(num_samples: int) -> int:
    """Mel frames a clip contributes (before padding to 30 s): L // 160 with L capped at 30 s."""
    return min(num_samples, N_SAMPLES) // HOP_LENGTH


def frames_after_conv(mel_len: int) -> int:
    """Frames after the conv stem, whose second convolution has stride 2."""
    return (mel_len - 1) // 2 + 1


def audio_tokens(num_samples: int) -> int:
    """Encoder outputs a clip becomes after the stride-2 average pool."""
    return (frames_after_conv(mel_length(num_samples)) - 2) // 2 + 1


MIN_SAMPLES = 3 * HOP_LENGTH  # 3 mel frames -> 2 conv frames -> 1 audio token: the shortest clip the model hears


def audio_span(num_samples: int) -> int:
    """Prompt tokens a clip occupies: its audio tokens plus the BOS and EOS rows (1 s -> 27, 30 s -> 752)."""
    if num_samples < MIN_SAMPLES:
        raise AudioError(_too_short(f"a clip of {num_samples} samples"))
    return audio_tokens(num_samples) + 2


def _too_short(what: str, min_samples: int = MIN_SAMPLES) -> str:
    return (f"{what} is too short: one audio token needs at least {min_samples} samples (3 mel frames, "
            f"{1000 * min_samples // SAMPLE_RATE} ms) at {SAMPLE_RATE} Hz")


def feature_frames(num_samples: int) -> int:
    """Mel frames Qwen2-Audio counts as real for a clip: ceil(L / 160) with L capped at 30 s (161 samples -> 2).

    Qwen2-Audio's processor pads every clip to 30 s and marks the real samples; transformers' WhisperFeatureExtractor
    then keeps every 160th entry of that sample mask, so frame k is real when its first sample (160·k) is in the clip.
    That is a ceiling, where Qwen-Audio's `mel_length` is a floor: the two agree on whole hops only.
    """
    return -(-min(num_samples, N_SAMPLES) // HOP_LENGTH)


QWEN2_MIN_SAMPLES = 2 * HOP_LENGTH + 1  # 321 samples -> 3 frames -> 2 conv frames -> 1 audio position


def qwen2_audio_tokens(num_samples: int) -> int:
    """`<|AUDIO|>` positions a clip takes in a Qwen2-Audio prompt (1 s -> 25, 30 s -> 750).

    transformers' Qwen2AudioProcessor repeats `<|AUDIO|>` once per encoder output of the clip: its real frames
    (`feature_frames`) through the stride-2 conv and the stride-2 average pool; the model takes as many outputs per
    clip from the same mask, and refuses a prompt whose count differs. Clips under `QWEN2_MIN_SAMPLES` give none,
    so they raise `AudioError`, as `audio_span` does for Qwen-Audio.
    """
    if num_samples < QWEN2_MIN_SAMPLES:
        raise AudioError(_too_short(f"a clip of {num_samples} samples", QWEN2_MIN_SAMPLES))
    return (frames_after_conv(feature_frames(num_samples)) - 2) // 2 + 1


def as_waveform(source: AudioSource, name: str, min_samples: int) -> torch.Tensor:
    """A clip as the model takes it: a 1-D float tensor is a 16 kHz waveform already, anything else goes through
    `load_audio`. Either way it must be finite and long enough for one audio token (`min_samples`: the model's
    encoder says how many, `encoder.min_samples`; required, as the families differ); `name` (a path, "clip 2") starts every
    error, so a bad clip in a batch is named, not blamed on the batch."""
    _check_source(source, f"{name}: ")
    if isinstance(source, torch.Tensor):
        if source.ndim != 1:
            raise AudioError(f"{name}: a waveform tensor must be 1-D [samples] at {SAMPLE_RATE // 1000} kHz, got "
                             f"shape {tuple(source.shape)}; load_audio(x, source_sr=RATE) averages channels and "
                             "resamples")
        if not source.is_floating_point():
            raise AudioError(f"{name}: a waveform tensor must hold floats in [-1, 1], got {source.dtype}")
        if source.numel() == 0:
            raise AudioError(f"{name}: the waveform is empty")
        if not torch.isfinite(source).all():
            raise AudioError(f"{name}: the waveform contains NaN or infinite samples")
        wave = source
    else:
        wave = load_audio(source, name=name)
    if len(wave) < min_samples:
        raise AudioError(_too_short(f"{name}: {len(wave)} samples ({len(wave) / SAMPLE_RATE:.3f} s)", min_samples))
    return wave


def _check_source(source: object, prefix: str = "") -> None:
    """Refuse what no loader reads; an int above all, which soundfile would take for a file descriptor (0: stdin)."""
    readable = isinstance(source, (str, Path, bytes, bytearray, np.ndarray, torch.Tensor)) or hasattr(source, "read")
    if not readable or isinstance(source, bool):
        raise AudioError(f"{prefix}audio source must be a path, the bytes of a file, a binary file object or an array "
                         f"of samples, got {shown(source)}")


def source_name(source: AudioSource, index: int) -> str:
    """How errors name a clip: its path when it has one, else its place in the batch."""
    return str(source) if isinstance(source, (str, Path)) else f"clip {index}"


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


def load_audio(source: AudioSource, sr: int = SAMPLE_RATE, *, source_sr: int | None = None,
               name: str | None = None) -> torch.Tensor:
    """Decode `source` to a mono float32 waveform at `sr` Hz, shape [samples], as the official loader hears it.

    `source` is a file path, the bytes of a file, a binary file object, or an array / tensor of samples, which
    needs `source_sr` (its sample rate). Arrays are [samples] or [channels, samples]. Channels are averaged (as
    ffmpeg's `-ac 1` does) and the rate converted; then samples are rounded to the 16-bit grid, because the
    official loader has ffmpeg emit 16-bit PCM and divides by 32768. A 16-bit file at 16 kHz therefore loads
    bit-identically to the official path. Errors start with `name` (default: the path, `<bytes>`, `array`): the
    bytes of an upload have no name of their own.
    """
    if not isinstance(sr, int) or isinstance(sr, bool) or sr <= 0:
        raise AudioError(f"sr must be a positive int, got {sr!r}")
    _check_source(source)
    if isinstance(source, (np.ndarray, torch.Tensor)):
        if source_sr is None:
            raise AudioError("an array of samples needs its sample rate: load_audio(array, source_sr=...)")
        name, samples, rate = name or "array", _array_to_float(source), source_sr
    else:
        name = name or (str(source) if isinstance(source, (str, Path)) else f"<{type(source).__name__}>")
        samples, rate = _decode(source, name)
    if samples.size == 0:
        raise AudioError(f"{name}: the audio is empty")
    if not np.isfinite(samples).all():
        raise AudioError(f"{name}: the audio contains NaN or infinite samples")
    if samples.ndim == 2:
        samples = samples.mean(axis=0, dtype=np.float64)  # huge but finite samples must not overflow in the sum
    if not isinstance(rate, int) or rate <= 0:
        raise AudioError(f"{name}: sample rate must be a positive int, got {rate!r}")
    try:
        audio = resample(torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)), rate, sr)
    except AudioError as e:
        raise AudioError(f"{name}: {e}") from None
    return torch.round(audio * 32768).clamp(-32768, 32767) / 32768


def _decode(source: str | Path | bytes | bytearray | BinaryIO, name: str) -> tuple[np.ndarray, int]:
    """Decode a file with soundfile; returns [channels, samples] float32 and the rate."""
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        raise AudioError(f"{name}: is a directory, not an audio file")
    if isinstance(source, (str, Path)) and not Path(source).is_file():
        raise AudioError(f"{name}: no such audio file")
    try:
        data, rate = sf.read(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source,
                             dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        # soundfile's message names a file object by its repr (an address); its reason alone says what went wrong
        reason = e if isinstance(source, (str, Path)) else getattr(e, "error_string", e)
        raise AudioError(f"{name}: not a readable audio file ({reason})") from None
    return data.T, rate


def _array_to_float(array: np.ndarray | torch.Tensor) -> np.ndarray:
    """Samples as float32 [samples] or [channels, samples]; integer PCM scaled by its full-scale value."""
    a = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if a.ndim not in (1, 2):
        raise AudioError(f"audio array must be [samples] or [channels, samples], got shape {tuple(a.shape)}")
    if a.ndim == 2 and a.shape[0] > a.shape[1]:
        raise AudioError(
            f"audio array of shape {tuple(a.shape)} looks like [samples, channels]; pass [channels, samples] "
            "(transpose it)"
        )
    if a.dtype == np.uint8:  # 8-bit PCM is unsigned, centred on 128
        return (a.astype(np.float32) - 128) / 128
    if np.issubdtype(a.dtype, np.signedinteger):
        return (a / float(-np.iinfo(a.dtype).min)).astype(np.float32)
    if not np.issubdtype(a.dtype, np.floating):
        raise AudioError(f"audio array has dtype {a.dtype}; expected float or integer PCM samples")
    return a.astype(np.float32)


def resample(audio: torch.Tensor, orig_sr: int, new_sr: int = SAMPLE_RATE, *, zero_crossings: int = 16,
             rolloff: float = 0.97, beta: float = 9.0) -> torch.Tensor:
    """Band-limited resampling of [..., samples] from `orig_sr` to `new_sr` Hz (polyphase windowed sinc).

    With `up / down` the reduced rate ratio, output sample j sits at input time j·down/up. Those times fall on `up`
    distinct fractional offsets, so one strided convolution with `up` kernels (one per offset) computes them all.
    Each kernel is a low-pass sinc at `rolloff` × the lower Nyquist frequency, `zero_crossings` lobes each side,
    under a Kaiser window. The defaults are those of ffmpeg's resampler, which the official loader uses, so the
    model hears nearly what it hears there; they reject aliases by > 90 dB from 1.19 × the new Nyquist frequency.
    Output length is ceil(samples·up/down). Ratios past `MAX_UPSAMPLING` or `MAX_FILTER_BANK` raise `AudioError`.
    """
    g = math.gcd(orig_sr, new_sr)
    up, down = new_sr // g, orig_sr // g
    if up == down:
        return audio
    if up > MAX_UPSAMPLING * down:
        raise AudioError(f"cannot resample {orig_sr} Hz audio to {new_sr} Hz: upsampling by more than "
                         f"{MAX_UPSAMPLING}x is refused (such a rate comes from a corrupt header, not a recording)")
    cutoff = 0.5 * rolloff * min(1.0, up / down)  # cycles per input sample
    half_width = zero_crossings / (2 * cutoff)  # window half-length in input samples
    lo = -math.ceil(half_width)
    hi = math.ceil(half_width + (up - 1) * down / up)
    if up * (hi - lo + 1) > MAX_FILTER_BANK:
        raise AudioError(
            f"cannot resample {orig_sr} Hz audio to {new_sr} Hz: the exact ratio {up}/{down} needs {up} filters of "
            f"{hi - lo + 1} taps; convert it to {new_sr} Hz first (e.g. ffmpeg -i IN -ar {new_sr} OUT.wav)"
        )
    offsets = torch.arange(up, dtype=torch.float64)[:, None] * down / up  # [up, 1]
    t = offsets - torch.arange(lo, hi + 1, dtype=torch.float64)[None, :]  # [up, taps]: output time − input time
    window = torch.special.i0(beta * torch.sqrt((1 - (t / half_width) ** 2).clamp(min=0))) / torch.special.i0(
        torch.tensor(beta, dtype=torch.float64))
    kernels = (2 * cutoff * torch.sinc(2 * cutoff * t) * window * (t.abs() <= half_width)).to(audio.dtype)

    n = audio.shape[-1]
    n_out = math.ceil(n * up / down)
    per_phase = math.ceil(n_out / up)
    x = audio.reshape(-1, 1, n)
    right = max(0, (per_phase - 1) * down + hi - (n - 1))
    x = torch.nn.functional.pad(x, (-lo, right))
    y = torch.nn.functional.conv1d(x, kernels.to(x.device)[:, None, :], stride=down)  # [B, up, per_phase]
    y = y[..., :per_phase].transpose(1, 2).reshape(x.shape[0], -1)[:, :n_out]
    return y.reshape(*audio.shape[:-1], n_out)


def pad_or_trim(audio: torch.Tensor, length: int = N_SAMPLES) -> torch.Tensor:
    """Zero-pad or cut [..., samples] to exactly `length` samples (30 s)."""
    n = audio.shape[-1]
    if n > length:
        return audio[..., :length]
    return torch.nn.functional.pad(audio, (0, length - n))


@lru_cache(maxsize=None)
def _mel_filters_on(device: torch.device, n_mels: int) -> torch.Tensor:
    return torch.from_numpy(mel_filters(n_mels)).to(device)


def log_mel_spectrogram(audio: torch.Tensor, n_mels: int = 80) -> torch.Tensor:
    """Whisper's log-mel of 16 kHz audio, [..., samples] -> [..., n_mels, 3000], as the official front end.

    Each clip is padded (or cut) to 30 s first, so the floor of (max − 8) in log10 units is taken over the whole
    padded window, and the STFT's last frame is dropped (3001 -> 3000). Clips longer than 30 s are truncated with
    a warning, as the official model does.
    """
    expect(audio, torch.Tensor, "audio", "a torch.Tensor of 16 kHz samples [..., samples] (load_audio gives one)",
           AudioError)
    if audio.shape[-1] > N_SAMPLES:
        warnings.warn(
            f"audio of {audio.shape[-1] / SAMPLE_RATE:.1f} s is cut to its first 30 s, as the official model does; "
            "split longer recordings into windows of at most 30 s (long-form transcription)",
            stacklevel=2,
        )
    audio = pad_or_trim(audio.float())
    batch = audio.shape[:-1]
    window = torch.hann_window(N_FFT, device=audio.device)
    stft = torch.stft(audio.reshape(-1, N_SAMPLES), N_FFT, HOP_LENGTH, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2
    mel = _mel_filters_on(audio.device, n_mels) @ power
    log = mel.clamp(min=1e-10).log10()
    log = torch.maximum(log, log.amax(dim=(-2, -1), keepdim=True) - 8.0)
    return ((log + 4.0) / 4.0).reshape(*batch, n_mels, N_FRAMES)
