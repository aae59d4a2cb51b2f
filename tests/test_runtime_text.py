"""Text in, text out without torch or transformers (``loraexport.runtime.text``, issue 26): in a
child process where torch and transformers cannot be imported, ``generate_text`` on a tiny
Llama's export returns PEFT's greedy text, stopping at the second of two end ids; the streamed
pieces join into it; a seed repeats a sample; ``top_k=1`` and a temperature near 0 are greedy;
a chat prompt goes through the export's template as transformers renders it. Every argument
error is refused before onnxruntime runs."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
from app_example import NEW_TOKENS, PROMPT, make_example, peft_greedy, run_without_torch, set_end_ids

from loraexport.errors import InvalidInputError
from loraexport.runtime.model import OnnxModel, RuntimeInputError
from loraexport.stages.export import export

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """(export of base + adapter-a, PEFT's greedy (ids, text) for PROMPT and for CHAT, the base).
    The base's end ids are 2 and a token PEFT generates after at least four others (its first
    time), so that generation stops early at the second end id."""
    tmp = make_example(tmp_path_factory.mktemp("text"))
    base, adapter = tmp / "base", tmp / "adapter-a"
    free, _ = peft_greedy(base, adapter, PROMPT, NEW_TOKENS)
    stop = next(t for k, t in enumerate(free) if k >= 4 and t not in free[:k] and t != 2)
    set_end_ids(base, [2, stop])
    export(base, tmp / "onnx", adapter=adapter)
    ids, text = peft_greedy(base, adapter, PROMPT, NEW_TOKENS)
    assert ids[-1] == stop and len(ids) < NEW_TOKENS  # PEFT stopped at the second end id
    return tmp / "onnx", (ids, text), peft_greedy(base, adapter, CHAT, NEW_TOKENS, chat=True), base


@pytest.mark.slow
def test_the_runtime_imports_with_torch_and_transformers_blocked():
    code = (
        "import loraexport.runtime, loraexport.runtime.text, loraexport.runtime.chat\n"
        "from loraexport.runtime import OnnxModel, Sampling, TextStream\n"
        "print(sorted(k for k in ('torch', 'transformers') if sys.modules.get(k) is not None))\n"
    )
    r = run_without_torch(code)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr[-2000:]


CHILD = """
import json, sys
from loraexport.runtime import OnnxModel
m = OnnxModel(sys.argv[1])
prompt, n = sys.argv[2], int(sys.argv[3])
chat = json.loads(sys.argv[4])
out = {
    "greedy": m.generate_text(prompt, n),
    "pieces": list(m.stream_text(prompt, n)),
    "seed 7": [m.generate_text(prompt, n, temperature=1.0, seed=7) for _ in range(2)],
    "seed 7 streamed": "".join(m.stream_text(prompt, n, temperature=1.0, seed=7)),
    "seed 8": m.generate_text(prompt, n, temperature=1.0, seed=8),
    "top_k=1": m.generate_text(prompt, n, temperature=1.0, top_k=1, seed=3),
    "temperature 1e-30": m.generate_text(prompt, n, temperature=1e-30, seed=3),
    "top_p 1e-9": m.generate_text(prompt, n, temperature=1.0, top_p=1e-9, seed=3),
    "chat": m.generate_text(chat, n, chat=True),
    "blocked": [k for k in ("torch", "transformers") if sys.modules.get(k) is not None],
}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_generate_text_without_torch_is_peft_greedy_text(example):
    onnx, (ids, text), (_, chat_text), _ = example
    r = run_without_torch(CHILD, str(onnx), PROMPT, str(NEW_TOKENS), json.dumps(CHAT))
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["blocked"] == []
    assert out["greedy"] == text and len(text) >= 4  # up to the second end id, left out
    assert "".join(out["pieces"]) == text and len(out["pieces"]) >= 2
    a, b = out["seed 7"]
    assert a == b == out["seed 7 streamed"]  # a seed repeats the sample, streamed too
    assert out["seed 8"] != a and a != text  # sampling samples
    assert out["top_k=1"] == out["temperature 1e-30"] == out["top_p 1e-9"] == text
    assert out["chat"] == chat_text and chat_text != text


def test_ids_and_text_are_peft_s(example):
    """The ids behind the text are PEFT's, token for token (the text could hide a difference
    in special tokens)."""
    onnx, (ids, text), _, _ = example
    model = OnnxModel(onnx)
    prompt = np.array([model.tokenizer.encode(PROMPT)])
    got = [int(c[0]) for c in model.stream_ids(prompt, np.ones_like(prompt), NEW_TOKENS)]
    assert got == ids  # with the end id it stopped at
    assert model.tokenizer.decode(got[:-1]) == text


def test_the_chat_template_renders_as_transformers_renders_it(example):
    from transformers import AutoTokenizer

    onnx, _, _, base = example
    want = AutoTokenizer.from_pretrained(base).apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=False
    )
    assert OnnxModel(onnx).tokenizer.chat(CHAT) == want


