"""Reading and writing safetensors files with strict checks.

The `safetensors` package covers the common case, but flashmem needs two things it does not
offer: bf16 tensors as numpy arrays (numpy has no bf16: they travel as uint16 bit patterns,
tagged "bf16"), and a data section that starts at a chosen alignment (4096 bytes for the
neuron-bundle file, so bundle offsets suit direct I/O). The format itself is an 8-byte
little-endian header length, a JSON header, then the tensor bytes.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Iterable

import numpy as np

# safetensors dtype name -> (numpy dtype of the bytes, flashmem dtype tag)
DTYPES = {
    "F32": (np.float32, "f32"),
    "F16": (np.float16, "f16"),
    "BF16": (np.uint16, "bf16"),
    "F64": (np.float64, "f64"),
    "I64": (np.int64, "i64"),
    "I32": (np.int32, "i32"),
    "U8": (np.uint8, "u8"),
    "I8": (np.int8, "i8"),
}
TAG_TO_ST = {"f32": "F32", "f16": "F16", "bf16": "BF16", "u8": "U8", "i8": "I8", "i32": "I32"}
TAG_SIZE = {"f32": 4, "f16": 2, "bf16": 2, "u8": 1, "i8": 1, "i32": 4}
MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def tag(self) -> str:
        return DTYPES[self.dtype][1]


def _utf8(s: str) -> bool:
    """Whether s is text (JSON's escapes can spell lone surrogates, which no UTF-8 string holds)."""
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict]:
    """Parses and checks a safetensors header; returns ({name: TensorInfo}, metadata)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"safetensors file not found: {path}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise ValueError(f"{path}: header length {n} is impossible for a file of {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) and _utf8(k + v) for k, v in metadata.items()):
        raise ValueError(f"{path}: __metadata__ must map names to strings, got {metadata!r:.200}")
    data_start = 8 + n
    tensors = {}
    for name, spec in header.items():
        if not _utf8(name):
            raise ValueError(f"{path}: a tensor name is not valid UTF-8: {name!r:.100}")
        try:
            dtype, shape, (b, e) = spec["dtype"], tuple(spec["shape"]), spec["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor '{name}' has a malformed header entry: {spec!r:.200}") from None
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in shape + (b, e)):
            raise ValueError(f"{path}: tensor '{name}' has a malformed header entry: {spec!r:.200}")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ValueError(f"{path}: tensor '{name}' has unsupported dtype {dtype!r:.40}")
        if any(s < 0 for s in shape):
            raise ValueError(f"{path}: tensor '{name}' has a negative dimension {shape}")
        if any(s > size for s in shape):  # even with a zero-sized dimension, no file holds that
            raise ValueError(f"{path}: tensor '{name}' has shape {shape}, a dimension larger than the file")
        want = math.prod(shape) * np.dtype(DTYPES[dtype][0]).itemsize
        if e - b != want or b < 0:
            raise ValueError(
                f"{path}: tensor '{name}' header lies about its size: shape {shape} {dtype} needs {want} bytes, "
                f"offsets [{b}, {e}) give {e - b}")
        if data_start + e > size:
            raise ValueError(
                f"{path}: truncated: tensor '{name}' ends at byte {data_start + e} but the file has {size} bytes")
        tensors[name] = TensorInfo(name, dtype, shape, data_start + b, want)
    return tensors, metadata


def load_tensor(path: str, info: TensorInfo) -> np.ndarray:
    """Reads one tensor into memory (bf16 as uint16 bits)."""
    arr = np.fromfile(path, dtype=DTYPES[info.dtype][0], count=info.nbytes // np.dtype(DTYPES[info.dtype][0]).itemsize,
                      offset=info.offset)
    return arr.reshape(info.shape)


def to_f32(arr: np.ndarray, tag: str) -> np.ndarray:
    if tag == "bf16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


def from_f32(arr: np.ndarray, tag: str) -> np.ndarray:
    """f32 -> storage array for tag (bf16: round to nearest even, as torch does)."""
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if tag == "f32":
        return arr
    if tag == "f16":
        return arr.astype(np.float16)
    if tag == "bf16":
        u = arr.view(np.uint32)
        rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        return np.where(np.isnan(arr), np.uint32(0x7FC0), rounded).astype(np.uint16)
    raise ValueError(f"unknown dtype {tag!r} (expected f32, f16 or bf16)")


class Writer:
    """Streams tensors into a safetensors file whose layout is declared up front.

    `specs` is [(name, tag, shape)]; tensors must then be written in that order. With
    `align`, the header is padded with spaces (allowed by the format) so that the data section
    starts at a multiple of `align`; tensors whose sizes are multiples of `align` then all start
    aligned.
    """

    def __init__(self, path: str, specs: Iterable[tuple[str, str, tuple]], metadata: dict | None = None,
                 align: int = 8):
        self.path, self._order, header, off = path, [], {}, 0
        for name, tag, shape in specs:
            nbytes = int(np.prod(shape, dtype=np.int64)) * TAG_SIZE[tag]
            header[name] = {"dtype": TAG_TO_ST[tag], "shape": list(shape), "data_offsets": [off, off + nbytes]}
            self._order.append((name, tag, tuple(shape)))
            off += nbytes
        if metadata:
            header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((-(8 + len(raw))) % align)
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, arr: np.ndarray) -> None:
        want_name, tag, shape = self._order[self._next]
        if name != want_name or tuple(arr.shape) != shape:
            raise ValueError(f"{self.path}: expected tensor '{want_name}' {shape}, got '{name}' {tuple(arr.shape)}")
        self._f.write(from_f32(arr, tag).tobytes() if arr.dtype == np.float32 else np.ascontiguousarray(arr).tobytes())
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            raise ValueError(f"{self.path}: {len(self._order) - self._next} declared tensors were not written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
