"""LoraConfig: scaling, PEFT's pattern and target matching (checked against PEFT), refusals."""

from __future__ import annotations

import json
import math
import re

import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from loraexport.errors import AdapterFormatError, InvalidInputError, UnsupportedAdapterError
from loraexport.lora.config import LoraConfig
from loraexport.lora.inject import linear_names

PEFT_PREFIX = "base_model.model."


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(4, 4) for _ in range(4))


class _Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Linear(4, 4)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = _Attn()
        self.fc = nn.Linear(4, 4)
        self.experts = nn.ModuleList(_Expert() for _ in range(3))  # a nested index (MoE-like)


class _Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Block() for _ in range(3))


class _Nested(nn.Module):
    """Paths like ``model.layers.1.attn.q``, ``model.layers.2.experts.0.w`` (HF-style nesting)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _Inner()
        self.lm_head = nn.Linear(4, 4)


def _nested() -> nn.Module:
    torch.manual_seed(0)
    return _Nested()


def _transformer(make_model) -> nn.Module:
    return make_model(n_encoder_layers=2, n_decoder_layers=2)


def _peft_layers(model: nn.Module, **kwargs) -> dict[str, LoraLayer]:
    """PEFT's own result: {module path: LoRA layer} after ``get_peft_model``."""
    pm = peft.get_peft_model(model, peft.LoraConfig(**kwargs))
    return {
        n.removeprefix(PEFT_PREFIX): m
        for n, m in pm.named_modules()
        if isinstance(m, LoraLayer) and "default" in m.lora_A
    }


def _ours(**kwargs) -> LoraConfig:
    """Our config from what PEFT itself writes (sets become lists, as in adapter_config.json)."""
    data = peft.LoraConfig(**kwargs).to_dict()
    return LoraConfig.from_dict(json.loads(json.dumps(data, default=sorted)))


# ---- scaling -------------------------------------------------------------------------------
@pytest.mark.parametrize("r", [1, 4, 16])
@pytest.mark.parametrize("alpha", [1, 8, 32.5])
def test_scaling_alpha_over_r_and_rslora(r, alpha):
    assert LoraConfig(r=r, lora_alpha=alpha).scaling("x.q") == alpha / r
    assert LoraConfig(r=r, lora_alpha=alpha, use_rslora=True).scaling("x.q") == alpha / math.sqrt(r)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_rank_alpha_scaling_per_module_equal_peft(use_rslora):
    kwargs = dict(
        r=4,
        lora_alpha=8,
        use_rslora=use_rslora,
        target_modules=["q", "k", "v", "fc"],
        rank_pattern={
            "q": 2,
            "layers.1.attn.v": 6,
            r"layers\.2\.attn\.k": 3,
            "^model.layers.0.fc": 5,
        },
        alpha_pattern={"v": 16, r"model\.layers\.[01]\.attn\.q": 3, "fc": 12.5},
    )
    ours = _ours(**kwargs)
    layers = _peft_layers(_nested(), **kwargs)
    assert len(layers) == 12
    rows = [
        (path, ours.rank(path), layer.r["default"], ours.scaling(path), layer.scaling["default"])
        for path, layer in sorted(layers.items())
    ]
    for path, r, peft_r, s, peft_s in rows:
        assert r == peft_r, (path, r, peft_r)
        assert s == pytest.approx(peft_s, rel=1e-15), (path, s, peft_s)
        assert layers[path].lora_A["default"].weight.shape[0] == r
    # the patterns did something: not every module has the default rank and scaling
    assert {r for _, r, *_ in rows} == {2, 3, 4, 5, 6}
    assert len({s for *_, s, _ in rows}) > 3


def test_first_matching_pattern_wins_like_peft():
    kwargs = dict(r=4, lora_alpha=4, target_modules=["q"], rank_pattern={"q": 2, "attn.q": 7})
    ours = _ours(**kwargs)
    for path, layer in _peft_layers(_nested(), **kwargs).items():
        assert ours.rank(path) == layer.r["default"] == 2


def test_pattern_matches_a_suffix_at_a_dot_boundary_only():
    cfg = LoraConfig(r=4, lora_alpha=4, rank_pattern={"q": 2}, alpha_pattern={"attn.q": 1})
    assert cfg.rank("model.layers.0.attn.q") == 2
    assert cfg.rank("model.layers.0.attn.qq") == 4  # "q" is not a dotted suffix of "qq"
    assert cfg.rank("model.layers.0.attn.xq") == 4
    assert cfg.alpha("model.layers.0.attn.q") == 1
    assert cfg.alpha("model.layers.0.xattn.q") == 4


