"""``core.threads``: one torch thread for a model too small to gain from more, the cores this
process may use otherwise, what the user asked for always; the stages say which."""

from __future__ import annotations

import os

import pytest
import torch

from loraexport.core import threads


def test_a_small_model_gets_one_thread_a_large_one_the_cores(monkeypatch):
    monkeypatch.setattr(threads, "cores", lambda: 7)
    assert threads.choose(930_000)[0] == 1  # the sample Transformer
    assert threads.choose(threads.SMALL_MODEL_PARAMS)[0] == 1
    assert threads.choose(threads.SMALL_MODEL_PARAMS + 1)[0] == 7
    assert threads.choose(930_000, requested=3) == (3, "as asked (--threads)")


def test_cores_are_the_affinity_not_the_machine():
    if hasattr(os, "sched_getaffinity"):
        assert threads.cores() == len(os.sched_getaffinity(0))
    assert threads.cores() >= 1


def test_use_sets_torch_and_says_so():
    before = torch.get_num_threads()
    said = []
    try:
        assert threads.use(930_000, None, said.append) == 1
        assert torch.get_num_threads() == 1
        assert said == ["torch on 1 thread (0.93 M parameters: too small to gain from a second thread)"]
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_train_on_the_sample_model_runs_one_thread(tmp_path, sample_base, small_data):
    from loraexport.stages.train import train

    before = torch.get_num_threads()
    said = []
    try:
        torch.set_num_threads(2)
        train(sample_base, small_data, tmp_path / "a", steps=1, show_progress=False, log=said.append)
        assert torch.get_num_threads() == 1
        assert said == []  # train's output stays its own: an error is still one line
    finally:
        torch.set_num_threads(before)
