"""Qwen2-Audio's front end against transformers (5.25.0 recorded): the 128-bin log-mel, the frame mask, the
`<|AUDIO|>` count.

- WhisperFeatureExtractor(feature_size=128): Qwen2-Audio's preprocessor. It computes the log-mel with torch when torch
  is installed (always, next to a torch model) and with numpy otherwise; both paths are compared.
- Qwen2AudioProcessor: counts `<|AUDIO|>` tokens from the extractor's mask; built here over a tiny tokenizer, since
  only the count of one special token matters.
- tests/golden/qwen2_front_end_transformers.safetensors (tests/golden/record_qwen2_front_end.py): the same, stored,
  so the comparison holds without transformers and catches a change in a later transformers.
"""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from qwenaudio import AudioError
from qwenaudio.core.audio import (
    N_SAMPLES,
    QWEN2_MIN_SAMPLES,
    audio_tokens,
    feature_frames,
    load_audio,
    log_mel_spectrogram,
    mel_filters,
    mel_length,
    pad_or_trim,
    qwen2_audio_tokens,
)

from .conftest import GOLDEN, reference

GOLDEN_FILE = GOLDEN / "qwen2_front_end_transformers.safetensors"
RECORDINGS = ["1272-128104-0000.flac", "1089_134686_000007_000004.wav", "es.mp3", "glass-breaking-151256.mp3",
              "music.wav"]
# Same float32 operations in the same order as the extractor's torch path: measured identical; 1e-6 (5e-7 of the
# log-mel's range of 2) leaves room for another BLAS.
ATOL_TORCH_PATH = 1e-6
# The numpy path computes its STFT in float64, ours (and the torch path) in float32: measured up to 2.35e-5 apart on
# the recordings (es.mp3), in the quietest bins, where log10 magnifies float32's rounding of the power. The numpy path
# is the exact one (within 8e-8 of a float64 torch log-mel), so this bound is float32's, not a different rule.
ATOL_NUMPY_PATH = 3e-5


def extractor():
    return reference("transformers").WhisperFeatureExtractor(feature_size=128)


def extract(clips: list[torch.Tensor], fe=None) -> dict[str, np.ndarray]:
    """The extractor's features and frame mask for a batch of 16 kHz clips, as Qwen2AudioProcessor calls it."""
    fe = fe or extractor()
    return fe([c.numpy() for c in clips], sampling_rate=16_000, return_attention_mask=True, padding="max_length",
              return_tensors="np")


def ours(audio: torch.Tensor) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # clips over 30 s warn that they are cut; the extractor cuts them silently
        return log_mel_spectrogram(audio, 128).numpy()


def mask_only(fe):
    """`fe` without its log-mel (zeros instead): the mask comes from the padded samples alone, so a sweep over
    thousands of lengths need not pay for thousands of STFTs. The golden and log-mel tests run the real thing."""
    def no_features(batch, device="cpu"):
        return np.zeros((len(batch), 1, 1), np.float32)
    fe._torch_extract_fbank_features = fe._np_extract_fbank_features = no_features
    return fe


