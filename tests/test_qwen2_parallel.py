"""`parallel.wrap` on Qwen2-Audio: FSDP with one unit per encoder and decoder layer (`encoder.blocks`,
`decoder.blocks`) over two processes (torchrun, gloo on the CPU) gives the gradients one process gets by averaging
the two processes' examples.

This file is also the worker torchrun runs (`python tests/test_qwen2_parallel.py CHECKPOINT OUT`), so it imports
nothing relative."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qwenaudio
from qwenaudio.core.audio import load_audio
from qwenaudio.core.model import IGNORE_INDEX

ROOT = Path(__file__).resolve().parents[1]
CLIPS = [ROOT / "tests" / "golden" / "clip0.wav", ROOT / "tests" / "golden" / "clip1.wav"]
PROMPT = "<|audio_bos|><|AUDIO|><|audio_eos|>Detect the language and recognize the speech: <|en|>"
ANSWERS = ["Hello there.", "Good morning to you all."]


def example(model, k):
    """Example k (one per process): its ids, labels (the answer only) and clip."""
    clip = load_audio(CLIPS[k])
    prompt = model.tokenizer.encode(PROMPT, audio_spans=[model.encoder.span_length(len(clip))])
    answer = model.tokenizer.encode(ANSWERS[k]) + [model.tokenizer.eod_id]
    ids = torch.tensor([prompt + answer])
    return ids, torch.tensor([[IGNORE_INDEX] * len(prompt) + answer]), torch.ones_like(ids), [clip]


def load(checkpoint):
    return qwenaudio.load(checkpoint, dtype=torch.float32, device="cpu", progress=False).train()


def worker(checkpoint, out):
    """One torchrun process: its example's loss and backward through the sharded model; rank 0 saves every whole
    gradient."""
    import torch.distributed as dist

    from qwenaudio.parallel import full, wrap

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = load(checkpoint)
    sharded = wrap(model, world, shard=True)
    units = sum(hasattr(m, "set_requires_gradient_sync") for m in sharded.modules())  # FSDP units
    sharded(*example(model, rank)).backward()
    grads = {n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    if rank == 0:
        torch.save({"grads": grads, "units": units}, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_per_layer_over_two_processes_averages_the_gradients(tiny_qwen2_ckpt, tmp_path):
    out = tmp_path / "grads.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    torchrun = Path(sys.executable).parent / "torchrun"
    done = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", __file__, str(tiny_qwen2_ckpt),
                           str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    sharded = torch.load(out)
    model = load(tiny_qwen2_ckpt)
    assert sharded["units"] == len(model.encoder.blocks) + len(model.decoder.blocks) + 1  # and the root unit
    for k in range(2):
        (model.loss(*example(model, k)) / 2).backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sharded["grads"].keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(sharded["grads"][name], grad, rtol=1e-5, atol=1e-5 * float(grad.abs().max()))


if __name__ == "__main__":
    worker(*sys.argv[1:])
