"""Scoring greedy generations against held-out targets (``--eval-data`` with a tokenizer): the
held-out exact match that the report shows beside the token-for-token comparison."""

from __future__ import annotations


def task_targets(family, unmerged, tokenizer, sources, targets) -> dict[tuple[int, ...], str]:
    """The target of each source by its prompt's token ids, as ``family.prompts`` makes them (one
    source at a time, so the prompts' grouping by length cannot mix them up)."""
    if tokenizer is None or not sources or not targets:
        return {}
    out: dict[tuple[int, ...], str] = {}
    for source, target in zip(sources, targets, strict=True):
        for inputs, _ in family.prompts(unmerged, tokenizer, [source], 1, 0):
            out.setdefault(tuple(inputs["input_ids"][0].tolist()), target)
    return out


def until_eos(tokens: list[int], ends) -> list[int]:
    """``tokens`` up to (without) the first of the end ids ``ends`` (a collection, an id, or None)."""
    cut = first_end(tokens, ends)
    return tokens if cut is None else tokens[:cut]


def first_end(tokens: list[int], ends) -> int | None:
    """The index of the first of ``ends`` (a collection of ids, one id, or None) in ``tokens``."""
    stops = set(ends) if isinstance(ends, list | tuple | set | frozenset) else {ends}
    return next((i for i, t in enumerate(tokens) if t in stops), None)