# ---- target matching -----------------------------------------------------------------------
NESTED_TARGETS = [
    dict(target_modules=["q", "v"]),
    dict(target_modules=["attn.q", "fc"]),
    dict(target_modules=["lm_head"]),
    dict(target_modules=r".*\.(q|o)"),
    dict(target_modules=r"model\.layers\.[02]\.attn\.k"),
    dict(target_modules=r"q"),  # a regex is matched against the whole path: matches nothing here
    dict(target_modules=["q", "v"], layers_to_transform=[0, 2]),
    dict(target_modules=["q"], layers_to_transform=1),
    dict(target_modules=["q", "k"], layers_to_transform=[1], layers_pattern="layers"),
    dict(target_modules=["w"], layers_to_transform=[1]),  # the layer index, not the expert's
    dict(target_modules=["w", "fc"], layers_to_transform=[0, 2], layers_pattern=["layers"]),
    dict(target_modules=["q", "v"], exclude_modules=["model.layers.0.attn.q"]),
    dict(target_modules=["q", "v"], exclude_modules=["v"]),
    dict(target_modules=["q", "v", "fc"], exclude_modules=r"model\.layers\.1\..*"),
]


@pytest.mark.parametrize("kwargs", NESTED_TARGETS, ids=lambda k: json.dumps(k, default=str))
def test_matches_selects_exactly_what_peft_wraps_nested(kwargs):
    model = _nested()
    ours = _ours(r=2, lora_alpha=2, **kwargs)
    selected = {n for n in linear_names(model) if ours.matches(n)}
    if not selected:
        with pytest.raises(ValueError):  # PEFT refuses a config that targets nothing
            _peft_layers(model, r=2, lora_alpha=2, **kwargs)
        return
    assert selected == set(_peft_layers(model, r=2, lora_alpha=2, **kwargs))


TRANSFORMER_TARGETS = [
    dict(target_modules=["q", "v"]),
    dict(target_modules=["self_attn.q", "cross_attn.v", "fc2"]),
    dict(target_modules=r"decoder\.\d+\.(self|cross)_attn\.[qkvo]"),
    dict(target_modules=["q", "v"], layers_to_transform=[1], layers_pattern=["decoder"]),
    dict(target_modules=["q", "fc1"], layers_to_transform=0, layers_pattern=["encoder", "decoder"]),
    dict(target_modules=["q", "v", "lm_head"], exclude_modules=["cross_attn.v"]),
]


@pytest.mark.parametrize("kwargs", TRANSFORMER_TARGETS, ids=lambda k: json.dumps(k, default=str))
def test_matches_selects_exactly_what_peft_wraps_transformer(kwargs, make_model):
    model = _transformer(make_model)
    ours = _ours(r=2, lora_alpha=2, **kwargs)
    selected = {n for n in linear_names(model) if ours.matches(n)}
    assert selected, "every case here targets something"
    assert selected == set(_peft_layers(_transformer(make_model), r=2, lora_alpha=2, **kwargs))


# ---- (de)serialisation ---------------------------------------------------------------------
def test_peft_written_config_loads_and_round_trips():
    data = json.loads(
        json.dumps(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q"]).to_dict(), default=sorted)
    )
    cfg = LoraConfig.from_dict(data)
    assert (cfg.r, cfg.lora_alpha) == (4, 8)
    again = LoraConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert cfg.to_dict()["use_dora"] is False
    assert cfg.extra.get("peft_version") == peft.__version__  # passive keys are kept verbatim


def test_our_config_is_read_by_peft(tmp_path):
    cfg = LoraConfig(
        r=3,
        lora_alpha=6,
        target_modules=["q", "v"],
        use_rslora=True,
        rank_pattern={"v": 2},
        alpha_pattern={"q": 1.5},
    )
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg.to_dict()))
    theirs = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert (theirs.r, theirs.lora_alpha, theirs.use_rslora) == (3, 6, True)
    assert set(theirs.target_modules) == {"q", "v"}
    assert theirs.rank_pattern == {"v": 2} and theirs.alpha_pattern == {"q": 1.5}
    assert not theirs.use_dora


def _base_dict(**overrides) -> dict:
    d = LoraConfig(r=4, lora_alpha=8).to_dict()
    d.update(overrides)
    return d


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("lora_bias", True),
        ("alora_invocation_tokens", [5, 6]),
        ("layer_replication", [[0, 1]]),
        ("trainable_token_indices", [1, 2]),
        ("target_parameters", ["experts.weight"]),
        ("use_qalora", True),
    ],
)
def test_variant_switched_on_is_refused_by_name(key, value):
    with pytest.raises(UnsupportedAdapterError, match=key):
        LoraConfig.from_dict(_base_dict(**{key: value}))


