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


def kv_cache_bytes(cfg, batch: int, max_len: int, bytes_per_value: int = 2) -> int:
    """Keys and values of every layer for batch x max_len positions."""
    return 2 * cfg.n_layers * batch * max_len * cfg.n_kv_heads * cfg.head_dim * bytes_per_value


def check_kv_cache(cfg, batch: int, max_len: int, bytes_per_value: int = 2, headroom: float = 0.9) -> None:
    """Raise MemoryError, naming the sizes, if the KV cache would not fit in the available RAM."""
    need = kv_cache_bytes(cfg, batch, max_len, bytes_per_value)
    have = available_bytes()
    if have is not None and need > headroom * have:
        fits = int(headroom * have // max(kv_cache_bytes(cfg, batch, 1, bytes_per_value), 1))
        raise MemoryError(f"a KV cache of {batch} x {max_len} positions needs {need / GiB:.2f} GiB, but only "
                          f"{have / GiB:.2f} GiB of RAM is available; use a context of at most {fits} positions "
                          f"(or a smaller batch)")
