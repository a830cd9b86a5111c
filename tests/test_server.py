"""The service over a real socket (127.0.0.1:0): results, status codes and details, persistence."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
import torch
from conftest import CNN_SPEC, MLP_SPEC
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ntk_client import Client, NTKError
from ntk_client import spec as spec_codec
from ntk_client._proto.ntk.v1 import kernel_pb2, model_pb2, service_pb2_grpc, tensor_pb2
from ntk_server.config import ServerConfig
from ntk_server.engine import Network
from ntk_server.server import BackgroundServer
from reference import assert_kernel_close, reference_kernel


def _net_params(spec):
    net = Network(spec)
    return net, net.init_params()


def _assert_status(info, code, *fragments):
    assert info.value.code == code, info.value
    for fragment in fragments:
        assert fragment in info.value.details, info.value.details


def _healthy(address):
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


@pytest.mark.parametrize("layout", ["full", "trace", "diagonal"])
def test_streamed_gram_matrix_matches_reference(client, rng, layout):
    model = client.register_model(MLP_SPEC)
    x = rng.standard_normal((11, 6))
    k = client.kernel(model, x, layout=layout, dtype="float64", block_shape=(4, 4))
    net, params = _net_params(MLP_SPEC)
    assert_kernel_close(k, reference_kernel(net, params, x, None, layout), "float64")


def test_small_message_limit_gives_many_blocks_and_the_same_kernel(server, rng):
    x1, x2 = rng.standard_normal((40, 1, 6, 6)), rng.standard_normal((90, 1, 6, 6))
    with Client(server.address) as big, Client(server.address, max_message_bytes=1 << 17) as small:
        model = big.register_model(CNN_SPEC)
        stream = small.kernel_blocks(model, x1, x2, layout="full", dtype="float64")
        blocks = list(stream)
        assert stream.header.blocks_total == len(blocks) > 1
        assert all(b.values.nbytes <= 1 << 17 for b in blocks)
        assert stream.summary is not None and stream.summary.blocks == len(blocks)
        k_small = small.kernel(model, x1, x2, layout="full", dtype="float64")
        k_big = big.kernel(model, x1, x2, layout="full", dtype="float64")
    assert_kernel_close(k_small, k_big, "float64")  # other block shapes: other sum orders
    net, params = _net_params(CNN_SPEC)
    assert_kernel_close(k_big, reference_kernel(net, params, x1, x2, "full"), "float64")


def test_gram_stream_sends_only_upper_blocks_and_is_symmetric(client, rng):
    model = client.register_model(MLP_SPEC)
    x = rng.standard_normal((10, 6))
    stream = client.kernel_blocks(model, x, block_shape=(3, 3))
    assert stream.header.symmetric
    blocks = list(stream)
    assert len(blocks) == 4 * 5 // 2
    assert all(b.col_offset >= b.row_offset for b in blocks)
    k = client.kernel(model, x, block_shape=(3, 3))
    np.testing.assert_array_equal(k, k.T)


def test_batch_diagonal(client, rng):
    model = client.register_model(CNN_SPEC)
    x = rng.standard_normal((5, 1, 6, 6))
    k = client.kernel(model, x, layout="full", dtype="float64", batch_diagonal=True)
    net, params = _net_params(CNN_SPEC)
    assert k.shape == (5, 2, 2)
    assert_kernel_close(k, reference_kernel(net, params, x, None, "full", True), "float64")


def test_memory_order_of_inputs_does_not_matter(client, rng):
    model = client.register_model(CNN_SPEC)
    x = rng.standard_normal((7, 1, 6, 6))
    base = client.kernel(model, x, dtype="float64")
    fortran = np.asfortranarray(x)
    strided = np.repeat(x, 2, axis=0)[::2]
    transposed = np.ascontiguousarray(x.transpose(3, 2, 1, 0)).transpose(3, 2, 1, 0)
    assert not strided.flags.c_contiguous and not fortran.flags.c_contiguous
    for variant in (fortran, strided, transposed):
        np.testing.assert_array_equal(client.kernel(model, variant, dtype="float64"), base)


def test_same_content_same_id(client):
    a = client.register_model(MLP_SPEC)
    b = client.register_model({**MLP_SPEC, "layers": list(MLP_SPEC["layers"])})
    assert a.id == b.id
    explicit_defaults = {
        **MLP_SPEC,
        "layers": [{**MLP_SPEC["layers"][0], "bias": True}, *MLP_SPEC["layers"][1:]],
    }
    assert client.register_model(explicit_defaults).id == a.id
    other_seed = {**MLP_SPEC, "init": {**MLP_SPEC["init"], "seed": 99}}
    assert client.register_model(other_seed).id != a.id
    assert [m.id for m in client.models()].count(a.id) == 1


def test_uploaded_weights_and_torch_sequential(client, rng):
    from torch import nn

    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.GELU(), nn.Flatten(), nn.Linear(72, 3))
    model = client.register_model(seq, input_shape=(1, 6, 6))
    assert model.parameter_count == sum(p.numel() for p in seq.parameters())
    x = rng.standard_normal((4, 1, 6, 6))
    k = client.kernel(model, x, layout="full", dtype="float64")

    net = Network(model.spec)
    params = {k_: v.detach().double() for k_, v in seq.state_dict().items()}
    assert_kernel_close(k, reference_kernel(net, params, x, None, "full"), "float64")
    f0, _ = client.evaluate(model, x)
    np.testing.assert_allclose(f0, seq.double()(torch.tensor(x)).detach().numpy(), rtol=1e-10)


def test_predict_and_evaluate_over_the_wire(client, rng):
    spec = {"input_shape": [2], "layers": [{"type": "dense", "width": 1, "bias": False}]}
    model = client.register_model(spec, weights={"0.weight": np.array([[0.5, -0.25]])})
    x = np.array([[1.0, 0.0], [0.0, 2.0]])
    y = np.array([[1.0], [3.0]])
    x_test = np.array([[1.0, 1.0]])
    p = client.predict(
        model, x, y, x_test, t=[0.0, 2.5, math.inf], learning_rate=0.3, dtype="float64"
    )
    f0_train = x @ np.array([0.5, -0.25])
    r = y[:, 0] - f0_train
    f0_test = 0.25
    expected_t = f0_test + sum(
        k / lam * (1 - math.exp(-0.3 * lam * 2.5 / 2)) * ri
        for k, lam, ri in ((1.0, 1.0, r[0]), (2.0, 4.0, r[1]))
    )
    assert p.f.shape == (3, 1, 1)
    assert p.at(0.0)[0, 0] == pytest.approx(f0_test)
    assert p.at(2.5)[0, 0] == pytest.approx(expected_t, rel=1e-10)
    assert p.at(math.inf)[0, 0] == pytest.approx(f0_test + r[0] + 0.5 * r[1], rel=1e-10)

    dw = {"0.weight": np.array([[0.1, 0.2]])}
    f0, flin = client.evaluate(model, x_test, dw)
    assert f0[0, 0] == pytest.approx(0.25)
    assert flin[0, 0] == pytest.approx(0.25 + 0.3)


def test_unknown_model_is_not_found(client, rng):
    x = rng.standard_normal((2, 6))
    missing = "0123456789abcdef0123456789abcdef"
    calls = [
        lambda: client.kernel(missing, x),
        lambda: client.get_model(missing),
        lambda: client.delete_model(missing),
        lambda: client.predict(missing, x, np.zeros((2, 3))),
        lambda: client.evaluate(missing, x),
        lambda: client.get_model("not-a-hex-id"),
    ]
    for call in calls:
        with pytest.raises(NTKError) as info:
            call()
        _assert_status(info, grpc.StatusCode.NOT_FOUND, "model_id")


def test_bad_input_is_invalid_argument_and_the_server_keeps_serving(server, client, rng):
    model = client.register_model(MLP_SPEC)
    nan = rng.standard_normal((3, 6))
    nan[1, 2] = np.nan
    inf = rng.standard_normal((3, 6))
    inf[0, 0] = np.inf
    cases = [
        (lambda: client.kernel(model, rng.standard_normal((3, 5))), ["x1.shape", "[3, 5]"]),
        (
            lambda: client.kernel(model, rng.standard_normal((3, 6)), rng.standard_normal((2, 7))),
            ["x2.shape"],
        ),
        (lambda: client.kernel(model, nan), ["x1.tensor", "non-finite"]),
        (lambda: client.kernel(model, inf), ["x1.tensor", "non-finite"]),
        (lambda: client.kernel(model, np.zeros((0, 6))), ["x1.shape", "N = 0"]),
        (
            lambda: client.predict(model, rng.standard_normal((3, 6)), np.zeros((3, 2))),
            ["y_train.shape"],
        ),
        (
            lambda: client.evaluate(model, rng.standard_normal((2, 6)), {"9.weight": np.zeros(3)}),
            ["dw['9.weight']"],
        ),
        (
            lambda: client.evaluate(model, rng.standard_normal((2, 6)), {"0.weight": np.zeros(3)}),
            ["dw['0.weight'].shape"],
        ),
        (
            lambda: client.register_model(MLP_SPEC, weights={"0.weight": np.zeros((9, 6))}),
            ["safetensors", "missing"],
        ),
        (
            lambda: client.register_model(
                MLP_SPEC, weights={**_weights(), "0.weight": np.zeros((9, 5))}
            ),
            ["safetensors['0.weight']", "[9, 5]"],
        ),
        (
            lambda: client.register_model({**MLP_SPEC, "layers": [{"type": "dense", "width": 0}]}),
            ["spec.layers[0].width", "got 0"],
        ),
        (lambda: client.register_model({**MLP_SPEC, "input_shape": []}), ["spec.input_shape"]),
        (
            lambda: client.register_model(
                {**MLP_SPEC, "layers": [{"type": "conv", "channels": 2, "kernel_size": [3, 3]}]}
            ),
            ["spec.layers[0]", "conv2d"],
        ),
        (
            lambda: client.register_model({"input_shape": [4], "layers": [{"type": "relu"}]}),
            ["spec.layers", "no parameters"],
        ),
    ]
    for call, fragments in cases:
        with pytest.raises(NTKError) as info:
            call()
        _assert_status(info, grpc.StatusCode.INVALID_ARGUMENT, *fragments)
        assert "Traceback" not in info.value.details

    # Raw protos the Python client would refuse to build.
    stub = service_pb2_grpc.NTKServiceStub(grpc.insecure_channel(server.address))
    raw_cases = [
        (
            model_pb2.RegisterModelRequest(
                spec=model_pb2.ArchitectureSpec(input_shape=[3], layers=[model_pb2.Layer()])
            ),
            "spec.layers[0]",
        ),
        (
            model_pb2.RegisterModelRequest(
                spec=model_pb2.ArchitectureSpec(
                    input_shape=[3],
                    layers=[model_pb2.Layer(activation=model_pb2.Activation(kind=42))],
                )
            ),
            "spec.layers[0].activation.kind",
        ),
        (
            model_pb2.RegisterModelRequest(
                spec=spec_codec.to_proto(MLP_SPEC), safetensors=b"garbage"
            ),
            "safetensors",
        ),
    ]
    for request, fragment in raw_cases:
        with pytest.raises(grpc.RpcError) as info:
            stub.RegisterModel(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fragment in info.value.details()
    tensor = tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[2, 6], data=b"\0" * 7)
    bad_dtype = tensor_pb2.Tensor(dtype=9, shape=[2, 6], data=b"\0" * 48)
    for t, fragment in ((tensor, "x1.tensor.data"), (bad_dtype, "x1.tensor.dtype")):
        request = kernel_pb2.KernelRequest(model_id=model.id, x1=kernel_pb2.Inputs(tensor=t))
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ComputeKernel(request, timeout=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fragment in info.value.details()
    request = kernel_pb2.KernelRequest(
        model_id=model.id,
        x1=kernel_pb2.Inputs(tensor=tensor_pb2.Tensor(dtype=1, shape=[1, 6], data=b"\0" * 24)),
        layout=17,
    )
    with pytest.raises(grpc.RpcError) as info:
        list(stub.ComputeKernel(request, timeout=10))
    assert (
        info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "layout" in info.value.details()
    )

    assert _healthy(server.address) == health_pb2.HealthCheckResponse.SERVING
    k = client.kernel(model, rng.standard_normal((4, 6)))
    assert k.shape == (4, 4) and np.isfinite(k).all()
    assert [m.id for m in client.models()] == [model.id]


def _weights():
    net = Network(MLP_SPEC)
    return {k: v.numpy() for k, v in net.init_params().items()}


def test_models_survive_a_restart(tmp_path, rng):
    registry = tmp_path / "shared-registry"
    x = rng.standard_normal((5, 1, 6, 6))
    config = ServerConfig(address="127.0.0.1:0", registry=registry)
    with BackgroundServer(config) as srv, Client(srv.address) as c:
        model = c.register_model(CNN_SPEC)
        deleted = c.register_model(MLP_SPEC)
        c.delete_model(deleted)
        before = c.kernel(model, x, dtype="float64")
    with BackgroundServer(config) as srv, Client(srv.address) as c:
        assert [m.id for m in c.models()] == [model.id]
        assert c.get_model(model.id).parameter_count == model.parameter_count
        np.testing.assert_array_equal(c.kernel(model, x, dtype="float64"), before)
    assert not any((registry / "tmp").iterdir())


def test_health_and_reflection(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    assert _healthy(server.address) == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(server.address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert "ntk.v1.NTKService" in names and "grpc.health.v1.Health" in names


@pytest.mark.parametrize(
    "change, field",
    [
        (
            {
                "layers": [
                    {"type": "dense", "width": 4},
                    {"type": "leaky_relu", "negative_slope": float("nan")},
                    {"type": "dense", "width": 1},
                ]
            },
            "spec.layers[1].negative_slope",
        ),
        (
            {
                "layers": [
                    {"type": "dense", "width": 4},
                    {"type": "layer_norm", "eps": float("inf")},
                    {"type": "dense", "width": 1},
                ]
            },
            "spec.layers[1].eps",
        ),
        ({"init": {"sigma_w": 1e300}}, "spec.init.sigma_w"),
        ({"layers": [{"type": "dense", "width": 2}] * 257}, "spec.layers"),
    ],
)
def test_spec_values_that_would_overflow_are_refused(client, change, field):
    spec = {"input_shape": [3], "layers": [{"type": "dense", "width": 1}], **change}
    with pytest.raises(NTKError) as info:
        client.register_model(spec)
    _assert_status(info, grpc.StatusCode.INVALID_ARGUMENT, field)


def test_deeply_nested_residual_blocks_are_refused(client):
    block = {"type": "residual", "layers": [{"type": "dense", "width": 3}]}
    for _ in range(9):
        block = {"type": "residual", "layers": [block]}
    with pytest.raises(NTKError) as info:
        client.register_model({"input_shape": [3], "layers": [block]})
    _assert_status(info, grpc.StatusCode.INVALID_ARGUMENT, "nest at most")
    for _ in range(10):
        block = {"type": "residual", "layers": [block]}
    with pytest.raises(ValueError, match="nest at most"):
        client.register_model({"input_shape": [3], "layers": [block]})


def test_overflowing_inputs_give_a_clear_error_not_nan(client, rng):
    model = client.register_model(MLP_SPEC)
    huge = rng.standard_normal((4, 6)) * 1e30
    with pytest.raises(NTKError) as info:
        client.kernel(model, huge)
    _assert_status(info, grpc.StatusCode.INVALID_ARGUMENT, "non-finite", "float64")
    with pytest.raises(NTKError) as info:
        client.predict(model, huge, np.zeros((4, 3)))
    _assert_status(info, grpc.StatusCode.INVALID_ARGUMENT, "non-finite")
    assert np.isfinite(client.kernel(model, huge / 1e30)).all()


def test_huge_learning_rate_times_t_takes_the_infinite_time_limit(client, rng):
    model = client.register_model(MLP_SPEC)
    x, y = rng.standard_normal((5, 6)), rng.standard_normal((5, 3))
    p = client.predict(model, x, y, t=[1e300, math.inf], learning_rate=1e300, dtype="float64")
    assert np.isfinite(p.f).all()
    np.testing.assert_allclose(p.f[0], p.f[1])


def test_batch_diagonal_with_x2_is_refused(client, rng):
    model = client.register_model(MLP_SPEC)
    x = rng.standard_normal((4, 6))
    with pytest.raises(NTKError) as info:
        client.kernel(model, x, x, batch_diagonal=True)
    _assert_status(info, grpc.StatusCode.INVALID_ARGUMENT, "x2", "batch_diagonal")


def test_a_failing_registry_volume_is_unavailable_and_the_server_keeps_serving(
    server, client, monkeypatch, rng
):
    import errno

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", "/secret/registry/path")

    monkeypatch.setattr(server.server.registry, "register_model", read_only)
    with pytest.raises(NTKError) as info:
        client.register_model(MLP_SPEC)
    _assert_status(info, grpc.StatusCode.UNAVAILABLE, "storage error", "Read-only file system")
    assert "/secret" not in info.value.details
    monkeypatch.undo()
    model = client.register_model(MLP_SPEC)
    assert client.kernel(model, rng.standard_normal((3, 6))).shape == (3, 3)
