"""Traces and `qwenaudio verify` for Qwen2-Audio, with transformers' `Qwen2AudioForConditionalGeneration` as the
reference side: the trace tools/record_transformers.py recorded on the tiny checkpoint
(tests/golden/trace_qwen2_transformers.safetensors, see tests/golden/record_qwen2_trace.py) and one recorded live
agree with ours stage by stage in fp32, end to end and with each layer on the reference's own input; a perturbed
checkpoint is named at its first diverging stage; the command line takes Qwen2-Audio's prompts and clips and refuses
a mismatch between them."""

import importlib.util
import shutil
import subprocess
import sys

import pytest
import torch

import qwenaudio
from qwenaudio import InputError, load_checkpoint, save_checkpoint, trace
from qwenaudio.trace import Trace, compare, isolate, record

from .conftest import GOLDEN, ROOT, reference
from .test_lora import run

GOLDEN_TRACE = Trace.load(GOLDEN / "trace_qwen2_transformers.safetensors")
PROMPT, CLIPS = GOLDEN_TRACE.manifest["prompt"], GOLDEN_TRACE.manifest["audio"]
STAGES = ["waveform.0", "waveform.1", "mel.0", "mel.1", "encoder.conv1", "encoder.conv2", "encoder.blocks_in",
          "encoder.block0", "encoder.block1", "encoder.pooled", "encoder.layer_norm", "encoder.projector",
          "encoder.span0", "encoder.span1", "decoder.embeds", "decoder.block0", "decoder.block1", "decoder.norm",
          "logits"]


