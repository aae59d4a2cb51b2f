"""The default path's memory: a 0.54B float16 Llama (8 layers, hidden 2048), exported with no
residency flag. Builds the checkpoint once (runs/bench-bounded, never committed), then runs
`merge-and-export --dtype bfloat16 --no-verify` and `merge-and-export --quantize int4` (verified,
no latency), each in its own process, and the same two with `--no-stream` (the model in memory)
for comparison; prints wall time and peak RSS above the interpreter's own baseline, as a multiple
of the float32 weights (issue: ≤ 0.5× and ≤ 1.0× by default)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_export_large import BIN, _measure, build  # noqa: E402
from bench_export_large import CONFIG as LARGE  # noqa: E402

CONFIG = {**LARGE, "num_hidden_layers": 8}  # 0.54 B parameters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("runs/bench-bounded"))
    ap.add_argument("--default-only", action="store_true", help="skip the --no-stream rows")
    args = ap.parse_args()
    build(args.dir, CONFIG, half=True)
    import math

    from safetensors import safe_open

    numel = 0
    for f in (args.dir / "base").glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            numel += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    fp32 = 4 * numel / 1e9
    base, adapter = str(args.dir / "base"), str(args.dir / "adapter")
    common = [str(BIN / "loraexport"), "merge-and-export", "--base", base, "--adapter", adapter, "--force"]
    runs = {
        "--dtype bfloat16 --no-verify": ["--dtype", "bfloat16", "--no-verify"],
        "--quantize int4 --no-latency": ["--quantize", "int4", "--no-latency"],
    }
    if not args.default_only:
        runs |= {f"{k} --no-stream": [*v, "--no-stream"] for k, v in list(runs.items())}
    baseline_cmd = [
        sys.executable,
        "-c",
        "import loraexport.cli, loraexport.pipeline, transformers, onnxruntime",
    ]
    _, _, baseline, _ = _measure(baseline_cmd)
    rows = []
    for i, (name, extra) in enumerate(runs.items()):
        code, wall, peak, out = _measure([*common, "--out", str(args.dir / f"out-{i}"), *extra])
        print(f"## {name}\n{out[-1500:]}\n")
        rows.append((name, code, wall, peak))
    print(
        f"float32 weights {fp32:.2f} GB ({numel / 1e9:.3f} B parameters); "
        f"interpreter baseline {baseline:.2f} GB"
    )
    print(
        "\n| merge-and-export | exit | wall | peak RSS | above baseline / float32 weights |"
        "\n|---|---:|---:|---:|---:|"
    )
    for name, code, wall, peak in rows:
        print(f"| {name} | {code} | {wall:.0f} s | {peak:.2f} GB | {(peak - baseline) / fp32:.2f}x |")

    failed = [f"{name} (exit {code})" for name, code, _, _ in rows if code != 0]
    if failed:  # a row whose run failed measured nothing: the table is not a result
        sys.exit(f"FAILED: {', '.join(failed)}; its output is above")


if __name__ == "__main__":
    main()
