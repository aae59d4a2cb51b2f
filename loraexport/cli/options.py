"""The options several commands share (one decorator each) and how results are printed.

``verify_options`` hands a command one ``VerifyOptions`` (the library's own type), built from
the options verify and merge-and-export share; the library checks it before any work.
"""

from __future__ import annotations

import functools
from pathlib import Path

import click

from loraexport.cli.types import MAX_OPSET, MAX_OPSET_TORCHSCRIPT, MIN_OPSET, Number, PositiveInt
from loraexport.core.enums import MAX_LORA_RANK, NBITS_BLOCKS, ExportMode, Precision
from loraexport.spec import SPEC_FIELDS, ExportSpec
from loraexport.verify.options import VerifyOptions

# readable=False: the library checks paths and says what is wrong in one line (exit 3)
PATH = click.Path(path_type=Path, readable=False)

force_option = click.option("--force", is_flag=True, help="Replace --out if it exists.")
pickle_option = click.option(
    "--allow-pickle", is_flag=True, help="Load adapter_model.bin (weights_only=True)."
)


junit_option = click.option(
    "--junit",
    type=PATH,
    help="Also write the checks as JUnit XML here (a failed gate is a <failure>), for CI; never into an "
    "input.",
)


def json_option(what: str):
    return click.option("--json", "as_json", is_flag=True, help=what)


def adapter_options(required: bool = True):
    """``--adapter`` (repeatable) and ``--weight`` (one per adapter, in order)."""

    def deco(f):
        f = click.option(
            "--weight",
            "weights",
            multiple=True,
            type=Number(float),
            help="Weight of each --adapter, in order (default 1.0 each): W0 + Σ w·s·B·A.",
        )(f)
        return click.option(
            "--adapter",
            "adapters",
            required=required,
            multiple=True,
            type=PATH,
            help="PEFT adapter directory; repeat to combine several.",
        )(f)

    return deco


def export_options(f):
    """--opset, --exporter, --dtype, --quantize, --block-size, --keep-adapter, --optimize, --stream and
    --max-rank (and the command's --mode), shared by export and merge-and-export: given to the command as one
    ``ExportSpec`` (keyword ``spec``), checked by its table before any work."""

    inner = f

    @functools.wraps(inner)
    def command(*args, **kwargs):
        asked = {name: kwargs.pop(name) for name in SPEC_FIELDS if name in kwargs}
        if asked.get("block_size") is not None:  # a choice of click's, as text
            asked["block_size"] = int(asked["block_size"])
        return inner(*args, spec=ExportSpec.from_options(**asked), **kwargs)

    f = click.option(
        "--max-rank",
        type=Number(int, 1, MAX_LORA_RANK),
        help="With --mode adapter: the graph's LoRA rank (default: the largest rank of the adapters given).",
    )(command)
    f = click.option(
        "--stream/--no-stream",
        default=None,
        help=(
            "Llama, Mistral, Qwen2: write the (fused) graph from the checkpoint tensor by tensor and verify "
            "it against a layer-streamed reference, in memory bounded by a layer, not the model (default: "
            "whenever the streamed path does what is asked). --no-stream: the model in memory, the "
            "torch.onnx graph with logits at every position (or --optimize's), latency measured."
        ),
    )(f)
    f = click.option(
        "--optimize",
        is_flag=True,
        help=(
            "Hugging Face decoders: a graph that does less (LM head on the last position) and, for "
            "Llama, Mistral and Qwen2, runs onnxruntime's fused attention with the cache updated in place."
        ),
    )(f)
    f = click.option(
        "--keep-adapter",
        is_flag=True,
        help="With --quantize: quantize the base only and keep the LoRA branches in float32 beside it.",
    )(f)
    f = click.option(
        "--block-size",
        type=click.Choice([str(b) for b in NBITS_BLOCKS]),
        help=(
            "With --quantize int8 or int4: weights per scale (default 16). Larger blocks decode faster "
            "and keep less of the weights' detail (docs/quantization.md)."
        ),
    )(f)
    f = click.option(
        "--quantize",
        type=click.Choice(Precision.choices("quantized")),
        help=(
            "Quantize the graph's MatMul weights: int8 or int4 (weight-only MatMulNBits, blocks), "
            "int8-dynamic (int8 weights and int8 activations per token: fastest prompts, least accurate)."
        ),
    )(f)
    f = click.option(
        "--dtype",
        type=click.Choice(Precision.choices()),
        help="Store the ONNX weights in this dtype (merged weights rounded once; computation stays float32).",
    )(f)
    f = click.option(
        "--exporter",
        type=click.Choice(["dynamo", "torchscript"]),
        help="torch.onnx exporter (default: dynamo for the reference model, torchscript for HF models).",
    )(f)
    return click.option(
        "--opset",
        default=MIN_OPSET,
        show_default=True,
        type=Number(int, MIN_OPSET, MAX_OPSET),
        help=f"ONNX opset, {MIN_OPSET} to {MAX_OPSET} "
        f"(the torchscript exporter writes up to {MAX_OPSET_TORCHSCRIPT}).",
    )(f)


