"""GGUF files (llama.cpp, Ollama) <-> phikit: import `phi3` and `llama` models, export any model.

Reading goes through gguf_reader.py (the metadata in one pass: 0.06 s for the demo file where gguf-py's
GGUFReader takes 2.2 s), writing and the block arithmetic through the `gguf` library (llama.cpp's own
gguf-py). Import maps GGUF tensor
names to ours, rebuilds the Config from the `<arch>.*` metadata (LongRoPE factors come from the
`rope_factors_long/short` tensors) and the tokenizer from `tokenizer.ggml.*`. Tensors (F32, F16, BF16,
Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K are read) are, by default, kept as they are where phikit has
the same format: Q4_0 / Q4_1 / Q8_0 blocks of 32 are phikit's int4 symmetric, int4 asymmetric and int8
codes with group 32 and fp16 scales, repacked into QuantLinear / QuantEmbedding tiles (see load_gguf);
the rest is dequantized to float32. With an explicit dtype every tensor is dequantized to it.

Measured on the demo SmolLM2-135M Q4_1 file (2 cores): peak RSS of a process that loads it and decodes
16 tokens 0.42 GiB kept as it is, 0.86 GiB dequantized to float32 (llama.cpp: 0.21 GB; PyTorch's import
alone: 0.22 GiB); the repacking takes 0.3 s.

Two layout facts matter (../shared/reference/phi-family.md section 9.2):
- ggml lists dimensions innermost first, so a ggml {in, out} tensor is a torch [out, in] matrix.
- llama.cpp's converter permutes the rows of Llama's attn_q / attn_k within each head from HF's
  rotate-half order [x_0 .. x_{D/2-1} | x_{D/2} .. x_{D-1}] to the interleaved order
  [x_0, x_{D/2}, x_1, x_{D/2+1}, ...] that its non-NEOX rope expects. We undo that on import and
  redo it on export. Phi-3 uses NEOX rope in llama.cpp, so its fused attn_qkv is stored as is.

References: gguf-py (`gguf_reader.py`, `gguf_writer.py`, `quants.py`, `constants.py`); llama.cpp
`convert_hf_to_gguf.py` (`LlamaModel.permute`, `Phi3MiniModel`); transformers
`modeling_gguf_pytorch_utils.py` (reverse permutation).
"""

from __future__ import annotations

import math
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .bf16_linear import use_bf16_kernel
from .config import Config
from .memory import check_weights
from .model import Phi3
from .quantize import FORMAT, QuantEmbedding, QuantLinear, QuantTensor, dequantize, pack_codes, storage_bytes, unpack, \
    untile_groups

SUPPORTED_ARCHS = ("phi3", "llama")
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K")
FLOAT_TYPES = ("F32", "F16", "BF16")
NATIVE = {"Q4_0": (4, True), "Q4_1": (4, False), "Q8_0": (8, True)}  # kept quantized: (bits, symmetric) of the layer
GROUP = 32  # values per block of these types, and so the layers' group size


class GGUFError(ValueError):
    """A GGUF file phikit cannot use; the message names what is unsupported or broken."""


def _reader(path: Path):
    from .gguf_reader import GGUFFile, GGUFFormatError

    try:
        return GGUFFile(path)
    except (GGUFFormatError, OSError) as e:
        raise GGUFError(f"{path} is not a readable GGUF file: {e}") from None


def _field(reader, key: str, default=None):
    return reader.fields.get(key, default)


def _permute_rows(w: torch.Tensor, n_heads: int, inverse: bool) -> torch.Tensor:
    """llama.cpp's per-head row interleave of attn_q / attn_k (inverse=True undoes it)."""
    out, rest = w.shape[0], w.shape[1:]
    half = out // n_heads // 2
    if inverse:  # GGUF rows per head: pairs (x_i, x_{i+D/2}) -> HF halves
        return w.reshape(n_heads, half, 2, *rest).transpose(1, 2).reshape(out, *rest)
    return w.reshape(n_heads, 2, half, *rest).transpose(1, 2).reshape(out, *rest)


