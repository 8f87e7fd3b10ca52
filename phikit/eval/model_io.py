"""The model under evaluation: loaded as phikit.load does, tokenized as transformers tokenizes."""

from __future__ import annotations

import torch

from ..model import Phi3
from ..tokenizer import Tokenizer

DTYPES = {None: None, "auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_for_eval(pretrained: str | None, dtype: str | None = None,
                  adapter: str | None = None) -> tuple[Phi3, Tokenizer, str]:
    """(model in eval mode, tokenizer, source name) for a checkpoint directory, hub id, .gguf file or adapter
    directory, with an optional LoRA adapter directory on top."""
    from .. import load

    if not pretrained:
        raise ValueError("no model given: pass pretrained=PATH (a checkpoint directory, hub id or .gguf file)")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, float32, bfloat16, float16")
    model, tokenizer = load(pretrained, dtype=DTYPES[dtype])
    if tokenizer is None:
        raise ValueError(f"{pretrained} has no tokenizer.json; evaluation needs one")
    source = str(pretrained)
    if adapter:
        from ..train.adapters import load_adapter
        from ..train.lora import set_active

        load_adapter(model, adapter, name="eval")
        set_active(model, "eval")
        source += f"+{adapter}"
    return model.eval().requires_grad_(False), tokenizer, source


def encode_like_transformers(tokenizer: Tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """Token ids as transformers' tokenizer.encode gives them: with special tokens, the tokenizer.json
    post-processor's, corrected by tokenizer_config's add_bos_token where the two disagree (transformers
    follows add_bos_token for the Llama-style Phi-3 tokenizers)."""
    ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    if not add_special_tokens or tokenizer.bos_id is None:
        return ids
    want_bos = tokenizer.config.get("add_bos_token")
    has_bos = bool(ids) and ids[0] == tokenizer.bos_id and not (tokenizer.bos_token and text.startswith(tokenizer.bos_token))
    if want_bos is True and not has_bos:
        return [tokenizer.bos_id] + ids
    if want_bos is False and has_bos:
        return ids[1:]
    return ids
