"""Weight-only quantization: 4-bit and 8-bit group-wise layers, swapped in beside the model.

`quantize_model(model, bits=4, group_size=32)` replaces the model's nn.Linear layers and its
embedding table in place; model.py never knows. The settings go into config.json
(`phikit_quantization`), so `phikit.load` rebuilds the quantized structure before loading.

Format "phikit-int4-v2" (the same on disk and in memory, so loading is a read, not a conversion).
Every quantized matrix [N, K] has one fp16 scale per group of g consecutive inputs of a row:
- 4 bits: codes q in 0..15, w = q * scale + min; symmetric: min = -8 * scale (not stored), so 4.5
  bits per weight at g = 32, llama.cpp's Q4_0 size; asymmetric stores the min too (5 bits, Q4_1).
- 8 bits: codes q in -128..127, w = q * scale (8.5 bits per weight at g = 32, as Q8_0); per channel
  (group_size=0: g is the whole row, 8.0 bits per weight). quantize_int8 writes -127..127; a Q8_0 block
  of a GGUF file may hold -128, which the kernels, the reference and dequantize take as it is.
Rows come in tiles of 16 (N is padded to a multiple of 16 with zero rows):
    qweight  4 bits: uint8 [N/16, K*8]: tile t, k-octet o, byte 64o + 4c + i holds q[16t + c, 8o + i]
                     in its low nibble and q[16t + c, 8o + 4 + i] in its high nibble
             8 bits: int8 [N/16, K*16]: tile t, k-quad j, byte 64j + 4c + i holds q[16t + c, 4j + i]
    scales (and mins) fp16 [N/16, K/g, 16]
The layout is the operand of the AVX512-VNNI kernel in csrc/quant_kernels.cpp: one 64-byte vector
is 16 rows x 4 inputs. The embedding table uses the same storage; a lookup dequantizes its rows.

Codes are round-to-nearest by default. Calibrated (`importance=` from calibrate.py, `phikit quantize
--calibrate`): each 4-bit group's scale and min are searched to minimise the error weighted by the
mean squared activation of each input (search_int4), as llama.cpp's importance matrix does; the
format is the same, only the numbers stored differ.

Kernels: quantized layers quantize their input activations to int8 per row in blocks of g (scale =
max|x| / 127, as llama.cpp does) and multiply codes with VPDPBUSD, decode and prefill alike
(kernels.py builds the C++ on first use). `quant_matmul_reference` is the kernel's arithmetic in
PyTorch, exact to the bit (the oracle of the tests); where the C++ cannot be built, layers use the
dequantize-then-matmul path with the same activation rounding. `kernel="oracle"` makes every
quantized layer use the reference.

Backward (QLoRA: LoRA adapters trained over a frozen quantized base): a QuantLinear is differentiable
with respect to its input, never its weights. grad_x = grad_y W, in grad_y's dtype, with W dequantized
a block of columns at a time into reused scratch (grad_input), so no float copy of the weights is kept
or made whole; the forward's activation rounding counts as the identity (a straight-through estimate).

References: llama.cpp `ggml-quants.c` (Q4_0 / Q4_1 / Q8_0 blocks, activations quantized to 8 bits);
gpt-fast `quantize.py`; mlx-lm `utils.py` quantize_model; QLoRA (Dettmers et al., 2023, arXiv 2305.14314)
and bitsandbytes `autograd/_functions.py` MatMul4Bit, whose backward is also grad_y W but dequantizes the
whole matrix in grad_y's dtype for each call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels

TILE = 16              # rows per tile
FORMAT = "phikit-int4-v2"
OFFSET = {4: 8, 8: 0}  # symmetric codes: w = (q - OFFSET) * scale


# ---- pure tensor functions ------------------------------------------------------------------------

def quantize_int4(w: torch.Tensor, group_size: int, symmetric: bool = False):
    """w [N, K] float -> codes q uint8 [N, K] in 0..15, scale and min float32 [N, K/g]: w ~ q * scale + min.

    Codes are computed against the fp16-rounded scale and min that will be stored, so the
    dequantized weight is the nearest one the stored format can express.
    """
    g = _groups(w, group_size)
    if symmetric:
        scale = (g.abs().amax(-1) / 7).half().float()
        lo = -8 * scale
    else:
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).half().float()
        lo = lo.half().float()
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = torch.round((g - lo[..., None]) * inv[..., None]).clamp(0, 15).to(torch.uint8)
    return q.reshape(w.shape), scale, lo


def search_int4(w: torch.Tensor, group_size: int, symmetric: bool, importance: torch.Tensor,
                grid: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_int4 with each group's scale (and min) chosen to minimise the importance-weighted error.

    importance [K] >= 0 weighs the inputs (calibrate.py measures mean x^2 of each input channel), so
    the error minimised is the expected squared change of the layer's outputs, sum_k a_k (w_k - w'_k)^2,
    not the weight error alone: a group spends its 16 levels where the activations are large.
    Candidates per group, each rounded to fp16 as stored, codes re-rounded for each: round-to-nearest
    (quantize_int4) first, so a tie keeps it and the result is never worse than it; then, for `grid`
    factors f, symmetric: the signed extreme value times f (0.7-1.1) at code -8 or at +7 (2 * grid
    candidates); asymmetric: the low end, the high end or both pulled in to f (0.7-1) of themselves
    (3 * (grid - 1)); then the weighted least-squares scale (and min) of the best codes found. The work is row-chunked: memory stays ~100 MB per matrix.

    References: llama.cpp `ggml-quants.c` make_qx_quants / make_qkx2_quants with an importance matrix
    (imatrix); AWQ (Lin et al., 2023) clip search.
    """
    N, K = w.shape
    if importance.shape != (K,):
        raise ValueError(f"importance must have one value per input ({K}), got shape {tuple(importance.shape)}")
    a = importance.detach().float().clamp(min=0)
    a = (a + 1e-6 * a.mean() + 1e-30).reshape(1, K // group_size, group_size)  # no input weighs exactly nothing
    rows = max(16, 2**22 // K)
    parts = [_search_rows(w[r:r + rows], group_size, symmetric, a, grid) for r in range(0, N, rows)]
    return tuple(torch.cat(x) for x in zip(*parts))


def _search_rows(w, group_size, symmetric, a, grid):
    g = _groups(w, group_size)                                       # [n, nb, g]
    q, scale, lo = quantize_int4(w, group_size, symmetric)         # round-to-nearest: the first candidate
    q = q.reshape(g.shape)
    best = (a * (g - (q.float() * scale[..., None] + lo[..., None])) ** 2).sum(-1)

    def consider(s, m=None):  # a candidate scale (symmetric) or scale and min: keep it where it does better
        nonlocal q, scale, lo, best
        s = s.half().float()
        m = -8 * s if m is None else m.half().float()
        inv = torch.where(s != 0, 1 / s, torch.zeros_like(s))
        c = torch.round((g - m[..., None]) * inv[..., None]).clamp(0, 15)
        err = (a * (g - (c * s[..., None] + m[..., None])) ** 2).sum(-1)
        better = err < best
        q = torch.where(better[..., None], c.to(torch.uint8), q)
        scale, lo, best = torch.where(better, s, scale), torch.where(better, m, lo), torch.where(better, err, best)

    if symmetric:
        ext = g.gather(-1, g.abs().argmax(-1, keepdim=True))[..., 0]  # signed extreme value
        for f in torch.linspace(0.7, 1.1, grid).tolist():
            consider(-ext * f / 8)  # the extreme value at code -8 (scale negative for a positive extreme)
            consider(ext * f / 7)   # at +7
    else:
        mn, mx = g.amin(-1), g.amax(-1)
        for f in torch.linspace(0.7, 1.0, grid).tolist()[:-1]:
            consider((mx - mn) * f / 15, mn * f)                   # both ends shrunk towards 0
            consider((mx - mn * f) / 15, mn * f)                   # the low end only
            consider((mx * f - mn) / 15, mn)                       # the high end only
    c = q.float()  # least squares for the codes chosen: min sum a (w - s c - m)^2 over s (and m)
    if symmetric:
        c = c - 8
        den = (a * c * c).sum(-1)
        consider(torch.where(den > 0, (a * g * c).sum(-1) / den.clamp(min=1e-30), scale))
    else:
        sa, sc, scc = a.sum(-1).expand_as(best), (a * c).sum(-1), (a * c * c).sum(-1)
        sw, swc = (a * g).sum(-1), (a * g * c).sum(-1)
        det = sa * scc - sc * sc
        ok = det.abs() > 1e-12 * (sa * scc).clamp(min=1e-30)
        d = torch.where(ok, det, torch.ones_like(det))
        consider(torch.where(ok, (sa * swc - sc * sw) / d, scale), torch.where(ok, (scc * sw - sc * swc) / d, lo))
    return q.reshape(w.shape), scale, lo


def quantize_int8(w: torch.Tensor, group_size: int):
    """w [N, K] float -> codes int8 [N, K] in -127..127 and float32 scales [N, K/g] (symmetric, as Q8_0)."""
    g = _groups(w, group_size)
    scale = (g.abs().amax(-1) / 127).half().float()
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = torch.round(g * inv[..., None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(w.shape), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor | None = None) -> torch.Tensor:
    """codes [N, K] with scale (and min) [N, K/g] -> float32 weight [N, K]: q * scale + min."""
    N, K = q.shape
    g = q.float().reshape(N, scale.shape[1], -1) * scale[..., None]
    return (g if lo is None else g + lo[..., None]).reshape(N, K)


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"in_features {K} is not a multiple of the group size {group_size}")
    return w.float().reshape(N, K // group_size, group_size)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [N, K] (N a multiple of 16, K of 8) -> the tiled layout (see the module docstring)."""
    N, K = q.shape
    if bits == 8:
        return q.view(N // TILE, TILE, K // 4, 4).transpose(1, 2).reshape(N // TILE, K * 16).contiguous()
    b = q.view(N // TILE, TILE, K // 8, 2, 4).permute(0, 2, 1, 4, 3)  # (t, o, c, i, half)
    return (b[..., 0] | (b[..., 1] << 4)).reshape(N // TILE, K * 8).contiguous()


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack: the tiled layout -> codes [N, K]."""
    T = packed.shape[0]
    if bits == 8:
        K = packed.shape[1] // 16
        return packed.view(T, K // 4, TILE, 4).transpose(1, 2).reshape(T * TILE, K)
    K = packed.shape[1] // 8
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


def pack_codes(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor | None, bits: int):
    """Codes [N, K] with scale (and min) [N, K/g] -> a QuantTensor's buffers (qweight, scales, mins or None),
    rows padded with zeros to whole tiles: what set_weight stores, for codes made elsewhere (gguf_io repacks
    llama.cpp's Q4_0 / Q4_1 / Q8_0 blocks, which hold exactly such codes and fp16 scales)."""
    pad = -q.shape[0] % TILE

    def rows(t):  # F.pad copies: only when there is padding to add
        return F.pad(t, (0, 0, 0, pad)) if pad else t

    groups = [None if s is None else tile_groups(rows(s)).half() for s in (scale, lo)]
    return pack(rows(q).contiguous(), bits), *groups


def storage_bytes(rows: int, cols: int, bits: int, group_size: int, symmetric: bool) -> int:
    """Bytes of a QuantTensor [rows, cols]: codes, fp16 scales and (4 bits asymmetric) fp16 mins, with the
    tile padding."""
    n = -(-rows // TILE) * TILE
    return n * cols * bits // 8 + n * (cols // group_size) * 2 * (1 if symmetric or bits == 8 else 2)


def quantize_activations_reference(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [M, K] -> the float32 values the kernel multiplies: int8 codes per block of g times the block scale."""
    M, K = x.shape
    xb = x.float().reshape(M, K // group_size, group_size)
    inv, sx = _divisions(xb.abs().amax(-1, keepdim=True))
    return (torch.round(xb * inv).clamp(-127, 127) * sx).reshape(M, K)


def _divisions(amax: torch.Tensor):
    """127 / amax (0 where amax is 0) and amax / 127, correctly rounded to float32 like the C++ divisions
    (torch's vectorised float32 division may multiply by a reciprocal; float64 then float32 is exact here)."""
    a = amax.double()
    return torch.where(a > 0, 127 / a, torch.zeros_like(a)).float(), (a / 127).float()


def quant_matmul_reference(x: torch.Tensor, layer: "QuantLinear") -> torch.Tensor:
    """The C++ kernel's arithmetic in PyTorch, float32 result [M, N]: the exact oracle of the tests.

    Per block b of g inputs: an exact integer dot product of codes (q - 8 when 4-bit symmetric) with
    int8 activation codes, then y = fma(dot, scale * s_x, y) (+ fma(min, s_x * sum(x codes), y) when
    asymmetric), in block order. float64 holds each product exactly, so this matches the kernel's
    float32 fma bit for bit (up to a double rounding, rarer than 1 in 10^8). Memory grows with
    M * N * K/g: for tests, not for models.
    """
    g = layer.group_size
    M, K = x.shape
    xb = x.float().reshape(M, K // g, g)
    inv, sx = _divisions(xb.abs().amax(-1))
    xq = torch.round(xb * inv[..., None]).clamp(-127, 127).double()  # codes [M, nb, g]
    q = unpack(layer.qweight, layer.bits).double().reshape(-1, K // g, g)
    if layer.symmetric:
        q = q - OFFSET[layer.bits]
    dots = torch.einsum("mbk,nbk->mnb", xq, q)                          # exact integers
    scale = untile_groups(layer.scales).float()                         # [N', nb]
    lo = None if layer.symmetric else untile_groups(layer.mins).float()
    y = torch.zeros(M, q.shape[0], dtype=torch.float32)
    for b in range(K // g):
        y = (y.double() + dots[:, :, b] * (scale[None, :, b] * sx[:, b, None]).double()).float()
        if lo is not None:
            y = (y.double() + lo[None, :, b].double() * (sx[:, b] * xq[:, b].sum(-1).float())[:, None].double()).float()
    return y[:, : layer.out_features]


BACKWARD_BLOCK = 2**22  # weights grad_input dequantizes at a time: 16 MB of float32 scratch
MIN_COLUMNS = 128       # but at least this many columns (fewer make the GEMM of a tall matrix inefficient)


def grad_input(grad_y: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
               group_size: int, bits: int, block: int | None = None) -> torch.Tensor:
    """grad_y [M, N] @ W [N, K] in grad_y's dtype: the input gradient of y = x W^T, W in the tiled format
    (the operands of torch.ops.phikit.qlinear; mins None: symmetric).

    W is dequantized a block of columns at a time: all N rows, kb columns (about `block` weights, default
    BACKWARD_BLOCK, and at least MIN_COLUMNS columns), in float32 exactly as QuantTensor.dequantize_all
    does (q * scale + min is exact in float32), then rounded once to grad_y's dtype. One matmul per block
    gives grad_x[:, k0:k1] whole: the sum over N is one GEMM's, as in grad_y @ layer.dequantize(dtype)
    (float32 accumulation in bf16). Transient memory, reused by every block: per block weight 4 bytes of
    float32 scratch, 1 of codes, 1 of temporaries and, for a grad_y not in float32, its copy (2 in bf16):
    about 32 MB in bf16 (24 MB in float32) for every Phi-3-mini matrix, lm_head included, plus grad_x.
    Known limitation: a matrix taller than BACKWARD_BLOCK / MIN_COLUMNS rows (32768) uses more, 8 bytes
    x 128 columns per row: 205 MB in bf16 for Phi-4-mini's 200064-row lm_head (its whole dequantized
    copy would be 1.2 GB).
    """
    T, K, g = qweight.shape[0], scales.shape[1] * group_size, group_size
    N, Np = grad_y.shape[1], T * TILE  # output rows; rows with the tile padding
    # kb columns per block: whole groups, or (a per-channel group wider than the block) a divisor of the group
    cols = max(MIN_COLUMNS, (BACKWARD_BLOCK if block is None else block) // Np)
    kb = min(K, cols // g * g if cols >= g else max(d for d in range(16, cols + 1, 16) if g % d == 0))
    scratch = torch.empty(Np * kb, dtype=torch.float32, device=grad_y.device)
    codes = torch.empty(Np * kb, dtype=qweight.dtype, device=grad_y.device)  # uint8 (4 bits) or int8
    cast = None if grad_y.dtype == torch.float32 else torch.empty(Np * kb, dtype=grad_y.dtype, device=grad_y.device)
    grad_x = torch.empty(grad_y.shape[0], K, dtype=grad_y.dtype, device=grad_y.device)
    per = 2 * bits  # bytes of a tile per input column
    for k0 in range(0, K, kb):
        k1 = min(K, k0 + kb)
        n = k1 - k0
        # the tiled bytes as 32-bit words, so that reordering rows moves 4 bytes at a time
        words, q = qweight[:, k0 * per:k1 * per].view(torch.int32), codes[: Np * n]
        if bits == 4:  # word (t, o, c): row 16t + c, inputs 8o..8o+3 in its low nibbles, 8o+4..8o+7 in its high
            words = words.view(T, n // 8, TILE).transpose(1, 2)
            out = q.view(torch.int32).view(T, TILE, n // 8, 2)  # (t, c, o, half): a byte per code, row-major
            out[..., 0] = words & 0x0F0F0F0F  # (assignments, not out= into strided views: torch.compile traces them)
            out[..., 1] = (words >> 4) & 0x0F0F0F0F
        else:  # word (t, j, c): row 16t + c, inputs 4j..4j+3
            q.view(torch.int32).view(T, TILE, n // 4).copy_(words.view(T, n // 4, TILE).transpose(1, 2))
        w = scratch[: Np * n].copy_(q)
        first, last = k0 // g, (k1 - 1) // g + 1  # the groups the block covers (one if the group is wider)
        scale = untile_groups(scales[:, first:last]).float()[..., None]  # [Np, groups, 1]
        w3 = w.view(Np, last - first, -1)
        if bits == 8:
            w3.mul_(scale)
        elif mins is None:
            w3.sub_(8).mul_(scale)  # (q - 8) * scale: exact, so equal to q * scale + (-8 * scale)
        else:
            w3.mul_(scale).add_(untile_groups(mins[:, first:last]).float()[..., None])
        wk = w.view(Np, n)
        if cast is not None:
            wk = cast[: Np * n].view(Np, n).copy_(wk)
        grad_x[:, k0:k1] = grad_y @ wk[:N]
    return grad_x


def group_size_for(in_features: int, group_size: int) -> int | None:
    """The group size a matrix with in_features inputs gets: group_size, or the largest of 64/32/16 below
    it that divides in_features (None: no group size fits, the layer stays in float); group_size 0 means
    per channel: one group of in_features (a multiple of 16)."""
    if group_size == 0:
        return in_features if in_features % 16 == 0 else None
    for g in (group_size, 64, 32, 16):
        if g <= group_size and in_features % g == 0:
            return g
    return None


# ---- modules --------------------------------------------------------------------------------------

class QuantTensor(nn.Module):
    """Storage of one quantized matrix [N, K] in the tiled layout, with its settings."""

    def __init__(self, rows: int, cols: int, bits: int, group_size: int, symmetric: bool = True):
        super().__init__()
        if bits not in (4, 8) or cols % group_size or group_size % 16:
            raise ValueError(f"cannot quantize [{rows}, {cols}] to {bits} bits in groups of {group_size}")
        self.bits, self.group_size = bits, group_size
        self.symmetric = symmetric or bits == 8
        tiles = -(-rows // TILE)
        dtype = torch.uint8 if bits == 4 else torch.int8
        self.register_buffer("qweight", torch.zeros(tiles, cols * 2 * bits, dtype=dtype))
        self.register_buffer("scales", torch.zeros(tiles, cols // group_size, TILE, dtype=torch.float16))
        if not self.symmetric:
            self.register_buffer("mins", torch.zeros(tiles, cols // group_size, TILE, dtype=torch.float16))
        else:
            self.mins = None

    def set_weight(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> None:
        """Quantize the float matrix w [N, K] into this storage: round-to-nearest, or at 4 bits with
        importance [K] (calibrate.py), the importance-weighted search of search_int4."""
        pad = self.qweight.shape[0] * TILE - w.shape[0]
        if self.bits == 8:
            q, scale = quantize_int8(w, self.group_size)
        else:
            q, scale, lo = quantize_int4(w, self.group_size, self.symmetric) if importance is None else \
                search_int4(w, self.group_size, self.symmetric, importance)
            if not self.symmetric:
                self.mins = tile_groups(F.pad(lo, (0, 0, 0, pad))).half()
        self.qweight = pack(F.pad(q, (0, 0, 0, pad)), self.bits)
        self.scales = tile_groups(F.pad(scale, (0, 0, 0, pad))).half()

    def dequantize_all(self) -> torch.Tensor:
        """float32 [N', K] (padded rows included)."""
        scale = untile_groups(self.scales).float()
        lo = None if self.bits == 8 else -8 * scale if self.symmetric else untile_groups(self.mins).float()
        return dequantize(unpack(self.qweight, self.bits), scale, lo)


class QuantLinear(QuantTensor):
    """y = x W^T with W stored in 4 or 8 bits (see the module docstring for the format).

    Frozen but differentiable in x: with an input that requires grad (LoRA adapters trained in front of or
    beside it), forward returns the same numbers through _QuantMatmul, whose backward is grad_input.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, symmetric: bool = True,
                 kernel: str = "auto"):
        super().__init__(out_features, in_features, bits, group_size, symmetric)
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int, symmetric: bool = True,
                    importance: torch.Tensor | None = None) -> "QuantLinear":
        m = cls(linear.in_features, linear.out_features, bits, group_size, symmetric)
        m.set_weight(linear.weight.detach(), importance)
        return m

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [N, K] in dtype, computed in float32 (the oracle of the tests), rounded once to dtype."""
        return self.dequantize_all()[: self.out_features].to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if torch.is_grad_enabled() and x.requires_grad:  # training through the frozen layer (QLoRA)
            y = _QuantMatmul.apply(x2, self.qweight, self.scales, self.mins, self)
        else:  # inference: no autograd machinery at all
            y = self._matmul(x2)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> x W^T [M, N] in x's dtype, by this layer's kernel (no autograd formula: see forward)."""
        ext = kernels.load() if self.kernel == "auto" else None
        if self.kernel == "oracle":
            y = quant_matmul_reference(x, self)
        elif ext is None:  # no C++ here: the same activation rounding, dequantized weights, float32 GEMM
            y = F.linear(quantize_activations_reference(x, self.group_size), self.dequantize(torch.float32))
        else:  # one operator: quantize the activations, multiply, cast back to x's dtype (as the paths above)
            y = torch.ops.phikit.qlinear(x, self.qweight, self.scales, self.mins, self.group_size, self.bits,
                                         self.out_features)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}")


class _QuantMatmul(torch.autograd.Function):
    """y = layer._matmul(x), differentiable in x only: grad_x = grad_y W (grad_input), the weights frozen.

    The saved tensors are the layer's own buffers (references, no copy) and nothing of x's size: the
    backward needs no activation, since y is linear in x (the activation rounding passed straight through).
    An autograd.Function rather than an autograd formula registered on torch.ops.phikit.qlinear: it covers
    the oracle and no-compiler paths too, and inference never pays for it (forward calls it only when x
    requires grad); torch.compile traces it whole.
    """

    @staticmethod
    def forward(ctx, x, qweight, scales, mins, layer):
        ctx.save_for_backward(qweight, scales, mins)
        ctx.settings = (layer.group_size, layer.bits)
        return layer._matmul(x)

    @staticmethod
    def backward(ctx, grad_y):
        with torch.autocast(grad_y.device.type, enabled=False):  # grad_y's dtype, whatever autocast is on
            return grad_input(grad_y, *ctx.saved_tensors, *ctx.settings), None, None, None, None


class QuantEmbedding(QuantTensor):
    """An embedding table in 4 or 8 bits; a lookup dequantizes only the rows it reads (float32)."""

    def __init__(self, num_embeddings: int, dim: int, bits: int, group_size: int, symmetric: bool = True):
        super().__init__(num_embeddings, dim, bits, group_size, symmetric)
        self.num_embeddings, self.dim = num_embeddings, dim

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: int, group_size: int, symmetric: bool = True):
        m = cls(*emb.weight.shape, bits, group_size, symmetric)
        m.set_weight(emb.weight.detach())
        return m

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        flat = idx.reshape(-1)
        t, c = flat // TILE, flat % TILE
        K, T = self.dim, self.qweight.shape[0]
        if self.bits == 8:
            q = self.qweight.view(T, K // 4, TILE, 4)[t, :, c].reshape(-1, K)
        else:
            b = self.qweight.view(T, K // 8, TILE, 4)[t, :, c]  # (n, K/8, 4): low nibbles k..k+3, high k+4..k+7
            q = torch.stack((b & 15, b >> 4), dim=2).reshape(-1, K)
        scale = self.scales[t, :, c].float()
        lo = None if self.bits == 8 else -8 * scale if self.symmetric else self.mins[t, :, c].float()
        return dequantize(q, scale, lo).reshape(*idx.shape, K)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.dim}, bits={self.bits}, group_size={self.group_size}"


# ---- model surgery --------------------------------------------------------------------------------

def quantize_model(model: nn.Module, bits: int = 4, group_size: int = 32, symmetric: bool = False,
                   keep_8bit: tuple[str, ...] = (), embedding_bits: int | None = 8,
                   importance: dict[str, torch.Tensor] | None = None) -> dict:
    """Swap the model's linear layers (and embedding) for quantized ones, in place; return the settings.

    importance: {linear layer name: [in_features] tensor}, the mean squared input of each layer on
    calibration text (calibrate.activation_stats): its 4-bit layers then get the weighted search of
    search_int4 instead of round-to-nearest (8-bit layers and the embedding stay round-to-nearest);
    every quantized linear layer must have an entry.

    keep_8bit: names (suffixes such as "down_proj", "lm_head") of layers to keep at 8 bits. A matrix
    whose width is not a multiple of group_size gets a smaller group that divides it (group_size_for).
    group_size=0 (8 bits only) is per channel: one scale per output row, and the layer's input
    activations get one scale per token (coarser than a group's: cheaper, less accurate).
    On a model built on the meta device this only changes the structure (for loading).
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if group_size not in (0, 32, 64, 128):
        raise ValueError(f"group_size must be 32, 64, 128 or 0 (per channel), got {group_size}")
    if group_size == 0 and bits != 8:
        raise ValueError("per-channel scales (group_size 0) are for 8 bits; 4 bits need groups of 32-128")
    if embedding_bits not in (None, 4, 8):
        raise ValueError(f"embedding_bits must be 4, 8 or None, got {embedding_bits}")
    meta = next(model.parameters()).is_meta
    done = [n for n, m in model.named_modules() if isinstance(m, QuantTensor)]
    if done:  # its settings would overwrite the record of layers quantized otherwise (e.g. a GGUF loaded as it is)
        raise ValueError(f"the model is quantized already ({done[0]!r} and {len(done) - 1} more layers): quantize "
                         "its float version (a GGUF file: load it with dtype=torch.float32)")
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        g = group_size_for(module.in_features, group_size)
        if g is None:
            continue
        b = 8 if bits == 8 or any(name == k or name.endswith("." + k) or name.endswith(k) for k in keep_8bit) else 4
        if importance is not None and not meta and name not in importance:
            raise ValueError(f"no calibration statistics for layer {name!r}")
        new = QuantLinear(module.in_features, module.out_features, b, g, symmetric) if meta else \
            QuantLinear.from_linear(module, b, g, symmetric, None if importance is None else importance[name])
        _set(model, name, new)
    emb = getattr(model, "embed_tokens", None)
    g = group_size_for(emb.weight.shape[1], group_size) if emb is not None else None
    if embedding_bits is not None and g is not None:
        _set(model, "embed_tokens", QuantEmbedding(*emb.weight.shape, embedding_bits, g, symmetric) if meta
             else QuantEmbedding.from_embedding(emb, embedding_bits, g, symmetric))
    settings = {"format": FORMAT, "bits": bits, "group_size": group_size, "symmetric": symmetric,
                "keep_8bit": sorted(set(keep_8bit)), "embedding_bits": embedding_bits,
                "calibrated": importance is not None}
    if hasattr(model, "cfg"):
        model.cfg.quantization = settings
    return settings


def set_kernel(model: nn.Module, kernel: str) -> None:
    """Choose the kernel of every quantized layer: "auto" (the fast kernels) or "oracle" (the reference)."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.kernel = kernel


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
