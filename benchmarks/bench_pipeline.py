"""`make bench-pipeline`: loraexport merge-and-export vs the hand-made path, on SmolLM2-135M.

Each path runs in its own process (peak RSS is per process), one after the other, on the same
base and adapter (runs/real, from samples/real/prepare.py). Prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def run(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS GB of the child, stdout)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 4):
        sys.exit(f"{cmd[0]} failed:\n{proc.stderr[-3000:]}")
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", type=Path, default=Path("runs/real"))
    args = ap.parse_args()
    base, adapter = args.real / "smollm2", args.real / "smollm2-adapter"
    rows = []
    with tempfile.TemporaryDirectory() as td:
        # loraexport first: RUSAGE_CHILDREN's peak is a running maximum over finished children
        wall, rss, out = run(
            [
                str(BIN / "loraexport"),
                "--quiet",
                "merge-and-export",
                "--base",
                str(base),
                "--adapter",
                str(adapter),
                "--out",
                f"{td}/le",
                "--json",
            ]
        )
        rep = json.loads(out)
        rows.append(
            (
                "loraexport merge-and-export (merge, export, parity on 6 cases + 4x32-token "
                "generation, latency of 5 variants)",
                wall,
                rss,
                f"max abs err {rep['parity']['max_abs_err']:.2e}, passed {rep['parity']['passed']}",
            )
        )
        shutil.rmtree(f"{td}/le")
        for exporter in ("torchscript", "dynamo"):
            wall, rss2, out = run(
                [
                    sys.executable,
                    str(HERE / "handmade_path.py"),
                    str(base),
                    str(adapter),
                    f"{td}/hm-{exporter}",
                    "--exporter",
                    exporter,
                ]
            )
            r = json.loads(out.strip().splitlines()[-1])
            s = r["seconds"]
            rows.append(
                (
                    f"PEFT merge_and_unload + torch.onnx ({exporter}) + ORT check of 6 cases, no cache "
                    f"[load {s['load']:.1f} s, merge {s['merge']:.2f} s, export {s['export']:.1f} s, "
                    f"check {s['parity']:.1f} s]",
                    wall,
                    r["peak_rss_gb"],
                    f"max abs err {r['max_abs_err']:.2e}",
                )
            )
            shutil.rmtree(f"{td}/hm-{exporter}")
    print("\nSmolLM2-135M, side by side (wall seconds include process start and imports)\n")
    print("| path | wall s | peak RSS GB | result |\n|---|---:|---:|---|")
    for name, wall, rss, res in rows:
        print(f"| {name} | {wall:.1f} | {rss:.2f} | {res} |")


if __name__ == "__main__":
    main()
