"""Int8 and int4 on Qwen2-Audio: which linears are quantized (named as transformers' checkpoint names them),
quantizing on load, `qwenaudio quantize` writing a checkpoint in the published layout that loads back quantized,
int8's agreement with the float model, and the refusals Qwen-Audio's quantization has."""

import json
import shutil

import pytest
import torch

import qwenaudio
from qwenaudio import ConfigError, InputError, OutputError
from qwenaudio.core.audio import load_audio
from qwenaudio.core.checkpoint import int4_group_size, quantized_names, read_header, tensor_shapes
from qwenaudio.core.families import read_config
from qwenaudio.core.int4 import Int4Linear, quantize_int4
from qwenaudio.core.int8 import Int8Linear, quantize_int8
from qwenaudio.core.qwen2_audio import Qwen2AudioConfig
from qwenaudio.quantize import save_quantized
from qwenaudio.testing import make_tiny_qwen2_checkpoint

from .conftest import GOLDEN
from .test_lora import run
from .test_quantize import fingerprint

# The published layout's files besides the tensors, which a quantized copy keeps byte for byte.
COPIED = ["generation_config.json", "merges.txt", "preprocessor_config.json", "tokenizer_config.json", "vocab.json"]
LAYER = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj"]


def load(path, **kwargs):
    return qwenaudio.load(path, dtype=torch.float32, device="cpu", progress=False, **kwargs)


def test_every_decoder_linear_is_quantized_under_its_published_name(tiny_qwen2_ckpt):
    config = read_config(tiny_qwen2_ckpt)
    assert quantized_names(config) == [f"language_model.model.layers.{i}.{m}.weight" for i in range(2) for m in LAYER] \
        + ["language_model.lm_head.weight"]
    assert int4_group_size(config) == 64  # tiny: 64 and 128 inputs
    shapes = tensor_shapes(config)
    assert all(name in shapes for name in quantized_names(config))
    assert not any(n.startswith(("audio_tower.", "multi_modal_projector.")) for n in quantized_names(config))


@pytest.mark.parametrize("quantize, layer", [("int8", Int8Linear), ("int4", Int4Linear)])
def test_quantizing_on_load_equals_quantizing_after_load(tiny_qwen2_ckpt, quantize, layer):
    during = qwenaudio.load_decoder(tiny_qwen2_ckpt, dtype=torch.float32, quantize=quantize)
    after = qwenaudio.load_decoder(tiny_qwen2_ckpt, dtype=torch.float32)
    (quantize_int8 if quantize == "int8" else quantize_int4)(after)
    modules = dict(during.named_modules())
    assert all(isinstance(modules[f"model.layers.{i}.{m}"], layer) for i in range(2) for m in LAYER)
    assert isinstance(during.lm_head, layer) and during.model.embed_tokens.weight.dtype == torch.float32
    assert after.state_dict().keys() == during.state_dict().keys()
    for name, tensor in after.state_dict().items():
        assert torch.equal(tensor, during.state_dict()[name]), name


def test_an_int8_checkpoint_keeps_the_published_layout_and_loads_back_quantized(tiny_qwen2_ckpt, tmp_path):
    target = save_quantized(tiny_qwen2_ckpt, tmp_path / "int8")
    raw, original = (json.loads((d / "config.json").read_text()) for d in (target, tiny_qwen2_ckpt))
    assert raw["quantization"] == "int8-weight-only" and "quantization_group_size" not in raw
    assert raw["model_type"] == "qwen2_audio" and raw["architectures"] == original["architectures"]
    assert {"text_config", "audio_config"} <= raw.keys() and "quantization" not in raw["text_config"]
    unmarked = {k: v for k, v in raw.items() if k != "quantization"}
    assert Qwen2AudioConfig.from_dict(unmarked).to_dict() == Qwen2AudioConfig.from_dict(original).to_dict()
    for name in COPIED:
        assert (target / name).read_bytes() == (tiny_qwen2_ckpt / name).read_bytes(), name
    header = read_header(next(target.glob("*.safetensors")))
    assert header["language_model.lm_head.weight"][0] == torch.int8
    assert header["language_model.lm_head.weight_scale"] == (torch.bfloat16, (156032,))
    assert header["audio_tower.layers.0.fc1.weight"][0] == torch.bfloat16  # the encoder stays in float

    # int8 because the config says so; in bf16, the dtype its scales are stored in
    stored, fresh = (qwenaudio.load(p, dtype=torch.bfloat16, progress=False, **q) for p, q in
                     ((target, {}), (tiny_qwen2_ckpt, {"quantize": "int8"})))
    assert isinstance(stored.decoder.model.layers[1].mlp.up_proj, Int8Linear)
    ids = torch.randint(0, 151643, (2, 7))
    with torch.no_grad():
        assert torch.equal(stored.decoder.logits(ids), fresh.decoder.logits(ids))


