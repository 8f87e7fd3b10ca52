"""Config: presets, reading official config.json files (transformers 4 and 5 layouts), writing them back."""

import json
import math
from pathlib import Path

import pytest
import torch

from phikit.config import PRESETS, Config, ConfigError
from phikit.model import Phi3

CONFIGS = Path(__file__).parent / "fixtures" / "configs"  # official config.json copies; sources in SOURCES.md
OFFICIAL = ["phi-3-mini-4k-instruct", "phi-3-mini-128k-instruct", "phi-3-medium-4k-instruct", "phi-3.5-mini-instruct",
            "phi-4-mini-instruct"]


def official(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


@pytest.mark.parametrize("name, n_params", [
    # parameter counts from ../shared/reference/phi-family.md section 1a (Keras preset / computed)
    ("phi-3-mini-4k-instruct", 3_821_079_552),
    ("phi-3-mini-128k-instruct", 3_821_079_552),
    ("phi-3.5-mini-instruct", 3_821_079_552),
    ("phi-3-medium-4k-instruct", 13_960_238_080),
    ("phi-4-mini-instruct", 3_836_021_760),  # tied embeddings: no separate lm_head
])
def test_preset_parameter_counts(name, n_params):
    with torch.device("meta"):
        model = Phi3(Config.from_name(name))
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_every_preset_builds():
    for name in PRESETS:
        extra = {"rope_short_factor": [1.0] * 64} if name == "phi-3-medium-128k-instruct" else {}
        cfg = Config.from_name(name, **extra)
        assert cfg.rotary_dim == {"phi-4-mini-instruct": 96}.get(name, cfg.head_dim)


def test_medium_128k_preset_asks_for_its_unverified_short_factors():
    with pytest.raises(ConfigError, match="short_factor"):
        Config.from_name("phi-3-medium-128k-instruct")


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_config_equals_preset(name):
    assert Config.from_hf(official(name)) == Config.from_name(name)


@pytest.mark.parametrize("name", OFFICIAL)
def test_transformers5_layout_reads_the_same(name):
    """transformers 5 saves rope settings under rope_parameters; both layouts give the same Config."""
    from transformers import Phi3Config

    hf = official(name)
    v5 = Phi3Config(**{k: v for k, v in hf.items() if k not in ("architectures", "auto_map")}).to_dict()
    assert "rope_parameters" in v5 and "rope_scaling" not in v5
    assert Config.from_hf(v5) == Config.from_hf(hf)


def test_old_su_type_is_longrope():
    cfg = Config.from_hf(official("phi-3-mini-128k-instruct-2024-04-su"))
    assert cfg.longrope and len(cfg.rope_short_factor) == 48
    assert cfg.rope_long_factor[0] == 1.0299999713897705  # first long factor of the April 2024 release
    assert cfg.rope_mscale(True) == cfg.rope_mscale(False) == math.sqrt(1 + math.log(32) / math.log(4096))


def test_longrope_attention_factor_and_overrides():
    hf = official("phi-3.5-mini-instruct")
    assert Config.from_hf(hf).rope_mscale(False) == pytest.approx(1.1902380714238083, abs=1e-15)
    hf["rope_scaling"].update(short_mscale=1.0, long_mscale=1.243163121016122)  # Phi-3.5-MoE style overrides
    cfg = Config.from_hf(hf)
    assert (cfg.rope_mscale(False), cfg.rope_mscale(True)) == (1.0, 1.243163121016122)
    back = cfg.to_hf()["rope_scaling"]
    assert (back["short_mscale"], back["long_mscale"]) == (1.0, 1.243163121016122)
    hf["rope_scaling"] = dict(hf["rope_scaling"], attention_factor=1.5)  # transformers 5 spelling
    del hf["rope_scaling"]["short_mscale"], hf["rope_scaling"]["long_mscale"]
    assert Config.from_hf(hf).rope_mscale(False) == 1.5


@pytest.mark.parametrize("name", OFFICIAL + ["phi-3-mini-128k-instruct-2024-04-su"])
def test_to_hf_round_trip_and_transformers_reads_it(name, tmp_path):
    from transformers import AutoConfig

    cfg = Config.from_hf(official(name))
    hf = cfg.to_hf()
    assert Config.from_hf(hf) == cfg
    assert hf["_name_or_path"] == official(name).get("_name_or_path")  # unmodelled keys survive
    (tmp_path / "config.json").write_text(json.dumps(hf))
    theirs = AutoConfig.from_pretrained(tmp_path)
    assert (theirs.hidden_size, theirs.num_key_value_heads, theirs.tie_word_embeddings) == (
        cfg.dim, cfg.n_kv_heads, cfg.tie_embeddings)
    if cfg.longrope:
        assert theirs.rope_parameters["long_factor"] == cfg.rope_long_factor


def test_unknown_model_type_is_refused():
    hf = official("phi-3-mini-4k-instruct") | {"model_type": "mamba"}
    with pytest.raises(ConfigError, match="unsupported model_type 'mamba'"):
        Config.from_hf(hf)


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "vocab_size", "model_type"])
def test_missing_required_field_is_named(field):
    hf = official("phi-3-mini-4k-instruct")
    del hf[field]
    with pytest.raises(ConfigError, match=f"'{field}'"):
        Config.from_hf(hf)


def test_bad_values_are_named():
    hf = official("phi-3.5-mini-instruct")
    hf["rope_scaling"]["long_factor"] = hf["rope_scaling"]["long_factor"][:10]
    with pytest.raises(ConfigError, match="rope_scaling.long_factor has 10 entries, expected rotary_dim/2 = 48"):
        Config.from_hf(hf)
    with pytest.raises(ConfigError, match="short_factor"):
        Config.from_hf(official("phi-3.5-mini-instruct") | {"rope_scaling": {"type": "longrope", "long_factor": [1.0]}})
    with pytest.raises(ConfigError, match="hidden_act"):
        Config.from_hf(official("phi-3-mini-4k-instruct") | {"hidden_act": "gelu"})
    with pytest.raises(ConfigError, match="multiple of num_key_value_heads"):
        Config.from_hf(official("phi-3-mini-4k-instruct") | {"num_key_value_heads": 5})


def test_from_name_overrides_rederive_head_dim():
    cfg = Config.from_name("phi-4-mini-instruct", dim=96, n_heads=6, n_kv_heads=2, rope_short_factor=[1.0] * 6,
                           rope_long_factor=[2.0] * 6)
    assert (cfg.head_dim, cfg.rotary_dim) == (16, 12)
    with pytest.raises(ConfigError, match="unknown preset"):
        Config.from_name("phi-9")