def config_from_gguf(reader, path: Path) -> Config:
    arch = _field(reader, "general.architecture")
    if arch is None:
        raise GGUFError(f"{path} has no general.architecture metadata")
    if arch not in SUPPORTED_ARCHS:
        raise GGUFError(f"unsupported GGUF architecture {arch!r} in {path} (phikit reads: {', '.join(SUPPORTED_ARCHS)})")

    def need(key):
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise GGUFError(f"{path} is missing the metadata field {arch}.{key}")
        return v

    dim, n_heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", dim // n_heads))
    rot = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    tensors = {t.name: t for t in reader.tensors}
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens is not None else int(tensors["token_embd.weight"].shape[1])
    if _field(reader, f"{arch}.rope.scaling.type", "none") not in ("none", "longrope") or "rope_freqs.weight" in tensors:
        raise GGUFError(f"{path}: unsupported rope scaling ({_field(reader, f'{arch}.rope.scaling.type', 'rope_freqs')})")
    kw = dict(
        model_type=arch, vocab_size=vocab, dim=dim, n_layers=int(need("block_count")), n_heads=n_heads,
        n_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", n_heads)),
        ffn_dim=int(need("feed_forward_length")), head_dim=head_dim, rotary_frac=rot / head_dim,
        norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        max_seq_len=int(need("context_length")), tie_embeddings="output.weight" not in tensors,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        sliding_window=int(_field(reader, f"{arch}.attention.sliding_window", 0)) or None,
        torch_dtype="float32",
    )
    kw["original_max_seq_len"] = int(_field(reader, f"{arch}.rope.scaling.original_context_length", kw["max_seq_len"]))
    if "rope_factors_long.weight" in tensors:  # LongRoPE: the factor lists travel as F32 tensors
        kw["rope_long_factor"] = _tensor(tensors["rope_factors_long.weight"]).tolist()
        kw["rope_short_factor"] = _tensor(tensors["rope_factors_short.weight"]).tolist()
        attn_factor = _field(reader, f"{arch}.rope.scaling.attn_factor")
        if attn_factor is not None:
            kw["rope_short_mscale"] = kw["rope_long_mscale"] = float(attn_factor)
    return Config(**kw)


def _read(f, t) -> np.ndarray:
    """Tensor t's bytes read from the open file f into fresh memory, shaped as the reader's `t.data` view.

    Read, not memory-mapped: every page of a map that is touched stays resident while the map lives,
    which would add the file's size to the peak RSS of a load.
    """
    out = np.empty(t.data.shape, t.data.dtype)
    f.seek(t.data_offset)
    if f.readinto(out.reshape(-1).view(np.uint8)) != out.nbytes:
        raise GGUFError(f"tensor {t.name!r} is cut short (a truncated file?)")
    return out


def _tensor(t, data: np.ndarray | None = None) -> torch.Tensor:
    """A GGUF tensor as float32 torch, in torch's [out, in] order (data: its bytes, default the reader's map)."""
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType(t.tensor_type)
    if qtype.name not in SUPPORTED_TYPES:
        raise GGUFError(f"tensor {t.name!r} has type {qtype.name}, which phikit does not read "
                        f"(supported: {', '.join(SUPPORTED_TYPES)})")
    data = np.asarray(t.data) if data is None else data
    if qtype.name not in ("F32", "F16"):
        data = quants.dequantize(data, qtype)  # also BF16: numpy has no bfloat16
    shape = tuple(int(x) for x in reversed(t.shape))  # ggml's innermost-first dims -> torch order
    return torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))  # a copy: the file is read-only


