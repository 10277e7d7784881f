"""The msgpack tensor codec: bit-exact round trips, payload size, and errors on damaged blobs."""

from __future__ import annotations

import msgpack
import pytest
import torch

from ctxmem.store import codec

# Bit patterns of special values per float dtype, read through the same-size integer type:
# +0, -0, smallest subnormal, largest subnormal, +inf, -inf, a quiet NaN with a payload,
# a negative NaN, the largest finite value.
SPECIAL_BITS = {
    torch.float32: (torch.int32, [0x00000000, 0x80000000, 0x00000001, 0x007FFFFF, 0x7F800000,
                                  0xFF800000, 0x7FC00123, 0xFFC00001, 0x7F7FFFFF]),
    torch.float16: (torch.int16, [0x0000, 0x8000, 0x0001, 0x03FF, 0x7C00, 0xFC00, 0x7E05, 0xFE01, 0x7BFF]),
    torch.bfloat16: (torch.int16, [0x0000, 0x8000, 0x0001, 0x007F, 0x7F80, 0xFF80, 0x7FC5, 0xFFC1, 0x7F7F]),
}


def special_values(dtype: torch.dtype) -> torch.Tensor:
    """Return a [9] tensor of `dtype` holding SPECIAL_BITS exactly."""
    int_dtype, bits = SPECIAL_BITS[dtype]
    width = torch.iinfo(int_dtype).bits
    signed = [bit - (1 << width) if bit >= 1 << (width - 1) else bit for bit in bits]
    return torch.tensor(signed, dtype=int_dtype).view(dtype)


def as_bits(tensor: torch.Tensor) -> torch.Tensor:
    """Return the tensor's raw bytes as a uint8 tensor, for exact comparison."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_float_round_trip_bit_identical(dtype):
    torch.manual_seed(0)
    tensor = torch.cat([special_values(dtype), torch.randn(123).to(dtype)]).reshape(2, 3, 2, 11)

    decoded = codec.decode(codec.encode(tensor))

    assert decoded.dtype == dtype
    assert decoded.shape == tensor.shape
    assert torch.equal(as_bits(decoded), as_bits(tensor))


def test_special_values_survive():
    decoded = codec.decode(codec.encode(special_values(torch.bfloat16)))

    assert decoded[1] == 0
    assert torch.signbit(decoded[1])
    assert decoded[2] != 0
    assert torch.isinf(decoded[4])
    assert decoded[4] > 0
    assert torch.isnan(decoded[6])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_above_float16_range_kept(dtype):
    tensor = torch.tensor([65504.0, 70000.0, 3.0e38], dtype=dtype)

    decoded = codec.decode(codec.encode(tensor))

    assert decoded.dtype == dtype
    assert torch.isfinite(decoded).all()
    assert torch.equal(as_bits(decoded), as_bits(tensor))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_integer_round_trip(dtype):
    info = torch.iinfo(dtype)
    tensor = torch.tensor([info.min, -1, 0, 1, info.max], dtype=dtype)

    decoded = codec.decode(codec.encode(tensor))

    assert decoded.dtype == dtype
    assert torch.equal(decoded, tensor)


def test_scalar_empty_and_strided_tensors():
    strided = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4).transpose(0, 2)  # [4, 3, 2]
    scalar = torch.tensor(-0.0, dtype=torch.float16)
    empty = torch.zeros(2, 0, 5, dtype=torch.bfloat16)

    decoded = codec.decode(codec.encode([strided, scalar, empty]))

    assert torch.equal(decoded[0], strided)
    assert decoded[1].shape == ()
    assert torch.signbit(decoded[1])
    assert decoded[2].shape == (2, 0, 5)
    assert decoded[2].dtype == torch.bfloat16


def test_decoded_tensor_is_writable():
    decoded = codec.decode(codec.encode(torch.zeros(4)))
    decoded += 1
    assert decoded.sum().item() == 4


def test_payload_is_data_plus_small_header():
    keys = torch.randn(28, 8, 1, 128).to(torch.bfloat16)
    values = torch.randn(28, 8, 1, 128).to(torch.bfloat16)

    blob = codec.encode({"keys": keys, "values": values})

    data_bytes = 2 * keys.numel() * 2
    field_names = len("keys") + len("values")
    assert len(blob) >= data_bytes
    assert len(blob) - data_bytes - field_names < 2 * 64


def test_bytes_starting_with_0x80_stay_bytes():
    extension_lookalike = msgpack.packb(codec.encode_tensor(torch.ones(2)))
    value = {"raw": b"\x80\x01\x02", "lookalike": extension_lookalike, "text": "\x80"}

    decoded = codec.decode(codec.encode(value))

    assert decoded == value
    assert isinstance(decoded["raw"], bytes)
    assert isinstance(decoded["lookalike"], bytes)


def test_unknown_extension_type_rejected():
    blob = msgpack.packb({"x": msgpack.ExtType(5, b"abc")})
    with pytest.raises(ValueError, match="unknown msgpack extension type 5"):
        codec.decode(blob)


def test_unknown_dtype_rejected():
    fields = msgpack.packb(["complex32", [2], b"\x00" * 8], use_bin_type=True)
    blob = msgpack.packb(msgpack.ExtType(codec.TENSOR_EXT_CODE, fields))
    with pytest.raises(ValueError, match="invalid tensor dtype 'complex32'"):
        codec.decode(blob)


def test_short_tensor_data_rejected():
    fields = msgpack.packb(["float32", [2, 3], b"\x00" * 20], use_bin_type=True)
    blob = msgpack.packb(msgpack.ExtType(codec.TENSOR_EXT_CODE, fields))
    with pytest.raises(ValueError, match="tensor data is 20 bytes.*need 24.*truncated"):
        codec.decode(blob)


def test_invalid_shape_rejected():
    fields = msgpack.packb(["float32", [-1], b""], use_bin_type=True)
    blob = msgpack.packb(msgpack.ExtType(codec.TENSOR_EXT_CODE, fields))
    with pytest.raises(ValueError, match="invalid tensor shape"):
        codec.decode(blob)


def test_truncated_blob_rejected():
    blob = codec.encode({"keys": torch.randn(4, 4)})
    with pytest.raises(ValueError, match=f"cannot decode a {len(blob) - 7}-byte msgpack blob"):
        codec.decode(blob[:-7])


def test_unsupported_dtype_not_encoded():
    with pytest.raises(TypeError, match="dtype torch.complex64"):
        codec.encode(torch.zeros(2, dtype=torch.complex64))


def test_unsupported_object_not_encoded():
    with pytest.raises(TypeError, match="type object"):
        codec.encode({"x": object()})
