"""Weight-only quantization: kernels against the dequantize oracle, layouts, save/load, the CLI and its gate."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import phikit
from phikit.config import Config
from phikit.model import Phi3
from phikit import kernels
from phikit.quantize import (QuantEmbedding, QuantLinear, dequantize, pack, quantize_activations_reference,
                             quantize_int4, quantize_int8, quantize_model, set_kernel, tile_groups, unpack,
                             untile_groups)


def Int4Linear(lin, g, symmetric=False):
    return QuantLinear.from_linear(lin, 4, g, symmetric)


def Int8Linear(lin, g=32):
    return QuantLinear.from_linear(lin, 8, g)


def linear(N, K, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(K, N, bias=False)
    nn.init.normal_(lin.weight, 0.0, 0.02)
    lin.weight.data[:, 3] *= 20  # an outlier input channel, as real models have
    return lin


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def test_layouts():
    """4 bits: byte 64o + 4c + i of tile t holds q[16t + c, 8o + i] (low nibble) and q[16t + c, 8o + 4 + i];
    8 bits: byte 64j + 4c + i of tile t holds q[16t + c, 4j + i]."""
    q = torch.randint(0, 16, (48, 96), dtype=torch.uint8)
    packed = pack(q, 4)
    assert packed.shape == (3, 96 * 8) and torch.equal(unpack(packed, 4), q)
    for t, o, c, i in [(0, 0, 0, 0), (1, 5, 7, 3), (2, 11, 15, 2)]:
        byte = int(packed[t, 64 * o + 4 * c + i])
        assert byte & 15 == q[16 * t + c, 8 * o + i] and byte >> 4 == q[16 * t + c, 8 * o + 4 + i]
    q8 = torch.randint(-127, 128, (48, 96), dtype=torch.int8)
    packed = pack(q8, 8)
    assert packed.shape == (3, 96 * 16) and torch.equal(unpack(packed, 8), q8)
    for t, j, c, i in [(0, 0, 0, 0), (1, 5, 7, 3), (2, 23, 15, 2)]:
        assert packed[t, 64 * j + 4 * c + i] == q8[16 * t + c, 4 * j + i]
    s = torch.randn(48, 3)
    assert tile_groups(s)[1, 2, 5] == s[16 + 5, 2] and torch.equal(untile_groups(tile_groups(s)), s)


needs_kernels = pytest.mark.skipif(kernels.load() is None, reason="the C++ int4 kernels cannot be built here")


@needs_kernels
@pytest.mark.parametrize("bits, group_size, symmetric", [(4, 32, True), (4, 32, False), (4, 64, True), (4, 128, False),
                                                         (8, 32, True), (8, 128, True), (8, 256, True)])  # 256: per channel
@pytest.mark.parametrize("M", [1, 2, 7, 13])  # decode (4 tiles per step), 2 tiles, row remainders of 6
def test_vnni_kernel_equals_the_portable_one_bit_for_bit(bits, group_size, symmetric, M):
    ext = kernels.load()
    lin = QuantLinear.from_linear(linear(80, 256), bits, group_size, symmetric)  # 5 tiles: 4 + 1
    x = torch.randn(M, 256)
    act = ext.quantize_activations(x, group_size, False)
    assert all(torch.equal(a, b) for a, b in zip(act, ext.quantize_activations(x, group_size, True)))
    args = (lin.qweight, lin.scales, lin.mins, group_size, bits)
    assert torch.equal(ext.quant_matmul(*act, *args, False), ext.quant_matmul(*act, *args, True))


@needs_kernels
def test_kernel_rejects_bad_operands():
    ext = kernels.load()
    lin = Int4Linear(linear(32, 64), 32, True)
    act = ext.quantize_activations(torch.randn(1, 64), 32, False)
    with pytest.raises(RuntimeError, match="scales"):
        ext.quant_matmul(*act, lin.qweight, lin.scales.float(), None, 32, 4, False)
    with pytest.raises(RuntimeError, match="qweight"):
        ext.quant_matmul(*act, lin.qweight[:, :100].contiguous(), lin.scales, None, 32, 4, False)
    with pytest.raises(RuntimeError, match="qweight"):
        ext.quant_matmul(*act, lin.qweight, lin.scales, None, 32, 8, False)  # 4-bit codes passed as 8-bit


def test_activation_rounding_costs_little():
    """The kernels quantize activations to int8 per block (as llama.cpp does); the cost against float ones."""
    x = torch.randn(64, 256)
    x[:, 3] *= 30  # an outlier channel
    xq = quantize_activations_reference(x, 32)
    assert rel(xq, x) <= 0.5 / 127 * 1.001 * x.abs().max() / x.abs().max()  # half a step of the largest block
    lin = linear(128, 256)
    exact = lin(x)
    approx = nn.functional.linear(xq, lin.weight)
    assert ((approx - exact).norm() / exact.norm()).item() < 0.01


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits, symmetric", [(4, False), (4, True), (8, True)])
def test_round_trip_error_is_within_half_a_step(group_size, bits, symmetric):
    w = linear(64, 256).weight.detach()
    if bits == 4:
        q, scale, lo = quantize_int4(w, group_size, symmetric)
    else:
        (q, scale), lo = quantize_int8(w, group_size), None
    err = (dequantize(q, scale, lo) - w).abs().reshape(64, -1, group_size)
    # one step is `scale`; rounding costs at most half of it (+ fp16 rounding of scale and min)
    assert (err <= 0.5 * scale[..., None] * 1.02 + 1e-6).all()


@pytest.mark.parametrize("bits, symmetric", [(4, False), (4, True), (8, True)])
def test_embedding_lookup_dequantizes_its_rows(bits, symmetric):
    emb = nn.Embedding(100, 64)
    q = QuantEmbedding.from_embedding(emb, bits, 32, symmetric)
    idx = torch.tensor([[0, 17, 99], [5, 5, 42]])
    assert torch.equal(q(idx), q.dequantize_all()[idx])
    assert rel(q(idx), emb(idx)) < (0.1 if bits == 4 else 0.01)


@pytest.mark.parametrize("make", [lambda l: Int4Linear(l, 32), lambda l: Int4Linear(l, 128),
                                  lambda l: Int4Linear(l, 64, symmetric=True), Int8Linear, lambda l: Int8Linear(l, 256)],
                         ids=["int4-g32", "int4-g128", "int4-g64-sym", "int8", "int8-per-channel"])
@pytest.mark.parametrize("M", [1, 7, 300])
@pytest.mark.parametrize("N", [256, 200])  # 200: output rows padded to 16-row tiles
def test_fast_kernels_equal_the_dequantize_oracle(make, M, N):
    m = make(linear(N, 256))
    for dtype, bound in ((torch.float32, 1e-3), (torch.bfloat16, 8e-3)):  # bf16: its own rounding, 2^-7
        x = torch.randn(2, M, 256).to(dtype)
        m.kernel = "auto"
        fast = m(x)
        m.kernel = "oracle"
        oracle = m(x)
        assert fast.shape == (2, M, N) and fast.dtype == dtype
        assert rel(fast, oracle) <= bound, (dtype, rel(fast, oracle))
        # and against dequantize-then-matmul (with the same activation rounding)
        plain = nn.functional.linear(quantize_activations_reference(x.reshape(-1, 256), m.group_size),
                                     m.dequantize()).reshape(2, M, N)
        assert rel(fast, plain) <= bound, (dtype, rel(fast, plain))


def tiny(seed=0):
    cfg = Config.from_name("phi-4-mini-instruct", n_layers=2, dim=128, n_heads=4, n_kv_heads=2, ffn_dim=256,
                           vocab_size=512, rope_short_factor=[1.0] * 12, rope_long_factor=[1.5] * 12,
                           max_seq_len=512, original_max_seq_len=32)
    model = Phi3(cfg).eval()
    model.init_weights(seed)
    with torch.no_grad():  # larger weights than pretraining init, so that logits are not all near zero
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10)
    return model


@pytest.mark.parametrize("bits, keep", [(4, ()), (8, ()), (4, ("down_proj", "lm_head"))])
def test_quantized_greedy_output_equals_the_oracle_path(bits, keep):
    model = tiny()
    quantize_model(model, bits=bits, group_size=32, keep_8bit=keep)
    assert model.layers[0].mlp.down_proj.bits == (8 if bits == 8 or keep else 4)
    prompt = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    fast = [t for (t,) in phikit.generate(model, [prompt], 40)]  # crosses the LongRoPE switch at 32
    set_kernel(model, "oracle")
    oracle = [t for (t,) in phikit.generate(model, [prompt], 40)]
    assert fast == oracle


def test_save_load_round_trip(tmp_path):
    model = tiny().to(torch.bfloat16)
    quantize_model(model, bits=4, group_size=64, keep_8bit=("lm_head",))
    out = phikit.save(model, tmp_path / "q4")
    again, _ = phikit.load(out)
    assert again.cfg.quantization == model.cfg.quantization
    assert again.layers[1].self_attn.qkv_proj.bits == 4 and again.lm_head.bits == 8
    ids = torch.randint(0, 512, (1, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
    cfg = json.loads((out / "config.json").read_text())  # an older format is refused, not misread
    cfg["phikit_quantization"]["format"] = "phikit-int4-v1"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quantize the float checkpoint again"):
        phikit.load(out)


def test_int8_per_channel(tmp_path):
    """group_size 0: one scale per output row (the group is the whole row); greedy output equals the
    oracle path, and a saved checkpoint loads back to the same model."""
    model = tiny()
    quantize_model(model, bits=8, group_size=0)
    qkv = model.layers[0].self_attn.qkv_proj
    assert qkv.group_size == qkv.in_features and qkv.scales.shape[1] == 1
    assert model.layers[0].mlp.down_proj.group_size == 256 and model.embed_tokens.group_size == 128
    prompt = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    fast = [t for (t,) in phikit.generate(model, [prompt], 20)]
    set_kernel(model, "oracle")
    assert [t for (t,) in phikit.generate(model, [prompt], 20)] == fast
    set_kernel(model, "auto")
    again, _ = phikit.load(phikit.save(model, tmp_path / "q8pc"))
    assert again.cfg.quantization["group_size"] == 0
    assert [t for (t,) in phikit.generate(again, [prompt], 20)] == fast
    with pytest.raises(ValueError, match="per-channel scales"):
        quantize_model(tiny(), bits=4, group_size=0)


def test_quantize_command_streams_a_checkpoint(tmp_path):
    """`phikit quantize` on a safetensors checkpoint gives exactly the in-memory quantize_model result."""
    model = tiny().to(torch.bfloat16)
    phikit.save(model, tmp_path / "src")
    out = subprocess.run([sys.executable, "-m", "phikit", "quantize", "--model", str(tmp_path / "src"), "--bits", "4",
                          "--group-size", "32", "--keep-8bit", "down_proj", "--out", str(tmp_path / "q")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    streamed, _ = phikit.load(tmp_path / "q")
    quantize_model(model, bits=4, group_size=32, keep_8bit=("down_proj",))
    for (name, a), (_, b) in zip(sorted(streamed.state_dict().items()), sorted(model.state_dict().items())):
        assert torch.equal(a, b), name


def test_quality_gate_on_a_real_model(tmp_path):
    """SmolLM2-135M: a poor setting is refused (and --force writes it); a good one passes and runs."""
    def quantize(*args):
        return subprocess.run([sys.executable, "-m", "phikit", "quantize", "--check", *args], capture_output=True,
                              text=True, timeout=600)

    bad = quantize("--bits", "4", "--group-size", "128", "--keep-8bit", "none", "--out", str(tmp_path / "bad"))
    assert bad.returncode != 0 and "fails its quality gate" in bad.stderr and not (tmp_path / "bad").exists()
    assert "top-1 agreement" in bad.stderr and "FAIL" in bad.stderr
    forced = quantize("--bits", "4", "--group-size", "128", "--keep-8bit", "none", "--force", "--out",
                      str(tmp_path / "forced"))
    assert forced.returncode == 0 and (tmp_path / "forced" / "config.json").exists()
    good = quantize("--bits", "4", "--group-size", "32", "--out", str(tmp_path / "good"))  # lm_head at 8 bits
    assert good.returncode == 0 and "-> pass" in good.stderr, good.stderr
    # a raw completion the model is sure of (its chat answer to the capital question starts with a near-tie,
    # "The" 25.33 vs "L" 25.24 in float32, which bf16 alone can flip)
    answer = subprocess.run([sys.executable, "-m", "phikit", "generate", "--model", str(tmp_path / "good"),
                             "--prompt", "The capital of France is", "--max-new-tokens", "3"],
                            capture_output=True, text=True, timeout=300)
    assert answer.returncode == 0 and answer.stdout.startswith(" Paris"), answer.stderr


@pytest.mark.slow
def test_quality_gate_on_a_float_model_trained_here(tmp_path):
    """SmolLM2's released weights are already 4/8-bit (Q4_1 blocks, Q8_0 embedding), so it cannot show
    what quantizing float weights costs; examples/pretrain-tiny.yaml trains a float model (about a minute)."""
    import shutil
    from pathlib import Path

    examples = Path(__file__).resolve().parent.parent / "examples"
    shutil.copy(examples / "pretrain-tiny.yaml", tmp_path)
    for cmd in ([str(examples / "make_tiny_shards.py"), "--out", str(tmp_path / "tiny-data")],
                ["-m", "phikit", "pretrain", "--config", str(tmp_path / "pretrain-tiny.yaml"), "--out",
                 str(tmp_path / "run")]):
        done = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
    for args in (["--bits", "8"], ["--bits", "4"], ["--bits", "4", "--symmetric", "--keep-8bit", "none"],
                 ["--bits", "4", "--symmetric", "--keep-8bit", "none", "--calibrate"]):
        out = subprocess.run([sys.executable, "-m", "phikit", "quantize", "--model", str(tmp_path / "run" / "final"),
                              "--check", *args, "--out", str(tmp_path / "q")], capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0 and "-> pass" in out.stderr, (args, out.stderr[-1000:])
        shutil.rmtree(tmp_path / "q")


@pytest.mark.parametrize("kv_cache_dtype", [None, torch.int8])
def test_compiled_decode_equals_the_eager_step(kv_cache_dtype):
    """generate.compile_decode (torch.compile of Phi3.decode_step, with the C++ operators in the graph) gives
    the eager tokens, across the LongRoPE switch, and a new cache length does not compile again."""
    from torch._dynamo.utils import counters

    from phikit.generate import compile_decode, decode_one, prefill

    model = tiny()
    quantize_model(model, bits=4, group_size=32)
    model.kv_cache_dtype = kv_cache_dtype
    prompts = [torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (20, 9)]
    eager = list(phikit.generate(model, prompts, 30))  # crosses the LongRoPE switch at 32
    decode = compile_decode(model)
    assert list(phikit.generate(model, prompts, 30, decode_fn=decode)) == eager
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    assert list(phikit.generate(model, prompts, 30, max_seq_len=100, decode_fn=decode)) == eager
    assert counters["stats"]["unique_graphs"] == graphs  # the cache length is a dynamic dimension
    # one step, logits against the eager step
    model.setup_cache(2, 64)
    for b, p in enumerate(prompts):
        prefill(model, torch.tensor(p), b)
    tok, pos = torch.tensor([3, 4]), torch.tensor([20, 9])
    fast = decode(model, tok, pos)
    slow = decode_one(model, tok, pos)
    assert (fast - slow).abs().max() <= 1e-4 * slow.abs().max()
    with pytest.raises(ValueError, match="beyond the cache size"):
        decode(model, tok, torch.tensor([64, 9]))
    model.remove_cache()
