"""Latency benchmark on the sample model: `make bench`.

Trains the sample adapter if runs/demo-adapter is missing, exports it merged, then times
PyTorch unmerged/merged and ONNX merged/base/unmerged interleaved (longer than `verify`
does by default) and prints the table with medians, p90 and the ratios.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loraexport.report.contents import LATENCY_VARIANTS  # noqa: E402
from loraexport.stages.export import export  # noqa: E402
from loraexport.stages.train import train  # noqa: E402
from loraexport.stages.verify import verify  # noqa: E402

BASE = REPO / "samples" / "base"
DATA = REPO / "samples" / "data"
ADAPTER = REPO / "runs" / "demo-adapter"
POINTS = ((1, 8), (1, 16), (1, 32), (4, 32), (16, 32))
BUDGET_S = 8.0


def main() -> None:
    if not (ADAPTER / "adapter_model.safetensors").exists():
        print("training the sample adapter …", file=sys.stderr)
        train(BASE, DATA / "sort_train.jsonl", ADAPTER, eval_data=DATA / "sort_eval.jsonl", force=True)
    with tempfile.TemporaryDirectory() as td:
        onnx_dir = Path(td) / "onnx"
        export(BASE, onnx_dir, adapter=ADAPTER)
        report = verify(
            BASE,
            ADAPTER,
            onnx_dir,
            samples=1,
            latency=True,
            latency_points=POINTS,
            latency_budget_s=BUDGET_S,
            log=lambda m: print(m, file=sys.stderr),
        )
    for lat in report.latency:
        print(
            f"\nlatency, {lat.provider}, {lat.threads} threads, ms: median (p90) "
            f"of interleaved runs; {report.machine.get('cpu')}"
        )
        print(
            "| batch × seq | "
            + " | ".join(LATENCY_VARIANTS)
            + " | onnx merged/base | onnx merged/torch unmerged |"
        )
        print("|---|" + "---:|" * (len(LATENCY_VARIANTS) + 2))
        for c in lat.cases:
            cells = [f"{c.stats[v].p50_ms:.2f} ({c.stats[v].p90_ms:.2f})" for v in LATENCY_VARIANTS]
            print(
                f"| {c.batch} × {c.seq} | "
                + " | ".join(cells)
                + f" | {c.ratio('onnx_merged', 'onnx_base'):.3f}"
                + f" | {c.ratio('onnx_merged', 'torch_unmerged'):.3f} |"
            )


if __name__ == "__main__":
    main()
