"""LoRA: a fresh adapter changes nothing, merging equals the unmerged model, adapters round-trip through peft's
format both ways (peft, a test-only reference, on a module holding our decoder under the official names), and an
int8 base trains only its adapter."""

import errno
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import qwenaudio
from qwenaudio import lora

from .conftest import reference

IDS = torch.tensor([[151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872]])


def fresh(tiny_weights, **kwargs):
    return qwenaudio.load(tiny_weights, dtype=torch.float32, device="cpu", progress=False, **kwargs)


def randomize(model) -> None:
    """Give every B a value, as training would (B starts at zero)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in lora.lora_parameters(model).items():
            if "lora_B" in name:
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.decoder.logits(IDS)


def test_a_fresh_adapter_changes_nothing_and_only_it_trains(tiny_weights):
    base, model = fresh(tiny_weights), fresh(tiny_weights)
    params = lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=8))
    assert torch.equal(logits(model), logits(base))
    assert len(params) == 2 * 2 * 5  # 2 blocks x (c_attn, attn.c_proj, w1, w2, mlp.c_proj) x (A, B)
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in params
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n, _ in model.named_parameters() if ".lora_" in n]


def test_merged_equals_unmerged(tiny_weights):
    model = fresh(tiny_weights)
    lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=8, rslora=True, encoder=True))
    randomize(model)
    unmerged = logits(model)
    assert not torch.allclose(unmerged, logits(fresh(tiny_weights)))
    merged = lora.merge_lora(model)
    assert not any(isinstance(m, lora.LoraLinear) for m in merged.modules())
    assert torch.allclose(logits(merged), unmerged, rtol=0, atol=1e-5)


def test_an_adapter_saved_here_loads_here(tiny_weights, tmp_path):
    model = fresh(tiny_weights)
    lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=8, encoder=True))
    randomize(model)
    lora.save_adapter(model, tmp_path / "adapter")
    again = lora.load_adapter(fresh(tiny_weights), tmp_path / "adapter")
    assert torch.equal(logits(again), logits(model))


class Config(dict):
    """What peft reads of a transformers config: a mapping whose keys are also attributes."""

    def __getattr__(self, name):
        if name not in self:
            raise AttributeError(name)
        return self[name]


class Official(nn.Module):
    """Our decoder under the official model's attribute names (`transformer.h.0.attn.c_attn`, …), for peft."""

    def __init__(self, decoder):
        super().__init__()
        self.transformer = decoder
        self.config = Config(model_type="qwen", tie_word_embeddings=False, use_return_dict=False)

    def forward(self, input_ids, **_):  # peft's causal-LM wrapper passes attention_mask=None and the like
        return self.transformer.logits(input_ids)

    def prepare_inputs_for_generation(self, *args, **kwargs):  # peft's causal-LM wrapper asks for it
        raise NotImplementedError


def test_adapters_round_trip_through_peft(tiny_weights, tmp_path):
    peft = reference("peft")
    ours = fresh(tiny_weights)
    lora.apply_lora(ours, lora.LoraConfig(rank=4, alpha=8, dropout=0.05))
    randomize(ours)
    lora.save_adapter(ours, tmp_path / "ours")
    wrapped = peft.PeftModel.from_pretrained(Official(fresh(tiny_weights).decoder), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        assert torch.allclose(wrapped(input_ids=IDS), logits(ours.eval()), rtol=0, atol=1e-6)

    theirs = peft.get_peft_model(Official(fresh(tiny_weights).decoder), peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["c_attn", "w2"], use_rslora=True, init_lora_weights=False)).eval()
    theirs.save_pretrained(str(tmp_path / "theirs"))
    loaded = lora.load_adapter(fresh(tiny_weights), tmp_path / "theirs")
    with torch.no_grad():
        assert torch.allclose(logits(loaded), theirs(input_ids=IDS), rtol=0, atol=1e-6)


def test_an_int8_base_keeps_its_int8_weights_and_trains_the_adapter(tiny_weights):
    model = fresh(tiny_weights, quantize="int8")
    params = lora.apply_lora(model, lora.LoraConfig(rank=2))
    randomize(model)
    loss = model.decoder.logits(IDS).float().logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for p in params.values())
    layer = model.decoder.h[0].attn.c_attn
    assert isinstance(layer, lora.LoraLinear) and layer.base.weight.dtype == torch.int8
    with pytest.raises(qwenaudio.InputError, match="int8 weights would round the update away: load the base in "
                                                   "float to merge"):
        lora.merge_lora(model)