def _codes(qtype: str, data: np.ndarray, shape: tuple[int, int]):
    """Q4_0 / Q4_1 / Q8_0 blocks (uint8 [N, K/32 * block bytes]) -> codes [N, K], scale d and min m fp16
    [N, K/32] (m None: symmetric), with w = (q - 8) d (Q4_0), q d + m (Q4_1), q d (Q8_0): the codes and
    scales of a phikit layer as they are (ggml-common.h block_q4_0 / block_q4_1 / block_q8_0)."""
    N, K = shape
    b = torch.from_numpy(data).view(N, K // GROUP, -1)           # [N, blocks, bytes of a block]
    d = b[..., :2].contiguous().view(torch.float16)[..., 0]       # fp16 d first in every block
    if qtype == "Q8_0":                                           # then 32 int8 codes
        return b[..., 2:].contiguous().view(torch.int8).reshape(N, K), d, None
    m = b[..., 2:4].contiguous().view(torch.float16)[..., 0] if qtype == "Q4_1" else None
    qs = b[..., -16:]  # value j of a block: low nibble of byte j (j < 16), high nibble of byte j - 16
    return torch.stack((qs & 15, qs >> 4), dim=2).reshape(N, K), d, m


def _blocks(qtype: str, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> np.ndarray:
    """Inverse of _codes: codes [N, K] and fp16 d (and m) [N, K/32] -> the blocks, uint8 [N, K/32 * block bytes]."""
    N, K = q.shape
    q = q.reshape(N, K // GROUP, GROUP)
    fields = [s.half()[..., None].view(torch.uint8) for s in ((d, m) if qtype == "Q4_1" else (d,))]  # fp16 bytes
    if qtype == "Q8_0":
        fields.append(q.to(torch.int8).view(torch.uint8))
    else:
        fields.append(q[..., :16] | (q[..., 16:] << 4))
    return torch.cat(fields, dim=-1).reshape(N, -1).numpy()


def _names(cfg: Config, i: int) -> dict[str, list[str]]:
    """our parameter (layer i) -> GGUF tensors stacked along rows."""
    p, b = f"layers.{i}.", f"blk.{i}."
    fused = cfg.model_type == "phi3"
    return {
        p + "input_layernorm.weight": [b + "attn_norm.weight"],
        p + "self_attn.qkv_proj.weight": [b + "attn_qkv.weight"] if fused else
        [b + "attn_q.weight", b + "attn_k.weight", b + "attn_v.weight"],
        p + "self_attn.o_proj.weight": [b + "attn_output.weight"],
        p + "post_attention_layernorm.weight": [b + "ffn_norm.weight"],
        p + "mlp.gate_up_proj.weight": [b + "ffn_up.weight"] if fused else [b + "ffn_gate.weight", b + "ffn_up.weight"],
        p + "mlp.down_proj.weight": [b + "ffn_down.weight"],
    }


def tensor_map(cfg: Config) -> dict[str, list[str]]:
    names = {"embed_tokens.weight": ["token_embd.weight"], "norm.weight": ["output_norm.weight"]}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = ["output.weight"]
    for i in range(cfg.n_layers):
        names.update(_names(cfg, i))
    return names


def _layer_type(types: list[str]) -> str | None:
    """The GGUF type a layer stored as tensors of these types is kept in, None for float.

    One type of NATIVE: kept. A fused layer of Q4_0 and Q8_0 parts: Q8_0, since a Q4_0 code q is the
    int8 code q - 8 with the same d. Any other mix (Q4_1 with Q8_0: no int8 code holds q d + m; or a part
    in a type phikit does not keep) is dequantized whole: the simple choice, and as exact.
    """
    if len(set(types)) == 1 and types[0] in NATIVE:
        return types[0]
    return "Q8_0" if set(types) == {"Q4_0", "Q8_0"} else None


def _ggml_type(layer) -> str | None:
    """The GGUF type whose blocks hold a quantized layer's codes and scales as they are (None: no such type)."""
    if not isinstance(layer, QuantTensor) or layer.group_size != GROUP:
        return None
    return next(t for t, fmt in NATIVE.items() if fmt == (layer.bits, layer.symmetric))


def _stack(cfg: Config, ours: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """The GGUF tensors that make our parameter `ours` (rows first: weights, codes or per-row scales) as one:
    llama's attn_q / attn_k rows back in HF's order, then the parts stacked along rows."""
    if cfg.model_type == "llama" and ours.endswith("qkv_proj.weight"):
        parts = [_permute_rows(parts[0], cfg.n_heads, inverse=True),
                 _permute_rows(parts[1], cfg.n_kv_heads, inverse=True), *parts[2:]]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _load_param(f, cfg: Config, ours: str, parts: list, kind: str | None, dtype: torch.dtype) -> dict:
    """Our parameter `ours` read from its GGUF tensors `parts`: {ours: weight in dtype} (kind None), or the
    buffers {qweight, scales[, mins]} of its quantized layer, repacked from blocks, the layer kept as `kind`."""
    from gguf import GGMLQuantizationType

    if kind is None:
        return {ours: _stack(cfg, ours, [_tensor(p, _read(f, p)) for p in parts]).to(dtype)}
    types = [GGMLQuantizationType(p.tensor_type).name for p in parts]
    codes = [_codes(t, _read(f, p), (int(p.shape[1]), int(p.shape[0]))) for t, p in zip(types, parts)]
    if kind == "Q8_0":  # Q4_0 parts of a Q8_0 layer: the int8 codes q - 8 with the same d
        codes = [(q.to(torch.int8) - 8, d, None) if t == "Q4_0" else (q, d, m) for t, (q, d, m) in zip(types, codes)]
    # a row permutation or concatenation of codes and per-row group scales is exact
    q, d, m = (None if c[0] is None else _stack(cfg, ours, list(c)) for c in zip(*codes))
    prefix = ours.removesuffix("weight")
    return {prefix + k: v for k, v in zip(("qweight", "scales", "mins"), pack_codes(q, d, m, NATIVE[kind][0]))
            if v is not None}


def _copy_tied(module, state_dict, prefix, local_metadata) -> None:
    """state_dict() hook of a quantized lm_head tied to the embedding: copies of the buffers they share, so a
    checkpoint stores an lm_head of its own, as phikit's quantized checkpoints do (safetensors refuses
    tensors that share memory). Memory holds one copy; only a state_dict makes the second."""
    for k in ("qweight", "scales", "mins"):
        if prefix + k in state_dict:
            state_dict[prefix + k] = state_dict[prefix + k].clone()


def _quantization(model: Phi3, types: Counter) -> dict | None:
    """model.cfg.quantization of a GGUF loaded with its blocks kept (None when none was kept).

    When quantize_model's settings rebuild exactly this structure (every linear layer quantized, one
    symmetric flag for the 4-bit ones; 8-bit layers named in keep_8bit), they are recorded, so phikit.save
    writes a checkpoint phikit.load reads back as it was. Otherwise format "gguf" with each layer's type:
    such a saved checkpoint is refused by load_model (it names the format). gguf_types counts the file's
    tensors by type.
    """
    linear = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))}
    layers = {**linear, "embed_tokens": model.embed_tokens}
    quant = {n: m for n, m in layers.items() if isinstance(m, QuantTensor)}
    if not quant:
        return None
    info = {"gguf_types": dict(sorted(types.items()))}
    sym4 = {m.symmetric for m in quant.values() if m.bits == 4}
    if len(sym4) > 1 or any(n not in quant for n in linear):
        return {"format": "gguf", "group_size": GROUP, **info,
                "layers": {n: _ggml_type(m) or "float" for n, m in layers.items()}}
    bits = 4 if sym4 else 8
    keep = {n for n in linear if quant[n].bits == 8} if bits == 4 else set()
    for leaf in {n.rpartition(".")[2] for n in keep}:  # a kind of layer 8-bit throughout is named once
        same = {n for n in linear if n.rpartition(".")[2] == leaf}
        if same <= keep:
            keep = (keep - same) | {leaf}
    emb = model.embed_tokens
    return {"format": FORMAT, "bits": bits, "group_size": GROUP, "symmetric": sym4 != {False},
            "keep_8bit": sorted(keep), "embedding_bits": emb.bits if isinstance(emb, QuantEmbedding) else None,
            "calibrated": False, **info}


def load_gguf(path: str | os.PathLike, dtype: torch.dtype | None = None):
    """(model, tokenizer) from a GGUF file.

    dtype None (the default) keeps Q4_0, Q4_1 and Q8_0 matrices quantized: their blocks are repacked into
    phikit's 4-bit symmetric, 4-bit asymmetric and 8-bit layers of group 32 (QuantLinear, QuantEmbedding;
    the same arithmetic, see _codes), with no float copy of a matrix made; a tied lm_head shares the
    embedding's buffers. Every other tensor is dequantized to float32, the activation dtype; a quantized
    type phikit does not keep (Q4_K, Q6_K, Q5_0, ...) is named once on stderr. A fused layer (llama's
    q/k/v, gate/up) follows _layer_type. model.cfg.quantization says what was kept (_quantization). An
    explicit dtype gives a float model: every tensor dequantized to dtype. The tokenizer is None when the
    file carries none (as for an HF directory without tokenizer.json).

    Known limitation: the kept layers compute with int8 activations (quantize.py, as llama.cpp does), so
    logits are not the float32 model's: on SmolLM2 chat replies 3-6% of their norm apart, the top-1 token
    the same at 87-100% of the positions, and greedy replies part at near-ties (as llama.cpp's do).
    """
    from gguf import GGMLQuantizationType

    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    reader = _reader(path)
    cfg = config_from_gguf(reader, path)
    tokenizer = tokenizer_from_gguf(reader, path) if _field(reader, "tokenizer.ggml.model") is not None else None
    tensors = {t.name: t for t in reader.tensors}
    del reader  # its metadata (the vocabulary as Python strings) is not needed past this point
    native, dtype = dtype is None, dtype or torch.float32
    cfg.torch_dtype = str(dtype).removeprefix("torch.")
    types = {name: GGMLQuantizationType(t.tensor_type).name for name, t in tensors.items()}
    names = tensor_map(cfg)
    wanted = {g for gs in names.values() for g in gs} | {"rope_factors_long.weight", "rope_factors_short.weight"}
    unexpected = sorted(set(tensors) - wanted)
    if unexpected:
        raise GGUFError(f"unexpected tensor {unexpected[0]!r} in {path} for a {cfg.model_type} model")
    missing = [g for gs in names.values() for g in gs if g not in tensors]
    if missing:
        raise GGUFError(f"tensor {missing[0]!r} is missing from {path}")
    model = Phi3.empty(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    unread = next((g for gs in names.values() for g in gs if types[g] not in SUPPORTED_TYPES), None)
    if unread is not None:  # types and shapes first: nothing is read from a file phikit cannot use
        raise GGUFError(f"tensor {unread!r} has type {types[unread]}, which phikit does not read "
                        f"(supported: {', '.join(SUPPORTED_TYPES)})")
    for ours, gguf_names in names.items():
        parts = [tuple(int(x) for x in reversed(tensors[g].shape)) for g in gguf_names]  # torch order
        shape = parts[0] if len(parts) == 1 else (sum(p[0] for p in parts), *parts[0][1:])
        if shape != shapes[ours] or any(p[1:] != shape[1:] for p in parts):
            raise GGUFError(f"tensor {gguf_names[0]!r} in {path} has shape {shape}, expected {shapes[ours]}")
    kept = {ours: _layer_type([types[g] for g in gs]) if native and len(shapes[ours]) == 2 else None
            for ours, gs in names.items()}
    n = sum(storage_bytes(*shapes[k], NATIVE[t][0], GROUP, NATIVE[t][1]) if t else math.prod(shapes[k]) * dtype.itemsize
            for k, t in kept.items())  # a tied lm_head (not in names) is the embedding
    check_weights(n, f"{path.name} with its Q4_0/Q4_1/Q8_0 blocks kept" if native else
                  f"{path.name} dequantized to {cfg.torch_dtype}")
    if cfg.tie_embeddings:
        kept["lm_head.weight"] = kept["embed_tokens.weight"]
    with torch.device("meta"):  # quantized shells for the kept layers, their buffers assigned below
        for ours, t in kept.items():
            if t is not None:
                name, (N, K), (bits, symmetric) = ours.removesuffix(".weight"), shapes[ours], NATIVE[t]
                layer = QuantEmbedding(N, K, bits, GROUP, symmetric) if name == "embed_tokens" else \
                    QuantLinear(K, N, bits, GROUP, symmetric)
                parent, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, leaf, layer)
    state = {}
    with open(path, "rb") as f:
        for ours, gguf_names in names.items():
            state.update(_load_param(f, cfg, ours, [tensors[g] for g in gguf_names], kept[ours], dtype))
    if cfg.tie_embeddings:  # the embedding's own tensors: one copy in memory
        state.update({k.replace("embed_tokens.", "lm_head.", 1): v for k, v in list(state.items())
                      if k.startswith("embed_tokens.")})
    model.load_state_dict(state, assign=True, strict=True)
    if cfg.tie_embeddings and kept["lm_head.weight"] is None:
        model.lm_head.weight = model.embed_tokens.weight  # assign=True replaced the shared Parameter: re-tie
    elif cfg.tie_embeddings:
        model.lm_head.register_state_dict_post_hook(_copy_tied)
    dequantized = Counter(types[g] for ours, gs in names.items() for g in gs
                          if native and kept[ours] is None and types[g] not in FLOAT_TYPES)
    if dequantized:
        print(f"[phikit] {path.name}: {sum(dequantized.values())} quantized tensors dequantized to float32 ("
              + ", ".join(f"{v} {k}" for k, v in sorted(dequantized.items()))
              + f"): phikit keeps {', '.join(NATIVE)} quantized, and a fused layer when its parts share one of them",
              file=sys.stderr)
    model.cfg.quantization = _quantization(model, Counter(types.values())) if native else None
    use_bf16_kernel(model)
    return model.eval(), tokenizer


# ---- tokenizer: tokenizer.ggml.* <-> tokenizers.Tokenizer -----------------------------------------
# token types (gguf.TokenType): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# pre-tokenizer regexes by llama.cpp's `tokenizer.ggml.pre` name; anything else gets GPT-2's
_O200K = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_REGEXES = {"gpt-4o": _O200K, "llama-bpe": _LLAMA3, "llama3": _LLAMA3}


def _spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges for a SentencePiece vocabulary that ships scores but no merges.

    SentencePiece-BPE merges the pair whose joined piece has the highest score. Every way of
    splitting a piece into two pieces of the vocabulary is a merge; ranking them by the joined
    piece's score (then the longer left part first) recovers SentencePiece's order.
    """
    index = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in zip(tokens, scores):
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in index and right in index:
                merges.append((-score, -len(left), index[left], index[right], left, right))
    merges.sort()
    return [(m[4], m[5]) for m in merges]


def tokenizer_from_gguf(reader, path: Path):
    """The phikit Tokenizer described by a GGUF file's tokenizer.ggml.* metadata."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    from .tokenizer import Tokenizer

    kind = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise GGUFError(f"{path} has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens)")
    types = _field(reader, "tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    arch = _field(reader, "general.architecture")

    def token(key):
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    vocab = {t: i for i, t in enumerate(tokens)}
    if kind == "gpt2":  # byte-level BPE (SmolLM2, Phi-4-mini)
        merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges") or []]
        backend = HFTokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
        pre = _field(reader, "tokenizer.ggml.pre", "default")
        if pre in SPLIT_REGEXES:
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(SPLIT_REGEXES[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        elif pre == "smollm":  # digits one by one, then GPT-2's split
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
        else:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        add_bos_default = False
    elif kind == "llama":  # SentencePiece BPE with byte fallback (Llama-2, Phi-3)
        merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges") or []]
        if not merges:
            scores = _field(reader, "tokenizer.ggml.scores")
            if scores is None:
                raise GGUFError(f"{path}: a 'llama' tokenizer needs tokenizer.ggml.scores or merges")
            merges = _spm_merges(tokens, scores)
        backend = HFTokenizer(models.BPE(vocab, merges, unk_token=token("unknown"), fuse_unk=True, byte_fallback=True))
        if arch == "phi3":  # Phi-3's own tokenizer.json: a leading space added to every text segment
            backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        else:
            backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                             decoders.Strip(" ", 1, 0)])
        add_bos_default = True
    else:
        raise GGUFError(f"unsupported GGUF tokenizer model {kind!r} in {path} (phikit reads: gpt2, llama)")

    # llama.cpp strips the whitespace after Phi-3's special tokens (the rstrip flags of Phi-3's own
    # tokenizer.json), keyed on the model *name*, since GGUF has no field for it (llama-vocab.cpp)
    name = str(_field(reader, "general.name", "")).lower()
    rstrip = ("phi-3" in name or "phi3" in name)
    keep_space = {"<unk>", "<s>", "<|endoftext|>"}
    backend.add_tokens([AddedToken(t, normalized=False, special=ty == CONTROL, rstrip=rstrip and t not in keep_space)
                        for t, ty in zip(tokens, types) if ty in (CONTROL, USER_DEFINED)])
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False))
    bos, eos = token("bos"), token("eos")
    single = ([f"{bos}:0"] if add_bos and bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos and eos else [])
    specials = [(t, vocab[t]) for t, on in ((bos, add_bos), (eos, add_eos)) if on and t]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=single + ["$B:1"], special_tokens=specials)
    config = {"bos_token": bos, "eos_token": eos, "unk_token": token("unknown"), "pad_token": token("padding"),
              "add_bos_token": add_bos, "chat_template": _field(reader, "tokenizer.chat_template")}
    eot = _field(reader, "tokenizer.ggml.eot_token_id")
    return Tokenizer.from_parts(backend, config, [i for i in (_field(reader, "tokenizer.ggml.eos_token_id"), eot)
                                                  if i is not None])


