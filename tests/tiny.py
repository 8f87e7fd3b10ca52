"""Tiny random-weight checkpoints of every preset, written by transformers itself (the reference).

A tiny config keeps what makes each preset distinct: the GQA ratio, the rotary fraction, tied
embeddings, the LongRoPE factor lists (their first rotary_dim/2 entries), and the sliding window
(scaled down); `original_max_seq_len` is scaled down to ORIG so that short test sequences cross it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from phikit.config import Config

ORIG = 16         # scaled-down original_max_position_embeddings (LongRoPE switch point)
WINDOW = 11       # scaled-down sliding window of the 4k presets
HEAD_DIM = 16
VOCAB = 600       # >= the tiny test tokenizers' vocabularies (tiny_tokenizer.py)
TESTED_PRESETS = ["phi-3-mini-4k-instruct", "phi-3-mini-128k-instruct", "phi-3-medium-4k-instruct",
                  "phi-3-medium-128k-instruct", "phi-3.5-mini-instruct", "phi-4-mini-instruct"]
# Phi-3-medium-128k's preset has no verified short_factor list; its first entries are known
# (tests/fixtures/configs/SOURCES.md) and are all a tiny rotary size needs.
_MEDIUM_128K_SHORT_HEAD = [1.0] * 6 + [1.01, 1.02]


def tiny_config(preset: str, **overrides) -> Config:
    extra = {"rope_short_factor": _MEDIUM_128K_SHORT_HEAD + [1.0] * 56} if preset == "phi-3-medium-128k-instruct" else {}
    base = Config.from_name(preset, **extra)
    ratio = base.n_heads // base.n_kv_heads  # keep the GQA ratio: 1 (MHA), 3 (Phi-4-mini), 4 (medium)
    n_kv = 1 if ratio >= 3 else 2
    n_heads = n_kv * ratio
    kw = dict(vocab_size=VOCAB, dim=n_heads * HEAD_DIM, head_dim=0, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv,
              ffn_dim=64, bos_token_id=1, eos_token_id=2, pad_token_id=2, torch_dtype="float32")
    if base.longrope:
        half = int(HEAD_DIM * base.rotary_frac) // 2
        kw.update(rope_short_factor=base.rope_short_factor[:half], rope_long_factor=base.rope_long_factor[:half],
                  original_max_seq_len=ORIG, max_seq_len=ORIG * 32)  # s = 32 as in the real 128k models
    else:
        kw.update(max_seq_len=4 * ORIG, original_max_seq_len=4 * ORIG)
    if base.sliding_window is not None and base.sliding_window < base.max_seq_len:
        kw["sliding_window"] = WINDOW
    kw.update(overrides)
    return Config.from_name(preset, **kw)


def hf_model(cfg: Config, seed: int = 0, dtype: torch.dtype = torch.float32):
    """transformers' Phi3ForCausalLM for our config, with random weights (std 0.2 so logits are not tiny)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    hf = cfg.to_hf()
    hcfg = Phi3Config(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type", "torch_dtype")})
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(hcfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
            else:
                p.uniform_(0.5, 1.5)
    return model.to(dtype).eval()


def write_checkpoint(cfg: Config, path: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **save_kw):
    """Save a random transformers model for cfg with save_pretrained; returns the transformers model."""
    model = hf_model(cfg, seed, dtype)
    model.save_pretrained(path, **save_kw)
    return model
