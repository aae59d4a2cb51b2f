"""Pre-train the sample base model (reference Transformer) on reversing digit strings.

    python samples/make_base.py --out samples/base     # what is committed (about 1 min on 2 cores)

Deterministic under its fixed seed on one machine; the committed copy is the one the tests
and `make demo` use, so they do not depend on re-running this.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from loraexport.models.reference import SPECIALS, save_model  # noqa: E402
from loraexport.models.transformer import Transformer, TransformerConfig  # noqa: E402
from loraexport.training.data import read_pairs  # noqa: E402
from loraexport.training.loop import exact_match, fit, seed_everything  # noqa: E402

HERE = Path(__file__).parent
SEED = 0
CONFIG = dict(d_model=128, n_heads=4, d_ff=512, n_encoder_layers=2, n_decoder_layers=2, max_len=32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "base")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--decoder-only", action="store_true", help="n_encoder_layers=0")
    args = ap.parse_args()
    seed_everything(SEED)
    cfg = dict(CONFIG, vocab=SPECIALS + list("0123456789"))
    if args.decoder_only:
        cfg.update(n_encoder_layers=0, n_decoder_layers=3)
    model = Transformer(TransformerConfig(**cfg))
    train = read_pairs(HERE / "data" / "reverse_train.jsonl")
    t0 = time.perf_counter()
    fit(
        model,
        model.parameters(),
        train,
        steps=args.steps,
        lr=1e-3,
        batch_size=64,
        seed=SEED,
        desc="pre-train",
    )
    acc_rev = exact_match(model, read_pairs(HERE / "data" / "reverse_eval.jsonl"))
    acc_sort = exact_match(model, read_pairs(HERE / "data" / "sort_eval.jsonl"))
    n = sum(p.numel() for p in model.parameters())
    print(
        f"{n} parameters, {time.perf_counter() - t0:.0f}s; exact match: reverse {acc_rev:.1%}, "
        f"sort {acc_sort:.1%}"
    )
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    save_model(model, args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
