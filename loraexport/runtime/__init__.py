"""What an app needs to run an export with onnxruntime alone (no torch, no transformers)::

    from loraexport.runtime import OnnxModel

``model`` (sessions, forward, greedy decoding), ``fused`` (the fused graph's cache), ``adapters``
(``.onnx_adapter`` files), ``files`` (ONNX files checked before onnxruntime reads them).
"""

from loraexport.artifact.schema import KINDS, check_export_meta, read_export_meta
from loraexport.runtime.files import MAX_ONNX_BYTES, RuntimeInputError, check_external_data
from loraexport.runtime.fused import empty_past, positions
from loraexport.runtime.model import PROVIDERS, OnnxModel, chain_forward, open_session, session_options

__all__ = [
    "KINDS",
    "MAX_ONNX_BYTES",
    "PROVIDERS",
    "OnnxModel",
    "RuntimeInputError",
    "chain_forward",
    "check_export_meta",
    "check_external_data",
    "empty_past",
    "open_session",
    "positions",
    "read_export_meta",
    "session_options",
]