# ---- export ---------------------------------------------------------------------------------------
EXPORT_TYPES = ("f16", "q8_0", "q4_0", "q4_1")


def _gguf_vocab(tokenizer, cfg: Config) -> dict:
    """tokenizer.ggml.* fields for our tokenizer: tokens, types, scores or merges, pre-tokenizer name."""
    import json

    spec = json.loads(tokenizer.backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise GGUFError(f"cannot export a {model.get('type')} tokenizer to GGUF (phikit writes BPE tokenizers)")
    n = max(cfg.vocab_size, tokenizer.vocab_size)
    tokens = [tokenizer.id_to_token(i) or f"[PAD{i}]" for i in range(n)]
    types = [NORMAL if tokenizer.id_to_token(i) is not None else UNUSED for i in range(n)]
    for t in spec["added_tokens"]:
        types[t["id"]] = CONTROL if t["special"] else USER_DEFINED
    merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]
    out = {"tokens": tokens, "types": types, "merges": merges}
    if model.get("byte_fallback"):  # SentencePiece style: llama.cpp merges by piece score
        out["model"], out["pre"] = "llama", "default"
        rank = {}
        for r, m in enumerate(merges):
            rank.setdefault(m.replace(" ", "", 1), r)
        out["scores"] = [float(-rank[t]) if t in rank else -1e6 - i for i, t in enumerate(tokens)]
        for i, t in enumerate(tokens):
            if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                types[i] = BYTE
            elif t == model.get("unk_token"):
                types[i] = UNKNOWN
        normalizer, pre = json.dumps(spec.get("normalizer")), json.dumps(spec.get("pre_tokenizer"))
        out["add_space_prefix"] = '"Prepend"' in normalizer or ('"Metaspace"' in pre and '"never"' not in pre)
    else:  # byte-level BPE: name the pre-tokenizer's split rule as llama.cpp knows it
        out["model"] = "gpt2"
        pre = spec.get("pre_tokenizer") or {}
        steps = pre.get("pretokenizers", [pre])
        regex = next((s["pattern"].get("Regex") for s in steps if s.get("type") == "Split"), None)
        by_regex = {v: k for k, v in SPLIT_REGEXES.items() if k != "llama3"}
        if regex is not None and regex in by_regex:
            out["pre"] = by_regex[regex]
        elif [s.get("type") for s in steps] == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
            out["pre"] = "smollm"
        elif [s.get("type") for s in steps] == ["ByteLevel"] and steps[0].get("use_regex", True):
            out["pre"] = "gpt-2"
        else:
            raise GGUFError("the tokenizer's pre-tokenizer has no llama.cpp name (phikit knows: o200k / gpt-4o, "
                            "llama3, smollm, gpt-2)")
    return out


