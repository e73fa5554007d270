"""config.json parsing: the official values (docs/MODEL.md#config), the MLP-width rule, and every way a field can be
wrong."""

import copy
import json
import os
import threading

import pytest

from qwenaudio import ConfigError, GenerationConfig, QwenAudioConfig
from qwenaudio.testing import OFFICIAL_CONFIG

REQUIRED = ["vocab_size", "hidden_size", "num_attention_heads", "kv_channels", "num_hidden_layers",
            "intermediate_size", "layer_norm_epsilon", "rotary_emb_base", "rotary_pct", "seq_length",
            "use_dynamic_ntk", "use_logn_attn", "no_bias", "tie_word_embeddings", "audio"]
REQUIRED_AUDIO = ["n_mels", "n_ctx", "n_state", "n_head", "n_layer", "output_dim", "avg_pool",
                  "add_audio_bos_eos_token", "audio_start_id"]


def official():
    return copy.deepcopy(OFFICIAL_CONFIG)


def test_official_values():
    c = QwenAudioConfig.from_dict(official())
    assert (c.vocab_size, c.hidden_size, c.num_attention_heads, c.kv_channels, c.num_hidden_layers) == (
        155947, 4096, 32, 128, 32)
    assert c.intermediate_size == 22016 and c.mlp_width == 11008
    assert c.layer_norm_epsilon == 1e-6 and c.rotary_emb_base == 10000.0 and c.seq_length == 2048
    assert c.use_dynamic_ntk and c.use_logn_attn and c.no_bias and not c.tie_word_embeddings
    a = c.audio
    assert (a.n_mels, a.n_ctx, a.n_state, a.n_head, a.n_layer, a.output_dim) == (80, 1500, 1280, 20, 32, 4096)
    assert a.head_dim == 64 and a.audio_start_id == 155163 and a.audio_end_id == 155164


def test_github_variant_loads():
    raw = official() | {"layer_norm_epsilon": 1e-05}  # the GitHub copy of config.json
    assert QwenAudioConfig.from_dict(raw).layer_norm_epsilon == 1e-5


def test_unknown_fields_are_kept_and_written_back():
    raw = official()
    raw["my_note"] = {"x": 1}
    raw["audio"]["future_knob"] = 3
    c = QwenAudioConfig.from_dict(raw)
    assert c.extra["my_note"] == {"x": 1} and c.extra["auto_map"] == OFFICIAL_CONFIG["auto_map"]
    assert c.audio.extra == {"future_knob": 3}
    assert c.to_dict() == raw


@pytest.mark.parametrize("field", REQUIRED)
def test_missing_field(field):
    raw = official()
    del raw[field]
    with pytest.raises(ConfigError, match=f"config.json: (required )?field '{field}' is missing"):
        QwenAudioConfig.from_dict(raw)


@pytest.mark.parametrize("field", REQUIRED_AUDIO)
def test_missing_audio_field(field):
    raw = official()
    del raw["audio"][field]
    with pytest.raises(ConfigError, match=f"field 'audio.{field}' is missing"):
        QwenAudioConfig.from_dict(raw)


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size", "4096", "field 'hidden_size' must be int, got '4096'"),
    ("num_hidden_layers", True, "field 'num_hidden_layers' must be int, got True"),
    ("num_hidden_layers", 32.0, "field 'num_hidden_layers' must be int, got 32.0"),
    ("use_dynamic_ntk", 1, "field 'use_dynamic_ntk' must be bool, got 1"),
    ("layer_norm_epsilon", None, "field 'layer_norm_epsilon' must be float, got None"),
    ("seq_length", 0, "field 'seq_length' must be positive, got 0"),
    ("rotary_emb_base", -1.0, "field 'rotary_emb_base' must be positive, got -1.0"),
    ("audio", [], "field 'audio' must be an object"),
])
def test_invalid_field(field, value, message):
    raw = official() | {field: value}
    with pytest.raises(ConfigError, match=message):
        QwenAudioConfig.from_dict(raw)


def test_invalid_audio_field():
    raw = official()
    raw["audio"]["n_state"] = "1280"
    with pytest.raises(ConfigError, match="field 'audio.n_state' must be int, got '1280'"):
        QwenAudioConfig.from_dict(raw)


@pytest.mark.parametrize("change, message", [
    ({"kv_channels": 64}, r"hidden_size \(4096\) must equal num_attention_heads × kv_channels \(32 × 64\)"),
    ({"rotary_pct": 0.5}, "rotary_pct 0.5 is not supported"),
    ({"no_bias": False}, "no_bias false is not supported"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings true is not supported"),
    ({"intermediate_size": 22017}, r"intermediate_size \(22017\) must be even"),
    ({"vocab_size": 155164}, r"leaves `</audio>` outside vocab_size \(155164\)"),
])
def test_unsupported_values(change, message):
    with pytest.raises(ConfigError, match=message):
        QwenAudioConfig.from_dict(official() | change)


@pytest.mark.parametrize("change, message", [
    ({"n_head": 3}, r"audio.n_state \(1280\) must be divisible by audio.n_head \(3\)"),
    ({"output_dim": 1024}, r"audio.output_dim \(1024\) must equal hidden_size \(4096\)"),
    ({"avg_pool": False}, "audio.avg_pool false is not supported"),
])
def test_unsupported_audio_values(change, message):
    raw = official()
    raw["audio"] |= change
    with pytest.raises(ConfigError, match=message):
        QwenAudioConfig.from_dict(raw)


def test_from_json_file_and_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL_CONFIG))
    assert QwenAudioConfig.from_json(tmp_path) == QwenAudioConfig.from_json(tmp_path / "config.json")


def test_from_json_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path}/config.json: config file not found"):
        QwenAudioConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ConfigError, match=f"{tmp_path}/config.json: not valid JSON"):
        QwenAudioConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in OFFICIAL_CONFIG.items() if k != "kv_channels"}))
    with pytest.raises(ConfigError, match=f"{tmp_path}/config.json: field 'kv_channels' is missing"):
        QwenAudioConfig.from_json(tmp_path)


def test_a_pipe_given_as_a_checkpoint_is_refused_not_waited_on(tmp_path):
    """`qwenaudio merge FIFO …` waited forever for a writer: reading config.json from a pipe or device blocks."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result: list[BaseException] = []
    reader = threading.Thread(target=lambda: result.append(pytest.raises(ConfigError, QwenAudioConfig.from_json,
                                                                         fifo).value))
    reader.start()
    reader.join(10)
    if reader.is_alive():  # let the blocked read end (a writer that closes at once) before failing
        os.close(os.open(fifo, os.O_WRONLY))
        reader.join()
        pytest.fail("QwenAudioConfig.from_json waited on a pipe")
    assert "not a regular file" in str(result[0])


def test_generation_config_takes_a_list_of_eos_ids(tmp_path):
    """transformers' newer generation_config.json files (Qwen2-Audio-Instruct's) give eos_token_id as a list: each
    one stops generation."""
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [151645, 151643], "pad_token_id": 151643}')
    assert GenerationConfig.from_json(tmp_path).stop_token_ids == (151645, 151643)


def test_dimensions_too_large_to_exist_are_a_config_error():
    from qwenaudio.core.checkpoint import tensor_shapes
    from qwenaudio.testing import tiny_config

    config = QwenAudioConfig.from_dict(tiny_config(n_state=3232196608 // 4 * 4, n_head=4))
    with pytest.raises(ConfigError, match="too large to exist"):
        tensor_shapes(config)
