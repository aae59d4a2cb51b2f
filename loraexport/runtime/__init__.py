"""What an app needs to run an export with onnxruntime alone (no torch, no transformers)::

    from loraexport.runtime import OnnxModel

``model`` (OnnxModel: forward, decoding, text), ``decode`` (the decoding loop), ``sampling``
(greedy or sampled tokens), ``text`` (tokenizer.json, text generated and streamed, embeddings),
``chat`` (chat templates), ``fused`` (the fused graph's cache), ``adapters`` (``.onnx_adapter``
files), ``sessions`` (onnxruntime sessions), ``files`` (ONNX files checked before onnxruntime
reads them).
"""

from loraexport.artifact.schema import KINDS, check_export_meta, read_export_meta
from loraexport.runtime.files import MAX_ONNX_BYTES, RuntimeInputError, check_external_data
from loraexport.runtime.fused import empty_past, positions
from loraexport.runtime.model import PROVIDERS, OnnxModel, chain_forward, open_session, session_options
from loraexport.runtime.sampling import Sampling
from loraexport.runtime.text import ExportTokenizer, TextStream

__all__ = [
    "KINDS",
    "ExportTokenizer",
    "MAX_ONNX_BYTES",
    "PROVIDERS",
    "OnnxModel",
    "RuntimeInputError",
    "Sampling",
    "TextStream",
    "chain_forward",
    "check_export_meta",
    "check_external_data",
    "empty_past",
    "open_session",
    "positions",
    "read_export_meta",
    "session_options",
]
