"""The audio front end against its references.

- openai-whisper: mel filters, log-mel, and `whisper.load_audio`, which is the official loader: ffmpeg decoding to
  16-bit PCM / 32768, the same command line as the official audio.py.
- scipy.signal.resample_poly: resampler quality, measured side by side.
"""

import io
import math
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

from qwenaudio import AudioError
from qwenaudio.core.audio import (
    N_SAMPLES,
    audio_span,
    audio_tokens,
    frames_after_conv,
    load_audio,
    log_mel_spectrogram,
    mel_filters,
    mel_length,
    resample,
)

from .conftest import reference, reference_program


def official_waveform(path):
    """The official loader's output (Qwen-Audio's audio.py and whisper share the ffmpeg command line)."""
    reference_program("ffmpeg")
    return torch.from_numpy(reference("whisper").load_audio(str(path)))


def whisper_log_mel(audio):
    whisper = reference("whisper")
    return whisper.log_mel_spectrogram(whisper.pad_or_trim(audio))


# --- mel filters and log-mel ---------------------------------------------------------------------------------

def test_mel_filters_equal_whisper():
    theirs = reference("whisper").audio.mel_filters("cpu", 80).numpy()
    ours = mel_filters(80)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape == (80, 201)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-7)


def signals():
    rng = np.random.default_rng(0)
    t = np.arange(7 * 16000) / 16000
    return {
        "silence": np.zeros(3 * 16000),
        "noise": 0.1 * rng.standard_normal(5 * 16000),
        "clipping": np.clip(3 * np.sin(2 * np.pi * 440 * t), -1, 1),
        "tones_and_chirp": 0.3 * np.sin(2 * np.pi * (100 + 400 * t) * t) + 0.2 * np.sin(2 * np.pi * 3000 * t),
        "full_30s": 0.05 * rng.standard_normal(N_SAMPLES),
    }


@pytest.mark.parametrize("name", signals())
def test_log_mel_equals_whisper(name):
    audio = torch.from_numpy(signals()[name].astype(np.float32))
    ours = log_mel_spectrogram(audio)
    assert ours.shape == (80, 3000)
    torch.testing.assert_close(ours, whisper_log_mel(audio), rtol=0, atol=1e-5)


def test_log_mel_on_speech_equals_whisper(shared_audio):
    audio = load_audio(shared_audio / "1272-128104-0000.flac")
    torch.testing.assert_close(log_mel_spectrogram(audio), whisper_log_mel(audio), rtol=0, atol=1e-5)


def test_log_mel_batch_equals_each_clip():
    clips = [torch.from_numpy(s.astype(np.float32)) for s in signals().values()][:3]
    batch = torch.stack([torch.nn.functional.pad(c, (0, N_SAMPLES - len(c))) for c in clips])
    mels = log_mel_spectrogram(batch)
    assert mels.shape == (3, 80, 3000)
    for mel, clip in zip(mels, clips):  # the floor is per clip: max over that clip's own padded window
        torch.testing.assert_close(mel, log_mel_spectrogram(clip), rtol=0, atol=1e-6)


def test_over_30_seconds_is_truncated_with_a_warning():
    audio = torch.from_numpy(np.random.default_rng(1).standard_normal(N_SAMPLES + 16000).astype(np.float32))
    with pytest.warns(UserWarning, match="cut to its first 30 s.*long-form transcription"):
        mel = log_mel_spectrogram(audio)
    torch.testing.assert_close(mel, log_mel_spectrogram(audio[:N_SAMPLES]))


# --- real recordings against the official ffmpeg-based loader ---------------------------------------------------

@pytest.mark.parametrize("name", ["1272-128104-0000.flac", "music.wav"])
def test_16khz_recordings_identical_to_official(shared_audio, name):
    ours, official = load_audio(shared_audio / name), official_waveform(shared_audio / name)
    assert torch.equal(ours, official)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # music.wav is 96 s
        torch.testing.assert_close(log_mel_spectrogram(ours), whisper_log_mel(official), rtol=0, atol=1e-5)


