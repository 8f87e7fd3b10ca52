"""Rotary position embeddings: plain, partial (Phi-4-mini) and LongRoPE (Phi-3-128k, 3.5, 4-mini).

Convention (rotate-half / NeoX, not interleaved): the rotary dims of a head split into halves
x1 = x[:d/2], x2 = x[d/2:d], and
    inv_freq[i] = 1 / (ext[i] * theta^(2i/d))              i = 0 .. d/2-1, ext = 1 without LongRoPE
    angle[p, i] = p * inv_freq[i]
    rope(x)     = a * (x * cos(angle') + rotate_half(x) * sin(angle')),   angle' = [angle, angle]
    rotate_half([x1, x2]) = [-x2, x1]
Dims d..head_dim pass through unchanged (partial rotary: d = 96 of 128 on Phi-4-mini).

LongRoPE, our rule (the one transformers' Phi3 applies): a sequence of length n uses
ext = short_factor when n <= original_max_seq_len and ext = long_factor otherwise, with the
attention factor a = sqrt(1 + ln(s)/ln(L0)) on both lists. The choice is made per sequence, from
that sequence's own length, exactly as a fresh full forward over it would choose. When a cached
sequence crosses the switch point, its whole prefix is run again with the long factors
(re-prefill, as transformers does; `generate()` does it, and the model refuses a call that would
mix the lists). Re-rotating the cached keys in place is not enough: it fixes layer 0 only, since
deeper layers' cached keys and values come from hidden states computed with the short factors.
mlx-lm always uses the long factors and llama.cpp chooses by the allocated context; both differ
from transformers for short inputs (phi-family.md section 3.4).

References: transformers `modeling_rope_utils.py::_compute_longrope_parameters` and
`dynamic_rope_update`; `models/phi3/modeling_phi3.py::apply_rotary_pos_emb`;
LongRoPE, arXiv 2402.13753.
"""

from __future__ import annotations

import torch

from .config import Config


def inv_freq(cfg: Config, long: bool) -> torch.Tensor:
    """Inverse frequencies (d/2,) in float32, divided by the LongRoPE factors when the config has them."""
    d = cfg.rotary_dim
    exponent = torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d
    base = cfg.rope_theta ** exponent
    if cfg.longrope:
        ext = torch.tensor(cfg.rope_long_factor if long else cfg.rope_short_factor, dtype=torch.float32, device="cpu")
        base = ext * base
    return 1.0 / base


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables for given positions, choosing the LongRoPE factor list per sequence."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        # plain attributes, not buffers: they are derived from the config, never loaded, and built on
        # the CPU even when the model itself is built on the meta device
        self.inv_freq_short = inv_freq(cfg, long=False)
        self.inv_freq_long = inv_freq(cfg, long=True)

    def use_long(self, input_pos: torch.Tensor) -> torch.Tensor:
        """(B, T) positions -> (B,) bool: does each sequence need the long factors?

        A sequence whose largest position is p has length p + 1 in a full forward; transformers
        switches to the long list when that length exceeds original_max_seq_len.
        """
        if not self.cfg.longrope:
            return torch.zeros(input_pos.shape[0], dtype=torch.bool, device=input_pos.device)
        return input_pos.amax(dim=-1) + 1 > self.cfg.original_max_seq_len

    def tables(self, input_pos: torch.Tensor, long: bool | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) positions and a (B,) long/short choice -> cos, sin of shape (B, T, d), float32."""
        dev = input_pos.device
        if isinstance(long, bool):
            inv = (self.inv_freq_long if long else self.inv_freq_short).to(dev)[None, :]  # (1, d/2)
            scale = torch.tensor([self.cfg.rope_mscale(long)], device=dev)
        else:
            inv = torch.where(long[:, None], self.inv_freq_long.to(dev), self.inv_freq_short.to(dev))  # (B, d/2)
            scale = torch.where(long, self.cfg.rope_mscale(True), self.cfg.rope_mscale(False)).float()
        freqs = input_pos[..., None].float() * inv[:, None, :]  # (B, T, d/2), float32 as in transformers
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, d)
        a = scale[:, None, None]
        return emb.cos() * a, emb.sin() * a

    def forward(self, input_pos: torch.Tensor, long: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tables(input_pos, long)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first d dims of each head. x: (B, H, T, D); cos, sin: (B, T, d) in x's dtype."""
    d = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, d): broadcast over heads
    if d == x.shape[-1]:  # full rotary (all but Phi-4-mini)
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :d], x[..., d:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)
