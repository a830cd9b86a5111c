# Generated from proto/ by scripts/gen_proto.py. Do not edit.
from ntk_client._proto.ntk.v1 import kernel_pb2 as _kernel_pb2
from ntk_client._proto.ntk.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PredictRequest(_message.Message):
    __slots__ = ("model_id", "x_train", "y_train", "x_test", "t", "learning_rate", "diag_reg", "diag_reg_absolute", "layout", "method", "dtype")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    X_TRAIN_FIELD_NUMBER: _ClassVar[int]
    Y_TRAIN_FIELD_NUMBER: _ClassVar[int]
    X_TEST_FIELD_NUMBER: _ClassVar[int]
    T_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    DIAG_REG_FIELD_NUMBER: _ClassVar[int]
    DIAG_REG_ABSOLUTE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    x_train: _kernel_pb2.Inputs
    y_train: _tensor_pb2.Tensor
    x_test: _kernel_pb2.Inputs
    t: _containers.RepeatedScalarFieldContainer[float]
    learning_rate: float
    diag_reg: float
    diag_reg_absolute: bool
    layout: _kernel_pb2.Layout
    method: _kernel_pb2.Method
    dtype: _tensor_pb2.DType
    def __init__(self, model_id: _Optional[str] = ..., x_train: _Optional[_Union[_kernel_pb2.Inputs, _Mapping]] = ..., y_train: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., x_test: _Optional[_Union[_kernel_pb2.Inputs, _Mapping]] = ..., t: _Optional[_Iterable[float]] = ..., learning_rate: _Optional[float] = ..., diag_reg: _Optional[float] = ..., diag_reg_absolute: _Optional[bool] = ..., layout: _Optional[_Union[_kernel_pb2.Layout, str]] = ..., method: _Optional[_Union[_kernel_pb2.Method, str]] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("t", "f")
    T_FIELD_NUMBER: _ClassVar[int]
    F_FIELD_NUMBER: _ClassVar[int]
    t: float
    f: _tensor_pb2.Tensor
    def __init__(self, t: _Optional[float] = ..., f: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("predictions", "f0", "seconds", "method")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    F0_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    f0: _tensor_pb2.Tensor
    seconds: float
    method: _kernel_pb2.Method
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., f0: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., seconds: _Optional[float] = ..., method: _Optional[_Union[_kernel_pb2.Method, str]] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("model_id", "x", "dw", "dtype")
    class DwEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    DW_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    x: _kernel_pb2.Inputs
    dw: _containers.MessageMap[str, _tensor_pb2.Tensor]
    dtype: _tensor_pb2.DType
    def __init__(self, model_id: _Optional[str] = ..., x: _Optional[_Union[_kernel_pb2.Inputs, _Mapping]] = ..., dw: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("f0", "f_lin")
    F0_FIELD_NUMBER: _ClassVar[int]
    F_LIN_FIELD_NUMBER: _ClassVar[int]
    f0: _tensor_pb2.Tensor
    f_lin: _tensor_pb2.Tensor
    def __init__(self, f0: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., f_lin: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
