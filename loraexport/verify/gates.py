"""Every pass/fail rule of verification, and its message, in one place. The in-memory, streamed
and adapter-mode verifications record what they measured in a ``Report``; the rules here judge it.

Proofs (each failure is exit 4):
  * files: every file ``loraexport.json`` lists has its sha256, and ``loraexport.json`` its own
    digest (``manifest``);
  * weights: a quantized export holds exactly what the export of the reference makes
    (``verify.proof``);
  * parity: every output within the tolerance derived from float32's own noise, top-1 and greedy
    tokens identical (``verify.parity``); for a quantized export, against the reference running
    the dequantized weights the proof accepted, with the graph computing in float32.
Quality figures (what rounding or quantizing costs against the unmerged float32 model) gate only
under a budget the user sets (``Budget``); a half-precision export's own rounding must keep at
least ``MIN_ADAPTER_RETAINED`` of the adapter (its figure cannot exceed 1).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from loraexport.errors import InvalidInputError

# A half-precision export whose rounding keeps less of the adapter's effect than this fails: a
# good merge rounded to bfloat16 keeps ~95-99% (the sample and the real models measured here);
# a ΔW below the dtype's spacing of W keeps ~0%. One half is far from both.
MIN_ADAPTER_RETAINED = 0.5


@dataclass(frozen=True)
class Budget:
    """What a lossy export may cost against the unmerged float32 model (``--min-top1``,
    ``--min-adapter-retained``); None: reported, not judged."""

    min_top1: float | None = None
    min_adapter_retained: float | None = None

    def __post_init__(self) -> None:
        for name in ("min_top1", "min_adapter_retained"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidInputError(f"--{name.replace('_', '-')} must be a number, got {value!r}")
            if not 0 < value <= 1:
                raise InvalidInputError(f"--{name.replace('_', '-')} must be in (0, 1], got {value!r}")

    @property
    def set(self) -> bool:
        return self.min_top1 is not None or self.min_adapter_retained is not None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def retained_band(minimum: float) -> tuple[float, float]:
    """The adapter's effect may be found at ``minimum`` of its size, or as far above 100%: an
    export showing 124% of it computes something else just as surely as one showing 76%."""
    return minimum, 2.0 - minimum


def quality_failures(cost, budget: Budget, where: str) -> list[str]:
    """A quantized export's cost (``verify.quantized.QuantCost``) against ``budget``."""
    out = []
    if (
        budget.min_top1 is not None
        and cost.top1_agreement is not None
        and cost.top1_agreement < budget.min_top1
    ):
        out.append(
            f"{where}: top-1 agreement with the unmerged float32 model {cost.top1_agreement:.1%} "
            f"< --min-top1 {budget.min_top1:.1%}"
        )
    kept = cost.adapter_retained
    if budget.min_adapter_retained is not None and kept is not None:
        low, high = retained_band(budget.min_adapter_retained)
        if not low <= kept <= high:
            hint = "; --keep-adapter keeps it exactly beside the quantized base" if kept < low else ""
            out.append(
                f"{where}: the export shows {kept:.1%} of the adapter's effect on the outputs, outside "
                f"[{low:.1%}, {high:.1%}] (--min-adapter-retained {budget.min_adapter_retained:g}){hint}"
            )
    return out


def lost_adapter_warning(cost) -> str | None:
    """Said (not judged) when most of the adapter is lost and no budget was set."""
    kept = cost.adapter_retained
    if kept is None or MIN_ADAPTER_RETAINED <= kept <= 2 - MIN_ADAPTER_RETAINED:
        return None
    return (
        f"{cost.dtype} ({cost.adapter}) shows {kept:.0%} of the adapter's effect: set "
        "--min-adapter-retained to make this a failure"
    )


def half_failure(kept: float | None, dtype: str, budget: Budget) -> str | None:
    """A half-precision export whose rounding loses the adapter (its figure is at most 1)."""
    minimum = max(MIN_ADAPTER_RETAINED, budget.min_adapter_retained or 0.0)
    if kept is None or kept >= minimum:
        return None
    return (
        f"only {kept:.0%} of the adapter's effect on the outputs survives rounding the merged weights "
        f"to {dtype} (at least {minimum:.0%} required); export in float32"
    )


def manifest_failures(check: dict | None) -> list[str]:
    """Files changed or missing since ``loraexport.json`` listed them, or the description edited."""
    if not check:
        return []
    out = [f"{f} changed since the export wrote it (sha256 differs)" for f in check.get("changed", [])]
    out += [f"{f} is missing" for f in check.get("missing", [])]
    if check.get("description") not in (None, "ok"):
        out.append(f"loraexport.json: {check['description']}")
    return out


def failures(report) -> list[str]:
    """Every failed rule of ``report``, proofs first, each prefixed by what it checks."""
    out = [f"[files] {f}" for f in manifest_failures(report.manifest)]
    if report.proof is not None:
        out += [f"[weights] {f}" for f in report.proof.failures]
    out += [f"[{p.provider}] {f}" for p in report.parity for f in p.failures]
    out += [f"[half precision] {f}" for f in report.half_failures]
    out += [f"[quality] {f}" for f in report.quantization_failures]
    return out


def passed(report) -> bool | None:
    """None when nothing was checked (``--no-verify``); False when any rule failed."""
    if failures(report):
        return False
    if report.parity or report.proof is not None or report.manifest:
        return True
    return True if report.quantization else None


def verdict(report) -> str:
    """What failed first, for a one-line message."""
    if manifest_failures(report.manifest):
        return "files changed"
    if report.proof is not None and not report.proof.passed:
        return "weights differ from the reference"
    if any(not p.passed for p in report.parity):
        return "parity failed"
    if report.half_failures:
        return "adapter lost in half precision"
    return "quality budget not met" if report.quantization_failures else "passed"


def checks(report) -> list[dict[str, Any]]:
    """Each check run, saying whether it is a proof or a quality figure, for report.json."""
    out = []
    if report.manifest:
        out.append({"name": "files", "kind": "proof", "passed": not manifest_failures(report.manifest)})
    if report.proof is not None:
        out.append({"name": "weights", "kind": "proof", "passed": report.proof.passed})
    if report.parity:
        out.append({"name": "parity", "kind": "proof", "passed": all(p.passed for p in report.parity)})
    if report.half:
        out.append(
            {"name": "half_precision", "kind": "quality", "gated": True, "passed": not report.half_failures}
        )
    if report.quantization:
        out.append(
            {
                "name": "quantization",
                "kind": "quality",
                "gated": bool(report.budget and report.budget.set),
                "passed": not report.quantization_failures,
            }
        )
    return out
