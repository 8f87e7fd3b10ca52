"""Model configuration: one dataclass for every Phi-3-architecture text model.

A preset differs from another only by values, never by code. `from_hf` / `to_hf` translate to and
from Hugging Face `config.json` through `HF_KEYS`, the one place that knows HF's names. Both the
transformers-4 layout (`rope_scaling`, `rope_theta` at top level, the old `su` type, optional
`short_mscale` / `long_mscale`) and the transformers-5 layout (`rope_parameters`) are read;
`to_hf` writes the transformers-4 layout, which both versions read.

References: transformers `models/phi3/configuration_phi3.py` and `modeling_rope_utils.py`;
gpt-fast `model.py::ModelArgs`; litgpt `config.py`; ../shared/reference/phi-family.md section 1.
This module imports no torch.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path


class ConfigError(ValueError):
    """A config.json that phikit cannot use; the message names the offending field."""


# our field name -> HF config.json key (top level). rope settings are handled in from_hf/to_hf.
HF_KEYS = {
    "vocab_size": "vocab_size",
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "ffn_dim": "intermediate_size",
    "head_dim": "head_dim",
    "norm_eps": "rms_norm_eps",
    "max_seq_len": "max_position_embeddings",
    "original_max_seq_len": "original_max_position_embeddings",
    "sliding_window": "sliding_window",
    "tie_embeddings": "tie_word_embeddings",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
    "torch_dtype": "torch_dtype",
}
REQUIRED_HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# model_type -> HF architecture class. Llama is the same decoder with separate q/k/v and gate/up
# tensors in its checkpoints (fused at load, see checkpoint.py) and never LongRoPE or a window.
ARCHITECTURES = {"phi3": "Phi3ForCausalLM", "llama": "LlamaForCausalLM"}
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)
# HF class defaults that differ from Phi-3's, for keys a config.json may omit
_DEFAULTS = {"llama": {"rms_norm_eps": 1e-6, "eos_token_id": 2, "pad_token_id": None,
                       "max_position_embeddings": 2048}}
# HF keys we read but do not store as fields, or that only describe HF's own runtime.
_HF_CONSUMED = set(HF_KEYS.values()) | {
    "model_type", "architectures", "rope_scaling", "rope_parameters", "rope_theta",
    "partial_rotary_factor", "hidden_act", "attention_bias", "mlp_bias", "lm_head_bias",
    "dtype", "transformers_version", "phikit_quantization",
}


@dataclass
class Config:
    vocab_size: int
    dim: int                          # hidden size
    n_layers: int
    n_heads: int                      # query heads
    n_kv_heads: int                   # GQA: Phi-4-mini has 24 query heads sharing 8 KV heads
    ffn_dim: int                      # SwiGLU inner size (gate_up_proj holds 2 * ffn_dim rows)
    head_dim: int = 0                 # 0 means dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rotary_frac: float = 1.0          # Phi-4-mini rotates only 3/4 of each head
    max_seq_len: int = 4096           # max_position_embeddings
    original_max_seq_len: int = 4096  # LongRoPE switch point: short factors up to here, long beyond
    rope_short_factor: list[float] | None = None   # LongRoPE is on when both lists are set
    rope_long_factor: list[float] | None = None
    rope_short_mscale: float | None = None         # attention factor overrides; None -> LongRoPE formula
    rope_long_mscale: float | None = None
    sliding_window: int | None = None  # keys kept per query, the query included (2047 on the 4k models)
    tie_embeddings: bool = False      # lm_head shares embed_tokens (Phi-4-mini)
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 32000
    pad_token_id: int | None = 32000
    torch_dtype: str = "bfloat16"     # dtype of the released weights
    model_type: str = "phi3"          # "llama": same decoder, checkpoints store q/k/v and gate/up apart
    quantization: dict | None = None  # weight-only quantization settings (quantize.py), None for float
    hf_extra: dict = field(default_factory=dict, repr=False, compare=False)  # unmodelled keys, kept for to_hf

    def __post_init__(self):
        if not self.head_dim:
            if self.dim % self.n_heads:
                raise ConfigError(f"hidden_size ({self.dim}) is not divisible by num_attention_heads ({self.n_heads})")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.n_heads}) must be a multiple of num_key_value_heads ({self.n_kv_heads})")
        if self.rotary_dim % 2 or not 0 < self.rotary_frac <= 1:
            raise ConfigError(f"partial_rotary_factor {self.rotary_frac} gives an odd or empty rotary dim")
        if (self.rope_short_factor is None) != (self.rope_long_factor is None):
            raise ConfigError("rope_scaling needs both short_factor and long_factor")
        for name in ("rope_short_factor", "rope_long_factor"):
            lst = getattr(self, name)
            if lst is not None and len(lst) != self.rotary_dim // 2:
                hf_name = name.replace("rope_", "rope_scaling.")
                raise ConfigError(f"{hf_name} has {len(lst)} entries, expected rotary_dim/2 = {self.rotary_dim // 2}")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_frac)

    @property
    def longrope(self) -> bool:
        return self.rope_long_factor is not None

    def rope_mscale(self, long: bool) -> float:
        """LongRoPE attention factor a, which multiplies cos and sin (1.0 without LongRoPE).

        Default a = sqrt(1 + ln(s) / ln(L0)) with s = max_seq_len / L0, applied to both factor lists as
        transformers does; `short_mscale` / `long_mscale` in config.json override it per list.
        """
        if not self.longrope:
            return 1.0
        override = self.rope_long_mscale if long else self.rope_short_mscale
        if override is not None:
            return float(override)
        s = self.max_seq_len / self.original_max_seq_len
        return 1.0 if s <= 1.0 else math.sqrt(1 + math.log(s) / math.log(self.original_max_seq_len))

    @property
    def eos_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def from_name(cls, name: str, **overrides) -> "Config":
        """A preset by name (see PRESETS), with field overrides: `Config.from_name("phi-4-mini-instruct", n_layers=2)`."""
        key = name.split("/")[-1].lower()
        if key not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        kwargs = copy.deepcopy(PRESETS[key])
        if any(k in overrides for k in ("dim", "n_heads")) and "head_dim" not in overrides:
            kwargs["head_dim"] = 0  # re-derive head_dim from the overridden shape
        kwargs.update(overrides)
        if kwargs.get("rope_long_factor") is not None and kwargs.get("rope_short_factor") is None:
            raise ConfigError(f"preset {key!r} has no recorded LongRoPE short_factor list; pass rope_short_factor=[...] "
                              "or load the checkpoint's own config.json")
        return cls(**kwargs)

    @classmethod
    def from_hf(cls, hf: dict) -> "Config":
        """Read a Hugging Face config.json dict (transformers 4 or 5 layout)."""
        model_type = hf.get("model_type")
        if model_type is None:
            raise ConfigError("config.json has no 'model_type' field (expected one of: "
                              + ", ".join(SUPPORTED_MODEL_TYPES) + ")")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"unsupported model_type {model_type!r} in config.json "
                              f"(phikit supports: {', '.join(SUPPORTED_MODEL_TYPES)})")
        for key in REQUIRED_HF_KEYS:
            if hf.get(key) is None:
                raise ConfigError(f"config.json is missing the required field {key!r}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"unsupported hidden_act {hf['hidden_act']!r} (phikit implements silu / SwiGLU)")
        for key in ("attention_bias", "mlp_bias", "lm_head_bias"):
            if hf.get(key):
                raise ConfigError(f"unsupported {key}=true (Phi-3-architecture models have no biases)")

        hf = _DEFAULTS.get(model_type, {}) | hf
        # an explicit null means "none" for token ids and the window; elsewhere it means "the default"
        nullable = {"bos_token_id", "eos_token_id", "pad_token_id", "sliding_window"}
        kw = {ours: hf[theirs] for ours, theirs in HF_KEYS.items()
              if theirs in hf and (hf[theirs] is not None or theirs in nullable)}
        kw["model_type"] = model_type
        kw.setdefault("n_kv_heads", hf["num_attention_heads"])  # HF: None means plain multi-head attention
        if "dtype" in hf and "torch_dtype" not in hf:           # transformers 5 renamed the key
            kw["torch_dtype"] = hf["dtype"]
        kw["sliding_window"] = hf.get("sliding_window")         # absent: no window (HF's default)

        # rope: transformers 5 nests everything in rope_parameters; 4 uses top-level keys + rope_scaling
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        kw["rope_theta"] = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        kw["rotary_frac"] = float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
        if "original_max_position_embeddings" not in hf and "original_max_position_embeddings" in rope:
            kw["original_max_seq_len"] = rope["original_max_position_embeddings"]
        if model_type == "llama":
            kw["original_max_seq_len"] = kw["max_seq_len"]  # no LongRoPE: nothing to switch
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type in ("longrope", "su") and model_type == "phi3":  # "su" is the April 2024 name of LongRoPE
            for key in ("short_factor", "long_factor"):
                if not isinstance(rope.get(key), list):
                    raise ConfigError(f"rope_scaling type {rope_type!r} is missing the required field {key!r}")
            kw["rope_short_factor"] = [float(x) for x in rope["short_factor"]]
            kw["rope_long_factor"] = [float(x) for x in rope["long_factor"]]
            if rope.get("attention_factor") is not None:        # transformers 5 spelling
                kw["rope_short_mscale"] = kw["rope_long_mscale"] = float(rope["attention_factor"])
            for key in ("short_mscale", "long_mscale"):         # old remote-code spelling
                if rope.get(key) is not None:
                    kw[f"rope_{key}"] = float(rope[key])
        elif rope_type != "default":
            raise ConfigError(f"unsupported rope_scaling type {rope_type!r} for model_type {model_type!r} "
                              "(phikit supports plain RoPE, and longrope/su for phi3)")

        if hf.get("phikit_quantization") is not None:
            kw["quantization"] = dict(hf["phikit_quantization"])
        kw["hf_extra"] = {k: v for k, v in hf.items() if k not in _HF_CONSUMED}
        return cls(**kw)

    @classmethod
    def from_file(cls, path: str | Path) -> "Config":
        path = Path(path)
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(hf, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_hf(hf)

    def to_hf(self) -> dict:
        """The config as a transformers-4-style config.json dict (also read by transformers 5)."""
        hf = dict(self.hf_extra)
        hf.update(architectures=[ARCHITECTURES[self.model_type]], model_type=self.model_type, hidden_act="silu")
        for ours, theirs in HF_KEYS.items():
            hf[theirs] = getattr(self, ours)
        if self.model_type == "llama":  # keys that only Phi-3 has
            for key in ("original_max_position_embeddings", "sliding_window"):
                del hf[key]
        if self.head_dim == self.dim // self.n_heads:
            del hf["head_dim"]  # derived; older transformers versions do not know the key
        if self.quantization is not None:
            hf["phikit_quantization"] = self.quantization
        hf["rope_theta"] = self.rope_theta
        if self.rotary_frac != 1.0 or self.model_type == "phi3":
            hf["partial_rotary_factor"] = self.rotary_frac
        hf["rope_scaling"] = None
        if self.longrope:
            scaling = {"type": "longrope", "short_factor": self.rope_short_factor, "long_factor": self.rope_long_factor}
            if self.rope_short_mscale is not None and self.rope_short_mscale == self.rope_long_mscale:
                scaling["attention_factor"] = self.rope_short_mscale
            else:
                for key in ("short_mscale", "long_mscale"):
                    if getattr(self, f"rope_{key}") is not None:
                        scaling[key] = getattr(self, f"rope_{key}")
            hf["rope_scaling"] = scaling
        return hf

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ---- presets ------------------------------------------------------------------------------------
# LongRoPE factor lists (rotary_dim / 2 = 48 floats each), copied from the official config.json
# files via ../shared/reference/phi-family.md Appendix A.
_PHI3_MINI_128K_LONG = [
    1.0700000524520874, 1.1200000047683716, 1.149999976158142, 1.4199999570846558,
    1.5699999332427979, 1.7999999523162842, 2.129999876022339, 2.129999876022339, 3.009999990463257,
    5.910000324249268, 6.950000286102295, 9.070000648498535, 9.930000305175781, 10.710000038146973,
    11.130000114440918, 14.609999656677246, 15.409998893737793, 19.809999465942383,
    37.279998779296875, 38.279998779296875, 38.599998474121094, 40.12000274658203,
    46.20000457763672, 50.940006256103516, 53.66000747680664, 54.9373893737793, 56.89738845825195,
    57.28738784790039, 59.98738479614258, 60.86738586425781, 60.887386322021484, 61.71739196777344,
    62.91739273071289, 62.957393646240234, 63.41739273071289, 63.8173942565918, 63.83739471435547,
    63.897396087646484, 63.93739700317383, 64.06739807128906, 64.11434936523438, 64.12435150146484,
    64.15435028076172, 64.19435119628906, 64.24435424804688, 64.57435607910156, 64.69000244140625,
    64.76000213623047
]
_PHI3_MINI_128K_SHORT = [
    1.1, 1.1, 1.1, 1.3000000000000003, 1.3500000000000003, 1.3500000000000003, 1.4000000000000004,
    1.5500000000000005, 2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001,
    2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001,
    2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001,
    2.000000000000001, 2.000000000000001, 2.000000000000001, 2.0500000000000007, 2.0500000000000007,
    2.0500000000000007, 2.0500000000000007, 2.0500000000000007, 2.0500000000000007,
    2.1000000000000005, 2.1000000000000005, 2.1500000000000004, 2.25, 2.25, 2.25, 2.25, 2.25,
    2.3999999999999995, 2.4499999999999993, 2.499999999999999, 2.6999999999999984,
    2.6999999999999984, 2.7499999999999982, 2.799999999999998, 2.8999999999999977, 3.049999999999997
]
_PHI35_MINI_LONG = [
    1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601,
    1.5899999141693115, 1.600000023841858, 1.6200000047683716, 2.620000123977661,
    3.2300000190734863, 3.2300000190734863, 4.789999961853027, 7.400000095367432, 7.700000286102295,
    9.09000015258789, 12.199999809265137, 17.670000076293945, 24.46000099182129, 28.57000160217285,
    30.420001983642578, 30.840002059936523, 32.590003967285156, 32.93000411987305,
    42.320003509521484, 44.96000289916992, 50.340003967285156, 50.45000457763672, 57.55000305175781,
    57.93000411987305, 58.21000289916992, 60.1400032043457, 62.61000442504883, 62.62000274658203,
    62.71000289916992, 63.1400032043457, 63.1400032043457, 63.77000427246094, 63.93000411987305,
    63.96000289916992, 63.970001220703125, 64.02999877929688, 64.06999969482422, 64.08000183105469,
    64.12000274658203, 64.41000366210938, 64.4800033569336, 64.51000213623047, 64.52999877929688,
    64.83999633789062
]
_PHI35_MINI_SHORT = [
    1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705, 1.0499999523162842,
    1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0499999523162842,
    1.0699999332427979, 1.0999999046325684, 1.1099998950958252, 1.1599998474121094,
    1.1599998474121094, 1.1699998378753662, 1.2899998426437378, 1.339999794960022,
    1.679999828338623, 1.7899998426437378, 1.8199998140335083, 1.8499997854232788,
    1.8799997568130493, 1.9099997282028198, 1.9399996995925903, 1.9899996519088745,
    2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346,
    2.0199997425079346, 2.0199997425079346, 2.0299997329711914, 2.0299997329711914,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0799996852874756,
    2.0899996757507324, 2.189999580383301, 2.2199995517730713, 2.5899994373321533,
    2.729999542236328, 2.749999523162842, 2.8399994373321533
]
_PHI4_MINI_LONG = [
    1.0, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649,
    2.446418898, 2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845,
    5.351743533, 5.984965424, 6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158,
    11.70738129, 13.09260651, 14.64173252, 16.37415215, 18.31155283, 20.47818807, 22.90118105,
    25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23, 32.6, 32.61, 32.64, 32.66, 32.7, 32.71,
    32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77
]

# Phi-3-medium-128k: rotary_dim 128, so 64 factors. Only the long list could be verified; see PRESETS.
_PHI3_MEDIUM_128K_LONG = [
    1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.25, 1.25, 1.5, 2.0, 2.75,
    5.75, 5.75, 6.5, 9.25, 11.0, 13.25, 19.25, 19.75, 19.75, 21.25, 21.5, 26.5, 30.0, 33.75, 35.25,
    38.5, 42.0, 42.25, 46.0, 47.0, 50.0, 50.5, 51.0, 52.0, 52.75, 53.75, 54.75, 57.0, 57.25, 58.5,
    59.25, 59.5, 62.0, 62.5, 62.75, 63.25, 63.25, 63.25, 63.75, 64.0, 64.0, 64.25, 64.5, 64.5, 65.0,
    65.0
]

_PHI3_MINI = dict(vocab_size=32064, dim=3072, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=8192,
                  bos_token_id=1, eos_token_id=32000, pad_token_id=32000)
_PHI3_MEDIUM = dict(_PHI3_MINI, dim=5120, n_layers=40, n_heads=40, n_kv_heads=10, ffn_dim=17920)
_128K = dict(max_seq_len=131072, original_max_seq_len=4096, sliding_window=262144)

PRESETS: dict[str, dict] = {
    # https://huggingface.co/microsoft/Phi-3-mini-4k-instruct/blob/main/config.json
    "phi-3-mini-4k-instruct": dict(_PHI3_MINI, sliding_window=2047),
    # https://huggingface.co/microsoft/Phi-3-mini-128k-instruct/blob/main/config.json (June 2024 update)
    "phi-3-mini-128k-instruct": dict(_PHI3_MINI, **_128K, rope_short_factor=_PHI3_MINI_128K_SHORT,
                                     rope_long_factor=_PHI3_MINI_128K_LONG),
    # https://huggingface.co/microsoft/Phi-3-medium-4k-instruct/blob/main/config.json
    "phi-3-medium-4k-instruct": dict(_PHI3_MEDIUM, sliding_window=2047),
    # https://huggingface.co/microsoft/Phi-3-medium-128k-instruct/blob/main/config.json
    # https://huggingface.co/microsoft/Phi-3-medium-128k-instruct/blob/main/config.json: its short_factor list
    # could not be verified (tests/fixtures/configs/SOURCES.md), so this preset needs rope_short_factor=...;
    # loading the checkpoint itself reads both lists from its config.json.
    "phi-3-medium-128k-instruct": dict(_PHI3_MEDIUM, **_128K, rope_long_factor=_PHI3_MEDIUM_128K_LONG),
    # https://huggingface.co/microsoft/Phi-3.5-mini-instruct/blob/main/config.json
    "phi-3.5-mini-instruct": dict(_PHI3_MINI, **_128K, rope_short_factor=_PHI35_MINI_SHORT,
                                  rope_long_factor=_PHI35_MINI_LONG),
    # https://huggingface.co/microsoft/Phi-4-mini-instruct/blob/main/config.json
    "phi-4-mini-instruct": dict(vocab_size=200064, dim=3072, n_layers=32, n_heads=24, n_kv_heads=8, ffn_dim=8192,
                                rotary_frac=0.75, tie_embeddings=True, **_128K,
                                rope_short_factor=[1.0] * 48, rope_long_factor=_PHI4_MINI_LONG,
                                bos_token_id=199999, eos_token_id=199999, pad_token_id=199999),
}
