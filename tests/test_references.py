"""The rule for reference packages (tests/conftest.py): a missing one skips the test that needs it, naming the
package and ./scripts/test; under CI=true it fails the test instead; a present one is simply imported."""

import sys
import types

import pytest

from .conftest import qwen_vocabulary, reference, reference_program

SKIP, FAIL = pytest.skip.Exception, pytest.fail.Exception


@pytest.fixture
def no_whisper(monkeypatch):
    monkeypatch.setitem(sys.modules, "whisper", None)  # makes `import whisper` fail, installed or not


@pytest.mark.parametrize("ci", [None, "", "false", "0"])
def test_missing_package_skips_outside_ci(monkeypatch, no_whisper, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(SKIP, match=r"^openai-whisper \(import whisper\) is not installed: .*\./scripts/test .*"
                                   r"the `test` extra"):
        reference("whisper")


@pytest.mark.parametrize("ci", ["true", "TRUE", "1"])
def test_missing_package_fails_under_ci(monkeypatch, no_whisper, ci):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(FAIL, match=r"^openai-whisper \(import whisper\) is not installed: .*\./scripts/test .*"
                                   r"CI=true, so a missing reference fails instead of skipping"):
        reference("whisper")


def test_missing_parent_package_names_the_package(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.delitem(sys.modules, "scipy.signal", raising=False)  # imported by an earlier test, maybe
    with pytest.raises(SKIP, match=r"^scipy \(import scipy\.signal\) is not installed"):
        reference("scipy.signal")
    monkeypatch.setitem(sys.modules, "dashscope", None)
    with pytest.raises(SKIP, match=r"^dashscope is not installed"):
        reference("dashscope")


def test_present_package_is_returned(monkeypatch):
    monkeypatch.setenv("CI", "true")
    stand_in = types.ModuleType("whisper")
    monkeypatch.setitem(sys.modules, "whisper", stand_in)
    assert reference("whisper") is stand_in


def test_broken_package_is_not_taken_for_missing(monkeypatch, tmp_path):
    """An installed reference whose own import fails is a real error, skipped by no one."""
    monkeypatch.delenv("CI", raising=False)
    (tmp_path / "whisper").mkdir()
    (tmp_path / "whisper" / "__init__.py").write_text("import a_dependency_nobody_has\n")
    monkeypatch.syspath_prepend(tmp_path)
    monkeypatch.delitem(sys.modules, "whisper", raising=False)
    with pytest.raises(ModuleNotFoundError, match="a_dependency_nobody_has"):
        reference("whisper")


def test_missing_program(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no ffmpeg on it
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(SKIP, match=r"^the ffmpeg program is not installed: .*\./scripts/test"):
        reference_program("ffmpeg")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(FAIL, match=r"^the ffmpeg program is not installed: .*CI=true"):
        reference_program("ffmpeg")
    (tmp_path / "ffmpeg").write_text("#!/bin/sh\n")
    (tmp_path / "ffmpeg").chmod(0o755)
    assert reference_program("ffmpeg") == str(tmp_path / "ffmpeg")


def test_vocabulary_follows_the_rule(monkeypatch, tmp_path):
    """Qwen's vocabulary (the vocab_file fixture) comes from the dashscope wheel: a missing wheel or file is a
    missing reference."""
    monkeypatch.setenv("CI", "true")
    monkeypatch.setitem(sys.modules, "dashscope", None)
    with pytest.raises(FAIL, match=r"^dashscope is not installed"):
        qwen_vocabulary()
    wheel = types.ModuleType("dashscope")
    wheel.__file__ = str(tmp_path / "dashscope" / "__init__.py")  # a dashscope without resources/qwen.tiktoken
    monkeypatch.setitem(sys.modules, "dashscope", wheel)
    with pytest.raises(FAIL, match=r"^Qwen's vocabulary \(.*resources/qwen.tiktoken, part of the dashscope wheel\) "
                                   r"is not installed"):
        qwen_vocabulary()
