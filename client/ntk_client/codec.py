"""Tensors on the wire: numpy arrays <-> ntk.v1.Tensor (dtype, shape, C-order little-endian bytes).

Used by the client and the server alike; it needs numpy only.
"""

from __future__ import annotations

import numpy as np

from ntk_client._proto.ntk.v1 import tensor_pb2

_TO_NUMPY = {
    tensor_pb2.FLOAT32: np.dtype("<f4"),
    tensor_pb2.FLOAT64: np.dtype("<f8"),
}
_FROM_NAME = {"float32": tensor_pb2.FLOAT32, "float64": tensor_pb2.FLOAT64}


class TensorError(ValueError):
    """A tensor message that cannot be decoded; `field` names where it was found."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def dtype_enum(name: str | np.dtype) -> int:
    """'float32' / 'float64' (or a numpy dtype) -> the DType enum value."""
    key = np.dtype(name).name if not isinstance(name, str) else name.lower()
    try:
        return _FROM_NAME[key]
    except KeyError:
        raise ValueError(f"dtype must be 'float32' or 'float64', got {name!r}") from None


def dtype_name(value: int) -> str:
    """DType enum value -> 'float32' / 'float64'."""
    if value not in _TO_NUMPY:
        raise ValueError(f"unknown dtype enum {value}")
    return _TO_NUMPY[value].name.replace("<", "")


def to_proto(array, dtype: str | None = None) -> tensor_pb2.Tensor:
    """Encode an array-like as a Tensor.

    Any memory order is accepted (Fortran-ordered and strided arrays are copied to C order).
    Integer and float16 inputs are converted to `dtype` (default float32 for them, otherwise
    the array's own float32/float64).
    """
    arr = np.asarray(array)
    if dtype is None:
        dtype = arr.dtype.name if arr.dtype in (np.float32, np.float64) else "float32"
    enum = dtype_enum(dtype)
    arr = np.ascontiguousarray(arr, dtype=_TO_NUMPY[enum])
    return tensor_pb2.Tensor(dtype=enum, shape=list(arr.shape), data=arr.tobytes(order="C"))


def from_proto(msg: tensor_pb2.Tensor, field: str = "tensor", *, finite: bool = True) -> np.ndarray:
    """Decode a Tensor, checking dtype, shape, byte count and (by default) finiteness.

    Raises TensorError naming `field` and the offending value.
    """
    if msg.dtype not in _TO_NUMPY:
        raise TensorError(
            f"{field}.dtype", f"must be FLOAT32 or FLOAT64, got enum value {msg.dtype}"
        )
    shape = tuple(int(s) for s in msg.shape)
    if any(s < 0 for s in shape):
        raise TensorError(f"{field}.shape", f"dimensions must be >= 0, got {list(shape)}")
    dtype = _TO_NUMPY[msg.dtype]
    count = 1
    for s in shape:
        count *= s
    expected = count * dtype.itemsize
    if len(msg.data) != expected:
        raise TensorError(
            f"{field}.data",
            f"shape {list(shape)} of {dtype.name} needs {expected} bytes, got {len(msg.data)}",
        )
    try:
        arr = np.frombuffer(msg.data, dtype=dtype).reshape(shape)
    except ValueError:  # e.g. (0, 2**40, 2**40): no bytes, yet too large for numpy to index
        raise TensorError(
            f"{field}.shape", f"{list(shape)} is too large to describe an array"
        ) from None
    if finite and not np.isfinite(arr).all():
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise TensorError(field, f"contains {bad} non-finite values (NaN or Inf)")
    return arr
