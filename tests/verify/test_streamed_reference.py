"""The layer-streamed reference (``verify/streamed.py``) against transformers' own models: logits
per stream (float64/float32, with and without LoRA branches), greedy generation, the weights it
holds at once, sharded and half-stored checkpoints, and the inputs it refuses."""

from __future__ import annotations

import copy
import importlib
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from loraexport.verify.streamed import StreamedDecoder  # noqa: E402

F64, F32 = torch.float64, torch.float32
# Float64 streams vs the float64 transformers model: the same operations on the same float64 values,
# only the order of a few summations (matmul blocking, SDPA vs explicit softmax(QKᵀ)V, a merged
# W0 + c·B·A vs the unmerged branch) can differ, each costing ~1e-16 relative on O(1) logits through
# 2-3 layers (measured ≤ 4e-15): 1e-10 leaves a wide margin and still catches any float32 step.
ATOL_F64 = 1e-10
# Float32 streams vs the float32 model (or a float32 merged model): float32 round-off (~6e-8
# relative) accumulated over a few 64/128-long dot products and layers on O(1) logits.
ATOL_F32 = 1e-5

CONFIGS = {
    "llama_gqa": (transformers.LlamaConfig, {}),
    "llama_tied_mha": (transformers.LlamaConfig, {"tie_word_embeddings": True, "num_key_value_heads": 4}),
    "mistral": (transformers.MistralConfig, {"num_hidden_layers": 3}),
    "qwen2_bias": (transformers.Qwen2Config, {}),  # q/k/v biases
    # sliding-window attention narrower than the batch: in every layer, and in layer 1 only
    "mistral_window": (transformers.MistralConfig, {"sliding_window": 3}),
    "qwen2_window": (
        transformers.Qwen2Config,
        {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1},
    ),
}


def make_model(kind: str, **overrides) -> transformers.PreTrainedModel:
    cls, kw = CONFIGS[kind]
    config = cls(
        **{
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 128,
            "vocab_size": 100,
            # Larger than the default 0.02: logits of O(1), well separated for greedy decoding.
            "initializer_range": 0.1,
            **kw,
            **overrides,
        }
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    if kind == "qwen2_bias":
        with torch.no_grad():  # transformers initializes biases to zero: make them count
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0, 0.1)
    model.generation_config.eos_token_id = None  # the streamed generate never stops at eos
    return model


def save(model: transformers.PreTrainedModel, directory: Path, **kw) -> Path:
    model.save_pretrained(directory, safe_serialization=True, **kw)
    return directory


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of S=7, the second LEFT-padded with 3 pads."""
    torch.manual_seed(1)
    ids = torch.randint(3, 100, (2, 7))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


def hf_logits(model: transformers.PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits with the positions transformers' generate gives a left-padded batch."""
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


