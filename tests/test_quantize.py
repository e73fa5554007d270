"""Int8 weight-only quantization: the layer math, quantized checkpoints, and accuracy against fp32 on the golden
generation prompts."""

import errno
import hashlib
import json
import os
import shutil

import pytest
import torch

import qwenaudio
from qwenaudio import ConfigError, InputError, OutputError
from qwenaudio.core import int8
from qwenaudio.core.int8 import Int8Linear, quantize_int8, quantize_weight
from qwenaudio.quantize import save_quantized

from .conftest import golden_prompt_logits
from .test_lora import run


def test_weight_round_trip_is_within_half_a_step():
    w = torch.randn(48, 96) * torch.logspace(-2, 1, 48)[:, None]  # rows of very different scales
    q, scales = quantize_weight(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scales.shape == (48,)
    assert ((q.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-7).all()


def test_quantizing_in_chunks_equals_one_pass(monkeypatch):
    w = torch.randn(50, 32) * torch.logspace(-3, 2, 50)[:, None]
    whole = quantize_weight(w)
    monkeypatch.setattr(int8, "CHUNK_ROWS", 7)  # 50 rows: 7 full chunks and a short one
    chunked = quantize_weight(w)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


@pytest.mark.slow  # torch.compile
def test_one_compiled_row_is_a_fused_sum_equal_to_the_dequantized_weights():
    """Compiled, one row with fp32 activations (or any on CUDA) takes the products-and-sum form, which the compiler
    fuses into one pass over the int8 weight: 3.4 ms against the CPU kernel's 20 on a full-width layer here."""
    linear = torch.nn.Linear(96, 40)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(1, 1, 96)
    reference = x.double() @ (layer.weight.double() * layer.weight_scale.double()[:, None]).T + \
        linear.bias.detach().double()
    forms = []
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(lambda x: (forms.append(Int8Linear.form(x, 1)), layer(x))[1], fullgraph=True)(x)
    assert forms == ["sum"] and got.shape == (1, 1, 40)
    torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))


def test_decoder_linears_are_replaced(tiny_ckpt):
    decoder = quantize_int8(qwenaudio.load_decoder(tiny_ckpt, dtype=torch.float32))
    assert isinstance(decoder.h[0].attn.c_attn, Int8Linear) and isinstance(decoder.lm_head, Int8Linear)
    assert decoder.h[0].mlp.w1.weight.dtype == torch.int8 and decoder.wte.weight.dtype == torch.float32


def test_int8_on_load_equals_quantizing_after_load(tiny_ckpt):
    after = quantize_int8(qwenaudio.load_decoder(tiny_ckpt, dtype=torch.float32))
    during = qwenaudio.load_decoder(tiny_ckpt, dtype=torch.float32, quantize="int8")
    assert after.state_dict().keys() == during.state_dict().keys()
    for name, tensor in after.state_dict().items():
        assert torch.equal(tensor, during.state_dict()[name]), name


def test_quantized_checkpoint_round_trip(tiny_ckpt, tmp_path):
    target = save_quantized(tiny_ckpt, tmp_path / "int8")
    raw = json.loads((target / "config.json").read_text())
    assert raw["quantization"] == "int8-weight-only"
    assert {p.name for p in tiny_ckpt.iterdir() if p.suffix != ".safetensors"} <= {p.name for p in target.iterdir()}
    header = qwenaudio.core.checkpoint.read_header(next(target.glob("*.safetensors")))
    assert header["lm_head.weight"][0] == torch.int8 and header["lm_head.weight_scale"][0] == torch.bfloat16
    config = qwenaudio.QwenAudioConfig.from_json(tiny_ckpt)
    shapes = qwenaudio.tensor_shapes(config)
    # Each quantized weight goes from 2 bytes (bf16) to 1 per element and gains a bf16 scale per row.
    saved = sum(shapes[n][0] * shapes[n][1] - 2 * shapes[n][0]
                for n in qwenaudio.core.checkpoint.quantized_names(config))
    size = {d: sum(p.stat().st_size for p in d.glob("*.safetensors")) for d in (tiny_ckpt, target)}
    assert abs(size[tiny_ckpt] - size[target] - saved) < 64 * 1024  # headers and shard count may differ

    stored = qwenaudio.load(target, dtype=torch.bfloat16, progress=False)  # int8 because the config says so
    fresh = qwenaudio.load(tiny_ckpt, dtype=torch.bfloat16, quantize="int8", progress=False)
    assert isinstance(stored.decoder.h[1].mlp.w2, Int8Linear)
    ids = torch.randint(0, 151643, (2, 7))
    with torch.no_grad():  # also runs the int8 kernel on weights read back from the shards
        assert torch.equal(stored.decoder.logits(ids), fresh.decoder.logits(ids))


