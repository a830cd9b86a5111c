"""One benchmark row in the service's own environment: prints one JSON line.

Rows: engine:<method> (structured, jacobian_contraction, ntk_vector_products, auto),
torchfunc:jac, torchfunc:nvp, service, and matmul:<dtype> (the machine's matmul rate).
Each row runs in its own process (run.py starts it) so its peak memory is its own.
Usage: row.py ROW WORKDIR N REPEATS [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ntk_server.engine import KernelComputer, Network, plan_kernel  # noqa: E402
from ntk_server.engine.cost import choose_method  # noqa: E402
from torchfunc_peers import jacobian_contraction, ntk_vector_products  # noqa: E402

PAGE_BYTES = resource.getpagesize()
# In process there is no message limit; blocks are the engine's default size.
IN_PROCESS_MESSAGE_BYTES = 1 << 40
# Factor cache of one in-process request: every range of W1-W4 fits.
IN_PROCESS_CACHE_BYTES = 4 << 30
MATMUL_SIZE = 2048
SERVER_START_TIMEOUT_S = 60.0
ROW_CALL_TIMEOUT_S = 600.0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_BYTES


def engine_request(net, params, x, layout, method, device):
    """The whole Gram K(x, x) through the block grid, as the service computes it: (N, N, ...)."""
    n, o = x.shape[0], net.output_size
    plan = plan_kernel(n, None, o, layout, x.element_size(), IN_PROCESS_MESSAGE_BYTES)
    reason = "requested"
    if method == "auto":
        method, reason = choose_method(
            net, n, None, layout, x.element_size(), plan.block_rows, plan.block_cols
        )
    computer = KernelComputer(net, params, method, layout, IN_PROCESS_CACHE_BYTES)
    out = torch.empty(plan.shape, dtype=x.dtype, device=device)
    for b in plan.blocks:
        rows = slice(b.row_offset, b.row_offset + b.rows)
        cols = slice(b.col_offset, b.col_offset + b.cols)
        block = computer.block(x[rows], x[cols], ("x", b.row_offset), ("x", b.col_offset))
        out[rows, cols] = block
        if b.mirror:
            mirror = block.transpose(0, 1)
            out[cols, rows] = mirror.transpose(2, 3) if layout == "full" else mirror
    computer.release()
    return out, f"{method} ({reason})"


def _status_bytes(pid: int, field: str) -> int:
    """VmRSS or VmHWM (peak resident) of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def service_request(workdir: Path, n: int, repeats: int, device: str) -> dict:
    """The service end to end: a server process on 127.0.0.1, the client in this one.

    Times client.kernel (upload of x, computing, streaming and placing every block) with the
    server's own method choice (AUTO); peak memory is the server process's.
    """
    from ntk_client import Client

    meta = json.loads((workdir / "workload.json").read_text())
    x = np.load(workdir / "x.npy")[:n].astype(meta["dtype"])
    port_file = workdir / "service.port"
    port_file.unlink(missing_ok=True)
    server = subprocess.Popen(
        [sys.executable, "-m", "ntk_server", "--address", "127.0.0.1:0", "--registry",
         str(workdir / "registry"), "--port-file", str(port_file), "--log-level", "WARNING",
         "--device", device],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not port_file.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start (exit code {server.poll()})")
            time.sleep(0.05)
        with Client(port_file.read_text().strip(), timeout=ROW_CALL_TIMEOUT_S) as client:
            # The server initialises from the spec's seed: the same weights as params.npz
            # (seed 0), without uploading W4's 68 MB of float64 weights.
            model = client.register_model(meta["spec"])

            def call():
                return client.kernel(model, x, layout=meta["layout"], dtype=meta["dtype"])

            stream = client.kernel_blocks(model, x, layout=meta["layout"], dtype=meta["dtype"])
            note = f"{stream.method} ({stream.header.method_reason})"
            stream.cancel()
            kernel = call()  # warm-up
            baseline = _status_bytes(server.pid, "VmRSS")
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
            peak = _status_bytes(server.pid, "VmHWM") - baseline
    finally:
        server.terminate()
        server.wait(timeout=SERVER_START_TIMEOUT_S)
    path = workdir / f"kernel-service-{n}.npy"
    np.save(path, kernel.astype(np.float64))
    return {
        "median_s": statistics.median(times),
        "times_s": times,
        "peak_bytes": max(0, peak),
        "n": n,
        "kernel": str(path),
        "note": note,
    }


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("row")
    ap.add_argument("workdir", type=Path)
    ap.add_argument("n", type=int)
    ap.add_argument("repeats", type=int)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = args.device
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    if args.row.startswith("matmul:"):
        dtype = getattr(torch, args.row.split(":")[1])
        a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, dtype=dtype, device=device)
        b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, dtype=dtype, device=device)
        fn, note = (lambda: a @ b), f"{MATMUL_SIZE}^3 matmul"
        flops = 2 * MATMUL_SIZE**3
    else:
        meta = json.loads((args.workdir / "workload.json").read_text())
        dtype = getattr(torch, meta["dtype"])
        net = Network(meta["spec"])
        weights = np.load(args.workdir / "params.npz")
        params = {k: torch.from_numpy(weights[k]).to(dtype=dtype, device=device) for k in weights}
        x = torch.from_numpy(np.load(args.workdir / "x.npy")[: args.n]).to(
            dtype=dtype, device=device
        )
        layout, flops = meta["layout"], None
        kind, _, name = args.row.partition(":")
        note = ""
        if kind == "engine":

            def fn():
                return engine_request(net, params, x, layout, name, device)

        elif kind == "torchfunc":
            peer = jacobian_contraction if name == "jac" else ntk_vector_products
            pdict = dict(params)

            def fn():
                with torch.no_grad():
                    return peer(net.module, pdict, x, None, layout), ""

        elif kind == "service":
            result = service_request(args.workdir, args.n, args.repeats, device)
            print(json.dumps(result))
            return
        else:
            raise SystemExit(f"unknown row {args.row!r}")

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    baseline = _rss_bytes()
    first = fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    result = {"median_s": statistics.median(times), "times_s": times, "peak_bytes": peak}
    result["n"] = args.n
    if flops is not None:
        result["gflops_per_s"] = flops / result["median_s"] / 1e9
        result["note"] = note
    else:
        kernel, note = first
        path = args.workdir / f"kernel-{args.row.replace(':', '-')}-{args.n}.npy"
        np.save(path, kernel.detach().to("cpu", torch.float64).numpy())
        result["kernel"], result["note"] = str(path), note
    print(json.dumps(result))


if __name__ == "__main__":
    main()
