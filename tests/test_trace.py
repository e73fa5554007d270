"""Traces and `qwenaudio verify`: traces recorded from the official code (tests/golden/trace_official.safetensors,
projected, and trace_official_full.safetensors, full size; made by tools/record_official.py on the tiny checkpoint,
see tests/golden/record_trace.py) verify layer by layer, end to end and with each layer on the reference's own
input; a perturbed checkpoint is caught at the right block, in bf16 only in isolation; reduced precision passes at
its stated tolerance; broken files are refused."""

import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import qwenaudio
from qwenaudio import InputError, TokenizerError, load_checkpoint, save_checkpoint, trace
from qwenaudio.testing import make_tiny_checkpoint
from qwenaudio.trace import Trace, compare, isolate, record

from .conftest import GOLDEN, ROOT

REFERENCE = Trace.load(GOLDEN / "trace_official.safetensors")
FULL = Trace.load(GOLDEN / "trace_official_full.safetensors")  # not projected: its tensors can feed our layers


def official_tool():
    spec = importlib.util.spec_from_file_location("record_official", ROOT / "tools" / "record_official.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ours(ckpt, dtype=torch.float32):
    model = qwenaudio.load(ckpt, dtype=dtype, progress=False)
    m = REFERENCE.manifest
    return record(model, m["prompt"], project=m["project"], logits=m["logits"])


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)  # the recorded prompt names its clip relative to the repository


def test_reference_is_the_official_code():
    assert REFERENCE.manifest["producer"] == "official" and "e81cc26" in REFERENCE.manifest["code"]
    assert REFERENCE.manifest["project"] == 32 and REFERENCE.manifest["logits"] == "all"


def test_official_trace_verifies_layer_by_layer(tiny_ckpt, in_repo):
    rows = compare(ours(tiny_ckpt), REFERENCE)
    assert [r.name for r in rows][:3] == ["waveform.0", "mel.0", "encoder.conv1"] and rows[-1].name == "logits"
    assert len(rows) == len(REFERENCE.tensors) == 16
    # The mel's bound is fp32 FFT rounding, which varies by CPU (see trace.MEL_RTOL and test_encoder.py).
    assert all(r.ok and r.rel < (5e-5 if r.name.startswith("mel.") else 1e-5) and r.cosine > 0.999999
               for r in rows), trace.format_table(rows)


def perturbed(tiny_ckpt, tmp_path, name, factor=1.01):
    """A copy of the tiny checkpoint with the tensor `name` scaled by `factor` (stored in bf16, as the original)."""
    broken = shutil.copytree(tiny_ckpt, tmp_path / "broken")
    state = load_checkpoint(broken)
    state[name] = state[name] * factor
    for f in broken.glob("model*"):
        f.unlink()
    save_checkpoint(state, broken, max_shard_bytes=8 * 1024**2)
    return broken


def test_perturbed_decoder_block_is_the_first_divergence(tiny_ckpt, in_repo, tmp_path):
    broken = perturbed(tiny_ckpt, tmp_path, "transformer.h.1.mlp.w1.weight")
    rows = compare(ours(broken), REFERENCE)
    first = next(r for r in rows if not r.ok)
    assert first.name == "decoder.block1"
    assert "decoder.block1 " in trace.format_table(rows).split("<-- first divergence")[0].splitlines()[-1]


def test_full_official_trace_verifies_each_layer_in_isolation(tiny_ckpt, in_repo):
    assert FULL.manifest["producer"] == "official" and FULL.manifest["project"] is None
    model = qwenaudio.load(tiny_ckpt, dtype=torch.float32, progress=False)
    rows = isolate(model, FULL)
    assert [r.name for r in rows] == [
        "encoder.conv1", "encoder.conv2", "encoder.blocks_in", "encoder.block0", "encoder.block1", "encoder.pooled",
        "encoder.ln_post", "encoder.proj", "encoder.span0", "encoder.span1", "decoder.embeds", "decoder.block0",
        "decoder.block1", "decoder.ln_f", "logits"]
    # measured ≤ 3.9e-7 (the encoder blocks' attention; every other layer agrees bit for bit here)
    assert all(r.ok and r.rtol == 1e-5 and r.cosine > 0.999999 for r in rows), \
        trace.format_table(rows)
    e2e = compare(record(model, FULL.manifest["prompt"]), FULL)
    assert all(r.ok for r in e2e), trace.format_table(e2e)


