"""Benchmarks: every engine method, the service, torch.func and neural-tangents, side by side.

    python bench/run.py                       # W1, W1-f64, W2, W3, W4; nt rows if .bench-env
    python bench/run.py --workloads W1 --repeats 7
    python bench/run.py --quick               # small N, smoke test of every row

Every row runs in a fresh subprocess (its peak memory is its own): a warm-up run, then
`repeats` timed runs; the table shows the median. Slow rows run at a smaller N chosen from the
cost model so that a row fits its time and memory budget; their time is scaled to the
workload's N by (N / n)^2, the growth of a kernel's cost with its number of entries, and the
"x fastest" column compares scaled times. GFLOP/s is the cost model's flop count of the row's
algorithm family (structured, Jacobian contraction or NTK-vector products) at the N it ran,
over its median time. Peak MiB is the row's resident memory above its state after setup.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from ntk_server.engine import Network, compute_kernel  # noqa: E402
from ntk_server.engine.cost import (  # noqa: E402
    NOMINAL_FLOPS_PER_S,
    choose_method,
    method_costs,
)
from workloads import WORKLOADS, Workload, digits  # noqa: E402

NT_PYTHON = ROOT / ".bench-env" / "bin" / "python"
# Time and memory one row may take at the N it runs (warm-up and repeats together).
ROW_BUDGET_S = 12.0
ROW_MEMORY_BYTES = 6 << 30
ROW_TIMEOUT_S = 600
MIN_ROW_EXAMPLES = 2
ROUND_EXAMPLES = 8
QUICK_DIVISOR = 8
# The tutorial's NTK-vector products hold a parameter-sized cotangent per pair of examples and
# output, and their time follows those values (about 5 ns each, measured on this machine).
TORCHFUNC_NVP_S_PER_VALUE = 5e-9

ENGINE_ROWS = (
    "engine:structured",
    "engine:auto",
    "engine:jacobian_contraction",
    "engine:ntk_vector_products",
)
PEER_ROWS = ("service", "torchfunc:jac", "torchfunc:nvp")
NT_ROWS = {"nt:jacobian_contraction": 1, "nt:ntk_vector_products": 2, "nt:structured": 3}
FAMILY = {
    "engine:jacobian_contraction": "jacobian_contraction",
    "engine:ntk_vector_products": "ntk_vector_products",
    "torchfunc:jac": "jacobian_contraction",
    "torchfunc:nvp": "ntk_vector_products",
    "nt:jacobian_contraction": "jacobian_contraction",
    "nt:ntk_vector_products": "ntk_vector_products",
    "nt:structured": "structured",
}


def _family(row: str, auto_method: str) -> str:
    return FAMILY.get(row, auto_method if row in ("engine:auto", "service") else "structured")


def prepare(w: Workload, n: int, workdir: Path) -> tuple[Network, dict]:
    """Writes workload.json, params.npz (float64, seed 0) and x.npy for the row processes."""
    net = Network(w.spec)
    params = net.init_params(seed=0)
    layers = []
    for i, layer in enumerate(w.spec["layers"]):
        if layer["type"] in ("dense", "conv2d"):
            kind = "conv" if layer["type"] == "conv2d" else "dense"
            layers.append(
                [f"{i}.weight", f"{i}.bias", kind, layer.get("stride", [1, 1]),
                 layer.get("padding", [0, 0])]
            )  # fmt: skip
    meta = {
        "spec": w.spec, "layout": w.layout, "dtype": w.dtype, "output_size": net.output_size,
        "param_layers": layers,
    }  # fmt: skip
    (workdir / "workload.json").write_text(json.dumps(meta))
    np.savez(workdir / "params.npz", **{k: v.numpy() for k, v in params.items()})
    np.save(workdir / "x.npy", digits(n, w.kind))
    return net, params


def row_examples(
    net, w: Workload, n_full: int, row: str, auto_method: str, repeats: int, rate_scale: float
) -> int:
    """The largest n <= n_full whose estimated time and memory fit a row's budget.

    rate_scale: the measured matmul rate over the cost model's nominal rate.
    """
    family = _family(row, auto_method)
    itemsize = 8 if w.dtype == "float64" else 4
    n = n_full
    while True:
        cost = method_costs(net, n, None, w.layout, itemsize)[family]
        seconds, peak = cost.seconds, cost.peak_bytes
        if row == "torchfunc:nvp":
            values = n * n * net.output_size * net.parameter_count
            seconds, peak = values * TORCHFUNC_NVP_S_PER_VALUE, values * itemsize
        if seconds / rate_scale * (repeats + 1) <= ROW_BUDGET_S and peak <= ROW_MEMORY_BYTES:
            return n
        if n <= MIN_ROW_EXAMPLES:
            # Time alone may overrun at the smallest n; memory may not.
            return n if peak <= ROW_MEMORY_BYTES else 0
        n = max(MIN_ROW_EXAMPLES, int(n * 0.8) // ROUND_EXAMPLES * ROUND_EXAMPLES)


def run_row(row: str, workdir: Path, n: int, repeats: int, device: str) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "client"), str(ROOT / "server")]),
    }
    if row.startswith("nt:"):
        cmd = [str(NT_PYTHON), str(BENCH / "nt_row.py"), str(NT_ROWS[row]), str(workdir), str(n),
               str(repeats)]  # fmt: skip
    else:
        cmd = [sys.executable, str(BENCH / "row.py"), row, str(workdir), str(n), str(repeats),
               "--device", device]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=ROW_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"over {ROW_TIMEOUT_S} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail[:120]}
    return json.loads(lines[-1])


def nt_status() -> str | None:
    """None if the nt env works, else why its rows are skipped."""
    if not NT_PYTHON.exists():
        return "no .bench-env (run bench/setup_nt.sh)"
    probe = subprocess.run(
        [str(NT_PYTHON), "-c", "import neural_tangents, jax"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return "nt env broken: " + (probe.stderr.strip().splitlines() or ["?"])[-1][:100]
    return None


def bench_workload(name: str, args, matmul_rate: float, out_lines: list[str]) -> dict:
    w = WORKLOADS[name]
    n_full = args.sizes.get(name, w.n)
    n_full = max(ROUND_EXAMPLES, n_full // QUICK_DIVISOR) if args.quick else n_full
    itemsize = 8 if w.dtype == "float64" else 4
    with tempfile.TemporaryDirectory(prefix=f"ntk-bench-{name}-") as tmp:
        workdir = Path(tmp)
        net, params = prepare(w, n_full, workdir)
        auto_method, auto_reason = choose_method(net, n_full, None, w.layout, itemsize)
        # The float64 structured kernel on the bench's device is every row's reference.
        x = torch.from_numpy(np.load(workdir / "x.npy")).to(args.device)
        params = {k: v.to(args.device) for k, v in params.items()}
        reference = compute_kernel(net, params, x, None, layout=w.layout, method="structured")
        reference = reference.cpu()
        del x, params

        rows = [r for r in (*ENGINE_ROWS, *PEER_ROWS) if r not in args.skip]
        nt_skip = None if args.skip_nt else nt_status()
        if args.skip_nt:
            nt_skip = "--skip-nt"
        if nt_skip is None:
            rows += [r for r in NT_ROWS if r not in args.skip]
        results = {}
        for row in rows:
            repeats = args.repeats
            rate_scale = matmul_rate * 1e9 / NOMINAL_FLOPS_PER_S
            n = row_examples(net, w, n_full, row, auto_method, repeats, rate_scale)
            if n < n_full:
                repeats = max(2, repeats // 2)
            if n == 0:
                results[row] = {"error": f"over the {ROW_MEMORY_BYTES >> 30} GiB row budget at n=2"}
                continue
            res = run_row(row, workdir, n, repeats, args.device)
            if "kernel" in res:
                got = np.load(res["kernel"])
                ref = reference[:n, :n].numpy()
                res["rel_err"] = float(np.abs(got - ref).max() / np.abs(ref).max())
            if "median_s" in res:
                family = _family(row, auto_method)
                cost = method_costs(net, n, None, w.layout, itemsize)[family]
                res["gflops_per_s"] = cost.flops / res["median_s"] / 1e9
                res["scaled_s"] = res["median_s"] * (n_full / n) ** 2
            results[row] = res
            print(f"  {name} {row}: {res.get('median_s', res.get('error'))}", file=sys.stderr)

    table = format_table(name, w, n_full, results, auto_reason, matmul_rate, nt_skip)
    print(table, flush=True)
    out_lines.append(table)
    return results


def format_table(name, w, n_full, results, auto_reason, matmul_rate, nt_skip) -> str:
    ok = {r: v for r, v in results.items() if "scaled_s" in v}
    fastest = min(v["scaled_s"] for v in ok.values()) if ok else math.nan
    lines = [
        f"### {name}: {w.description}, N = {n_full}, {w.layout.upper()}, {w.dtype}",
        "",
        "| row | N run | median s | s at N | x fastest | GFLOP/s | peak MiB | max rel err |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row, v in results.items():
        if "error" in v:
            lines.append(f"| {row} | | skipped: {v['error']} | | | | | |")
            continue
        err = f"{v['rel_err']:.1e}" if "rel_err" in v else ""
        lines.append(
            f"| {row} | {v['n']} | {v['median_s']:.4g} | {v['scaled_s']:.4g} | "
            f"{v['scaled_s'] / fastest:.3g} | {v['gflops_per_s']:.1f} | "
            f"{v['peak_bytes'] / 2**20:.0f} | {err} |"
        )
    lines += ["", f"AUTO: {auto_reason}"]
    if nt_skip:
        lines.append(f"neural-tangents rows skipped: {nt_skip}")
    engine = [ok[r]["scaled_s"] for r in ENGINE_ROWS if r in ok and r != "engine:auto"]
    if "engine:auto" in ok and engine:
        lines.append(
            f"AUTO time / best engine method: {ok['engine:auto']['scaled_s'] / min(engine):.2f}"
        )
    s = ok.get("engine:structured")
    if s:
        nt_best = [ok[r]["scaled_s"] for r in NT_ROWS if r in ok]
        notes = [
            f"structured reaches {100 * s['gflops_per_s'] / matmul_rate:.0f}% of the matmul rate"
        ]
        if nt_best:
            notes.append(f"{min(nt_best) / s['scaled_s']:.2f}x faster than neural-tangents' best")
        if "torchfunc:jac" in ok:
            notes.append(
                f"{ok['torchfunc:jac']['scaled_s'] / s['scaled_s']:.0f}x faster than torch.func jac"
            )
        if "service" in ok:
            notes.append(f"service / in-process = {ok['service']['scaled_s'] / s['scaled_s']:.2f}")
        lines.append("; ".join(notes))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workloads", default="W1,W1-f64,W2,W3,W4")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help=f"N / {QUICK_DIVISOR}, 2 repeats")
    ap.add_argument("--skip-nt", action="store_true")
    ap.add_argument("--skip", default="", help="comma-separated rows to leave out")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="", help="N per workload, e.g. W1=4000,W4=8000")
    ap.add_argument("--markdown", type=Path, help="also write the tables to this file")
    args = ap.parse_args(argv)
    args.skip = set(filter(None, args.skip.split(",")))
    args.sizes = {
        k: int(v) for k, v in (item.split("=") for item in filter(None, args.sizes.split(",")))
    }
    if args.quick:
        args.repeats = 2

    with tempfile.TemporaryDirectory() as tmp:
        rates = {}
        for dtype in ("float32", "float64"):
            res = run_row(f"matmul:{dtype}", Path(tmp), 0, args.repeats, args.device)
            rates[dtype] = res.get("gflops_per_s", math.nan)
    device = args.device
    if device.startswith("cuda"):
        device = f"{device} ({torch.cuda.get_device_name()}, TF32 off)"
    header = (
        f"command: python bench/{Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}\n"
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, device {device}; load average at start {os.getloadavg()[0]:.2f}\n"
        f"matmul rate (2048^3, median): float32 {rates['float32']:.1f} GFLOP/s, "
        f"float64 {rates['float64']:.1f} GFLOP/s\n"
    )
    print(header, flush=True)
    out = [header]
    for name in args.workloads.split(","):
        w = WORKLOADS[name]
        bench_workload(name, args, rates[w.dtype], out)
    out.append(f"load average at end {os.getloadavg()[0]:.2f}\n")
    if args.markdown:
        args.markdown.write_text("\n".join(out))


if __name__ == "__main__":
    main()