def test_a_template_in_tokenizer_config_is_used(example, tmp_path):
    onnx = shutil.copytree(example[0], tmp_path / "onnx")
    template = (onnx / "chat_template.jinja").read_text()
    (onnx / "chat_template.jinja").unlink()
    config = json.loads((onnx / "tokenizer_config.json").read_text())
    (onnx / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": template}))
    assert OnnxModel(onnx).tokenizer.chat(CHAT) == OnnxModel(example[0]).tokenizer.chat(CHAT)


# (keyword arguments of generate_text, what the error says)
MISUSE = {
    "negative temperature": ({"temperature": -0.5}, "temperature must be a finite number ≥ 0"),
    "infinite temperature": ({"temperature": float("inf")}, "temperature must be a finite number"),
    "top_p 0": ({"temperature": 1.0, "top_p": 0.0}, r"top_p must be a number in \(0, 1\]"),
    "top_p over 1": ({"temperature": 1.0, "top_p": 1.5}, r"top_p must be a number in \(0, 1\]"),
    "top_k 0": ({"top_k": 0}, "top_k must be an integer ≥ 1"),
    "top_k float": ({"top_k": 2.5}, "top_k must be an integer ≥ 1"),
    "negative seed": ({"seed": -1}, "seed must be an integer ≥ 0"),
    "max_new_tokens 0": ({"max_new_tokens": 0}, "max_new_tokens must be an integer ≥ 1, not 0"),
    "max_new_tokens float": ({"max_new_tokens": 2.0}, "max_new_tokens must be an integer ≥ 1"),
    "prompt of ids": ({"prompt": [5, 6]}, "prompt must be a string"),
    "prompt None": ({"prompt": None}, "prompt must be a string"),
    "chat not a bool": ({"chat": "yes"}, "chat must be True or False"),
    "chat messages malformed": (
        {"prompt": [{"role": "user"}], "chat": True},
        "prompt must be a string or a list",
    ),
    "empty prompt": ({"prompt": ""}, "makes no tokens"),
    "unknown adapter": ({"adapter": "nope"}, "nope"),
    "past the context": ({"max_new_tokens": 500}, "exceed the model's context_length"),
}


@pytest.mark.parametrize("case", MISUSE)
@pytest.mark.parametrize("call", ["generate_text", "stream_text"])
def test_each_argument_error_is_refused_before_onnxruntime_runs(example, case, call, monkeypatch):
    model = OnnxModel(example[0])
    for session in model.sessions.values():  # any onnxruntime call would fail the test
        monkeypatch.setattr(session, "run", lambda *a, **k: pytest.fail("onnxruntime ran"), raising=False)
        monkeypatch.setattr(session, "run_with_iobinding", lambda *a, **k: pytest.fail("ran"), raising=False)
    kwargs, needle = MISUSE[case]
    kwargs = {"prompt": PROMPT, "max_new_tokens": 4} | kwargs
    with pytest.raises(RuntimeInputError, match=needle) as e:
        getattr(model, call)(**kwargs)  # stream_text: refused when called, before iterating
    assert isinstance(e.value, ValueError) and isinstance(e.value, InvalidInputError)
    assert "\n" not in str(e.value)


def test_stream_text_names_an_argument_it_does_not_take(example):
    with pytest.raises(RuntimeInputError, match="no argument .temprature.; it takes temperature"):
        OnnxModel(example[0]).stream_text(PROMPT, 4, temprature=0.5)


def test_an_export_without_tokenizer_json_says_so(example, tmp_path, causal_onnx):
    onnx = shutil.copytree(example[0], tmp_path / "onnx")
    (onnx / "tokenizer.json").unlink()
    for directory in (onnx, causal_onnx):  # the reference model has none: its vocabulary is its own
        with pytest.raises(RuntimeInputError, match=r"has no tokenizer\.json: text needs the tokenizer"):
            OnnxModel(directory).generate_text(PROMPT, 4)
    assert OnnxModel(causal_onnx).generate(np.array([[5, 6]]), np.ones((1, 2)), 2).shape == (1, 2)


def test_chat_needs_a_template_and_jinja2(example, tmp_path, monkeypatch):
    onnx = shutil.copytree(example[0], tmp_path / "onnx")
    (onnx / "chat_template.jinja").unlink()
    with pytest.raises(RuntimeInputError, match="this export has no chat template"):
        OnnxModel(onnx).generate_text(PROMPT, 4, chat=True)
    monkeypatch.setitem(sys.modules, "jinja2", None)  # an app installed without it
    with pytest.raises(RuntimeInputError, match=r"needs jinja2 to render \(pip install jinja2\)"):
        OnnxModel(example[0]).generate_text(PROMPT, 4, chat=True)
    assert OnnxModel(example[0]).generate_text(PROMPT, 2)  # plain text needs no jinja2


def test_a_template_that_raises_is_one_line(example, tmp_path):
    onnx = shutil.copytree(example[0], tmp_path / "onnx")
    (onnx / "chat_template.jinja").write_text("{{ raise_exception('only user turns\\nhere') }}")
    with pytest.raises(RuntimeInputError, match="cannot render these messages: only user turns$"):
        OnnxModel(onnx).generate_text(PROMPT, 4, chat=True)
    (onnx / "chat_template.jinja").write_text("{{ ''.__class__.__mro__ }}")  # the sandbox refuses
    with pytest.raises(RuntimeInputError, match="cannot render these messages"):
        OnnxModel(onnx).generate_text(PROMPT, 4, chat=True)


# Embeddings of length 1 from a width-32 encoder, float32 onnxruntime against float32 torch: a
# few roundings in a sum of 32 products per output (measured 1e-7).
EMBED_ATOL = 1e-5
TEXTS = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9 w10 w11", "w12 w13"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """A tiny BERT (no head) with a word tokenizer of its 96 ids ([CLS] … [SEP]) and a PEFT
    adapter on query and value, exported merged; the PEFT model (unmerged) for reference."""
    import copy

    import peft
    import torch
    from artifacts import word_tokenizer
    from hf_tiny import B_STD, TARGETS, build

    tmp = tmp_path_factory.mktemp("embed")
    base = build("bert")
    base.save_pretrained(tmp / "base")
    word_tokenizer("bert").save_pretrained(tmp / "base")
    lora = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["bert"])
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(lora.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * B_STD)
    lora.save_pretrained(tmp / "adapter")
    export(tmp / "base", tmp / "onnx", adapter=tmp / "adapter")
    return tmp / "onnx", lora.eval(), base, tmp / "base"


def _mean_pooled(model, base_dir, texts) -> np.ndarray:
    """sentence-transformers' recipe in torch: transformers' tokenizer, padding, the mean of the
    last hidden states over each text's tokens, scaled to length 1."""
    import torch
    from transformers import AutoTokenizer

    batch = AutoTokenizer.from_pretrained(base_dir)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (N, T, H)
    mask = batch["attention_mask"][:, :, None].float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def test_embed_is_the_mean_pooled_peft_encoder(encoder):
    onnx, lora, base, base_dir = encoder
    got = OnnxModel(onnx).embed(TEXTS)
    assert got.shape == (len(TEXTS), 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, _mean_pooled(lora, base_dir, TEXTS), atol=EMBED_ATOL)
    assert np.abs(got - _mean_pooled(base, base_dir, TEXTS)).max() > 100 * EMBED_ATOL  # the adapter counts
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-6)
    raw = OnnxModel(onnx).embed(TEXTS, normalize=False)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), got, atol=1e-6)


