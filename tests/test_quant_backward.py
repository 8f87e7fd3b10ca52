"""Backward through quantized layers (QLoRA): grad_x = grad_y W with W dequantized block by block, weights frozen."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from phikit import kernels, quantize
from phikit.model import Phi3
from phikit.quantize import QuantEmbedding, QuantLinear, grad_input, quantize_model

from test_quantize import linear, rel, tiny

KERNELS = ["auto", "oracle", "fallback"]  # fallback: the pure-PyTorch path of a machine without a compiler


def use_kernel(layers, kernel, monkeypatch):
    if kernel == "fallback":
        monkeypatch.setitem(kernels._state, "module", None)  # as if the C++ could not be built
    for m in layers:
        m.kernel = "oracle" if kernel == "oracle" else "auto"


@pytest.mark.parametrize("bits, group_size, symmetric", [(4, 32, True), (4, 64, False), (8, 32, True),
                                                         (8, 256, True)])  # 256: per channel
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_input_gradient_is_that_of_the_dequantized_weights(bits, group_size, symmetric, kernel, dtype, monkeypatch):
    """The gradient of x @ W_deq^T: grad_y W_deq in grad_y's dtype, W_deq rounded once to it (as
    layer.dequantize(dtype)); the forward's activation rounding passes straight through."""
    m = QuantLinear.from_linear(linear(200, 256), bits, group_size, symmetric)  # 200 rows: 8 rows of tile padding
    use_kernel([m], kernel, monkeypatch)
    x = torch.randn(2, 7, 256).to(dtype).requires_grad_()
    gy = torch.randn(2, 7, 200).to(dtype)
    y = m(x)
    with torch.no_grad():
        assert torch.equal(y, m(x))  # the forward's numbers do not change under autograd
    (gx,) = torch.autograd.grad(y, x, gy)
    (ref,) = torch.autograd.grad(F.linear(x, m.dequantize(dtype)), x, gy)
    assert gx.dtype == dtype and gx.shape == x.shape
    # the same GEMM on the same operands (its column blocks aside): float32 to its rounding, bf16 to one step
    # (bit-equal on the machines measured)
    assert rel(gx, ref) <= (1e-6 if dtype == torch.float32 else 2**-8), rel(gx, ref)
    assert all(not b.requires_grad and b.grad is None for b in m.buffers())


def test_backward_under_autocast_keeps_grad_y_dtype():
    """Under bf16 autocast a float32 input still gets float32 arithmetic: autocast does not reach the backward."""
    m = QuantLinear.from_linear(linear(64, 128), 4, 32, symmetric=False)
    x = torch.randn(5, 128, requires_grad=True)
    gy = torch.randn(5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        assert y.dtype == torch.float32
        (gx,) = torch.autograd.grad(y, x, gy)
    assert gx.dtype == torch.float32 and rel(gx, gy @ m.dequantize()) <= 1e-6


@pytest.mark.parametrize("bits, group_size, symmetric", [(4, 32, False), (4, 32, True), (8, 256, True)])
@pytest.mark.parametrize("block", [16 * 64, 208 * 160, 10**9])  # 16, 160 or all 256 columns a block
def test_column_blocks_equal_the_whole_dequantized_matrix(bits, group_size, symmetric, block, monkeypatch):
    """grad_input's blocks (narrower than a per-channel group, or whole groups and a shorter last block)
    dequantize exactly what dequantize_all does: the results are those of one GEMM."""
    monkeypatch.setattr(quantize, "MIN_COLUMNS", 16)
    m = QuantLinear.from_linear(linear(200, 256), bits, group_size, symmetric)
    gy = torch.randn(5, 200)
    got = grad_input(gy, m.qweight, m.scales, m.mins, group_size, bits, block)
    assert rel(got, gy.double() @ m.dequantize().double()) <= 1e-6
    gy = gy.to(torch.bfloat16)
    assert rel(grad_input(gy, m.qweight, m.scales, m.mins, group_size, bits, block), gy @ m.dequantize(gy.dtype)) <= 2**-8


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_chain_of_quantized_layers_trains_the_layer_in_front(kernel, monkeypatch):
    """front (trainable) -> QuantLinear 4-bit -> QuantLinear 8-bit: front's gradient is the one a float base of
    the dequantized weights gives. Linear layers and a linear loss make it independent of the forward
    (r W2 W1 x^T), so it agrees to rounding; with a silu between and an MSE loss it also sees the activation
    rounding of the forward (~0.4% per layer)."""
    torch.manual_seed(0)
    front = nn.Linear(64, 256)
    q1 = QuantLinear.from_linear(linear(192, 256, seed=1), 4, 32, symmetric=False)
    q2 = QuantLinear.from_linear(linear(128, 192, seed=2), 8, 64)
    use_kernel([q1, q2], kernel, monkeypatch)
    w1, w2 = q1.dequantize(), q2.dequantize()
    x, target, r = torch.randn(6, 64), torch.randn(6, 128), torch.randn(6, 128)

    def grads(f1, f2, act, loss):
        front.zero_grad()
        loss(f2(act(f1(front(x))))).backward()
        return front.weight.grad.clone(), front.bias.grad.clone()

    for act, loss, bound in ((nn.Identity(), lambda y: (y * r).sum(), 1e-5),
                             (F.silu, lambda y: F.mse_loss(y, target), 2e-2)):
        quant = grads(q1, q2, act, loss)
        ref = grads(lambda h: F.linear(h, w1), lambda h: F.linear(h, w2), act, loss)
        assert all(rel(a, b) <= bound for a, b in zip(quant, ref)), [rel(a, b) for a, b in zip(quant, ref)]


class LargestTensor(TorchDispatchMode):
    """Records the largest storage (bytes) any operator returns while it is active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_float_copy_of_the_weights_is_saved_or_made(dtype, monkeypatch):
    """The graph saves only references to the layer's own buffers (nothing of the weight's float size), and the
    backward's largest transient tensor is its block scratch, bounded whatever the matrix size."""
    monkeypatch.setattr(quantize, "BACKWARD_BLOCK", 2**18)  # 1 MB of float32 scratch, 8 blocks of 128 columns
    N, K = 2048, 1024  # 2M weights: 4 MB in bf16, 8 MB in float32
    m = QuantLinear(K, N, 4, 32, symmetric=False)  # random codes, scales and mins: only the sizes matter here
    m.qweight.random_(0, 256), m.scales.uniform_(0.001, 0.01), m.mins.uniform_(-0.1, 0)
    buffers = {b.data_ptr() for b in m.buffers()}
    saved = []

    def pack(t):
        saved.append((t.data_ptr(), t.untyped_storage().nbytes()))
        return t

    x = torch.randn(4, K).to(dtype).requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = m(x)
    assert saved and all(ptr in buffers for ptr, _ in saved)  # the buffers, not copies of them
    assert max(size for _, size in saved) < N * K  # less than a byte per weight: the packed codes
    with LargestTensor() as mode:
        y.backward(torch.randn_like(y))
    assert mode.largest == 4 * 2**18 < N * K * dtype.itemsize  # the float32 scratch is the largest
    assert x.grad.shape == x.shape
    assert set(dict(m.named_buffers())) == {"qweight", "scales", "mins"} and not list(m.parameters())
    assert not [v for v in vars(m).values() if isinstance(v, torch.Tensor)]  # nothing cached on the module