def save_gguf(model: Phi3, tokenizer, path: str | os.PathLike, qtype: str = "f16") -> Path:
    """Write model and tokenizer as a GGUF file llama.cpp runs; 2-D weights in `qtype` (f16, q8_0, q4_0, q4_1).

    A quantized layer of group 32 whose format is qtype's (4-bit symmetric: q4_0, asymmetric: q4_1, 8-bit:
    q8_0) is written as its own codes and scales, without loss (a GGUF loaded as it is comes back out the
    same); other quantized layers are dequantized, then rounded to qtype like float weights.
    """
    import gguf

    if qtype not in EXPORT_TYPES:
        raise GGUFError(f"unsupported export type {qtype!r} (choose: {', '.join(EXPORT_TYPES)})")
    cfg, path = model.cfg, Path(path)
    if cfg.longrope and cfg.rope_mscale(True) != cfg.rope_mscale(False):
        raise GGUFError("GGUF has one LongRoPE attention factor; this config has different short/long mscales")
    arch = cfg.model_type
    w = gguf.GGUFWriter(str(path) + ".tmp", arch)  # written aside, renamed when complete
    w.add_type("model")
    # llama.cpp keys Phi-3's special-token whitespace rule on the name (see tokenizer_from_gguf)
    phi3_spm = arch == "phi3" and tokenizer is not None and tokenizer.token_to_id("<0x0A>") is not None
    w.add_name(path.stem if not phi3_spm or "phi-3" in path.stem.lower() else f"phi-3 {path.stem}")
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_block_count(cfg.n_layers)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.rotary_dim)
    if cfg.head_dim != cfg.dim // cfg.n_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if arch == "phi3":
        w.add_rope_scaling_orig_ctx_len(cfg.original_max_seq_len)
        w.add_sliding_window(cfg.sliding_window or 0)
        if cfg.longrope:
            w.add_rope_scaling_attn_factors(cfg.rope_mscale(True))
    else:
        w.add_vocab_size(cfg.vocab_size)
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[qtype]
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    if tokenizer is not None:
        v = _gguf_vocab(tokenizer, cfg)
        w.add_tokenizer_model(v["model"])
        w.add_tokenizer_pre(v["pre"])
        w.add_token_list(v["tokens"])
        w.add_token_types(v["types"])
        if "scores" in v:
            w.add_token_scores(v["scores"])
            w.add_add_space_prefix(v["add_space_prefix"])
        if v["merges"]:
            w.add_token_merges(v["merges"])
        for key, tok in (("bos", tokenizer.bos_token), ("eos", tokenizer.eos_token), ("unk", tokenizer.unk_token),
                         ("pad", tokenizer.pad_token)):
            if tok is not None and tokenizer.token_to_id(tok) is not None:
                getattr(w, f"add_{key}_token_id")(tokenizer.token_to_id(tok))
        for marker in ("<|end|>", "<|im_end|>", "<|eot_id|>"):  # the chat turn's end: llama.cpp's EOT
            if tokenizer.token_to_id(marker) is not None:
                w.add_eot_token_id(tokenizer.token_to_id(marker))
                break
        probe = tokenizer.encode("a", add_special_tokens=True)
        w.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_id)
        w.add_add_eos_token(bool(probe) and probe[-1] == tokenizer.eos_id and len(probe) > 1)
        from .chat_format import family_template, guess_family

        w.add_chat_template(tokenizer.chat_template or family_template(guess_family(tokenizer)))

    modules = dict(model.named_modules())
    for ours, names in tensor_map(cfg).items():
        layer = modules.get(ours.removesuffix(".weight"))
        if isinstance(layer, QuantTensor):  # codes, scales (and mins) without the tile padding
            N = layer.out_features if isinstance(layer, QuantLinear) else layer.num_embeddings
            fields = [unpack(layer.qweight, layer.bits)[:N], untile_groups(layer.scales)[:N],
                      None if layer.mins is None else untile_groups(layer.mins)[:N]]
        else:
            fields = [model.get_parameter(ours).detach().float()]
        split = [[None] * len(names) if f is None else _split(cfg, ours, len(names), f) for f in fields]
        for name, *part in zip(names, *split):
            if len(part) == 1:
                _add_tensor(w, name, part[0].contiguous().numpy(), qtype)
            elif _ggml_type(layer) == qtype.upper():  # the blocks hold these codes and scales as they are: no loss
                w.add_tensor(name, _blocks(qtype.upper(), *part), raw_dtype=gguf.GGMLQuantizationType[qtype.upper()])
            else:
                q, scale, lo = part[0], part[1].float(), None if part[2] is None else part[2].float()
                lo = None if layer.bits == 8 else -8 * scale if layer.symmetric else lo
                _add_tensor(w, name, dequantize(q, scale, lo).numpy(), qtype)
    if cfg.longrope:
        w.add_tensor("rope_factors_long.weight", np.asarray(cfg.rope_long_factor, dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.asarray(cfg.rope_short_factor, dtype=np.float32))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=True)
    finally:
        w.close()
    os.replace(str(path) + ".tmp", path)
    return path