def test_the_quantize_command_writes_an_int4_checkpoint_that_loads_back_quantized(tiny_qwen2_ckpt, tmp_path, capsys):
    code, err = run(capsys, "quantize", tiny_qwen2_ckpt, tmp_path / "int4", "--bits", "4", "--group-size", "32")
    assert code == 0 and f"wrote {tmp_path / 'int4'}" in err
    target = tmp_path / "int4"
    raw = json.loads((target / "config.json").read_text())
    assert (raw["quantization"], raw["quantization_group_size"], raw["model_type"]) == (
        "int4-weight-only", 32, "qwen2_audio")
    shapes, floats = tensor_shapes(read_config(target)), tensor_shapes(read_config(tiny_qwen2_ckpt))
    for name in quantized_names(read_config(tiny_qwen2_ckpt)):  # half a byte a weight, a scale and zero per 32
        rows, inputs = floats[name]
        assert shapes[name] == (rows, inputs // 2) and shapes[name + "_scale"] == shapes[name + "_zero"] == (
            rows, inputs // 32)
    stored, fresh = (qwenaudio.load(p, dtype=torch.bfloat16, progress=False) for p in (target, tiny_qwen2_ckpt))
    quantize_int4(fresh.decoder, 32)
    assert isinstance(stored.decoder.lm_head, Int4Linear) and stored.decoder.lm_head.group_size == 32
    ids = torch.randint(0, 151643, (2, 7))
    with torch.no_grad():
        assert torch.equal(stored.decoder.logits(ids), fresh.decoder.logits(ids))


def test_a_quantized_v2_checkpoint_is_refused_what_v1_refuses(tiny_qwen2_ckpt, tmp_path, capsys):
    target = save_quantized(tiny_qwen2_ckpt, tmp_path / "int4", bits=4)
    with pytest.raises(InputError, match="already int4-weight-only; load its float original to quantize it as int8"):
        load(target, quantize="int8")
    with pytest.raises(InputError, match="is already quantized"):
        save_quantized(target, tmp_path / "again", bits=8)
    code, err = run(capsys, "quantize", target, tmp_path / "again")
    assert code == 2 and "is already quantized (int4-weight-only): quantize its float original" in err
    raw = json.loads((target / "config.json").read_text())
    raw["quantization_group_size"] = 48  # no layout of ours: refused before any tensor is read
    (target / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="quantization_group_size 48 must be one of 32, 64, 128 for int4"):
        load(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int4"]
    with pytest.raises(ConfigError, match="quantization 'int4' is not supported"):
        Qwen2AudioConfig.from_dict({**raw, "quantization": "int4"})


def test_ctrl_c_leaves_nothing_behind(tiny_qwen2_ckpt, tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(qwenaudio.core.checkpoint, "save_file", interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(tiny_qwen2_ckpt, tmp_path / "int8")
    assert list(tmp_path.iterdir()) == []


def test_target_rules_hold_for_v2(tiny_qwen2_ckpt, tmp_path, capsys):
    source = shutil.copytree(tiny_qwen2_ckpt, tmp_path / "source")
    before = fingerprint(source)
    with pytest.raises(OutputError, match="lies inside the input"):
        save_quantized(source, source / "int8")
    other = shutil.copytree(tiny_qwen2_ckpt, tmp_path / "other")
    code, err = run(capsys, "quantize", source, other)
    assert code == 1 and "exists and is not empty" in err
    assert run(capsys, "quantize", source, other, "--overwrite")[0] == 0
    assert read_config(other).quantization == "int8-weight-only" and fingerprint(source) == before
    code, err = run(capsys, "quantize", source, tmp_path / "q", "--group-size", "32")
    assert code == 2 and "--group-size: only with --bits 4" in err
    shard = sorted(source.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:1000])
    code, err = run(capsys, "quantize", source, tmp_path / "q", "--bits", "4")
    assert code == 3 and str(shard) in err and "truncated or corrupt" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "source"]


def test_int4_group_sizes_name_the_v2_layer(tmp_path, capsys):
    mlp96 = make_tiny_qwen2_checkpoint(tmp_path / "mlp96", seed=0, intermediate_size=96)
    with pytest.warns(UserWarning, match="int4: groups of 32, since 64 does not divide the 96 inputs of "
                                         "language_model.model.layers.0.mlp.down_proj.weight"):
        model = load(mlp96, quantize="int4")
    assert model.decoder.model.layers[0].mlp.down_proj.group_size == model.decoder.lm_head.group_size == 32
    with pytest.raises(InputError, match="group size 64 does not divide the 96 inputs of language_model.model."
                                         "layers.0.mlp.down_proj.weight: --group-size 32 fits every layer"):
        save_quantized(mlp96, tmp_path / "q", bits=4, group_size=64)
    odd = make_tiny_qwen2_checkpoint(tmp_path / "odd", seed=0, intermediate_size=40)
    code, err = run(capsys, "quantize", odd, tmp_path / "q", "--bits", "4")
    assert code == 2 and "no int4 group size (32, 64, 128) divides the 40 inputs of language_model.model.layers.0." \
        "mlp.down_proj.weight" in err and "--bits 8" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp96", "odd"]
    assert run(capsys, "quantize", odd, tmp_path / "q")[0] == 0  # int8 takes any width


STEPS = 12
PROMPTS = ["<|audio_bos|><|AUDIO|><|audio_eos|>Detect the language and recognize the speech: <|en|>",
           "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nWhat does the person say?"]


@pytest.fixture(scope="module")
def replies(tiny_qwen2_ckpt):
    """The float model's and int8's greedy replies to a left-padded batch of two prompts with a clip each, and each
    model's logits teacher-forced along the float model's replies: per prompt, [reply steps, vocab]."""
    clips = [[load_audio(GOLDEN / "clip0.wav")], [load_audio(GOLDEN / "clip1.wav")]]
    models = [load(tiny_qwen2_ckpt), load(tiny_qwen2_ckpt, quantize="int8")]
    greedy = dict(do_sample=False, top_p=1.0, max_new_tokens=STEPS, min_new_tokens=STEPS, full_vocab=True)
    answers = [m.generate(PROMPTS, clips, **greedy) for m in models]
    ids = [models[0].tokenizer.encode(p, audio_spans=[models[0].encoder.span_length(len(c)) for c in own]) + a
           for p, own, a in zip(PROMPTS, clips, answers[0])]
    width = max(map(len, ids))
    input_ids = torch.tensor([[151643] * (width - len(row)) + row for row in ids])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids])
    with torch.no_grad():  # position -STEPS - 1 predicts the first reply token
        logits = [m.decoder.logits(input_ids, mask, m.encode_audio([c for own in clips for c in own]))
                  [:, -STEPS - 1 : -1] for m in models]
    return answers, logits