def test_frozen_quantized_layers_under_enable_grad():
    """A quantized embedding or linear layer whose input needs no gradient runs as in inference, no graph."""
    emb = QuantEmbedding.from_embedding(nn.Embedding(100, 64), 8, 32)
    lin = QuantLinear.from_linear(linear(32, 64), 4, 32)
    with torch.enable_grad():
        e = emb(torch.tensor([[1, 2, 99]]))
        y = lin(e)
    assert not e.requires_grad and not y.requires_grad and y.grad_fn is None
    with torch.no_grad():
        assert torch.equal(y, lin(e))


def test_a_quantized_model_trains():
    """model.train() on a quantized model: the loss backpropagates to its float parameters (the norms) through
    every quantized layer, as through a float model of the dequantized weights, up to the forward's activation
    rounding (0.2-0.8% here, with pretraining init; test_quantize's tiny() has 10x larger weights, which
    amplify it to 2-11%)."""
    model, reference = (Phi3(tiny().cfg) for _ in range(2))
    for m in (model, reference):
        m.init_weights(0)
    quantize_model(model, bits=4, group_size=32, keep_8bit=("lm_head",))
    with torch.no_grad():  # the reference: float weights equal to the dequantized ones (lm_head is tied, 8-bit both)
        reference.embed_tokens.weight.copy_(model.embed_tokens.dequantize_all()[:512])
        for n, q in model.named_modules():
            if isinstance(q, QuantLinear):
                reference.get_submodule(n).weight.copy_(q.dequantize())
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    grads = []
    for m in (model, reference):
        m.train()
        for n, p in m.named_parameters():
            p.requires_grad_("norm" in n)
        logits = m(ids[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 5  # 2 x 2 layer norms + the final norm
    for n, g in grads[0].items():
        assert torch.isfinite(g).all() and g.abs().max() > 0, n
        assert ((g - grads[1][n]).norm() / grads[1][n].norm()).item() < 0.03, n


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])  # 4 s, 18 s
def test_compiled_training_step(backend):
    """torch.compile traces the autograd.Function, backward included (no graph break): the eager gradient."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    m = QuantLinear.from_linear(linear(48, 64), 4, 32, symmetric=False)
    front = nn.Linear(64, 64)
    step = torch.compile(lambda x: m(F.silu(front(x))).square().sum(), backend=backend)
    x = torch.randn(3, 64)
    step(x).backward()
    compiled = front.weight.grad.clone()
    front.zero_grad()
    m(F.silu(front(x))).square().sum().backward()
    assert rel(compiled, front.weight.grad) <= 1e-5
    assert not counters["graph_break"]
