"""Front-end pieces that exist so far: the mel filterbank (against openai-whisper's mel_80) and clip lengths."""

import numpy as np
import pytest

from qwenaudio import AudioError
from qwenaudio.audio import audio_span, audio_tokens, frames_after_conv, mel_filters, mel_length


def test_mel_filters_equal_whisper():
    import whisper.audio

    reference = whisper.audio.mel_filters("cpu", 80).numpy()
    ours = mel_filters(80)
    assert ours.dtype == np.float32 and ours.shape == reference.shape == (80, 201)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-7)


@pytest.mark.parametrize("seconds, mel, frames, tokens, span", [
    (1, 100, 50, 25, 27),  # SPEC §5
    (30, 3000, 1500, 750, 752),  # SPEC §5
    (45, 3000, 1500, 750, 752),  # longer clips are truncated to 30 s
    (5.86, 586, 293, 146, 148),  # (293 - 2) // 2 + 1 = 146
])
def test_lengths(seconds, mel, frames, tokens, span):
    samples = round(seconds * 16000)
    assert mel_length(samples) == mel
    assert frames_after_conv(mel) == frames
    assert audio_tokens(samples) == tokens
    assert audio_span(samples) == span


def test_shortest_clip():
    assert audio_span(480) == 3  # 3 mel frames -> 2 conv frames -> 1 audio token
    with pytest.raises(AudioError, match="a clip of 479 samples is too short: one audio token needs at least 480"):
        audio_span(479)
