"""Long-form audio: where windows are cut, and that stitching keeps every word exactly once at its absolute time.

Recordings are built here: real speech (the LibriSpeech clip from ../shared/audio) or noise bursts standing for
words, joined with silences into minutes of audio. A stubbed recogniser knows every word's true time and returns,
for each window it is given, the words lying wholly inside that window, timed from the window's start, as a
perfect model would; stitching must then give back the ground truth.
"""

import numpy as np
import pytest
import torch

import qwenaudio
from qwenaudio import load_audio, tasks
from qwenaudio.core.audio import SAMPLE_RATE
from qwenaudio.longform import Window, plan_windows, stitch_texts, stitch_words, transcribe_long
from qwenaudio.subtitles import Word

SR = SAMPLE_RATE


def bursts(plan: list[tuple[float, float]], total: float, seed: int = 0, floor: float = 0.0) -> torch.Tensor:
    """Noise bursts (words) at the (start, end) times of `plan` in `total` seconds; `floor` adds background noise."""
    rng = np.random.default_rng(seed)
    audio = floor * rng.standard_normal(int(total * SR))
    for start, end in plan:
        a, b = int(start * SR), int(end * SR)
        audio[a:b] += 0.3 * rng.standard_normal(b - a) * np.hanning(b - a)
    return torch.from_numpy(audio.astype(np.float32))


def speech_plan(seconds: float, seed: int, pause_every: float = 9.0) -> list[Word]:
    """Words of 0.2-0.6 s with 0.05-0.15 s gaps (too short for a cut to prefer) and a 0.8 s pause every
    `pause_every` seconds."""
    rng = np.random.default_rng(seed)
    words, t, next_pause = [], 0.3, pause_every
    while t < seconds - 1:
        length = rng.uniform(0.2, 0.6)
        words.append(Word(f"w{len(words)}", round(t, 3), round(t + length, 3)))
        t += length + rng.uniform(0.05, 0.15)
        if t > next_pause:
            t, next_pause = t + 0.8, next_pause + pause_every
    return words


def perfect_recognizer(audio: torch.Tensor, truth: list[Word], timed: bool):
    """Returns each window's fully contained words; finds the window by matching its samples in `audio`."""
    windows = iter(plan_windows(audio))

    def recognize(clips):
        out = []
        for clip in clips:
            w = next(windows)
            assert torch.equal(clip, audio[w.start : w.end])
            t0, t1 = w.start / SR, w.end / SR
            inside = [Word(x.text, x.start - t0, x.end - t0) for x in truth if x.start >= t0 and x.end <= t1]
            out.append(inside if timed else " ".join(x.text for x in inside))
        return out

    return recognize


def gaps(truth: list[Word]) -> list[tuple[float, float]]:
    return [(a.end, b.start) for a, b in zip(truth, truth[1:])]


def test_short_audio_is_one_window():
    assert plan_windows(torch.zeros(SR * 30)) == [Window(0, SR * 30, SR * 30, True)]


@pytest.mark.parametrize("seconds", [120, 300])
def test_windows_cover_everything_within_30_s_and_cut_in_pauses(seconds):
    truth = speech_plan(seconds, seed=seconds)
    audio = bursts([(w.start, w.end) for w in truth], seconds)
    windows = plan_windows(audio)
    assert windows[0].start == 0 and windows[-1].end == len(audio)
    pauses = [g for g in gaps(truth) if g[1] - g[0] > 0.5]
    for a, b in zip(windows, windows[1:]):
        assert a.end - a.start <= 30 * SR
        assert b.start == a.seam - SR // 2 and a.end == a.seam + SR // 2  # one second of overlap around the cut
        cut = a.seam / SR
        assert a.silent_seam and any(lo + 0.1 <= cut <= hi - 0.1 for lo, hi in pauses), cut  # inside a pause


@pytest.mark.parametrize("timed", [True, False])
def test_stitching_keeps_every_word_once(timed):
    seconds = 150
    truth = speech_plan(seconds, seed=7)
    audio = bursts([(w.start, w.end) for w in truth], seconds)
    segments = transcribe_long(audio, perfect_recognizer(audio, truth, timed), timed=timed, batch_size=3)
    words = [w for s in segments for w in s.words] if timed else " ".join(s.text for s in segments).split()
    if timed:
        assert [w.text for w in words] == [w.text for w in truth]
        assert all(abs(a.start - b.start) < 1e-6 and abs(a.end - b.end) < 1e-6 for a, b in zip(words, truth))
    else:
        assert words == [w.text for w in truth]
    assert [s.end for s in segments[:-1]] == [s.start for s in segments[1:]]  # segments tile the recording