def decided(exact, quantized):
    """Where the float model's top two logits are further apart than twice int8's largest error there: int8 must
    choose the same token."""
    error = (quantized - exact).abs().amax(-1)
    top2 = exact.topk(2, dim=-1).values
    return (top2[..., 0] - top2[..., 1]) > 2 * error


def test_int8_agrees_with_the_float_model_wherever_it_is_decided(replies):
    """As for Qwen-Audio (test_quantize.py): random weights give near-flat next-token distributions, so greedy
    replies may part where the float model's top two are closer than the quantization error; wherever its margin
    exceeds twice that error, int8 must choose the same token."""
    _, (exact, quantized) = replies
    assert (quantized - exact).abs().max() / exact.abs().max() < 2e-2
    sure = decided(exact, quantized)
    assert sure.float().mean() > 0.5
    assert torch.equal(quantized.argmax(-1)[sure], exact.argmax(-1)[sure])


def test_int8_greedy_replies_part_from_the_float_ones_only_at_a_close_call(replies):
    """Measured: one reply is the same for all 12 steps, the other for 4, then parts where the float model's top
    two are 0.006 apart (int8's error there: 0.06)."""
    (fp32, int8), (exact, quantized) = replies
    sure = decided(exact, quantized)
    for row, (a, b) in enumerate(zip(fp32, int8)):
        assert len(a) == len(b) == STEPS
        parted = next((k for k in range(STEPS) if a[k] != b[k]), None)
        assert parted is None or not sure[row, parted], (row, parted)
    assert any(a == b for a, b in zip(fp32, int8))