def test_bad_adapters_are_refused(tiny_weights, tmp_path):
    with pytest.raises(qwenaudio.CheckpointError, match="not a LoRA adapter"):
        lora.load_adapter(fresh(tiny_weights), tmp_path)
    model = fresh(tiny_weights)
    lora.apply_lora(model, lora.LoraConfig(rank=4))
    lora.save_adapter(model, tmp_path / "a")
    other = qwenaudio.load(tiny_weights, dtype=torch.float32, device="cpu", progress=False)
    other.decoder.h = other.decoder.h[:1]  # a model with one block less
    with pytest.raises(qwenaudio.CheckpointError, match="the adapter does not fit this model: missing"):
        lora.load_adapter(other, tmp_path / "a")
    with pytest.raises(qwenaudio.InputError, match="rank must be a positive integer"):
        lora.LoraConfig(rank=0)


def test_load_applies_an_adapter(tiny_weights, tmp_path):
    model = fresh(tiny_weights)
    lora.apply_lora(model, lora.LoraConfig(rank=4))
    randomize(model)
    lora.save_adapter(model, tmp_path / "adapter")
    loaded = qwenaudio.load(tiny_weights, dtype=torch.float32, device="cpu", progress=False,
                            adapter=tmp_path / "adapter")
    assert torch.equal(logits(loaded), logits(model))


# `qwenaudio merge` and the adapter files, driven as a careless user drives them (in process: cli.main).