@pytest.mark.parametrize("timed", [True, False])
def test_without_pauses_the_overlap_still_gives_each_word_once(timed):
    """Speech with no gap over 0.15 s over loud background noise: cuts go through words, and the words heard in
    both windows' overlap are kept once."""
    seconds = 100
    truth = speech_plan(seconds, seed=3, pause_every=1e9)
    audio = bursts([(w.start, w.end) for w in truth], seconds, floor=0.2)
    windows = plan_windows(audio)
    assert len(windows) == 4 and not any(w.silent_seam for w in windows[:-1])
    segments = transcribe_long(audio, perfect_recognizer(audio, truth, timed), timed=timed)
    words = [w.text for s in segments for w in s.words] if timed else " ".join(s.text for s in segments).split()
    assert words == [w.text for w in truth]


def test_text_seams_in_silence_are_joined_as_they_are():
    """A repeated word across a silent seam is two words, not one heard twice."""
    windows = [Window(0, 10, 5, True), Window(4, 20, 20, True)]
    assert " ".join(s.text for s in stitch_texts(windows, ["yes it is", "is it"])) == "yes it is is it"
    through_speech = [Window(0, 10, 5, False), Window(4, 20, 20, True)]
    assert " ".join(s.text for s in stitch_texts(through_speech, ["yes it is", "it Is, so"])) == "yes it is so"
    # Chinese has no spaces: the characters heard twice are found one by one.
    chinese = stitch_texts(through_speech, ["我们今天讨论音频", "讨论音频模型"])
    assert [s.text for s in chinese] == ["我们今天讨论音频", "模型"]


def test_real_speech_joined_with_silences_is_cut_in_the_silences(shared_audio):
    """A LibriSpeech utterance (5.86 s) repeated with 1.5 s of quiet noise between copies into 3 minutes: every
    cut, with the overlap around it, lies between the voiced parts of two copies."""
    speech = load_audio(shared_audio / "1272-128104-0000.flac")
    level = 20 * torch.log10(speech[: len(speech) // 320 * 320].reshape(-1, 320).abs().amax(-1) + 1e-9)  # dBFS
    voiced = (level > level.max() - 30).nonzero().flatten()
    voice_from, voice_to = int(voiced[0]) * 320, (int(voiced[-1]) + 1) * 320  # the clip's own leading/trailing hush
    silence = 0.001 * torch.randn(int(1.5 * SR), generator=torch.Generator().manual_seed(0))
    pieces, quiet, t = [], [], 0
    while t < 180 * SR:
        pieces += [speech, silence]
        quiet.append((t + voice_to, t + len(speech) + len(silence) + voice_from))
        t += len(speech) + len(silence)
    audio = torch.cat(pieces)
    windows = plan_windows(audio)
    assert len(windows) >= len(audio) / (30 * SR) and all(w.end - w.start <= 30 * SR for w in windows)
    for w in windows[:-1]:
        assert w.silent_seam and any(a <= w.seam - SR // 2 and w.seam + SR // 2 <= b for a, b in quiet), w


@pytest.mark.parametrize("timestamps", [False, True])
def test_transcribe_takes_long_audio_through_windows(tiny_ckpt, timestamps):
    """A 70 s recording through `tasks.transcribe` equals its windows transcribed as one batch and stitched, with
    word times moved to the recording's clock."""
    model = qwenaudio.load(tiny_ckpt, dtype=torch.float32, progress=False)
    truth = speech_plan(70, seed=11)
    audio = bursts([(w.start, w.end) for w in truth], 70)
    windows = plan_windows(audio)
    assert len(windows) == 3
    pieces = tasks.transcribe(model, [audio[w.start : w.end] for w in windows], timestamps=timestamps,
                              max_new_tokens=12)
    whole = tasks.transcribe(model, audio, timestamps=timestamps, max_new_tokens=12)
    if timestamps:
        expected = [w for s in stitch_words(windows, pieces) for w in s.words]
        assert whole == expected and whole  # the clock offsets themselves are checked with the stub above
    else:
        assert whole == " ".join(s.text for s in stitch_texts(windows, pieces) if s.text) and whole


def test_stitched_words_stay_in_their_windows_and_in_order():
    """A recogniser whose times ignore the window (past its end, end before start, going back) still gives words
    inside each window and the recording, in order; each window keeps the words whose clamped midpoint is its own."""
    windows = [Window(0, 30 * SR, 29 * SR, False), Window(28 * SR, 50 * SR, 50 * SR, True)]
    garbage = [[Word("a", 27.0, 26.0), Word("b", 27.5, 40.0), Word("c", 10.0, 12.0)],
               [Word("d", 1.5, 1.0), Word("e", 25.0, 31.0)]]
    words = [w for s in stitch_words(windows, garbage) for w in s.words]
    assert words == [Word("a", 27.0, 27.0), Word("b", 27.5, 30.0), Word("c", 27.5, 30.0), Word("d", 29.5, 30.0),
                     Word("e", 50.0, 50.0)]
    assert all(0 <= w.start <= w.end <= 50 for w in words)
    assert all(a.start <= b.start and a.end <= b.end for a, b in zip(words, words[1:]))
