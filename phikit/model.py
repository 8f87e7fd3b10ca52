"""The Phi-3 decoder (Phi-3-mini/medium, Phi-3.5-mini, Phi-4-mini): token ids in, logits out.

It computes what transformers' `Phi3ForCausalLM` computes: pre-norm blocks with RMSNorm (fp32 inside),
fused `qkv_proj` with grouped-query attention, rotate-half RoPE (partial on Phi-4-mini, LongRoPE on
the 128k models, see rope.py), an optional sliding window, and a fused `gate_up_proj` SwiGLU MLP.
Parameter names are HF's without the leading `model.`, so checkpoint conversion is a prefix strip.
The model computes logits and nothing else: caching lives in kv_cache.py, sampling in generate.py.

Notation: B batch, T tokens in this call, S keys attended (cached prefix + T), C model dim,
H query heads, Hkv key/value heads, D head dim, d rotary dims (<= D), V vocabulary.

References: Phi-3 Technical Report (arXiv 2404.14219); transformers `models/phi3/modeling_phi3.py`;
nanoGPT `model.py`; gpt-fast `model.py`; ../shared/reference/phi-family.md section 2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import Config
from .kv_cache import KVCache
from .kv_cache import dequantize as dequantize_kv
from .rope import RotaryEmbedding, apply_rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in fp32, then back to the activation dtype *before* the weight multiply (as HF)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # one matmul yields [Q rows | K rows | V rows], each block head-major
        self.qkv_proj = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, input_pos, rows):
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, H, T, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_scale = v_scale = None  # an int8 cache returns codes and their scales (kv_cache.py)
        if self.kv_cache is not None and rows is None:  # Phi3.decode_step: rows 0..B-1, the whole cache
            k, v, k_scale, v_scale = self.kv_cache.write(input_pos, k, v)
        elif self.kv_cache is not None:
            k, v, k_scale, v_scale = self.kv_cache.update(rows, input_pos, k, v, mask.shape[-1],  # (B, Hkv, S, D)
                                                          masked_read=T > 1 or _decode_kernel(k) is None)
        # softmax(q k^T / sqrt(D) + mask) v; each KV head serves H / Hkv neighbouring query heads
        if T == 1:  # one query per sequence (decoding)
            y = decode_attention(q, k, v, mask, k_scale, v_scale)
        else:
            if k_scale is not None:
                k, v = dequantize_kv(k, k_scale, q.dtype), dequantize_kv(v, v_scale, q.dtype)
            y = attention(q, k, v, mask)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(y)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v by PyTorch's SDPA: q (B, H, T, D), k, v (B, Hkv, S, D); mask None: causal.

    A causal mask goes in as is_causal, so the flash kernel skips the blocks above the diagonal (0.6-0.7x
    the time of the same mask as a tensor at T=1024, forward + backward). On the CPU, attention that a
    backward will follow, over a short sequence (T * D <= 16384), runs in float32 even in a bf16 model or
    under bf16 autocast: there the flash backward is faster in float32 than in bf16 (torch 2.13, Zen 4 with
    AVX512-BF16, forward + backward: 0.45-0.6x the time at T=128, D=32, 0.7-1.0x up to T * D = 16384;
    beyond that bf16 is as fast or faster). Under autocast q and k leave RoPE in float32 anyway (the
    tables are float32), so only v is upcast; the result goes back to v's dtype.
    """
    gqa = q.shape[1] != k.shape[1]
    if q.device.type == "cpu" and q.requires_grad and q.shape[-2] * q.shape[-1] <= 16384:
        f32 = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(q.to(f32), k.to(f32), v.to(f32), attn_mask=mask,
                                               is_causal=mask is None, enable_gqa=gqa)
        return y.to(v.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)


DECODE_SPAN = 128  # decoding reads the cache in steps of this many slots (see Phi3.cache_span)


