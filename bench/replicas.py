"""Speed-up of one kernel spread over 1, 2 and 3 local replicas (ntk_client.ReplicaSet).

    python bench/replicas.py [--examples 1000] [--runs 3] [--write bench/REPLICAS.md]

Each configuration starts its own `python -m ntk_server` processes on 127.0.0.1:0 sharing one
fresh registry directory, registers the model through the ReplicaSet, computes the kernel once
untimed (warm-up: model load, first torch calls), then times `--runs` kernels and reports the
median. Every replica gets `--threads` torch threads, so that on a small machine the numbers
show how well the work spreads rather than how badly processes fight over cores. The row
"1 (Client)" is a plain Client.kernel on one server: the reference for the spreading overhead.
Every spread kernel is checked to equal the plain Client's bit for bit.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # LocalReplicas: the launcher the tests use

from local_replicas import LocalReplicas  # noqa: E402
from ntk_client import Client, ReplicaSet  # noqa: E402


def mlp(width: int) -> dict:
    """A W1-like MLP 64-width-width-10 relu, standard parameterization."""
    return {
        "input_shape": [64],
        "layers": [
            {"type": "dense", "width": width},
            {"type": "relu"},
            {"type": "dense", "width": width},
            {"type": "relu"},
            {"type": "dense", "width": 10},
        ],
        "parameterization": "standard",
        "init": {"seed": 0, "sigma_w": 1.4, "sigma_b": 0.1},
    }


def digits(n: int) -> tuple[np.ndarray, str]:
    """The first n of scikit-learn's digits, standardised; random inputs if it is missing."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        x = np.random.default_rng(0).standard_normal((n, 64)).astype(np.float32)
        return x, "random normal inputs (scikit-learn not installed)"
    x = load_digits().data[:n].astype(np.float64)
    x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
    return x.astype(np.float32), "scikit-learn digits, standardised"


def time_config(args, x, replicas_count: int, plain: bool) -> dict:
    """Median seconds of `args.runs` kernels on `replicas_count` fresh replicas."""
    options = dict(
        layout="trace",
        method=args.method,
        dtype="float32",
        block_shape=(args.block, args.block),
    )
    with tempfile.TemporaryDirectory(prefix="ntk-bench-") as tmp:
        with LocalReplicas(Path(tmp), replicas_count, threads=args.threads) as local:
            if plain:
                with Client(local.addresses[0], timeout=3600) as client:
                    model = client.register_model(mlp(args.width))
                    client.kernel(model, x, **options)  # warm-up
                    seconds, k = [], None
                    for _ in range(args.runs):
                        start = time.perf_counter()
                        k = client.kernel(model, x, **options)
                        seconds.append(time.perf_counter() - start)
                    return {"seconds": seconds, "kernel": k, "report": None}
            with ReplicaSet(local.addresses, timeout=3600) as replicas:
                model = replicas.register_model(mlp(args.width))
                replicas.kernel(model, x, **options)  # warm-up
                seconds, k = [], None
                for _ in range(args.runs):
                    start = time.perf_counter()
                    k = replicas.kernel(model, x, **options)
                    seconds.append(time.perf_counter() - start)
                return {"seconds": seconds, "kernel": k, "report": replicas.last_report}


def table(rows: list[tuple[str, dict]], base_s: float) -> list[str]:
    lines = [
        "| replicas | seconds (median) | runs (s) | speed-up vs 1 | blocks per replica | "
        "requests | equal to 1 server |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, result in rows:
        median = statistics.median(result["seconds"])
        runs = " ".join(f"{s:.2f}" for s in result["seconds"])
        report = result["report"]
        if report is None:
            blocks, requests = "all", "1"
        else:
            blocks = " / ".join(str(r.blocks) for r in report.replicas)
            requests = str(sum(r.streams for r in report.replicas))
        equal = "reference" if report is None else ("yes" if result["equal"] else "NO")
        lines.append(
            f"| {name} | {median:.2f} | {runs} | {base_s / median:.2f} | {blocks} | "
            f"{requests} | {equal} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=1000, help="N = N1 = N2 (Gram matrix)")
    p.add_argument("--width", type=int, default=128, help="hidden width of the MLP")
    p.add_argument("--block", type=int, default=100, help="block rows = block cols")
    p.add_argument("--runs", type=int, default=3, help="timed kernels per configuration")
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    p.add_argument("--replicas", default="1,2,3", help="replica counts to time")
    p.add_argument("--method", default="jacobian_contraction")
    p.add_argument("--write", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)

    load_before = os.getloadavg()[0]
    x, source = digits(args.examples)
    counts = [int(c) for c in args.replicas.split(",")]
    rows = [("1 (Client)", time_config(args, x, 1, plain=True))]
    reference = rows[0][1]["kernel"]
    for count in counts:
        result = time_config(args, x, count, plain=False)
        result["equal"] = bool(np.array_equal(result["kernel"], reference))
        rows.append((str(count), result))
        print(f"{count} replicas: median {statistics.median(result['seconds']):.2f} s", flush=True)
    base_s = statistics.median(rows[0][1]["seconds"])
    blocks = rows[-1][1]["report"].blocks_total

    header = [
        f"Kernel: MLP 64-{args.width}-{args.width}-10 relu (standard), Gram matrix of "
        f"N = {len(x)} ({source}), trace layout, float32, method {args.method}, "
        f"{args.block}x{args.block} blocks ({blocks} blocks, symmetric grid).",
        f"Machine: {os.cpu_count()} CPU cores, {platform.machine()}, Python "
        f"{platform.python_version()}; {args.threads} torch thread(s) per replica; client, "
        "servers and loopback on the same machine; load average before the run "
        f"{load_before:.1f} (other work on the machine makes runs vary).",
        "",
    ]
    lines = header + table(rows, base_s)
    print()
    print("\n".join(lines))
    if not all(r.get("equal", True) for _, r in rows):
        print("a spread kernel differs from the single-server kernel", file=sys.stderr)
        return 1
    if args.write:
        args.write.write_text(
            "# One kernel on 1, 2 and 3 local replicas\n\n"
            f"Measured with `python bench/replicas.py {' '.join(argv or sys.argv[1:])}`.\n\n"
            + "\n".join(lines)
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
