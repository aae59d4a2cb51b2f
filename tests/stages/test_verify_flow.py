"""The verification flow's own contract (``stages.verify.verify_into``): whatever a reference's
step raises, its ``close`` runs, so the scratch it made is removed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from loraexport.errors import InvalidInputError
from loraexport.stages.verify import verify_into


class _Reference:
    def __init__(self, fail_in: str):
        self.fail_in, self.steps = fail_in, []

    def _step(self, name: str, *_):
        self.steps.append(name)
        if name == self.fail_in:
            raise InvalidInputError(f"{name} failed")

    def setup(self, v):
        self._step("setup")

    def prove(self, v):
        self._step("prove")
        return SimpleNamespace(proof=SimpleNamespace(passed=True))

    def parity(self, v, proven):
        self._step("parity")

    def quality(self, v, proven):
        self._step("quality")

    def latency(self, v):
        self._step("latency")

    def close(self):
        self.steps.append("close")


class _V:
    meta = {"weights_dtype": "float32"}
    wrote = True  # merge-and-export's own torch.onnx float32 graph: parity only (``stages.verify.proves``)
    report = SimpleNamespace(proof=None)
    base = None  # no base folder: no side files to prove

    def log(self, line):
        pass


class _Read(_V):
    wrote = False  # a folder verify reads: its float32 graph is proven first


@pytest.mark.parametrize("fail_in", ["setup", "prove", "parity", "quality", "latency"])
def test_close_runs_whatever_step_fails(fail_in):
    # Adapters.setup makes its scratch folder before it reads the export's adapter files; a
    # hostile file made it raise there, and the folder was left in the temporary directory.
    reference = _Reference(fail_in)
    with pytest.raises(InvalidInputError, match=f"{fail_in} failed"):
        verify_into(_Read(), reference)
    assert reference.steps[-2:] == [fail_in, "close"]


def test_the_steps_in_order():
    reference = _Reference("")
    verify_into(_Read(), reference)
    assert reference.steps == ["setup", "prove", "parity", "quality", "latency", "close"]
    reference = _Reference("")
    verify_into(_V(), reference)  # what merge-and-export has just exported with torch.onnx: not again
    assert reference.steps == ["setup", "parity", "quality", "latency", "close"]