def _decode_kernel(k: torch.Tensor):
    """The compiled module whose decode_attention handles this cache, or None."""
    if k.device.type == "cpu" and k.dtype in (torch.bfloat16, torch.float16, torch.float32, torch.int8):
        return kernels.load()
    return None


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v for one query per sequence: q (B, H, 1, D), k, v (B, Hkv, S, D)
    (int8 codes with scales k_scale, v_scale (B, Hkv, S) for an int8 cache).

    On the CPU the compiled kernel (csrc/decode_attention.cpp) reads the cache slice in place; PyTorch's
    bf16 matmul would copy the strided slice first (4-6x slower) and its flash kernel is slower still
    for one query (8x at 512 keys). Below: the same in PyTorch (GPU, float64, or no compiler).
    """
    B, H, _, D = q.shape
    ext = _decode_kernel(k)
    if ext is not None:  # it skips masked slots (never reads them)
        return torch.ops.phikit.decode_attention(q.reshape(B, H, D), k, v, mask.reshape(B, -1).contiguous(),
                                                 D ** -0.5, k_scale, v_scale).view(B, H, 1, D)
    if k_scale is not None:
        k, v = dequantize_kv(k, k_scale, q.dtype), dequantize_kv(v, v_scale, q.dtype)
    Hkv = k.shape[1]
    s = (q.reshape(B, Hkv, H // Hkv, D) @ k.transpose(-1, -2)) * D ** -0.5  # (B, Hkv, G, S)
    s = s.masked_fill(~mask, float("-inf")).softmax(-1, dtype=torch.promote_types(s.dtype, torch.float32))
    return (s.to(v.dtype) @ v).reshape(B, H, 1, D)


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=False)  # rows [gate | up]
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, input_pos, rows):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos, rows)
        return x + self.mlp(self.post_attention_layernorm(x))


class Phi3(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(cfg)
        self.cache_rope_long: torch.Tensor | None = None  # (B_max,) LongRoPE list of each cached row: long?
        self.kv_cache_dtype: torch.dtype | None = None  # setup_cache's default; None: the activation dtype

    @classmethod
    def empty(cls, cfg: Config) -> "Phi3":
        """The model's structure on the meta device, without initialising it (a checkpoint is loaded next).

        Random init on the meta device is wasted work, and it goes through torch's decompositions,
        which import torch._dynamo: ~70 MB of resident memory for nothing (measured).
        """
        saved = {name: getattr(nn.init, name) for name in ("kaiming_uniform_", "uniform_", "normal_")}
        try:
            for name in saved:
                setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
            with torch.device("meta"):
                return cls(cfg)
        finally:
            for name, fn in saved.items():
                setattr(nn.init, name, fn)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None,
                rows: slice | torch.Tensor | None = None, last_only: bool = False,
                rope_long: torch.Tensor | None = None, segments: torch.Tensor | None = None,
                select: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) for token ids idx (B, T); (B, 1, V) for the last position only with last_only;
        (N, V) for the N positions where the bool mask select (B, T) is set (training: the trained ones).

        input_pos: (T,) or (B, T) absolute positions, default 0..T-1. With a cache (setup_cache) the
        keys and values are written at these positions and all earlier cached ones are attended.
        rows: which cache rows (sequence slots) this batch is: a slice or index tensor, default 0..B-1.
        rope_long: (B,) bool, the LongRoPE list of each sequence; default: chosen from input_pos (long
        if the sequence reaches past original_max_seq_len). A prompt run in chunks passes the choice
        of the whole prompt, so that its first chunks use the list its last one needs.
        segments: (B, T) ints, without a cache only: a token attends only to earlier tokens of its own
        segment. Packed training rows (several examples in one row, input_pos restarting at 0 for each)
        pass each example's index here: the mask is block-diagonal, so no example sees another.
        """
        B, T = idx.shape
        W = self.cfg.sliding_window
        # the plain causal mask (positions 0..T-1, no cache, no segments, no window within T) is left to SDPA
        causal = input_pos is None and self.cache_rope_long is None and segments is None and (W is None or T <= W)
        if input_pos is None:
            input_pos = torch.arange(T, device=idx.device)
        input_pos = input_pos.expand(B, T) if input_pos.dim() == 1 else input_pos  # (B, T)
        rows = slice(0, B) if rows is None else rows
        use_long = self.rope.use_long(input_pos) if rope_long is None else rope_long  # (B,) LongRoPE list
        if self.cache_rope_long is not None:
            self._check_cache_rope(input_pos, use_long, rows)
            S = self.cache_span(input_pos, decoding=T == 1)[1]
        else:
            S = T  # no cache: the keys are this call's tokens, at positions input_pos
        cos, sin = self.rope(input_pos, use_long)
        x = self.embed_tokens(idx).to(self.norm.weight.dtype)  # (B, T, C); the cast matters for a quantized table
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # rotate in the activation dtype, as HF does
        mask = None if causal else self._mask(input_pos, S)  # None: causal
        if segments is not None:
            if self.cache_rope_long is not None:
                raise ValueError("segments (packed rows) are for training without a cache")
            mask = mask & (segments[:, None, :, None] == segments[:, None, None, :])  # (B, 1, T, T) block-diagonal
        for block in self.layers:
            x = block(x, cos, sin, mask, input_pos, rows)
        if last_only:  # prefill needs the next-token logits only: skip T-1 rows of the (large) output matmul
            x = x[:, -1:]
        elif select is not None:  # SFT trains the assistant's tokens only: the output matmul skips the others
            x = x[select]  # (N, C)
        return self.lm_head(self.norm(x))

    def decode_step(self, idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of one new token for each cache row 0..B-1: ids idx (B, 1) at positions input_pos (B, 1).

        forward() for one token per row, written for torch.compile (generate.compile_decode): no host
        synchronisation and no shape that depends on a position. It attends over the whole cache; the
        mask hides the slots past each position (the decode kernel never reads them). Call
        prepare_decode_step(input_pos) first: the checks and bookkeeping that need the positions' values.
        """
        cos, sin = self.rope(input_pos, self.rope.use_long(input_pos))
        x = self.embed_tokens(idx).to(self.norm.weight.dtype)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        mask = self._mask(input_pos, self.layers[0].self_attn.kv_cache.max_len)
        for block in self.layers:
            x = block(x, cos, sin, mask, input_pos, None)  # rows=None: the whole cache, rows 0..B-1
        return self.lm_head(self.norm(x))[:, -1]

    def prepare_decode_step(self, input_pos: torch.Tensor) -> None:
        """The host-side part of decode_step (eager), for positions (B, 1): positions within the cache,
        one LongRoPE list per sequence, and the cache invariant (slots up to the last position written or zeroed)."""
        if self.cache_rope_long is None:
            raise ValueError("decode_step needs a cache: call setup_cache first")
        B = input_pos.shape[0]
        S = self.cache_span(input_pos, decoding=False)[0]
        cache = self.layers[0].self_attn.kv_cache
        if B > cache.k.shape[0]:
            raise ValueError(f"{B} sequences for a cache of {cache.k.shape[0]} rows")
        self._check_cache_rope(input_pos, self.rope.use_long(input_pos), slice(0, B))
        n = S if _decode_kernel(cache.k) is not None else cache.max_len  # PyTorch's attention reads masked slots
        for block in self.layers:
            block.self_attn.kv_cache.zero_until(n)

    def cache_span(self, input_pos: torch.Tensor, decoding: bool) -> tuple[int, int]:
        """(last, S) for a call at positions input_pos with a cache: last = the highest position + 1 (refused
        beyond the cache size), S = the cache slots attended: last, or when decoding a multiple of DECODE_SPAN
        (the mask hides the rest): a new key count every step would make oneDNN build (and cache) a new
        matmul each step, ~1.5 MB of RSS per token."""
        last = int(input_pos.max()) + 1
        max_len = self.layers[0].self_attn.kv_cache.max_len
        if last > max_len:
            raise ValueError(f"position {last - 1} is beyond the cache size {max_len}")
        return last, (min(-(-last // DECODE_SPAN) * DECODE_SPAN, max_len) if decoding else last)

    def _mask(self, input_pos: torch.Tensor, S: int) -> torch.Tensor:
        """(B, 1, T, S) bool: query at position p sees key slot j iff p - W < j <= p (W = sliding window)."""
        if self.cache_rope_long is not None:
            key_pos = torch.arange(S, device=input_pos.device)[None, None, :]  # cache slot j holds position j
        else:
            key_pos = input_pos[:, None, :]  # (B, 1, S): keys are this call's tokens
        q_pos = input_pos[:, :, None]  # (B, T, 1)
        mask = key_pos <= q_pos
        if self.cfg.sliding_window is not None:
            mask &= key_pos > q_pos - self.cfg.sliding_window
        return mask[:, None]  # broadcast over heads

    def setup_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> None:
        """Attach a static KV cache of `batch` sequence slots, `max_len` positions each, in dtype (default:
        kv_cache_dtype, else the activation dtype); torch.int8 stores codes and scales (kv_cache.py)."""
        dtype = dtype or self.cache_dtype
        device = self.norm.weight.device
        for block in self.layers:
            block.self_attn.kv_cache = KVCache(batch, self.cfg.n_kv_heads, max_len, self.cfg.head_dim, dtype, device)
        self.cache_rope_long = torch.zeros(batch, dtype=torch.bool, device=device)

    @property
    def cache_dtype(self) -> torch.dtype:
        """The dtype setup_cache uses by default."""
        return self.kv_cache_dtype or self.norm.weight.dtype  # the activation dtype (norms are never quantized)

    def remove_cache(self) -> None:
        for block in self.layers:
            block.self_attn.kv_cache = None
        self.cache_rope_long = None

    def _check_cache_rope(self, input_pos: torch.Tensor, use_long: torch.Tensor, rows) -> None:
        """Refuse a call that would mix LongRoPE lists within one cached sequence.

        A sequence that grows past original_max_seq_len switches from the short to the long factor
        list. Re-rotating its cached keys cannot make it consistent: from layer 1 on, the cached keys
        and values were computed from hidden states that the short-factor attention produced. The
        whole sequence must be run again from position 0 (what transformers does, and what
        `generate()` does at the switch point).
        """
        stale = (self.cache_rope_long[rows] != use_long) & (input_pos.amin(dim=-1) > 0)
        if bool(stale.any()):
            raise ValueError("this call crosses the LongRoPE switch point (original_max_seq_len="
                             f"{self.cfg.original_max_seq_len}) for a sequence whose cached prefix used the other factor "
                             "list; re-run the whole sequence from position 0 (phikit.generate does this)")
        self.cache_rope_long[rows] = use_long

    def init_weights(self, seed: int | None = None) -> None:
        """Pretraining init: N(0, 0.02) weights, unit norms; residual outputs scaled by 1/sqrt(2 n_layers).

        The residual stream sums 2 * n_layers branch outputs (o_proj, down_proj), so scaling those
        keeps its variance from growing with depth (GPT-2; nanoGPT `model.py`).
        """
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            else:
                std = 0.02 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                nn.init.normal_(p, 0.0, std, generator=gen)