def max_err(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest difference at non-pad positions."""
    return (a.double() - b.double())[mask.bool()].abs().max().item()


@pytest.fixture
def float64_rmsnorm(monkeypatch):
    """transformers' RMSNorm casts its input to float32 even in a float64 model, so `.double()` is
    not a float64 model; the streamed float64 stream normalizes in float64 on purpose. Make the
    transformers models normalize float64 inputs in float64 too (other dtypes unchanged)."""
    for family, cls_name in (
        ("llama", "LlamaRMSNorm"),
        ("mistral", "MistralRMSNorm"),
        ("qwen2", "Qwen2RMSNorm"),
    ):
        cls = getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), cls_name)

        def forward(self, x, _orig=cls.forward):
            if x.dtype != torch.float64:
                return _orig(self, x)
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

        monkeypatch.setattr(cls, "forward", forward)


def lora_branches(model: transformers.PreTrainedModel, rank: int = 4) -> dict:
    """Random branches on q_proj and v_proj of every layer and on o_proj of layer 1."""
    torch.manual_seed(2)
    modules = [
        f"model.layers.{i}.self_attn.{p}_proj" for i in range(model.config.num_hidden_layers) for p in "qv"
    ]
    branches = {}
    for name in [*modules, "model.layers.1.self_attn.o_proj"]:
        out_f, in_f = model.get_submodule(name).weight.shape
        branches[name] = [(torch.randn(rank, in_f) * 0.2, torch.randn(out_f, rank) * 0.2, 0.5)]
    return branches


def merged_float64(model: transformers.PreTrainedModel, branches: dict) -> transformers.PreTrainedModel:
    """A float64 copy of the model with W0 + Σ c·B·A merged in float64 (independent of the module)."""
    merged = copy.deepcopy(model).double()
    with torch.no_grad():
        for name, items in branches.items():
            weight = merged.get_submodule(name).weight
            for a, b, c in items:
                weight += c * (b.double() @ a.double())
    return merged


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_float64_and_float32_streams_equal_transformers(kind, tmp_path, float64_rmsnorm):
    model = make_model(kind)
    decoder = StreamedDecoder(save(model, tmp_path / kind))
    ids, mask = batch()
    out = decoder.forward(ids, mask, streams=[(F64, False), (F32, False)])
    assert out[F64, False].dtype == F64 and out[F32, False].dtype == F32
    assert out[F64, False].shape == (2, 7, 100)
    assert max_err(out[F64, False], hf_logits(copy.deepcopy(model).double(), ids, mask), mask) < ATOL_F64
    assert max_err(out[F32, False], hf_logits(model, ids, mask), mask) < ATOL_F32
    last = decoder.forward(ids, mask, streams=[(F64, False)], last_only=True)[F64, False]
    assert last.shape == (2, 100) and (last - out[F64, False][:, -1]).abs().max() < ATOL_F64


def test_unpatched_transformers_float64_differs_only_by_its_float32_rmsnorm(tmp_path):
    """Without the fixture, `.double()` normalizes in float32: agreement to float32 round-off only."""
    model = make_model("llama_gqa")
    decoder = StreamedDecoder(save(model, tmp_path / "m"))
    ids, mask = batch()
    err = max_err(
        decoder.forward(ids, mask, [(F64, False)])[F64, False], hf_logits(model.double(), ids, mask), mask
    )
    assert ATOL_F64 < err < 1e-5


@pytest.mark.parametrize("kind", ["llama_gqa", "qwen2_bias"])
def test_lora_streams_equal_merged_model_and_plain_streams_the_base(kind, tmp_path, float64_rmsnorm):
    model = make_model(kind, num_hidden_layers=3)
    branches = lora_branches(model)
    decoder = StreamedDecoder(save(model, tmp_path / kind), branches)
    ids, mask = batch()
    out = decoder.forward(ids, mask, streams=[(F64, True), (F64, False), (F32, True), (F32, False)])
    merged = hf_logits(merged_float64(model, branches), ids, mask)
    plain = hf_logits(copy.deepcopy(model).double(), ids, mask)
    assert max_err(merged, plain, mask) > 0.1  # the branches change the outputs
    assert max_err(out[F64, True], merged, mask) < ATOL_F64
    assert max_err(out[F64, False], plain, mask) < ATOL_F64
    assert max_err(out[F32, True], merged, mask) < ATOL_F32
    assert max_err(out[F32, False], plain, mask) < ATOL_F32


@pytest.mark.parametrize(
    ("kind", "lora"), [("llama_gqa", False), ("llama_gqa", True), ("qwen2_window", True)]
)
def test_generate_equals_transformers_greedy(kind, lora, tmp_path):
    model = make_model(kind)
    branches = lora_branches(model)
    decoder = StreamedDecoder(save(model, tmp_path / "m"), branches)
    reference = merged_float64(model, branches).float() if lora else model
    ids, mask = batch()
    out = reference.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=6,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    for scores in out.scores:  # no near-tie that float32 noise could flip
        top2 = scores.topk(2, dim=-1).values
        assert (top2[:, 0] - top2[:, 1]).min() > 1e-4
    new = decoder.generate(ids, mask, 6, dtype=F32, lora=lora)
    assert new.dtype == torch.int64 and new.shape == (2, 6)
    assert torch.equal(new, out.sequences[:, 7:])
    assert decoder.generate(ids, mask, 0).shape == (2, 0)


def test_resident_bytes_hold_one_layer_and_one_cast_tensor_at_a_time(tmp_path):
    model = make_model("llama_gqa", num_hidden_layers=4)
    path = save(model, tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    layer = sum(t.nbytes for n, t in tensors.items() if n.startswith("model.layers.0."))
    head = tensors["model.norm.weight"].nbytes + tensors["lm_head.weight"].nbytes
    reported = []
    decoder = StreamedDecoder(path, progress=lambda done, total: reported.append((done, total)))
    assert decoder.weight_bytes == sum(t.nbytes for t in tensors.values())
    decoder.forward(*batch(), streams=[(F32, True), (F64, True)])
    # One group as stored (a layer, or the final norm + lm_head) and the float64 copy of one of its
    # tensors, made when a product reads it: never a float64 copy of the whole layer. The float32
    # stream uses the float32-stored tensors themselves.
    largest = max(t.nbytes for n, t in tensors.items() if n.startswith("model.layers.0."))
    assert decoder.max_resident_bytes == max(layer + 2 * largest, head + 2 * tensors["lm_head.weight"].nbytes)
    assert decoder.max_resident_bytes < 2 * layer + 2 * head  # far from a float64 copy of a layer
    assert [d for d, _ in reported] == sorted(d for d, _ in reported) and reported[-1][0] == reported[-1][1]
    assert len(reported) == 4 + 1  # each layer, then the final norm + lm_head

    half = StreamedDecoder(save(model.half(), tmp_path / "f16"))
    half.forward(*batch(), streams=[(F32, False), (F64, False)])
    # float16-stored: 2 bytes a weight, and the float64 copy (8 bytes a weight) of one tensor
    assert half.max_resident_bytes == max(
        layer // 2 + 2 * largest, (head + 4 * tensors["lm_head.weight"].nbytes) // 2
    )


def test_sharded_checkpoint_reads_the_same_tensors(tmp_path):
    model = make_model("qwen2_bias")
    whole = StreamedDecoder(save(model, tmp_path / "whole"))
    path = save(model, tmp_path / "sharded", max_shard_size="60KB")
    assert (
        len(list(path.glob("model-*.safetensors"))) > 2 and (path / "model.safetensors.index.json").exists()
    )
    sharded = StreamedDecoder(path)
    ids, mask = batch()
    streams = [(F64, False), (F32, False)]
    a, b = whole.forward(ids, mask, streams), sharded.forward(ids, mask, streams)
    assert all(torch.equal(a[s], b[s]) for s in streams)
    assert whole.weight_bytes == sharded.weight_bytes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_stored_checkpoint_equals_upcast_transformers(dtype, tmp_path):
    path = save(make_model("llama_gqa").to(dtype), tmp_path / "m")
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids, mask = batch()
    out = StreamedDecoder(path).forward(ids, mask, streams=[(F32, False), (dtype, False)])
    assert max_err(out[F32, False], hf_logits(reference, ids, mask), mask) < ATOL_F32
    assert out[dtype, False].dtype == dtype and torch.isfinite(out[dtype, False]).all()


def edit_config(path: Path, **changes) -> Path:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | changes))
    return path


def test_bad_inputs_raise_value_errors(tmp_path):
    model = make_model("llama_gqa")
    path = save(model, tmp_path / "m")
    branch = [(torch.zeros(2, 64), torch.zeros(64, 2), 1.0)]
    for key in ("model.layers.0.self_attn.x_proj", "model.layers.7.self_attn.q_proj", "model.norm", "q_proj"):
        with pytest.raises(ValueError, match="names no linear module"):
            StreamedDecoder(path, {key: branch})
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.k_proj: A \(2, 64\), B \(64, 2\)"):
        StreamedDecoder(path, {"model.layers.0.self_attn.k_proj": branch})  # k_proj is (32, 64)

    gelu = edit_config(save(model, tmp_path / "gelu"), hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act 'gelu' is not supported"):
        StreamedDecoder(gelu)
    linear = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="only default RoPE"):
        StreamedDecoder(edit_config(save(model, tmp_path / "rope"), rope_parameters=linear))
    legacy = {"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_parameters": None}
    with pytest.raises(ValueError, match="only default RoPE"):
        StreamedDecoder(edit_config(save(model, tmp_path / "rope_legacy"), **legacy))

    missing = save(model, tmp_path / "missing")
    tensors = load_file(missing / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, missing / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing: tensor model.layers.1.mlp.up_proj.weight missing"):
        StreamedDecoder(missing)


def test_a_large_cast_is_made_a_block_of_rows_at_a_time(tmp_path, monkeypatch):
    """Blocks of rows compute the same products (the same dot products, in float64 to round-off;
    float32 within its own rounding, since the library may order the sums by shape)."""
    from loraexport.verify import streamed_ops

    model = make_model("llama_gqa", num_hidden_layers=2)
    path = save(model.half(), tmp_path / "f16")
    whole = StreamedDecoder(path).forward(*batch(), streams=[(F32, False), (F64, False)])
    monkeypatch.setattr(streamed_ops, "CAST_BLOCK_BYTES", 4096)
    blocked_decoder = StreamedDecoder(path)
    blocked = blocked_decoder.forward(*batch(), streams=[(F32, False), (F64, False)])
    torch.testing.assert_close(blocked[(F64, False)], whole[(F64, False)], rtol=0, atol=1e-12)
    torch.testing.assert_close(blocked[(F32, False)], whole[(F32, False)], rtol=0, atol=1e-5)
    stored = sum(
        t.nbytes for n, t in load_file(path / "model.safetensors").items() if n.startswith("model.layers.0.")
    )
    assert blocked_decoder.max_resident_bytes <= stored + 4096  # a layer as stored and one block cast
