"""One neural-tangents row, run inside .bench-env (jax, no torch): prints one JSON line.

The network is the workload's, written as a plain jax function of the same weights (exported
by run.py), so nt's three implementations differentiate exactly the function the engine does.
Usage: nt_row.py IMPLEMENTATION WORKDIR N REPEATS (IMPLEMENTATION 1, 2 or 3).
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

PAGE_BYTES = resource.getpagesize()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_BYTES


def main(implementation: int, workdir: Path, n: int, repeats: int) -> None:
    meta = json.loads((workdir / "workload.json").read_text())
    dtype = meta["dtype"]
    import jax

    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import neural_tangents as nt

    weights = np.load(workdir / "params.npz")
    layers = meta["param_layers"]  # [[weight name, bias name or null, kind, stride, padding]]
    params = [
        (jnp.asarray(weights[w], dtype), None if b is None else jnp.asarray(weights[b], dtype))
        for w, b, *_ in layers
    ]
    x = jnp.asarray(np.load(workdir / "x.npy")[:n], dtype)

    def apply(p, xb):
        h = xb
        for i, ((w, b), (_, _, kind, stride, padding)) in enumerate(zip(p, layers, strict=True)):
            if kind == "conv":
                h = jax.lax.conv_general_dilated(
                    h, w, tuple(stride), [(q, q) for q in padding],
                    dimension_numbers=("NCHW", "OIHW", "NCHW"),
                )  # fmt: skip
                h = h if b is None else h + b[None, :, None, None]
            else:
                h = h.reshape(h.shape[0], -1) @ w.T
                h = h if b is None else h + b
            if i < len(p) - 1:
                h = jax.nn.relu(h)
        return h

    trace = meta["layout"] == "trace"
    kernel_fn = nt.empirical_ntk_fn(
        apply,
        trace_axes=(-1,) if trace else (),
        vmap_axes=0,
        implementation=nt.NtkImplementation(implementation),
    )
    kernel_fn = jax.jit(kernel_fn)
    baseline = _rss_bytes()

    def run():
        # nt's trace_axes already take the mean over the traced outputs, as the service does.
        return kernel_fn(x, None, params).block_until_ready()

    kernel = run()  # warm-up, includes compilation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    np.save(workdir / f"kernel-nt{implementation}-{n}.npy", np.asarray(kernel, np.float64))
    print(
        json.dumps(
            {
                "median_s": statistics.median(times),
                "times_s": times,
                "peak_bytes": peak,
                "n": n,
                "kernel": str(workdir / f"kernel-nt{implementation}-{n}.npy"),
                "versions": f"neural-tangents {nt.__version__}, jax {jax.__version__}",
            }
        )
    )


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
