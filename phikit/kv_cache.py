"""Static, preallocated key/value cache: one per attention layer.

The cache holds (B_max, Hkv, T_max, D) buffers. A forward call writes the keys and values of its
tokens at their absolute positions (cache slot = position) and reads back the first
`max(position) + 1` slots, so the allocated size never changes what is computed.

Each batch row is one sequence slot. `rows` picks the slots a call works on: a slice (a view, no
copy; the usual case) or an index tensor (a gather, for scattered slots). Example:

    cache = KVCache(batch=2, n_kv_heads=8, max_len=4096, head_dim=128, dtype=torch.bfloat16)
    k_all, v_all = cache.update(slice(0, 1), input_pos, k, v)   # prefill sequence 0 alone
    k_all, v_all = cache.update(slice(0, 2), input_pos, k, v)   # then decode both together

References: gpt-fast `model.py::KVCache`; torchtune `modules/kv_cache.py`.
"""

from __future__ import annotations

import torch


class KVCache(torch.nn.Module):
    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        # allocated, not touched: slots are zeroed as the context reaches them (see update), so resident
        # memory follows the context in use, not the context allocated
        self.register_buffer("k", torch.empty(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.empty(shape, dtype=dtype, device=device), persistent=False)
        self.zeroed = 0  # slots [0, zeroed) of every row hold written or zeroed values, never garbage

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, rows: slice | torch.Tensor, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               span: int | None = None, masked_read: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, D) at positions input_pos (B, T) of `rows`; return the first S slots
        (B, Hkv, S, D): S = span, or max pos + 1. Slots past a row's position hold zeros or stale values,
        which the attention mask hides; `masked_read=False` says the attention never reads masked slots
        (the decode kernel), so those past the last position need not be zeroed (nor become resident)."""
        T = k.shape[2]
        last = int(input_pos.max()) + 1
        S = span if span is not None else last
        zero_to = S if masked_read else last
        if zero_to > self.zeroed:  # unwritten slots that attention reads must be finite (masked) zeros
            self.k[:, :, self.zeroed:zero_to].zero_()
            self.v[:, :, self.zeroed:zero_to].zero_()
            self.zeroed = zero_to
        pos = input_pos[0]
        if isinstance(rows, slice) and bool((input_pos == pos).all()):
            if T > 1 and bool((pos.diff() == 1).all()):
                pos = slice(int(pos[0]), int(pos[0]) + T)  # contiguous positions shared by all rows
            self.k[rows, :, pos] = k
            self.v[rows, :, pos] = v
        else:  # per-row positions: advanced indexing puts the (B, T) index dims first
            r = torch.arange(self.k.shape[0], device=k.device)[rows][:, None]  # (B, 1)
            self.k[r, :, input_pos] = k.transpose(1, 2)  # (B, T, Hkv, D)
            self.v[r, :, input_pos] = v.transpose(1, 2)
        return self.k[rows, :, :S], self.v[rows, :, :S]
