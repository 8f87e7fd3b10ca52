"""Losses as functions, not trainers (torchtune `modules/loss`, `rlhf/loss/dpo.py`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label value that contributes nothing (SFT prompt tokens, padding)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                  reduction: str = "mean") -> torch.Tensor:
    """Mean (or with reduction="sum", summed) next-token cross-entropy over the labels that are not ignore_index.

    logits: (B, T, V) in any float dtype, upcast to float32 here so a bf16-autocast forward still gets
    an fp32 log-softmax. labels: (B, T), already shifted (labels[:, t] is the token after position t).
    For packed pretraining nothing is masked and this is the plain mean over B * T tokens. SFT sums
    over micro-batches and divides by the trained tokens of the whole step (recipes/sft.py).
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=ignore_index,
                           reduction=reduction)
