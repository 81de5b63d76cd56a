"""Reading and writing safetensors files ourselves, bf16 included.

safetensors' NumPy loader cannot return bf16 (NumPy has no such dtype), and Llama / Qwen3
checkpoints store bf16. The format is simple enough to read directly: an 8-byte
little-endian header length, a JSON header naming each tensor's dtype, shape and byte
range, then the raw little-endian bytes. Headers are read first (cheap), so shapes are
checked before anything large is allocated; tensors are then read one at a time from a
memory map.

bf16 is the top half of an fp32: widening is a 16-bit shift; narrowing rounds to nearest,
ties to even, as torch does.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from model.data.files import atomic_write

_NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}
_HEADER_LIMIT = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A file that is not a valid safetensors file; the message names it and says why."""


class TensorInfo(NamedTuple):
    path: Path
    dtype: str  # "BF16", "F32", ...
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Every tensor's dtype, shape and byte range, without reading the data."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_HEADER_LIMIT, size - 8):
            raise SafetensorsError(f"{path}: header length {n} does not fit a {size}-byte file; damaged download?")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SafetensorsError(f"{path}: the header is not valid JSON ({err})") from None
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if dtype not in _NUMPY_DTYPES:
            raise SafetensorsError(f"{path}: tensor {name} has dtype {dtype}; readable: {', '.join(_NUMPY_DTYPES)}")
        itemsize = np.dtype(_NUMPY_DTYPES[dtype]).itemsize
        if end - begin != int(np.prod(shape, dtype=np.int64)) * itemsize or 8 + n + end > size:
            raise SafetensorsError(f"{path}: tensor {name} ({dtype} {shape}) has byte range [{begin}, {end}) that "
                                   f"does not fit its shape or the {size}-byte file; damaged download?")
        out[name] = TensorInfo(path, dtype, shape, 8 + n + begin, 8 + n + end)
    return out


def read_tensor(info: TensorInfo, dtype: Any = np.float32) -> np.ndarray:
    """The tensor converted to ``dtype`` (a new array; the file is only memory-mapped)."""
    raw = np.memmap(info.path, dtype=np.uint8, mode="r", offset=info.start, shape=(info.end - info.start,))
    if info.dtype == "BF16":
        return np.asarray(bf16_to_float32(raw.view("<u2")), dtype=dtype).reshape(info.shape)  # already a new array
    # NOTE: np.array copies: a view of the read-only map would make weights an optimizer cannot update.
    return np.array(raw.view(np.dtype(_NUMPY_DTYPES[info.dtype]).newbyteorder("<")), dtype=dtype).reshape(info.shape)


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) -> float32, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), rounding to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return np.where(np.isnan(x), (bits >> 16) | 0x40, rounded).astype(np.uint16)


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], dtype: str = "float32",
                      metadata: dict[str, str] | None = None) -> Path:
    """Write float ``tensors`` as ``dtype`` ("float32" or "bfloat16"), atomically."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"write_safetensors: dtype must be float32 or bfloat16, got {dtype!r}")
    blobs, header, offset = [], {}, 0
    for name, array in tensors.items():
        array = np.asarray(array, dtype=np.float32)
        stored = float32_to_bf16(array).astype("<u2") if dtype == "bfloat16" else array.astype("<f4")
        data = stored.tobytes()
        header[name] = {"dtype": "BF16" if dtype == "bfloat16" else "F32", "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            for blob in blobs:
                f.write(blob)

    return atomic_write(path, write)
