# Generated from proto/ by scripts/gen_proto.py. Do not edit.
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Parameterization(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PARAMETERIZATION_UNSPECIFIED: _ClassVar[Parameterization]
    STANDARD: _ClassVar[Parameterization]
    NTK: _ClassVar[Parameterization]

class ActivationKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTIVATION_UNSPECIFIED: _ClassVar[ActivationKind]
    RELU: _ClassVar[ActivationKind]
    TANH: _ClassVar[ActivationKind]
    ERF: _ClassVar[ActivationKind]
    GELU: _ClassVar[ActivationKind]
    SIGMOID: _ClassVar[ActivationKind]
    SOFTPLUS: _ClassVar[ActivationKind]
    LEAKY_RELU: _ClassVar[ActivationKind]
    IDENTITY: _ClassVar[ActivationKind]
PARAMETERIZATION_UNSPECIFIED: Parameterization
STANDARD: Parameterization
NTK: Parameterization
ACTIVATION_UNSPECIFIED: ActivationKind
RELU: ActivationKind
TANH: ActivationKind
ERF: ActivationKind
GELU: ActivationKind
SIGMOID: ActivationKind
SOFTPLUS: ActivationKind
LEAKY_RELU: ActivationKind
IDENTITY: ActivationKind

class ArchitectureSpec(_message.Message):
    __slots__ = ("input_shape", "layers", "parameterization", "init")
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERIZATION_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    layers: _containers.RepeatedCompositeFieldContainer[Layer]
    parameterization: Parameterization
    init: Init
    def __init__(self, input_shape: _Optional[_Iterable[int]] = ..., layers: _Optional[_Iterable[_Union[Layer, _Mapping]]] = ..., parameterization: _Optional[_Union[Parameterization, str]] = ..., init: _Optional[_Union[Init, _Mapping]] = ...) -> None: ...

class Init(_message.Message):
    __slots__ = ("seed", "sigma_w", "sigma_b")
    SEED_FIELD_NUMBER: _ClassVar[int]
    SIGMA_W_FIELD_NUMBER: _ClassVar[int]
    SIGMA_B_FIELD_NUMBER: _ClassVar[int]
    seed: int
    sigma_w: float
    sigma_b: float
    def __init__(self, seed: _Optional[int] = ..., sigma_w: _Optional[float] = ..., sigma_b: _Optional[float] = ...) -> None: ...

class Layer(_message.Message):
    __slots__ = ("dense", "conv", "activation", "flatten", "global_avg_pool", "avg_pool", "layer_norm", "residual")
    DENSE_FIELD_NUMBER: _ClassVar[int]
    CONV_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    FLATTEN_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_AVG_POOL_FIELD_NUMBER: _ClassVar[int]
    AVG_POOL_FIELD_NUMBER: _ClassVar[int]
    LAYER_NORM_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_FIELD_NUMBER: _ClassVar[int]
    dense: Dense
    conv: Conv
    activation: Activation
    flatten: Flatten
    global_avg_pool: GlobalAvgPool
    avg_pool: AvgPool
    layer_norm: LayerNorm
    residual: Residual
    def __init__(self, dense: _Optional[_Union[Dense, _Mapping]] = ..., conv: _Optional[_Union[Conv, _Mapping]] = ..., activation: _Optional[_Union[Activation, _Mapping]] = ..., flatten: _Optional[_Union[Flatten, _Mapping]] = ..., global_avg_pool: _Optional[_Union[GlobalAvgPool, _Mapping]] = ..., avg_pool: _Optional[_Union[AvgPool, _Mapping]] = ..., layer_norm: _Optional[_Union[LayerNorm, _Mapping]] = ..., residual: _Optional[_Union[Residual, _Mapping]] = ...) -> None: ...

class Dense(_message.Message):
    __slots__ = ("width", "bias")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    width: int
    bias: bool
    def __init__(self, width: _Optional[int] = ..., bias: _Optional[bool] = ...) -> None: ...

class Conv(_message.Message):
    __slots__ = ("channels", "kernel_size", "stride", "padding", "bias")
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    KERNEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    channels: int
    kernel_size: _containers.RepeatedScalarFieldContainer[int]
    stride: _containers.RepeatedScalarFieldContainer[int]
    padding: _containers.RepeatedScalarFieldContainer[int]
    bias: bool
    def __init__(self, channels: _Optional[int] = ..., kernel_size: _Optional[_Iterable[int]] = ..., stride: _Optional[_Iterable[int]] = ..., padding: _Optional[_Iterable[int]] = ..., bias: _Optional[bool] = ...) -> None: ...

class Activation(_message.Message):
    __slots__ = ("kind", "negative_slope")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_SLOPE_FIELD_NUMBER: _ClassVar[int]
    kind: ActivationKind
    negative_slope: float
    def __init__(self, kind: _Optional[_Union[ActivationKind, str]] = ..., negative_slope: _Optional[float] = ...) -> None: ...

class Flatten(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GlobalAvgPool(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AvgPool(_message.Message):
    __slots__ = ("window", "stride")
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    window: _containers.RepeatedScalarFieldContainer[int]
    stride: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, window: _Optional[_Iterable[int]] = ..., stride: _Optional[_Iterable[int]] = ...) -> None: ...

class LayerNorm(_message.Message):
    __slots__ = ("eps",)
    EPS_FIELD_NUMBER: _ClassVar[int]
    eps: float
    def __init__(self, eps: _Optional[float] = ...) -> None: ...

class Residual(_message.Message):
    __slots__ = ("layers",)
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[Layer]
    def __init__(self, layers: _Optional[_Iterable[_Union[Layer, _Mapping]]] = ...) -> None: ...

class Model(_message.Message):
    __slots__ = ("id", "spec", "parameter_count", "input_shape", "output_size", "parameters", "created_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    spec: ArchitectureSpec
    parameter_count: int
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    output_size: int
    parameters: _containers.RepeatedCompositeFieldContainer[ParameterInfo]
    created_at: str
    def __init__(self, id: _Optional[str] = ..., spec: _Optional[_Union[ArchitectureSpec, _Mapping]] = ..., parameter_count: _Optional[int] = ..., input_shape: _Optional[_Iterable[int]] = ..., output_size: _Optional[int] = ..., parameters: _Optional[_Iterable[_Union[ParameterInfo, _Mapping]]] = ..., created_at: _Optional[str] = ...) -> None: ...

class ParameterInfo(_message.Message):
    __slots__ = ("name", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class RegisterModelRequest(_message.Message):
    __slots__ = ("spec", "safetensors")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SAFETENSORS_FIELD_NUMBER: _ClassVar[int]
    spec: ArchitectureSpec
    safetensors: bytes
    def __init__(self, spec: _Optional[_Union[ArchitectureSpec, _Mapping]] = ..., safetensors: _Optional[bytes] = ...) -> None: ...

class RegisterModelResponse(_message.Message):
    __slots__ = ("model", "created")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    model: Model
    created: bool
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ...) -> None: ...

class DeleteModelRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class DeleteModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
