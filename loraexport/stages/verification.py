"""``Verification``: one verification's context, handed from step to step of the verify flow
(``stages.verify.verify_into``) — what is checked (the export's folder and its
``loraexport.json``), how (``VerifyOptions``, the providers and threads chosen, the evaluation
pairs), where the findings go (the report, the log, the stage records of a streamed run) and what
this run already made (the float graphs ``merge-and-export`` exported, for the proof). Each
reference (``stages.references``) takes it at every step."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from loraexport.core.memory import StageRecord
from loraexport.report.contents import Report
from loraexport.stages.float_graphs import FloatGraphs
from loraexport.stages.inputs import Log, quiet
from loraexport.verify import gates
from loraexport.verify.options import VerifyOptions
from loraexport.verify.quantized import QuantCost


@dataclass
class Verification:
    report: Report
    onnx_path: Path
    meta: dict
    opts: VerifyOptions
    log: Log = quiet
    providers: list[str] = field(default_factory=list)
    threads: int = 1
    pairs: list | None = None  # (source, target) of --eval-data
    made: FloatGraphs | None = None  # merge-and-export: the graphs as exported, before quantizing
    wrote: bool = False  # merge-and-export: this run exported the files from this very reference
    base: Path | None = None  # the base's folder: the config and tokenizer files the export copies
    records: list[StageRecord] = field(default_factory=list)  # streamed: each step's time and memory
    progress: bool = False  # streamed: draw bars (on a terminal)

    @property
    def sources(self) -> list[str] | None:
        """The prompts of --eval-data, or None."""
        return [s for s, _ in self.pairs] if self.pairs else None

    def judge(self, cost: QuantCost, where: str) -> None:
        """Record what quantizing costs; the user's budget makes it a gate (``verify.gates``),
        else a lost adapter is only said."""
        report, opts = self.report, self.opts
        report.quantization.append(cost)
        report.budget = opts.budget
        report.quantization_failures += gates.quality_failures(cost, opts.budget, where)
        warning = None if opts.budget.set else gates.lost_adapter_warning(cost)
        if warning is not None:
            report.warnings.append(warning)