@pytest.mark.parametrize("name, layer", [("transformer.h.1.mlp.w1.weight", "decoder.block1"),
                                         ("transformer.audio.blocks.1.mlp.0.weight", "encoder.block1")])
def test_one_percent_weight_error_in_bf16_is_caught_only_in_isolation(tiny_ckpt, in_repo, tmp_path, name, layer):
    model = qwenaudio.load(perturbed(tiny_ckpt, tmp_path, name), dtype=torch.bfloat16, progress=False)
    e2e = compare(record(model, FULL.manifest["prompt"]), FULL)
    assert all(r.ok for r in e2e), "end to end, bf16 rounding (tolerance 3e-2) hides the 1 % error"
    rows = isolate(model, FULL)
    assert [r.name for r in rows if not r.ok] == [layer], trace.format_table(e2e, rows)
    assert next(r for r in rows if r.name == layer).rel > 1e-3  # 1 % of the MLP: measured 5.6e-3 (decoder)
    # Computed in bf16 itself, the layer's own rounding (measured ≤ 1.4e-2 of its change) hides it too.
    assert all(r.ok for r in isolate(model, FULL, upcast=False))
    weights = dict(model.named_parameters())
    assert all(w.dtype == torch.bfloat16 for w in weights.values())  # each layer went back to bf16 after its run


def test_isolation_needs_a_full_trace_of_the_same_model(tiny_ckpt, in_repo, tmp_path):
    model = qwenaudio.load(tiny_ckpt, dtype=torch.float32, progress=False)
    with pytest.raises(InputError, match=r"projected \(--project 32\).*record it without --project"):
        isolate(model, REFERENCE)
    other = qwenaudio.load(make_tiny_checkpoint(tmp_path / "deep", num_hidden_layers=3), progress=False)
    with pytest.raises(InputError, match="comes from another model"):
        isolate(other, FULL)


@pytest.mark.parametrize("dtype, measured", [(torch.bfloat16, 9.2e-3), (torch.float16, 1.1e-3)])
def test_reduced_precision_within_stated_tolerance(tiny_ckpt, in_repo, dtype, measured):
    mine = ours(tiny_ckpt, dtype)
    assert mine.manifest["model"]["dtype"] == str(dtype).removeprefix("torch.")
    rows = compare(mine, REFERENCE)  # default tolerance from the dtype
    assert all(r.ok for r in rows) and max(r.rel for r in rows) < 2 * measured
    assert not all(r.ok for r in compare(mine, REFERENCE, rtol=1e-5))


def test_save_and_load_round_trip(tiny_ckpt, in_repo, tmp_path):
    mine = ours(tiny_ckpt)
    mine.save(tmp_path / "t.safetensors")
    again = Trace.load(tmp_path / "t.safetensors")
    assert again.manifest["input_ids"] == REFERENCE.manifest["input_ids"]
    assert all(torch.equal(again.tensors[n], mine.tensors[n]) for n in mine.tensors)


def test_projection_matches_the_official_tool():
    tool = official_tool()
    assert tool.FORMAT == trace.FORMAT and tool.PROJECTION_SEED == trace.PROJECTION_SEED
    assert torch.equal(tool.projection(1280, 64), trace.projection(1280, 64))


def test_projection_keeps_relative_error():
    """A 4096-wide vector pair projected to 64 columns keeps its relative error within a factor of ~1.5."""
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.standard_normal((200, 4096)).astype(np.float32))
    b = a + 1e-3 * torch.from_numpy(rng.standard_normal((200, 4096)).astype(np.float32))
    full = ((a - b).norm() / b.norm()).item()
    small = ((trace.reduce(a, 64) - trace.reduce(b, 64)).norm() / trace.reduce(b, 64).norm()).item()
    assert 0.67 < small / full < 1.5


