"""AdamW with weight-decay groups, and learning-rate schedules as pure functions of the step.

Weight decay applies to the matrices of the attention and MLP projections and to lm_head. It does not
apply to 1-D parameters (RMSNorm gains) or to the token embedding: decay pulls every row of the
embedding table toward zero on every step, while a rare token's row gets a gradient only on the steps
where that token appears, so decay would mostly erase rare tokens (the choice of OLMo and of
nanoGPT's successors; nanoGPT itself decays all 2-D tensors). A tied lm_head is the embedding, so it
is not decayed either.

Schedules (step counts optimizer steps from 1; lr_at(total) is the last step's rate):
  cosine  linear warmup to lr over `warmup` steps, then half a cosine down to min_lr at `total`.
  wsd     warmup-stable-decay: linear warmup, constant lr, then a linear decay to min_lr over the last
          `decay_frac` of the steps (Hu et al. 2024, MiniCPM, arXiv 2404.06395). Two-phase pretraining
          often sets decay_frac to the second phase's share, so the decay anneals on the better data.

References: nanoGPT `train.py::get_lr` and `model.py::configure_optimizers`; PyTorch `torch.optim.AdamW`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SCHEDULES = ("cosine", "wsd")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed projection matrices, and undecayed norms and embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or "embed_tokens" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95), eps: float = 1e-8
                   ) -> torch.optim.AdamW:
    """AdamW over param_groups(model): fused (one pass over each tensor), or foreach for an FSDP2 model.

    fused=True updates each parameter in one pass; on the CPU that is 7x faster than foreach, whose
    multi-tensor ops each make a full pass over the weights and the state (3.7M parameters: 2.8 ms
    against 20 ms, measured), and 5x faster than torch's per-tensor default. It does not accept the
    DTensor parameters of an FSDP2 model on the CPU, which get foreach. A checkpoint's param_groups
    carry the choice of the run that saved it (load_state_dict restores them), so the hook puts ours
    back: a run can resume on a different number of processes.
    """
    groups = param_groups(model, weight_decay)
    fused = not any(_is_dtensor(p) for g in groups for p in g["params"])
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused, foreach=not fused)

    def keep_implementation(opt: torch.optim.Optimizer) -> None:
        for group in opt.param_groups:
            group["fused"], group["foreach"] = fused, not fused
    optimizer.register_load_state_dict_post_hook(keep_implementation)
    return optimizer


def _is_dtensor(p: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(p, DTensor)


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, total: int, schedule: str = "cosine",
          decay_frac: float = 0.2) -> float:
    """The learning rate of optimizer step `step` (1-based) of `total`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    if step <= warmup:
        return lr * step / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)  # 0 after warmup -> 1 at the last step
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))
    decay_steps = max(1, round(decay_frac * total))
    decay_start = max(warmup, total - decay_steps)
    if step <= decay_start:
        return lr
    return lr - (lr - min_lr) * min(1.0, (step - decay_start) / (total - decay_start))
