# Generated from proto/ by scripts/gen_proto.py. Do not edit.
from ntk_client._proto.ntk.v1 import kernel_pb2 as _kernel_pb2
from ntk_client._proto.ntk.v1 import model_pb2 as _model_pb2
from ntk_client._proto.ntk.v1 import predict_pb2 as _predict_pb2
from ntk_client._proto.ntk.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DatasetChunk(_message.Message):
    __slots__ = ("dtype", "x_shape", "y_shape", "x_data", "y_data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    X_SHAPE_FIELD_NUMBER: _ClassVar[int]
    Y_SHAPE_FIELD_NUMBER: _ClassVar[int]
    X_DATA_FIELD_NUMBER: _ClassVar[int]
    Y_DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: _tensor_pb2.DType
    x_shape: _containers.RepeatedScalarFieldContainer[int]
    y_shape: _containers.RepeatedScalarFieldContainer[int]
    x_data: bytes
    y_data: bytes
    def __init__(self, dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., x_shape: _Optional[_Iterable[int]] = ..., y_shape: _Optional[_Iterable[int]] = ..., x_data: _Optional[bytes] = ..., y_data: _Optional[bytes] = ...) -> None: ...

class Dataset(_message.Message):
    __slots__ = ("id", "dtype", "x_shape", "y_shape", "size_bytes")
    ID_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    X_SHAPE_FIELD_NUMBER: _ClassVar[int]
    Y_SHAPE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    id: str
    dtype: _tensor_pb2.DType
    x_shape: _containers.RepeatedScalarFieldContainer[int]
    y_shape: _containers.RepeatedScalarFieldContainer[int]
    size_bytes: int
    def __init__(self, id: _Optional[str] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., x_shape: _Optional[_Iterable[int]] = ..., y_shape: _Optional[_Iterable[int]] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class GetDatasetRequest(_message.Message):
    __slots__ = ("dataset_id",)
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    def __init__(self, dataset_id: _Optional[str] = ...) -> None: ...
