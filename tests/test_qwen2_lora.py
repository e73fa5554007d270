"""Qwen2-Audio LoRA adapters against peft 0.21.2 over transformers 5.25.0's Qwen2AudioForConditionalGeneration:
an adapter peft made loads here with the same logits, ours loads into peft with the same logits and the same tensor
names peft writes, `merge_checkpoint` writes a checkpoint transformers loads with the adapted logits, and an adapter
of the other family is one clear error.

peft keys an adapter by the live module names: over transformers 5 `base_model.model.model.language_model.layers.0.
self_attn.q_proj.lora_A.weight` (the checkpoint's `language_model.model.` is transformers' `model.language_model.`);
over transformers 4 it wrote the checkpoint's names, `base_model.model.language_model.model.layers.0…`, which are
read here too. All in fp32, compared at 1e-5 of the logits' largest magnitude, on a prompt with a clip (the audio
tower's adapted layers count).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qwenaudio
from qwenaudio import lora
from qwenaudio.core.audio import load_audio
from qwenaudio.core.model import prompt_batch

from .conftest import GOLDEN, reference

CLIP = load_audio(GOLDEN / "clip0.wav")
PROMPT = "<|audio_bos|><|AUDIO|><|audio_eos|>Generate the caption in English:"
RTOL = 1e-5  # fp32: of the logits' largest magnitude
ALL_LINEAR = r"^(?!.*audio_tower).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"  # LLaMA-Factory's


def ours(ckpt: Path, **kwargs) -> qwenaudio.QwenAudio:
    return qwenaudio.load(ckpt, dtype=torch.float32, device="cpu", progress=False, **kwargs)


def theirs(ckpt: Path):
    transformers = reference("transformers")
    return transformers.Qwen2AudioForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()


def our_logits(model) -> torch.Tensor:
    batch = prompt_batch(model.tokenizer, [PROMPT], [[CLIP]], model.encoder.span_length)
    with torch.no_grad():
        return model(batch.input_ids, batch.attention_mask, [CLIP])


def their_logits(model, tokenizer) -> torch.Tensor:
    """transformers' forward on the same ids, with the features WhisperFeatureExtractor makes for the clip."""
    batch = prompt_batch(tokenizer, [PROMPT], [[CLIP]], lambda n: qwenaudio.core.audio.qwen2_audio_tokens(n))
    features = reference("transformers").WhisperFeatureExtractor(feature_size=128)(
        [CLIP.numpy()], sampling_rate=16_000, return_attention_mask=True, padding="max_length", return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     input_features=features.input_features,
                     feature_attention_mask=features.attention_mask).logits


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    worst = (actual - expected).abs().max().item()
    assert worst <= RTOL * expected.abs().max().item(), worst


