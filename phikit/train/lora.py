"""LoRA as a module swap: `apply_lora` wraps linear layers of a loaded model in place; model.py never knows.

A LoRALinear keeps the frozen base layer (nn.Linear, BF16Linear, or QuantLinear: LoRA over an int4 base
is QLoRA) and adds, per named adapter, a rank-r update (Hu et al., 2021, arXiv 2106.09685):

    y = base(x) + B(A(dropout(x))) * scaling,   A: (r, in), B: (out, r), scaling = alpha / r

or alpha / sqrt(r) with rsLoRA (Kalajievski, 2023, arXiv 2312.03732). A starts as nn.Linear's default
(kaiming uniform, a = sqrt(5)) and B at zero, so a new adapter leaves the model's output unchanged (PEFT's
default init). Containers and names follow PEFT's `lora.Linear` (`base_layer`, `lora_A[name]`, `lora_B[name]`,
`lora_dropout[name]`, `scaling[name]`), so a state dict reads like PEFT's and adapters.py maps it to PEFT's
files by a prefix.

Which adapter applies is chosen per layer by `active` (set model-wide with set_active), switched off by
`disabled(model)` (the DPO reference model without a second copy), or per batch row by
`set_row_adapters(model, names)`: a server decoding requests for different adapters in one batch.

phikit's model keeps q/k/v and gate/up fused (`qkv_proj`, `gate_up_proj`). A split target name ("q_proj",
"gate_proj"...) is accepted when all parts of its fused layer are named ("q_proj", "k_proj", "v_proj"):
the fused layer is then adapted as a whole, i.e. the same projections with one A shared by the parts (rank r
for all three, where split LoRA has r for each). A partial set ("q_proj", "v_proj") is refused: the fused
matmul cannot train q and v without k, and adapting k silently would train what the user excluded. A
q/v-only adapter trained elsewhere still loads exactly (adapters.py fuses it with zero k rows).

References: PEFT `tuners/lora/layer.py` (Linear, _mixed_batch_forward) and `tuners/lora/model.py`;
mlx-lm `tuner/lora.py` (from_base, fuse); ../shared/STYLE.md section 9.
Known limitation: row adapters index the batch in Python, for eager serving (not for torch.compile graphs).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..bf16_linear import BF16Linear
from ..quantize import QuantLinear

LINEAR_TYPES = (nn.Linear, QuantLinear)  # nn.Linear includes BF16Linear, its subclass
# split (Llama-style) names -> the fused layer phikit computes them in, in its row order
FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
         "up_proj": "gate_up_proj"}
PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class LoRALinear(nn.Module):
    """A frozen linear layer plus named low-rank adapters; the one in use is `active` (None: the base alone)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if not isinstance(base_layer, LINEAR_TYPES):
            raise TypeError(f"LoRA wraps nn.Linear or QuantLinear layers, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.alpha: dict[str, float] = {}   # as configured (written to adapter_config.json)
        self.rslora: dict[str, bool] = {}
        self.active: str | None = None
        self.disabled = False               # disabled(model): base only, whatever is active
        # set_row_adapters: [(adapter name, row indices or None for all rows)], shared by all layers
        self.row_groups: list[tuple[str, torch.Tensor | None]] | None = None
        self.row_count: int | None = None

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                    name: str = "default") -> "LoRALinear":
        m = cls(linear)
        m.add_adapter(name, r, alpha, dropout, rslora)
        m.active = name
        return m

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:
        """A new adapter of rank r: A kaiming-uniform (a = sqrt(5)), B zero, float32 on the base's device."""
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got r={r}")
        if name in self.lora_A:
            raise ValueError(f"this layer already has an adapter named {name!r}")
        device = _device(self.base_layer)
        # float32 adapters whatever the base dtype: they are what trains (forward casts them to x's dtype)
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.alpha[name], self.rslora[name] = alpha, rslora
        self.scaling[name] = alpha / math.sqrt(r) if rslora else alpha / r

    def delete_adapter(self, name: str) -> None:
        for d in (self.lora_A, self.lora_B, self.lora_dropout, self.scaling, self.alpha, self.rslora):
            del d[name]
        if self.active == name:
            self.active = None

    def delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """B(A(dropout(x))) * scaling, computed in x's dtype (under autocast: autocast's)."""
        h = self.lora_dropout[name](x)
        # the float32 adapter weights are cast to x's dtype (a no-op in float32); autograd reaches them through .to
        h = F.linear(h, self.lora_A[name].weight.to(h.dtype))
        return F.linear(h, self.lora_B[name].weight.to(h.dtype)) * self.scaling[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.disabled:
            return y
        if self.row_groups is not None:  # row i of the batch uses its own adapter (None: the base)
            if x.shape[0] != self.row_count:  # else each row would get another row's adapter
                raise ValueError(f"set_row_adapters named {self.row_count} rows, but the batch has {x.shape[0]}")
            for name, rows in self.row_groups:
                if name not in self.lora_A:
                    continue  # an adapter that does not target this layer: base output for its rows
                if rows is None:  # every row: no indexing
                    y = y + self.delta(x, name).to(y.dtype)
                else:
                    y = y.index_add(0, rows, self.delta(x[rows], name).to(y.dtype))
            return y
        if self.active is not None and self.active in self.lora_A:
            y = y + self.delta(x, self.active).to(y.dtype)
        return y

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={a.out_features}" for n, a in self.lora_A.items())
        return f"adapters={{{ranks}}}, active={self.active!r}"


def _device(module: nn.Module) -> torch.device:
    t = next(iter(module.parameters()), None)
    if t is None:
        t = next(iter(module.buffers()))  # a QuantLinear holds buffers only
    return t.device


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(module name, LoRALinear) for every wrapped layer."""
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def adapter_names(model: nn.Module) -> list[str]:
    """The adapters any layer of the model has, in the order they were added."""
    names: dict[str, None] = {}
    for _, layer in lora_layers(model):
        names.update(dict.fromkeys(layer.lora_A))
    return list(names)


def _check_name(model: nn.Module, name: str | None) -> None:
    if name is not None and name not in adapter_names(model):
        have = adapter_names(model)
        raise ValueError(f"no adapter named {name!r} on this model (it has: {', '.join(have) if have else 'none'})")


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def resolve_targets(model: nn.Module, targets: str | list[str]) -> list[str]:
    """The module names of the linear layers `targets` selects (see apply_lora)."""
    linear = {name: m.base_layer if isinstance(m, LoRALinear) else m for name, m in model.named_modules()
              if isinstance(m, (LoRALinear, *LINEAR_TYPES)) and ".base_layer" not in name and ".lora_" not in name}
    if isinstance(targets, str):
        if targets != "all-linear":
            targets = [targets]
        else:  # as PEFT's "all-linear": every linear layer of the decoder blocks, not the output head
            return [n for n in linear if n.startswith("layers.")]
    wanted = _fuse_split_targets(list(targets))
    chosen = []
    for t in wanted:
        hits = [n for n in linear if n == t or n.endswith("." + t)]
        if not hits:
            leaves = sorted({n.rpartition(".")[2] for n in linear})
            raise ValueError(f"target {t!r} matches no linear layer of the model (its linear layers: "
                             f"{', '.join(leaves)})")
        chosen += [n for n in hits if n not in chosen]
    return [n for n in linear if n in chosen]  # model order


def _fuse_split_targets(targets: list[str]) -> list[str]:
    """Split names -> their fused layer, when all parts are named; a partial set is refused (module docstring)."""
    out, seen = [], {}
    for t in targets:
        prefix, _, leaf = t.rpartition(".")
        if leaf in FUSED:
            seen.setdefault((prefix, FUSED[leaf]), set()).add(leaf)
        elif t not in out:
            out.append(t)
    for (prefix, fused), parts in seen.items():
        missing = [p for p in PARTS[fused] if p not in parts]
        if missing:
            named = ", ".join(p for p in PARTS[fused] if p in parts)
            raise ValueError(
                f"target {named} names part of the fused layer {fused}: phikit computes "
                f"{'/'.join(PARTS[fused])} in one matmul, so it adapts all of them or none. Target {fused!r} "
                f"(or all of {', '.join(PARTS[fused])}); an adapter trained elsewhere on {named} alone still "
                "loads exactly with load_adapter")
        name = f"{prefix}.{fused}" if prefix else fused
        if name not in out:
            out.append(name)
    return out


def apply_lora(model: nn.Module, targets: str | list[str] = "all-linear", r: int = 8, alpha: float = 16,
               dropout: float = 0.0, rslora: bool = False, name: str = "default") -> list[str]:
    """Wrap the targeted linear layers in LoRALinear (in place), add adapter `name`, make it active, and
    freeze every parameter that is not a LoRA parameter; returns the wrapped module names.

    targets: "all-linear" (every linear layer of the decoder blocks, lm_head excluded, as PEFT), or module
    names or suffixes ("qkv_proj", "o_proj", "lm_head", "layers.0.mlp.down_proj"); split names map to the
    fused layers as the module docstring says. Layers already wrapped get the new adapter added.
    """
    names = resolve_targets(model, targets)
    if r <= 0:
        raise ValueError(f"LoRA rank must be positive, got r={r}")
    clash = [n for n in names if name in getattr(model.get_submodule(n), "lora_A", {})]
    if clash:  # checked before any layer changes
        raise ValueError(f"{clash[0]} already has an adapter named {name!r}; give the new one another name")
    for n in names:
        m = model.get_submodule(n)
        if not isinstance(m, LoRALinear):
            m = LoRALinear(m)
            _set(model, n, m)
        m.add_adapter(name, r, alpha, dropout, rslora)
    set_active(model, name)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)
    return names


def cast_frozen_linears(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Store the frozen float32 weights of linear layers in dtype, in place; returns how many.

    For LoRA under bf16 autocast: autocast rounds a float32 weight to bf16 for every matmul it enters
    (forward, and the backward's input gradient), and it caches no cast of a weight that does not
    require grad, so a frozen base is cast again on every use. Stored in bf16 once, the matmuls see the
    same bf16 numbers, with half the memory and none of the per-step casts. Norms and the embedding
    table keep their dtype (autocast does not cast them either; an output layer tied to the embedding is
    therefore left alone, or the embedding would be rounded too), but are copied out of the checkpoint's
    memory map when any weight was cast: the map, and with it the float32 pages of every cast weight,
    stays resident as long as one tensor still points into it (measured on a 334M-parameter float32
    checkpoint: 2.06 GiB after the cast without the copy, 0.93 GiB with it).
    """
    n = 0
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for m in model.modules():
        if type(m) in (nn.Linear, BF16Linear) and not m.weight.requires_grad and m.weight.dtype == torch.float32 \
                and id(m.weight) not in embeddings:
            m.weight.data = m.weight.data.to(dtype)
            n += 1
    if n:
        for p in model.parameters():
            if not p.requires_grad and p.dtype == torch.float32:
                p.data = p.data.clone()
    return n


def lora_parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """The A and B weights of adapter `name` (default: of every adapter), e.g. for the optimizer."""
    out = []
    for _, layer in lora_layers(model):
        for n in layer.lora_A:
            if name is None or n == name:
                out += [layer.lora_A[n].weight, layer.lora_B[n].weight]
    return out


def lora_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter `name`'s weights by phikit module name, without the adapter name (as PEFT saves them):
    `layers.0.self_attn.qkv_proj.lora_A.weight` (r, in) and `...lora_B.weight` (out, r)."""
    _check_name(model, name)
    out = {}
    for n, layer in lora_layers(model):
        if name in layer.lora_A:
            out[f"{n}.lora_A.weight"] = layer.lora_A[name].weight.detach()
            out[f"{n}.lora_B.weight"] = layer.lora_B[name].weight.detach()
    return out


def set_active(model: nn.Module, name: str | None) -> None:
    """Use adapter `name` in every layer that has it (None: the base model); clears row adapters."""
    _check_name(model, name)
    for _, layer in lora_layers(model):
        layer.active, layer.row_groups, layer.row_count = name, None, None


def set_row_adapters(model: nn.Module, names: list[str | None] | None) -> None:
    """Row i of the next batches uses adapter names[i] (None: the base); names=None goes back to `active`.

    Each distinct adapter runs once, on its rows only (the index tensors are built here, once for all
    layers). The batch must have len(names) rows.
    """
    if names is None:
        groups = None
    else:
        for n in set(names):
            _check_name(model, n)
        device = next(model.parameters()).device
        groups = []
        for n in dict.fromkeys(names):
            if n is None:
                continue
            rows = [i for i, m in enumerate(names) if m == n]
            groups.append((n, None if len(rows) == len(names) else torch.tensor(rows, device=device)))
    count = None if names is None else len(names)
    for _, layer in lora_layers(model):
        layer.row_groups, layer.row_count = groups, count


@contextmanager
def disabled(model: nn.Module):
    """Within the block every LoRA layer computes its base alone (e.g. the DPO reference model)."""
    layers = [layer for _, layer in lora_layers(model)]
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, before):
            layer.disabled = was


@torch.no_grad()
def merge_lora(model: nn.Module, name: str = "default") -> nn.Module:
    """Fold adapter `name` into its base layers, in place: W + scaling * B @ A, computed in float32 (float64
    for a float64 base) and rounded once to the base dtype. A layer left without adapters becomes its plain
    base layer again (nn.Linear / BF16Linear); one with other adapters keeps them, over the merged base.

    A quantized base (QuantLinear) is refused: merging into int4 codes would requantize and lose the
    update's precision; merge into the float checkpoint, then quantize the result.
    """
    _check_name(model, name)
    layers = [(n, layer) for n, layer in lora_layers(model) if name in layer.lora_A]
    for n, layer in layers:
        if isinstance(layer.base_layer, QuantLinear):
            raise ValueError(f"{n} is quantized ({layer.base_layer.bits}-bit): an adapter cannot be merged into "
                             "quantized weights; merge it into the float checkpoint (`phikit lora merge --model "
                             "FLOAT_CHECKPOINT`) and quantize the result")
    for n, layer in layers:
        base = layer.base_layer
        w = base.weight
        dtype = torch.promote_types(w.dtype, torch.float32)  # float32 at least (float64 stays float64)
        A, B = layer.lora_A[name].weight.to(dtype), layer.lora_B[name].weight.to(dtype)
        merged = w.to(dtype) + layer.scaling[name] * (B @ A)
        if n == "lm_head" and getattr(model, "cfg", None) is not None and model.cfg.tie_embeddings:
            model.cfg.tie_embeddings = False  # the merged head differs from the embedding: save it on its own
        base.weight = nn.Parameter(merged.to(w.dtype), requires_grad=w.requires_grad)  # a new tensor: unties
        layer.delete_adapter(name)
        if not layer.lora_A:
            _set(model, n, base)
    return model