@pytest.mark.parametrize("value", [False, None, [], {}])
def test_variant_switched_off_is_accepted(value):
    LoraConfig.from_dict(_base_dict(lora_bias=value, layer_replication=value))


@pytest.mark.parametrize(("value", "expected"), [(True, True), (False, False), (None, False)])
def test_use_dora_is_modelled_and_round_trips(value, expected):
    cfg = LoraConfig.from_dict(_base_dict(use_dora=value))
    assert cfg.use_dora is expected
    assert LoraConfig.from_dict(cfg.to_dict()).to_dict()["use_dora"] is expected


@pytest.mark.parametrize("value", [1, "yes", [], {}])
def test_use_dora_not_a_boolean_is_refused(value):
    with pytest.raises(AdapterFormatError, match="use_dora"):
        LoraConfig.from_dict(_base_dict(use_dora=value))


def test_unknown_key_with_truthy_value_is_refused_by_name():
    with pytest.raises(UnsupportedAdapterError, match="use_fancy_lora"):
        LoraConfig.from_dict(_base_dict(use_fancy_lora=True))
    with pytest.raises(UnsupportedAdapterError, match="some_new_config"):
        LoraConfig.from_dict(_base_dict(some_new_config={"x": 1}))


def test_unknown_key_at_off_value_is_kept():
    cfg = LoraConfig.from_dict(_base_dict(use_fancy_lora=False))
    assert cfg.extra["use_fancy_lora"] is False
    assert cfg.to_dict()["use_fancy_lora"] is False


@pytest.mark.parametrize(
    ("overrides", "error", "names"),
    [
        (dict(r="8"), AdapterFormatError, "'r'"),
        (dict(r=0), AdapterFormatError, "'r'"),
        (dict(r=-2), AdapterFormatError, "'r'"),
        (dict(r=8.0), AdapterFormatError, "'r'"),
        (dict(r=True), AdapterFormatError, "'r'"),
        (dict(lora_alpha="16"), AdapterFormatError, "lora_alpha"),
        (dict(lora_dropout=1.5), AdapterFormatError, "lora_dropout"),
        (dict(bias="sometimes"), AdapterFormatError, "bias"),
        (dict(target_modules=[]), AdapterFormatError, "target_modules"),
        (dict(target_modules="(q|v"), AdapterFormatError, "target_modules"),
        (dict(target_modules=["q", 3]), AdapterFormatError, "target_modules"),
        (dict(rank_pattern={"q": "2"}), AdapterFormatError, "rank_pattern"),
        (dict(rank_pattern={"q": 0}), AdapterFormatError, "rank_pattern"),
        (dict(alpha_pattern=["q"]), AdapterFormatError, "alpha_pattern"),
        (dict(modules_to_save="lm_head"), AdapterFormatError, "modules_to_save"),
        (dict(peft_type="IA3"), UnsupportedAdapterError, "IA3"),
        (dict(peft_type="LOHA"), UnsupportedAdapterError, "LOHA"),
    ],
)
def test_bad_values_raise_naming_the_key(overrides, error, names):
    with pytest.raises(error, match=names) as info:
        LoraConfig.from_dict(_base_dict(**overrides))
    assert isinstance(info.value, InvalidInputError)  # exit code 3 through the CLI


@pytest.mark.parametrize("key", ["r", "lora_alpha", "peft_type"])
def test_missing_required_key(key):
    data = _base_dict()
    del data[key]
    with pytest.raises(AdapterFormatError, match=repr(key)):
        LoraConfig.from_dict(data)


@pytest.mark.parametrize("data", [[], "LORA", 3, None])
def test_not_an_object(data):
    with pytest.raises(AdapterFormatError, match="JSON object"):
        LoraConfig.from_dict(data)


@pytest.mark.parametrize(
    "targets, culprit",
    [(["embed", "q"], "embed (Embedding)"), (".*", "not a linear layer"), (["block"], "block (Sequential)")],
)
def test_training_targets_linear_layers_only(targets, culprit):
    """``check_ranks`` (what ``train`` checks before any allocation) refuses a target that matches
    an embedding or a whole block: recorded with no tensors, the adapter was refused by every
    reader afterwards. Linear layers alone pass."""
    from torch import nn

    from loraexport.errors import AdapterMismatchError
    from loraexport.lora.inject import check_ranks

    model = nn.Module()
    model.embed, model.q = nn.Embedding(10, 8), nn.Linear(8, 8)
    model.block = nn.Sequential(nn.Linear(8, 8))
    check_ranks(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q"]))
    with pytest.raises(AdapterMismatchError, match=re.escape(culprit)):
        check_ranks(model, LoraConfig(r=2, lora_alpha=4, target_modules=targets))
