"""Checkpoint I/O: the official tensor table (docs/MODEL.md#tensors), tiny checkpoints written and read back, a
full-size checkpoint read on the meta device, and every kind of broken checkpoint."""

import hashlib
import json
import math
import shutil
import struct
from unittest import mock

import numpy as np
import pytest
import torch

import qwenaudio
from qwenaudio import CheckpointError, ConfigError, QwenAudioConfig, load_checkpoint, save_checkpoint, tensor_shapes
from qwenaudio.core.checkpoint import (INDEX_FILE, module_path, official_name, plan_shards, quantized_names,
                                       shard_name, split_state, write_index, write_shards)
from qwenaudio.core.int8 import METHOD
from qwenaudio.testing import OFFICIAL_CONFIG, make_tiny_checkpoint, tiny_config

from .golden.official_tensors import official_tensors, quantized_weights

# The official checkpoint's tensors at full size, written out with literal shapes: {i} runs over 32 decoder layers,
# {j} over 32 encoder blocks. tests/golden/official_tensors.py writes the same table as formulas of the config.
OFFICIAL_TABLE = {
    "transformer.wte.weight": (155947, 4096),
    "transformer.h.{i}.ln_1.weight": (4096,), "transformer.h.{i}.ln_2.weight": (4096,),
    "transformer.h.{i}.attn.c_attn.weight": (12288, 4096), "transformer.h.{i}.attn.c_attn.bias": (12288,),
    "transformer.h.{i}.attn.c_proj.weight": (4096, 4096),
    "transformer.h.{i}.mlp.w1.weight": (11008, 4096), "transformer.h.{i}.mlp.w2.weight": (11008, 4096),
    "transformer.h.{i}.mlp.c_proj.weight": (4096, 11008),
    "transformer.ln_f.weight": (4096,),
    "lm_head.weight": (155947, 4096),
    "transformer.audio.positional_embedding": (1500, 1280),
    "transformer.audio.conv1.weight": (1280, 80, 3), "transformer.audio.conv1.bias": (1280,),
    "transformer.audio.conv2.weight": (1280, 1280, 3), "transformer.audio.conv2.bias": (1280,),
    "transformer.audio.blocks.{j}.attn.query.weight": (1280, 1280), "transformer.audio.blocks.{j}.attn.query.bias": (1280,),
    "transformer.audio.blocks.{j}.attn.key.weight": (1280, 1280),
    "transformer.audio.blocks.{j}.attn.value.weight": (1280, 1280), "transformer.audio.blocks.{j}.attn.value.bias": (1280,),
    "transformer.audio.blocks.{j}.attn.out.weight": (1280, 1280), "transformer.audio.blocks.{j}.attn.out.bias": (1280,),
    "transformer.audio.blocks.{j}.attn_ln.weight": (1280,), "transformer.audio.blocks.{j}.attn_ln.bias": (1280,),
    "transformer.audio.blocks.{j}.mlp_ln.weight": (1280,), "transformer.audio.blocks.{j}.mlp_ln.bias": (1280,),
    "transformer.audio.blocks.{j}.mlp.0.weight": (5120, 1280), "transformer.audio.blocks.{j}.mlp.0.bias": (5120,),
    "transformer.audio.blocks.{j}.mlp.2.weight": (1280, 5120), "transformer.audio.blocks.{j}.mlp.2.bias": (1280,),
    "transformer.audio.ln_post.weight": (1280,), "transformer.audio.ln_post.bias": (1280,),
    "transformer.audio.proj.weight": (4096, 1280), "transformer.audio.proj.bias": (4096,),
    "transformer.audio.audio_bos_eos_token.weight": (2, 4096),
}
OFFICIAL_SHAPES = {
    name.format(i=k, j=k): shape
    for name, shape in OFFICIAL_TABLE.items()
    for k in (range(32) if "{" in name else [None])
}
FULL = QwenAudioConfig.from_dict(OFFICIAL_CONFIG)


def test_the_two_hand_tables_agree_at_full_size():
    shapes = official_tensors(FULL)
    assert len(shapes) == len(OFFICIAL_SHAPES) == 749
    assert shapes == OFFICIAL_SHAPES
    params = sum(math.prod(s) for s in shapes.values())
    assert params == 8_396_222_464 and 2 * params == 16_792_444_928  # all bf16