def peft_adapter(ckpt: Path, directory: Path, **settings) -> torch.Tensor:
    """An adapter made with peft on transformers' model (random, non-zero A and B), saved to `directory`; returns
    the logits of peft's model."""
    peft = reference("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(theirs(ckpt), peft.LoraConfig(init_lora_weights=False, **settings)).eval()
    model.save_pretrained(str(directory))
    return their_logits(model, ours(ckpt).tokenizer)


def randomize(model) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in lora.lora_parameters(model).items():
            param.copy_(0.05 * torch.randn(param.shape, generator=generator))


def as_transformers_4(adapter: Path, target: Path) -> Path:
    """The adapter keyed as peft wrote it over transformers 4: the checkpoint's module names."""
    shutil.copytree(adapter, target)
    tensors = load_file(str(adapter / lora.WEIGHTS_FILE))
    old = {name.replace("base_model.model.model.language_model.", "base_model.model.language_model.model.")
           .replace("base_model.model.model.audio_tower.", "base_model.model.audio_tower."): t
           for name, t in tensors.items()}
    assert set(old) != set(tensors)
    save_file(old, str(target / lora.WEIGHTS_FILE))
    return target


@pytest.mark.parametrize("settings", [
    {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},  # peft adapts both towers' q_proj, v_proj
    {"r": 2, "lora_alpha": 16, "target_modules": ALL_LINEAR, "use_rslora": True},  # the language model's linears
], ids=["q_v-both-towers", "all-linear-regex"])
def test_a_peft_adapter_loads_here_with_peft_s_logits(tiny_qwen2_ckpt, tmp_path, settings):
    expected = peft_adapter(tiny_qwen2_ckpt, tmp_path / "peft", **settings)
    keys = load_file(str(tmp_path / "peft" / lora.WEIGHTS_FILE))
    assert any(k.startswith("base_model.model.model.language_model.layers.0.self_attn.") for k in keys)
    assert any(".audio_tower." in k for k in keys) == isinstance(settings["target_modules"], list)
    base = our_logits(ours(tiny_qwen2_ckpt))
    assert not torch.allclose(base, expected, atol=1e-3)  # the adapter changes the logits
    assert_close(our_logits(ours(tiny_qwen2_ckpt, adapter=tmp_path / "peft")), expected)
    old = as_transformers_4(tmp_path / "peft", tmp_path / "v4")  # peft over transformers 4's names
    assert_close(our_logits(lora.load_adapter(ours(tiny_qwen2_ckpt), old)), expected)


def test_our_adapter_loads_into_peft_with_our_logits_and_peft_s_names(tiny_qwen2_ckpt, tmp_path, recwarn):
    peft = reference("peft")
    model = ours(tiny_qwen2_ckpt)
    params = lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=8, encoder=True))
    randomize(model)
    assert "base_model.model.model.language_model.layers.1.mlp.down_proj.lora_B.weight" in params
    assert "base_model.model.model.audio_tower.layers.0.fc1.lora_A.weight" in params
    lora.save_adapter(model, tmp_path / "ours")
    wrapped = peft.PeftModel.from_pretrained(theirs(tiny_qwen2_ckpt), str(tmp_path / "ours")).eval()
    assert not [w for w in recwarn if "missing adapter keys" in str(w.message)]
    assert_close(their_logits(wrapped, model.tokenizer), our_logits(model.eval()))

    # peft, given our adapter_config.json, adapts exactly our modules and names their tensors as we do
    config = json.loads((tmp_path / "ours" / lora.CONFIG_FILE).read_text())
    fresh = peft.get_peft_model(theirs(tiny_qwen2_ckpt), peft.LoraConfig(
        r=config["r"], lora_alpha=config["lora_alpha"], target_modules=config["target_modules"]))
    fresh.save_pretrained(str(tmp_path / "peft"))
    assert set(load_file(str(tmp_path / "peft" / lora.WEIGHTS_FILE))) == set(params)


def test_the_default_targets_are_each_language_model_layer_s_linears(tiny_qwen2_ckpt):
    model = ours(tiny_qwen2_ckpt)
    params = lora.apply_lora(model, lora.LoraConfig(rank=2))
    layers = model.config.num_hidden_layers
    assert len(params) == 2 * 7 * layers
    assert {n.split(".")[-3] for n in params} == set(lora.QWEN2_DECODER_TARGETS)
    assert all(n.startswith("base_model.model.model.language_model.layers.") for n in params)
    assert torch.equal(our_logits(model), our_logits(ours(tiny_qwen2_ckpt)))  # B starts at zero


