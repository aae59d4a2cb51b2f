"""Regexes from an untrusted adapter_config.json cannot hang the tool.

PEFT matches ``target_modules`` (a string), ``exclude_modules`` (a string), ``layers_pattern`` and
the keys of ``rank_pattern``/``alpha_pattern`` with ``re`` against every module name, and ``re`` has
no timeout. So a pattern that can backtrack exponentially is refused when the config is read,
before any module name is matched; the patterns real adapters use are accepted and still matched
exactly as PEFT matches them.
"""

from __future__ import annotations

import json
import re
import time

import peft
import pytest
from clihelp import one_line_message
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key

from loraexport.errors import AdapterFormatError, UnsupportedAdapterError
from loraexport.lora.adapter import CONFIG_NAME, Adapter
from loraexport.lora.config import _MAX_REGEX_LEN, LoraConfig

# A module name that makes a nested quantifier backtrack exponentially: 2**40 ways to split it.
LONG_NAME = "model.layers.0." + "a" * 40 + ".q_proj!"
NAMES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.11.self_attn.v_proj",
    "model.layers.3.mlp.down_proj",
    "model.language_model.layers.2.self_attn.o_proj",
    "model.vision_tower.blocks.0.attn.qkv",
    "visual.blocks.4.mlp.fc1",
    "lm_head",
    LONG_NAME,
]

# target_modules strings as real adapters write them: PEFT's docs and tests, LLaMA-Factory's
# vision-tower exclusion, ms-swift's language-model-only pattern, Unsloth's generated pattern.
UNSLOTH = (
    r"(?:.*?(?:vision|image|visual|patch|language|text).*?(?:self_attn|attention|attn|mlp|feed_forward|ffn"
    r"|dense).*?(?:qkv|proj|gate_proj|up_proj|down_proj|q_proj|k_proj|v_proj|o_proj|fc1|fc2|out_proj).*?)"
    r"|(?:\bmodel\.layers\.[\d]{1,}\.(?:self_attn|attention|attn|mlp|feed_forward|ffn|dense)\.(?:(?:qkv"
    r"|proj|gate_proj|up_proj|down_proj|q_proj|k_proj|v_proj|o_proj|fc1|fc2|out_proj)))"
)
REAL_TARGETS = [
    r".*\.(q_proj|v_proj)$",
    r"model\.layers\.\d+\.self_attn\.(q|v)_proj",
    r".*decoder\.\d+\.(self_attn|ff)\.\w+",
    r".*\.layers\.(0|1|2|3)\..*(q|k)_proj",
    r"^(?!.*vision_tower).*(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj).*",
    r"^(model\.language_model(?=\.).*\.(down_proj|out_proj|q_proj|v_proj))$",
    r"(?:.*\.)?(?:q_proj|v_proj)",
    r"model\.layers\.[0-9]{1,2}\.mlp\.(gate|up|down)_proj",
    UNSLOTH,
    "q_proj",
]
# Keys of rank_pattern/alpha_pattern and layers_pattern as PEFT documents them.
REAL_PATTERN_KEYS = [
    "q_proj",
    "model.layers.0.self_attn.q_proj",
    r"layers\.\d+\.mlp\.down_proj",
    "^model.layers.3.mlp.down_proj",
]

# Each can take exponential time on a name like LONG_NAME.
PATHOLOGICAL = [
    r"(a+)+$",
    r"(a*)*$",
    r"(a|aa)+$",
    r"(a|a?)+$",
    r"(.*a){25}",
    r"(a?){30}a{30}",
    r"(\w+\.?)+\!x",
    r"model\.layers\.0\.(a+)+\.q",
    r"(?:(a)|\1)+x",
    r"(a{1,40}){1,40}$",
    r"(?:a+){2,}x",
    r"(?:(?=a)a+)*x",
]


def _config(**overrides) -> dict:
    d = LoraConfig(r=4, lora_alpha=8).to_dict()
    d.update(overrides)
    return d


def _peft_matches(target: str, name: str) -> bool:
    return bool(check_target_module_exists(peft.LoraConfig(target_modules=target), name))


@pytest.mark.parametrize("target", REAL_TARGETS)
def test_real_world_target_regexes_are_accepted_and_matched_like_peft(target):
    config = LoraConfig.from_dict(_config(target_modules=target))
    ours = [config.matches(n) for n in NAMES]
    assert ours == [_peft_matches(target, n) for n in NAMES]
    assert ours == [re.fullmatch(target, n) is not None for n in NAMES]


def test_real_world_regexes_select_what_they_should():
    config = LoraConfig.from_dict(_config(target_modules=UNSLOTH))
    assert [n for n in NAMES if config.matches(n)] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.11.self_attn.v_proj",
        "model.layers.3.mlp.down_proj",
        "model.language_model.layers.2.self_attn.o_proj",
        "model.vision_tower.blocks.0.attn.qkv",
        "visual.blocks.4.mlp.fc1",
    ]