def test_bad_trace_files_are_refused(tmp_path):
    (tmp_path / "text.safetensors").write_text("not a trace")
    with pytest.raises(InputError, match="not a readable safetensors file"):
        Trace.load(tmp_path / "text.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(InputError, match="not a qwenaudio trace"):
        Trace.load(tmp_path / "plain.safetensors")
    manifest = {**REFERENCE.manifest, "tensors": {"x": [3]}}
    save_file({"x": torch.zeros(2)}, str(tmp_path / "lying.safetensors"),
              metadata={"format": trace.FORMAT, "manifest": json.dumps(manifest)})
    with pytest.raises(InputError, match="manifest does not match the tensors"):
        Trace.load(tmp_path / "lying.safetensors")


def test_traces_of_different_prompts_are_not_compared(tiny_ckpt, in_repo):
    model = qwenaudio.load(tiny_ckpt, dtype=torch.float32, progress=False)
    other = record(model, "Hello world!", project=32, logits="all")
    with pytest.raises(InputError, match="ran different prompts"):
        compare(other, REFERENCE)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "qwenaudio", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


@pytest.mark.slow
def test_verify_command(tiny_ckpt, tmp_path):
    reference = str(GOLDEN / "trace_official.safetensors")
    ok = run_cli("verify", reference, "--model", str(tiny_ckpt), "--out", str(tmp_path / "ours.safetensors"))
    assert ok.returncode == 0 and "16 of 16 tensors within rtol 1e-05, mel.0 0.0001\n" in ok.stdout
    assert "isolated: not available, the reference is projected (--project 32)" in ok.stdout
    strict = run_cli("verify", str(tmp_path / "ours.safetensors"), reference, "--rtol", "1e-9")
    assert strict.returncode == 1 and "first divergence:" in strict.stdout
    assert run_cli("verify", reference).returncode == 2  # one trace needs --model


@pytest.mark.slow
def test_verify_command_reports_both_and_fails_on_a_bf16_checkpoint_with_a_bad_layer(tiny_ckpt, tmp_path):
    full = str(GOLDEN / "trace_official_full.safetensors")
    good = run_cli("verify", full, "--model", str(tiny_ckpt))
    assert good.returncode == 0 and "15 of 15 layers within isolated rtol 1e-05" in good.stdout
    broken = perturbed(tiny_ckpt, tmp_path, "transformer.h.1.mlp.w1.weight")
    bad = run_cli("verify", full, "--model", str(broken), "--dtype", "bfloat16")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "19 of 19 tensors within rtol 0.03\n" in bad.stdout  # end to end it passes
    assert "first isolated failure: decoder.block1" in bad.stdout
    marked = [line for line in bad.stdout.splitlines() if "<--" in line]
    assert len(marked) == 1 and marked[0].startswith("decoder.block1 ") and "FAIL    <-- first isolated" in marked[0]
    assert bad.stdout.splitlines()[0].split()[-2:] == ["isolated", "status"]


@pytest.fixture
def no_load(monkeypatch):
    """cli.load recorded instead of run: what the command checks before the model loads."""
    from qwenaudio import cli

    loads = []
    monkeypatch.setattr(cli, "load", lambda *a, **k: loads.append(a))
    return loads


@pytest.mark.parametrize("prompt, message", [
    ("", "the prompt is empty"),
    (" \n\t", "the prompt is only whitespace"),
    ("<audio>missing.wav</audio>hi", "the prompt's clip missing.wav: no such audio file"),
    ("<audio>note.txt</audio>hi", "the prompt's clip note.txt: not a readable audio file"),
    ("<audio>clip.wav hi", "unclosed <audio> tag"),
    ("<audio>clip.wav</audio></audio>", "a </audio> without its <audio>"),
    ("<audio><audio>clip.wav</audio>", "opens an <audio> region inside another"),
    ("<audio> </audio>hi", "region without a path"),
])
def test_trace_refuses_an_odd_prompt_before_the_model_loads(tmp_path, monkeypatch, capsys, no_load, prompt, message):
    from qwenaudio import cli

    monkeypatch.chdir(tmp_path)
    shutil.copy(GOLDEN / "clip0.wav", "clip.wav")
    (tmp_path / "note.txt").write_text("not audio")
    assert cli.main(["trace", "--prompt", prompt, "--out", "t.safetensors"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert no_load == [] and not (tmp_path / "t.safetensors").exists()
    if "clip" not in message:  # the library refuses the same prompts (record calls prompt_clips)
        with pytest.raises(InputError, match=re.escape(message)):
            trace.prompt_clips(prompt)


def test_trace_out_that_is_no_regular_file_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys, no_load):
    """A symlink loop at --out was replaced by the trace (exit 0); a pipe there was opened to see whether it held a
    trace, which waited for a writer, and SIGTERM could not end the wait."""
    from qwenaudio import cli

    monkeypatch.chdir(tmp_path)
    Path("loop1").symlink_to("loop2")
    Path("loop2").symlink_to("loop1")
    os.mkfifo("fifo")
    for out in ("loop1", "fifo"):
        assert cli.main(["trace", "--prompt", "hi", "--out", out]) == 1, out
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {out} is not a regular file") and len(err.splitlines()) == 1, err
    assert no_load == [] and Path("loop1").is_symlink() and stat.S_ISFIFO(os.stat("fifo").st_mode)


def test_trace_out_never_replaces_an_input_and_is_checked_before_the_model_loads(tiny_ckpt, tmp_path, monkeypatch,
                                                                                 capsys, no_load):
    from qwenaudio import cli

    monkeypatch.chdir(tmp_path)
    model = shutil.copytree(tiny_ckpt, tmp_path / "model")
    clip = shutil.copy(GOLDEN / "clip0.wav", "clip.wav")
    (tmp_path / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in [tmp_path / clip, tmp_path / "notes.txt", *model.iterdir()]}
    prompt = "<audio>clip.wav</audio>hi"
    cases = [("clip.wav", "would replace the input clip.wav"),
             ("./model/model.safetensors.index.json", "would replace the input"),
             ("model", "would replace the input"),
             ("notes.txt", "exists and is not a trace"),
             ("no-such-dir/t.safetensors", "cannot write in no-such-dir")]
    for out, message in cases:
        assert cli.main(["trace", "--model", str(model), "--prompt", prompt, "--out", out]) == 1, out
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err

    def unwritable(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli.trace.tempfile, "TemporaryFile", unwritable)  # tests may run as root: simulate read-only
    assert cli.main(["trace", "--model", str(model), "--prompt", prompt, "--out", "t.safetensors"]) == 1
    assert "error: --out t.safetensors: cannot write in . (Permission denied)" in capsys.readouterr().err
    assert no_load == [] and before == {p: p.read_bytes() for p in before}
    reference = str(GOLDEN / "trace_official.safetensors")
    assert cli.main(["verify", reference, "--model", str(model)]) == 2  # its clips are named from the repository
    assert "its prompt cannot be recorded: the prompt's clip tests/golden/clip1.wav: no such" in capsys.readouterr().err
    monkeypatch.chdir(ROOT)  # where the reference's prompt names its clips
    for out, message in ((reference, "would replace the input"), (tmp_path / "no-such-dir" / "t", "cannot write in")):
        assert cli.main(["verify", reference, "--model", str(model), "--out", str(out)]) == 1
        assert message in capsys.readouterr().err
    assert no_load == []


def test_a_full_disk_while_writing_a_trace_is_one_error_line_and_no_file(tiny_ckpt, tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError

    from qwenaudio import cli

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "t.safetensors"
    for error in (OSError(28, "No space left on device"), SafetensorError("I/O error: No space left on device")):
        def full(tensors, path, metadata=None, error=error):
            with open(path, "wb") as f:
                f.write(b"partial")
            raise error

        monkeypatch.setattr(trace, "save_file", full)
        assert cli.main(["trace", "--model", str(tiny_ckpt), "--prompt", "Hello", "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.endswith(f"error: {out}: could not write the trace ({error})\n") and "Traceback" not in err
        assert list(tmp_path.iterdir()) == []  # neither the trace nor its temporary file


def partial(tmp_path, name, keep):
    """A copy of the full official trace holding only the tensors `keep(name)` accepts."""
    path = tmp_path / f"{name}.safetensors"
    Trace({n: t for n, t in FULL.tensors.items() if keep(n)}, FULL.manifest).save(path)
    return path


HIDDEN_STATES = {"decoder.embeds", "decoder.block0", "decoder.ln_f", "logits"}  # output_hidden_states: no last block


def test_a_partial_reference_compares_what_both_hold(tiny_ckpt, in_repo, tmp_path):
    model = qwenaudio.load(tiny_ckpt, dtype=torch.float32, progress=False)
    mine = FULL  # every stage; test_verify_against_partial_references records ours
    reference = Trace.load(partial(tmp_path, "hidden", HIDDEN_STATES.__contains__))
    rows = compare(mine, reference)
    assert [r.name for r in rows] == ["decoder.embeds", "decoder.block0", "decoder.ln_f", "logits"]
    assert all(r.ok for r in rows)
    lacking, ours_lacking = trace.unmatched(mine, reference)
    assert ours_lacking == [] and lacking[:3] == ["waveform.0", "waveform.1", "mel.0"] and "decoder.block1" in lacking
    assert trace.name_list(lacking).startswith("waveform.0, waveform.1, mel.0, mel.1, encoder.conv1, encoder.conv2")
    assert trace.isolation_blocker(model, reference).startswith("the reference lacks waveform.0, waveform.1")
    unsaid = Trace(reference.tensors, {k: v for k, v in reference.manifest.items() if k != "model"})
    assert trace.models_note(mine, unsaid) == ""  # a hand-made reference that does not say is not another model
    with pytest.raises(InputError, match="lacks waveform.0, .*decoder.block1, which the isolated comparison needs"):
        isolate(model, reference)
    nothing = Trace.load(partial(tmp_path, "none", lambda n: False))
    with pytest.raises(InputError, match="no tensor in common"):
        compare(mine, nothing)


def test_name_list_collapses_runs():
    names = [f"encoder.block{j}" for j in range(32)] + ["logits", "waveform.0", "decoder.block3", "decoder.block5"]
    assert trace.name_list(names) == "waveform.0, encoder.block0..31, decoder.block3, decoder.block5, logits"


def test_verify_against_partial_references(tiny_ckpt, tmp_path, monkeypatch, capsys):
    from qwenaudio import cli

    monkeypatch.chdir(ROOT)
    ours = tmp_path / "ours.safetensors"
    no_wave = partial(tmp_path, "no-waveform", lambda n: not n.startswith("waveform."))
    hidden = partial(tmp_path, "hidden", HIDDEN_STATES.__contains__)
    assert cli.main(["verify", str(no_wave), "--model", str(tiny_ckpt), "--out", str(ours)]) == 0
    out = capsys.readouterr().out
    assert "\n17 of 17 tensors within rtol 1e-05, mel.0 0.0001, mel.1 0.0001\n" in out
    assert "not in the reference, so not compared: waveform.0, waveform.1\n" in out
    assert "isolated: not available, the reference lacks waveform.0, waveform.1, which the isolated" in out
    assert cli.main(["verify", str(ours), str(hidden)]) == 0  # the two-trace form
    out = capsys.readouterr().out
    assert "\n4 of 4 tensors within rtol 1e-05\n" in out and "decoder.block1" in out.split("not in the reference")[1]
    odd = tmp_path / "odd-dtype.safetensors"
    Trace(FULL.tensors, {**FULL.manifest, "model": {**FULL.manifest["model"], "dtype": "float64"}}).save(odd)
    assert cli.main(["verify", str(odd), "--model", str(tiny_ckpt)]) == 2
    assert "the reference's dtype 'float64' is not one we load: give --dtype" in capsys.readouterr().err
    nothing = partial(tmp_path, "nothing", lambda n: False)
    assert cli.main(["verify", str(ours), str(nothing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the traces have no tensor in common: ours holds waveform.0, waveform.1, mel.0")


def test_verify_against_a_reference_of_another_model(tmp_path, capsys):
    """A reference of a deeper model (one more block, its manifest says 3 layers) against ours, both ways round."""
    from qwenaudio import cli

    deeper = {**FULL.tensors, "decoder.block2": FULL.tensors["decoder.block1"] * 1.5}
    manifest = {**FULL.manifest, "model": {**FULL.manifest["model"], "layers": 3}}
    Trace(deeper, manifest).save(tmp_path / "deep.safetensors")
    full, deep = str(GOLDEN / "trace_official_full.safetensors"), str(tmp_path / "deep.safetensors")
    assert cli.main(["verify", full, deep]) == 1
    out = capsys.readouterr().out
    assert "\n19 of 19 tensors within rtol 1e-05, mel.0 0.0001, mel.1 0.0001\n" in out
    assert "FAIL: the reference has decoder.block2, ours does not\n" in out
    assert "FAIL: the traces come from different models (ours {'hidden_size': 64, 'layers': 2}, the reference " \
           "{'hidden_size': 64, 'layers': 3})" in out
    assert cli.main(["verify", deep, full]) == 1  # ours is the deeper one: the reference lacking a block is no excuse
    out = capsys.readouterr().out
    assert "not in the reference, so not compared: decoder.block2\nFAIL: the traces come from different models" in out


@pytest.mark.parametrize("option", ["--rtol", "--atol", "--isolated-rtol"])
@pytest.mark.parametrize("value", ["nan", "-1", "inf", "x"])
def test_verify_refuses_a_tolerance_that_is_not_a_finite_number(option, value, capsys):
    from qwenaudio import cli

    reference = str(GOLDEN / "trace_official.safetensors")
    assert cli.main(["verify", reference, reference, option, value]) == 2
    assert f"{option}: expected a finite number >= 0, got '{value}'" in capsys.readouterr().err


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(st.lists(st.sampled_from(["<audio>", "</audio>", "a.wav", " ", "x", "<|en|>", "e\u0301", "<audio", "audio>",
                                 "\n", "<aud", "io>"]), max_size=8))
def test_prompt_clips_finds_what_the_tokenizer_finds(tokenizer, pieces):
    """prompt_clips reads the text alone (before the model loads): it must accept what the tokenizer accepts, find the
    same clips, and refuse beyond it only blank prompts and regions without a path."""
    prompt = "".join(pieces)
    try:
        ours = trace.prompt_clips(prompt)
    except InputError as e:
        ours = e
    try:
        theirs = tokenizer.audio_paths(prompt)
    except TokenizerError as e:
        theirs = e
    if isinstance(ours, list):
        assert ours == theirs
    else:
        assert isinstance(theirs, TokenizerError) or not prompt.strip() or any(not p.strip() for p in theirs), ours


def test_a_trace_that_is_a_pipe_or_a_directory_is_refused_not_waited_on(tmp_path, monkeypatch):
    """`qwenaudio verify FIFO REF` waited forever (past SIGTERM: safetensors holds the GIL while it opens) for a
    writer; a directory was 'No such device'. Neither may be opened at all."""
    def never(path, **_):
        raise AssertionError(f"opened {path}")

    monkeypatch.setattr(trace, "safe_open", never)
    os.mkfifo(tmp_path / "fifo")
    assert trace.is_trace(tmp_path / "fifo") is False
    for path in (tmp_path / "fifo", tmp_path):
        with pytest.raises(InputError, match="not a regular file"):
            trace.Trace.load(path)
