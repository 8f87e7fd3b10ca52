"""phikit: the Phi-3 / Phi-3.5 / Phi-4-mini language models in plain PyTorch.

    model, tokenizer = phikit.load("microsoft/Phi-4-mini-instruct", dtype=torch.bfloat16)
    logits = model(input_ids)                       # (batch, time, vocab)
    for (tok,) in phikit.generate(model, [ids], max_new_tokens=64): ...
"""

from __future__ import annotations

import os
from pathlib import Path

from .checkpoint import CheckpointError, load_model, resolve, save
from .config import PRESETS, Config, ConfigError
from .generate import Sampling, generate, stream_text
from .model import Phi3
from .tokenizer import Tokenizer, TokenizerError

__all__ = ["Config", "ConfigError", "PRESETS", "Phi3", "load", "load_model", "save", "Tokenizer", "TokenizerError",
           "CheckpointError", "Sampling", "generate", "stream_text"]
__version__ = "0.1.0"


def load(path_or_id: str | os.PathLike, dtype=None, revision: str | None = None) -> tuple[Phi3, Tokenizer | None]:
    """(model, tokenizer) from a checkpoint directory, a hub id, a .gguf file or a LoRA adapter directory.

    The tokenizer is None if a checkpoint directory has no tokenizer.json. A GGUF file keeps its Q4_0,
    Q4_1 and Q8_0 matrices quantized and the rest in float32, or with a dtype is all dequantized to it
    (gguf_io.load_gguf). An adapter directory (PEFT's adapter_config.json and
    adapter_model.safetensors, e.g. what `phikit sft` writes after a LoRA run) loads the base it names
    (`base_model_name_or_path`) and applies the adapter unmerged; its own tokenizer, if it has one,
    replaces the base's (`train/adapters.py` loads adapters onto a loaded model). A base that is itself an
    adapter directory (an adapter trained on top of another one) has its adapter merged first.
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir() and (path / "adapter_config.json").exists() and not (path / "config.json").exists():
        from .train.adapters import adapter_base, load_adapter

        from .train.lora import adapter_names, merge_lora

        model, tokenizer = load(adapter_base(path), dtype=dtype, revision=revision)
        for name in adapter_names(model):  # the base is itself an adapter (e.g. DPO after a LoRA SFT): fold it in
            merge_lora(model, name)
        load_adapter(model, path)
        if (path / "tokenizer.json").exists():
            tokenizer = Tokenizer(path)
    else:
        model, tokenizer = _load_base(path_or_id, dtype, revision)
    return model, tokenizer


def _load_base(path_or_id, dtype, revision):
    if str(path_or_id).lower().endswith(".gguf"):
        from .gguf_io import load_gguf

        return load_gguf(path_or_id, dtype=dtype)
    ckpt = resolve(path_or_id, revision)
    model = load_model(ckpt, dtype=dtype)
    tokenizer = Tokenizer(ckpt) if (ckpt / "tokenizer.json").exists() else None
    return model, tokenizer