TABLE_CONFIGS = {
    "full": OFFICIAL_CONFIG,
    "full int8": {**OFFICIAL_CONFIG, "quantization": METHOD},
    "tiny": tiny_config(),
    "tiny int8": {**tiny_config(), "quantization": METHOD},
    "other dims": tiny_config(num_hidden_layers=3, n_layer=1, hidden_size=32, kv_channels=8, intermediate_size=100,
                              n_state=48, n_head=3, n_ctx=20, vocab_size=155_300),
}


@pytest.mark.parametrize("raw", TABLE_CONFIGS.values(), ids=TABLE_CONFIGS.keys())
def test_tensor_table_read_off_the_modules_is_the_hand_table(raw):
    """Names, shapes and order: tiny checkpoints draw their weights in this order, so it fixes their bytes."""
    config = QwenAudioConfig.from_dict(raw)
    assert list(tensor_shapes(config).items()) == list(official_tensors(config).items())
    assert quantized_names(config) == quantized_weights(config)


def test_official_names_map_to_module_paths_and_back():
    pairs = {"transformer.wte.weight": ("decoder", "wte.weight"),
             "transformer.h.1.attn.c_attn.bias": ("decoder", "h.1.attn.c_attn.bias"),
             "transformer.ln_f.weight": ("decoder", "ln_f.weight"),
             "lm_head.weight": ("decoder", "lm_head.weight"),
             "lm_head.weight_scale": ("decoder", "lm_head.weight_scale"),
             "transformer.audio.positional_embedding": ("encoder", "positional_embedding"),
             "transformer.audio.blocks.0.mlp.2.bias": ("encoder", "blocks.0.mlp.2.bias")}
    for name, (owner, path) in pairs.items():
        assert module_path(name) == (owner, path) and official_name(owner, path) == name
    assert split_state({name: k for k, name in enumerate(pairs)}) == {
        "encoder": {"positional_embedding": 5, "blocks.0.mlp.2.bias": 6},
        "decoder": {"wte.weight": 0, "h.1.attn.c_attn.bias": 1, "ln_f.weight": 2, "lm_head.weight": 3,
                    "lm_head.weight_scale": 4}}
    with pytest.raises(CheckpointError, match="'model.embed_tokens.weight' is not an official tensor name"):
        split_state({"model.embed_tokens.weight": 0})


def write_sparse_checkpoint(directory, shapes, max_shard_bytes):
    """Official layout with real headers and all-zero data in sparse files: full size at no disk cost."""
    nbytes = {n: 2 * math.prod(s) for n, s in shapes.items()}
    shards = plan_shards(nbytes, max_shard_bytes)
    for i, names in enumerate(shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for n in names:
            header[n] = {"dtype": "BF16", "shape": list(shapes[n]), "data_offsets": [offset, offset + nbytes[n]]}
            offset += nbytes[n]
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        with open(directory / shard_name(i, len(shards)), "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            f.truncate(8 + len(blob) + offset)
    write_index(directory, shards, sum(nbytes.values()))


def test_full_size_checkpoint_on_meta_device(tmp_path):
    write_sparse_checkpoint(tmp_path, OFFICIAL_SHAPES, max_shard_bytes=2 * 10**9)
    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL_CONFIG))
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == 16_792_444_928
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{k}-of-00009.safetensors" for k in range(1, 10)]

    state = load_checkpoint(tmp_path, device="meta")
    assert {n: tuple(t.shape) for n, t in state.items()} == OFFICIAL_SHAPES
    assert all(t.device.type == "meta" and t.dtype == torch.bfloat16 for t in state.values())
    assert load_checkpoint(tmp_path, device="meta", dtype=torch.float32)["lm_head.weight"].dtype == torch.float32


