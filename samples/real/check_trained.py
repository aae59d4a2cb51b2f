"""After `make demo-real-train`: the trained adapter against PEFT, and the export's task score.

    python samples/real/check_trained.py --base runs/real/smollm2 \
        --adapter runs/demo-real-train/adapter --onnx runs/demo-real-train/onnx \
        --eval-data samples/real/sort_digits_eval.jsonl

1. ``peft.PeftModel.from_pretrained`` loads the adapter folder unchanged; its logits on every
   held-out prompt + completion are compared with loraexport's unmerged model (base + LoRA
   branches, ``Adapter.load`` + ``unmerged_view``): the largest absolute difference must be
   ≤ 1e-5 (both float32 runs of the same sums; measured ~4e-6 on SmolLM2-135M).
2. From the export's report.json: parity passed, and the held-out exact match of
   onnxruntime's greedy completions beside torch unmerged's and training's.
Exit 0 when all hold, 1 otherwise; one table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import warnings  # noqa: E402

import torch  # noqa: E402

warnings.filterwarnings("ignore")  # transformers' deprecation notes: this script prints one table

PEFT_ATOL = 1e-5  # the contract; both sides compute the same float32 sums in another order


def peft_difference(base: Path, adapter_dir: Path, eval_data: Path) -> tuple[float, float]:
    """(max |PEFT − ours| over all held-out logits, max |adapter effect|)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    from loraexport.lora.adapter import Adapter
    from loraexport.lora.views import unmerged_view

    tok = AutoTokenizer.from_pretrained(base, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype=torch.float32).eval()
    adapter = Adapter.load(adapter_dir)
    adapter.check_fits(model)
    ours = unmerged_view(model, [adapter])
    theirs = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter_dir
    )
    theirs.eval()
    worst = effect = 0.0
    rows = [json.loads(line) for line in eval_data.read_text().splitlines()]
    with torch.no_grad():
        for row in rows:
            ids = tok(row["prompt"] + row["completion"], return_tensors="pt").input_ids
            a, b, c = theirs(input_ids=ids).logits, ours(input_ids=ids).logits, model(input_ids=ids).logits
            worst = max(worst, float((a - b).abs().max()))
            effect = max(effect, float((a - c).abs().max()))
    return worst, effect


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--base", "--adapter", "--onnx", "--eval-data"):
        ap.add_argument(name, type=Path, required=True)
    args = ap.parse_args()
    diff, effect = peft_difference(args.base, args.adapter, args.eval_data)
    training = json.loads((args.adapter / "training.json").read_text())
    report = json.loads((args.onnx / "report.json").read_text())
    logits = report["parity"]  # one provider (cpu)
    gen = logits["generation"]
    verdict = "passed" if report["passed"] else "FAILED"
    rows = [
        ("trainable parameters", f"{training['trainable_parameters']:,} of {training['base_parameters']:,} "
         f"({training['trainable_parameters'] / training['base_parameters']:.2%})"),
        ("training time", f"{training['seconds']:.0f} s ({training['steps']} steps)"),
        ("held-out exact match, base", f"{training['eval_exact_match_before']:.0%}"),
        ("held-out exact match, trained (torch)", f"{training['eval_exact_match_after']:.0%}"),
        ("PEFT vs loraexport unmerged", f"max |Δlogit| {diff:.2e} (adapter effect {effect:.2f})"),
        ("export parity", f"{verdict} (max abs logit err {logits['max_abs_err']:.1e})"),
        ("held-out exact match, onnxruntime", f"{gen['task_exact_onnx']}/{gen['task_rows']}"),
        ("held-out exact match, torch unmerged", f"{gen['task_exact_reference']}/{gen['task_rows']}"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    good = (
        diff <= PEFT_ATOL
        and report["passed"]
        and gen["task_rows"] > 0
        and gen["task_exact_onnx"] == gen["task_exact_reference"]
    )
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
