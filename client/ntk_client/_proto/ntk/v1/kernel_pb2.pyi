# Generated from proto/ by scripts/gen_proto.py. Do not edit.
from ntk_client._proto.ntk.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Layout(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LAYOUT_UNSPECIFIED: _ClassVar[Layout]
    FULL: _ClassVar[Layout]
    TRACE: _ClassVar[Layout]
    DIAGONAL: _ClassVar[Layout]

class Method(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METHOD_UNSPECIFIED: _ClassVar[Method]
    AUTO: _ClassVar[Method]
    JACOBIAN_CONTRACTION: _ClassVar[Method]
    NTK_VECTOR_PRODUCTS: _ClassVar[Method]
    STRUCTURED: _ClassVar[Method]
LAYOUT_UNSPECIFIED: Layout
FULL: Layout
TRACE: Layout
DIAGONAL: Layout
METHOD_UNSPECIFIED: Method
AUTO: Method
JACOBIAN_CONTRACTION: Method
NTK_VECTOR_PRODUCTS: Method
STRUCTURED: Method

class Inputs(_message.Message):
    __slots__ = ("tensor", "dataset_id")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    tensor: _tensor_pb2.Tensor
    dataset_id: str
    def __init__(self, tensor: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., dataset_id: _Optional[str] = ...) -> None: ...

class KernelRequest(_message.Message):
    __slots__ = ("model_id", "x1", "x2", "layout", "method", "dtype", "batch_diagonal", "block_rows", "block_cols", "block_indices", "max_message_bytes")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    X1_FIELD_NUMBER: _ClassVar[int]
    X2_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BATCH_DIAGONAL_FIELD_NUMBER: _ClassVar[int]
    BLOCK_ROWS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_COLS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_INDICES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    x1: Inputs
    x2: Inputs
    layout: Layout
    method: Method
    dtype: _tensor_pb2.DType
    batch_diagonal: bool
    block_rows: int
    block_cols: int
    block_indices: _containers.RepeatedScalarFieldContainer[int]
    max_message_bytes: int
    def __init__(self, model_id: _Optional[str] = ..., x1: _Optional[_Union[Inputs, _Mapping]] = ..., x2: _Optional[_Union[Inputs, _Mapping]] = ..., layout: _Optional[_Union[Layout, str]] = ..., method: _Optional[_Union[Method, str]] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., batch_diagonal: _Optional[bool] = ..., block_rows: _Optional[int] = ..., block_cols: _Optional[int] = ..., block_indices: _Optional[_Iterable[int]] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class KernelHeader(_message.Message):
    __slots__ = ("model_id", "n1", "n2", "output_size", "layout", "method", "method_reason", "dtype", "symmetric", "batch_diagonal", "shape", "block_rows", "block_cols", "grid_rows", "grid_cols", "blocks_total", "request_id")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    N1_FIELD_NUMBER: _ClassVar[int]
    N2_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    METHOD_REASON_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SYMMETRIC_FIELD_NUMBER: _ClassVar[int]
    BATCH_DIAGONAL_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_ROWS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_COLS_FIELD_NUMBER: _ClassVar[int]
    GRID_ROWS_FIELD_NUMBER: _ClassVar[int]
    GRID_COLS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    n1: int
    n2: int
    output_size: int
    layout: Layout
    method: Method
    method_reason: str
    dtype: _tensor_pb2.DType
    symmetric: bool
    batch_diagonal: bool
    shape: _containers.RepeatedScalarFieldContainer[int]
    block_rows: int
    block_cols: int
    grid_rows: int
    grid_cols: int
    blocks_total: int
    request_id: str
    def __init__(self, model_id: _Optional[str] = ..., n1: _Optional[int] = ..., n2: _Optional[int] = ..., output_size: _Optional[int] = ..., layout: _Optional[_Union[Layout, str]] = ..., method: _Optional[_Union[Method, str]] = ..., method_reason: _Optional[str] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., symmetric: _Optional[bool] = ..., batch_diagonal: _Optional[bool] = ..., shape: _Optional[_Iterable[int]] = ..., block_rows: _Optional[int] = ..., block_cols: _Optional[int] = ..., grid_rows: _Optional[int] = ..., grid_cols: _Optional[int] = ..., blocks_total: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class KernelBlock(_message.Message):
    __slots__ = ("index", "row_offset", "col_offset", "rows", "cols", "values", "mirror")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ROW_OFFSET_FIELD_NUMBER: _ClassVar[int]
    COL_OFFSET_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    MIRROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    row_offset: int
    col_offset: int
    rows: int
    cols: int
    values: _tensor_pb2.Tensor
    mirror: bool
    def __init__(self, index: _Optional[int] = ..., row_offset: _Optional[int] = ..., col_offset: _Optional[int] = ..., rows: _Optional[int] = ..., cols: _Optional[int] = ..., values: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., mirror: _Optional[bool] = ...) -> None: ...

class KernelSummary(_message.Message):
    __slots__ = ("blocks", "entries", "seconds")
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    blocks: int
    entries: int
    seconds: float
    def __init__(self, blocks: _Optional[int] = ..., entries: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class KernelResponse(_message.Message):
    __slots__ = ("header", "block", "summary")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    header: KernelHeader
    block: KernelBlock
    summary: KernelSummary
    def __init__(self, header: _Optional[_Union[KernelHeader, _Mapping]] = ..., block: _Optional[_Union[KernelBlock, _Mapping]] = ..., summary: _Optional[_Union[KernelSummary, _Mapping]] = ...) -> None: ...
