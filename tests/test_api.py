"""The package's API: ``loraexport.<stage>`` is the stage's function, also once the subpackage
of the same name (``loraexport.export``, ``loraexport.verify``) has been imported."""

from __future__ import annotations

import importlib
import inspect

import loraexport


def test_the_api_names_stay_functions_after_their_subpackages_are_imported():
    importlib.import_module("loraexport.export.onnx")
    importlib.import_module("loraexport.verify.parity")
    for name in ("train", "merge", "export", "verify", "merge_and_export"):
        fn = getattr(loraexport, name)
        assert inspect.isfunction(fn), (name, fn)
        assert fn.__name__ == name
    from loraexport.export import onnx  # the subpackages stay importable

    assert onnx.__name__ == "loraexport.export.onnx"