mode_option = click.option(
    "--mode",
    type=click.Choice(ExportMode.choices()),
    default=ExportMode.MERGED.value,
    show_default=True,
    help=(
        "With --adapter: merge it; keep the LoRA branches in the graph (unmerged); or keep them with "
        "A and B as graph inputs, one .onnx_adapter file per adapter, switched per request (adapter)."
    ),
)
serve_mode_option = click.option(
    "--mode",
    type=click.Choice([ExportMode.MERGED.value, ExportMode.ADAPTER.value]),
    default=ExportMode.MERGED.value,
    show_default=True,
    help=(
        "merged: the adapters merged into one graph; adapter: the base once, A and B graph inputs, one "
        ".onnx_adapter file per adapter (switched per request), each verified against its own model."
    ),
)


def verify_options(f):
    """The checking options of verify and merge-and-export, given to the command as one
    ``VerifyOptions`` (keyword ``verify_options``), then ``--allow-pickle`` and ``--json``."""

    @functools.wraps(f)
    def command(
        *args,
        providers,
        samples,
        eval_data,
        no_latency,
        half,
        threads,
        min_top1,
        min_adapter_retained,
        **kwargs,
    ):
        options = VerifyOptions(
            providers=list(providers) or None,
            samples=samples,
            eval_data=eval_data,
            latency=not no_latency,
            half=tuple(half),
            threads=threads,
            min_top1=min_top1,
            min_adapter_retained=min_adapter_retained,
        )
        return f(*args, verify_options=options, **kwargs)

    for opt in reversed(
        [
            click.option(
                "--provider",
                "providers",
                multiple=True,
                type=click.Choice(["cpu", "cuda"]),
                help="onnxruntime provider(s); default CPU, plus CUDA when available.",
            ),
            click.option(
                "--samples",
                default=6,
                show_default=True,
                type=PositiveInt(1000),
                help="Parity cases (batch sizes and lengths vary).",
            ),
            click.option(
                "--eval-data", type=PATH, help="JSON Lines whose sources are used as generation prompts."
            ),
            click.option("--no-latency", is_flag=True, help="Skip the latency measurement."),
            click.option(
                "--half",
                multiple=True,
                type=click.Choice(Precision.choices(half_only=True)),
                help="Also report what storing the merged weights in this dtype costs (repeatable).",
            ),
            click.option(
                "--threads",
                type=PositiveInt(256),
                help="Threads for torch and onnxruntime (default: cores).",
            ),
            click.option(
                "--min-top1",
                type=Number(float, 0.0, 1.0, lo_open=True),
                help=(
                    "Quality budget of a quantized or half-precision export: its top-1 agreement with the "
                    "unmerged float32 model must reach this share (e.g. 0.95), else exit 4."
                ),
            ),
            click.option(
                "--min-adapter-retained",
                type=Number(float, 0.0, 1.0, lo_open=True),
                help=(
                    "Quality budget: the share of the adapter's effect the export shows must lie within "
                    "[this, 2 - this] (e.g. 0.9: 90% to 110%), else exit 4."
                ),
            ),
            pickle_option,
            json_option("Print report.json on stdout."),
        ]
    ):
        command = opt(command)
    return command
