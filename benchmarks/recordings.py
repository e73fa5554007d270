"""The benchmarks' audio: a recording from ../shared/audio, or noise of the same length where that folder is absent.

A lent GPU gets the checkout without ../shared (the device tool's README), and a benchmark's figures depend on the
prompt's length, not on what the clip says (the weights are random), so noise stands in there rather than a step
failing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

NOISE_RATE = 16_000


def recording(path: Path, seconds: float) -> tuple[np.ndarray, int, str]:
    """The first `seconds` of `path` (float32, mono as stored), its rate and its name; where it is absent, as many
    seconds of seeded noise at 16 kHz, named so."""
    if path.exists():
        with sf.SoundFile(path) as file:
            return file.read(int(seconds * file.samplerate), dtype="float32"), file.samplerate, path.name
    print(f"{path} is not here: the clip is {seconds:g} s of noise", flush=True)
    noise = 0.1 * np.random.default_rng(0).standard_normal(round(seconds * NOISE_RATE))
    return noise.astype(np.float32), NOISE_RATE, f"noise, {seconds:g} s"
