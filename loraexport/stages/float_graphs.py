"""The graph files of this run's export as the exporter wrote them, before quantizing
(``FloatGraphs``): ``merge-and-export`` hands them to the proof (``stages.prove``), which quantizes
them again instead of exporting the reference a second time."""

from __future__ import annotations

import shutil
from pathlib import Path

from loraexport.verify.chunked import scratch_dir


class FloatGraphs:
    """The graph files of this run's export as the exporter wrote them, before quantizing (hard
    links beside the output, removed on ``close``): ``merge-and-export`` hands them to the proof,
    which quantizes them again instead of exporting the reference a second time. The proof still
    matches every float weight to the reference's modules by value, so a graph that is not the
    reference's export fails as it would have."""

    def __init__(self, beside: Path, avoid: tuple[Path, ...] = ()):
        self.dir = Path(scratch_dir(beside, "float-graphs", avoid))
        self.files: list[str] = []

    def keep(self, path: Path) -> None:  # export_model's on_float: called before each graph is quantized
        """A graph alone is hard-linked (the quantizer replaces it by a rename). A graph with external
        data is copied, both files: the quantizer rewrites such a graph file in place, and onnx
        refuses to load external data with more than one link (its guard against hard-link attacks)."""
        data = path.with_name(path.name + ".data")
        for source in (path, data):
            if source.is_file():
                link_or_copy(source, self.dir / source.name, copy=data.is_file())
        self.files.append(path.name)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def link_or_copy(source: Path, target: Path, copy: bool) -> None:
    if not copy:
        try:
            target.hardlink_to(source)
            return
        except OSError:  # another file system: a copy
            pass
    shutil.copyfile(source, target)
