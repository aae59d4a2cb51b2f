"""loraexport: train or load a LoRA adapter, merge it exactly, export to ONNX, verify.

The public API mirrors the CLI; each call takes and writes directories::

    import loraexport
    report = loraexport.merge_and_export("samples/base", "runs/demo-adapter", "runs/demo")

Heavy modules (torch, onnx) are imported on first use, so ``import loraexport`` is cheap and
``loraexport.runtime`` stays usable without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loraexport._version import __version__

_LAZY = {
    "train": "loraexport.stages.train",
    "merge": "loraexport.stages.merge",
    "export": "loraexport.stages.export",
    "verify": "loraexport.stages.verify",
    "merge_and_export": "loraexport.pipeline",
    "Adapter": "loraexport.lora.adapter",
    "LoraConfig": "loraexport.lora.config",
}
__all__ = ["Adapter", "LoraConfig", "__version__", "export", "merge", "merge_and_export", "train", "verify"]

if TYPE_CHECKING:  # pragma: no cover
    from loraexport.lora.adapter import Adapter
    from loraexport.lora.config import LoraConfig
    from loraexport.pipeline import merge_and_export
    from loraexport.stages.export import export
    from loraexport.stages.merge import merge
    from loraexport.stages.train import train
    from loraexport.stages.verify import verify


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'loraexport' has no attribute {name!r}")