def run(capsys, *args) -> tuple[int, str]:
    """cli.main's exit code and stderr; an error must be one `error:` line (argparse's starts with the command's
    name), and a traceback would raise here."""
    from qwenaudio import cli

    code = cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    if code:
        errors = [line for line in err.splitlines() if re.match(r"(qwenaudio \w+: )?error: ", line)]
        assert len(errors) == 1 and "Traceback" not in err, err
    return code, err


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: how far logits moved, relative to the largest."""
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def adapter(tiny_weights, tmp_path_factory):
    """A trained-looking adapter (every B non-zero) over the decoder and the encoder of tiny_weights; read-only."""
    model = fresh(tiny_weights)
    with torch.random.fork_rng():  # A's initial draw, the same whichever tests ran before
        torch.manual_seed(0)
        lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=8, encoder=True))
    randomize(model)
    return lora.save_adapter(model, tmp_path_factory.mktemp("adapter") / "adapter")


def test_merge_is_exact_in_fp32_and_rounds_once_to_the_stored_bf16(tiny_weights, adapter, tmp_path, capsys):
    """The README's figures, through the command: stored in fp32 (--dtype float32) merged logits equal the unmerged
    model's within 1e-5 relative; stored in the base's bf16 (the default) each merged weight is W + B A · scale
    computed in fp32 and rounded once, which moves the logits by the bf16 rounding alone (under 2 ** -8 relative)."""
    assert run(capsys, "merge", tiny_weights, adapter, tmp_path / "fp32", "--dtype", "float32")[0] == 0
    assert run(capsys, "merge", tiny_weights, adapter, tmp_path / "bf16")[0] == 0
    unmerged = logits(fresh(tiny_weights, adapter=adapter))
    assert relative(logits(fresh(tmp_path / "fp32")), unmerged) < 1e-5
    assert 1e-5 < relative(logits(fresh(tmp_path / "bf16")), unmerged) < 4e-3  # README: 3.1e-3
    name = "transformer.h.1.mlp.w2.weight"
    base = qwenaudio.core.checkpoint.load_checkpoint(tiny_weights)[name]
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    a, b = (tensors[f"base_model.model.transformer.h.1.mlp.w2.lora_{p}.weight"] for p in "AB")
    exact = base.double() + (b.double() @ a.double()) * 2.0  # alpha / rank
    stored = {d: qwenaudio.core.checkpoint.load_checkpoint(tmp_path / d)[name] for d in ("fp32", "bf16")}
    assert stored["bf16"].dtype == torch.bfloat16 and stored["fp32"].dtype == torch.float32
    # Rounded once: within half a bf16 step of the exact sum (the fp32 sum's own error is 2 ** -16 of that step).
    # Rounding the base and the update apart would miss by up to a whole step.
    half_step = torch.ldexp(torch.ones_like(exact), torch.frexp(exact).exponent - 9)
    assert ((stored["bf16"].double() - exact).abs() <= half_step * (1 + 2 ** -10)).all()
    assert torch.allclose(stored["fp32"].double(), exact, rtol=1e-6, atol=1e-7)


def test_merge_lora_in_memory_rounds_once(tiny_weights, adapter):
    model = qwenaudio.load(tiny_weights, dtype=torch.bfloat16, device="cpu", progress=False, adapter=adapter)
    layer = model.decoder.h[0].attn.c_attn
    exact = layer.base.weight.double() + layer.delta().double()
    lora.merge_lora(model)
    assert torch.equal(model.decoder.h[0].attn.c_attn.weight, exact.to(torch.bfloat16))


def snapshot(directory):
    from .test_quantize import fingerprint

    return fingerprint(directory)


@pytest.mark.parametrize("where", ["base", "inside base", "adapter", "inside adapter", "around both", "base by link"])
def test_merge_never_writes_over_or_into_its_inputs(tiny_weights, adapter, tmp_path, capsys, where):
    base = shutil.copytree(tiny_weights, tmp_path / "both" / "base")
    own = shutil.copytree(adapter, tmp_path / "both" / "adapter")
    (tmp_path / "link").symlink_to(base)
    target = {"base": base, "inside base": base / "merged", "adapter": own, "inside adapter": own / "m",
              "around both": tmp_path / "both", "base by link": tmp_path / "link"}[where]
    before = snapshot(tmp_path / "both")
    code, err = run(capsys, "merge", base, own, target, "--overwrite")
    assert code == 1 and "error: " in err and "input" in err.splitlines()[-1]
    assert snapshot(tmp_path / "both") == before and sorted(p.name for p in (tmp_path / "both").iterdir()) == [
        "adapter", "base"]


def test_merge_refuses_a_target_that_is_not_a_new_checkpoint_directory(tiny_weights, adapter, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    assert run(capsys, "merge", tiny_weights, adapter, tmp_path / "file", "--overwrite") == (
        1, f"error: the target {tmp_path / 'file'} is a file, not a directory\n")
    code, err = run(capsys, "merge", tiny_weights, adapter, tmp_path / "notes")
    assert code == 1 and "exists and is not empty: choose a new directory, or replace the checkpoint there with " \
        "--overwrite" in err
    code, err = run(capsys, "merge", tiny_weights, adapter, tmp_path / "notes", "--overwrite")
    assert code == 1 and "--overwrite replaces a checkpoint directory only" in err and "todo.txt" in err
    assert (tmp_path / "file").read_text() == (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    assert run(capsys, "merge", tiny_weights, adapter, tmp_path / "out")[0] == 0
    first = snapshot(tmp_path / "out")
    assert run(capsys, "merge", tiny_weights, adapter, tmp_path / "out")[0] == 1  # a rerun asks for --overwrite
    assert run(capsys, "merge", tiny_weights, adapter, tmp_path / "out", "--overwrite")[0] == 0
    assert {k: v[0] for k, v in snapshot(tmp_path / "out").items()} == {k: v[0] for k, v in first.items()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "notes", "out"]


@pytest.mark.parametrize("failure", ["ENOSPC", "SafetensorError"])
def test_merge_on_a_full_disk_leaves_nothing_and_keeps_the_target_it_would_replace(
        tiny_weights, adapter, tmp_path, capsys, monkeypatch, failure):
    from safetensors import SafetensorError

    assert run(capsys, "merge", tiny_weights, adapter, tmp_path / "old")[0] == 0
    before = snapshot(tmp_path / "old")

    def full(tensors, path, metadata=None):
        open(path, "wb").write(b"\0" * 100)  # part of the shard made it to disk
        if failure == "ENOSPC":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(qwenaudio.core.checkpoint, "save_file", full)
    for target, overwrite in ((tmp_path / "new", []), (tmp_path / "old", ["--overwrite"])):
        code, err = run(capsys, "merge", tiny_weights, adapter, target, *overwrite)
        assert code == 1 and f"error: {target}: could not write the checkpoint" in err
        assert "No space left on device" in err and "nothing was left there" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"] and snapshot(tmp_path / "old") == before


def test_an_unwritable_target_is_found_before_the_base_is_read(tiny_weights, adapter, tmp_path, capsys,
                                                                 monkeypatch):
    from qwenaudio.core import files

    reads = []
    monkeypatch.setattr(qwenaudio.core.checkpoint, "_shard_tensors", lambda *a: reads.append(a) or iter(()))
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.name.endswith(".partial"):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(files.Path, "mkdir", read_only)
    code, err = run(capsys, "merge", tiny_weights, adapter, tmp_path / "ro" / "merged")
    assert code == 1 and f"error: {tmp_path / 'ro' / 'merged'}: could not write the checkpoint" in err
    assert "Permission denied" in err and reads == []


def cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_truncated_adapter_is_a_checkpoint_error_naming_the_file(tiny_weights, adapter, tmp_path, capsys, name):
    broken = shutil.copytree(adapter, tmp_path / "broken")
    cut(broken / name)
    with pytest.raises(qwenaudio.CheckpointError, match=f"{broken / name}: .*truncated or corrupt"):
        lora.read_adapter(broken)
    with pytest.raises(qwenaudio.CheckpointError, match=f"{broken / name}"):
        qwenaudio.load(tiny_weights, dtype=torch.float32, device="cpu", progress=False, adapter=broken)
    code, err = run(capsys, "merge", tiny_weights, broken, tmp_path / "merged")
    assert code == 3 and str(broken / name) in err and not (tmp_path / "merged").exists()
    code, err = run(capsys, "trace", "--prompt", "hello", "--out", tmp_path / "t.safetensors", "--model",
                    tiny_weights, "--adapter", broken)
    assert code == 3 and str(broken / name) in err and not (tmp_path / "t.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


@pytest.mark.parametrize("change", ["missing rank", "rank 'x'", "not an object", "a list of targets of ints",
                                    "nan weights", "missing B", "wrong shape"])
def test_adapters_that_cannot_be_used_are_checkpoint_errors(tiny_weights, adapter, tmp_path, change):
    from safetensors.torch import save_file

    broken = shutil.copytree(adapter, tmp_path / "broken")
    raw = json.loads((broken / "adapter_config.json").read_text())
    tensors = load_file(str(broken / "adapter_model.safetensors"))
    first = next(iter(tensors))
    if change == "missing rank":
        del raw["r"]
    elif change == "rank 'x'":
        raw["r"] = "x"
    elif change == "not an object":
        raw = [raw]
    elif change == "a list of targets of ints":
        raw["target_modules"] = [1, 2]
    elif change == "nan weights":
        tensors[first][0, 0] = float("nan")
    elif change == "missing B":
        tensors = {k: v for k, v in tensors.items() if "lora_B" not in k}
    else:
        tensors[first] = tensors[first][:, :-1].contiguous()
    (broken / "adapter_config.json").write_text(json.dumps(raw))
    save_file(tensors, str(broken / "adapter_model.safetensors"))
    with pytest.raises(qwenaudio.CheckpointError, match=str(broken)):
        lora.load_adapter(fresh(tiny_weights), broken)
    with pytest.raises(qwenaudio.CheckpointError, match=str(broken)):
        lora.merge_checkpoint(tiny_weights, broken, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_a_truncated_base_is_exit_3_in_merge(tiny_weights, adapter, tmp_path, capsys):
    base = shutil.copytree(tiny_weights, tmp_path / "base")
    shard = sorted(base.glob("*.safetensors"))[0]
    cut(shard)
    code, err = run(capsys, "merge", base, adapter, tmp_path / "merged")
    assert code == 3 and str(shard) in err and "truncated or corrupt" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_merged_weights_that_are_not_finite_are_refused(tiny_weights, adapter, tmp_path, capsys):
    from safetensors.torch import save_file

    huge = shutil.copytree(adapter, tmp_path / "huge")
    tensors = {k: torch.full_like(v, 1e38) for k, v in load_file(str(huge / "adapter_model.safetensors")).items()}
    save_file(tensors, str(huge / "adapter_model.safetensors"))  # finite, but B A overflows
    code, err = run(capsys, "merge", tiny_weights, huge, tmp_path / "merged")
    assert code == 2 and "is not finite in torch.bfloat16: the update of" in err and "too large to be a weight" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge"]


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_merge_into_a_quantized_base_names_its_quantization(tiny_weights, adapter, tmp_path, capsys, quantization):
    from qwenaudio.quantize import save_quantized

    base = save_quantized(tiny_weights, tmp_path / quantization, bits=int(quantization[-1]))
    code, err = run(capsys, "merge", base, adapter, tmp_path / "merged")
    other = "int4" if quantization == "int8" else "int8"
    assert code == 2 and f"{quantization}-weight-only" in err and other not in err
    assert "float original" in err and not (tmp_path / "merged").exists()


def test_wrong_types_are_our_errors(tiny_weights, adapter, tmp_path):
    model = fresh(tiny_weights)
    for call in (lambda: qwenaudio.load(tiny_weights, progress=False, adapter=123),
                 lambda: lora.merge_lora("notamodel"),
                 lambda: lora.merge_lora(model, 123),
                 lambda: lora.load_adapter("notamodel", adapter),
                 lambda: lora.load_adapter(model, 123),
                 lambda: lora.save_adapter(123, tmp_path / "a"),
                 lambda: lora.save_adapter(model, 123),
                 lambda: lora.save_adapter(model, tmp_path / "a"),  # no adapter applied
                 lambda: lora.apply_lora("notamodel", lora.LoraConfig()),
                 lambda: lora.apply_lora(model, {"rank": 4}),
                 lambda: lora.merge_checkpoint(123, adapter, tmp_path / "m"),
                 lambda: lora.merge_checkpoint(tiny_weights, adapter, tmp_path / "m", dtype="int8")):
        with pytest.raises(qwenaudio.InputError):
            call()
    with pytest.raises(qwenaudio.CheckpointError, match="x: no adapter directory"):
        lora.merge_lora(model, "x")  # as merge_lora(model, ADAPTER_DIR) reads: apply, then fold in
    merged = lora.merge_lora(fresh(tiny_weights), adapter)
    assert torch.allclose(logits(merged), logits(fresh(tiny_weights, adapter=adapter)), rtol=0, atol=1e-5)
    assert not (tmp_path / "a").exists() and not (tmp_path / "m").exists()


def test_merging_in_memory_into_int4_weights_names_int4(tiny_weights, adapter):
    model = qwenaudio.load(tiny_weights, dtype=torch.float32, device="cpu", quantize="int4", progress=False,
                           adapter=adapter)
    with pytest.raises(qwenaudio.InputError, match="merging into int4 weights would round the update away"):
        lora.merge_lora(model)


def test_an_adapter_that_is_not_finite_is_not_saved(tiny_weights, tmp_path):
    model = fresh(tiny_weights)
    lora.apply_lora(model, lora.LoraConfig(rank=2))
    with torch.no_grad():
        model.decoder.h[1].mlp.w2.lora_B.weight[0, 0] = float("inf")
    with pytest.raises(qwenaudio.InputError, match="transformer.h.1.mlp.w2.lora_B.weight holds values that are not "
                                                   "finite"):
        lora.save_adapter(model, tmp_path / "adapter")
    assert list(tmp_path.iterdir()) == []


def test_a_dtype_too_narrow_for_a_weight_is_refused(tiny_weights, adapter, tmp_path, capsys):
    from qwenaudio.core.checkpoint import INDEX_FILE, load_checkpoint, save_checkpoint

    base = shutil.copytree(tiny_weights, tmp_path / "base", ignore=shutil.ignore_patterns("*.safetensors", INDEX_FILE))
    state = load_checkpoint(tiny_weights)
    state["transformer.ln_f.weight"] = state["transformer.ln_f.weight"].clone()
    state["transformer.ln_f.weight"][0] = 1e6  # a bf16 value fp16 cannot hold, in a tensor no adapter touches
    save_checkpoint(state, base)
    code, err = run(capsys, "merge", base, adapter, tmp_path / "merged", "--dtype", "float16")
    assert code == 2 and "transformer.ln_f.weight: the weight to write is not finite in torch.float16: " \
        "torch.float16 cannot hold it; --dtype float32 can" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
