"""LoRA adapters in PEFT's file format, for phikit's fused model: read, load, save, convert fused <-> split.

An adapter directory holds `adapter_config.json` (PEFT's LoraConfig) and `adapter_model.safetensors`, one
pair of tensors per adapted module, under the module's name in the transformers model:

    base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight   (r, in)     Phi3ForCausalLM
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight     (out, r)    LlamaForCausalLM
    base_model.model.lm_head.lora_A.weight                             (the head, when targeted)

(PEFT's PeftModel wraps the transformers model as `base_model.model`, and drops the adapter name on save.)
The scaling is lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora, per module with `rank_pattern` /
`alpha_pattern` (keys: a module-name suffix or regex, matched as PEFT's get_pattern_key does).

phikit's model is always fused (qkv_proj, gate_up_proj); transformers' Llama is split (q/k/v_proj,
gate/up_proj). Both layouts load onto either kind of model, exactly:
- split -> fused: A stacked, B block-diagonal, rank summed. A part the adapter lacks (a q/v-only adapter)
  gets zero rows of B. Parts with another scaling than the first part's have the ratio folded into their
  block of B (one rounding); the fused layer's alpha is chosen to give the first part's scaling. Parts that
  share one A and one scaling (an adapter split from a fused one) fuse back to that A and B stacked.
- fused -> split: each part keeps the shared A and its rows of B, same scaling. Columns of a part's B that
  are zero contribute nothing and are dropped with their rows of A (a part that is all zero is omitted),
  so an adapter fused from a split one splits back to its parts; a B that is zero everywhere (untrained)
  is written whole. The new ranks and their alphas (same scaling) go into rank_pattern / alpha_pattern.
Saving picks the layout of the transformers class of the base (`layout="auto"`: fused for Phi-3, split for
Llama), so PEFT on transformers loads what phikit writes; the other layout loads in phikit only (PEFT finds
no q_proj in Phi3ForCausalLM, no qkv_proj in LlamaForCausalLM). Pickle files are refused.
Known limitations: LoRA on linear layers only; DoRA and the other variants, modules_to_save, trained biases,
embedding LoRA and inits that modify the base (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) are refused by name.

References: PEFT `utils/save_and_load.py` (get_peft_model_state_dict, set_peft_model_state_dict),
`tuners/lora/config.py` (LoraConfig), `tuners/lora/model.py` (_create_and_replace, rank/alpha patterns).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..checkpoint import replaced_dir
from ..config import Config
from ..tokenizer import SIDE_FILES
from .lora import FUSED, LINEAR_TYPES, PARTS, LoRALinear, adapter_names, lora_layers, set_active

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
# LoraConfig fields that change the math beyond B A x * scaling (or need weights phikit does not keep)
_VARIANTS = ("use_dora", "use_qalora", "use_bdlora", "alora_invocation_tokens", "arrow_config", "velora_config",
             "monteclora_config", "kasa_config", "layer_replication", "target_parameters", "trainable_token_indices",
             "lora_bias", "fan_in_fan_out")
# inits that leave the base weights alone; PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA change them (train against
# a modified base) unless PEFT converted the adapter back to plain LoRA on save
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")


class AdapterError(ValueError):
    """An adapter that cannot be read or applied; the one-line message names the file or tensor."""


@dataclass
class _Lora:
    """One adapted module: A (r, in), B (out, r), the scaling phikit applies, and the lora_alpha that gives
    it with this rank (for the file); `source` names its tensor for error messages."""
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    alpha: float
    source: str


# ---- reading --------------------------------------------------------------------------------------

def read_adapter(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, tensors by name), validated: LoRA only, no variant phikit lacks."""
    d = Path(directory)
    if not d.is_dir():
        raise AdapterError(f"{d}: no such adapter directory")
    cfg_path = d / CONFIG_FILE
    if not cfg_path.exists():
        raise AdapterError(f"{d} has no {CONFIG_FILE} (not a PEFT adapter directory)")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{cfg_path} must hold a JSON object")
    peft_type = config.get("peft_type")
    if str(peft_type).upper() != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type {peft_type!r} is not LORA; phikit loads LoRA adapters only")
    problem = _unsupported(config)
    if problem:
        raise AdapterError(f"{cfg_path}: {problem}")
    weights = d / WEIGHTS_FILE
    if not weights.exists():
        pickles = sorted(p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
        if pickles:
            raise AdapterError(
                f"{d} holds only pickle weights ({', '.join(pickles)}); phikit reads {WEIGHTS_FILE} only, because "
                "unpickling a file can run arbitrary code. Convert once with PEFT: PeftModel.from_pretrained(BASE, "
                "DIR).save_pretrained(OUT_DIR, safe_serialization=True)")
        raise AdapterError(f"{d} has no {WEIGHTS_FILE}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{weights} is not a readable safetensors file (truncated or corrupt?): "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not tensors:
        raise AdapterError(f"{weights} holds no tensors")
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise AdapterError(f"tensor {name!r} in {weights.name} has dtype {t.dtype}, expected a float type")
    return config, tensors


def _unsupported(config: dict) -> str | None:
    """Why phikit cannot apply this LoRA config exactly, or None."""
    for f in _VARIANTS:
        if config.get(f):
            what = "DoRA (use_dora)" if f == "use_dora" else f
            return f"{what} is set: a LoRA variant phikit does not implement (plain LoRA only)"
    if config.get("modules_to_save"):
        return (f"modules_to_save {config['modules_to_save']} (fully trained copies of base layers) is not "
                "supported; phikit applies lora_A/lora_B pairs only")
    if config.get("bias", "none") != "none":
        return f"bias {config['bias']!r} (trained biases) is not supported; phikit reads bias 'none' only"
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        return (f"init_lora_weights {init!r} trains against modified base weights; convert it to plain LoRA with "
                "PEFT (save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    return None


def adapter_base(directory: str | os.PathLike) -> str:
    """The adapter's base model: base_model_name_or_path, a relative path resolved against the adapter
    directory first (then the working directory); otherwise it is returned as is (a hub id)."""
    d = Path(directory)
    try:
        base = json.loads((d / CONFIG_FILE).read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise AdapterError(f"cannot read {d / CONFIG_FILE}: {e}") from None
    if not base:
        raise AdapterError(f"{d / CONFIG_FILE} names no base_model_name_or_path; name the base model explicitly")
    p = Path(base).expanduser()
    if not p.is_absolute() and (d / p).exists():
        return str((d / p).resolve())
    return str(p) if p.exists() else base


def _hf_module(name: str) -> str:
    """phikit module name -> the transformers one (lm_head sits outside `model.`)."""
    return name if name == "lm_head" else "model." + name


def _pattern(patterns: dict | None, hf_name: str, default):
    """PEFT's get_pattern_key: the first key that is the module name's suffix (as a regex)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", hf_name):
            return value
    return default


def _entries(config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, _Lora]:
    """phikit-style module name ("layers.0.self_attn.q_proj", "lm_head") -> its _Lora, from a PEFT file."""
    pairs: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(re.escape(PEFT_PREFIX) + r"(.+)\.lora_([AB])\.weight", key)
        if m is None:
            raise AdapterError(f"unexpected tensor {key!r} in {WEIGHTS_FILE} (phikit reads LoRA's lora_A/lora_B "
                               "weights of linear layers only)")
        hf_name, which = m.groups()
        if hf_name != "lm_head" and not hf_name.startswith("model."):
            raise AdapterError(f"tensor {key!r} in {WEIGHTS_FILE} names {hf_name}, not a module of a causal LM")
        if t.dim() != 2:
            raise AdapterError(f"tensor {key!r} in {WEIGHTS_FILE} has shape {tuple(t.shape)}, expected a matrix")
        pairs.setdefault(hf_name, {})[which] = (key, t)
    rslora = bool(config.get("use_rslora", False))
    out = {}
    for hf_name, ab in pairs.items():
        for which, other in (("A", "B"), ("B", "A")):
            if which not in ab:
                raise AdapterError(f"tensor {ab[other][0]!r} in {WEIGHTS_FILE} has no lora_{which} partner")
        (a_key, A), (b_key, B) = ab["A"], ab["B"]
        r = A.shape[0]
        if B.shape[1] != r:
            raise AdapterError(f"tensor {b_key!r} has shape {tuple(B.shape)}, but its lora_A has rank {r} "
                               f"(shape {tuple(A.shape)})")
        want_r = _pattern(config.get("rank_pattern"), hf_name, config.get("r", 8))
        if want_r != r:
            raise AdapterError(f"tensor {a_key!r} has rank {r} (shape {tuple(A.shape)}), but {CONFIG_FILE} gives "
                               f"r={want_r} for {hf_name}")
        alpha = _pattern(config.get("alpha_pattern"), hf_name, config.get("lora_alpha", 8))
        scaling = alpha / math.sqrt(r) if rslora else alpha / r
        name = hf_name if hf_name == "lm_head" else hf_name.removeprefix("model.")
        out[name] = _Lora(A.float(), B.float(), scaling, alpha, a_key.removesuffix(".lora_A.weight"))
    return out


# ---- fused <-> split ------------------------------------------------------------------------------

def _part_rows(cfg: Config, fused: str) -> list[int]:
    """Output rows of each part of a fused layer, in its row order ([q | k | v], [gate | up])."""
    if fused == "qkv_proj":
        return [cfg.n_heads * cfg.head_dim] + [cfg.n_kv_heads * cfg.head_dim] * 2
    return [cfg.ffn_dim, cfg.ffn_dim]


def _alpha_for(scaling: float, r: int, rslora: bool) -> float:
    """The lora_alpha that gives `scaling` at rank r."""
    return scaling * (math.sqrt(r) if rslora else r)


def _fuse(entries: dict[str, _Lora], cfg: Config, rslora: bool) -> dict[str, _Lora]:
    """Split q/k/v and gate/up entries -> one fused entry each (exact; see the module docstring)."""
    out, groups = {}, {}
    for name, e in entries.items():
        prefix, _, leaf = name.rpartition(".")
        if leaf in FUSED:
            groups.setdefault(f"{prefix}.{FUSED[leaf]}", {})[leaf] = e
        else:
            out[name] = e
    for fused, parts in groups.items():
        if fused in out:
            raise AdapterError(f"{out[fused].source} and {next(iter(parts.values())).source} adapt the same fused "
                               "layer twice (both its fused and its split names)")
        leaf = fused.rpartition(".")[2]
        rows = _part_rows(cfg, leaf)
        for p, n in zip(PARTS[leaf], rows):
            e = parts.get(p)
            if e is not None and e.A.shape[1] != cfg.dim:
                raise AdapterError(_shape_error(e, "A", (e.A.shape[0], cfg.dim)))
            if e is not None and e.B.shape[0] != n:
                raise AdapterError(_shape_error(e, "B", (n, e.B.shape[1])))
        present = [parts.get(p) for p in PARTS[leaf]]
        first = next(e for e in present if e is not None)
        s = first.scaling
        if all(e is not None and torch.equal(e.A, first.A) and e.scaling == s for e in present):
            # one shared A (an adapter split from a fused one): B stacked, the original rank
            out[fused] = _Lora(first.A, torch.cat([e.B for e in present]), s, first.alpha, first.source)
            continue
        r_total = sum(e.A.shape[0] for e in present if e is not None)
        B = torch.zeros(sum(rows), r_total)
        row = col = 0
        for e, n in zip(present, rows):
            if e is not None:
                r = e.A.shape[0]
                # another part's scaling folded into its block of B, so one scaling serves the fused layer
                B[row:row + n, col:col + r] = e.B if e.scaling == s else e.B * (e.scaling / s)
                col += r
            row += n
        A = torch.cat([e.A for e in present if e is not None])
        out[fused] = _Lora(A, B, s, _alpha_for(s, r_total, rslora), first.source)
    return out


def _split(entries: dict[str, _Lora], cfg: Config, rslora: bool) -> dict[str, _Lora]:
    """Fused qkv_proj / gate_up_proj entries -> their parts (exact; see the module docstring)."""
    out = {}
    for name, e in entries.items():
        prefix, _, leaf = name.rpartition(".")
        if leaf not in PARTS:
            out[name] = e
            continue
        untrained = not bool(e.B.any())
        row = 0
        for part, n in zip(PARTS[leaf], _part_rows(cfg, leaf)):
            B = e.B[row:row + n]
            row += n
            cols = torch.arange(B.shape[1]) if untrained else B.any(dim=0).nonzero()[:, 0]
            if len(cols) == 0:
                continue  # this part's rows of B are all zero: it adds nothing
            r = len(cols)
            alpha = e.alpha if r == e.A.shape[0] else _alpha_for(e.scaling, r, rslora)
            out[f"{prefix}.{part}"] = _Lora(e.A[cols].clone(), B[:, cols].clone(), e.scaling, alpha, e.source)
    return out


def _check_shapes(entries: dict[str, _Lora], model: torch.nn.Module) -> None:
    """Each entry names a linear layer of the model, with A (r, in) and B (out, r) of its shape."""
    for name, e in entries.items():
        try:
            m = model.get_submodule(name)
        except AttributeError:
            m = None
        if isinstance(m, LoRALinear):
            m = m.base_layer
        if not isinstance(m, LINEAR_TYPES):
            raise AdapterError(f"tensor {e.source}.lora_A.weight is for {_hf_module(name)}, which is not a linear "
                               f"layer of this base model ({model.cfg.n_layers} layers, {model.cfg.model_type})")
        if e.A.shape[1] != m.in_features:
            raise AdapterError(_shape_error(e, "A", (e.A.shape[0], m.in_features)))
        if e.B.shape[0] != m.out_features:
            raise AdapterError(_shape_error(e, "B", (m.out_features, e.B.shape[1])))


def _shape_error(e: _Lora, which: str, want: tuple[int, int]) -> str:
    t = e.A if which == "A" else e.B
    return (f"tensor {e.source}.lora_{which}.weight has shape {tuple(t.shape)}, but the base model needs {want} "
            "there (an adapter for another model?)")


# ---- loading onto a model -------------------------------------------------------------------------

def load_adapter(model: torch.nn.Module, directory: str | os.PathLike, name: str = "default") -> list[str]:
    """Apply the adapter in `directory` (either layout) to a phikit model as adapter `name`, make it active,
    and freeze the non-LoRA parameters; returns the wrapped module names. Nothing changes on an error."""
    config, tensors = read_adapter(directory)
    rslora = bool(config.get("use_rslora", False))
    entries = _fuse(_entries(config, tensors), model.cfg, rslora)
    _check_shapes(entries, model)
    if name in adapter_names(model):
        raise AdapterError(f"the model already has an adapter named {name!r}; load {directory} under another name")
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    for module_name, e in entries.items():
        layer = model.get_submodule(module_name)
        if not isinstance(layer, LoRALinear):
            parent, _, leaf = module_name.rpartition(".")
            layer = LoRALinear(layer)
            setattr(model.get_submodule(parent) if parent else model, leaf, layer)
        layer.add_adapter(name, e.A.shape[0], e.alpha, dropout, rslora)
        with torch.no_grad():
            layer.lora_A[name].weight.copy_(e.A)
            layer.lora_B[name].weight.copy_(e.B)
        layer.scaling[name] = e.scaling  # exact, where alpha / r would round (fused parts)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_layers(model):
        for n in layer.lora_A:
            layer.lora_A[n].weight.requires_grad_(True)
            layer.lora_B[n].weight.requires_grad_(True)
    set_active(model, name)
    return list(entries)


# ---- writing --------------------------------------------------------------------------------------

def _compress(values: dict[str, object], n_layers: int) -> dict[str, object]:
    """{phikit module name: value} -> PEFT pattern keys: the leaf name ("qkv_proj") where every layer has it
    with one value, else the full transformers module name."""
    by_leaf: dict[str, dict[str, object]] = {}
    for name, v in values.items():
        by_leaf.setdefault(name.rpartition(".")[2], {})[name] = v
    out = {}
    for leaf, vals in by_leaf.items():
        if len(set(vals.values())) == 1 and (leaf == "lm_head" or len(vals) == n_layers):
            out[leaf] = next(iter(vals.values()))
        else:
            out.update({_hf_module(n): v for n, v in vals.items()})
    return out


def _number(x: float):
    return int(x) if float(x).is_integer() else x


def _write(entries: dict[str, _Lora], out_dir: str | os.PathLike, base_model: str | None, rslora: bool,
           dropout: float, cfg: Config, tokenizer=None, side_files_from: Path | None = None) -> Path:
    """adapter_config.json + adapter_model.safetensors in PEFT's format, written to a temporary directory
    next to out_dir and moved into place (an interrupted write leaves nothing half-written)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / CONFIG_FILE).exists())):
        raise AdapterError(f"{out} exists and is not an adapter directory; refusing to replace it")
    ranks = {n: e.A.shape[0] for n, e in entries.items()}
    alphas = {n: _number(e.alpha) for n, e in entries.items()}
    r, alpha = Counter(zip(ranks.values(), alphas.values())).most_common(1)[0][0]
    targets = _compress(dict.fromkeys(entries, True), cfg.n_layers)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "revision": None,
        "inference_mode": True, "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
        "target_modules": sorted(targets), "use_rslora": rslora, "bias": "none", "fan_in_fan_out": False,
        "rank_pattern": _compress({n: v for n, v in ranks.items() if v != r}, cfg.n_layers),
        "alpha_pattern": _compress({n: v for n, v in alphas.items() if v != alpha}, cfg.n_layers),
        "modules_to_save": None, "init_lora_weights": True, "use_dora": False, "lora_bias": False,
        "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
    }
    tensors = {}
    for n, e in entries.items():
        key = PEFT_PREFIX + _hf_module(n)
        tensors[key + ".lora_A.weight"] = e.A.detach().contiguous().clone()  # clone: split parts share one A
        tensors[key + ".lora_B.weight"] = e.B.detach().contiguous().clone()
    with replaced_dir(out) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
        elif side_files_from is not None:
            for f in SIDE_FILES:
                if (side_files_from / f).exists():
                    shutil.copy2(side_files_from / f, tmp / f)
    return out