def recorder():
    """tools/record_transformers.py as a module (it imports transformers only when it records)."""
    spec = importlib.util.spec_from_file_location("record_transformers", ROOT / "tools" / "record_transformers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)  # the recorded prompt's clips are named relative to the repository


@pytest.fixture(scope="module")
def fp32(tiny_qwen2_ckpt):
    return qwenaudio.load(tiny_qwen2_ckpt, dtype=torch.float32, device="cpu", progress=False)


def ours(model, **options):
    return record(model, PROMPT, clips=CLIPS, **options)


def test_the_golden_reference_is_transformers():
    m = GOLDEN_TRACE.manifest
    assert m["producer"] == "transformers" and "Qwen2AudioForConditionalGeneration" in m["code"]
    assert m["project"] is None and m["logits"] == "last" and set(GOLDEN_TRACE.tensors) == set(STAGES)


def test_our_trace_agrees_with_transformers_stage_by_stage(fp32, in_repo):
    mine = ours(fp32)
    assert set(mine.tensors) == set(STAGES)
    assert mine.manifest["input_ids"] == GOLDEN_TRACE.manifest["input_ids"]
    assert mine.tensors["encoder.conv1"].shape == (2, 64, 130) and mine.tensors["encoder.span0"].shape == (12, 64)
    rows = compare(mine, GOLDEN_TRACE)
    assert [r.name for r in rows] == STAGES
    # measured ≤ 4.0e-7 (the logits); the log-mel and the conv stem agree bit for bit
    assert all(r.ok and r.rtol == (1e-4 if r.name.startswith("mel.") else 1e-5) and r.rel < 1e-5 for r in rows), \
        trace.format_table(rows)


def test_each_layer_agrees_on_the_references_own_input(fp32, in_repo):
    rows = isolate(fp32, GOLDEN_TRACE)
    assert [r.name for r in rows] == STAGES[4:]
    assert all(r.ok and r.rtol == 1e-5 for r in rows), trace.format_table(rows)


@pytest.mark.parametrize("project, logits", [(None, "last"), (16, "all")])
def test_a_trace_recorded_live_from_transformers_agrees(tiny_qwen2_ckpt, fp32, in_repo, project, logits):
    reference("transformers")
    tensors, manifest = recorder().record(str(tiny_qwen2_ckpt), PROMPT, CLIPS, project=project, logits=logits)
    live = Trace(tensors, manifest)
    if project is None:  # the golden file is what this records
        assert all(torch.equal(live.tensors[n], GOLDEN_TRACE.tensors[n]) for n in STAGES[:-1])
    rows = compare(ours(fp32, project=project, logits=logits), live)
    assert len(rows) == len(STAGES) and all(r.ok for r in rows), trace.format_table(rows)
    assert live.tensors["logits"].shape == ((1, 156032) if logits == "last" else (len(manifest["input_ids"]), 16))


@pytest.mark.parametrize("dtype, measured", [(torch.bfloat16, 9.1e-3), (torch.float16, 1.1e-3)])
def test_reduced_precision_within_stated_tolerance(tiny_qwen2_ckpt, in_repo, dtype, measured):
    mine = ours(qwenaudio.load(tiny_qwen2_ckpt, dtype=dtype, device="cpu", progress=False))
    assert mine.manifest["model"]["dtype"] == str(dtype).removeprefix("torch.")
    rows = compare(mine, GOLDEN_TRACE)  # default tolerance from the dtype
    assert all(r.ok for r in rows) and max(r.rel for r in rows) < 2 * measured
    assert not all(r.ok for r in compare(mine, GOLDEN_TRACE, rtol=1e-5))


def perturbed(ckpt, tmp_path, name, factor=1.01):
    """A copy of the checkpoint with the tensor `name` scaled by `factor` (stored in bf16, as the original)."""
    broken = shutil.copytree(ckpt, tmp_path / "broken")
    state = load_checkpoint(broken)
    state[name] = state[name] * factor
    for f in broken.glob("model*"):
        f.unlink()
    save_checkpoint(state, broken, max_shard_bytes=8 * 1024**2)
    return broken


@pytest.mark.parametrize("name, stage", [("language_model.model.layers.1.mlp.up_proj.weight", "decoder.block1"),
                                         ("audio_tower.layers.1.fc1.weight", "encoder.block1"),
                                         ("multi_modal_projector.linear.bias", "encoder.projector")])
def test_a_perturbed_weight_is_named_at_its_stage(tiny_qwen2_ckpt, in_repo, tmp_path, name, stage):
    model = qwenaudio.load(perturbed(tiny_qwen2_ckpt, tmp_path, name), dtype=torch.float32, progress=False)
    rows = compare(ours(model), GOLDEN_TRACE)
    assert next(r.name for r in rows if not r.ok) == stage, trace.format_table(rows)
    assert [r.name for r in isolate(model, GOLDEN_TRACE) if not r.ok] == [stage]


def test_clips_go_with_the_familys_prompts(fp32, in_repo, tiny_ckpt):
    with pytest.raises(InputError, match=r"holds 2 <\|AUDIO\|> token\(s\) but 1 clip\(s\) were given"):
        record(fp32, PROMPT, clips=CLIPS[:1])
    with pytest.raises(InputError, match=r"names tests/golden/clip0.wav in an <audio> region, which Qwen2-Audio "
                                         r"reads as text: write <\|audio_bos\|><\|AUDIO\|><\|audio_eos\|>"):
        record(fp32, "<audio>tests/golden/clip0.wav</audio>What is it?")
    v1 = qwenaudio.load(tiny_ckpt, dtype=torch.float32, progress=False)
    with pytest.raises(InputError, match="a Qwen-Audio prompt names its clips in <audio>PATH</audio> regions"):
        record(v1, "<audio>tests/golden/clip0.wav</audio>hi", clips=CLIPS[1:])
    assert record(v1, "<audio>tests/golden/clip0.wav</audio>hi", clips=CLIPS[:1]).manifest["audio"] == CLIPS[:1]


def test_trace_and_verify_commands(tiny_qwen2_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    model = ["--model", tiny_qwen2_ckpt, "--dtype", "float32", "--device", "cpu"]
    out = tmp_path / "ours.safetensors"
    code, err = run(capsys, "trace", "--prompt", PROMPT, "--audio", CLIPS[0], "--audio", CLIPS[1], "--out", out, *model)
    assert code == 0 and f"wrote {out}" in err
    from qwenaudio import cli

    code = cli.main(["verify", str(out), str(GOLDEN / "trace_qwen2_transformers.safetensors")])
    printed = capsys.readouterr().out
    assert code == 0 and "19 of 19 tensors within rtol 1e-05, mel.0 0.0001, mel.1 0.0001\n" in printed, printed
    code, err = run(capsys, "trace", "--prompt", PROMPT, "--audio", CLIPS[0], "--out", out, *model)
    assert code == 2 and "holds 2 <|AUDIO|> token(s) but 1 clip(s) were given" in err
    code, err = run(capsys, "trace", "--prompt", PROMPT, "--audio", "missing.wav", "--out", out, *model)
    assert code == 2 and "the prompt's clip missing.wav: no such audio file" in err


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "qwenaudio", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


@pytest.mark.slow
def test_verify_with_the_model_passes_and_names_the_first_divergence(tiny_qwen2_ckpt, tmp_path):
    golden = GOLDEN / "trace_qwen2_transformers.safetensors"
    good = run_cli("verify", golden, "--model", tiny_qwen2_ckpt, "--device", "cpu")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "19 of 19 tensors within rtol 1e-05, mel.0 0.0001, mel.1 0.0001\n" in good.stdout
    assert "15 of 15 layers within isolated rtol 1e-05" in good.stdout
    broken = perturbed(tiny_qwen2_ckpt, tmp_path, "language_model.model.layers.1.mlp.up_proj.weight")
    bad = run_cli("verify", golden, "--model", broken, "--device", "cpu")
    assert bad.returncode == 1 and "first divergence: decoder.block1" in bad.stdout, bad.stdout + bad.stderr
    assert "first isolated failure: decoder.block1" in bad.stdout


def test_a_trace_names_its_family_and_verify_refuses_another_familys(tiny_qwen2_ckpt, tiny_ckpt, tmp_path, capsys,
                                                                      monkeypatch):
    """A Qwen2-Audio reference against a Qwen-Audio model (or trace) is refused as that, not as a different prompt;
    the golden references, recorded before traces named their family, still verify (above)."""
    monkeypatch.chdir(ROOT)
    from qwenaudio import cli
    from qwenaudio.cli import verify

    m = GOLDEN_TRACE.manifest
    assert "model_type" not in m["model"]
    v2 = tmp_path / "v2.safetensors"
    Trace(GOLDEN_TRACE.tensors, {**m, "model": {**m["model"], "model_type": "qwen2_audio"}}).save(v2)
    v1_trace = tmp_path / "v1.safetensors"
    code, err = run(capsys, "trace", "--prompt", "<audio>tests/golden/clip0.wav</audio>hi", "--out", v1_trace,
                    "--model", tiny_ckpt, "--dtype", "float32", "--device", "cpu")
    assert code == 0 and Trace.load(v1_trace).manifest["model"]["model_type"] == "qwen"
    against_model = r"a Qwen2-Audio reference trace against a Qwen-Audio model: traces compare only within one family"
    for known in (True, False):  # from config.json before loading, else from the loaded model
        if not known:
            monkeypatch.setattr(verify, "family_of_checkpoint", lambda name: None)
        code = cli.main(["verify", str(v2), "--model", str(tiny_ckpt), "--device", "cpu"])
        err = capsys.readouterr().err
        assert code == 2 and against_model.replace("\\", "") in err and "different prompts" not in err, err
    code = cli.main(["verify", str(v1_trace), str(v2)])
    err = capsys.readouterr().err
    assert code == 2 and "a Qwen2-Audio reference trace against our Qwen-Audio trace" in err, err
    with pytest.raises(InputError, match=against_model):
        trace.check_family(Trace.load(v2), qwenaudio.core.families.QWEN_AUDIO)