def noise(n: int, scale: float = 0.1, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy((scale * np.random.default_rng(seed).standard_normal(n)).astype(np.float32))


# --- log-mel ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_equal_transformers(n_mels):
    """transformers builds the bank in float64 (≤ 2e-9 from ours); rounded to float32, as both front ends use it,
    the two are equal."""
    theirs = reference("transformers").WhisperFeatureExtractor(feature_size=n_mels).mel_filters.T
    assert theirs.shape == (n_mels, 201)
    np.testing.assert_array_equal(mel_filters(n_mels), theirs.astype(np.float32))


@pytest.mark.parametrize("name", RECORDINGS)
def test_log_mel_of_recordings_equals_extractor(shared_audio, name):
    audio = load_audio(shared_audio / name)
    theirs = extract([audio])
    np.testing.assert_allclose(ours(audio), theirs["input_features"][0], rtol=0, atol=ATOL_TORCH_PATH)
    assert theirs["attention_mask"][0].sum() == feature_frames(len(audio))


@pytest.mark.parametrize("name", ["1272-128104-0000.flac", "es.mp3"])
def test_log_mel_of_recordings_equals_extractors_numpy_path(shared_audio, name):
    audio = load_audio(shared_audio / name)
    theirs = extractor()._np_extract_fbank_features(pad_or_trim(audio)[None].numpy(), "cpu")[0]
    np.testing.assert_allclose(ours(audio), theirs, rtol=0, atol=ATOL_NUMPY_PATH)


def synthetic() -> dict[str, torch.Tensor]:
    return {
        "one_past_a_hop": noise(161),
        "shortest_with_a_token": noise(QWEN2_MIN_SAMPLES),
        "7s_and_one_sample": noise(7 * 16_000 + 1),
        "exactly_30s": noise(N_SAMPLES),
        "30s_and_one_sample": noise(N_SAMPLES + 1),
        "60s": noise(2 * N_SAMPLES),
        "near_silence": noise(48_000, scale=1e-4),  # log-mel partly at the absolute floor of 1e-10
        "one_lsb": torch.full((16_000,), 2**-15),
        "silence": torch.zeros(48_000),
    }


@pytest.mark.parametrize("name", synthetic())
def test_log_mel_of_synthetic_clips_equals_extractor(name):
    audio = synthetic()[name]
    theirs = extract([audio])
    np.testing.assert_allclose(ours(audio), theirs["input_features"][0], rtol=0, atol=ATOL_TORCH_PATH)
    assert theirs["attention_mask"][0].sum() == feature_frames(len(audio))


def test_batched_extractor_floors_each_clip_at_its_own_max():
    """One batched call gives each clip the log-mel it gets alone: the max − 8 floor is per clip, as ours is."""
    clips = [noise(16_000, scale=0.5), noise(40_000, scale=1e-3, seed=1), noise(N_SAMPLES + 7, seed=2)]
    theirs = extract(clips)["input_features"]
    batch = torch.stack([pad_or_trim(c) for c in clips])
    np.testing.assert_allclose(ours(batch), theirs, rtol=0, atol=ATOL_TORCH_PATH)
    for clip, alone in zip(clips, theirs):
        np.testing.assert_allclose(ours(clip), alone, rtol=0, atol=ATOL_TORCH_PATH)
    assert theirs[1].min() < theirs[0].min() - 0.5  # the floors differ: a batch-wide max would have made them equal


# --- frame and token counts ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("samples, frames, tokens", [
    (QWEN2_MIN_SAMPLES, 3, 1),  # 3 frames -> (3 - 1) // 2 + 1 = 2 after the conv -> (2 - 2) // 2 + 1 = 1
    (16_000, 100, 25),  # 1 s: 100 -> 50 -> 25
    (16_001, 101, 25),  # one sample more: a frame more (a ceiling), 101 -> 51 -> 25
    (16_320, 102, 25),  # 102 -> 51 -> 25
    (16_321, 103, 26),  # 103 -> 52 -> 26: here the extra frame adds an audio position
    (93_680, 586, 146),  # 1272-128104-0000.flac: 586 -> 293 -> 146
    (N_SAMPLES - 1, 3000, 750),  # ceil(479,999 / 160) = 3000
    (N_SAMPLES, 3000, 750),  # 30 s: 3000 -> 1500 -> 750, Qwen2-Audio's documented maximum
    (N_SAMPLES + 1, 3000, 750),  # truncated to 30 s
])
def test_counts_worked_by_hand(samples, frames, tokens):
    assert feature_frames(samples) == frames
    assert qwen2_audio_tokens(samples) == tokens


def test_frames_are_a_ceiling_where_qwen_audio_takes_a_floor():
    assert [feature_frames(n) for n in (0, 1, 160, 161, 320)] == [0, 1, 1, 2, 2]
    assert [mel_length(n) for n in (0, 1, 160, 161, 320)] == [0, 0, 1, 1, 2]
    assert qwen2_audio_tokens(16_321) == 26 and audio_tokens(16_321) == 25  # 103 frames here, 102 in Qwen-Audio


def test_clips_under_one_token_are_rejected():
    assert QWEN2_MIN_SAMPLES == 321
    for samples in (320, 161, 1, 0):
        with pytest.raises(AudioError, match=f"a clip of {samples} samples is too short: one audio token needs "
                                             "at least 321 samples"):
            qwen2_audio_tokens(samples)


def sweep_lengths() -> list[int]:
    around_hops = [160 * k + d for k in (7, 100, 2999, 3000) for d in (-1, 0, 1)]
    return list(range(0, 1001)) + around_hops + [N_SAMPLES + 1_000, 2 * N_SAMPLES]


def test_frames_equal_extractors_mask_on_many_lengths():
    fe = mask_only(extractor())
    lengths = sweep_lengths()
    for start in range(0, len(lengths), 64):
        chunk = lengths[start:start + 64]
        masks = extract([torch.zeros(n) for n in chunk], fe)["attention_mask"]
        assert masks.shape == (len(chunk), 3000)
        counts = masks.sum(-1)
        assert (masks == (np.arange(3000) < counts[:, None])).all(), "the mask is a prefix of real frames"
        assert counts.tolist() == [feature_frames(n) for n in chunk]


