"""loraexport: train or load a LoRA adapter, merge it exactly, export to ONNX, verify.

The public API mirrors the CLI; each call takes and writes directories::

    import loraexport
    report = loraexport.merge_and_export("samples/base", "runs/demo-adapter", "runs/demo")

Heavy modules (torch, onnx) are imported on first use, so ``import loraexport`` is cheap and
``loraexport.runtime`` stays usable without torch.
"""

from __future__ import annotations

import sys
import types
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


def _api(name: str) -> Any:
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return _api(name)
    raise AttributeError(f"module 'loraexport' has no attribute {name!r}")


class _Package(types.ModuleType):
    """``loraexport.export`` and ``loraexport.verify`` are functions, and also the names of
    subpackages: importing ``loraexport.export.onnx`` binds the subpackage on the package, which
    would hide the function from then on. The API's names always answer with the function
    (submodules are reached through ``import``, which reads ``sys.modules``)."""

    def __getattribute__(self, name: str) -> Any:
        if name in _LAZY:
            return _api(name)
        return super().__getattribute__(name)


sys.modules[__name__].__class__ = _Package
