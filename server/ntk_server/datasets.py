"""UploadDataset: a client stream of chunks written straight to a staged .npy pair.

Nothing is published until the last chunk has arrived and every check passed; a stream that
breaks off leaves only a staging directory, removed here (or, after a crash, by the registry's
start-up sweep).
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
from ntk_client import codec

from ntk_server.errors import InvalidArgument, ResourceExhausted
from ntk_server.registry import DatasetRecord, Registry

MAX_DATASET_BYTES = 64 << 30
MAX_DIMS = 5


class _NpyWriter:
    """Appends raw little-endian bytes to an .npy file, checking count and finiteness."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype, field: str):
        self.dtype, self.field = dtype, field
        self.expected = math.prod(shape) * dtype.itemsize
        self.written = 0
        self._carry = b""
        self._file = open(path, "wb")
        np.lib.format.write_array_header_1_0(
            self._file, {"descr": dtype.str, "fortran_order": False, "shape": shape}
        )

    def write(self, data: bytes) -> None:
        if self.written + len(data) > self.expected:
            raise InvalidArgument(
                f"more bytes than the declared shape holds ({self.expected} bytes)",
                field=f"{self.field}_data",
            )
        buf = self._carry + data
        whole = len(buf) - len(buf) % self.dtype.itemsize
        values = np.frombuffer(buf[:whole], dtype=self.dtype)
        if not np.isfinite(values).all():
            raise InvalidArgument(
                "contains non-finite values (NaN or Inf)", field=f"{self.field}_data"
            )
        self._carry = buf[whole:]
        self._file.write(data)
        self.written += len(data)

    def finish(self) -> None:
        if self.written != self.expected:
            raise InvalidArgument(
                f"declared shape needs {self.expected} bytes, received {self.written}",
                field=f"{self.field}_data",
            )
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def _shape(values, field: str, *, ndim: int | None = None) -> tuple[int, ...]:
    shape = tuple(int(v) for v in values)
    if not shape or len(shape) > MAX_DIMS or min(shape) < 1:
        raise InvalidArgument(
            f"needs 1 to {MAX_DIMS} positive dimensions, got {list(shape)}", field=field
        )
    if ndim is not None and len(shape) != ndim:
        raise InvalidArgument(f"needs {ndim} dimensions, got {list(shape)}", field=field)
    return shape


async def receive(registry: Registry, chunks: AsyncIterator) -> DatasetRecord:
    """Consume an upload stream and publish the dataset; returns its record."""
    staged = registry.staging()
    writers: list[_NpyWriter] = []
    try:
        first = True
        x_writer = y_writer = None
        async for chunk in chunks:
            if first:
                first = False
                try:
                    dtype_name = codec.dtype_name(chunk.dtype)
                except ValueError:
                    raise InvalidArgument(
                        f"must be FLOAT32 or FLOAT64, got enum value {chunk.dtype}", field="dtype"
                    ) from None
                dtype = np.dtype(dtype_name).newbyteorder("<")
                x_shape = _shape(chunk.x_shape, "x_shape")
                y_shape = _shape(chunk.y_shape, "y_shape", ndim=2) if chunk.y_shape else ()
                if y_shape and y_shape[0] != x_shape[0]:
                    raise InvalidArgument(
                        f"y_shape {list(y_shape)} and x_shape {list(x_shape)} differ in N",
                        field="y_shape",
                    )
                total = (math.prod(x_shape) + math.prod(y_shape or (0,))) * dtype.itemsize
                if total > MAX_DATASET_BYTES:
                    raise ResourceExhausted(
                        f"dataset of {total} bytes is over the limit of {MAX_DATASET_BYTES} bytes",
                        field="x_shape",
                    )
                x_writer = _NpyWriter(staged / "x.npy", x_shape, dtype, "x")
                writers.append(x_writer)
                if y_shape:
                    y_writer = _NpyWriter(staged / "y.npy", y_shape, dtype, "y")
                    writers.append(y_writer)
            elif chunk.x_shape or chunk.y_shape or chunk.dtype:
                raise InvalidArgument(
                    "only the first chunk may carry dtype and shapes", field="x_shape"
                )
            if chunk.x_data:
                await asyncio.to_thread(x_writer.write, chunk.x_data)
            if chunk.y_data:
                if y_writer is None:
                    raise InvalidArgument("y_data sent but no y_shape declared", field="y_data")
                await asyncio.to_thread(y_writer.write, chunk.y_data)
        if first:
            raise InvalidArgument("the upload stream was empty", field="x_shape")
        for w in writers:
            w.finish()
        record, _ = await asyncio.to_thread(
            registry.publish_dataset, staged, x_shape, y_shape, dtype_name
        )
        return record
    finally:
        for w in writers:
            w.close()
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)
