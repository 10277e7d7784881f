"""msgpack encoding of torch tensors with their exact bytes, for the landmark store.

A tensor anywhere inside the encoded object becomes a msgpack extension (type code
`TENSOR_EXT_CODE`) whose data is itself a msgpack array `[dtype name, shape, raw bytes]`.
The raw bytes are the tensor's memory as is, so float32, float16 and bfloat16 values come back
bit-identical, -0.0, subnormals, infinities and NaN payloads included, and nothing is upcast.
A tensor costs its element count times the dtype size plus a header of at most about 50 bytes.

Plain `bytes` values are msgpack `bin` and stay bytes, whatever their first byte, because
tensors are recognised by the extension type code and not by a prefix. Nothing is pickled.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import torch

TENSOR_EXT_CODE = 84  # ord("T"); msgpack leaves codes 0-127 to applications

# The dtypes a tensor may have; the names are torch's and appear in every blob.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """Return the codec's name for `dtype`, or raise TypeError naming the supported dtypes."""
    if dtype not in DTYPE_NAMES:
        raise TypeError(f"cannot encode a tensor of dtype {dtype}: the codec supports "
                        f"{', '.join(DTYPES)}; convert the tensor with .to() first")
    return DTYPE_NAMES[dtype]


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """Return the raw bytes of `tensor` in row-major order, copied to the CPU if needed.

    NOTE: the bytes are in the host's byte order. Every platform that torch ships CPU builds
    for (x86-64, arm64) is little-endian, so blobs move freely between them.
    """
    dtype_name(tensor.dtype)
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)  # [numel]
    return flat.view(torch.uint8).numpy().tobytes()


def encode_tensor(tensor: torch.Tensor) -> msgpack.ExtType:
    """Return `tensor` as a msgpack extension: `[dtype name, shape, raw bytes]`."""
    header = [dtype_name(tensor.dtype), list(tensor.shape)]
    data = msgpack.packb([*header, tensor_bytes(tensor)], use_bin_type=True)
    return msgpack.ExtType(TENSOR_EXT_CODE, data)


def decode_tensor(data: bytes) -> torch.Tensor:
    """Return the tensor in the data of a tensor extension; raise ValueError naming what is wrong."""
    fields = msgpack.unpackb(data, raw=False)
    if not isinstance(fields, list) or len(fields) != 3:
        raise ValueError("invalid tensor extension: expected [dtype, shape, bytes], "
                         f"got {type(fields).__name__} {str(fields)[:80]}")
    name, shape, raw = fields
    if name not in DTYPES:
        raise ValueError(f"invalid tensor dtype {name!r}: expected one of {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(size, int) and size >= 0 for size in shape):
        raise ValueError(f"invalid tensor shape {shape!r}: expected a list of non-negative integers")
    if not isinstance(raw, bytes):
        raise ValueError(f"invalid tensor data: expected bytes, got {type(raw).__name__}")

    dtype = DTYPES[name]
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"tensor data is {len(raw)} bytes, but dtype {name} and shape {shape} "
                         f"need {expected}: the blob is truncated or corrupted")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    # bytearray gives torch a writable buffer that the tensor keeps alive.
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)


def _encode_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return encode_tensor(value)
    raise TypeError(f"cannot encode a value of type {type(value).__name__}: the codec takes "
                    "tensors, bytes, str, numbers, bool, None, lists and dicts")


def _decode_ext(code: int, data: bytes) -> torch.Tensor:
    if code != TENSOR_EXT_CODE:
        raise ValueError(f"unknown msgpack extension type {code}: ctxmem writes only type "
                         f"{TENSOR_EXT_CODE} (tensors)")
    return decode_tensor(data)


def encode(value: Any) -> bytes:
    """Return `value` (dicts, lists, scalars, bytes, str and tensors at any depth) as msgpack."""
    return msgpack.packb(value, default=_encode_default, use_bin_type=True)


def decode(blob: bytes) -> Any:
    """Return the value encoded in `blob`, with tensors rebuilt; raise ValueError if it is invalid."""
    try:
        return msgpack.unpackb(blob, raw=False, ext_hook=_decode_ext, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise ValueError(f"cannot decode a {len(blob)}-byte msgpack blob: {error}") from error
