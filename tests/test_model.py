"""The model against transformers' Phi3ForCausalLM on tiny random-weight checkpoints of every preset."""

import pytest
import torch
from tiny import ORIG, TESTED_PRESETS, VOCAB, WINDOW, tiny_config, write_checkpoint

from phikit.checkpoint import load_model
from phikit.generate import generate
from phikit.model import Phi3, attention


@pytest.fixture(scope="module", params=TESTED_PRESETS)
def pair(request, tmp_path_factory):
    """(preset, transformers model, phikit model loaded from the transformers checkpoint), float32."""
    cfg = tiny_config(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf = write_checkpoint(cfg, path)
    return request.param, hf, load_model(path)


def test_tiny_configs_keep_preset_features():
    cfgs = {p: tiny_config(p) for p in TESTED_PRESETS}
    assert cfgs["phi-4-mini-instruct"].n_heads // cfgs["phi-4-mini-instruct"].n_kv_heads == 3
    assert cfgs["phi-4-mini-instruct"].rotary_dim == 12 and cfgs["phi-4-mini-instruct"].tie_embeddings
    assert cfgs["phi-3-medium-4k-instruct"].n_heads // cfgs["phi-3-medium-4k-instruct"].n_kv_heads == 4
    assert cfgs["phi-3-mini-4k-instruct"].sliding_window == WINDOW
    assert cfgs["phi-3.5-mini-instruct"].longrope and cfgs["phi-3.5-mini-instruct"].original_max_seq_len == ORIG


@pytest.mark.parametrize("T", [ORIG - 3, 2 * ORIG + 5])  # below and above the LongRoPE switch / the window
def test_logits_match_transformers(pair, T):
    preset, hf, model = pair
    ids = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        want = hf(ids).logits
        got = model(ids)
    assert got.shape == (2, T, VOCAB)
    delta = (got - want).abs().max().item()
    print(f"\n[parity] {preset} T={T}: max|delta| = {delta:.3e} (logit scale {want.abs().max().item():.1f})")
    assert delta <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_transformers(request, dtype, tmp_path):
    """Both libraries load the same checkpoint in bf16/fp16 (from_pretrained keeps HF's rope tables in fp32)."""
    from transformers import Phi3ForCausalLM

    cfg = tiny_config("phi-4-mini-instruct")  # GQA, partial rotary, LongRoPE, tied embeddings
    write_checkpoint(cfg, tmp_path)
    hf = Phi3ForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
    model = load_model(tmp_path, dtype=dtype)
    assert model.embed_tokens.weight.dtype == dtype
    ids = torch.randint(0, VOCAB, (1, 2 * ORIG + 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = hf(ids).logits, model(ids)
    assert got.dtype == want.dtype == dtype  # logits stay in the model dtype, as in transformers
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_greedy_generation_matches_transformers(pair):
    """48 greedy tokens from a prompt shorter than ORIG: generation crosses the LongRoPE switch point."""
    preset, hf, model = pair
    prompt = torch.randint(0, VOCAB, (1, ORIG - 6), generator=torch.Generator().manual_seed(7))
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=48, do_sample=False, pad_token_id=0)[0, prompt.shape[1]:].tolist()
    got = [t for (t,) in generate(model, [prompt[0].tolist()], max_new_tokens=48)]
    assert got == want


def test_cached_decode_equals_full_forward_float64(pair):
    """At every step, decoding with the cache gives the logits of a fresh full forward (float64)."""
    preset, _, model = pair
    model = model.double()
    try:
        ids = torch.randint(0, VOCAB, (1, 2 * ORIG + 4), generator=torch.Generator().manual_seed(3))
        n_prompt = ORIG // 2
        model.setup_cache(1, ids.shape[1])
        with torch.no_grad():
            cached = [model(ids[:, :n_prompt])[0, -1]]
            for t in range(n_prompt, ids.shape[1]):
                if model.cfg.longrope and t == ORIG:  # crossing the switch point: re-run from 0, as generate() does
                    cached.append(model(ids[:, :t + 1])[0, -1])
                else:
                    cached.append(model(ids[:, t:t + 1], torch.tensor([t]))[0, -1])
            model.remove_cache()
            for i, t in enumerate(range(n_prompt, ids.shape[1] + 1)):
                full = model(ids[:, :t])[0, -1]
                torch.testing.assert_close(cached[i], full, atol=1e-10, rtol=0)
    finally:
        model.remove_cache()
        model.float()


def test_batch_of_mixed_lengths_equals_each_alone(pair):
    preset, _, model = pair
    g = torch.Generator().manual_seed(11)
    short = torch.randint(0, VOCAB, (5,), generator=g).tolist()
    long = torch.randint(0, VOCAB, (2 * ORIG + 3,), generator=g).tolist()  # already past the switch point
    alone = [[t for (t,) in generate(model, [p], max_new_tokens=24)] for p in (short, long)]
    together = list(zip(*generate(model, [short, long], max_new_tokens=24)))
    assert [list(col) for col in together] == alone


def test_allocated_context_does_not_change_tokens(pair):
    preset, _, model = pair
    prompt = torch.randint(0, VOCAB, (ORIG - 2,), generator=torch.Generator().manual_seed(5)).tolist()
    runs = [[t for (t,) in generate(model, [prompt], max_new_tokens=20, max_seq_len=n)] for n in (40, 64, 300)]
    assert runs[0] == runs[1] == runs[2]


@pytest.mark.parametrize("preset", [p for p in TESTED_PRESETS if tiny_config(p).longrope])
def test_crossing_the_switch_point_needs_a_rerun(preset):
    """A cached sequence cannot switch LongRoPE lists mid-way: the model refuses, generate() re-prefills."""
    model = Phi3(tiny_config(preset)).eval()
    model.init_weights(seed=0)
    ids = torch.randint(0, VOCAB, (1, ORIG + 1), generator=torch.Generator().manual_seed(2))
    model.setup_cache(1, ORIG + 1)
    with torch.no_grad():
        model(ids[:, :ORIG])  # short factors
        with pytest.raises(ValueError, match="LongRoPE switch point"):
            model(ids[:, ORIG:], torch.tensor([ORIG]))
        model(ids)  # the whole sequence again from position 0: fine


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [32, 24])  # 32: the AVX-512 path for bf16; 24: the portable one
def test_decode_attention_kernel_equals_pytorch(dtype, head_dim):
    """The compiled decode attention reads a strided cache slice in place and equals the PyTorch path."""
    from phikit import kernels
    from phikit.model import decode_attention

    if kernels.load() is None:
        pytest.skip("the C++ kernels cannot be built here")
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, S = 3, 8, 2, 37
    cache = torch.randn(2, B, Hkv, 64, head_dim, generator=g).to(dtype)  # a static cache; attend to its first S
    k, v = cache[0, :, :, :S], cache[1, :, :, :S]
    q = torch.randn(B, H, 1, head_dim, generator=g).to(dtype)
    mask = torch.rand(B, 1, 1, S, generator=g) > 0.3
    mask[:, :, :, 0] = True
    fast = decode_attention(q, k, v, mask)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                           enable_gqa=True).to(dtype)
    assert fast.shape == (B, H, 1, head_dim) and fast.dtype == dtype
    torch.testing.assert_close(fast, ref, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("head_dim", [32, 24])  # 32: the AVX-512 path; 24: the portable one
def test_decode_attention_reads_an_int8_cache(head_dim):
    """An int8 cache (codes, one scale per token and head): the kernel equals PyTorch on the dequantized
    cache, and stays near the float cache it stores."""
    from phikit import kernels
    from phikit.kv_cache import dequantize, quantize
    from phikit.model import decode_attention

    if kernels.load() is None:
        pytest.skip("the C++ kernels cannot be built here")
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, S = 3, 8, 2, 37
    cache = torch.randn(2, B, Hkv, 64, head_dim, generator=g)
    (kq, ks), (vq, vs) = quantize(cache[0]), quantize(cache[1])
    q = torch.randn(B, H, 1, head_dim, generator=g)
    mask = torch.rand(B, 1, 1, S, generator=g) > 0.3
    mask[:, :, :, 0] = True
    fast = decode_attention(q, kq[:, :, :S], vq[:, :, :S], mask, ks[:, :, :S], vs[:, :, :S])
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ref = sdpa(q, dequantize(kq, ks, torch.float32)[:, :, :S], dequantize(vq, vs, torch.float32)[:, :, :S],
               attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    full = sdpa(q, cache[0, :, :, :S], cache[1, :, :, :S], attn_mask=mask, enable_gqa=True)
    assert 0 < (fast - full).abs().max() <= 0.02 * full.abs().max()


def test_int8_cache_tracks_the_float_cache(pair):
    """Decoding with an int8 KV cache: logits near the float cache's at every step (prefill, decode, the
    LongRoPE re-run); a batch still equals each sequence alone, and the allocated context changes nothing."""
    preset, _, model = pair
    ids = torch.randint(0, VOCAB, (1, 2 * ORIG + 4), generator=torch.Generator().manual_seed(3))
    n_prompt = ORIG // 2

    def run(dtype):
        model.setup_cache(1, ids.shape[1], dtype)
        with torch.no_grad():
            out = [model(ids[:, :n_prompt])[0, -1]]
            for t in range(n_prompt, ids.shape[1]):
                if model.cfg.longrope and t == ORIG:
                    out.append(model(ids[:, :t + 1])[0, -1])
                else:
                    out.append(model(ids[:, t:t + 1], torch.tensor([t]))[0, -1])
        model.remove_cache()
        return torch.stack(out)

    exact, int8 = run(torch.float32), run(torch.int8)
    err = (int8 - exact).abs()  # measured: 1.2-2.3% mean, 2-6% max (tiny random models attend sharply)
    assert 0 < err.mean() <= 0.03 * exact.abs().mean() and err.max() <= 0.1 * exact.abs().max()
    model.kv_cache_dtype = torch.int8
    try:
        g = torch.Generator().manual_seed(11)
        short = torch.randint(0, VOCAB, (5,), generator=g).tolist()
        long = torch.randint(0, VOCAB, (2 * ORIG + 3,), generator=g).tolist()
        alone = [[t for (t,) in generate(model, [p], max_new_tokens=16, max_seq_len=n)]
                 for p in (short, long) for n in (60, 300)]
        assert alone[0] == alone[1] and alone[2] == alone[3]
        together = list(zip(*generate(model, [short, long], max_new_tokens=16)))
        assert [list(col) for col in together] == [alone[0], alone[2]]
    finally:
        model.kv_cache_dtype = None


# ---- training attention paths: is_causal, and float32 attention when a backward follows --------------
@pytest.mark.parametrize("preset", TESTED_PRESETS)
def test_causal_path_equals_the_mask(preset):
    """No input_pos, no cache, no segments: SDPA's is_causal gives the logits of the explicit mask (positions 0..T-1)."""
    model = Phi3(tiny_config(preset)).eval()
    model.init_weights(seed=0)
    T = min(24, model.cfg.sliding_window or 24)
    ids = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), model(ids, input_pos=torch.arange(T)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_with_a_backward_matches_float64(dtype):
    """The float32 training path (taken on the CPU when a backward follows) is at least as close to a float64
    reference as bf16 SDPA, for the output and the gradients of q, k, v (GQA: 4 query heads per KV head)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 64, 32, generator=g, dtype=torch.float64) for h in (8, 2, 2))
    dy = torch.randn(2, 8, 64, 32, generator=g, dtype=torch.float64)

    def run(q, k, v, fn):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        y = fn(q, k, v)
        y.backward(dy.to(y.dtype))
        return [t.double() for t in (y, q.grad, k.grad, v.grad)]
    sdpa = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ref = run(q, k, v, sdpa)
    low = [t.to(dtype) for t in (q, k, v)]
    ours, plain = run(*low, lambda q, k, v: attention(q, k, v, None)), run(*low, sdpa)
    for name, r, a, b in zip(("y", "dq", "dk", "dv"), ref, ours, plain):
        err, err_plain = (a - r).abs().max().item(), (b - r).abs().max().item()
        assert err <= err_plain * 1.01 + 1e-6, f"{name}: {err:.3e} vs SDPA {err_plain:.3e}"
