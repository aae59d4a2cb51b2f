"""``check_parity`` as a verification runs it: with its options, on its ``--eval-data`` pairs, and a
model input onnxruntime refuses said as the user's error."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from loraexport.errors import InvalidInputError
from loraexport.models.base import ModelFamily
from loraexport.runtime.model import OnnxModel, RuntimeInputError
from loraexport.verify.parity import ParityResult, check_parity


def parity_on(
    family: ModelFamily,
    reference: nn.Module,
    opener: Callable[[], OnnxModel],
    opts: Any,
    pairs: list[tuple[str, str]] | None,
    tokenizer: Any | None,
    **how: Any,
) -> ParityResult:
    """``check_parity`` with a verification's options (``opts.samples``, ``opts.seed``) on its
    ``(source, target)`` pairs (``--eval-data``, or None); inputs the export refuses to run are
    the user's error (``InvalidInputError``: exit 3). ``how``: ``stored``, ``quantized``."""
    try:
        return check_parity(
            family,
            reference,
            opener,
            samples=opts.samples,
            seed=opts.seed,
            sources=[s for s, _ in pairs] if pairs else None,
            tokenizer=tokenizer,
            targets=[t for _, t in pairs] if pairs else None,
            **how,
        )
    except RuntimeInputError as e:  # the export does not run on this model's inputs
        raise InvalidInputError(str(e)) from e
