"""End to end on real data: NTK regression on scikit-learn's bundled 8x8 digits.

1. Starts a server on loopback (CPU when there is no GPU), or uses --target.
2. Registers an MLP and a small CNN through the client, streams K(train, train) and
   K(test, train), asks for linearised predictions at t = inf and a few finite times, and prints
   model, parameters, kernel seconds and test accuracy.
3. Trains the same network for real (full-batch gradient descent on the same MSE, same learning
   rate) at two widths, and prints how far the trained network's test outputs are from the
   linearised predictions: the gap shrinks as the width grows.

    python examples/digits.py [--target HOST:PORT] [--quick]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from contextlib import ExitStack

import numpy as np
from ntk_client import Client
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

MIN_MLP_ACCURACY = 0.95
FINITE_TIMES = (10.0, 100.0, 1000.0)
# Small initial outputs: f0 stays in the linearised prediction, so its spread costs accuracy.
SIGMA_W, SIGMA_B = 1.0, 0.0


def load_data(seed: int = 0):
    """Standardised digits split 2:1; targets are one-hot rows (N, 10)."""
    digits = load_digits()
    x_train, x_test, l_train, l_test = train_test_split(
        digits.data, digits.target, test_size=1 / 3, random_state=seed, stratify=digits.target
    )
    scaler = StandardScaler().fit(x_train)
    x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
    return x_train, x_test, np.eye(10)[l_train], l_train, l_test


def mlp_spec(width: int, parameterization: str = "standard", seed: int = 0) -> dict:
    return {
        "input_shape": [64],
        "layers": [
            {"type": "dense", "width": width},
            {"type": "relu"},
            {"type": "dense", "width": width},
            {"type": "relu"},
            {"type": "dense", "width": 10},
        ],
        "parameterization": parameterization,
        "init": {"seed": seed, "sigma_w": SIGMA_W, "sigma_b": SIGMA_B},
    }


CNN_SPEC = {
    "input_shape": [1, 8, 8],
    "layers": [
        {"type": "conv", "channels": 16, "kernel_size": [3, 3], "padding": [1, 1]},
        {"type": "relu"},
        {"type": "conv", "channels": 16, "kernel_size": [3, 3]},
        {"type": "relu"},
        {"type": "flatten"},
        {"type": "dense", "width": 10},
    ],
    "parameterization": "ntk",
    "init": {"seed": 0, "sigma_w": SIGMA_W, "sigma_b": SIGMA_B},
}


def kernel_table(client: Client, data, mlp_width: int) -> list[dict]:
    x_train, x_test, y_train, _, l_test = data
    rows = []
    for name, spec, reshape in (
        (f"MLP 64-{mlp_width}-{mlp_width}-10", mlp_spec(mlp_width), (64,)),
        ("CNN conv16-conv16-dense10", CNN_SPEC, (1, 8, 8)),
    ):
        model = client.register_model(spec)
        xt = x_train.reshape(-1, *reshape)
        xs = x_test.reshape(-1, *reshape)

        start = time.perf_counter()
        k_train = client.kernel(model, xt)  # (N, N), trace layout
        k_test = client.kernel(model, xs, xt)  # (M, N)
        kernel_s = time.perf_counter() - start
        assert np.allclose(k_train, k_train.T)

        times = (*FINITE_TIMES, math.inf)
        preds = client.predict(model, xt, y_train, xs, t=times, diag_reg=1e-4)
        accuracy = {t: float((preds.at(t).argmax(1) == l_test).mean()) for t in times}
        rows.append(
            {
                "model": name,
                "parameters": model.parameter_count,
                "kernel_s": kernel_s,
                "kernel_shape": f"{k_train.shape} + {k_test.shape}",
                "accuracy": accuracy,
                "predict_s": preds.seconds,
            }
        )
    return rows


def _ntk_forward(weights: dict, x, torch):
    """An independent NTK-parameterised MLP forward pass, written directly in torch."""
    h = x
    n_layers = len(weights) // 2
    for i in range(n_layers):
        w, b = weights[f"{2 * i}.weight"], weights[f"{2 * i}.bias"]
        h = h @ w.T * (SIGMA_W / math.sqrt(w.shape[1])) + SIGMA_B * b
        if i < n_layers - 1:
            h = torch.relu(h)
    return h


def width_gap(client: Client, data, widths, n_train: int, steps: int, learning_rate: float):
    """Train for real at each width and compare with the service's linearised prediction."""
    import torch

    x_train, x_test, y_train, _, _ = data
    xt, yt, xs = x_train[:n_train], y_train[:n_train], x_test[:n_train]
    normalization = yt.size  # N O, as in the loss 1 / (2 N O) sum ||f - y||^2
    rows = []
    for width in widths:
        spec = mlp_spec(width, "ntk", seed=width)
        gen = np.random.default_rng(width)
        init = {}
        fan_in = 64
        for i, out in enumerate((width, width, 10)):
            init[f"{2 * i}.weight"] = gen.standard_normal((out, fan_in))
            init[f"{2 * i}.bias"] = gen.standard_normal(out)
            fan_in = out
        model = client.register_model(spec, weights=init)

        preds = client.predict(
            model, xt, yt, xs, t=[float(steps)], learning_rate=learning_rate, dtype="float64"
        )
        f_lin, f0_service = preds.f[0], preds.f0

        weights = {k: torch.tensor(v, requires_grad=True) for k, v in init.items()}
        tx, ty, ts = (torch.tensor(a) for a in (xt, yt, xs))
        f0_own = _ntk_forward(weights, ts, torch).detach().numpy()
        assert np.allclose(f0_own, f0_service, atol=1e-8), "service f0 differs from the network"
        for _ in range(steps):
            loss = ((_ntk_forward(weights, tx, torch) - ty) ** 2).sum() / (2 * normalization)
            grads = torch.autograd.grad(loss, list(weights.values()))
            with torch.no_grad():
                for w, g in zip(weights.values(), grads, strict=True):
                    w -= learning_rate * g
        f_trained = _ntk_forward(weights, ts, torch).detach().numpy()

        moved = np.linalg.norm(f_lin - f0_service)
        gap = np.linalg.norm(f_trained - f_lin)
        rows.append({"width": width, "gap": gap, "relative_gap": gap / moved, "moved": moved})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", help="use a running server instead of starting one")
    parser.add_argument("--mlp-width", type=int, default=512)
    parser.add_argument("--widths", default="64,1024", help="widths for the linearisation check")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--learning-rate", type=float, default=1.0)
    parser.add_argument("--gap-examples", type=int, default=256)
    args = parser.parse_args(argv)

    data = load_data()
    print(f"digits: {len(data[0])} train, {len(data[1])} test, 64 features, 10 classes")
    with ExitStack() as stack:
        target = args.target
        if target is None:
            from ntk_server.config import ServerConfig
            from ntk_server.server import BackgroundServer

            registry = stack.enter_context(tempfile.TemporaryDirectory(prefix="ntk-registry-"))
            server = BackgroundServer(ServerConfig(address="127.0.0.1:0", registry=registry))
            stack.enter_context(server)
            target = server.address
            print(f"started a server on {target} (device {server.server.device})")
        client = stack.enter_context(Client(target, timeout=3600))

        rows = kernel_table(client, data, args.mlp_width)
        times = (*FINITE_TIMES, math.inf)
        print()
        head = f"{'model':28} {'parameters':>10} {'kernel s':>9} " + " ".join(
            f"{'acc t=' + ('inf' if math.isinf(t) else f'{t:g}'):>10}" for t in times
        )
        print(head)
        print("-" * len(head))
        for r in rows:
            accs = " ".join(f"{r['accuracy'][t]:>10.4f}" for t in times)
            print(f"{r['model']:28} {r['parameters']:>10,} {r['kernel_s']:>9.2f} {accs}")

        widths = [int(w) for w in args.widths.split(",")]
        gaps = width_gap(client, data, widths, args.gap_examples, args.steps, args.learning_rate)
        print()
        print(
            f"trained network vs linearised prediction, NTK-parameterised MLP, "
            f"{args.gap_examples} train points, {args.steps} steps of gradient descent, "
            f"learning rate {args.learning_rate}"
        )
        print(f"{'width':>6} {'||f_trained - f_lin||':>22} {'/ ||f_lin - f0||':>17}")
        for g in gaps:
            print(f"{g['width']:>6} {g['gap']:>22.4f} {g['relative_gap']:>17.4f}")

    mlp_acc = rows[0]["accuracy"][math.inf]
    ok = mlp_acc >= MIN_MLP_ACCURACY
    shrinks = all(
        a["relative_gap"] > b["relative_gap"] for a, b in zip(gaps, gaps[1:], strict=False)
    )
    print()
    print(
        f"MLP test accuracy at t=inf {mlp_acc:.4f} (>= {MIN_MLP_ACCURACY}: {'yes' if ok else 'NO'})"
    )
    print(f"linearisation gap shrinks with width: {'yes' if shrinks else 'NO'}")
    return 0 if ok and shrinks else 1


if __name__ == "__main__":
    sys.exit(main())
