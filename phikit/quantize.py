"""Weight-only quantization: int4 group-wise and int8 per-channel layers, swapped in beside the model.

`quantize_model(model, bits=4, group_size=32)` replaces the model's nn.Linear layers (and the
embedding table, at 8 bits) in place; model.py never knows. The settings go into config.json
(`phikit_quantization`), so `phikit.load` rebuilds the quantized structure before loading.

Formats (the same on disk and in memory, so loading is a read, not a conversion):
- Int4Linear (format "phikit-int4-v2"): codes q in 0..15 with w[n, k] = q * scale + min per group of
  g inputs; symmetric: min = -8 * scale (not stored), so w = (q - 8) * scale, 4.5 bits per weight at
  g = 32 (llama.cpp's Q4_0 size); asymmetric stores min too (5 bits). Rows come in tiles of 16 (N is
  padded to a multiple of 16 with zero rows):
      qweight uint8 [N/16, K*8]: in tile t, k-octet o, byte 64o + 4c + i holds q[16t + c, 8o + i] in
                                 its low nibble and q[16t + c, 8o + 4 + i] in its high nibble
      scales (and mins) fp16 [N/16, K/g, 16]
  The layout is the operand of the AVX512-VNNI kernel in csrc/int4_kernels.cpp: one 64-byte load
  unpacks to 16 rows x 4 inputs twice.
- Int8Linear: `qweight` int8 [N, K], `scales` bf16 [N]: w = q * scale (symmetric, per row).
- Int8Embedding: the same per-row format; a lookup dequantizes only the rows it reads.

Kernels: int4 layers quantize their input activations to int8 per row in blocks of g (scale =
max|x| / 127, as llama.cpp does) and multiply the codes with VPDPBUSD, decode and prefill alike
(kernels.py builds the C++ on first use). `int4_matmul_reference` is the kernel's arithmetic in
PyTorch, exact to the bit (the oracle of the tests); where the C++ cannot be built, layers use the
dequantize-then-matmul path with the same activation rounding. Int8 layers run torch's
`_weight_int8pack_mm` for a few rows and dequantize + bf16 GEMM for prefill.
`kernel="oracle"` makes every quantized layer use its reference.

References: gpt-fast `quantize.py`; llama.cpp `ggml-quants.c` (Q4_0 / Q8_0 blocks, activations
quantized to 8 bits); mlx-lm `utils.py` quantize_model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels

TILE = 16             # int4 rows per tile
PREFILL_ROWS = 256    # int8: from this many activation rows on, dequantize + dense GEMM beats the packed kernel
FORMAT = "phikit-int4-v2"


# ---- pure tensor functions ------------------------------------------------------------------------

def quantize_int4(w: torch.Tensor, group_size: int, symmetric: bool = False):
    """w [N, K] float -> codes q uint8 [N, K] in 0..15, scale and min float32 [N, K/g]: w ~ q * scale + min.

    Codes are computed against the fp16-rounded scale and min that will be stored, so the
    dequantized weight is the nearest one the stored format can express.
    """
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"in_features {K} is not a multiple of the group size {group_size}")
    g = w.float().reshape(N, K // group_size, group_size)
    if symmetric:
        scale = (g.abs().amax(-1) / 7).half().float()
        lo = -8 * scale
    else:
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).half().float()
        lo = lo.half().float()
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = torch.round((g - lo[..., None]) * inv[..., None]).clamp(0, 15).to(torch.uint8)
    return q.reshape(N, K), scale, lo


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """codes [N, K] with scale, min [N, K/g] -> float32 weight [N, K]."""
    N, K = q.shape
    g = q.float().reshape(N, scale.shape[1], -1)
    return (g * scale[..., None] + lo[..., None]).reshape(N, K)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, K] (N a multiple of 16, K of 8) -> the tiled layout uint8 [N/16, K*8]."""
    N, K = q.shape
    b = q.view(N // TILE, TILE, K // 8, 2, 4).permute(0, 2, 1, 4, 3)  # (t, o, c, i, half)
    return (b[..., 0] | (b[..., 1] << 4)).reshape(N // TILE, K * 8).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: uint8 [N/16, K*8] -> codes [N, K]."""
    T, K = packed.shape[0], packed.shape[1] // 8
    b = packed.view(T, K // 8, TILE, 4)
    return torch.stack((b & 15, b >> 4), dim=3).permute(0, 2, 1, 3, 4).reshape(T * TILE, K)  # (t, c, o, half, i)


def tile_groups(s: torch.Tensor) -> torch.Tensor:
    """Per-group values [N, K/g] -> the tiled layout [N/16, K/g, 16]."""
    N, nb = s.shape
    return s.reshape(N // TILE, TILE, nb).transpose(1, 2).contiguous()


def untile_groups(t: torch.Tensor) -> torch.Tensor:
    """Inverse of tile_groups."""
    T, nb, _ = t.shape
    return t.transpose(1, 2).reshape(T * TILE, nb)


def quantize_activations_reference(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [M, K] -> the float32 values the kernel multiplies: int8 codes per block of g times the block scale."""
    M, K = x.shape
    xb = x.float().reshape(M, K // group_size, group_size)
    amax = xb.abs().amax(-1, keepdim=True)
    inv, sx = _divisions(amax)
    return (torch.round(xb * inv).clamp(-127, 127) * sx).reshape(M, K)


def _divisions(amax: torch.Tensor):
    """127 / amax (0 where amax is 0) and amax / 127, correctly rounded to float32 like the C++ divisions
    (torch's vectorised float32 division may multiply by a reciprocal; float64 then float32 is exact here)."""
    a = amax.double()
    return torch.where(a > 0, 127 / a, torch.zeros_like(a)).float(), (a / 127).float()


def int4_matmul_reference(x: torch.Tensor, layer: "Int4Linear") -> torch.Tensor:
    """The C++ kernel's arithmetic in PyTorch, float32 result [M, N]: the exact oracle of the tests.

    Per block b of g inputs: an exact integer dot product of codes (q - 8 when symmetric) with int8
    activation codes, then y = fma(dot, scale * s_x, y) (+ fma(min, s_x * sum(x codes), y) when
    asymmetric), in block order. float64 holds each product exactly, so this matches the kernel's
    float32 fma bit for bit (up to a double rounding, rarer than 1 in 10^8). Memory grows with
    M * N * K/g: for tests, not for models.
    """
    g = layer.group_size
    M, K = x.shape
    xb = x.float().reshape(M, K // g, g)
    inv, sx = _divisions(xb.abs().amax(-1))
    xq = torch.round(xb * inv[..., None]).clamp(-127, 127).double()  # codes [M, nb, g]
    q = unpack_int4(layer.qweight).double().reshape(-1, K // g, g)      # [N', nb, g]
    if layer.symmetric:
        q = q - 8
    dots = torch.einsum("mbk,nbk->mnb", xq, q)                          # exact integers
    scale = untile_groups(layer.scales).float()                         # [N', nb]
    y = torch.zeros(M, q.shape[0], dtype=torch.float32)
    for b in range(K // g):
        y = (y.double() + dots[:, :, b] * (scale[None, :, b] * sx[:, b, None]).double()).float()
        if not layer.symmetric:
            lo = untile_groups(layer.mins).float()
            y = (y.double() + lo[None, :, b].double() * (sx[:, b] * xq[:, b].sum(-1).float())[:, None].double()).float()
    return y[:, : layer.out_features]


def quantize_int8(w: torch.Tensor):
    """w [N, K] -> int8 codes [N, K] and float32 scales [N] (symmetric, per row)."""
    scale = (w.float().abs().amax(-1) / 127).clamp(min=1e-8).bfloat16().float()
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


# ---- modules --------------------------------------------------------------------------------------

class Int4Linear(nn.Module):
    """y = x W^T with W stored as 4-bit group-wise codes (see the module docstring for the layout)."""

    def __init__(self, in_features: int, out_features: int, group_size: int, symmetric: bool = False,
                 kernel: str = "auto"):
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"in_features {in_features} is not a multiple of the group size {group_size}")
        self.in_features, self.out_features, self.group_size, self.kernel = in_features, out_features, group_size, kernel
        self.symmetric = symmetric
        tiles = -(-out_features // TILE)
        self.register_buffer("qweight", torch.zeros(tiles, in_features * 8, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(tiles, in_features // group_size, TILE, dtype=torch.float16))
        if not symmetric:
            self.register_buffer("mins", torch.zeros(tiles, in_features // group_size, TILE, dtype=torch.float16))
        else:
            self.mins = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, symmetric: bool = False) -> "Int4Linear":
        N, K = linear.weight.shape
        m = cls(K, N, group_size, symmetric)
        q, scale, lo = quantize_int4(linear.weight.detach(), group_size, symmetric)
        pad = m.qweight.shape[0] * TILE - N
        m.qweight = pack_int4(F.pad(q, (0, 0, 0, pad)))
        m.scales = tile_groups(F.pad(scale, (0, 0, 0, pad))).half()
        if not symmetric:
            m.mins = tile_groups(F.pad(lo, (0, 0, 0, pad))).half()
        return m

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [N, K] in dtype, computed in float32 (the oracle of the tests), rounded once to dtype."""
        scale = untile_groups(self.scales).float()
        lo = -8 * scale if self.symmetric else untile_groups(self.mins).float()
        return dequantize_int4(unpack_int4(self.qweight), scale, lo)[: self.out_features].to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()
        ext = kernels.load() if self.kernel == "auto" else None
        if self.kernel == "oracle":
            y = int4_matmul_reference(x2, self)
        elif ext is None:  # no C++ here: the same activation rounding, dequantized weights, float32 GEMM
            y = F.linear(quantize_activations_reference(x2, self.group_size), self.dequantize(torch.float32))
        else:
            xq, xs, xsum = ext.quantize_activations(x2, self.group_size, False)
            y = ext.int4_matmul(xq, xs, xsum, self.qweight, self.scales, self.mins, self.group_size, False)
            y = y[:, : self.out_features]
        return y.to(x.dtype).reshape(*shape, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"symmetric={self.symmetric}")


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
                Int4Linear(module.in_features, module.out_features, group_size, symmetric)
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
    """Choose the kernel of every quantized layer: "auto" (the fast kernels) or "oracle" (float32 reference)."""
    for m in model.modules():
        if isinstance(m, (Int4Linear, Int8Linear)):
            m.kernel = kernel


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
