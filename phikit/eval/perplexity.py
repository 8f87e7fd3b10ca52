"""Perplexity of a model on a token stream, and how closely a second model agrees with it.

Used by the quantization quality gate: the quantized model is compared with the float model on
held-out text (`heldout.txt`, written for this purpose and not part of any training set phikit
ships) by perplexity, mean KL divergence of the next-token distributions, and top-1 agreement.
"""

from __future__ import annotations

from importlib.resources import files

import torch
import torch.nn.functional as F


def heldout_text() -> str:
    return files("phikit.eval").joinpath("heldout.txt").read_text(encoding="utf-8")


def _windows(ids: list[int], window: int):
    for start in range(0, max(len(ids) - 1, 1), window):
        chunk = ids[start:start + window + 1]
        if len(chunk) >= 2:
            yield torch.tensor([chunk])


@torch.no_grad()
def compare(reference, candidate, ids: list[int], window: int = 512) -> dict:
    """Perplexities of both models and the candidate's agreement with the reference.

    Returns ppl_reference, ppl_candidate, kl (mean KL(reference || candidate) per token, nats) and
    top1 (fraction of positions where both models' most likely next token is the same).
    """
    nll_r = nll_c = kl = agree = n = 0.0
    for x in _windows(ids, window):
        inp, target = x[:, :-1], x[0, 1:]
        lr = reference(inp)[0].float().log_softmax(-1)
        lc = candidate(inp)[0].float().log_softmax(-1)
        nll_r += -lr.gather(-1, target[:, None]).sum().item()
        nll_c += -lc.gather(-1, target[:, None]).sum().item()
        kl += F.kl_div(lc, lr, log_target=True, reduction="sum").item()
        agree += (lr.argmax(-1) == lc.argmax(-1)).sum().item()
        n += target.numel()
    if n == 0:
        raise ValueError("no text to evaluate on (need at least two tokens)")
    return {"tokens": int(n), "ppl_reference": float(torch.tensor(nll_r / n).exp()),
            "ppl_candidate": float(torch.tensor(nll_c / n).exp()), "kl": kl / n, "top1": agree / n}