def test_tiny_checkpoint_has_official_layout(tiny_ckpt):
    files = sorted(p.name for p in tiny_ckpt.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and all(f.endswith(f"-of-0000{len(shards)}.safetensors") for f in shards)
    assert set(files) == {"config.json", "generation_config.json", "tokenizer_config.json", "qwen.tiktoken",
                          "mel_filters.npz", INDEX_FILE, *shards}
    assert np.load(tiny_ckpt / "mel_filters.npz")["mel_80"].shape == (80, 201)
    index = json.loads((tiny_ckpt / INDEX_FILE).read_text())
    config = QwenAudioConfig.from_json(tiny_ckpt)
    assert list(index["weight_map"]) == list(tensor_shapes(config))
    assert config.hidden_size == 64 and config.audio.n_state == 64 and config.audio.output_dim == 64


def test_tiny_checkpoint_round_trip(tiny_ckpt, tmp_path):
    config = QwenAudioConfig.from_json(tiny_ckpt)
    state = load_checkpoint(tiny_ckpt)
    assert {n: tuple(t.shape) for n, t in state.items()} == tensor_shapes(config)
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in state.values())
    total = json.loads((tiny_ckpt / INDEX_FILE).read_text())["metadata"]["total_size"]
    assert total == sum(t.numel() * 2 for t in state.values())

    save_checkpoint(state, tmp_path, max_shard_bytes=4 * 1024**2)
    shutil.copy(tiny_ckpt / "config.json", tmp_path)
    again = load_checkpoint(tmp_path)
    assert list(again) == list(state) and all(torch.equal(again[n], state[n]) for n in state)

    as_fp32 = load_checkpoint(tiny_ckpt, dtype=torch.float32)
    assert all(as_fp32[n].dtype == torch.float32 and torch.equal(as_fp32[n], state[n].float()) for n in state)


def file_hashes(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_tiny_checkpoint_is_deterministic(tmp_path, vocab_file):
    a = make_tiny_checkpoint(tmp_path / "a", seed=3, vocab_file=vocab_file)
    b = make_tiny_checkpoint(tmp_path / "b", seed=3, vocab_file=vocab_file)
    c = make_tiny_checkpoint(tmp_path / "c", seed=4, vocab_file=vocab_file)
    assert file_hashes(a) == file_hashes(b)
    assert file_hashes(a)["model-00001-of-00003.safetensors"] != file_hashes(c)["model-00001-of-00003.safetensors"]


def test_weights_come_from_numpy_pcg64_alone(tiny_ckpt):
    """The first tensor drawn (wte) equals PCG64 normals rounded to bf16 in numpy: no torch RNG involved."""
    rng = np.random.Generator(np.random.PCG64(0))
    bits = rng.standard_normal((155947, 64), dtype=np.float32).view(np.uint32).astype(np.uint64)
    expected = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
    stored = load_checkpoint(tiny_ckpt)["transformer.wte.weight"].view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(stored, expected)


def test_tiny_dims_can_be_overridden(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "x", num_hidden_layers=3, n_layer=1, hidden_size=32, kv_channels=8)
    config = QwenAudioConfig.from_json(path)
    assert (config.num_hidden_layers, config.audio.n_layer, config.hidden_size, config.audio.output_dim) == (3, 1, 32, 32)
    assert len(load_checkpoint(path)) == 3 + 3 * 8 + 10 + 15
    with pytest.raises(ConfigError, match="unknown dimension 'n_layers'"):
        make_tiny_checkpoint(tmp_path / "y", n_layers=2)


def test_prefix_reads_only_matching_tensors(tiny_ckpt, broken):
    encoder = load_checkpoint(tiny_ckpt, prefix="transformer.audio.")
    assert len(encoder) == 5 + 2 * 15 + 5 and all(n.startswith("transformer.audio.") for n in encoder)
    index = json.loads((broken / INDEX_FILE).read_text())  # a broken decoder tensor is still reported
    index["weight_map"]["transformer.h.9.ln_1.weight"] = "model-00001-of-00003.safetensors"
    (broken / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="places 'transformer.h.9.ln_1.weight' here"):
        load_checkpoint(broken, prefix="transformer.audio.")


def test_single_file_checkpoint(tiny_ckpt, tmp_path):
    state = load_checkpoint(tiny_ckpt)
    from safetensors.torch import save_file

    save_file(state, tmp_path / "model.safetensors")
    shutil.copy(tiny_ckpt / "config.json", tmp_path)
    for source in (tmp_path, tmp_path / "model.safetensors"):
        again = load_checkpoint(source)
        assert all(torch.equal(again[n], state[n]) for n in state)


@pytest.fixture
def broken(tiny_ckpt, tmp_path):
    """A writable copy of the tiny checkpoint."""
    return shutil.copytree(tiny_ckpt, tmp_path / "ckpt")


def test_missing_shard(broken):
    (broken / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=f"missing shard file.* named in {INDEX_FILE}: model-00002-of-00003"):
        load_checkpoint(broken)


def test_truncated_shard(broken):
    shard = broken / "model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model-00003-of-00003.safetensors: cannot read safetensors header"):
        load_checkpoint(broken)