def test_unknown_quantization_is_refused(tiny_ckpt, tmp_path):
    raw = json.loads((tiny_ckpt / "config.json").read_text())
    with pytest.raises(ConfigError, match="quantization 'int4'"):
        qwenaudio.QwenAudioConfig.from_dict({**raw, "quantization": "int4"})


def fingerprint(directory):
    """Every file below `directory` with its bytes' hash, permissions and mtime: what 'untouched' means."""
    return {p.relative_to(directory): (hashlib.md5(p.read_bytes()).hexdigest(), p.stat().st_mode, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["same", "inside", "around", "same by link", "inside by link"])
def test_quantize_never_writes_over_or_into_its_source(tiny_ckpt, tmp_path, where):
    source = shutil.copytree(tiny_ckpt, tmp_path / "source" / "ckpt")
    (tmp_path / "link").symlink_to(source)
    before = fingerprint(tmp_path / "source")
    target = {"same": source, "inside": source / "int8", "around": tmp_path / "source",
              "same by link": tmp_path / "link", "inside by link": tmp_path / "link" / "int8"}[where]
    with pytest.raises(OutputError, match="input"):
        save_quantized(source, target, overwrite=True)
    assert fingerprint(tmp_path / "source") == before and sorted(p.name for p in source.iterdir()) == sorted(
        p.name for p in tiny_ckpt.iterdir())


def test_quantize_refuses_a_target_with_files_unless_asked(tiny_ckpt, tmp_path):
    target = shutil.copytree(tiny_ckpt, tmp_path / "other")  # another checkpoint already lives there
    before = fingerprint(target)
    with pytest.raises(OutputError, match="exists and is not empty: .*overwrite=True"):
        save_quantized(tiny_ckpt, target)
    assert fingerprint(target) == before
    save_quantized(tiny_ckpt, target, overwrite=True)
    assert qwenaudio.QwenAudioConfig.from_json(target).quantization == "int8-weight-only"
    assert [p.name for p in tmp_path.iterdir()] == ["other"]  # no temporary or old directory left beside it
    (tmp_path / "empty").mkdir()
    save_quantized(tiny_ckpt, tmp_path / "empty")  # an empty directory is a new one


def test_quantized_files_get_normal_permissions(tiny_ckpt, tmp_path):
    old = os.umask(0o022)
    try:
        target = save_quantized(tiny_ckpt, tmp_path / "int8")
    finally:
        os.umask(old)
    assert {oct(p.stat().st_mode & 0o777) for p in target.iterdir()} == {"0o644"}


@pytest.mark.parametrize("failure", ["ENOSPC", "SafetensorError"])
def test_a_full_disk_leaves_nothing_behind(tiny_ckpt, tmp_path, monkeypatch, capsys, failure):
    """The shard hits ENOSPC halfway (as an OSError, or as safetensors reports it): the error names the target,
    no partial checkpoint is left, and an existing target that was to be overwritten is still there, whole."""
    from safetensors import SafetensorError

    target = save_quantized(tiny_ckpt, tmp_path / "int8")
    before = fingerprint(target)
    calls = []

    def fill_up(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 1:
            open(path, "wb").write(b"\0" * 100)  # part of the shard made it to disk
        if failure == "ENOSPC":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(qwenaudio.core.checkpoint, "save_file", fill_up)
    for where, overwrite in ((tmp_path / "new", False), (target, True)):
        calls.clear()
        with pytest.raises(OutputError, match=f"{where}: could not write the checkpoint "
                                              r"\(.*No space left on device.*\); nothing was left there"):
            save_quantized(tiny_ckpt, where, overwrite=overwrite)
        code, err = run(capsys, "quantize", tiny_ckpt, where, *(["--overwrite"] if overwrite else []))
        assert code == 1 and "No space left on device" in err and f"error: {where}: could not write" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8"] and fingerprint(target) == before


def test_ctrl_c_leaves_nothing_behind(tiny_ckpt, tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(qwenaudio.core.checkpoint, "save_file", interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(tiny_ckpt, tmp_path / "int8")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def models(tiny_ckpt):
    fp32 = qwenaudio.load(tiny_ckpt, dtype=torch.float32, progress=False)
    int8 = qwenaudio.load(tiny_ckpt, dtype=torch.float32, progress=False)
    quantize_int8(int8.decoder)
    return fp32, int8


@pytest.mark.parametrize("case", ["asr", "timestamps", "batch"])
def test_int8_agrees_with_fp32_wherever_fp32_is_decided(models, case):
    """Measured on the tiny checkpoint: logits within 1.4e-2 relative of fp32. Random weights give nearly flat
    next-token distributions, so greedy runs drift apart where fp32's top two are closer than the quantization
    error; wherever fp32's margin exceeds twice that error, int8 must pick the same token."""
    exact, quantized = golden_prompt_logits(case, *models)
    error = (quantized - exact).abs().amax(-1)
    assert (error.max() / exact.abs().max()) < 2e-2
    top2 = exact.topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) > 2 * error
    assert decided.any()
    assert torch.equal(quantized.argmax(-1)[decided], exact.argmax(-1)[decided])


# `qwenaudio quantize` as a careless user drives it (in process: cli.main).

def test_a_group_size_without_bits_4_is_refused(tiny_ckpt, tmp_path, capsys):
    code, err = run(capsys, "quantize", tiny_ckpt, tmp_path / "q", "--group-size", "32")
    assert code == 2 and "--group-size: only with --bits 4" in err
    with pytest.raises(InputError, match="group_size applies to bits=4 only"):
        save_quantized(tiny_ckpt, tmp_path / "q", group_size=32)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [["transcribe", "x.wav"], ["chat"], ["evaluate", "asr", "--data", "d.jsonl",
                                     "--output-dir", "o"], ["finetune", "--data", "d.jsonl", "--output-dir", "o"],
                                     ["trace", "--prompt", "hi", "--out", "t.safetensors"], ["verify", "t", "--model",
                                                                                            "m"]])
def test_int4_and_int8_together_are_a_usage_error(command, capsys):
    code, err = run(capsys, *command, "--int4", "--int8")
    assert code == 2 and "not allowed with argument" in err


def test_wrong_types_are_our_errors(tiny_ckpt, tmp_path):
    for kwargs in ({"source": 123}, {"target": 123}, {"bits": "4"}, {"bits": 4, "group_size": "32"},
                   {"bits": 4, "group_size": 48}, {"overwrite": "yes"}):
        arguments = {"source": tiny_ckpt, "target": tmp_path / "q"} | kwargs
        with pytest.raises(InputError):
            save_quantized(**arguments)
    assert list(tmp_path.iterdir()) == []


def test_a_truncated_source_is_exit_3(tiny_ckpt, tmp_path, capsys):
    source = shutil.copytree(tiny_ckpt, tmp_path / "source")
    shard = sorted(source.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:1000])
    code, err = run(capsys, "quantize", source, tmp_path / "q", "--bits", "4")
    assert code == 3 and str(shard) in err and "truncated or corrupt" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


def test_an_unwritable_target_is_found_before_the_source_is_read(tiny_ckpt, tmp_path, capsys, monkeypatch):
    from qwenaudio.core import files

    reads = []
    monkeypatch.setattr(qwenaudio.core.checkpoint, "_shard_tensors", lambda *a: reads.append(a) or iter(()))
    real_mkdir = files.Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.name.endswith(".partial"):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(files.Path, "mkdir", read_only)
    code, err = run(capsys, "quantize", tiny_ckpt, tmp_path / "ro" / "q")
    assert code == 1 and f"error: {tmp_path / 'ro' / 'q'}: could not write the checkpoint" in err
    assert "Permission denied" in err and reads == []


@pytest.fixture(scope="module")
def fuzz_inputs(tiny_weights, tmp_path_factory):
    """A base checkpoint, an adapter for it and a few things that are neither, for the command-line fuzz."""
    from qwenaudio import lora

    root = tmp_path_factory.mktemp("fuzz")
    model = qwenaudio.load(tiny_weights, dtype=torch.float32, device="cpu", progress=False)
    lora.apply_lora(model, lora.LoraConfig(rank=2))
    lora.save_adapter(model, root / "adapter")
    (root / "file.txt").write_text("not a checkpoint")
    (root / "empty").mkdir()
    return root


def test_quantize_and_merge_options_fuzzed(tiny_weights, fuzz_inputs, tmp_path_factory, capsys):
    """Random values for --bits, --group-size and --dtype, and random files and directories for each path: every
    run ends in exit 0 with a checkpoint that loads, or one `error:` line with its exit code; the inputs never
    change."""
    from hypothesis import event, example, given
    from hypothesis import strategies as st

    from .test_fuzz import fuzz

    root = fuzz_inputs
    paths = {"base": tiny_weights, "adapter": root / "adapter", "file": root / "file.txt", "empty": root / "empty",
             "missing": root / "missing", "inside base": tiny_weights / "out", "inside adapter": root / "adapter" / "o"}
    numbers = st.one_of(st.sampled_from(["4", "8", "32", "64", "128"]), st.integers(-2, 200).map(str),
                        st.sampled_from(["", "x", "1e3", "nan"]))
    inputs = [tiny_weights, root]
    before = [fingerprint(p) for p in inputs]

    @fuzz(8)
    @example("quantize", "base", "base", "new", "4", None, None, False)  # the good paths, whatever is drawn
    @example("merge", "base", "adapter", "new", None, None, "float32", True)
    @given(command=st.sampled_from(["quantize", "merge"]), source=st.sampled_from(sorted(paths)),
           adapter=st.sampled_from(sorted(paths)), target=st.sampled_from([*sorted(paths), "new"]),
           bits=st.none() | numbers, group=st.none() | numbers, dtype=st.none() | st.sampled_from(
               ["float32", "bfloat16", "float16", "int8", ""]), overwrite=st.booleans())
    def once(command, source, adapter, target, bits, group, dtype, overwrite):
        out = tmp_path_factory.mktemp("out") / "new" if target == "new" else paths[target]
        args = [command, paths[source], *([paths[adapter]] if command == "merge" else []), out]
        args += [*(["--bits", bits] if bits is not None and command == "quantize" else []),
                 *(["--group-size", group] if group is not None and command == "quantize" else []),
                 *(["--dtype", dtype] if dtype is not None and command == "merge" else []),
                 *(["--overwrite"] if overwrite else [])]
        code, err = run(capsys, *args)
        event(f"{command} exit {code}")
        assert code in (0, 1, 2, 3) and "Traceback" not in err, err
        if code == 0:
            assert qwenaudio.load(out, dtype=torch.float32, device="cpu", progress=False) is not None
            shutil.rmtree(out)
            out.mkdir(exist_ok=target == "new")  # "empty" stays an empty directory for the next example
        assert [fingerprint(p) for p in inputs] == before

    once()