def _split(cfg: Config, ours: str, n: int, t: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of _stack: our parameter's rows (weights, codes or per-row scales) -> its n GGUF tensors."""
    rows = [t.shape[0] // n] * n
    if cfg.model_type == "llama" and ours.endswith("qkv_proj.weight"):
        rows = [cfg.n_heads * cfg.head_dim] + [cfg.n_kv_heads * cfg.head_dim] * 2
    parts = list(t.split(rows)) if n > 1 else [t]
    if cfg.model_type == "llama" and ours.endswith("qkv_proj.weight"):
        parts[0] = _permute_rows(parts[0], cfg.n_heads, inverse=False)
        parts[1] = _permute_rows(parts[1], cfg.n_kv_heads, inverse=False)
    return parts


def _add_tensor(w, name: str, data: np.ndarray, qtype: str) -> None:
    """1-D tensors (norms) stay F32; matrices become qtype, or F16 where a row does not fill whole blocks."""
    from gguf import GGMLQuantizationType, quants

    if data.ndim == 1:
        w.add_tensor(name, data.astype(np.float32))
        return
    if qtype != "f16":
        q = GGMLQuantizationType[qtype.upper()]
        try:
            w.add_tensor(name, quants.quantize(data, q), raw_dtype=q)
            return
        except quants.QuantError:
            pass  # row length not a multiple of the block size (32)
    w.add_tensor(name, data.astype(np.float16))