def test_wrong_shape_missing_and_unexpected_in_one_error(broken, tmp_path):
    state = load_checkpoint(broken)
    state["transformer.h.1.mlp.w1.weight"] = torch.zeros(100, 64, dtype=torch.bfloat16)
    del state["transformer.audio.blocks.0.attn.key.weight"]
    state["transformer.h.2.ln_1.weight"] = torch.ones(64, dtype=torch.bfloat16)
    for f in broken.glob("model*"):
        f.unlink()
    save_checkpoint(state, broken)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(broken)
    message = str(e.value)
    assert "missing (1):\n    transformer.audio.blocks.0.attn.key.weight" in message
    assert "unexpected (1):\n    transformer.h.2.ln_1.weight" in message
    assert "wrong shape (1):\n    transformer.h.1.mlp.w1.weight: stored [100, 64], expected [128, 64]" in message


def test_index_places_tensor_in_wrong_shard(broken):
    index = json.loads((broken / INDEX_FILE).read_text())
    index["weight_map"]["lm_head.weight"] = "model-00001-of-00003.safetensors"
    (broken / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00001-of-00003.safetensors: .* places 'lm_head.weight' here"):
        load_checkpoint(broken)


def test_corrupt_index(broken):
    (broken / INDEX_FILE).write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=f"{INDEX_FILE}: not a safetensors index with a 'weight_map'"):
        load_checkpoint(broken)


def test_directory_without_weights(tmp_path):
    with pytest.raises(CheckpointError, match=f"neither {INDEX_FILE} nor model.safetensors is there"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="checkpoint not found: .*/nowhere"):
        load_checkpoint(tmp_path / "nowhere")


def test_plan_shards_keeps_order_and_limit():
    sizes = {"a": 4, "b": 4, "c": 10, "d": 1, "e": 3}
    assert plan_shards(sizes, 8) == [["a", "b"], ["c"], ["d", "e"]]
    assert [shard_name(i, 3) for i in range(3)] == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]


def test_write_shards_makes_each_tensor_only_when_its_shard_is_written(tmp_path):
    """A full-size random checkpoint must never be whole in memory: tensors are asked for shard by shard."""
    layout = {f"t{i}": ((256,), torch.float32) for i in range(6)}  # 1 KiB each, 2 per shard
    made = []

    def make(name):
        made.append((name, sorted(p.name for p in tmp_path.glob("*.safetensors"))))
        return torch.full((256,), float(name[1:]))

    write_shards(layout, make, tmp_path, max_shard_bytes=2048)
    assert [m[1] for m in made] == [[]] * 2 + [[shard_name(0, 3)]] * 2 + [[shard_name(0, 3), shard_name(1, 3)]] * 2
    assert json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]["t5"] == shard_name(2, 3)


def test_tiny_checkpoint_checks_first_and_leaves_nothing_half_written(tmp_path, vocab_file):
    with pytest.raises(qwenaudio.TokenizerError, match="make_tiny_checkpoint: vocabulary file not found: missing"):
        make_tiny_checkpoint(tmp_path / "a", vocab_file="missing")
    with pytest.raises(KeyboardInterrupt), mock.patch("qwenaudio.testing.np.savez", side_effect=KeyboardInterrupt):
        make_tiny_checkpoint(tmp_path / "b")
    assert list(tmp_path.iterdir()) == []
    made = make_tiny_checkpoint(tmp_path / "c", vocab_file=vocab_file)
    with pytest.raises(qwenaudio.InputError, match="exists and is not an empty directory"):
        make_tiny_checkpoint(made)
    assert len(qwenaudio.load_checkpoint(made, device="meta")) == 59
