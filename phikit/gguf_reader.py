"""A GGUF file's metadata and tensor directory, read in one pass: what gguf_io.py loads from.

gguf-py's `GGUFReader` builds numpy views for every part of every metadata value: for a vocabulary
of 49,152 strings (SmolLM2) that is ~2.4 s and ~150 MB before a single weight is read, most of a
load that should take a fraction of a second. This reads the same layout (GGUF v2/v3,
little-endian; llama.cpp `gguf/gguf.cpp`, gguf-py `gguf_reader.py`) straight into Python values:
`fields` maps each key to its value as gguf-py's `ReaderField.contents()` gives it (str, int, float,
bool, or a list of them), and `tensors` lists each tensor's name, ggml type, dims (innermost first,
as ggml stores them), absolute byte offset, and `data`, a read-only memory map shaped as gguf-py's
(the element dtype for F32/F16/F64 and integer types; for block types uint8 [rows..., bytes per row]).
Writing stays with gguf-py's `GGUFWriter`, and the block arithmetic with its `quants`.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# value type -> (struct format, numpy dtype) of the fixed-size ones; 8 is a string, 9 an array
_SCALARS = {0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
            4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
            10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64)}
STRING, ARRAY = 8, 9
_ELEMENT_TYPES = {0: np.float32, 1: np.float16, 16: np.int8, 17: np.int16, 18: np.int32, 27: np.int64, 28: np.float64}


class GGUFFormatError(ValueError):
    """The bytes are not a GGUF file this reader understands (truncated, corrupt, or another version)."""


@dataclass
class TensorInfo:
    name: str
    tensor_type: int              # ggml type id (gguf.GGMLQuantizationType)
    shape: np.ndarray             # dims, innermost first (ggml's ne)
    data_offset: int              # absolute, in bytes
    n_bytes: int
    path: Path = field(repr=False)
    _item: tuple = field(repr=False, default=())  # (numpy dtype, numpy shape) of `data`

    @property
    def data(self) -> np.ndarray:
        """The tensor's bytes as a read-only memory map (pages become resident as they are read)."""
        dtype, shape = self._item
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self.data_offset, shape=shape)


class GGUFFile:
    """fields (key -> value) and tensors (TensorInfo) of one GGUF file; see the module docstring."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._pos = 0
        with open(self.path, "rb") as f:
            if self.path.stat().st_size < 24:
                raise GGUFFormatError("too short for a GGUF header")
            # mapped, so that only the metadata's pages (at the front) are read, never the weights
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as self._buf:
                try:
                    self._parse()
                except (struct.error, IndexError, ValueError, UnicodeDecodeError) as e:
                    if isinstance(e, GGUFFormatError):
                        raise
                    raise GGUFFormatError(f"truncated or corrupt metadata at byte {self._pos}: {e}") from None
                finally:
                    self._buf = None

    def _parse(self) -> None:
        if self._buf[:4] != MAGIC:
            raise GGUFFormatError("not a GGUF file (no GGUF magic number)")
        self._pos = 4
        version = self._scalar("<I")
        if version not in (2, 3):
            big = struct.unpack(">I", self._buf[4:8])[0]
            raise GGUFFormatError("a big-endian GGUF file (not supported)" if big in (2, 3)
                                  else f"GGUF version {version} (supported: 2 and 3)")
        n_tensors, n_kv = self._scalar("<Q"), self._scalar("<Q")
        self.fields: dict[str, object] = {}
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = self._value(self._scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._scalar("<I")
            dims = np.array(struct.unpack_from(f"<{n_dims}Q", self._buf, self._pos), dtype=np.uint64)
            self._pos += 8 * n_dims
            infos.append((name, dims, self._scalar("<I"), self._scalar("<Q")))
        alignment = int(self.fields.get("general.alignment", DEFAULT_ALIGNMENT))
        if alignment <= 0 or alignment & (alignment - 1):
            raise GGUFFormatError(f"general.alignment {alignment} is not a power of two")
        start = -(-self._pos // alignment) * alignment
        size = self.path.stat().st_size
        self.tensors: list[TensorInfo] = []
        names = set()
        for name, dims, ttype, offset in infos:
            if name in names:
                raise GGUFFormatError(f"tensor {name!r} appears twice")
            names.add(name)
            dtype, shape, n_bytes = _layout(ttype, [int(d) for d in dims])
            if start + offset + n_bytes > size:
                raise GGUFFormatError(f"tensor {name!r} runs past the end of the file (truncated?)")
            self.tensors.append(TensorInfo(name, ttype, dims, start + offset, n_bytes, self.path, (dtype, shape)))

    def _scalar(self, fmt: str):
        (v,) = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return v

    def _string(self) -> str:
        n = self._scalar("<Q")
        s = self._buf[self._pos:self._pos + n]
        if len(s) != n:
            raise IndexError("string cut short")
        self._pos += n
        return s.decode("utf-8")

    def _value(self, vtype: int):
        if vtype in _SCALARS:
            v = self._scalar(_SCALARS[vtype][0])
            return bool(v) if vtype == 7 else v
        if vtype == STRING:
            return self._string()
        if vtype != ARRAY:
            raise GGUFFormatError(f"unknown metadata value type {vtype}")
        etype, n = self._scalar("<I"), self._scalar("<Q")
        if etype in _SCALARS:  # one numpy read for the whole array
            dtype = np.dtype(_SCALARS[etype][1]).newbyteorder("<")
            values = np.frombuffer(self._buf, dtype=dtype, count=n, offset=self._pos).tolist()  # no view kept
            self._pos += n * dtype.itemsize
            return [bool(x) for x in values] if etype == 7 else values
        return [self._value(etype) for _ in range(n)]  # strings (a vocabulary) or nested arrays


def _layout(ttype: int, dims: list[int]) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, numpy shape, byte count) of a tensor's data, as gguf-py lays it out."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        qtype = GGMLQuantizationType(ttype)
    except ValueError:
        raise GGUFFormatError(f"unknown ggml tensor type {ttype}") from None
    block, type_size = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(dims)) if dims else 1
    shape = tuple(reversed(dims))
    if ttype in _ELEMENT_TYPES:
        return np.dtype(_ELEMENT_TYPES[ttype]), shape, n * type_size // block
    if dims[0] % block:
        raise GGUFFormatError(f"a row of {dims[0]} elements is not whole {qtype.name} blocks of {block}")
    return np.dtype(np.uint8), (*shape[:-1], dims[0] // block * type_size), n * type_size // block
