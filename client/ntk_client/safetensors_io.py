"""Write the safetensors format from numpy arrays, so the client needs neither torch nor the
safetensors package. Format: 8-byte little-endian header length, a JSON header mapping each
name to {dtype, shape, data_offsets}, then the raw little-endian bytes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import numpy as np

_DTYPES = {np.dtype("float32"): "F32", np.dtype("float64"): "F64"}


def dump_safetensors(tensors: Mapping[str, np.ndarray]) -> bytes:
    """Serialise float32/float64 arrays by name (other dtypes are converted to float32)."""
    header: dict[str, dict] = {}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])
        if arr.dtype not in _DTYPES:
            arr = arr.astype(np.float32)
        data = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {
            "dtype": _DTYPES[np.dtype(arr.dtype.name)],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)