@pytest.mark.parametrize("key", REAL_PATTERN_KEYS)
def test_real_world_pattern_keys_are_accepted_and_matched_like_peft(key):
    config = LoraConfig.from_dict(
        _config(
            target_modules=["q_proj", "down_proj"],
            rank_pattern={key: 2},
            alpha_pattern={key: 3},
            exclude_modules=r".*vision_tower.*",
            layers_pattern=["layers", "blocks"],
            layers_to_transform=[0, 3],
        )
    )
    for name in NAMES:
        config.matches(name)
        assert config.rank(name) == (2 if get_pattern_key([key], name) == key else 4), name
        assert config.alpha(name) == (3 if get_pattern_key([key], name) == key else 8), name
    assert any(config.rank(name) == 2 for name in NAMES)  # the key selects something


def _quickly_refused(t0: float, e: pytest.ExceptionInfo, key: str) -> None:
    # this thread's CPU time, not the wall clock: a loaded machine (xdist workers, other jobs) can
    # stall a refusal that takes milliseconds past any wall limit, while a pattern that was matched
    # (2**40 backtracking steps on LONG_NAME) would burn hours of CPU; t0 from time.thread_time()
    assert time.thread_time() - t0 < 1.0, "refused, but slowly"
    one_line_message(e, CONFIG_NAME, repr(key))


@pytest.mark.parametrize("pattern", PATHOLOGICAL)
@pytest.mark.parametrize(
    ("key", "overrides"),
    [
        ("target_modules", lambda p: dict(target_modules=p)),
        ("exclude_modules", lambda p: dict(exclude_modules=p)),
        ("rank_pattern", lambda p: dict(rank_pattern={"q": 2, p: 3})),
        ("alpha_pattern", lambda p: dict(alpha_pattern={p: 3})),
        ("layers_pattern", lambda p: dict(layers_pattern=["layers", p], layers_to_transform=[0])),
    ],
)
def test_pathological_regex_quickly_refused_by_key(pattern, key, overrides):
    t0 = time.thread_time()
    with pytest.raises(UnsupportedAdapterError) as e:
        LoraConfig.from_dict(_config(**overrides(pattern)))
    _quickly_refused(t0, e, key)
    assert "exponential" in str(e.value)


def test_pathological_regex_refused_by_adapter_load(tmp_path):
    (tmp_path / CONFIG_NAME).write_text(json.dumps(_config(target_modules=r"(\w+\.?)+\!x")))
    t0 = time.thread_time()
    with pytest.raises(UnsupportedAdapterError) as e:
        Adapter.load(tmp_path)  # before the weights are even looked for
    _quickly_refused(t0, e, "target_modules")


def test_constructed_config_checked_too():
    with pytest.raises(UnsupportedAdapterError, match="target_modules"):
        LoraConfig(target_modules="(a+)+$")


@pytest.mark.parametrize(
    "pattern",
    [
        r"layers\.\d+\.\w*_proj",  # single-character repetitions in a row
        r"(?:ab?)?c*",  # optional groups and repetitions side by side, none inside another
        r"(.*\.)?q",
        r"(?:q|v)_proj{1}",
    ],
)
def test_repetitions_side_by_side_or_optional_are_accepted(pattern):
    LoraConfig.from_dict(_config(target_modules=pattern, rank_pattern={pattern: 2}))


def test_regex_length_capped():
    # a long alternation of module names, just under the cap (Unsloth's patterns are ~400 characters)
    names = [f"layer_{i}_proj" for i in range(200)]
    while len(ok := r".*\.(" + "|".join(names) + ")") > _MAX_REGEX_LEN:
        names.pop()
    assert len(ok) > _MAX_REGEX_LEN - 20 and len(UNSLOTH) < _MAX_REGEX_LEN / 4
    assert LoraConfig.from_dict(_config(target_modules=ok)).matches("model.layers.0.layer_7_proj")
    too_long = "q|" * (_MAX_REGEX_LEN // 2) + "v"
    for overrides, key in [
        (dict(target_modules=too_long), "target_modules"),
        (dict(rank_pattern={too_long: 2}), "rank_pattern"),
        (dict(target_modules="(" * 5000 + ")" * 5000), "target_modules"),  # was RecursionError from re
    ]:
        t0 = time.thread_time()
        with pytest.raises(UnsupportedAdapterError) as e:
            LoraConfig.from_dict(_config(**overrides))
        _quickly_refused(t0, e, key)
        assert f"over {_MAX_REGEX_LEN}" in str(e.value)


def test_invalid_regex_is_still_a_format_error():
    with pytest.raises(AdapterFormatError, match="target_modules"):
        LoraConfig.from_dict(_config(target_modules="(a+"))
