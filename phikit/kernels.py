"""The compiled CPU kernels (phikit/csrc: quantized matmuls, decode attention, bf16 decoding matmul, the fused
decoding step), built on first use and cached.

torch.utils.cpp_extension compiles the files with the system's C++ compiler (and ninja, a phikit
dependency) the first time a model decodes on the CPU or a quantized model runs: about a minute on 2 cores; the result is cached
under ~/.cache/torch_extensions (or $TORCH_EXTENSIONS_DIR) and reused by later processes. The
kernels run AVX512-VNNI code when the CPU has it and portable C++ otherwise. Without a compiler, or
with PHIKIT_KERNELS=0, `load()` returns None and quantized layers use a pure-PyTorch path with the
same activation rounding (correct, much slower) and bf16 layers PyTorch's matmul.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

_SOURCES = [Path(__file__).parent / "csrc" / f for f in ("quant_kernels.cpp", "decode_attention.cpp", "bf16_linear.cpp",
                                                                  "decode_step.cpp")]
_NAME = "phikit_quant_v1"
_state: dict = {}


def load():
    """The compiled module, or None if it cannot be built here (the reason is warned about once)."""
    if "module" in _state:
        return _state["module"]
    module = None
    if os.environ.get("PHIKIT_KERNELS", "1") == "0":
        _state["reason"] = "disabled by PHIKIT_KERNELS=0"
    else:
        try:
            from torch.utils.cpp_extension import _get_build_directory, load as build

            if not list(Path(_get_build_directory(_NAME, False)).glob(f"{_NAME}*.so")):
                print("[phikit] compiling the quantized-matmul CPU kernels (first use only, about a minute)",
                      file=sys.stderr)
            module = build(name=_NAME, sources=[str(f) for f in _SOURCES], verbose=False,
                           extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"])
        except Exception as e:  # no compiler, no ninja, a build error: fall back, say why
            _state["reason"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            warnings.warn(f"phikit: the compiled quantized-matmul kernels are unavailable ({_state['reason']}); "
                          "quantized layers fall back to a slow pure-PyTorch path", RuntimeWarning, stacklevel=2)
    if module is not None:
        _register_shapes()
    _state["module"] = module
    _state["bf16"] = module is not None and module.bf16_linear_available()  # a plain bool: torch.compile reads it
    return module


def bf16_available() -> bool:
    """Whether the bf16 decoding kernel runs here (a CPU with AVX512-BF16); builds the kernels on first use."""
    load()
    return _state["bf16"]


def _register_shapes() -> None:
    """Output shapes of torch.ops.phikit.* (defined in the C++) for tracing, so torch.compile can use them."""
    import torch

    @torch.library.register_fake("phikit::qlinear")
    def _(x, qweight, scales, mins, group_size, bits, out_features):
        return x.new_empty(x.shape[0], out_features)

    @torch.library.register_fake("phikit::decode_attention")
    def _(q, k, v, mask, scale, k_scale=None, v_scale=None):
        return torch.empty_like(q)

    @torch.library.register_fake("phikit::bf16_linear")
    def _(x, w):
        return x.new_empty(x.shape[0], w.shape[0])


def status() -> str:
    """One line for logs and benchmarks: which quantized-matmul kernel runs."""
    m = load()
    if m is None:
        return f"pure PyTorch fallback ({_state.get('reason', '')})"
    return "AVX512-VNNI" if m.vnni_available() else "portable C++ (this CPU has no AVX512-VNNI)"
