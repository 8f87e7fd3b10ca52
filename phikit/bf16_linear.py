"""bfloat16 linear layers that decode at the speed of memory: nn.Linear with a CPU kernel for a few rows.

Decoding multiplies each weight matrix by one activation row per sequence, so it is bound by how
fast the weights are read. PyTorch's bf16 matmul for one row reads them at about 40% of the memory
bandwidth on the CPUs measured (Phi-3-mini in bf16: 2.1 tokens/s where memory allows 5.4).
`use_bf16_kernel(model)`, which `phikit.load` applies to every bf16 model, turns each bf16
`nn.Linear` into a `BF16Linear`: the same module (a subclass; same parameters, state dict and
`repr`) whose forward sends 1-8 activation rows without autograd to `torch.ops.phikit.bf16_linear`
(phikit/csrc/bf16_linear.cpp: AVX512-BF16, float32 sums of exact products, rounded once) and
everything else (prefill, training, other dtypes, CPUs without AVX512-BF16, `PHIKIT_KERNELS=0`) to
nn.Linear's own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels

MAX_ROWS = 8  # the kernel's limit: more rows (prefill) go to PyTorch's GEMM, which is compute-bound and fast


def available() -> bool:
    """Whether this machine runs the kernel (compiled phikit kernels and a CPU with AVX512-BF16)."""
    return kernels.bf16_available()


class BF16Linear(nn.Linear):
    """nn.Linear whose bf16 decoding steps (1-8 rows, no autograd, on the CPU) run phikit's kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        rows = x.numel() // self.in_features
        if (rows <= MAX_ROWS and x.dtype == w.dtype == torch.bfloat16 and x.device.type == "cpu"
                and type(x) is torch.Tensor and type(w) in (torch.Tensor, nn.Parameter)  # not DTensor & co
                and self.bias is None and self.in_features % 32 == 0 and w.is_contiguous()
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)) and available()):
            y = torch.ops.phikit.bf16_linear(x.reshape(rows, self.in_features), w)
            return y.reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, w, self.bias)


def use_bf16_kernel(model: nn.Module) -> int:
    """Make every bfloat16 nn.Linear of `model` a BF16Linear, in place (no copy); returns how many."""
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear and m.weight.dtype == torch.bfloat16:
            m.__class__ = BF16Linear
            n += 1
    return n
