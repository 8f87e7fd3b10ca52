"""Static, preallocated key/value cache: one per attention layer.

The cache holds (B_max, Hkv, T_max, D) buffers. A forward call writes the keys and values of its
tokens at their absolute positions (cache slot = position) and reads back the first
`max(position) + 1` slots, so the allocated size never changes what is computed.

Each batch row is one sequence slot. `rows` picks the slots a call works on: a slice (a view, no
copy; the usual case) or an index tensor (a gather, for scattered slots). Example:

    cache = KVCache(batch=2, n_kv_heads=8, max_len=4096, head_dim=128, dtype=torch.bfloat16)
    k_all, v_all, _, _ = cache.update(slice(0, 1), input_pos, k, v)   # prefill sequence 0 alone
    k_all, v_all, _, _ = cache.update(slice(0, 2), input_pos, k, v)   # then decode both together

An int8 cache (dtype=torch.int8) stores each key and value vector (one token, one head) as int8 codes
with one float32 scale, max|x| / 127 (half the memory of bf16, plus 4 bytes per vector); update()
returns the codes and the scales, which the decode kernel reads directly and `dequantize` turns
back into floats for the other attention paths.

References: gpt-fast `model.py::KVCache`; torchtune `modules/kv_cache.py`; llama.cpp's q8_0 cache types.
"""

from __future__ import annotations

import torch


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) float -> int8 codes (..., D) and float32 scales (...): x ~ codes * scale."""
    amax = x.abs().amax(-1).float()
    scale = amax / 127
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return torch.round(x.float() * inv[..., None]).clamp(-127, 127).to(torch.int8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of quantize, in dtype."""
    return (q.float() * scale[..., None]).to(dtype)


ZERO_STEP = 16  # slots zeroed at a time ahead of the context (a decoding step would zero one otherwise)


class KVCache(torch.nn.Module):
    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        # allocated, not touched: slots are zeroed as the context reaches them (see update), so resident
        # memory follows the context in use, not the context allocated
        self.register_buffer("k", torch.empty(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.empty(shape, dtype=dtype, device=device), persistent=False)
        if dtype == torch.int8:
            self.register_buffer("k_scale", torch.empty(shape[:3], device=device), persistent=False)
            self.register_buffer("v_scale", torch.empty(shape[:3], device=device), persistent=False)
        else:
            self.k_scale = self.v_scale = None
        self.zeroed = 0  # slots [0, zeroed) of every row hold written or zeroed values, never garbage

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @staticmethod
    def bytes_per_value(dtype: torch.dtype, head_dim: int) -> float:
        """Memory per cached number (keys and values alike), scales included."""
        return 1 + 4 / head_dim if dtype == torch.int8 else dtype.itemsize

    def update(self, rows: slice | torch.Tensor, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               span: int | None = None, masked_read: bool = True):
        """Write k, v (B, Hkv, T, D) at positions input_pos (B, T) of `rows`; return the first S slots:
        k, v (B, Hkv, S, D) and, for an int8 cache, their scales (B, Hkv, S) (else None, None).
        S = span, or max pos + 1. Slots past a row's position hold zeros or stale values, which the
        attention mask hides; `masked_read=False` says the attention never reads masked slots (the
        decode kernel), so those past the last position need not be zeroed (nor become resident)."""
        T = k.shape[2]
        last = int(input_pos.max()) + 1
        S = span if span is not None else last
        self.zero_until(S if masked_read else last)  # (decoding zeroes 16 slots at a time: fewer calls)
        pos = input_pos[0]
        if isinstance(rows, slice) and bool((input_pos == pos).all()):
            if T > 1 and bool((pos.diff() == 1).all()):
                pos = slice(int(pos[0]), int(pos[0]) + T)  # contiguous positions shared by all rows
            self._store((rows, slice(None), pos), k, v)
        else:  # per-row positions: advanced indexing puts the (B, T) index dims first
            r = torch.arange(self.k.shape[0], device=k.device)[rows][:, None]  # (B, 1)
            self._store((r, slice(None), input_pos), k.transpose(1, 2), v.transpose(1, 2))  # (B, T, Hkv, D)
        if self.k_scale is None:
            return self.k[rows, :, :S], self.v[rows, :, :S], None, None
        return self.k[rows, :, :S], self.v[rows, :, :S], self.k_scale[rows, :, :S], self.v_scale[rows, :, :S]

    def _store(self, index: tuple, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.k_scale is None:
            self.k[index], self.v[index] = k, v
        else:
            (self.k[index], self.k_scale[index]), (self.v[index], self.v_scale[index]) = quantize(k), quantize(v)

    def zero_until(self, n: int) -> None:
        """Zero the never-written slots below n (attention may read them, masked: they must be finite);
        16 slots at a time, at least."""
        if n > self.zeroed:
            n = min(-(-n // ZERO_STEP) * ZERO_STEP, self.max_len)
            for t in (self.k, self.v, self.k_scale, self.v_scale):
                if t is not None:
                    t[:, :, self.zeroed:n].zero_()
            self.zeroed = n

    def write(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, Hkv, T, D) of rows 0..B-1 at positions input_pos (B, T) and return those rows'
        whole cache (k, v, k_scale, v_scale as update does) with no host synchronisation (for a
        compiled decode step). The caller keeps the invariant: zero_until(max position + 1) first."""
        B = k.shape[0]
        r = torch.arange(B, device=k.device)[:, None]  # (B, 1)
        self._store((r, slice(None), input_pos), k.transpose(1, 2), v.transpose(1, 2))  # (B, T, Hkv, D)
        if self.k_scale is None:
            return self.k[:B], self.v[:B], None, None
        return self.k[:B], self.v[:B], self.k_scale[:B], self.v_scale[:B]
