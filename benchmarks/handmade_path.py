"""The path a user writes by hand today: PEFT merge_and_unload + torch.onnx.export + an ORT check.

    python benchmarks/handmade_path.py BASE ADAPTER OUT_DIR [--exporter dynamo|torchscript]

Prints one JSON line: seconds per phase, max abs logit error vs PEFT unmerged, peak RSS.
Run as its own process so that its peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bar too
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

CASES = ((1, 16), (4, 32), (2, 64), (1, 2), (4, 24), (2, 8))  # the same shapes loraexport checks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("adapter")
    ap.add_argument("out")
    ap.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    a = ap.parse_args()
    t = {}
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.base, local_files_only=True, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, a.adapter).eval()
    t["load"] = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    cases = [torch.randint(0, model.config.vocab_size, shape, generator=g) for shape in CASES]
    with torch.no_grad():
        want = [peft_model(input_ids=ids).logits.numpy() for ids in cases]  # unmerged reference
    t0 = time.perf_counter()
    merged = peft_model.merge_and_unload().eval()
    merged.config.use_cache = False
    t["merge"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "model.onnx")
    example = (torch.randint(0, 100, (2, 8)), torch.ones(2, 8, dtype=torch.long))

    class Logits(torch.nn.Module):  # what a user writes: ids and mask in, logits out
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    merged = Logits(merged).eval()
    with torch.no_grad():
        if a.exporter == "dynamo":
            b, s = torch.export.Dim("batch"), torch.export.Dim("seq")
            torch.onnx.export(
                merged,
                example,
                path,
                input_names=["input_ids", "attention_mask"],
                output_names=["logits"],
                dynamic_shapes=({0: b, 1: s}, {0: b, 1: s}),
                dynamo=True,
            )
        else:
            axes = {
                "input_ids": {0: "b", 1: "s"},
                "attention_mask": {0: "b", 1: "s"},
                "logits": {0: "b", 1: "s"},
            }
            torch.onnx.export(
                merged,
                example,
                path,
                input_names=["input_ids", "attention_mask"],
                output_names=["logits"],
                dynamic_axes=axes,
                dynamo=False,
            )
    t["export"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    err = 0.0
    for ids, ref in zip(cases, want, strict=True):
        got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())})[0]
        err = max(err, float(np.abs(got - ref).max()))
    t["parity"] = time.perf_counter() - t0
    t["total"] = sum(t.values())
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(
        json.dumps(
            {
                "path": f"peft+torch.onnx({a.exporter})+ort",
                "seconds": t,
                "max_abs_err": err,
                "peak_rss_gb": peak_gb,
            }
        )
    )


if __name__ == "__main__":
    main()