# Measured: 4.3e-4, 9.6e-5 and 3.6e-5 mean absolute log-mel difference (different resampling filters and MP3
# decoders); the bound is 1e-3.
@pytest.mark.parametrize("name", ["1089_134686_000007_000004.wav", "es.mp3", "glass-breaking-151256.mp3"])
def test_resampled_recordings_close_to_official(shared_audio, name):
    ours, official = load_audio(shared_audio / name), official_waveform(shared_audio / name)
    assert ours.shape == official.shape
    frames = mel_length(len(official))
    diff = (log_mel_spectrogram(ours) - whisper_log_mel(official))[:, :frames].abs()
    assert diff.mean() < 1e-3


# --- resampler quality against scipy.signal.resample_poly --------------------------------------------------------

RATES = [44100, 48000, 22050, 8000]


def rms_db(y):
    return 20 * np.log10(np.sqrt(np.mean(y**2)) / np.sqrt(0.5) + 1e-30)


def tone(freq, rate, seconds=1.0):
    return np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate).astype(np.float32)


def scipy_resample(x, rate):
    g = math.gcd(rate, 16000)
    return reference("scipy.signal").resample_poly(x, 16000 // g, rate // g)


@pytest.mark.parametrize("rate", RATES)
def test_resampler_passband(rate):
    """Tones up to 0.8 × the lower Nyquist frequency come out within 2e-4 of the ideal sine (scipy: ~2e-3)."""
    nyquist = min(rate, 16000) / 2
    ours_err = scipy_err = 0.0
    for freq in np.linspace(50, 0.8 * nyquist, 25):
        x = tone(freq, rate)
        ours, ref = resample(torch.from_numpy(x), rate).numpy(), scipy_resample(x, rate)
        assert len(ours) == len(ref) == math.ceil(len(x) * 16000 / rate)
        ideal = np.sin(2 * np.pi * freq * np.arange(len(ours)) / 16000)
        inner = slice(800, -800)  # away from the zero-padded edges
        ours_err = max(ours_err, np.abs(ours[inner] - ideal[inner]).max())
        scipy_err = max(scipy_err, np.abs(ref[inner] - ideal[inner]).max())
    assert ours_err < 2e-4 and ours_err < scipy_err


@pytest.mark.parametrize("rate", RATES)
def test_resampler_on_sweeps(rate):
    """A linear sweep from 50 Hz to 0.8 × the lower Nyquist frequency, against the analytic sweep at the output
    times: measured ≤ 4.3e-5 (scipy ~2e-3). Between 0.8 and 0.9 × Nyquist ours attenuates more than scipy (5e-2
    vs 3e-2), as ffmpeg's filter does, since it keeps the 0.97 cut-off with a short kernel."""
    top, seconds = 0.8 * min(rate, 16000) / 2, 2.0
    phase = lambda t: 2 * np.pi * (50 * t + (top - 50) * t**2 / (2 * seconds))  # noqa: E731
    x = np.sin(phase(np.arange(int(rate * seconds)) / rate)).astype(np.float32)
    ours, ref = resample(torch.from_numpy(x), rate).numpy(), scipy_resample(x, rate)
    ideal = np.sin(phase(np.arange(len(ours)) / 16000))
    inner = slice(800, -800)
    ours_err, scipy_err = np.abs(ours[inner] - ideal[inner]).max(), np.abs(ref[inner] - ideal[inner]).max()
    assert ours_err < 1e-4 and ours_err < scipy_err


@pytest.mark.parametrize("rate", [44100, 48000, 22050])
def test_resampler_alias_rejection(rate):
    """Tones above 8 kHz must vanish: > 40 dB down just past Nyquist (8.8 kHz), > 85 dB from 9.5 kHz."""
    for freq, bound in [(8800, -40), (9500, -85), (10000, -85), (min(12000, 0.95 * rate / 2), -85)]:
        x = tone(freq, rate)
        ours, ref = resample(torch.from_numpy(x), rate).numpy(), scipy_resample(x, rate)
        assert rms_db(ours[800:-800]) < bound
        assert rms_db(ours[800:-800]) < rms_db(ref[800:-800])


@pytest.mark.parametrize("rate", RATES)
def test_resampler_on_speech_agrees_with_scipy(shared_audio, rate):
    """Real speech taken to `rate` and back: ours and scipy agree to > 30 dB SNR (they differ only near 8 kHz)."""
    speech, _ = sf.read(shared_audio / "1272-128104-0000.flac", dtype="float32")
    g = math.gcd(rate, 16000)
    at_rate = reference("scipy.signal").resample_poly(speech, rate // g, 16000 // g).astype(np.float32)
    ours, ref = resample(torch.from_numpy(at_rate), rate).numpy(), scipy_resample(at_rate, rate)
    snr = 10 * np.log10(np.sum(ref**2) / np.sum((ours - ref) ** 2))
    assert snr > 30


def test_resampler_shapes():
    x = torch.randn(2, 3, 4410)
    assert resample(x, 44100).shape == (2, 3, 1600)
    assert resample(x, 16000) is x
    torch.testing.assert_close(resample(x, 44100)[1, 2], resample(x[1, 2], 44100))


# --- loading ----------------------------------------------------------------------------------------------------

def test_sources_load_alike(shared_audio):
    path = shared_audio / "1272-128104-0000.flac"
    reference = load_audio(path)
    assert reference.dtype == torch.float32 and reference.shape == (93680,)
    with open(path, "rb") as f:
        assert torch.equal(load_audio(f), reference)
    assert torch.equal(load_audio(path.read_bytes()), reference)
    assert torch.equal(load_audio(str(path)), reference)
    pcm, rate = sf.read(path, dtype="int16")
    assert torch.equal(load_audio(pcm, source_sr=rate), reference)
    assert torch.equal(load_audio(torch.from_numpy(pcm), source_sr=rate), reference)


def test_ogg_vorbis(tmp_path):
    x = 0.3 * np.sin(2 * np.pi * 440 * np.arange(22050) / 22050)
    sf.write(tmp_path / "tone.ogg", x, 22050, format="OGG", subtype="VORBIS")
    loaded = load_audio(tmp_path / "tone.ogg")
    expected = resample(torch.from_numpy(x.astype(np.float32)), 22050)
    assert loaded.shape == (16000,) and (loaded - expected)[1000:-1000].abs().max() < 0.02  # lossy codec


def test_stereo_is_averaged(shared_audio):
    path = shared_audio / "glass-breaking-151256.mp3"
    stereo, rate = sf.read(path, dtype="float32", always_2d=True)
    assert stereo.shape[1] == 2
    expected = load_audio(stereo.mean(axis=1), source_sr=rate)
    assert torch.equal(load_audio(path), expected)
    assert torch.equal(load_audio(stereo.T, source_sr=rate), expected)


@pytest.mark.parametrize("dtype, scale, offset", [(np.int16, 32768, 0), (np.int32, 2**31, 0), (np.uint8, 128, 128)])
def test_integer_pcm_scaling(dtype, scale, offset):
    pcm = np.array([0, 1, -1, 100, -100], dtype=np.int64) * (scale // 128) + offset
    expected = torch.from_numpy((pcm - offset) / scale).float()
    expected = torch.round(expected * 32768) / 32768  # the official loader's 16-bit grid
    assert torch.equal(load_audio(pcm.astype(dtype), source_sr=16000), expected)


def test_float_samples_land_on_16_bit_grid():
    x = np.array([0.1, -0.25, 0.999999, -1.0, 1.5], dtype=np.float64)
    out = load_audio(x, source_sr=16000)
    assert torch.equal(out * 32768, torch.round(out * 32768))
    assert out.max() == 32767 / 32768  # clipped like int16


@pytest.mark.parametrize("source, message", [
    (np.zeros(0, dtype=np.float32), "array: the audio is empty"),
    (np.full(100, np.nan, dtype=np.float32), "contains NaN or infinite samples"),
    (np.array([0.0, np.inf, 0.1]), "contains NaN or infinite samples"),
    (np.zeros((2, 3, 100), dtype=np.float32), r"must be \[samples\] or \[channels, samples\], got shape \(2, 3, 100\)"),
    (np.zeros((1000, 2), dtype=np.float32), r"\(1000, 2\) looks like \[samples, channels\]"),
    (np.zeros(100, dtype=bool), "has dtype bool"),
])
def test_bad_arrays(source, message):
    with pytest.raises(AudioError, match=message):
        load_audio(source, source_sr=16000)


def test_array_needs_its_rate():
    with pytest.raises(AudioError, match=r"needs its sample rate: load_audio\(array, source_sr=...\)"):
        load_audio(np.zeros(1600, dtype=np.float32))
    with pytest.raises(AudioError, match="sample rate must be a positive int, got 0"):
        load_audio(np.zeros(1600, dtype=np.float32), source_sr=0)


def test_bad_files(tmp_path):
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio")
    with pytest.raises(AudioError, match=f"{text}: not a readable audio file"):
        load_audio(text)
    with pytest.raises(AudioError, match="<bytes>: not a readable audio file"):
        load_audio(b"RIFF but not really")
    with pytest.raises(AudioError, match=f"{tmp_path}/missing.flac: no such audio file"):
        load_audio(tmp_path / "missing.flac")
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.int16), 16000)
    with pytest.raises(AudioError, match=f"{empty}: the audio is empty"):
        load_audio(empty)
    buffer = io.BytesIO()
    sf.write(buffer, np.full(800, 0.5), 16000, format="WAV")
    assert load_audio(buffer.getvalue()).shape == (800,)


# --- lengths ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seconds, mel, frames, tokens, span", [
    (1, 100, 50, 25, 27),  # worked by hand from the official process_audio (docs/MODEL.md#lengths)
    (30, 3000, 1500, 750, 752),  # likewise
    (45, 3000, 1500, 750, 752),  # longer clips are truncated to 30 s
    (5.86, 586, 293, 146, 148),  # (293 - 2) // 2 + 1 = 146
])
def test_lengths(seconds, mel, frames, tokens, span):
    samples = round(seconds * 16000)
    assert mel_length(samples) == mel
    assert frames_after_conv(mel) == frames
    assert audio_tokens(samples) == tokens
    assert audio_span(samples) == span


