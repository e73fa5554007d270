"""The batch-job protocol in one process: every job runs once, process 0 summarizes the reports, and an interrupt
is summarized as such and raised again (the torchrun cases are in test_batch.py, test_evaluation.py and
test_finetune.py); a process's share, sums and progress lines."""

import numpy as np
import pytest
import soundfile as sf
import torch

from qwenaudio import progress
from qwenaudio.batch import find_inputs
from qwenaudio.core.audio import MIN_SAMPLES
from qwenaudio.runner import Processes, Report


def jobs(tmp_path, n):
    """n clips of 1, 2, ... s of quiet noise."""
    for i in range(n):
        sf.write(tmp_path / f"{i}.wav", 0.01 * np.random.default_rng(i).standard_normal(16000 * (i + 1)), 16000)
    return find_inputs([tmp_path])


def test_each_job_runs_once_and_process_0_summarizes(tmp_path):
    todo, finished, written = jobs(tmp_path, 3), [], []
    summary, reports = Processes().run(
        todo, lambda batch, clips: [len(c) for c in clips], lambda job, n: written.append(job.label),
        lambda reports, interrupted: (reports, interrupted), min_samples=MIN_SAMPLES, batch_size=2,
        finished=lambda job, error: finished.append((job.label, error)))
    assert summary == (reports, False) and reports == [Report(done=written, failed=[])]
    assert sorted(written) == sorted(j.label for j in todo) and [e for _, e in finished] == [None] * 3


def test_an_interrupt_is_summarized_and_raised_again(tmp_path):
    seen = []

    def recognize(batch, clips):
        if seen:
            raise KeyboardInterrupt
        seen.append(batch)
        return [0] * len(batch)

    summaries = []
    with pytest.raises(KeyboardInterrupt):
        Processes().run(jobs(tmp_path, 2), recognize, lambda job, _: None,
                        lambda reports, interrupted: summaries.append((reports, interrupted)), min_samples=MIN_SAMPLES,
                        batch_size=1)
    assert summaries == [([Report(done=[seen[0][0].label])], True)]


def test_progress_lines(capsys):
    Processes(1, 2).progress("files").count(1, 3, "a.wav")
    Processes().progress("examples").rate(40, 100, 20.0)
    assert capsys.readouterr().err.splitlines() == ["rank 1: [1/3] a.wav", "40/100 examples, 2.00/s, ETA 0:30"]
    assert (progress.who(1, 2), progress.who(0, 1), progress.bar(1, 2)) == ("rank 1: ", "", "")


def test_one_process_is_the_whole_world():
    assert Processes.current() == Processes()  # no process group joined
    assert Processes(1, 3).share(list(range(8))) == [1, 4, 7] and Processes().share([5, 6]) == [5, 6]
    values = torch.tensor([1.5, 2.0])
    assert Processes().sum(values) is values


def test_eta_and_rank_prefixed_lines(capsys):
    assert (progress.eta(0), progress.eta(26.9), progress.eta(3725)) == ("0:00", "0:26", "62:05")
    Processes(1, 2).progress("examples").line("decoding a batch: 3/10 new tokens")
    Processes().progress("files").line("a.wav: 1/4 windows")
    progress.loading(3, 3)
    assert capsys.readouterr().err.splitlines() == ["rank 1: decoding a batch: 3/10 new tokens",
                                                    "a.wav: 1/4 windows", "loaded 3 weight tensors"]
