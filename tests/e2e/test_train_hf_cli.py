"""``loraexport train`` on Hugging Face bases through the real CLI: tiny GPT-2 and Llama decoders
and a BERT sequence classifier (``artifacts.make_hf_train_base``), each trained, then read by
PEFT as it is (tensors bit-identical after PEFT saves them again, logits equal to ours) and
exported by merge-and-export.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from artifacts import TRAIN_WORDS, make_hf_train_base
from clihelp import nothing_left, ok, refused, run
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from loraexport.lora.adapter import CONFIG_NAME, WEIGHTS_NAME, Adapter  # noqa: E402
from loraexport.models.registry import load_base  # noqa: E402
from loraexport.stages.merge import unmerged_model  # noqa: E402

KINDS = ("gpt2", "llama", "bert")
DECODERS = ("gpt2", "llama")
ARGS = ["--rank", "4", "--batch-size", "8", "--lr", "3e-2", "--seed", "0"]
STEPS = {"gpt2": 40, "llama": 40, "bert": 120}  # BERT's dropout (0.1) slows it down
EXPECTED_FILES = {CONFIG_NAME, WEIGHTS_NAME, "training.json", "loraexport.json"}
DEFAULT_TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "bert": ["query", "value"]}
# The mean loss of the last 5 steps over the first 5: measured 0.94 (GPT-2, Llama: a tiny random
# base's logits are nearly flat, and LoRA on q and v alone sharpens them slowly; greedy exact
# match still goes from 0 to 47%) and 0.17 (BERT); an adapter that does not train leaves it
# at 1, give or take the batches' noise.
LOSS_DROP = {"gpt2": 0.97, "llama": 0.97, "bert": 0.5}
# PEFT's unmerged model against ours: the same float32 operations in another order (PEFT scales
# B·A·x after the product, we before adding), on logits of O(1).
PEFT_ATOL = 1e-5
N_TRAIN, N_EVAL = 64, 32


def w(i: int) -> str:
    return f"w{i}"


def decoder_lines(n: int, seed: int) -> list[dict]:
    """Three words; the completion says whether the first is one of w0..w9 (w21) or not (w20)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        first = rng.randrange(20)
        prompt = " ".join([w(first)] + [w(rng.randrange(20)) for _ in range(2)])
        out.append({"prompt": prompt, "completion": w(20 + (first < 10))})
    return out


