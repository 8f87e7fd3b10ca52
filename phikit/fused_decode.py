"""The decoding step with every decoder block in one C++ call: what `generate.decode_one` runs where it can.

A small model decodes in a few milliseconds of arithmetic per token, and the eager step spends more
than that in Python: some 40 PyTorch operators per block, each dispatched from Python (SmolLM2-135M
has 30 blocks). `FusedDecode` hands the blocks' weights once to a C++ `Decoder`
(csrc/decode_step.cpp), whose `step` runs every block for the batch with the same operators in the
same order on the same kernels (qlinear, bf16_linear, decode_attention): the logits are the eager
step's to the bit (tested), only the Python between the operators is gone. The embedding, the
LongRoPE tables, the mask, the cache bookkeeping and the output layer stay in Python, once per step.

It applies (`fused_decoder(model)` returns None otherwise, and the eager step runs) when the compiled
kernels load, the model is on the CPU with a KV cache the decode kernel reads, and every block is
model.py's own with linear layers of three kinds: a QuantLinear on the fast kernel, a BF16Linear, or a
plain nn.Linear without bias. LoRA layers, the oracle kernel and other modules keep the eager step.

References: gpt-fast `generate.py` (a decode step compiled whole to cut per-token overhead); llama.cpp
`ggml_graph_compute` (the whole graph of a token built once and run by the library, not the caller).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from . import kernels
from .bf16_linear import BF16Linear
from .bf16_linear import available as bf16_available
from .model import MLP, Attention, Block, Phi3, RMSNorm, _decode_kernel
from .quantize import QuantLinear

FLOAT, BF16, QUANT = 0, 1, 2  # the kinds of linear layer csrc/decode_step.cpp runs
_NONE = torch.empty(0)  # "no tensor" to the Decoder (the scales of a float cache, the mins of symmetric codes)
_built: "weakref.WeakKeyDictionary[Phi3, FusedDecode]" = weakref.WeakKeyDictionary()  # model -> its FusedDecode


def _linear_spec(m: nn.Module):
    """(3 tensors, 4 ints) describing one linear layer to the Decoder, or None if it cannot run there."""
    if type(m) is QuantLinear and m.kernel == "auto":
        return [m.qweight, m.scales, _NONE if m.mins is None else m.mins], [QUANT, m.group_size, m.bits, m.out_features]
    if type(m) in (nn.Linear, BF16Linear) and m.bias is None and m.weight.device.type == "cpu":
        bf16 = (type(m) is BF16Linear and m.weight.dtype == torch.bfloat16 and m.in_features % 32 == 0
                and m.weight.is_contiguous() and bf16_available())
        return [m.weight, _NONE, _NONE], [BF16 if bf16 else FLOAT, 0, 0, m.out_features]
    return None


def _linears(block: Block) -> tuple[nn.Module, ...]:
    return block.self_attn.qkv_proj, block.self_attn.o_proj, block.mlp.gate_up_proj, block.mlp.down_proj


def _held(model: Phi3) -> list:
    """Every module and tensor a Decoder built from the model holds, in order (compared by identity), and
    whether each quantized layer is on the fast kernel.

    Read from the modules' own dicts: nn.Module's attribute lookup would take ~0.5 ms per step here."""
    out = []
    for block in model.layers._modules.values():
        mods = block._modules
        attn, mlp = mods["self_attn"]._modules, mods["mlp"]._modules
        out += [mods["input_layernorm"]._parameters["weight"], mods["post_attention_layernorm"]._parameters["weight"]]
        for m in (attn["qkv_proj"], attn["o_proj"], mlp["gate_up_proj"], mlp["down_proj"]):
            b = m._buffers
            out += [m, m.__dict__.get("kernel") == "auto"]  # set_kernel(model, "oracle") leaves the Decoder
            out += [t for t in (b.get("qweight"), b.get("scales"), b.get("mins"), m._parameters.get("weight"))
                    if t is not None]
    # tensors by storage and dtype, not by object: model.to(dtype) and `.data =` keep the Parameter objects
    return [(x.data_ptr(), x.dtype) if isinstance(x, torch.Tensor) else x for x in out]


class FusedDecode:
    """decode_one for one model: call(tokens (B,), input_pos (B,)) -> logits (B, V), the blocks in C++."""

    def __init__(self, model: Phi3, ext):
        weights, meta = [], []
        for block in model.layers:
            weights += [block.input_layernorm.weight, block.post_attention_layernorm.weight]
            for m in _linears(block):
                w, ints = _linear_spec(m)
                weights += w
                meta += ints
        cfg = model.cfg
        self.decoder = ext.Decoder([w.detach() for w in weights], meta, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                                   cfg.norm_eps)
        self.model = weakref.proxy(model)  # the registry's key: no reference back to it
        # what the Decoder holds: if any of these modules or tensors is replaced, the model needs a new one
        self.held = _held(model)

    def current(self, model: Phi3) -> bool:
        """Whether this Decoder still holds the model's own layers and weights (~0.1 ms for 30 blocks)."""
        held = self.held
        now = _held(model)
        return now == held

    def caches(self, row: int | None = None, B: int = 0) -> list[torch.Tensor]:
        """The cache tensors the Decoder writes, read afresh each step (from the buffers' dicts: ~20 us for 30
        blocks), so that nothing here keeps a removed cache alive or mistakes a new cache for an old one.
        With `row`, each is that one cache row seen B times (a stride-0 view)."""
        out = []
        for block in self.model.layers._modules.values():
            b = block._modules["self_attn"].kv_cache._buffers
            out += [b["k"], b["v"], b.get("k_scale", _NONE), b.get("v_scale", _NONE)]
        if row is not None:
            out = [t if t is _NONE else t[row:row + 1].expand(B, *t.shape[1:]) for t in out]
        return out

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor, row: int | None = None) -> torch.Tensor:
        """Logits (B, V) of tokens (B,) at positions (B,), the rows of the cache 0..B-1; or with `row`, every
        token a position of that one cache row (speculate.verify: k drafted tokens checked as k + 1 decode rows,
        each written before any attends, each attending to the slots up to its own position)."""
        model = self.model
        idx, input_pos = tokens[:, None], input_pos[:, None]  # (B, 1)
        B = idx.shape[0]
        use_long = model.rope.use_long(input_pos)
        model._check_cache_rope(input_pos, use_long, slice(0, B) if row is None else torch.full((B,), row))
        last, S = model.cache_span(input_pos, decoding=True)  # as Phi3.forward
        cos, sin = model.rope(input_pos, use_long)
        x = model.embed_tokens(idx).to(model.norm.weight.dtype)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        mask = model._mask(input_pos, S).reshape(B, S).contiguous()
        for block in model.layers:  # the decode kernel never reads the slots past each row's position
            block.self_attn.kv_cache.zero_until(last)
        x = self.decoder.step(x, cos, sin, input_pos, mask, self.caches(row, B))
        return model.lm_head(model.norm(x))[:, -1]


def fused_decoder(model: nn.Module) -> FusedDecode | None:
    """The model's FusedDecode (built on first use, rebuilt if its layers changed), or None where the eager
    step must run: see the module docstring."""
    if type(model) is not Phi3 or model.cache_rope_long is None or model.norm.weight.device.type != "cpu":
        return None
    cache = model.layers[0].self_attn.kv_cache
    if cache is None or _decode_kernel(cache.k) is None or kernels.load() is None:
        return None
    fused = _built.pop(model, None)
    if fused is not None and fused.current(model):
        _built[model] = fused
        return fused
    for block in model.layers:
        if (type(block) is not Block or type(block.self_attn) is not Attention or type(block.mlp) is not MLP
                or type(block.input_layernorm) is not RMSNorm or type(block.post_attention_layernorm) is not RMSNorm
                or any(_linear_spec(m) is None for m in _linears(block))):
            return None
    if not hasattr(kernels.load(), "Decoder"):
        return None
    _built[model] = fused = FusedDecode(model, kernels.load())
    return fused
