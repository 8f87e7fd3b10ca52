"""The fused decoding step (fused_decode.py, csrc/decode_step.cpp) gives the eager step's logits to the bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import phikit
from phikit import kernels
from phikit.bf16_linear import use_bf16_kernel
from phikit.fused_decode import fused_decoder
from phikit.generate import prefill
from phikit.model import Phi3
from phikit.quantize import quantize_model, set_kernel
from tiny import tiny_config

pytestmark = pytest.mark.skipif(kernels.load() is None, reason="the compiled kernels do not build here")


def model_for(preset: str, dtype=torch.float32, quant=None, seed=0, **kw) -> Phi3:
    model = Phi3(tiny_config(preset, **kw)).eval()
    model.init_weights(seed)
    with torch.no_grad():  # larger weights than pretraining init, so that logits are not all near zero
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10)
    model.to(dtype)
    if dtype == torch.bfloat16:
        use_bf16_kernel(model)
    if quant is not None:
        quantize_model(model, **quant)
    return model


def eager(model, tok, pos):
    return model(tok[:, None], pos[:, None])[:, -1]


def fused(model, tok, pos):
    step = fused_decoder(model)
    assert step is not None
    return step(tok, pos)


@torch.no_grad()
def logits_per_step(model, step, prompts, steps, kv=None, seed=0):
    """Teacher-forced: prefill each prompt into its row, then `steps` random tokens through `step`."""
    B = len(prompts)
    gen = torch.Generator().manual_seed(seed)
    model.setup_cache(B, 64, kv)
    try:
        for b, p in enumerate(prompts):
            prefill(model, torch.tensor(p), b)
        pos = torch.tensor([len(p) for p in prompts])
        out = []
        for _ in range(steps):
            tok = torch.randint(0, model.cfg.vocab_size, (B,), generator=gen)
            out.append(step(model, tok, pos))
            pos = pos + 1
        return out
    finally:
        model.remove_cache()


CASES = {  # name -> (preset, dtype, quantization)
    "int4 asym, float32": ("phi-3-mini-4k-instruct", torch.float32, dict(bits=4, group_size=32)),
    "int4 sym, gqa, partial rotary": ("phi-4-mini-instruct", torch.float32, dict(bits=4, group_size=32, symmetric=True)),
    "longrope, long factors": ("phi-3.5-mini-instruct", torch.float32, dict(bits=4, group_size=32)),
    "int8, sliding window": ("phi-3-mini-4k-instruct", torch.float32, dict(bits=8, group_size=32)),
    "float32": ("phi-3-medium-4k-instruct", torch.float32, None),
    "bf16 kernel": ("phi-3-mini-4k-instruct", torch.bfloat16, None),
    "int4 over bf16": ("phi-4-mini-instruct", torch.bfloat16, dict(bits=4, group_size=32)),
}


@pytest.mark.parametrize("kv", [None, torch.int8])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_step_equals_the_eager_step_to_the_bit(case, kv):
    preset, dtype, quant = CASES[case]
    # LongRoPE presets switch at 16 tokens here: past it from the prompt on, except for the "long factors" case
    model = model_for(preset, dtype, quant, **({} if "long" in case else dict(original_max_seq_len=48)))
    prompts = [[5, 9, 3, 7, 1, 4, 4, 8, 2, 6, 3, 3, 9], [11, 2], [7] * 5]  # rows at different positions
    if "long" in case:
        prompts = [(p * 20)[:n] for p, n in zip(prompts, (20, 17, 25))]  # every row past the switch point at once
    want = logits_per_step(model, eager, prompts, 14, kv)  # past the sliding window of 11
    got = logits_per_step(model, fused, prompts, 14, kv)
    for a, b in zip(want, got):
        assert torch.equal(a, b), (a - b).abs().max()


def test_generate_runs_the_fused_step_and_gives_the_eager_tokens(monkeypatch):
    """Across the LongRoPE switch point (a re-prefill of the row), with rows finishing at different steps."""
    import importlib

    generate = importlib.import_module("phikit.generate")  # the module (phikit.generate is also the function)

    model = model_for("phi-3-mini-128k-instruct", quant=dict(bits=4, group_size=32))  # switch at 16 tokens
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8]]
    calls = []
    real = generate.fused_decoder
    monkeypatch.setattr(generate, "fused_decoder", lambda m: calls.append(1) or real(m))
    fast = list(phikit.generate(model, prompts, 20))
    assert calls  # the default decode step went through the fused path
    monkeypatch.setattr(generate, "fused_decoder", lambda m: None)
    assert list(phikit.generate(model, prompts, 20)) == fast


def test_what_the_fused_step_does_not_run():
    model = model_for("phi-3-mini-4k-instruct", quant=dict(bits=4, group_size=32))
    assert fused_decoder(model) is None  # no cache
    model.setup_cache(1, 16)
    assert fused_decoder(model) is not None
    set_kernel(model, "oracle")  # the reference kernel is Python: eager
    assert fused_decoder(model) is None
    set_kernel(model, "auto")
    assert fused_decoder(model) is not None
    model.layers[1].mlp.down_proj = nn.Sequential(model.layers[1].mlp.down_proj)  # a module it does not know
    assert fused_decoder(model) is None
    model.remove_cache()


def test_lora_layers_keep_the_eager_step():
    from phikit.train.lora import apply_lora

    model = model_for("phi-3-mini-4k-instruct", quant=dict(bits=4, group_size=32))
    apply_lora(model, "all-linear", r=4)
    model.setup_cache(1, 16)
    assert fused_decoder(model) is None
    model.remove_cache()


def test_a_replaced_layer_rebuilds_the_decoder():
    """A module or weight swapped after the first step (an adapter merged, a layer re-quantized) is seen."""
    model = model_for("phi-3-mini-4k-instruct")
    prompts = [[1, 2, 3]]
    logits_per_step(model, fused, prompts, 2)
    first = fused_decoder_for(model)
    with torch.no_grad():
        model.layers[0].mlp.down_proj.weight = nn.Parameter(model.layers[0].mlp.down_proj.weight * 2)
    want = logits_per_step(model, eager, prompts, 3)
    got = logits_per_step(model, fused, prompts, 3)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert fused_decoder_for(model) is not first
    quantize_model(model, bits=4, group_size=32)
    want = logits_per_step(model, eager, prompts, 3)
    assert all(torch.equal(a, b) for a, b in zip(want, logits_per_step(model, fused, prompts, 3)))


def fused_decoder_for(model):
    model.setup_cache(1, 16)
    try:
        return fused_decoder(model)
    finally:
        model.remove_cache()


def test_a_new_cache_is_the_one_written():
    """Each setup_cache makes new cache tensors (Python may give the new objects the old ones' ids): the step
    must write and read the cache the model has now."""
    model = model_for("phi-3-mini-4k-instruct", quant=dict(bits=4, group_size=32))
    for B, max_len in [(1, 16), (2, 32), (1, 16), (3, 48), (1, 16)]:
        prompts = [[1 + b, 2, 3] for b in range(B)]
        model.setup_cache(B, max_len)
        for b, p in enumerate(prompts):
            prefill(model, torch.tensor(p), b)
        tok, pos = torch.arange(B) + 5, torch.full((B,), 3)
        got = fused(model, tok, pos)
        for block in model.layers:  # the keys of this step are in the model's cache
            assert block.self_attn.kv_cache.k[:B, :, 3].abs().sum() > 0
        model.remove_cache()
        model.setup_cache(B, max_len)
        for b, p in enumerate(prompts):
            prefill(model, torch.tensor(p), b)
        assert torch.equal(eager(model, tok, pos), got)
        model.remove_cache()


def test_a_model_cast_to_another_dtype_rebuilds_the_decoder():
    """model.to(dtype) keeps its Parameter objects and swaps their data: the Decoder must follow."""
    model = model_for("phi-3-mini-4k-instruct")
    prompts = [[1, 2, 3]]
    logits_per_step(model, fused, prompts, 2)
    model.to(torch.bfloat16)
    want = logits_per_step(model, eager, prompts, 3)
    got = logits_per_step(model, fused, prompts, 3)
    assert all(a.dtype == torch.bfloat16 and torch.equal(a, b) for a, b in zip(want, got))


def test_a_bf16_verification_on_a_shared_row_warns_nothing(recwarn, capfd):
    """The generic (non-float32) step writes a shared cache row through its real row, not an expanded view."""
    from phikit.speculate import verify

    model = model_for("phi-3-mini-4k-instruct", torch.bfloat16)
    model.setup_cache(1, 32)
    prefill(model, torch.tensor([1, 2, 3, 4]), 0)
    got = verify(model, 0, [1, 2, 3, 4], [5, 6, 7])
    model.remove_cache()
    assert got.shape == (4, model.cfg.vocab_size)
    assert "expanded" not in capfd.readouterr().err and not [w for w in recwarn if "expanded" in str(w.message)]
