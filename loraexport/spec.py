"""``ExportSpec``: what an export is, in one value — mode, precision, graph, residency, opset,
exporter, max rank — built from the options of ``export`` and ``merge-and-export`` (the CLI's
``export_options`` decorator, or the Python API's keywords) and checked once, by one table
(``COMBINATIONS``), before any file is read. The library's functions take it; nothing below the
stages carries the options as loose flags.

``--keep-adapter`` is no mode of its own: it is the unmerged mode with a quantized base (the
spec keeps that it was asked that way, for the messages that name the option).

No torch here: the CLI builds a spec while parsing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from enum import Enum
from typing import Any

from loraexport.core.enums import (
    MAX_LORA_RANK,
    NBITS_BLOCKS,
    ExportMode,
    Precision,
    half_precision,
    quantization,
)
from loraexport.errors import InvalidInputError

# = export.onnx.DEFAULT_OPSET (not imported: that loads torch); tests/test_spec.py holds them equal
DEFAULT_OPSET = 18


class Graph(str, Enum):
    """Which graph: the torch.onnx export of the model, or the optimized one (``--optimize``:
    the fused graph for Llama, Mistral, Qwen2; GPT-2's LM head on the last position)."""

    PLAIN = "plain"
    OPTIMIZED = "optimized"


class Residency(str, Enum):
    """Where the weights are while exporting: the model built in torch, or the checkpoint read
    tensor by tensor (``--stream``: Llama, Mistral, Qwen2)."""

    MEMORY = "memory"
    STREAM = "stream"


@dataclass(frozen=True)
class ExportSpec:
    """What an export is. ``residency`` None: chosen by the model (``stages.residency.streams``)."""

    mode: ExportMode = ExportMode.MERGED
    precision: Precision = Precision.FLOAT32
    graph: Graph = Graph.PLAIN
    residency: Residency | None = None
    opset: int = DEFAULT_OPSET
    exporter: str | None = None  # None: the family's
    max_rank: int | None = None  # adapter mode: the graph's rank (default: the adapters' largest)
    keep_adapter: bool = False  # asked as --keep-adapter (then ``mode`` is unmerged or adapter)
    block_size: int | None = None  # --block-size: int8/int4's weights per scale (None: the default)

    @classmethod
    def from_options(
        cls,
        *,
        mode: str | ExportMode = "merged",
        dtype: str | None = None,
        quantize: str | None = None,
        keep_adapter: bool = False,
        optimize: bool = False,
        stream: bool | None = None,
        opset: int = DEFAULT_OPSET,
        exporter: str | None = None,
        max_rank: int | None = None,
        block_size: int | None = None,
    ) -> ExportSpec:
        """The spec the options of ``export``/``merge-and-export`` ask for, checked (one line,
        ``InvalidInputError``) by ``COMBINATIONS``; what needs the adapters is ``check``'s."""
        asked = ExportMode.parse(mode.value if isinstance(mode, ExportMode) else mode)
        if asked is ExportMode.BASE:
            raise InvalidInputError(f"--mode must be one of {', '.join(ExportMode.choices())}, got 'base'")
        half = half_precision(dtype)
        quant = quantization(quantize) if quantize is not None else None
        if quantize is not None and quant is None:
            raise InvalidInputError(f"--quantize must be one of {', '.join(Precision.choices('quantized'))}")
        if block_size is not None and (type(block_size) is not int or block_size not in NBITS_BLOCKS):
            sizes = ", ".join(map(str, NBITS_BLOCKS))
            raise InvalidInputError(f"--block-size must be one of {sizes}, got {block_size!r}")
        spec = cls(
            mode=asked,
            precision=half or quant or Precision.FLOAT32,
            graph=Graph.OPTIMIZED if optimize else Graph.PLAIN,
            residency=None if stream is None else Residency.STREAM if stream else Residency.MEMORY,
            opset=opset,
            exporter=exporter,
            max_rank=max_rank,
            keep_adapter=bool(keep_adapter),
            block_size=block_size,
        )
        both = bool(half and quant)
        for rule in COMBINATIONS:
            if rule.refuses(spec, both):
                raise InvalidInputError(rule.message)
        if keep_adapter and asked is ExportMode.MERGED:
            spec = replace(spec, mode=ExportMode.UNMERGED)  # the adapter kept beside the quantized base
        return spec

    def check(self, adapters: list, weights: list | None, modes: Iterable[ExportMode] = ()) -> None:
        """What needs the command and its adapters: the modes ``merge-and-export`` writes, an
        adapter to keep, adapter mode's inputs. One line, ``InvalidInputError``."""
        asked = ExportMode.MERGED if self.keep_adapter and self.mode is ExportMode.UNMERGED else self.mode
        if modes and asked not in modes:
            names = " or ".join(m.value for m in modes)
            raise InvalidInputError(f"merge-and-export --mode is {names}, got {asked.value!r}")
        if self.half and self.mode is ExportMode.UNMERGED and adapters and not self.keep_adapter:
            raise InvalidInputError(
                "--dtype float16/bfloat16 stores merged weights; it does not apply to --mode unmerged"
            )
        if self.keep_adapter and not adapters:
            raise InvalidInputError("--keep-adapter needs an --adapter to keep")
        if self.mode is ExportMode.ADAPTER:
            if not adapters:
                raise InvalidInputError(
                    "--mode adapter needs an --adapter: its modules and rank shape the graph"
                )
            if self.max_rank is not None and (
                isinstance(self.max_rank, bool)
                or not isinstance(self.max_rank, int)
                or not 1 <= self.max_rank <= MAX_LORA_RANK
            ):
                raise InvalidInputError(
                    f"--max-rank must be an integer from 1 to {MAX_LORA_RANK}, got {self.max_rank!r}"
                )
            if weights:
                raise InvalidInputError(
                    "--weight does not apply to --mode adapter: each adapter is its own file"
                )

    @classmethod
    def of_graph(
        cls, precision: Precision | str | None = None, *, optimize: bool = False, exporter: str | None = None,
        opset: int | None = None, block_size: int | None = None,
    ) -> ExportSpec:  # fmt: skip
        """The spec of a graph export alone (verify's comparison graphs, the proof's replay)."""
        return cls(
            precision=Precision.parse(precision) if precision else Precision.FLOAT32,
            graph=Graph.OPTIMIZED if optimize else Graph.PLAIN,
            opset=opset or DEFAULT_OPSET,
            exporter=exporter,
            block_size=block_size,
        )

    def check_streamed(self) -> None:
        """The rules again for a spec the model's size chose to stream (``--stream`` not given)."""
        streamed = replace(self, residency=Residency.STREAM)
        for rule in COMBINATIONS:
            if rule.refuses(streamed, False):
                raise InvalidInputError(rule.message)

    # what the stages read
    @property
    def half(self) -> Precision | None:
        return self.precision if self.precision.is_half else None

    @property
    def quant(self) -> Precision | None:
        return self.precision if self.precision.is_quantized else None

    @property
    def stored(self) -> Precision | None:
        """The precision the weights are stored in, None for float32 (as the export stages take it)."""
        return None if self.precision is Precision.FLOAT32 else self.precision

    @property
    def optimize(self) -> bool:
        return self.graph is Graph.OPTIMIZED

    @property
    def stream(self) -> bool | None:
        return None if self.residency is None else self.residency is Residency.STREAM


@dataclass(frozen=True)
class Rule:
    """One combination the export refuses, and the line that says so."""

    refuses_when: Callable[[ExportSpec, bool], bool]  # (spec, both --dtype and --quantize given)
    message: str
    axes: str  # which axes it ties, for the support matrix

    def refuses(self, spec: ExportSpec, both: bool) -> bool:
        return self.refuses_when(spec, both)


# Every combination of the option axes the export refuses, in the order they are checked. The
# family axis (which families stream, which have an optimized graph) is the registry's:
# ``models.types`` and ``stages.export.check_optimize``/``stages.residency.streams``.
COMBINATIONS: tuple[Rule, ...] = (
    Rule(
        lambda s, both: both,
        "--quantize and --dtype both set how weights are stored: give one",
        "precision",
    ),
    Rule(
        lambda s, both: s.block_size is not None and s.precision not in (Precision.INT8, Precision.INT4),
        "--block-size sets MatMulNBits' blocks: give --quantize int8 or int4",
        "precision",
    ),
    Rule(
        lambda s, both: s.keep_adapter and not s.precision.is_quantized,
        "--keep-adapter keeps the adapter beside a quantized base: give --quantize",
        "mode × precision",
    ),
    Rule(
        lambda s, both: s.mode is ExportMode.ADAPTER and s.residency is Residency.STREAM,
        "--mode adapter is not streamed: give --no-stream (the model must fit in memory)",
        "mode × residency",
    ),
    Rule(  # the fused writer has no quantize_dynamic: it wrote float32 and called it int8-dynamic
        lambda s, both: s.precision is Precision.INT8_DYNAMIC and s.residency is Residency.STREAM,
        "--quantize int8-dynamic is not streamed: give --quantize int8 or int4, or --no-stream",
        "precision × residency",
    ),
)


def refusals_table() -> str:
    """``COMBINATIONS`` as the Markdown table docs/support.md prints (a test holds them equal)."""
    rows = ["| axes | refused with exit 3 |", "|---|---|"]
    rows += [f"| {rule.axes} | {rule.message} |" for rule in COMBINATIONS]
    return "\n".join(rows) + "\n"


SPEC_FIELDS = (
    "mode", "dtype", "quantize", "keep_adapter", "optimize", "stream", "opset", "exporter", "max_rank",
    "block_size",
)  # fmt: skip


def split_fields(given: dict[str, Any], *groups: tuple[str, ...]) -> list[dict[str, Any]]:
    """``given`` keywords shared out among ``groups`` (each a tuple of names, in order); a name
    no group takes is a ``TypeError``, as Python says of an unknown keyword."""
    out: list[dict[str, Any]] = [{} for _ in groups]
    for name, value in given.items():
        for i, names in enumerate(groups):
            if name in names:
                out[i][name] = value
                break
        else:
            raise TypeError(f"unexpected keyword argument {name!r}")
    return out


def spec_of(spec: ExportSpec | None, given: dict[str, Any]) -> ExportSpec:
    """``spec``, or the one the keywords ``given`` ask for (never both)."""
    if spec is not None:
        if given:
            raise TypeError(f"give spec= or its options, not both ({', '.join(sorted(given))})")
        return spec
    return ExportSpec.from_options(**given)


def field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class Run:
    """How a command runs, whatever it makes: replace an existing output (``force``), load a
    pickled adapter (``allow_pickle``, then ``weights_only=True``), where progress lines go
    (``log``) and whether bars are drawn (``show_progress``); ``merge-and-export`` verifies what
    it wrote unless ``verify_output`` is False."""

    force: bool = False
    allow_pickle: bool = False
    log: Callable[[str], None] = _quiet
    show_progress: bool = False
    verify_output: bool = True


RUN_FIELDS = field_names(Run)


def run_of(run: Run | None, given: dict[str, Any]) -> Run:
    """``run``, or the ``Run`` made of the keywords ``given`` (never both)."""
    if run is not None:
        if given:
            raise TypeError(f"give run= or its fields, not both ({', '.join(sorted(given))})")
        return run
    return Run(**given)
