"""LoRA: a fresh adapter changes nothing, merging equals the unmerged model, adapters round-trip through peft's
format both ways (peft, a test-only reference, on a module holding our decoder under the official names), and an
int8 base trains only its adapter."""

import pytest
import torch
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
    model = fresh(tiny_weights, int8=True)
    params = lora.apply_lora(model, lora.LoraConfig(rank=2))
    randomize(model)
    loss = model.decoder.logits(IDS).float().logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for p in params.values())
    layer = model.decoder.h[0].attn.c_attn
    assert isinstance(layer, lora.LoraLinear) and layer.base.weight.dtype == torch.int8
    with pytest.raises(qwenaudio.InputError, match="int8 weights would round the update away"):
        lora.merge_lora(model)


def test_bad_adapters_are_refused(tiny_weights, tmp_path):
    with pytest.raises(qwenaudio.InputError, match="not a LoRA adapter"):
        lora.load_adapter(fresh(tiny_weights), tmp_path)
    model = fresh(tiny_weights)
    lora.apply_lora(model, lora.LoraConfig(rank=4))
    lora.save_adapter(model, tmp_path / "a")
    other = qwenaudio.load(tiny_weights, dtype=torch.float32, device="cpu", progress=False)
    other.decoder.h = other.decoder.h[:1]  # a model with one block less
    with pytest.raises(qwenaudio.InputError, match="the adapter does not fit this model: missing"):
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
