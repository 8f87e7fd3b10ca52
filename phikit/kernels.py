"""The compiled CPU kernels (phikit/csrc/int4_kernels.cpp), built on first use and cached.

torch.utils.cpp_extension compiles the file with the system's C++ compiler the first time a 4-bit
model runs (about a minute on 2 cores; the result is cached under ~/.cache/torch_extensions, or
$TORCH_EXTENSIONS_DIR, and reused by later processes). The kernels pick AVX512-VNNI code when the
CPU has it and portable C++ otherwise. Without a compiler, or with PHIKIT_KERNELS=0, `load()` returns
None and the quantized layers use a pure-PyTorch path with the same arithmetic (correct, slow).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

_SOURCE = Path(__file__).parent / "csrc" / "int4_kernels.cpp"
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
            from torch.utils.cpp_extension import load as build

            if not os.environ.get("PHIKIT_QUIET"):
                print("[phikit] loading the int4 CPU kernels (compiled once, then cached)", file=sys.stderr)
            module = build(name="phikit_int4_v1", sources=[str(_SOURCE)], verbose=False,
                           extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"])
        except Exception as e:  # no compiler, no ninja, a build error: fall back, say why
            _state["reason"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            warnings.warn(f"phikit: the compiled int4 kernels are unavailable ({_state['reason']}); "
                          "4-bit layers fall back to a slow pure-PyTorch path", RuntimeWarning, stacklevel=2)
    _state["module"] = module
    return module


def status() -> str:
    """One line for --help texts and benchmarks: which int4 kernel runs."""
    m = load()
    if m is None:
        return f"int4 kernels: pure PyTorch fallback ({_state.get('reason', '')})"
    return "int4 kernels: AVX512-VNNI" if m.vnni_available() else "int4 kernels: portable C++ (no AVX512-VNNI)"