def test_embed_ignores_the_padding_and_truncation_in_tokenizer_json(encoder, tmp_path):
    """all-MiniLM-L6-v2's tokenizer.json pads and cuts every text to 128 tokens (its
    sentence-transformers setting); until 2026-12-07 embed averaged that padding in as tokens
    (cosine 0.19 to PEFT's embedding on real sentences). The ids are the text's own, as
    transformers' tokenizer gives them, and a text too long is refused, not cut."""
    onnx = tmp_path / "onnx"
    shutil.copytree(encoder[0], onnx)
    path = onnx / "tokenizer.json"
    tok = json.loads(path.read_text())
    tok["padding"] = {"strategy": {"Fixed": 16}, "direction": "Right", "pad_to_multiple_of": None}
    tok["padding"] |= {"pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"}
    tok["truncation"] = {"max_length": 6, "strategy": "LongestFirst", "stride": 0, "direction": "Right"}
    path.write_text(json.dumps(tok))
    model = OnnxModel(onnx)
    assert model.tokenizer.encode("w1 w2") == OnnxModel(encoder[0]).tokenizer.encode("w1 w2")
    np.testing.assert_allclose(model.embed(TEXTS), OnnxModel(encoder[0]).embed(TEXTS), atol=1e-6)
    with pytest.raises(RuntimeInputError, match=r"texts\[0\] makes 130 tokens"):
        model.embed([" ".join(["w2"] * 128)])


def test_embed_refuses_what_it_cannot_embed(encoder, example):
    model = OnnxModel(encoder[0])
    for texts in ("w1 w2", [], [5], None):
        with pytest.raises(RuntimeInputError, match="texts must be a non-empty list of strings"):
            model.embed(texts)
    with pytest.raises(RuntimeInputError, match=r"texts\[1\] makes 130 tokens; the model takes 1 to 128"):
        model.embed(["w1", " ".join(["w2"] * 128)])
    with pytest.raises(RuntimeInputError, match="embed needs an encoder"):
        OnnxModel(example[0]).embed(["w1"])
    with pytest.raises(RuntimeInputError, match="an encoder model does not generate: embed"):
        model.generate_text("w1", 4)
