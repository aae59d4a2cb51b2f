"""A Llama-2-7B-shaped checkpoint through loraexport in bounded memory (``make bench-7b``).

Writes once, in ``runs/bench-7b/`` (never committed; ~13.5 GB plus the exports), a random float16
checkpoint of Llama-2-7B's shapes (hidden 4096, 32 layers, intermediate 11008, 32 heads, vocab
32000) in 2 GB safetensors shards, tensor by tensor (nothing holds the model), and a random r=16
LoRA adapter on q/k/v/o. Then, each in its own process, with its wall time and peak RSS:

1. ``merge-and-export --quantize int4 --keep-adapter`` (no --stream: the size picks it), verified
   against the layer-streamed reference;
2. ``merge-and-export --dtype bfloat16 --no-verify``, then two checks of the written file against
   the layer-streamed unmerged reference: its first ``CHECK_LAYERS`` layers (cut out of model.onnx,
   reading the same model.onnx.data) in one onnxruntime session, and the whole model run a chunk of
   layers at a time (``verify.chunked``).

Prints a table; the per-stage times and memory are in each output's report.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from bench_export_large import _measure  # run beside it: python benchmarks/bench_7b.py

BIN = Path(sys.executable).parent
CONFIG = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
    torch_dtype="float16",
)
RANK, ALPHA = 16, 32
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
SHARD_BYTES = 2 * 1024**3
CHECK_LAYERS = 2


STD = 0.02  # transformers' initializer_range for Llama


def _tensors(config: dict):
    """(name, shape, std) of every tensor, in the order transformers saves them. The projections
    back into the residual stream (o_proj, down_proj) get std 0.02/sqrt(2·layers), the scaled
    initialization deep transformers are trained from (GPT-2, Megatron): with std 0.02 everywhere
    the random network is chaotic, int4 noise in any layer rewrites its output (top-1 4.7%, 48% of
    the adapter retained, measured) and no trained 7B behaves so."""
    h, n, inter, v = (
        config[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
    )
    out_std = STD / math.sqrt(2 * n)
    yield "model.embed_tokens.weight", (v, h), 1.0
    for i in range(n):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", (h,), None
        for m in ("q_proj", "k_proj", "v_proj"):
            yield f"{p}.self_attn.{m}.weight", (h, h), STD
        yield f"{p}.self_attn.o_proj.weight", (h, h), out_std
        yield f"{p}.post_attention_layernorm.weight", (h,), None
        yield f"{p}.mlp.gate_proj.weight", (inter, h), STD
        yield f"{p}.mlp.up_proj.weight", (inter, h), STD
        yield f"{p}.mlp.down_proj.weight", (h, inter), out_std
    yield "model.norm.weight", (h,), None
    yield "lm_head.weight", (v, h), STD


def build(root: Path) -> None:
    """The checkpoint and the adapter, unless already there (``.done`` marks completion)."""
    if (root / ".done").is_file():
        return
    import torch
    from safetensors.torch import save_file

    base, adapter = root / "base", root / "adapter"
    base.mkdir(parents=True, exist_ok=True)
    adapter.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    shard: dict = {}
    shards: list[dict] = []
    size = 0
    t0 = time.perf_counter()

    def flush() -> None:
        nonlocal shard, size
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, str(base / name), metadata={"format": "pt"})
            shards.append({"file": name, "names": list(shard)})
            print(f"  wrote {name} ({size / 1e9:.2f} GB, {time.perf_counter() - t0:.0f} s)", flush=True)
        shard, size = {}, 0

    for name, shape, std in _tensors(CONFIG):
        t = torch.ones(shape) if std is None else torch.randn(shape, generator=g).mul_(std)
        t = t.to(torch.float16)
        if size + t.numel() * 2 > SHARD_BYTES:
            flush()
        shard[name] = t
        size += t.numel() * 2
    flush()
    total = len(shards)
    weight_map = {}
    for i, s in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        (base / s["file"]).rename(base / final)
        weight_map.update(dict.fromkeys(s["names"], final))
    total_size = sum((base / f).stat().st_size for f in set(weight_map.values()))
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=1)
    )
    (base / "config.json").write_text(json.dumps(CONFIG, indent=2))
    h = CONFIG["hidden_size"]
    lora = {}
    for i in range(CONFIG["num_hidden_layers"]):
        for m in TARGETS:
            p = f"base_model.model.model.layers.{i}.self_attn.{m}"
            lora[f"{p}.lora_A.weight"] = torch.randn(RANK, h, generator=g) / math.sqrt(h)
            lora[f"{p}.lora_B.weight"] = torch.randn(h, RANK, generator=g) * 0.01
    save_file(lora, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": list(TARGETS)})
    )
    (root / ".done").write_text("")
    print(f"checkpoint: {total_size / 1e9:.2f} GB in {total} shards, {time.perf_counter() - t0:.0f} s")


def _first_layers_view(base: Path, view: Path, layers: int) -> None:
    """A checkpoint folder of the first ``layers`` layers: config and index rewritten, the shards
    that hold those tensors hard-linked (no copy)."""
    index = json.loads((base / "model.safetensors.index.json").read_text())
    wanted = {
        n: f
        for n, f in index["weight_map"].items()
        if not n.startswith("model.layers.") or int(n.split(".")[2]) < layers
    }
    view.mkdir(exist_ok=True)
    for f in set(wanted.values()):
        if not (view / f).exists():
            (view / f).hardlink_to(base / f)
    (view / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wanted}))
    (view / "config.json").write_text(json.dumps({**CONFIG, "num_hidden_layers": layers}))


def check_first_layers(base: Path, export: Path, layers: int) -> str:
    """The export's first ``layers`` layers in onnxruntime against the layer-streamed reference.

    The graph is cut at the normed input of layer ``layers`` (this checkpoint's norm weights are
    all ones, so that equals the final norm of a ``layers``-layer model) and its LM head applied
    in numpy; the reference is the same ``layers``-layer model, unmerged, layer-streamed."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from safetensors import safe_open

    from loraexport.lora.adapter import Adapter
    from loraexport.verify.layered import branches as lora_branches
    from loraexport.verify.streamed import StreamedDecoder

    out_name = f"layers.{layers}.input_norm.out"
    proto = onnx.load(str(export / "model.onnx"), load_external_data=False)
    producer = {o: n for n in proto.graph.node for o in n.output}
    keep, todo = set(), [out_name]
    while todo:
        node = producer.get(todo.pop())
        if node is None or id(node) in keep:
            continue
        keep.add(id(node))
        todo.extend(i for i in node.input if i)
    nodes = [n for n in proto.graph.node if id(n) in keep]
    used = {i for n in nodes for i in n.input}
    inits = [t for t in proto.graph.initializer if t.name in used]
    inputs = [i for i in proto.graph.input if i.name in used]
    hidden = onnx.helper.make_tensor_value_info(out_name, onnx.TensorProto.FLOAT, None)
    graph = onnx.helper.make_graph(nodes, "first_layers", inputs, [hidden], inits)
    cut = onnx.helper.make_model(graph, opset_imports=proto.opset_import, ir_version=proto.ir_version)
    path = export / ".first_layers.onnx"  # beside model.onnx.data, which it reads
    onnx.save_model(cut, str(path))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CONFIG["vocab_size"], (1, 16), generator=g)
    mask = torch.ones_like(ids)
    try:
        feeds = {
            "input_ids": ids.numpy(),
            "attention_mask": mask.numpy(),
            "position_ids": np.arange(16)[None],
        }
        heads, dim = CONFIG["num_key_value_heads"], CONFIG["hidden_size"] // CONFIG["num_attention_heads"]
        for i in range(layers):
            for k in ("key", "value"):
                feeds[f"past_key_values.{i}.{k}"] = np.zeros((1, heads, 0, dim), np.float32)
        names = {i.name for i in inputs}
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        normed = session.run([out_name], {k: v for k, v in feeds.items() if k in names})[0]
        del session
    finally:
        path.unlink()
    index = json.loads((base / "model.safetensors.index.json").read_text())
    with safe_open(str(base / index["weight_map"]["lm_head.weight"]), "pt") as f:
        head = f.get_tensor("lm_head.weight").double()
    got = (torch.from_numpy(normed).double() @ head.T).numpy()[0]
    view = base.parent / f"first-{layers}-layers"
    _first_layers_view(base, view, layers)
    adapter = Adapter.load(base.parent / "adapter")

    class _Src:  # what verify.layered.branches reads
        adapters, weights = [adapter], [1.0]

    lora = {k: v for k, v in lora_branches(_Src).items() if int(k.split(".")[2]) < layers}
    streams = [(torch.float64, True), (torch.float32, True), (torch.float64, False)]
    ref = StreamedDecoder(view, lora).forward(ids, mask, streams)
    u64, u32, b64 = (ref[s][0].double().numpy() for s in streams)
    err, noise, effect = (float(np.abs(x - u64).max()) for x in (got, u32, b64))
    top1 = float((got.argmax(-1) == u64.argmax(-1)).mean())
    return (
        f"first {layers} layers of the bfloat16 export (onnxruntime, cut out of model.onnx) against the "
        f"layer-streamed unmerged reference, 16 tokens: max abs logit err {err:.3g} vs float64 "
        f"(float32 reference's own: {noise:.3g}; the adapter's effect: {effect:.3g}; logits max "
        f"{float(np.abs(u64).max()):.3g}), top-1 {top1:.0%}"
    )


