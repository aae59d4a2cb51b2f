"""What serving adapters per request costs (``--mode adapter``): loading each adapter file,
activating it for a request, and the adapter-mode graph's latency against the merged export
and the base. Parity per adapter is ``verify.parity``'s, against each adapter's own unmerged
model; this module holds the timings and their report lines."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

ACTIVATION_HOW = (
    "activation: median over interleaved runs of (a forward pass with the adapter active) − (the "
    "same pass with none), batch 1 (below 0: within the timing noise); load: reading the file "
    "into the tensors loraexport.runtime feeds (onnxruntime.AdapterFormat.read_adapter), once "
    "per adapter and session"
)


@dataclass
class AdapterTiming:
    name: str
    file: str
    sha256: str
    load_ms: float
    activation_ms: float  # per request: see ACTIVATION_HOW


@dataclass
class AdapterLatency:
    batch: int
    seq: int
    adapter_ms: float  # the adapter-mode export, an adapter active
    merged_ms: float  # the same adapter merged and exported as this export was
    base_ms: float  # the base exported alike


@dataclass
class AdapterModeResult:
    rank: int
    adapters: list[AdapterTiming] = field(default_factory=list)
    latency: list[AdapterLatency] = field(default_factory=list)
    how: str = ACTIVATION_HOW

    def to_json(self) -> dict:
        return asdict(self)

    def markdown(self) -> list[str]:
        lines = ["## Adapters per request (--mode adapter)", "", f"Graph rank {self.rank}. {self.how}.", ""]
        lines += ["| adapter | file | load ms | activation ms per request |", "|---|---|---:|---:|"]
        lines += [
            f"| {a.name} | `{a.file}` (sha256 {a.sha256[:12]}…) | {a.load_ms:.2f} | {a.activation_ms:.3f} |"
            for a in self.adapters
        ]
        if self.latency:
            lines += ["", "| batch × seq | adapter mode ms | merged ms | base ms | adapter / merged |"]
            lines += ["|---|---:|---:|---:|---:|"]
            lines += [
                f"| {r.batch}×{r.seq} | {r.adapter_ms:.2f} | {r.merged_ms:.2f} | {r.base_ms:.2f} | "
                f"{r.adapter_ms / r.merged_ms:.2f} |"
                for r in self.latency
            ]
        return [*lines, ""]
