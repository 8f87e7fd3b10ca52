"""phikit: the Phi-3 / Phi-3.5 / Phi-4-mini language models in plain PyTorch.

    model, tokenizer = phikit.load("microsoft/Phi-4-mini-instruct", dtype=torch.bfloat16)
    logits = model(input_ids)                       # (batch, time, vocab)
    for (tok,) in phikit.generate(model, [ids], max_new_tokens=64): ...
"""

from __future__ import annotations

import os

from .checkpoint import CheckpointError, load_model, resolve, save
from .config import PRESETS, Config, ConfigError
from .generate import Sampling, generate, stream_text
from .model import Phi3
from .tokenizer import Tokenizer, TokenizerError

__all__ = ["Config", "ConfigError", "PRESETS", "Phi3", "load", "load_model", "save", "Tokenizer", "TokenizerError",
           "CheckpointError", "Sampling", "generate", "stream_text"]
__version__ = "0.1.0"


def load(path_or_id: str | os.PathLike, dtype=None, revision: str | None = None) -> tuple[Phi3, Tokenizer | None]:
    """(model, tokenizer) from a checkpoint directory, a hub id or a .gguf file.

    The tokenizer is None if a checkpoint directory has no tokenizer.json. GGUF weights are
    dequantized to dtype (default float32).
    """
    if str(path_or_id).lower().endswith(".gguf"):
        from .gguf_io import load_gguf

        return load_gguf(path_or_id, dtype=dtype)
    ckpt = resolve(path_or_id, revision)
    model = load_model(ckpt, dtype=dtype)
    tokenizer = Tokenizer(ckpt) if (ckpt / "tokenizer.json").exists() else None
    return model, tokenizer
