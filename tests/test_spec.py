"""``ExportSpec``: the options of export and merge-and-export as one value, checked once by one
table (``COMBINATIONS``), which docs/support.md prints; ``Run`` and the keyword routing of the
library's functions."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraexport.core.enums import ExportMode, Precision
from loraexport.errors import InvalidInputError
from loraexport.spec import (
    COMBINATIONS,
    DEFAULT_OPSET,
    SPEC_FIELDS,
    ExportSpec,
    Graph,
    Residency,
    Run,
    refusals_table,
    run_of,
    spec_of,
    split_fields,
)

SUPPORT = Path(__file__).resolve().parents[1] / "docs" / "support.md"


def test_the_default_opset_is_the_exporters():
    from loraexport.export.onnx import DEFAULT_OPSET as EXPORT_DEFAULT

    assert DEFAULT_OPSET == EXPORT_DEFAULT


def test_a_block_size_is_part_of_the_spec():
    spec = ExportSpec.from_options(quantize="int4", block_size=64)
    assert spec.block_size == 64 and ExportSpec.from_options(quantize="int8").block_size is None


def test_options_become_one_spec():
    spec = ExportSpec.from_options(quantize="int4", keep_adapter=True, optimize=True, stream=False)
    assert spec.mode is ExportMode.UNMERGED and spec.keep_adapter  # --keep-adapter is the unmerged mode
    assert spec.precision is Precision.INT4 and spec.quant is Precision.INT4 and spec.half is None
    assert spec.graph is Graph.OPTIMIZED and spec.residency is Residency.MEMORY and spec.stream is False
    assert ExportSpec.from_options().stream is None and ExportSpec.from_options().stored is None
    half = ExportSpec.from_options(dtype="bfloat16")
    assert half.half is Precision.BFLOAT16 and half.stored is Precision.BFLOAT16


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dtype": "float16", "quantize": "int8"}, "--quantize and --dtype both set how weights are stored"),
        ({"keep_adapter": True}, "--keep-adapter keeps the adapter beside a quantized base"),
        ({"mode": "adapter", "stream": True}, "--mode adapter is not streamed"),
        ({"quantize": "int8-dynamic", "stream": True}, "--quantize int8-dynamic is not streamed"),
        ({"mode": "base"}, "--mode must be one of"),
        ({"quantize": "int3"}, "unknown dtype"),
        ({"block_size": 32}, "--block-size sets MatMulNBits' blocks: give --quantize int8 or int4"),
        ({"block_size": 32, "quantize": "int8-dynamic"}, "--block-size sets MatMulNBits' blocks"),
        ({"block_size": 32, "dtype": "float16"}, "--block-size sets MatMulNBits' blocks"),
        ({"block_size": 24, "quantize": "int4"}, "--block-size must be one of 16, 32, 64, 128, got 24"),
        ({"block_size": 32.0, "quantize": "int4"}, "--block-size must be one of 16, 32, 64, 128, got 32.0"),
        ({"block_size": True, "quantize": "int4"}, "--block-size must be one of"),
    ],
)
def test_each_refused_combination_is_one_line(options, message):
    with pytest.raises(InvalidInputError, match=message) as e:
        ExportSpec.from_options(**options)
    assert "\n" not in str(e.value)


def test_every_rule_of_the_table_refuses_something_and_passes_something():
    """A rule that can never fire, or always fires, is no rule: each is seen both ways."""
    specs = [
        ExportSpec(mode=m, precision=p, residency=r, keep_adapter=k, block_size=b)
        for m in (ExportMode.MERGED, ExportMode.UNMERGED, ExportMode.ADAPTER)
        for p in Precision
        for r in (None, Residency.MEMORY, Residency.STREAM)
        for k in (False, True)
        for b in (None, 32)
    ]
    for rule in COMBINATIONS:
        fired = [rule.refuses(s, both) for s in specs for both in (False, True)]
        assert any(fired) and not all(fired), rule.message


def test_a_streamed_choice_is_checked_again():
    with pytest.raises(InvalidInputError, match="int8-dynamic is not streamed"):
        ExportSpec.from_options(quantize="int8-dynamic").check_streamed()
    ExportSpec.from_options(quantize="int8").check_streamed()


@pytest.mark.parametrize(
    ("options", "adapters", "weights", "modes", "message"),
    [
        (
            {"mode": "unmerged"},
            ["a"],
            None,
            (ExportMode.MERGED, ExportMode.ADAPTER),
            "merge-and-export --mode is",
        ),
        ({"quantize": "int8", "keep_adapter": True}, [], None, (), "--keep-adapter needs an --adapter"),
        ({"mode": "adapter"}, [], None, (), "--mode adapter needs an --adapter"),
        ({"mode": "adapter", "max_rank": 0}, ["a"], None, (), "--max-rank must be an integer from 1"),
        ({"mode": "adapter"}, ["a"], [0.5], (), "--weight does not apply to --mode adapter"),
        ({"mode": "unmerged", "dtype": "float16"}, ["a"], None, (), "does not apply to --mode unmerged"),
    ],
)
def test_what_needs_the_adapters_is_checked_with_them(options, adapters, weights, modes, message):
    spec = ExportSpec.from_options(**options)
    with pytest.raises(InvalidInputError, match=message):
        spec.check(adapters, weights, modes)


def test_docs_support_prints_the_table():
    text = SUPPORT.read_text(encoding="utf-8")
    start = text.index("<!-- generated from loraexport.spec.COMBINATIONS")
    block = text[text.index("\n", start) + 1 : text.index("<!-- end generated -->")]
    assert block == refusals_table()


def test_keywords_are_routed_and_unknown_ones_refused():
    spec_fields, run_fields = split_fields({"quantize": "int8", "force": True}, SPEC_FIELDS, ("force",))
    assert spec_fields == {"quantize": "int8"} and run_fields == {"force": True}
    with pytest.raises(TypeError, match="unexpected keyword argument 'quantise'"):
        split_fields({"quantise": "int8"}, SPEC_FIELDS)
    with pytest.raises(TypeError, match="not both"):
        spec_of(ExportSpec(), {"dtype": "float16"})
    with pytest.raises(TypeError, match="not both"):
        run_of(Run(), {"force": True})
    assert run_of(None, {"force": True}).force is True


def test_the_api_refuses_a_misspelt_option_before_any_work(tmp_path):
    import loraexport

    with pytest.raises(TypeError, match="quantise"):
        loraexport.merge_and_export(tmp_path / "nope", tmp_path / "nope", tmp_path / "out", quantise="int8")
    assert not (tmp_path / "out").exists()
