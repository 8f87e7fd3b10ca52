"""Memory planning: will a model and its KV cache fit in the RAM this machine has available?

Checked before anything large is allocated, so an oversized request fails with a message that
says what it needs, instead of the kernel's out-of-memory killer ending the process. The KV
cache is allocated untouched and its pages become resident only as the context fills
(kv_cache.py), so a context that does not fit would fail late, in the middle of generation: the
plan counts the whole allocated context.
"""

from __future__ import annotations

from pathlib import Path

GiB = 1024**3


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def kv_cache_bytes(cfg, batch: int, max_len: int, bytes_per_value: float = 2) -> int:
    """Keys and values of every layer for batch x max_len positions."""
    return int(2 * cfg.n_layers * batch * max_len * cfg.n_kv_heads * cfg.head_dim * bytes_per_value)


def model_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, each storage once (tied weights, views)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.device.type) if not t.is_meta else id(t)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes() if not t.is_meta else t.numel() * t.element_size()
    return total


def check_weights(nbytes: int, what: str, headroom: float = 0.9) -> None:
    """Raise MemoryError before loading weights of nbytes that would not fit in the available RAM."""
    have = available_bytes()
    if have is not None and nbytes > headroom * have:
        raise MemoryError(f"{what} needs {nbytes / GiB:.2f} GiB of RAM for its weights, but only {have / GiB:.2f} GiB "
                          "is available (a quantized checkpoint needs about a quarter of bf16: `phikit quantize`)")


def fit_context(cfg, batch: int, max_len: int, bytes_per_value: float, budget: int) -> int:
    """The largest context <= max_len whose KV cache for `batch` sequences fits in budget bytes (maybe 0)."""
    per_position = kv_cache_bytes(cfg, batch, 1, bytes_per_value)
    return max(0, min(max_len, budget // max(per_position, 1)))


def check_kv_cache(cfg, batch: int, max_len: int, bytes_per_value: float = 2, headroom: float = 0.9) -> None:
    """Raise MemoryError, naming the sizes, if the KV cache would not fit in the available RAM."""
    need = kv_cache_bytes(cfg, batch, max_len, bytes_per_value)
    have = available_bytes()
    if have is not None and need > headroom * have:
        fits = int(headroom * have // max(kv_cache_bytes(cfg, batch, 1, bytes_per_value), 1))
        raise MemoryError(f"a KV cache of {batch} x {max_len} positions needs {need / GiB:.2f} GiB, but only "
                          f"{have / GiB:.2f} GiB of RAM is available; use a context of at most {fits} positions "
                          f"(or a smaller batch)")