def test_merge_writes_a_checkpoint_transformers_loads_with_the_adapter_s_logits(tiny_qwen2_ckpt, tmp_path, capsys):
    from qwenaudio.cli import main

    expected = peft_adapter(tiny_qwen2_ckpt, tmp_path / "peft", r=4, lora_alpha=8,
                            target_modules=["q_proj", "v_proj", "o_proj", "down_proj", "fc1"])
    merged = lora.merge_checkpoint(tiny_qwen2_ckpt, tmp_path / "peft", tmp_path / "merged", dtype="float32")
    tokenizer = ours(tiny_qwen2_ckpt).tokenizer
    assert_close(their_logits(theirs(merged), tokenizer), expected)
    assert_close(our_logits(ours(merged)), expected)
    assert main(["merge", str(tiny_qwen2_ckpt), str(tmp_path / "peft"), str(tmp_path / "cli"), "--dtype",
                 "float32"]) == 0
    assert_close(their_logits(theirs(tmp_path / "cli"), tokenizer), expected)
    unmerged = lora.merge_lora(ours(tiny_qwen2_ckpt), tmp_path / "peft")  # in memory
    assert_close(our_logits(unmerged), expected)


def test_an_adapter_of_the_other_family_is_one_error_naming_both(tiny_ckpt, tiny_qwen2_ckpt, tmp_path, capsys):
    from qwenaudio.cli import main

    for ckpt, name in ((tiny_ckpt, "v1"), (tiny_qwen2_ckpt, "v2")):
        model = ours(ckpt)
        lora.apply_lora(model, lora.LoraConfig(rank=2))
        lora.save_adapter(model, tmp_path / name)
    for ckpt, adapter, theirs_, model_family in ((tiny_qwen2_ckpt, "v1", "Qwen-Audio", "Qwen2-Audio"),
                                                 (tiny_ckpt, "v2", "Qwen2-Audio", "Qwen-Audio")):
        message = f"this is a {theirs_} adapter .*; the model is {model_family}"
        with pytest.raises(qwenaudio.CheckpointError, match=message):
            ours(ckpt, adapter=tmp_path / adapter)
        with pytest.raises(qwenaudio.CheckpointError, match=message):
            lora.merge_checkpoint(ckpt, tmp_path / adapter, tmp_path / f"merged-{adapter}")
        assert not (tmp_path / f"merged-{adapter}").exists()
        assert main(["merge", str(ckpt), str(tmp_path / adapter), str(tmp_path / f"cli-{adapter}")]) == 3
        assert f"this is a {theirs_} adapter" in capsys.readouterr().err


def test_an_adapter_naming_a_module_this_model_lacks_is_refused(tiny_qwen2_ckpt, tmp_path):
    peft_adapter(tiny_qwen2_ckpt, tmp_path / "a", r=2, lora_alpha=4, target_modules=["q_proj"])
    tensors = load_file(str(tmp_path / "a" / lora.WEIGHTS_FILE))
    name = "base_model.model.model.language_model.layers.9.self_attn.q_proj.lora_A.weight"
    save_file({**tensors, name: torch.zeros(2, 8)}, str(tmp_path / "a" / lora.WEIGHTS_FILE))
    with pytest.raises(qwenaudio.CheckpointError, match=r"does not fit this model: missing .*unknown \['" + name):
        ours(tiny_qwen2_ckpt, adapter=tmp_path / "a")
    save_file({k: v[:1] if "lora_A" in k else v for k, v in tensors.items()}, str(tmp_path / "a" / lora.WEIGHTS_FILE))
    with pytest.raises(qwenaudio.CheckpointError, match="has shape"):
        ours(tiny_qwen2_ckpt, adapter=tmp_path / "a")


@pytest.mark.parametrize("extra", [{"use_dora": True}, {"rank_pattern": {"q_proj": 4}},
                                   {"alpha_pattern": {"q_proj": 2}}])
def test_peft_variants_that_compute_otherwise_are_refused(tiny_qwen2_ckpt, tmp_path, extra):
    """DoRA and per-layer ranks or alphas change what a layer computes: read as plain LoRA they would give other
    logits than peft's, silently."""
    peft_adapter(tiny_qwen2_ckpt, tmp_path / "a", r=2, lora_alpha=4, target_modules=["q_proj"], **extra)
    with pytest.raises(qwenaudio.CheckpointError, match=f"{tmp_path / 'a'}.*only plain LoRA is supported .*, got "
                                                        f"{next(iter(extra))}"):
        lora.read_adapter(tmp_path / "a")