def check_whole(base: Path, export: Path) -> str:
    """The whole bfloat16 export in onnxruntime, a chunk of layers at a time (``verify.chunked``:
    each chunk's float32 copy of its weights, never the model's 27 GB), against the layer-streamed
    unmerged reference on 16 tokens."""
    import numpy as np
    import torch

    from loraexport.lora.adapter import Adapter
    from loraexport.verify.chunked import ChunkedDecoder
    from loraexport.verify.layered import branches as lora_branches
    from loraexport.verify.streamed import StreamedDecoder

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CONFIG["vocab_size"], (1, 16), generator=g)
    mask = torch.ones_like(ids)
    meta = json.loads((export / "loraexport.json").read_text())
    t0 = time.perf_counter()
    with ChunkedDecoder(export, meta) as model:
        got = model.forward_all(ids.numpy(), mask.numpy())[0].astype(np.float64)
        chunks = model.chunks
    onnx_s = time.perf_counter() - t0

    class _Src:  # what verify.layered.branches reads
        adapters, weights = [Adapter.load(base.parent / "adapter")], [1.0]

    streams = [(torch.float64, True), (torch.float32, True), (torch.float64, False)]
    ref = StreamedDecoder(base, lora_branches(_Src)).forward(ids, mask, streams)
    u64, u32, b64 = (ref[s][0].double().numpy() for s in streams)
    err, noise, effect = (float(np.abs(x - u64).max()) for x in (got, u32, b64))
    top1 = float((got.argmax(-1) == u64.argmax(-1)).mean())
    return (
        f"the whole bfloat16 export (onnxruntime, {chunks} chunks, {onnx_s:.0f} s) against the "
        "layer-streamed "
        f"unmerged reference, 16 tokens: max abs logit err {err:.3g} vs float64 (float32 reference's own: "
        f"{noise:.3g}; the adapter's effect: {effect:.3g}; logits max {float(np.abs(u64).max()):.3g}), "
        f"top-1 {top1:.0%}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("runs/bench-7b"))
    ap.add_argument(
        "--only", choices=["int4", "bf16", "check"], default=None, help="check: only the bf16 checks"
    )
    args = ap.parse_args()
    build(args.dir)
    base, adapter = args.dir / "base", args.dir / "adapter"
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    runs = {
        "int4": [
            str(BIN / "loraexport"), "merge-and-export", "--base", str(base), "--adapter", str(adapter),
            "--out", str(args.dir / "out-int4"), "--force", "--quantize", "int4", "--keep-adapter",
        ],
        "bf16": [
            str(BIN / "loraexport"), "merge-and-export", "--base", str(base), "--adapter", str(adapter),
            "--out", str(args.dir / "out-bf16"), "--force", "--dtype", "bfloat16", "--no-verify",
        ],
    }  # fmt: skip
    rows = []
    for name, cmd in runs.items():
        if args.only and name != args.only:  # "check": no run, only the checks of out-bf16
            continue
        started = time.time()
        code, wall, peak, out = _measure(cmd)
        print(f"## {' '.join(cmd[1:])}\n{out}\n", flush=True)
        rows.append((name, code, wall, peak))
        report = args.dir / f"out-{name}" / "report.json"
        if report.is_file() and report.stat().st_mtime > started:  # this run's, not an earlier one's
            for st in json.loads(report.read_text()).get("stages", []):
                print(f"  {st['name']}: {st['seconds']:.0f} s, peak {st['peak_rss_gb']:.2f} GB")
    print(f"\nweights {size / 1e9:.2f} GB (float16)\n")
    print("| run | exit | wall | peak RSS | peak / weights |\n|---|---:|---:|---:|---:|")
    for name, code, wall, peak in rows:
        print(f"| {name} | {code} | {wall / 60:.1f} min | {peak:.2f} GB | {peak / (size / 1e9):.2f}x |")
    if (args.dir / "out-bf16" / "model.onnx").is_file() and args.only != "int4":
        print(check_first_layers(base, args.dir / "out-bf16", CHECK_LAYERS))
        print(check_whole(base, args.dir / "out-bf16"))


if __name__ == "__main__":
    main()