@settings(max_examples=25, derandomize=True, database=None, deadline=None)
@given(lengths=st.lists(st.integers(0, 2 * N_SAMPLES), min_size=1, max_size=8))
def test_frames_equal_extractors_mask_on_any_lengths(lengths):
    counts = extract([torch.zeros(n) for n in lengths], mask_only(extractor()))["attention_mask"].sum(-1)
    assert counts.tolist() == [feature_frames(n) for n in lengths]


def tiny_processor(fe):
    """Qwen2AudioProcessor over `fe` and a byte-level tokenizer of printable ASCII with Qwen2-Audio's audio tokens."""
    transformers = reference("transformers")
    vocab = {c: i for i, c in enumerate([chr(i) for i in range(33, 127)] + ["Ġ", "<|endoftext|>"])}
    tokenizer = transformers.Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"]})
    return transformers.Qwen2AudioProcessor(feature_extractor=fe, tokenizer=tokenizer)


def audio_token_counts(processor, lengths: list[int]) -> list[int]:
    prompt = "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    out = processor(text=[prompt] * len(lengths), audio=[np.zeros(n, np.float32) for n in lengths],
                    sampling_rate=16_000, padding=True, return_tensors="np")
    return (out["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")).sum(-1).tolist()


def test_audio_tokens_equal_processors_expansion():
    processor = tiny_processor(mask_only(extractor()))
    lengths = [n for n in sweep_lengths() if n >= QWEN2_MIN_SAMPLES and (n < 700 or n % 7 == 0 or n > 1000)]
    for start in range(0, len(lengths), 64):
        chunk = lengths[start:start + 64]
        assert audio_token_counts(processor, chunk) == [qwen2_audio_tokens(n) for n in chunk]
    assert audio_token_counts(processor, [QWEN2_MIN_SAMPLES - 1, 1]) == [0, 0], "too short: no audio position"


# --- golden ---------------------------------------------------------------------------------------------------------

def golden() -> dict[str, dict[str, torch.Tensor]]:
    with safe_open(GOLDEN_FILE, framework="pt") as f:
        clips: dict[str, dict[str, torch.Tensor]] = {}
        for key in f.keys():
            name, _, field = key.partition(".")
            clips.setdefault(name, {})[field] = f.get_tensor(key)
        assert f.metadata()["transformers"] == "5.25.0" and f.metadata()["path"] == "torch"
    return clips


def test_golden_holds_two_recordings_and_a_synthetic_clip():
    assert sorted(golden()) == ["chirp", "glass", "speech"]


@pytest.mark.parametrize("name, file", [("speech", "1272-128104-0000.flac"), ("glass", "glass-breaking-151256.mp3")])
def test_golden_waveforms_are_the_recordings(shared_audio, name, file):
    torch.testing.assert_close(golden()[name]["waveform"].float() / 32768, load_audio(shared_audio / file), rtol=0,
                               atol=0)


@pytest.mark.parametrize("name", ["speech", "glass", "chirp"])
def test_log_mel_and_counts_equal_golden(name):
    g = golden()[name]
    audio = g["waveform"].float() / 32768
    mel, frames = ours(audio), g["input_features"].shape[-1]
    np.testing.assert_allclose(mel[:, :frames], g["input_features"].numpy(), rtol=0, atol=ATOL_TORCH_PATH)
    # Past the stored frames only padding remains, each frame at the clip's floor, as the last stored one is.
    floor = g["input_features"][:, -1:].numpy()
    np.testing.assert_allclose(mel[:, frames:], np.broadcast_to(floor, mel[:, frames:].shape), rtol=0,
                               atol=ATOL_TORCH_PATH)
    assert feature_frames(len(audio)) == g["attention_mask"].sum()
    assert qwen2_audio_tokens(len(audio)) == g["num_audio_tokens"]


def test_golden_batch_equals_live_transformers():
    """The installed transformers still computes what was recorded (one batched call, as recorded)."""
    clips = golden()
    theirs = extract([c["waveform"].float() / 32768 for c in clips.values()])
    for i, c in enumerate(clips.values()):
        frames = c["input_features"].shape[-1]
        np.testing.assert_allclose(theirs["input_features"][i, :, :frames], c["input_features"].numpy(), rtol=0,
                                   atol=ATOL_TORCH_PATH)
        np.testing.assert_array_equal(theirs["attention_mask"][i], c["attention_mask"].numpy())
    counts = audio_token_counts(tiny_processor(extractor()), [len(c["waveform"]) for c in clips.values()])
    assert counts == [int(c["num_audio_tokens"]) for c in clips.values()]