def classifier_lines(n: int, seed: int) -> list[dict]:
    """Two words; the label says whether the first is one of w0..w9."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        first = rng.randrange(20)
        out.append({"text": f"{w(first)} {w(rng.randrange(20, TRAIN_WORDS))}", "label": int(first < 10)})
    return out


def write_lines(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train-hf")


@pytest.fixture(scope="module")
def bases(root) -> dict[str, Path]:
    return {kind: make_hf_train_base(root / kind, kind) for kind in KINDS}


@pytest.fixture(scope="module")
def data(root) -> dict[str, tuple[Path, Path]]:
    """(training file, held-out file) per kind."""
    dec = (write_lines(root / "dec.jsonl", decoder_lines(N_TRAIN, 0)), decoder_lines(N_EVAL, 1))
    cls = (write_lines(root / "cls.jsonl", classifier_lines(N_TRAIN, 0)), classifier_lines(N_EVAL, 1))
    dec_eval, cls_eval = (
        write_lines(root / "dec-eval.jsonl", dec[1]),
        write_lines(root / "cls-eval.jsonl", cls[1]),
    )
    return {"gpt2": (dec[0], dec_eval), "llama": (dec[0], dec_eval), "bert": (cls[0], cls_eval)}


def train(bases, data, kind: str, out: Path, *extra: object, quiet: bool = True):
    train_file, eval_file = data[kind]
    args = ["train", "--base", bases[kind], "--data", train_file, "--eval-data", eval_file, "--out", out]
    return run(*args, *ARGS, "--steps", STEPS[kind], *extra, quiet=quiet)


@pytest.fixture(scope="module")
def trained(bases, data, root) -> dict[str, tuple[Path, dict]]:
    """(adapter directory, --json summary) per kind: trained once, through the CLI."""
    out = {}
    for kind in KINDS:
        r = ok(train(bases, data, kind, root / f"{kind}-adapter", "--json"))
        out[kind] = (root / f"{kind}-adapter", json.loads(r.stdout))
    return out


def _peft_base(bases, kind: str):
    cls = (
        transformers.AutoModelForSequenceClassification
        if kind == "bert"
        else transformers.AutoModelForCausalLM
    )
    return cls.from_pretrained(str(bases[kind]), attn_implementation="eager").eval()


def _inputs(seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 4 + TRAIN_WORDS, (3, 9), generator=g)  # (B, T): word ids
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding in one row
    return {"input_ids": ids, "attention_mask": mask}


# ---- what the CLI writes ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_trains_with_the_family_defaults_and_records_it(trained, bases, kind):
    out, summary = trained[kind]
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    config = json.loads((out / CONFIG_NAME).read_text())
    assert sorted(config["target_modules"]) == DEFAULT_TARGETS[kind]
    assert config["task_type"] == ("SEQ_CLS" if kind == "bert" else "CAUSAL_LM")
    assert config["fan_in_fan_out"] is (kind == "gpt2")  # GPT-2's Conv1D, as PEFT sets it
    assert config["modules_to_save"] == (["classifier"] if kind == "bert" else None)
    record = json.loads((out / "training.json").read_text())
    losses = record["losses"]
    assert len(losses) == STEPS[kind] and sum(losses[-5:]) < LOSS_DROP[kind] * sum(losses[:5]), losses
    assert record["train_examples"] == N_TRAIN and record["eval_examples"] == N_EVAL
    assert record["max_length"] == 128  # the default 256, bounded by the model's positions
    assert record["targets"] == DEFAULT_TARGETS[kind] and record["warmup_steps"] == STEPS[kind] // 20
    assert record["eval_loss_after"] < record["eval_loss_before"]
    _, base = load_base(bases[kind])
    assert summary["base_parameters"] == sum(p.numel() for p in base.parameters())
    head = sum(p.numel() for p in base.classifier.parameters()) if kind == "bert" else 0
    assert summary["trainable_parameters"] == Adapter.load(out).num_parameters + head
    assert summary["trainable_fraction"] == summary["trainable_parameters"] / summary["base_parameters"]
    metric = "accuracy" if kind == "bert" else "exact_match"
    assert summary[f"eval_{metric}_after"] > summary[f"eval_{metric}_before"], summary


def test_classifier_learns_the_rule(trained):
    out, summary = trained["bert"]
    assert summary["eval_accuracy_after"] >= 0.75 > summary["eval_accuracy_before"], summary
    tensors = load_file(str(out / WEIGHTS_NAME))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(tensors)


def test_human_output(bases, data, tmp_path):
    r = ok(train(bases, data, "bert", tmp_path / "a", quiet=False))
    assert "tokens/s" in r.stdout and "held-out loss: base " in r.stdout
    assert "held-out accuracy: base " in r.stdout and f"adapter written to {tmp_path / 'a'}" in r.stdout


# ---- PEFT reads it as it is ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_peft_loads_and_saves_it_bit_identically(trained, bases, kind, tmp_path):
    out, _ = trained[kind]
    model = peft.PeftModel.from_pretrained(_peft_base(bases, kind), str(out))
    model.save_pretrained(str(tmp_path / "again"))
    ours, theirs = load_file(str(out / WEIGHTS_NAME)), load_file(str(tmp_path / "again" / WEIGHTS_NAME))
    assert ours.keys() == theirs.keys()
    for key, t in ours.items():
        assert t.dtype == theirs[key].dtype and torch.equal(t, theirs[key]), key


@pytest.mark.parametrize("kind", KINDS)
def test_peft_logits_equal_our_unmerged_model(trained, bases, kind):
    out, _ = trained[kind]
    theirs = peft.PeftModel.from_pretrained(_peft_base(bases, kind), str(out)).eval()
    _, base = load_base(bases[kind])
    adapter = Adapter.load(out)
    adapter.check_fits(base)
    inputs = _inputs()
    with torch.no_grad():
        want = theirs(**inputs).logits
        got = unmerged_model(base, [adapter])(**inputs).logits
        plain = base(**inputs).logits
    valid = inputs["attention_mask"].bool() if kind != "bert" else slice(None)
    assert (got[valid] - want[valid]).abs().max() <= PEFT_ATOL
    assert (plain[valid] - want[valid]).abs().max() > 100 * PEFT_ATOL  # the adapter changed the output


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_export_takes_it(trained, bases, kind, tmp_path):
    out, _ = trained[kind]
    args = ["--no-latency", "--samples", "2"]
    ok(run("merge-and-export", "--base", bases[kind], "--adapter", out, "--out", tmp_path / "onnx", *args))
    assert json.loads((tmp_path / "onnx" / "report.json").read_text())["passed"] is True


# ---- reproducible, and the options that change the batches ---------------------------------------
def test_same_seed_same_bytes_other_seed_other_adapter(bases, data, tmp_path):
    outs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    for out, seed in zip(outs, ("0", "0", "1"), strict=True):
        ok(train(bases, data, "llama", out, "--dropout", "0.1", "--steps", "10", "--seed", seed))
    assert (outs[0] / WEIGHTS_NAME).read_bytes() == (outs[1] / WEIGHTS_NAME).read_bytes()
    assert (outs[0] / WEIGHTS_NAME).read_bytes() != (outs[2] / WEIGHTS_NAME).read_bytes()


def test_grad_accum_trains_as_the_larger_batch(bases, data, tmp_path):
    """--batch-size 4 --grad-accum 2 sees each step's 8 examples as --batch-size 8 does (64
    examples: every batch full), and the step's loss is the mean over all their targets."""
    ok(train(bases, data, "llama", tmp_path / "big", "--steps", "10", "--batch-size", "8"))
    ok(
        train(
            bases, data, "llama", tmp_path / "acc", "--steps", "10", "--batch-size", "4", "--grad-accum", "2"
        )
    )
    big, acc = (load_file(str(tmp_path / d / WEIGHTS_NAME)) for d in ("big", "acc"))
    for key, t in big.items():
        assert torch.allclose(t, acc[key], atol=1e-5), key
    losses = [json.loads((tmp_path / d / "training.json").read_text())["losses"] for d in ("big", "acc")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_text_examples_packed_into_rows(bases, tmp_path):
    lines = [{"text": " ".join(w(i % TRAIN_WORDS) for i in range(k, k + 5 + k % 7))} for k in range(40)]
    data = write_lines(tmp_path / "text.jsonl", lines)
    out = tmp_path / "a"
    args = ["--data", data, "--out", out, "--max-length", "32", "--pack", "--json"]
    summary = json.loads(ok(run("train", "--base", bases["llama"], *args, *ARGS, "--steps", "40")).stdout)
    record = json.loads((out / "training.json").read_text())
    assert record["data_format"] == "text" and record["pack"] and record["max_length"] == 32
    # 36 texts of 5-11 words, each with BOS and EOS: about 9 tokens, 32 to a row
    assert record["train_rows"] < record["train_examples"] / 2
    assert "eval_exact_match_after" not in summary and "eval_loss_after" in summary
    assert sum(record["losses"][-5:]) < LOSS_DROP["llama"] * sum(record["losses"][:5])


def test_progress_shows_loss_and_tokens_per_second(bases, data, tmp_path, monkeypatch):
    from loraexport.training import hf as training_hf

    seen = []

    class Recorder(training_hf.Progress):
        def update(self, n=1, **postfix):
            seen.append(postfix)
            super().update(n, **postfix)

    monkeypatch.setattr(training_hf, "Progress", Recorder)
    ok(train(bases, data, "gpt2", tmp_path / "a", "--steps", "3", quiet=False))
    assert len(seen) == 3 and all(set(p) == {"loss", "tok_s"} and p["tok_s"] > 0 for p in seen)


# ---- DoRA (another engineer's LoRALinear(dora=True) and Adapter.magnitudes) ---------------------------
@pytest.mark.parametrize("kind", DECODERS)
def test_dora_trains_and_peft_agrees(bases, data, kind, tmp_path):
    out = tmp_path / "dora"
    ok(train(bases, data, kind, out, "--dora", "--steps", "10"))
    assert json.loads((out / CONFIG_NAME).read_text())["use_dora"] is True
    tensors = load_file(str(out / WEIGHTS_NAME))
    assert any("lora_magnitude_vector" in k for k in tensors)
    model = peft.PeftModel.from_pretrained(_peft_base(bases, kind), str(out)).eval()
    model.save_pretrained(str(tmp_path / "again"))
    theirs = load_file(str(tmp_path / "again" / WEIGHTS_NAME))
    assert tensors.keys() == theirs.keys() and all(torch.equal(t, theirs[k]) for k, t in tensors.items())
    _, base = load_base(bases[kind])
    adapter = Adapter.load(out)
    adapter.check_fits(base)
    inputs = _inputs()
    with torch.no_grad():
        got, want = unmerged_model(base, [adapter])(**inputs).logits, model(**inputs).logits
    valid = inputs["attention_mask"].bool()
    assert (got[valid] - want[valid]).abs().max() <= PEFT_ATOL


# ---- refused before any training, nothing written ------------------------------------------------
@pytest.mark.parametrize(
    "kind, option, needles",
    [
        ("bert", ["--targets", "classifier"], ["'classifier' is inside the classification head"]),
        ("gpt2", ["--targets", "c_attn,lm_head"], ["both nn.Linear and GPT-2's Conv1D"]),
        ("llama", ["--targets", "gate"], ["match no linear layer", "q_proj"]),
        # recorded with no tensors, the adapter was then refused by merge and export (exit 0 here)
        ("llama", ["--targets", "embed_tokens,lm_head"], ["model.embed_tokens (Embedding)", "not a linear"]),
        ("llama", ["--target-regex", ".*"], ["not a linear layer"]),
        ("llama", ["--rank", "64"], ["rank 64 is larger than", "at most 32"]),
    ],
)
def test_targets_that_cannot_work(bases, data, kind, option, needles, tmp_path):
    refused(train(bases, data, kind, tmp_path / "out", *option), 3, *needles)
    nothing_left(tmp_path / "out")


def test_target_regex_and_rslora(bases, data, tmp_path):
    out = tmp_path / "out"
    ok(train(bases, data, "llama", out, "--target-regex", r".*\.(o_proj|k_proj)", "--rslora", "--steps", "2"))
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["target_modules"] == r".*\.(o_proj|k_proj)" and config["use_rslora"] is True
    assert {p.rsplit(".", 1)[-1] for p in Adapter.load(out).weights} == {"o_proj", "k_proj"}


def test_training_that_diverges_writes_nothing(bases, data, tmp_path, monkeypatch):
    from loraexport.training import hf as training_hf

    real, calls = training_hf._loss_sum, []

    def nan_at_step_2(logits, batch, task):
        loss = real(logits, batch, task)
        calls.extend([1] * logits.requires_grad)  # training steps only, not the held-out loss
        return loss * float("nan") if len(calls) == 2 and logits.requires_grad else loss

    monkeypatch.setattr(training_hf, "_loss_sum", nan_at_step_2)
    refused(train(bases, data, "gpt2", tmp_path / "out"), 3, "training diverged at step 2 of 40")
    nothing_left(tmp_path / "out")


@pytest.mark.slow
def test_roberta_trains_and_round_trips_through_peft(data, root, tmp_path):
    """RoBERTa (a classifier whose positions start after its pad id) trains through the CLI with
    its defaults; PEFT reads the folder and agrees with us. (No Qwen2 here: transformers 5 loads
    any tokenizer of a qwen2 folder as Qwen2Tokenizer, which turns this file's word-level test
    tokenizer into no tokens at all.)"""
    base = make_hf_train_base(root / "roberta", "roberta")
    train_file, eval_file = data["bert"]
    out = tmp_path / "adapter"
    ok(run("train", "--base", base, "--data", train_file, "--eval-data", eval_file, "--out", out, *ARGS,
           "--steps", "20"))  # fmt: skip
    assert json.loads((out / CONFIG_NAME).read_text())["target_modules"] == ["query", "value"]
    head = transformers.AutoModelForSequenceClassification.from_pretrained(str(base)).eval()
    theirs = peft.PeftModel.from_pretrained(head, str(out)).eval()
    theirs.save_pretrained(tmp_path / "again")
    mine, again = load_file(out / WEIGHTS_NAME), load_file(tmp_path / "again" / WEIGHTS_NAME)
    assert mine.keys() == again.keys() and all(torch.equal(mine[k], again[k]) for k in mine)
    _, model = load_base(base)
    ours = unmerged_model(model, [Adapter.load(out)])
    with torch.no_grad():
        want, got = theirs(**_inputs()).logits, ours(**_inputs()).logits
    assert float((want - got).abs().max()) <= PEFT_ATOL
