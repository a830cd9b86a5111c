"""Linearised predictions against hand-computed values, and Evaluate's jvp against a Taylor
expansion computed independently."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import CNN_SPEC, MLP_SPEC
from ntk_server.engine import Network, compute_kernel, evaluate_linearized, gradient_descent_mse
from ntk_server.errors import InvalidArgument

T64 = torch.float64


def _t(values):
    return torch.tensor(values, dtype=T64)


def _predict(k_tt, k_st, y, f0_train, f0_test, times, **kw):
    preds = gradient_descent_mse(_t(k_tt), _t(k_st), _t(y), _t(f0_train), _t(f0_test), times, **kw)
    for p in preds:
        assert torch.isfinite(p).all()
    return [p.numpy() for p in preds]


# A linear model f(x) = w . x with X = [[1, 0], [0, 2]] has K = diag(1, 4); N O = 2.
K_TT = [[1.0, 0.0], [0.0, 4.0]]
K_ST = [[1.0, 2.0]]  # x* = [1, 1]
Y = [[1.0], [3.0]]
F0_TRAIN = [[0.5], [1.0]]
F0_TEST = [[0.25]]
R = [0.5, 2.0]  # Y - f0


def test_infinite_time_is_kernel_regression():
    (f,) = _predict(K_TT, K_ST, Y, F0_TRAIN, F0_TEST, [math.inf])
    assert f[0, 0] == pytest.approx(0.25 + 1.0 / 1.0 * R[0] + 2.0 / 4.0 * R[1], rel=1e-12)


def test_finite_time_follows_the_exponential():
    eta, t = 0.3, 2.5
    (f,) = _predict(K_TT, K_ST, Y, F0_TRAIN, F0_TEST, [t], learning_rate=eta)
    expected = 0.25
    for k_star, lam, r in ((1.0, 1.0, R[0]), (2.0, 4.0, R[1])):
        expected += k_star / lam * (1 - math.exp(-eta * lam * t / 2)) * r
    assert f[0, 0] == pytest.approx(expected, rel=1e-12)


def test_time_zero_gives_f0():
    (f,) = _predict(K_TT, K_ST, Y, F0_TRAIN, F0_TEST, [0.0])
    assert f[0, 0] == pytest.approx(0.25, abs=1e-15)


@pytest.mark.parametrize("absolute", [False, True])
def test_diag_reg_relative_and_absolute(absolute):
    reg = 0.4
    amount = reg if absolute else reg * (1.0 + 4.0) / 2  # relative: times mean(diag K)
    (f,) = _predict(
        K_TT, K_ST, Y, F0_TRAIN, F0_TEST, [math.inf], diag_reg=reg, diag_reg_absolute=absolute
    )
    expected = 0.25 + 1.0 / (1.0 + amount) * R[0] + 2.0 / (4.0 + amount) * R[1]
    assert f[0, 0] == pytest.approx(expected, rel=1e-12)


def test_duplicated_training_point_without_diag_reg():
    # X = [[1, 0], [1, 0]]: K = [[1, 1], [1, 1]] is singular (eigenvalues 2 and 0).
    k_tt = [[1.0, 1.0], [1.0, 1.0]]
    k_st = [[1.0, 1.0]]
    y, f0 = [[2.0], [2.0]], [[0.5], [0.5]]
    eta, t = 0.7, 1.5
    f_inf, f_t = _predict(k_tt, k_st, y, f0, [[0.0]], [math.inf, t], learning_rate=eta)
    assert f_inf[0, 0] == pytest.approx(1.5, rel=1e-12)  # the mean residual, not NaN
    assert f_t[0, 0] == pytest.approx(1.5 * (1 - math.exp(-eta * 2 * t / 2)), rel=1e-12)


def test_zero_eigenvalue_at_finite_time_takes_its_limit():
    # K_tt has a zero eigenvalue along v0 = [1, -1]/sqrt(2), and k_st has a component on it,
    # which grows linearly: g(0) = eta t / (N O).
    k_tt = [[1.0, 1.0], [1.0, 1.0]]
    k_st = [[1.0, 0.0]]
    y, f0 = [[1.0], [0.0]], [[0.0], [0.0]]
    eta, t = 0.5, 3.0
    (f,) = _predict(k_tt, k_st, y, f0, [[0.0]], [t], learning_rate=eta)
    # K_st v1 = 1/sqrt2 and v1.r = 1/sqrt2 on lambda = 2; K_st v0 = 1/sqrt2, v0.r = 1/sqrt2 on 0.
    expected = 0.5 * (1 - math.exp(-eta * 2 * t / 2)) / 2 + 0.5 * eta * t / 2
    assert f[0, 0] == pytest.approx(expected, rel=1e-12)


def test_full_layout_equals_trace_when_outputs_are_independent(rng):
    # Dense without bias: K_full[i, j] = (x_i . x_j) I, so both layouts must agree.
    net = Network({"input_shape": [4], "layers": [{"type": "dense", "width": 2, "bias": False}]})
    params = net.init_params()
    x = torch.tensor(rng.standard_normal((5, 4)))
    xs = torch.tensor(rng.standard_normal((3, 4)))
    y = torch.tensor(rng.standard_normal((5, 2)))
    f0, f0s = net.apply(params, x), net.apply(params, xs)
    results = {}
    for layout in ("trace", "full"):
        ktt = compute_kernel(net, params, x, layout=layout)
        kst = compute_kernel(net, params, xs, x, layout=layout)
        results[layout] = gradient_descent_mse(
            ktt, kst, y, f0, f0s, [0.7, math.inf], learning_rate=0.9, diag_reg=1e-3, layout=layout
        )
    for a, b in zip(results["trace"], results["full"], strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"diag_reg": -1.0}, "diag_reg"),
        ({"layout": "diagonal"}, "layout"),
    ],
)
def test_bad_prediction_arguments_name_the_field(kwargs, field):
    with pytest.raises(InvalidArgument) as info:
        _predict(K_TT, K_ST, Y, F0_TRAIN, F0_TEST, [1.0], **kwargs)
    assert info.value.field == field


def test_negative_time_is_rejected():
    with pytest.raises(InvalidArgument, match="times must be >= 0"):
        _predict(K_TT, K_ST, Y, F0_TRAIN, F0_TEST, [-1.0])


@pytest.mark.parametrize("spec", [MLP_SPEC, CNN_SPEC], ids=["mlp", "cnn"])
def test_evaluate_zero_delta_is_f(spec, rng):
    net = Network(spec)
    params = net.init_params()
    x = torch.tensor(rng.standard_normal((4, *net.input_shape)))
    f0, flin = evaluate_linearized(net, params, x, {})
    np.testing.assert_array_equal(flin.numpy(), f0.numpy())
    np.testing.assert_allclose(f0.numpy(), net.apply(params, x).detach().numpy(), rtol=1e-14)


@pytest.mark.parametrize("spec", [MLP_SPEC, CNN_SPEC], ids=["mlp", "cnn"])
def test_evaluate_matches_taylor_expansion(spec, rng):
    net = Network(spec)
    params = net.init_params()
    x = torch.tensor(rng.standard_normal((4, *net.input_shape)))
    names = sorted(params)
    dw = {n: torch.tensor(rng.standard_normal(params[n].shape)) * 1e-3 for n in names[::2]}
    _, flin = evaluate_linearized(net, params, x, dw)

    # Independent first-order term: a central finite difference of f along dw, in float64.
    h = 1e-3
    plus = {n: p + h * dw.get(n, torch.zeros_like(p)) for n, p in params.items()}
    minus = {n: p - h * dw.get(n, torch.zeros_like(p)) for n, p in params.items()}
    with torch.no_grad():
        f0 = net.apply(params, x)
        directional = (net.apply(plus, x) - net.apply(minus, x)) / (2 * h)
    taylor = f0 + directional
    np.testing.assert_allclose(flin.numpy(), taylor.numpy(), rtol=1e-6, atol=1e-9)
    # And the linearisation is close to the network itself for a small step.
    with torch.no_grad():
        moved = net.apply({n: p + dw.get(n, torch.zeros_like(p)) for n, p in params.items()}, x)
    assert float((moved - flin).abs().max()) < 1e-4
