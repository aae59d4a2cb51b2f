"""Generate the sample data sets (committed as samples/data/*.jsonl).

Two toy sequence-to-sequence tasks on digit strings of length 4-8:
  reverse: "31415" -> "51413"   (the base model is pre-trained on this)
  sort:    "31415" -> "11345"   (the LoRA adapter teaches this)

    python samples/make_data.py            # rewrites samples/data/ deterministically
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loraexport.training.data import write_pairs  # noqa: E402

SEED = 20261128
MIN_LEN, MAX_LEN = 4, 8
TASKS = {"reverse": lambda s: s[::-1], "sort": lambda s: "".join(sorted(s))}


def digit_strings(n: int, rng: random.Random, exclude: set[str] = frozenset()) -> list[str]:
    out: list[str] = []
    seen = set(exclude)
    while len(out) < n:
        s = "".join(rng.choice("0123456789") for _ in range(rng.randint(MIN_LEN, MAX_LEN)))
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def main() -> None:
    rng = random.Random(SEED)
    out = Path(__file__).parent / "data"
    out.mkdir(exist_ok=True)
    sort_eval = digit_strings(300, rng)
    sort_train = digit_strings(4000, rng, exclude=set(sort_eval))
    reverse_train = digit_strings(4000, rng, exclude=set(sort_eval))
    write_pairs(out / "sort_eval.jsonl", [(s, TASKS["sort"](s)) for s in sort_eval])
    write_pairs(out / "sort_train.jsonl", [(s, TASKS["sort"](s)) for s in sort_train])
    write_pairs(out / "reverse_train.jsonl", [(s, TASKS["reverse"](s)) for s in reverse_train])
    write_pairs(out / "reverse_eval.jsonl", [(s, TASKS["reverse"](s)) for s in sort_eval])
    print(f"wrote {out}/{{sort,reverse}}_{{train,eval}}.jsonl")


if __name__ == "__main__":
    main()