def _layout(layout: str, cfg: Config) -> str:
    if layout == "auto":
        return "split" if cfg.model_type == "llama" else "fused"  # the names transformers' class uses
    if layout not in ("fused", "split"):
        raise ValueError(f"layout must be auto, fused or split, got {layout!r}")
    return layout


def save_adapter(model: torch.nn.Module, out_dir: str | os.PathLike, base_model: str, name: str = "default",
                 layout: str = "auto", tokenizer=None) -> Path:
    """Write adapter `name` as a PEFT adapter directory naming `base_model` (hub id or path), in the layout
    of the base's transformers class (auto: fused for Phi-3, split for Llama) or the one asked for."""
    layout = _layout(layout, model.cfg)
    entries, dropouts, flags = {}, [], []
    for n, layer in lora_layers(model):
        if name in layer.lora_A:
            entries[n] = _Lora(layer.lora_A[name].weight.detach().float(), layer.lora_B[name].weight.detach().float(),
                               layer.scaling[name], layer.alpha[name], n)
            dropouts.append(getattr(layer.lora_dropout[name], "p", 0.0))
            flags.append(layer.rslora[name])
    if not entries:
        raise AdapterError(f"the model has no adapter named {name!r}")
    rslora = Counter(flags).most_common(1)[0][0]
    for n, e in entries.items():  # a layer whose rsLoRA flag differs keeps its scaling through its alpha
        if model.get_submodule(n).rslora[name] != rslora:
            e.alpha = _alpha_for(e.scaling, e.A.shape[0], rslora)
    if layout == "split":
        entries = _split(entries, model.cfg, rslora)
    return _write(entries, out_dir, base_model, rslora, max(dropouts), model.cfg, tokenizer)


def convert_adapter(src_dir: str | os.PathLike, out_dir: str | os.PathLike, to: str, cfg: Config) -> Path:
    """Rewrite an adapter in the "split" (q/k/v_proj, gate/up_proj) or "fused" (qkv_proj, gate_up_proj)
    layout for the base model of config `cfg`, exactly; tokenizer files in src_dir are copied along."""
    from ..model import Phi3

    layout = _layout(to, cfg)
    config, tensors = read_adapter(src_dir)
    rslora = bool(config.get("use_rslora", False))
    entries = _fuse(_entries(config, tensors), cfg, rslora)
    _check_shapes(entries, Phi3.empty(cfg))  # the structure on the meta device: names and shapes only
    if layout == "split":
        entries = _split(entries, cfg, rslora)
    return _write(entries, out_dir, config.get("base_model_name_or_path"), rslora,
                  float(config.get("lora_dropout", 0.0) or 0.0), cfg, side_files_from=Path(src_dir))
