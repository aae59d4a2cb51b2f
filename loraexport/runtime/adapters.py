"""The adapters of an adapter-mode export (``--mode adapter``), for ``loraexport.runtime``:
found by name, read once (``onnxruntime.AdapterFormat``), and fed per call to the graph inputs
they fill. torch-free."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from loraexport.runtime.files import RuntimeInputError

SUFFIX = ".onnx_adapter"


def find_adapters(directory: Path, meta: dict) -> dict[str, Path]:
    """``{name: file}``: those ``loraexport.json`` lists (``adapter_files``), then any other
    ``*.onnx_adapter`` in ``directory`` by its file name without the suffix. Only plain names
    inside ``directory`` are taken from the description."""
    found: dict[str, Path] = {}
    listed = meta.get("adapter_files")
    for entry in listed if isinstance(listed, list) else []:
        name, file = (entry.get(k) if isinstance(entry, dict) else None for k in ("name", "file"))
        bad_file = not isinstance(file, str) or file in ("", ".", "..") or Path(file).name != file
        if not isinstance(name, str) or bad_file:
            raise RuntimeInputError(
                f"{directory / 'loraexport.json'}: adapter_files holds {entry!r}, not a name and a file"
            )
        found[name] = directory / file
    for path in sorted(directory.glob(f"*{SUFFIX}")):
        if path not in found.values():
            found.setdefault(path.name[: -len(SUFFIX)], path)
    return found


class Active:
    """An adapter loaded for runs: its tensors by graph input name, as OrtValues (for an
    io-binding) and as numpy arrays over the same memory (for ``session.run`` feeds). Each
    session is fed the tensors it has inputs for, so one file serves an encoder-decoder's two
    graphs, which ``RunOptions.add_active_adapter`` cannot (a session refuses an adapter holding
    names it has no input for). Single-graph exports work with ``RunOptions`` as well."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.tensors = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
        except Exception as e:  # onnxruntime raises its own types for a bad file
            raise RuntimeInputError(
                f"{path}: not an onnxruntime adapter file ({str(e).splitlines()[0]})"
            ) from e
        self.arrays = {k: v.numpy() for k, v in self.tensors.items()}

    def feeds(self, names: set[str]) -> dict:
        """The arrays for the graph inputs ``names`` (a session's overridable initializers)."""
        return {k: v for k, v in self.arrays.items() if k in names}

    def bound(self, names: set[str]) -> dict:
        """The OrtValues for the graph inputs ``names``, for an io-binding."""
        return {k: v for k, v in self.tensors.items() if k in names}


class AdapterOptions:
    """The adapters of one export, each loaded when first asked for and kept."""

    def __init__(self, adapters: dict[str, Path], inputs: set[str], max_bytes: int | None = None) -> None:
        """``inputs``: the graph inputs an adapter may fill (every session's); ``max_bytes``: the
        largest file that can hold them (``adapter_bytes``), checked before a byte is read."""
        self.adapters = adapters
        self.inputs = inputs
        self.max_bytes = max_bytes
        self._loaded: dict[Path, Active] = {}

    def options(self, adapter: str | Path | None) -> Active | None:
        """``adapter`` (a name, or a file) loaded for runs; None for no adapter."""
        if adapter is None:
            return None
        if isinstance(adapter, str) and adapter in self.adapters:
            path = self.adapters[adapter]
        elif isinstance(adapter, (str, Path)) and str(adapter).endswith(SUFFIX):
            path = Path(adapter)
        else:
            known = ", ".join(sorted(self.adapters)) or "none"
            raise RuntimeInputError(f"unknown adapter {adapter!r}: this export has {known}")
        if path not in self._loaded:
            if not path.is_file():
                raise RuntimeInputError(f"adapter file not found: {path}")
            size = path.stat().st_size
            if self.max_bytes is not None and size > self.max_bytes:
                raise RuntimeInputError(
                    f"{path}: {size:,} bytes, more than an adapter of this export's LoRA inputs can hold "
                    f"({self.max_bytes:,} at most); not read"
                )
            active = Active(path)
            unknown = sorted(set(active.tensors) - self.inputs)
            if unknown:
                raise RuntimeInputError(
                    f"{path}: holds {unknown[0]}, which no graph of this export takes "
                    f"({len(unknown)} such tensors; an adapter for another export?)"
                )
            self._loaded[path] = active
        return self._loaded[path]


def adapter_bytes(shapes: list) -> int | None:
    """The largest ``.onnx_adapter`` that holds tensors of ``shapes`` (the graph's LoRA inputs):
    float32 values, and room for each tensor's name and header and the file's own; None when a
    shape is not fully known."""
    total = 0
    for shape in shapes:
        if not shape or not all(isinstance(d, int) and d >= 0 for d in shape):
            return None
        n = 4
        for d in shape:
            n *= d
        total += n + 1024
    return total + 65536