def test_clips_under_one_token_are_rejected():
    assert audio_span(480) == 3  # 3 mel frames -> 2 conv frames -> 1 audio token
    for samples in (479, 100, 0):
        with pytest.raises(AudioError, match=f"a clip of {samples} samples is too short: one audio token needs"):
            audio_span(samples)


def test_bad_rates_and_paths(tmp_path):
    with pytest.raises(AudioError, match="sr must be a positive int, got 0"):
        load_audio(np.zeros(1600, dtype=np.float32), sr=0, source_sr=16000)
    with pytest.raises(AudioError, match=f"{tmp_path}: is a directory, not an audio file"):
        load_audio(tmp_path)


def test_file_errors_from_resampling_name_the_file(tmp_path):
    odd = tmp_path / "odd.wav"
    sf.write(odd, np.zeros(8001, dtype=np.float32), 8001)  # a header rate whose exact ratio to 16 kHz is 16000/8001
    with pytest.raises(AudioError, match=f"^{odd}: cannot resample 8001 Hz audio to 16000 Hz"):
        load_audio(odd)


def test_huge_finite_stereo_samples_average_without_overflow():
    loud = np.full((2, 1600), 3e38, dtype=np.float32)  # finite, but their float32 sum is not
    assert torch.equal(load_audio(loud, source_sr=16000), torch.full((1600,), 32767 / 32768))
