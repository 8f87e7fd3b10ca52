"""bf16 decoding kernel (phikit/bf16_linear.py, csrc/bf16_linear.cpp) against float32 arithmetic."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import phikit
from phikit import bf16_linear
from phikit.bf16_linear import BF16Linear, use_bf16_kernel

from tiny import tiny_config


def _cpu_has_avx512_bf16() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "avx512_bf16" in flags


def _reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """float32 sums of the bf16 products, rounded once to bf16 (what the kernel computes, in another order)."""
    return (x.double() @ w.double().T).to(torch.bfloat16)


def test_the_kernel_runs_on_a_cpu_with_avx512_bf16():
    """So that the tests below exercise the kernel, not the fallback, wherever the CPU can run it."""
    assert bf16_linear.available() == _cpu_has_avx512_bf16()


@pytest.mark.parametrize("rows", [1, 2, 5, 8])
@pytest.mark.parametrize("k", [32, 96, 3072])
def test_bf16_linear_equals_float_arithmetic(rows, k):
    g = torch.Generator().manual_seed(rows * k)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    layer = nn.Linear(k, 37, bias=False).to(torch.bfloat16)  # 37 outputs: no multiple of anything
    with torch.no_grad():
        layer.weight.copy_(torch.randn(37, k, generator=g))
    use_bf16_kernel(layer)
    assert type(layer) is BF16Linear
    with torch.no_grad():
        y = layer(x)
    ref = _reference(x, layer.weight)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 37)
    # the same float32 sum in another order: at most one bf16 rounding step apart
    assert ((y.float() - ref.float()).abs() <= ref.float().abs() * 2**-7 + 1e-3 * k**0.5).all()
    if bf16_linear.available():
        assert torch.equal(y, torch.ops.phikit.bf16_linear(x, layer.weight))  # the kernel is the path taken


def test_more_rows_training_and_other_dtypes_take_pytorch_s_path():
    layer = nn.Linear(64, 16, bias=False).to(torch.bfloat16)
    use_bf16_kernel(layer)
    x = torch.randn(9, 64).to(torch.bfloat16)  # 9 rows: prefill, PyTorch's GEMM
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight))
    y = layer(x[:1])  # autograd on: nn.Linear's path, and gradients flow
    y.float().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.shape == (16, 64)
    f32 = nn.Linear(64, 16, bias=False)
    assert use_bf16_kernel(f32) == 0 and type(f32) is nn.Linear


def test_load_switches_bf16_models_only(tmp_path):
    cfg = tiny_config("phi-3-mini-4k-instruct")
    model = phikit.Phi3(cfg)
    phikit.save(model, tmp_path)
    bf16, _ = phikit.load(tmp_path, dtype=torch.bfloat16)
    f32, _ = phikit.load(tmp_path, dtype=torch.float32)
    assert {type(m) for m in bf16.modules() if isinstance(m, nn.Linear)} == {BF16Linear}
    assert not any(isinstance(m, BF16Linear) for m in f32.modules())
    assert bf16.state_dict().keys() == f32.state_dict().keys()


@pytest.mark.parametrize("preset", ["phi-3-mini-4k-instruct", "phi-3-medium-4k-instruct"])
def test_bf16_decoding_matches_pytorch_s_linear(preset, tmp_path):
    """Decode steps of a bf16 model through the kernel: logits as PyTorch's bf16 linear gives them (both
    round each layer's output to bf16, so they differ by bf16 rounding), and greedy tokens the same."""
    from phikit.generate import decode_one, prefill

    cfg = tiny_config(preset)
    torch.manual_seed(0)
    model = phikit.Phi3(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    phikit.save(model, tmp_path)
    fast, _ = phikit.load(tmp_path, dtype=torch.bfloat16)
    slow, _ = phikit.load(tmp_path, dtype=torch.bfloat16)
    for m in slow.modules():
        if type(m) is BF16Linear:
            m.__class__ = nn.Linear
    prompt = torch.randint(0, cfg.vocab_size, (7,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = []
        for m in (fast, slow):
            m.setup_cache(1, 32)
            prefill(m, prompt, 0)
            steps, tok = [], torch.tensor([5])
            for i in range(8):
                out = decode_one(m, tok, torch.tensor([7 + i]))
                steps.append(out.float())
                tok = out.argmax(-1)
            logits.append(torch.stack(steps))
    a, b = logits
    assert (a - b).abs().max() <= 0.03 * b.abs().max()
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_compiled_bf16_decoding_equals_eager():
    from phikit.generate import compile_decode

    cfg = tiny_config("phi-3-mini-128k-instruct")
    torch.manual_seed(0)
    model = phikit.Phi3(cfg).to(torch.bfloat16).eval()
    use_bf16_kernel(model)
    prompts = [[5, 9, 11, 3, 7, 8, 1, 4, 2, 6][: n] for n in (10, 4)]
    eager = list(phikit.generate(model, prompts, 24))  # crosses the LongRoPE switch at 16
    assert list(phikit.generate(model, prompts, 24, decode_fn=compile_decode(model))) == eager
