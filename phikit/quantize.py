"""Weight-only quantization: int4 group-wise and int8 per-channel layers, swapped in beside the model.

`quantize_model(model, bits=4, group_size=32)` replaces the model's nn.Linear layers (and the
embedding table, at 8 bits) in place; model.py never knows. The settings go into config.json
(`phikit_quantization`), so `phikit.load` rebuilds the quantized structure before loading.

Formats (the same on disk and in memory, so loading is a memory map, not a conversion):
- Int4Linear: `qweight` uint8 [N', K/2] holds 4-bit codes q in 0..15 in the blocked layout that
  PyTorch's CPU int4 kernel reads: rows in blocks of 64; in block b, byte (k, j) holds
  q[64b + j, k] in its low nibble and q[64b + 32 + j, k] in its high nibble (j < 32). N' is N
  rounded up to 64 (padding rows are zero). `scales_and_zeros` bf16 [K/g, N', 2] gives
      w[n, k] = (q[n, k] - 8) * scale[k // g, n] + zero[k // g, n].
  Asymmetric: scale = (max - min) / 15 per group; symmetric: zero = 0, scale = max|w| / 7.
- Int8Linear: `qweight` int8 [N, K], `scales` bf16 [N]: w = q * scale (symmetric, per row).
- Int8Embedding: the same per-row format; a lookup dequantizes only the rows it reads.

Kernels behind one module: decoding (a few rows of activations) is memory-bound, so it runs
torch's packed kernels (`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`), which read the
packed weights and never materialise a float matrix. For prefill (many rows, compute-bound) int8
dequantizes once per call and uses the bf16 GEMM (AVX512-BF16 on this CPU), which is faster there;
int4 stays on its packed kernel, because dequantizing 4-bit groups exactly costs more than the GEMM
saves (measured; see Int4Linear.forward). `kernel="oracle"` dequantizes to float32 and uses
F.linear: the reference in tests.

References: gpt-fast `quantize.py` (WeightOnlyInt4QuantHandler); torchao int4 weight-only;
PyTorch `aten/src/ATen/native/cpu/int4mm_kernel.cpp` (layout); mlx-lm `utils.py` quantize_model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BLOCK_N = 64          # rows per block in torch's CPU int4 layout
PREFILL_ROWS = 256    # int8: from this many activation rows on, dequantize + dense GEMM beats the packed kernel
FORMAT = "phikit-int4-v1"


# ---- pure tensor functions ------------------------------------------------------------------------

def quantize_int4(w: torch.Tensor, group_size: int, symmetric: bool = False):
    """w [N, K] float -> codes q uint8 [N, K] in 0..15, scale and zero float32 [N, K/g].

    Codes are computed against the bf16-rounded scale and zero that will be stored, so the
    dequantized weight is the nearest one the stored format can express.
    """
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"in_features {K} is not a multiple of the group size {group_size}")
    g = w.float().reshape(N, K // group_size, group_size)
    if symmetric:
        scale = g.abs().amax(-1) / 7
        zero = torch.zeros_like(scale)
    else:
        lo, hi = g.amin(-1), g.amax(-1)
        scale = (hi - lo) / 15
        zero = lo + 8 * scale
    scale = scale.clamp(min=1e-8).bfloat16().float()
    zero = zero.bfloat16().float()
    q = torch.round((g - zero[..., None]) / scale[..., None] + 8).clamp(0, 15).to(torch.uint8)
    return q.reshape(N, K), scale, zero


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """codes [N, K] with scale, zero [N, K/g] -> float32 weight [N, K]."""
    N, K = q.shape
    g = q.float().reshape(N, scale.shape[1], -1)
    return ((g - 8) * scale[..., None] + zero[..., None]).reshape(N, K)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, K] (N a multiple of 64) -> torch's blocked CPU layout uint8 [N, K/2]."""
    N, K = q.shape
    b = q.view(N // BLOCK_N, 2, BLOCK_N // 2, K)
    return (b[:, 0] | (b[:, 1] << 4)).transpose(1, 2).contiguous().view(N, K // 2)  # (N/64, K, 32) bytes


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: uint8 [N, K/2] -> codes [N, K]."""
    N, K = packed.shape[0], packed.shape[1] * 2
    b = packed.view(N // BLOCK_N, K, BLOCK_N // 2).transpose(1, 2)  # (N/64, 32, K)
    return torch.stack((b & 15, b >> 4), dim=1).reshape(N, K)


def quantize_int8(w: torch.Tensor):
    """w [N, K] -> int8 codes [N, K] and float32 scales [N] (symmetric, per row)."""
    scale = (w.float().abs().amax(-1) / 127).clamp(min=1e-8).bfloat16().float()
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


# ---- modules --------------------------------------------------------------------------------------

class Int4Linear(nn.Module):
    """y = x W^T with W stored as 4-bit group-wise codes (see the module docstring for the layout)."""

    def __init__(self, in_features: int, out_features: int, group_size: int, kernel: str = "auto"):
        super().__init__()
        self.in_features, self.out_features, self.group_size, self.kernel = in_features, out_features, group_size, kernel
        n_pad = -(-out_features // BLOCK_N) * BLOCK_N
        self.register_buffer("qweight", torch.zeros(n_pad, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros",
                             torch.zeros(in_features // group_size, n_pad, 2, dtype=torch.bfloat16))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, symmetric: bool = False) -> "Int4Linear":
        N, K = linear.weight.shape
        m = cls(K, N, group_size)
        q, scale, zero = quantize_int4(linear.weight.detach(), group_size, symmetric)
        pad = m.qweight.shape[0] - N
        q = F.pad(q, (0, 0, 0, pad))
        scale, zero = F.pad(scale, (0, 0, 0, pad)), F.pad(zero, (0, 0, 0, pad))
        m.qweight = pack_int4(q)
        m.scales_and_zeros = torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous().bfloat16()
        return m

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [N, K] in dtype: the float32 oracle of the tests, rounded once to dtype if asked.

        The arithmetic stays in float32: in 16 bits, q * scale + (zero - 8 scale) cancels badly.
        """
        sz = self.scales_and_zeros.float()
        w = dequantize_int4(unpack_int4(self.qweight), sz[..., 0].t(), sz[..., 1].t())
        return w[: self.out_features].to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.kernel == "oracle":
            y = F.linear(x2.float(), self.dequantize(torch.float32))
        else:  # the packed kernel reads 4-bit weights directly (fp32, fp16 or bf16 activations), for any
            # number of rows: at 512 rows it beats dequantize + bf16 GEMM (0.31 s vs 0.58 s for 16384 x 3072, 1 thread)
            sz = _in_dtype(self, "scales_and_zeros", x.dtype)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.qweight, self.group_size, sz)
            y = y[:, : self.out_features]
        return y.to(x.dtype).reshape(*shape, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class Int8Linear(nn.Module):
    """y = x W^T with W stored as int8 codes and one scale per output row."""

    def __init__(self, in_features: int, out_features: int, kernel: str = "auto"):
        super().__init__()
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(out_features, dtype=torch.bfloat16))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        N, K = linear.weight.shape
        m = cls(K, N)
        q, scale = quantize_int8(linear.weight.detach())
        m.qweight, m.scales = q, scale.bfloat16()
        return m

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qweight.to(dtype) * self.scales.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.kernel == "oracle":
            y = F.linear(x2.float(), self.dequantize(torch.float32))
        elif x2.shape[0] >= PREFILL_ROWS:
            y = F.linear(x2, self.dequantize(x.dtype))
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.qweight, _in_dtype(self, "scales", x.dtype))
        return y.to(x.dtype).reshape(*shape, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int8Embedding(nn.Module):
    """An embedding table in int8 with one scale per row; lookups dequantize only the rows read."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.register_buffer("qweight", torch.zeros(num_embeddings, dim, dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(num_embeddings, dtype=torch.bfloat16))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> "Int8Embedding":
        m = cls(*emb.weight.shape)
        q, scale = quantize_int8(emb.weight.detach())
        m.qweight, m.scales = q, scale.bfloat16()
        return m

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.qweight).float() * F.embedding(idx, self.scales[:, None]).float()  # float32


# ---- model surgery --------------------------------------------------------------------------------

def quantize_model(model: nn.Module, bits: int = 4, group_size: int = 32, symmetric: bool = False,
                   keep_8bit: tuple[str, ...] = (), embedding_bits: int | None = 8) -> dict:
    """Swap the model's linear layers (and embedding) for quantized ones, in place; return the settings.

    keep_8bit: names (suffixes such as "down_proj", "lm_head") of layers to keep at 8 bits; a
    layer whose in_features is not a multiple of group_size also falls back to 8 bits.
    On a model built on the meta device this only changes the structure (for loading).
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if group_size not in (32, 64, 128):
        raise ValueError(f"group_size must be 32, 64 or 128, got {group_size}")
    meta = next(model.parameters()).is_meta
    eight = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        use8 = bits == 8 or any(name == k or name.endswith("." + k) or name.endswith(k) for k in keep_8bit) \
            or module.in_features % group_size
        if meta:
            new = Int8Linear(module.in_features, module.out_features) if use8 else \
                Int4Linear(module.in_features, module.out_features, group_size)
        else:
            new = Int8Linear.from_linear(module) if use8 else Int4Linear.from_linear(module, group_size, symmetric)
        if use8 and bits == 4:
            eight.append(name)
        _set(model, name, new)
    if embedding_bits == 8 and hasattr(model, "embed_tokens"):
        emb = model.embed_tokens
        _set(model, "embed_tokens", Int8Embedding(*emb.weight.shape) if meta
             else Int8Embedding.from_embedding(emb))
    settings = {"format": FORMAT, "bits": bits, "group_size": group_size, "symmetric": symmetric,
                "keep_8bit": sorted(set(keep_8bit)), "embedding_bits": embedding_bits}
    if hasattr(model, "cfg"):
        model.cfg.quantization = settings
    return settings


def _in_dtype(module: nn.Module, name: str, dtype: torch.dtype) -> torch.Tensor:
    """A bf16 scale buffer in the activation dtype; converted once per dtype and cached."""
    t = getattr(module, name)
    if t.dtype == dtype:
        return t
    cache = module.__dict__.setdefault("_converted", {})
    key = (name, dtype, t.data_ptr())
    if key not in cache:
        cache.clear()
        cache[key] = t.to(dtype)
    return cache[key]


def set_kernel(model: nn.Module, kernel: str) -> None:
    """Choose the kernel of every quantized layer: "auto" (packed/bf16) or "oracle" (float32 dequantize)."""
    for m in model.modules():
        if isinstance(m, (Int4Linear, Int8Linear)):
            m.kernel = kernel


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
