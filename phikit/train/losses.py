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


# ----------------------------------------------------------------------------------------- preferences
# Each takes per-pair summed log-probabilities (P,) of the chosen and rejected responses under the policy
# and the reference, and returns the per-pair losses (P,); the step's loss is their mean. TRL `DPOTrainer`
# (trl/trainer/dpo_trainer.py) computes the same numbers (tests/test_dpo.py).

def dpo_loss(chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, beta: float,
             label_smoothing: float = 0.0) -> torch.Tensor:
    """Sigmoid DPO (Rafailov et al. 2023, eq. 7): -log σ(β (Δ_chosen - Δ_rejected)), Δ = log π - log π_ref.

    label_smoothing ε > 0 is conservative DPO (Mitchell 2023): the labels are taken as flipped with
    probability ε, -(1 - ε) log σ(βd) - ε log σ(-βd)."""
    d = beta * (chosen_logratio - rejected_logratio)
    return -(1 - label_smoothing) * F.logsigmoid(d) - label_smoothing * F.logsigmoid(-d)


def robust_dpo_loss(chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, beta: float,
                    label_smoothing: float) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, eq. 10): an unbiased loss when labels flip with probability ε < 0.5,
    (-(1 - ε) log σ(βd) + ε log σ(-βd)) / (1 - 2ε); TRL's `label_smoothing` means this for loss_type="robust"."""
    d = beta * (chosen_logratio - rejected_logratio)
    return (-(1 - label_smoothing) * F.logsigmoid(d) + label_smoothing * F.logsigmoid(-d)) / (1 - 2 * label_smoothing)


def ipo_loss(chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, beta: float,
             chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17): ((Δ_chosen / n_chosen - Δ_rejected / n_rejected) - 1 / (2β))², β = τ.

    The log-ratios are averaged over each response's tokens, as TRL does (and as the IPO authors' results were
    computed), so that β means the same for long and short responses."""
    d = chosen_logratio / chosen_tokens.clamp(min=1) - rejected_logratio / rejected_tokens.clamp(min=1)
    return (d - 1 / (2 * beta)) ** 2


PREFERENCE_LOSSES = ("sigmoid", "robust", "ipo")


def preference_loss(loss_type: str, policy: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor],
                    beta: float, label_smoothing: float = 0.0,
                    tokens: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Per-pair losses (P,) of loss_type for (chosen, rejected) log-probs of the policy and the reference;
    tokens: (chosen, rejected) response lengths, which IPO needs."""
    chosen, rejected = policy[0] - reference[0], policy[1] - reference[1]
    if loss_type == "sigmoid":
        return dpo_loss(chosen, rejected, beta, label_smoothing)
    if loss_type == "robust":
        return robust_dpo_loss(chosen, rejected, beta, label_smoothing)
    if loss_type == "ipo":
        return ipo_loss(chosen, rejected, beta, *tokens)
    raise ValueError(f"unknown preference loss {loss_type!r}; expected one of {', '.join(PREFERENCE_LOSSES)}")


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor, sequence: torch.Tensor, n: int) -> torch.Tensor:
    """Summed log-probabilities (n,) of the targets of n sequences, from the logits of their trained positions.

    logits: (N, V), targets: (N,) the next tokens there, sequence: (N,) which sequence each position
    belongs to (0..n-1). float32 log-softmax whatever the logits' dtype."""
    token_logps = -F.cross_entropy(logits.float(), targets, reduction="none")  # log p(target) per position
    return torch.zeros(n, dtype=torch.float32, device=logits.device).index_add(0, sequence, token_logps)
