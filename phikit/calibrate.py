"""Calibration for quantization: how large each linear layer's inputs are on ordinary text.

`activation_stats(model, ids)` runs the float model over token ids (windows of 512 tokens, no KV
cache) with a hook on every nn.Linear and returns, per layer, the mean of x_k^2 over the tokens for
each input k: a float32 vector [in_features]. `quantize_model(..., importance=stats)` then picks
each 4-bit group's scale and min to minimise the error weighted by those values (quantize.py
search_int4), so the inputs that carry large activations are rounded more finely.

`calibration_text()` is phikit's own sample (calibration.txt: about 3.9K SmolLM2 tokens of
textbook-style prose and notes). It shares no sentence with heldout.txt, the text the quality gate
measures on, so `phikit quantize --calibrate --check` does not grade the calibration on its own data.

References: llama.cpp `tools/imatrix` (per-column sums of squared activations);
AWQ (Lin et al., 2023, "Activation-aware Weight Quantization").
"""

from __future__ import annotations

import sys
from importlib.resources import files

import torch
from torch import nn


def calibration_text() -> str:
    return files("phikit.eval").joinpath("calibration.txt").read_text(encoding="utf-8")


@torch.no_grad()
def activation_stats(model: nn.Module, ids: list[int], window: int = 512,
                     progress: bool = True) -> dict[str, torch.Tensor]:
    """{linear layer name: mean over tokens of each input's square, float32 [in_features]} for the
    model's float nn.Linear layers, running it on ids in windows of `window` tokens."""
    if len(ids) < 2:
        raise ValueError("calibration needs some text: it encoded to fewer than 2 tokens")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(module, inputs):
            x = inputs[0].detach().reshape(-1, module.in_features).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not handles:
        raise ValueError("the model has no float linear layers to calibrate (is it quantized already?)")
    from tqdm import tqdm

    try:
        starts = range(0, len(ids), window)
        for s in tqdm(starts, desc="calibrate", unit="window", file=sys.stderr, disable=not progress):
            model(torch.tensor([ids[s:s + window]]))
    finally:
        for h in handles:
            h.remove()
    stats = {name: (sums[name] / counts[name]).float() for name in sums}
    bad = [name for name, v in stats.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"the float model's activations overflow on the calibration text ({', '.join(bad[:3])}"
                         f"{'...' if len(bad) > 3 else ''}); calibrate in bfloat16 or float32 (--dtype)")
    return stats
