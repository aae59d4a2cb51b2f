"""Generate the sample task for training on the real SmolLM2-135M (committed as
samples/real/sort_digits_{train,eval}.jsonl): sort the digits of a 4-8 digit string.

    {"prompt": "Sort the digits: 41937\\nSorted:", "completion": " 13479"}

The base model does not solve it (0% exact match, measured); a LoRA adapter trained for a few
minutes on 2 cores does (`make demo-real-train`). The held-out strings never occur in training.

    python samples/real/make_task.py        # rewrites both files deterministically
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from make_data import digit_strings  # noqa: E402  (4-8 digits, as the reference model's sample)

SEED = 20261130
TRAIN, EVAL = 3000, 100


def example(digits: str) -> dict[str, str]:
    return {"prompt": f"Sort the digits: {digits}\nSorted:", "completion": " " + "".join(sorted(digits))}


def main() -> None:
    rng = random.Random(SEED)
    held = digit_strings(EVAL, rng, set())
    train = digit_strings(TRAIN, rng, set(held))
    here = Path(__file__).parent
    for name, strings in (("sort_digits_train.jsonl", train), ("sort_digits_eval.jsonl", held)):
        with open(here / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(example(s)) + "\n" for s in strings)


if __name__ == "__main__":
    main()
