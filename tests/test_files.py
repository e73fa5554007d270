"""core/files.py: the rules every command's outputs follow."""

import json
import os
from pathlib import Path

import pytest

from qwenaudio.core.checkpoint import check_target
from qwenaudio.core.errors import OutputError
from qwenaudio.core import files
from qwenaudio.core.files import building, fingerprint, refuse_inputs


def test_an_output_may_not_be_or_hold_an_input_under_any_name(tmp_path, monkeypatch):
    data = tmp_path / "examples.jsonl"
    data.write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    os.link(data, tmp_path / "hard.jsonl")
    (tmp_path / "link.jsonl").symlink_to(data)
    for same in (data, "examples.jsonl", "./sub/../examples.jsonl", tmp_path / "hard.jsonl", "link.jsonl"):
        with pytest.raises(OutputError, match="would replace the input"):
            refuse_inputs([same], [data])
    with pytest.raises(OutputError, match="would replace the input"):  # a directory built whole, holding the input
        refuse_inputs([tmp_path], ["examples.jsonl"])
    refuse_inputs([tmp_path / "examples.json", tmp_path / "new" / "x"], [data, tmp_path / "missing"])  # beside: fine


def test_an_output_dir_in_a_symlink_loop_is_one_error_line_not_a_traceback(tiny_weights, tmp_path, capsys):
    """Path.resolve raises RuntimeError on a loop (trial 2: evaluate and finetune tracebacks; transcribe, which
    checks the directory first, said so in one line)."""
    from qwenaudio import cli
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    clip = Path(__file__).parent / "golden" / "clip0.wav"
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"audio": str(clip), "gt": "x", "source": "librispeech", "task": "asr",
                                "language": "en", "response": "x"}) + "\n")
    refuse_inputs([tmp_path / "loop1" / "run.json", tmp_path / "loop1"], [data])  # no input there: fine
    for command in (["evaluate", "asr", "--data", str(data)], ["finetune", "--data", str(data), "--lora-rank", "2"]):
        assert cli.main([*command, "--output-dir", str(tmp_path / "loop1"), "--model", str(tiny_weights)]) == 1
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --output-dir")


def test_fingerprint_follows_content_not_the_path(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "config.json").write_text('{"x": 1}')
        (d / "model.safetensors").write_bytes(bytes(range(256)) * 20_000)  # 5 MB: sampled, not read whole
    (a / ".partial").write_text("ignored")
    assert fingerprint(a) == fingerprint(b)
    data = bytearray((b / "model.safetensors").read_bytes())
    data[-1] ^= 1  # the last byte is always sampled
    (b / "model.safetensors").write_bytes(bytes(data))
    assert fingerprint(a) != fingerprint(b)
    (b / "model.safetensors").write_bytes((a / "model.safetensors").read_bytes())
    (b / "config.json").write_text('{"x": 2}')
    assert fingerprint(a) != fingerprint(b)


def test_a_replacing_build_that_fails_at_the_swap_puts_the_old_directory_back(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "model.safetensors").write_text("old")
    real_rename = files.Path.rename

    def failing(self, to):
        if self.name.endswith(".partial"):
            raise OSError(28, "No space left on device")
        return real_rename(self, to)

    monkeypatch.setattr(files.Path, "rename", failing)
    with pytest.raises(OSError, match="No space"):
        with building(target, replace=True) as partial:
            (partial / "model.safetensors").write_text("new")
    assert (target / "model.safetensors").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # neither the .old nor the .partial is left


def test_a_symlink_loop_as_an_output_is_refused_not_a_traceback(tmp_path):
    """A loop cannot be resolved (Path.resolve raises RuntimeError): it is never an input, and nothing can be written
    through it, so the rule still answers and the command says why it cannot write there."""
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    refuse_inputs([tmp_path / "loop1"], [data, tmp_path / "loop2"])
    with pytest.raises(OutputError, match="loop1"):
        check_target(tmp_path / "loop1", [data], overwrite=False)
