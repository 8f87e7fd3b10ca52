"""Packed token shards: the training data format shared by `phikit data pack` and `phikit pretrain`.

A shard is a small header followed by uint32 token ids (uint32 because Phi-4-mini's vocabulary of
200,064 does not fit in uint16). Documents are concatenated, each followed by the end-of-text id.
A directory of shards has a `manifest.json`:

    {"version": 1, "dtype": "uint32", "vocab_size": 32064, "eos_id": 32000, "documents": 1234,
     "tokens": 5678901, "shards": [{"file": "shard-00000.bin", "tokens": 1048576}, ...]}

Header (little-endian, 32 bytes): magic b"PHIKTOK\\0", uint32 version (1), uint32 dtype code
(4 = uint32), uint64 token count, 8 reserved bytes. Readers memory-map the tokens.

References: llm.c `dev/data/data_common.py::write_datafile` (header + tokens).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"PHIKTOK\0"
VERSION = 1
DTYPE_CODE = 4  # bytes per token: uint32
HEADER = struct.Struct("<8sIIQ8x")  # magic, version, dtype code, token count, reserved
MANIFEST = "manifest.json"


class ShardError(ValueError):
    """A shard or manifest that cannot be read; the message names the file."""


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> Path:
    """Write tokens (any integer array, values < 2**32) as a shard; atomic (temp file + rename)."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**32):
        raise ShardError(f"{path}: token ids must lie in [0, 2**32)")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(HEADER.pack(MAGIC, VERSION, DTYPE_CODE, tokens.size))
        f.write(tokens.astype("<u4", copy=False).tobytes())
    os.replace(tmp, path)
    return path


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """The tokens of a shard as a read-only memory-mapped uint32 array; checks header and size."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER.size)
    except OSError as e:
        raise ShardError(f"cannot read shard {path}: {e}") from None
    if len(raw) < HEADER.size:
        raise ShardError(f"{path} is too short to be a phikit shard ({len(raw)} bytes)")
    magic, version, dtype_code, count = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ShardError(f"{path} is not a phikit token shard (bad magic {magic!r})")
    if version != VERSION or dtype_code != DTYPE_CODE:
        raise ShardError(f"{path}: unsupported shard version {version} / dtype code {dtype_code}")
    expected = HEADER.size + 4 * count
    if path.stat().st_size != expected:
        raise ShardError(f"{path} holds {path.stat().st_size} bytes, the header promises {expected} (truncated?)")
    if count == 0:
        return np.zeros(0, dtype=np.uint32)
    return np.memmap(path, dtype="<u4", mode="r", offset=HEADER.size, shape=(count,))


def write_manifest(directory: str | os.PathLike, manifest: dict) -> Path:
    path = Path(directory) / MANIFEST
    tmp = path.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"version": VERSION, "dtype": "uint32", **manifest}, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise ShardError(f"{directory} has no {MANIFEST} (run `phikit data pack` to make one)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path} is not valid JSON: {e}") from None
    for key in ("shards", "eos_id", "vocab_size"):
        if key not in manifest:
            raise ShardError(f"{path} is missing the field {key!r}")
    for s in manifest["shards"]:
        if not (Path(directory) / s["file"]).exists():
            raise ShardError(f"{path} lists {s['file']}, which is missing")
    return manifest


def load_tokens(directory: str | os.PathLike) -> list[np.ndarray]:
    """All shards of a packed directory, memory-mapped, in manifest order."""
    manifest = read_manifest(directory)
    return [read_shard(Path(directory) / s["file"]) for s in manifest["shards"]]
